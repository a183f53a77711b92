"""Faults and concurrency, with real processes: a flaky source server, a SIGKILL mid-pretrain followed by a
re-run that resumes from the checkpoint, and two lifecycle runs at once sharing one MLflow registry."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmcore.checkpoint import list_checkpoints
from lmcore.io import sha256_file
from lmcore.paths import MANIFEST, SUMMARY, WEIGHTS, Layout
from tests.conftest import MICRO, ROOT
from tests.data.test_collect import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # whole pipelines, killed and run again
LMCORE = str(Path(sys.executable).parent / "lmcore")
TEXT = ("A flaky server still serves the whole text after a retry or two. " * 40).encode()


def project_env(root: Path) -> dict:
    """A subprocess's environment: the session's Prefect server, MLflow in `root`'s SQLite file."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def lmcore_pipeline(root: Path, *overrides: str) -> list[str]:
    return [LMCORE, "pipeline", "--params", str(MICRO), "--root", str(root), *(a for o in overrides for a in ("--set", o))]


def finish(proc: subprocess.Popen, what: str, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


# a source that fails its first two requests


@pytest.mark.parametrize("download_retries", [3, 0], ids=["download-retries", "prefect-task-retries"])
def test_flaky_source_is_collected_through_retries(tmp_path, monkeypatch, prefect_harness, download_retries):
    """collect's own retries (3, backing off) absorb two failures in one task run; with them off, the
    Prefect task's retries (2) do, and MLflow shows the two failed attempts before the finished one."""
    from flows.stage import stage_flow

    with Server({"/book.txt": TEXT}, fail_first=2, status=503) as srv:
        params = yaml.safe_load(MICRO.read_text())
        params["collect"] = {
            "sources": [{"name": "flaky", "url": srv.url("/book.txt"), "sha256": hashlib.sha256(TEXT).hexdigest()}],
            "retries": download_retries,
        }
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(params))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        result = stage_flow("collect", params_file=str(params_file), root=str(tmp_path))
    assert len(srv.requests) == 3
    assert result["bytes"] == len(TEXT)
    manifest = json.loads((Layout(tmp_path).raw / MANIFEST).read_text())
    assert [s["origin"] for s in manifest["sources"]] == ["download"]
    assert (Layout(tmp_path).raw / manifest["sources"][0]["file"]).read_bytes() == TEXT
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmcore-micro").experiment_id], order_by=["start_time ASC"])
    expected = ["FINISHED"] if download_retries else ["FAILED", "FAILED", "FINISHED"]
    assert [r.info.status for r in runs] == expected


# SIGKILL mid-pretrain, then the same command again


def test_killed_flow_resumes_pretrain_from_its_checkpoint(tmp_path, prefect_harness):
    root = tmp_path / "project"
    root.mkdir()
    cmd = lmcore_pipeline(root, "pretrain.max_steps=300", "pretrain.eval_interval=100",
                          "pretrain.checkpoint_interval=20", "pretrain.resume=true")
    checkpoints = root / "models" / "checkpoints" / "pretrain"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=project_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (checkpoints.is_dir() and list_checkpoints(checkpoints)):
            assert proc.poll() is None, f"the flow ended before its first checkpoint:\n{proc.stdout.read()[-6000:]}"
            assert time.monotonic() < deadline, "no checkpoint in 600 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the flow and everything it started
    finally:
        proc.wait(60)
        proc.stdout.close()
    killed_at = list_checkpoints(checkpoints)[-1][0]
    assert 20 <= killed_at < 300
    assert not (Layout(root).pretrained / WEIGHTS).exists()  # killed mid-pretrain: no model yet
    assert not list(Layout(root).pretrained.parent.glob("**/*.tmp*"))

    out = finish(subprocess.Popen(cmd, cwd=ROOT, env=project_env(root), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True), "the re-run")
    summary = json.loads((Layout(root).pretrain_reports / SUMMARY).read_text())
    assert summary["resumed_from_step"] == killed_at and summary["steps"] == 300, out[-3000:]
    assert re.search(r"^registered model +lmcore-base v1$", out, re.M), out[-3000:]  # the run's summary
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmcore-micro")
    pretrains = client.search_runs([exp.experiment_id], "tags.`lmcore.stage` = 'pretrain'", order_by=["start_time ASC"])
    # the killed run never finished; the re-run did, and logged the resumed step
    assert [r.info.status for r in pretrains] == ["RUNNING", "FINISHED"]
    assert pretrains[1].data.metrics["resumed_from_step"] == killed_at


# two lifecycle runs at once


def test_two_lifecycle_runs_at_once_keep_outputs_and_registry_whole(tmp_path, prefect_harness):
    """Same params and seed, different project roots, one MLflow SQLite store: both finish, their outputs are
    identical (neither wrote into the other's), and the registry holds one consistent version per run."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    roots = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for root in roots:
        root.mkdir()
        env = {**project_env(root), "MLFLOW_TRACKING_URI": store}
        procs.append(subprocess.Popen(lmcore_pipeline(root), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [finish(p, f"lifecycle run in {r.name}") for p, r in zip(procs, roots)]

    a, b = (Layout(r) for r in roots)
    for rel in ("data/raw", "data/clean", "data/tokens", "models/base", "models/classifier", "models/instruct", "models/dpo"):
        files_a = sorted(p.relative_to(a.root) for p in (a.root / rel).rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b.root) for p in (b.root / rel).rglob("*") if p.is_file())
        assert files_a == files_b and files_a, rel
        for f in files_a:
            assert (a.root / f).read_bytes() == (b.root / f).read_bytes(), f

    client = MlflowClient(store, registry_uri=store)
    run_ids = {r: client.get_run(_parent_run_id(out)) for r, out in zip(("a", "b"), outs)}
    assert all(run.info.status == "FINISHED" for run in run_ids.values())
    expected = {"lmcore-base": 2, "lmcore-classifier": 2, "lmcore-instruct": 4}  # instruct: @sft and @dpo per run
    for name, count in expected.items():
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.version) for v in versions) == list(range(1, count + 1)), name
        assert len({v.run_id for v in versions}) == count  # one run per version, none shared
        for v in versions:
            run = client.get_run(v.run_id)
            assert run.info.status == "FINISHED"
            assert v.tags["lmcore.weights_sha256"] == run.data.tags["lmcore.weights_sha256"]
            assert run.data.tags[PARENT] in {r.info.run_id for r in run_ids.values()}
    weights = sha256_file(a.pretrained / WEIGHTS)
    base = client.search_model_versions("name = 'lmcore-base'")
    assert {v.tags["lmcore.weights_sha256"] for v in base} == {weights}
    champion = client.get_model_version_by_alias("lmcore-base", "champion")
    assert champion.tags["promotion.alias"] == "champion"
    others = [v for v in base if v.version != champion.version]
    assert [v.tags.get("promotion.alias") for v in others] == ["challenger"]  # equal scores do not beat the champion
    for alias, kind in (("sft", "instruct"), ("dpo", "dpo")):
        assert client.get_model_version_by_alias("lmcore-instruct", alias).tags["lmcore.finetune"] == kind


PARENT = "mlflow.parentRunId"


def _parent_run_id(out: str) -> str:
    line = next(l for l in out.splitlines() if "MLflow run " in l)
    return line.split("MLflow run ")[1].split(";")[0].strip()
