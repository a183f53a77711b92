"""tasks.tracking against a real SQLite store: processes that open a new store at the same moment all succeed; params,
tags and errors are logged without the credentials in their URLs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmcore.config import params_from_dict
from lmcore import pipeline
from tasks.runner import section
from tasks.tags import ERROR_ARTIFACT, TAG_ERROR
from tasks.tracking import Tracking
from tests.conftest import MICRO

SCRIPT = """
import sys, time
from pathlib import Path
from tasks.tracking import Tracking
Path(sys.argv[2] + "." + sys.argv[3]).touch()  # imported: ready
while not Path(sys.argv[2]).exists():  # start together, when every interpreter is ready
    time.sleep(0.01)
tracking = Tracking(uri=sys.argv[1], experiment="race")
with tracking.run("collect") as run:
    run.log_metrics({"x": 1.0})
"""


def test_processes_opening_a_new_sqlite_store_together_all_succeed(tmp_path):
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, uri, str(go), str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"go.{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not get ready"
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-2000:] for e in errors)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("race")
    assert len(client.search_runs([exp.experiment_id])) == 3


SECRETS = ("judge-pass", "sk-live-123", "mirror-pass", "tok-456")


def test_params_and_errors_are_logged_without_the_credentials_in_their_urls(tmp_path):
    """A stage's params (tasks.runner.section, as every stage task logs them) and the whole params (the lifecycle
    run's) and a failed run's error, logged to a SQLite store: the URLs keep their hosts and paths, never a password
    or a token."""
    from mlflow.tracking import MlflowClient

    data = yaml.safe_load(MICRO.read_text())
    source = data["collect"]["sources"][0]
    source["url"] = source["url"].replace("https://", "https://mirror-user:mirror-pass@") + "?token=tok-456"
    judge_url = "https://judge-user:judge-pass@judge.example/v1?api_key=sk-live-123"
    params = params_from_dict(data, overrides=[f"judge.url={judge_url}", "judge.model=m"])
    tracking = Tracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="redact")
    with tracking.run("lifecycle") as parent:
        parent.log_params(params.to_dict())
    with pytest.raises(ConnectionError), tracking.run("judge") as run:
        run.log_params(section(params, pipeline.get("judge")))
        raise ConnectionError(f"{judge_url}: connection refused")

    client = MlflowClient(tracking.uri)
    whole, judge = client.get_run(parent.run_id), client.get_run(run.run_id)
    assert judge.data.params["judge.url"] == "https://***@judge.example/v1?api_key=***"
    assert whole.data.params["judge.url"] == judge.data.params["judge.url"]
    assert "https://***@raw.githubusercontent.com/rasbt/" in whole.data.params["collect.sources"]
    assert "the-verdict.txt?token=***" in whole.data.params["collect.sources"]
    error = judge.data.tags[TAG_ERROR]
    assert error.startswith("ConnectionError: https://***@judge.example/v1?api_key=***") and error.endswith("connection refused")
    traceback = Path(client.download_artifacts(judge.info.run_id, ERROR_ARTIFACT, str(tmp_path))).read_text()
    assert "ConnectionError: https://***@judge.example/v1?api_key=***" in traceback
    logged = "\n".join([*whole.data.params.values(), *judge.data.params.values(), *judge.data.tags.values(), traceback])
    assert not [s for s in SECRETS if s in logged]


def test_a_stage_run_logs_exactly_the_params_dvc_tracks_for_it():
    """One record of what a stage used: the sections its run logs to MLflow are the ones dvc.yaml tracks for it
    (`Stage.params`), for every stage; e.g. train_tokenizer's four."""
    from lmcore.pipeline import STAGES
    from tests.conftest import ROOT

    params = params_from_dict(yaml.safe_load(MICRO.read_text()))
    tracked = {name: spec.get("params", []) for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}
    for stage in STAGES:
        logged = section(params, stage)
        assert list(logged) == list(stage.params) == tracked[stage.name], stage.name
    assert list(section(params, pipeline.get("train_tokenizer"))) == ["seed", "train_tokenizer", "tokenize", "benchmark"]
    assert section(params, pipeline.get("collect")) == {"collect": params.to_dict()["collect"]}  # no seed: collect has none
