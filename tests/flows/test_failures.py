"""Failures as a user meets them at the terminal: `lmcore` run as a real command. Bad input ends the command with
one line naming the file, line, member or key and exit status 2, with no retries and no traceback; the traceback
is in logs/<stage>.log and the stage's MLflow run (and on the terminal with --verbose)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import MICRO

LMCORE = str(Path(sys.executable).parent / "lmcore")
TEXT = "It was a bright cold day in April, and the clocks were striking thirteen.\n\n" * 20


def lmcore(root: Path, *args: str) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    return subprocess.run([LMCORE, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def in_process(root: Path, monkeypatch, *args: str) -> subprocess.CompletedProcess:
    """The same command through typer's CliRunner (seconds faster: no new interpreter), as a CompletedProcess."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def project(root: Path, sources: list[dict], **preprocess) -> Path:
    params = yaml.safe_load(MICRO.read_text())
    params["collect"] = {"sources": sources, "retries": 0}
    params["preprocess"] = {**params.get("preprocess", {}), **preprocess}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2; the error once, on the last line, naming what is wrong; no traceback anywhere."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output and "File \"" not in output, output
    last = proc.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last
    message = last.split("  [traceback: ")[0]
    assert output.count(message) == 1, f"shown more than once:\n{output}"
    return last


@pytest.fixture
def zip_slip(tmp_path) -> Path:
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.writestr("ok.txt", TEXT)
        z.writestr("../../evil.txt", "pwned")
    return project(tmp_path, [{"name": "evil", "path": "evil.zip", "extract": True}])


def test_zip_slip_is_one_line_exit_2_not_retried_and_traced_in_the_log_and_mlflow(zip_slip, prefect_harness, monkeypatch):
    proc = lmcore(zip_slip, "run", "collect")
    last = assert_one_line(proc, "member '../../evil.txt' escapes the destination")
    assert "source 'evil'" in last and "archive evil.zip" in last
    assert f"[traceback: {zip_slip / 'logs' / 'collect.log'}]" in last
    assert "Retry" not in proc.stdout + proc.stderr
    log = (zip_slip / "logs" / "collect.log").read_text()
    assert "Traceback (most recent call last)" in log and "ArchiveError" in log and "CollectError" in log
    assert not (zip_slip / "evil.txt").exists() and not (zip_slip.parent / "evil.txt").exists()

    client = MlflowClient(f"sqlite:///{zip_slip / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lmcore-micro").experiment_id])  # one attempt: no retry
    assert run.info.status == "FAILED" and run.data.tags["lmcore.stage"] == "collect"
    assert run.data.tags["lmcore.error"].startswith("CollectError: source 'evil'")
    trace = Path(client.download_artifacts(run.info.run_id, "error/traceback.txt", str(zip_slip))).read_text()
    assert "ArchiveError" in trace and "Traceback" in trace

    verbose = in_process(zip_slip, monkeypatch, "--verbose", "run", "collect")  # the terminal's case is the one above
    assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr


def test_a_missing_local_source_is_one_line_before_prefect_starts(tmp_path):
    """Checked from the params alone, before Prefect, MLflow or torch start: here no Prefect server can be reached at
    all, and the command still ends with the one line (in well under a second of its own; `lmcore run` of a stage
    starts a temporary Prefect server first, 15 s and more on two cores). `lmcore pipeline` checks every stage's."""
    root = project(tmp_path, [{"name": "ghost", "path": "nowhere.txt"}])
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    for command in (["run", "collect"], ["pipeline"]):
        proc = subprocess.run([LMCORE, *command], cwd=root, env=env, capture_output=True, text=True, timeout=60)
        assert_one_line(proc, "collect.sources[0].path (source 'ghost'): nowhere.txt does not exist", str(root))
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (root / "mlflow.db").exists() and not (root / "logs").exists()


def test_a_stage_whose_inputs_are_not_made_yet_is_one_line_naming_the_stage_that_makes_them(tmp_path):
    """`lmcore run pretrain` in a project where nothing ran: its declared inputs are checked first, with no Prefect
    server reachable, and the line says which stage makes the first missing one."""
    root = project(tmp_path, [{"name": "book", "path": "book.txt"}])
    (root / "book.txt").write_text(TEXT)
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    proc = subprocess.run([LMCORE, "run", "pretrain"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert_one_line(proc, "pretrain: data/tokens does not exist", "the tokenize stage makes it", "(and 2 more)")
    assert not (root / "mlflow.db").exists()


def test_a_wrong_checksum_is_one_line(tmp_path, prefect_harness, monkeypatch):
    (tmp_path / "book.txt").write_text(TEXT)
    source = {"name": "book", "path": "book.txt", "sha256": hashlib.sha256(b"other bytes").hexdigest()}
    assert_one_line(in_process(project(tmp_path, [source]), monkeypatch, "run", "collect"), "source 'book'", "sha256 mismatch", "book.txt")


@pytest.mark.parametrize("case", ["non-utf8", "malformed jsonl"])
def test_preprocess_input_errors_are_one_line(tmp_path, prefect_harness, monkeypatch, case):
    from lmcore.config import load_params
    from lmcore.stages import StageContext
    from lmcore.stages.collect import run as collect

    if case == "non-utf8":
        (tmp_path / "book.txt").write_bytes(TEXT.encode() + b"caf\xe9 au lait\n")
        source, fragments = {"name": "book", "path": "book.txt"}, ("book.txt", "invalid UTF-8 at byte offset", "line 41")
    else:
        lines = [json.dumps({"text": TEXT}), '{"text": "cut off', json.dumps({"text": TEXT})]
        (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
        source, fragments = {"name": "docs", "path": "docs.jsonl.gz"}, ("docs.jsonl.gz:2", "malformed JSON")
    root = project(tmp_path, [source])
    collect(StageContext(root=root, params=load_params(root / "params.yaml")))  # data/raw, as `lmcore run collect` makes it
    assert_one_line(in_process(root, monkeypatch, "run", "preprocess"), *fragments)


@pytest.fixture
def truncated_model(tmp_path) -> Path:
    import torch

    from lmcore.checkpoint import save_model
    from lmcore.config import ModelConfig
    from lmcore.model import GPT

    torch.manual_seed(0)
    folder = tmp_path / "m"
    save_model(GPT(ModelConfig(vocab_size=50257, context_length=16, n_embd=16, n_layer=1, n_head=2)), folder,
               extra={"tokenizer": "gpt2"})
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "params.yaml").write_text(MICRO.read_text())  # `lmcore eval` (the old name of `lmcore benchmark`) reads the benchmark section
    return folder


@pytest.mark.parametrize("command", [["generate", "hello"], ["eval", "--tasks", "arc_easy", "--limit", "2"], ["serve", "--port", "0"]])
def test_a_truncated_model_file_is_one_line(truncated_model, command):
    proc = lmcore(truncated_model.parent, *command, "--model", str(truncated_model))
    assert_one_line(proc, f"{truncated_model / 'model.safetensors'}", "truncated or not a safetensors file")
