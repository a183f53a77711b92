"""`dvc repro` in a temporary git repo: runs every stage, then nothing, then only what a param change touches;
and a Prefect lifecycle run leaves DVC with nothing to do."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MICRO, ROOT

pytestmark = pytest.mark.slow
STAGES = [
    "collect", "preprocess", "tokenize", "pretrain", "evaluate", "benchmark", "finetune_classifier", "finetune_instruct", "dpo", "judge",
]
DOWNSTREAM_OF_PRETRAIN = ["pretrain", "evaluate", "benchmark", "finetune_classifier", "finetune_instruct", "dpo"]
RESPONSES = ["reports/instruct/test_responses.jsonl", "reports/dpo/test_responses.jsonl"]  # the judge stage's inputs
COPY = ["lmcore", "tasks", "flows", "dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"]


def make_repo(tmp_path: Path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPY:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    shutil.copy2(MICRO, repo / "params.yaml")
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/dvc_plots/\n__pycache__/\n")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(repo)  # the copied code, not the checkout's
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    # One Prefect server for every `lmcore run` the stages start (the session's), not a temporary one each
    from prefect.settings import PREFECT_API_URL

    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "lmcore-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@lmcore.invalid"
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    return repo, env


def sh(repo: Path, env: dict, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def dvc(repo, env, *args):
    return sh(repo, env, sys.executable, "-m", "dvc", *args)


def test_repro_runs_all_then_nothing_then_only_what_changed(tmp_path, prefect_harness):
    repo, env = make_repo(tmp_path)
    assert ran(dvc(repo, env, "repro")) == STAGES
    assert ran(dvc(repo, env, "repro")) == []
    assert "up to date" in dvc(repo, env, "status")

    def responses():
        return [(repo / f).read_bytes() for f in RESPONSES]

    # the judge stage re-runs only when the responses it judges changed (a micro model's may not)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["lr"] = 0.001
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = responses()
    first = ran(dvc(repo, env, "repro"))
    judged = ["judge"] if responses() != before else []
    assert sorted(first) == sorted(DOWNSTREAM_OF_PRETRAIN + judged)
    params["dpo"]["beta"] = 0.2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = responses()
    second = ran(dvc(repo, env, "repro"))
    judged_again = ["judge"] if responses() != before else []
    assert second == ["dpo"] + judged_again

    metrics = json.loads(dvc(repo, env, "metrics", "show", "--json"))[""]["data"]
    values = metrics["reports/evaluate/metrics.json"]["data"]
    assert values["perplexity"] > 1 and values["val_loss"] > 0
    assert 0 <= metrics["reports/classifier/metrics.json"]["data"]["test"]["accuracy"] <= 1
    assert metrics["reports/instruct/metrics.json"]["data"]["final_val_loss"] > 0
    assert "final_val_reward_margin" in metrics["reports/dpo/metrics.json"]["data"]
    assert 0 <= metrics["reports/benchmark/metrics.json"]["data"]["mmlu"]["acc"] <= 1
    assert metrics["reports/judge/summary.json"]["data"]["skipped"] is True
    dvc(repo, env, "plots", "show", "--out", "dvc_plots")
    html = (repo / "dvc_plots" / "index.html").read_text()
    assert "val_loss" in html and "train_loss" in html and "train_reward_margin" in html

    # every dvc-run stage tracked to MLflow, one run per stage execution
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("lmcore-micro")
    stages = sorted(r.data.tags["lmcore.stage"] for r in client.search_runs([exp.experiment_id]))
    assert stages == sorted(STAGES + DOWNSTREAM_OF_PRETRAIN + judged + ["dpo"] + judged_again)


def test_prefect_run_leaves_dvc_nothing_to_do(tmp_path, prefect_harness):
    repo, env = make_repo(tmp_path)
    out = sh(repo, env, "lmcore", "pipeline")
    assert "committed to dvc.lock" in out
    assert "up to date" in dvc(repo, env, "status")
    assert ran(dvc(repo, env, "repro")) == []
