"""The documented commands that need a trained project (models/base, models/instruct, a registry): run as the README
and docs/ show them, at tiny sizes, on a copy of the session's micro lifecycle run. tests/test_docs_commands.py
holds the table of every documented command and the test that runs it.

    python -m pytest tests/flows/test_docs_commands.py -q
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from lmcore.paths import Layout
from tests.conftest import MICRO, ROOT

runner = CliRunner()


def lmcore(*args: str, input: str | None = None):
    result = runner.invoke(app, list(args), input=input)
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return result


def copy_root(src: Path, dst: Path) -> Path:
    """A copy of the project root `src` at `dst` whose MLflow store points at the copy: the experiments' and runs'
    artifact locations and the model versions' sources (a stage run in the copy refreshes model cards, artifacts of
    the runs that registered them, and MLflow 3's logged models: the original's stay as they were)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lmcore"))
    with sqlite3.connect(dst / "mlflow.db") as db:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location"), ("model_versions", "source"),
                              ("model_versions", "storage_location")):
            db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(src), str(dst)))
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._artifact_repos_cache.clear()  # MLflow keeps each run id's artifact place: the copy has the same ids
    return dst


@pytest.fixture(scope="module")
def project(lifecycle_run, tmp_path_factory) -> Path:
    """The lifecycle's project as a user's checkout after `make pipeline`: its folders, its store, params.yaml (the
    micro profile). A copy: the session's run stays as it was."""
    dst = copy_root(lifecycle_run[0], tmp_path_factory.mktemp("docs-commands") / "project")
    shutil.copyfile(MICRO, dst / "params.yaml")
    return dst


@pytest.fixture
def in_project(project, monkeypatch) -> Path:
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store, as in a checkout
    return project


def test_generate_and_chat_as_documented(in_project, one_thread):
    """README and docs/models.md: generate from an instruction model (its template: the response alone) and from
    the base model with the documented sampling options; chat with the registered DPO model."""
    prompt = "Name three primary colors."
    response = lmcore("generate", prompt, "--model", "models/instruct", "--max-new-tokens", "6").stdout
    assert prompt not in response and response.endswith("\n")  # the response, not a continuation of the prompt
    assert lmcore("generate", prompt, "--model", "models/instruct", "--max-new-tokens", "6", "--no-stream").stdout == response

    nucleus = lmcore("generate", "ROMEO:", "--model", "models/base", "--top-p", "0.9", "--max-new-tokens", "6").stdout
    assert nucleus.startswith("ROMEO:") and len(nucleus) > len("ROMEO:\n")
    options = ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", "--stop", "\n\n", "--max-new-tokens", "24"]
    text = lmcore("generate", "Every effort moves you", "--model", "models/base", *options).stdout
    assert text.startswith("Every effort moves you") and "\n\n" not in text.removesuffix("\n")

    for extra in ([], ["--top-p", "0.9", "--temperature", "0.7"]):
        chat = lmcore("chat", "--model", "models:/lmcore-instruct@dpo", "--max-new-tokens", "4", *extra,
                      input="Name three primary colors.\nSay hi.\n\n")
        assert chat.stdout.startswith("> ") and chat.stdout.count("> ") == 3  # two answers, then the empty line ends it
        assert "alpaca template" in chat.stderr


def test_eval_as_documented(in_project, one_thread):
    """README, docs/evaluation.md: every task of a model folder, and the registered champion on MMLU 5-shot, with one
    item per task and subject (the collected data/benchmarks of the project)."""
    tasks = "hellaswag,mmlu,truthfulqa_mc1,truthfulqa_mc2,arc_easy,arc_challenge"
    out = lmcore("benchmark", "--model", "models/base", "--tasks", tasks, "--limit", "1", "--output", "reports/eval").stdout
    results = json.loads((in_project / "reports" / "eval" / "results.json").read_text())
    assert set(results["groups"]) >= {"mmlu"} and {"hellaswag", "truthfulqa_mc2", "arc_challenge"} <= set(results["tasks"])
    assert "| hellaswag |" in out and "written to reports/eval" in out

    out = lmcore("benchmark", "--model", "models:/lmcore-base@champion", "--tasks", "mmlu", "--num-fewshot", "5", "--limit", "1",
                 "--output", "reports/eval-mmlu5").stdout
    results = json.loads((in_project / "reports" / "eval-mmlu5" / "results.json").read_text())
    assert results["tasks"]["mmlu_anatomy"]["num_fewshot"] == 5 and results["groups"]["mmlu"]["n"] == 57
    assert "57 items in" in out and "written to reports/eval-mmlu5" in out


def test_lineage_of_another_root(project, tmp_path, monkeypatch):
    """docs/operations.md: `lmcore lineage models:/lmcore-classifier/1 --root <root>` reads that root's store from
    another folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = lmcore("lineage", "models:/lmcore-classifier/1", "--root", str(project)).stdout
    for expected in ("lmcore-classifier v1", "finetune_classifier", "pretrain", "collect", "the-verdict"):
        assert expected in out, expected
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def workspace(project, tmp_path, monkeypatch, prefect_harness) -> Path:
    """A copy of the project for commands that write: its store's registry, runs and artifacts as they were."""
    work = copy_root(project, tmp_path / "project")
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work


def run_stage(*args: str) -> dict:
    out = lmcore("run", *args).stdout
    return json.loads(out[out.index("{"):])


def test_stages_run_with_the_documented_overrides(workspace, lifecycle_run, one_thread):
    """The README's `lmcore run <stage> --set ...`: a LoRA classifier, in a copy of the project whose new runs keep
    their artifacts in the copy."""
    layout = Layout(workspace)
    lora = run_stage("finetune_classifier", "--set", "finetune_classifier.lora.enabled=true")
    adapter = json.loads((layout.model("classifier") / "adapter_config.json").read_text())
    assert adapter["rank"] == 8 and adapter["wrapped_modules"] and 0 <= lora["test_accuracy"] <= 1
    assert list((workspace / "mlruns").glob(f"*/{lora['run_id']}/artifacts"))  # here, not beside the session's run's
    assert not list(lifecycle_run[0].glob(f"mlruns/*/{lora['run_id']}"))


@pytest.mark.slow
def test_data_and_pretrain_stages_as_documented(workspace, one_thread, monkeypatch):
    """docs/data.md's train_tokenizer and tokenize overrides; docs/models.md's checkpointed pretrain run, killed and
    resumed (`lmcore run pretrain --set pretrain.checkpoint_interval=N`, then `... --set pretrain.resume=true`); the
    README's `python -m flows.stage pretrain`."""
    layout = Layout(workspace)
    tok = run_stage("train_tokenizer", "--set", "train_tokenizer.vocab_size=8192", "--set", "pretrain.model.vocab_size=8192")
    assert tok["tokenizer"] == "bpe-8192" and 256 < tok["n_vocab"] <= 8192  # as many merges as a short story holds

    shards = run_stage("tokenize", "--set", "tokenize.workers=2")
    assert shards["train_tokens"] > 0 and len(json.loads((layout.tokens / "manifest.json").read_text())["shards"]) >= 2

    # killed after its checkpoint at step 8 (the newest, at 12, gone), the same command with resume=true ends as before
    first = run_stage("pretrain", "--set", "pretrain.checkpoint_interval=4")
    weights = (layout.pretrained / "model.safetensors").read_bytes()
    checkpoints = sorted((workspace / "models" / "checkpoints" / "pretrain").iterdir())
    assert [p.name for p in checkpoints][-1].endswith("12") and first["steps"] == 12
    shutil.rmtree(checkpoints[-1])
    resumed = run_stage("pretrain", "--set", "pretrain.checkpoint_interval=4", "--set", "pretrain.resume=true")
    assert resumed["resumed_from_step"] == 8 and (layout.pretrained / "model.safetensors").read_bytes() == weights

    shutil.rmtree(layout.pretrained)
    monkeypatch.setattr(sys, "argv", ["flows/stage.py", "pretrain"])  # python -m flows.stage pretrain
    runpy.run_module("flows.stage", run_name="__main__")
    summary = json.loads((layout.pretrain_reports / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["resumed_from_step"] is None and (layout.pretrained / "model.safetensors").is_file()


@pytest.mark.slow
def test_screenshot_ui_as_documented(lifecycle_run, tmp_path):
    """docs/operations.md's picture of the MLflow UI from the lifecycle's store (only read, through --db; --out a
    temporary file): a version's card of another model at another height. Without --version the script shows the
    champion's card, else the newest version's. Skipped without Chromium (failed in CI)."""
    from tests.test_mlflow_ui import find_chromium

    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium found")
        pytest.skip("no chromium found (apt-get install chromium, or set LMCORE_CHROMIUM)")
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import screenshot_ui
    finally:
        sys.path.remove(str(ROOT / "docs"))
    root, _, result = lifecycle_run
    db = root / "mlflow.db"
    gated = result["instruct_eval"]["promotions"]  # the instruct family's champion: SFT, unless DPO beat it
    instruct = gated["dpo"]["version"] if gated["dpo"]["alias"] == "champion" else gated["sft"]["version"]
    assert (screenshot_ui.champion(db, "lmcore-base"), screenshot_ui.champion(db, "lmcore-instruct")) == ("1", instruct)
    out = tmp_path / "instruct.png"
    screenshot_ui.main(["--db", str(db), "--model", "lmcore-instruct", "--version", "1", "--height", "1600", "--out", str(out)])
    png = out.read_bytes()
    assert png.startswith(b"\x89PNG") and int.from_bytes(png[20:24], "big") == 1600  # the PNG's height


def test_default_profile_benchmark_reads_the_runs(in_project, capsys):
    """`python -m benchmarks.default_profile --root .`: each stage's wall time and share of the lifecycle run,
    from the parent run's stage_time_s.<stage> metrics (the clone-and-run mode times `lmcore pipeline` the same way)."""
    from benchmarks import default_profile
    from lmcore.pipeline import NAMES

    default_profile.main(["--root", "."])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    stages = [r for r in rows if r[0].strip() in NAMES]
    assert [r[0].strip() for r in stages][: len(NAMES)] == list(NAMES)  # every stage, in the flow's order
    shares = [float(r[3].strip().rstrip("%")) for r in stages[: len(NAMES)]]
    assert sum(shares) == pytest.approx(100, abs=1) and all(float(r[2]) >= 0 for r in stages)
    assert "| **all** |" in out and "## run 1: MLflow run " in out
