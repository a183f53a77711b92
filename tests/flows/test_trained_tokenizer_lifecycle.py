"""The lifecycle flow on the micro profile with a tokenizer trained on its corpus (tokenize.tokenizer: trained):
every stage after it works with it, and every model carries it. Under a real (temporary) Prefect server and a
real MLflow SQLite store."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from lmcore.hf import export_hf
from lmcore.paths import MANIFEST, METRICS, SAMPLES, TEST_RESPONSES, Layout
from lmcore.pipeline import NAMES as STAGES
from lmcore.tokenizer import load_tokenizer
from tests.conftest import MICRO

pytestmark = pytest.mark.slow  # a second whole lifecycle run (make test-all)

MICRO_BPE = ["tokenize.tokenizer=trained", "train_tokenizer.vocab_size=512", "pretrain.model.vocab_size=512",
             "train_tokenizer.eval_benchmarks_limit=20"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    from flows.lifecycle import lifecycle

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = lifecycle(params_file=str(MICRO), overrides=MICRO_BPE, root=str(root))
    return root, uri, result


def test_every_stage_runs_and_every_model_carries_the_trained_tokenizer(trained_run):
    root, _, result = trained_run
    layout = Layout(root)
    assert [s["stage"] for s in result["plan"]["stages"] if s["run"]] == list(STAGES)
    tok = load_tokenizer(layout.tokenizer)
    assert tok.name == "bpe-512" and tok.fast is not None
    assert json.loads((layout.tokens / MANIFEST).read_text())["tokenizer"]["sha256"] == tok.sha256
    for name in ("base", "classifier", "instruct", "dpo"):
        assert load_tokenizer(layout.model(name)).sha256 == tok.sha256, name
    # generation decodes through it: samples and test responses are text, not ids
    samples = [json.loads(line) for line in (layout.evaluate_reports / SAMPLES).read_text().splitlines()]
    assert samples and all(isinstance(s["completion"], str) and s["completion"] for s in samples)
    responses = [json.loads(line) for line in (layout.reports("instruct") / TEST_RESPONSES).read_text().splitlines()]
    assert responses and all(isinstance(r["response"], str) for r in responses)
    assert 0 <= json.loads((layout.reports("classifier") / METRICS).read_text())["test"]["accuracy"] <= 1
    # the summary compares in bits per byte and shows the tokenizer against GPT-2's
    rows = dict(result["summary"])
    assert rows["tokenizer"].startswith("bpe-512 (512 tokens): ") and "gpt2" in rows["tokenizer"]
    assert result["evaluate"]["val_bpb"] > 0


def test_the_tokenizer_report_is_in_mlflow_and_dvc_metrics(trained_run):
    root, uri, result = trained_run
    client = MlflowClient(uri)
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    run = next(r for r in children if r.data.tags["lmcore.stage"] == "train_tokenizer")
    report = json.loads((Layout(root).reports("tokenizer") / "tok_eval.json").read_text())["bytes_per_token"]
    assert run.data.metrics["bytes_per_token.held-out"] == report["bpe-512"]["held-out"]["bytes_per_token"]
    assert run.data.metrics["gpt2.bytes_per_token.hellaswag"] == report["gpt2"]["hellaswag"]["bytes_per_token"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/tok_eval.json", "reports/tok_eval.md"} <= artifacts
    pretrain = next(r for r in children if r.data.tags["lmcore.stage"] == "pretrain")
    assert "val_bpb" in pretrain.data.metrics


def test_hf_export_of_the_instruct_model_encodes_like_lmcore(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, _ = trained_run
    layout = Layout(root)
    export_hf(layout.model("instruct"), tmp_path / "hf")
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path / "hf"), load_tokenizer(layout.model("instruct"))
    text = "### Instruction:\nRewrite the sentence. Naïve café, 1234!<|endoftext|>"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 512
