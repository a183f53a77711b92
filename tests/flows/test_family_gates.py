"""The promotion gates of the families a run registers, as `lmcore run` runs them (Prefect flows, a real MLflow SQLite
registry): a run that starts from a pretrained chat model makes that model the first champion of the instruction
family, so SFT and DPO are promoted only when they beat what was downloaded; the classifier is decided item by item
on its test split; a second scoring of the same weights on the same items comes from the evaluation cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.stage import stage_flow
from lmcore.checkpoint import save_model
from lmcore.config import ModelConfig
from lmcore.model import GPT
from tests.conftest import MICRO, SHARED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # eight stage flows each (make test-all)

SMOLLM2 = SHARED / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_base(folder: Path) -> Path:
    """A pretrained chat model in miniature: random Llama-style weights with SmolLM2's tokenizer and ChatML template
    (taken from the GGUF file's metadata), as an lmcore model folder for base_model.source: folder."""
    from lmcore.gguf import _build_tokenizer, _Metadata, open_gguf

    out = folder / "chat-base"
    out.mkdir(parents=True)
    tok = _build_tokenizer(_Metadata(open_gguf(SMOLLM2), SMOLLM2), SMOLLM2, out, "SmolLM2", 64)  # written into `out`
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.n_vocab, context_length=64, n_embd=32, n_layer=2, n_head=4, n_kv_head=2,
                            norm="rmsnorm", mlp="swiglu", positions="rope", bias=False))
    save_model(model, out, extra={"tokenizer": tok.name})
    return out


@pytest.fixture
def project(tmp_path, prefect_harness, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LMCORE_EVAL_CACHE", str(tmp_path / "eval-cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path, uri


def run(stage, root, *overrides):
    return stage_flow(stage, params_file=str(MICRO), overrides=list(overrides), root=str(root))


def test_the_pretrained_chat_model_is_the_first_instruct_champion(project):
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is not there")
    root, uri = project
    base = chat_base(root / "downloads")
    overrides = ("base_model.source=folder", f"base_model.path={base}", "base_model.name=chat-base", "tokenize.tokenizer=auto",
                 "pretrain.init=base", "instruct_eval.tasks=[ifeval]", "instruct_eval.limit=6", "instruct_eval.max_gen_toks=8")
    for stage in ("collect", "preprocess", "base_model", "tokenize", "pretrain", "finetune_instruct", "dpo"):
        run(stage, root, *overrides)
    result = run("instruct_eval", root, *overrides)
    client = MlflowClient(uri, registry_uri=uri)
    versions = {v.version: v for v in client.search_model_versions("name = 'lmcore-instruct'")}
    origin = [v for v in versions.values() if v.tags.get("lmcore.origin") == "base_model"]
    assert len(origin) == 1, "the downloaded model is registered into the family once"
    first = origin[0]
    from lmcore.io import sha256_file

    assert first.tags["lmcore.weights_sha256"] == sha256_file(base / "model.safetensors")
    sft, dpo = result["promotions"]["sft"], result["promotions"]["dpo"]
    # SFT was compared with the downloaded model, on the same items, not crowned for being first
    assert sft["champion_version"] == str(first.version) and sft["reason"] != "no champion yet"
    assert float(first.tags["bench.ifeval.prompt_level_loose_acc"]) == pytest.approx(sft["champion_value"])
    assert first.tags["bench.sample_sha256"] == result["sample_sha256"]
    promotion = json.loads(Path(client.download_artifacts(result["run_id"], f"promotion/base_v{first.version}.json", str(root / "p"))).read_text())
    assert promotion["alias"] == "champion" and "the model this run started from (chat-base)" in promotion["reason"]
    first_card = client.get_model_version("lmcore-instruct", str(first.version)).description
    assert "the model this run started from" in first_card and "### Last challenged" in first_card
    assert f"| champion v{first.version} |" in client.get_model_version("lmcore-instruct", sft["version"]).description
    assert dpo["champion_version"] in (str(first.version), sft["version"])
    # its lineage: the base model as downloaded (base.json: the source, the file and its sha256)
    from tasks.lineage import model_lineage

    chain = model_lineage(f"models:/lmcore-instruct/{first.version}", uri)["chain"]
    assert [n["kind"] for n in chain] == ["model_version", "run", "base_model"] and chain[2]["name"] == "chat-base"

    # the same stage again: every model's scores (the base's too) come from the evaluation cache
    cache = root / "eval-cache"
    entries = {p.name for p in cache.iterdir() if p.is_dir()}
    assert len(entries) == 3  # the base, SFT and DPO
    before = {m: (root / "reports" / "instruct_eval" / m / "results.json").read_bytes() for m in ("instruct", "dpo")}
    again = run("instruct_eval", root, *overrides)
    assert {p.name for p in cache.iterdir() if p.is_dir()} == entries  # nothing new was scored
    # the stored results, timings included, byte for byte: nothing was generated again
    assert {m: (root / "reports" / "instruct_eval" / m / "results.json").read_bytes() for m in ("instruct", "dpo")} == before
    assert again["scores"] == result["scores"]


def test_the_classifier_is_decided_item_by_item(project):
    root, uri = project
    for stage in ("collect", "preprocess", "tokenize", "pretrain"):
        run(stage, root)
    first = run("finetune_classifier", root)
    second = run("finetune_classifier", root, "finetune_classifier.lr=0.003")
    assert first["promotion"]["alias"] == "champion"
    decision = second["promotion"]
    assert decision["paired"] is True and decision["reason"].endswith("by more than the paired stderr")
    assert decision["disagreements"]["items"] == 300  # the test split, item by item
    client = MlflowClient(uri, registry_uri=uri)
    disagree = Path(client.download_artifacts(second["run_id"], "comparison/disagreements.jsonl", str(root / "c"))).read_text()
    assert len(disagree.splitlines()) == decision["disagreements"]["n"]
    row = json.loads(disagree.splitlines()[0])
    assert {"prompt", "gold", "challenger_answer", "champion_answer", "challenger_correct", "champion_correct"} <= set(row)
    champion_card = client.get_model_version("lmcore-classifier", "1").description
    assert "### Last challenged" in champion_card and "paired stderr" in champion_card
