"""Instruction fine-tuning and DPO on the real ch. 7 data with a micro model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmcore.checkpoint import load_model, read_model_config
from lmcore.config import INSTRUCTION_DATA, PREFERENCE_DATA, DpoConfig, InstructConfig, LoraConfig
from lmcore.finetune.data import DataError, format_prompt
from lmcore.finetune.dpo import PREFERENCE_FIELDS, dpo_loss, sequence_logprobs, train_dpo
from lmcore.finetune.instruct import finetune_instruct, prepare_instructions, template_of
from lmcore.paths import ADAPTER, METRICS, TEST_RESPONSES, TRAIN_LOSS, VAL_LOSS
from lmcore.tracking import ListTracker
from tests.finetune.conftest import collect_source

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = dict(max_length=64, batch_size=8, max_steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_interval=10,
             eval_batches=2, device="cpu", max_new_tokens=8, max_test_generations=3)


@pytest.fixture(scope="module")
def instruct_splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct")
    stats = prepare_instructions(InstructConfig(**MICRO), collect_source(INSTRUCTION_DATA, out), out / "splits", seed=3)
    return out / "splits", stats


@pytest.fixture(scope="module")
def instruct_model(instruct_splits, base_model_dir, enc, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct-model")
    tracker = ListTracker()
    summary = finetune_instruct(InstructConfig(**MICRO), base_model_dir, instruct_splits[0], out / "model", out / "reports",
                                seed=0, enc=enc, tracker=tracker)
    return out, summary, tracker


def test_prepare_splits_85_5_10(instruct_splits):
    _, stats = instruct_splits
    assert stats["records"] == 1100 and stats["read"]["bad"] == 0
    assert stats["splits"] == {"train": 935, "val": 55, "test": 110}


def test_instruction_tuning_lowers_val_loss_and_saves_responses(instruct_model):
    out, summary, tracker = instruct_model
    assert summary["final_val_loss"] < summary["first_val_loss"] - 1.0, summary
    assert math.isfinite(summary["test_loss"])
    assert template_of(out / "model") == "alpaca"
    rows = [json.loads(line) for line in (out / "reports" / TEST_RESPONSES).read_text().splitlines()]
    assert len(rows) == 3 and all({"instruction", "input", "output", "response"} <= r.keys() for r in rows)
    metrics = json.loads((out / "reports" / METRICS).read_text())
    assert metrics["final_val_loss"] == pytest.approx(summary["final_val_loss"])
    steps = [int(line.split(",")[0]) for line in (out / "reports" / TRAIN_LOSS).read_text().splitlines()[1:]]
    assert steps == list(range(1, 31))
    val_steps = [int(line.split(",")[0]) for line in (out / "reports" / VAL_LOSS).read_text().splitlines()[1:]]
    assert val_steps == [0, 10, 20, 30]
    # bits per byte of the response tokens: a GPT-2 token holds several bytes, so fewer bits per byte than per token
    assert (out / "reports" / VAL_LOSS).read_text().splitlines()[0] == "step,val_loss,val_bpb"
    assert summary["final_val_bpb"] == metrics["final_val_bpb"]
    assert 0 < metrics["final_val_bpb"] < 0.5 * metrics["final_val_loss"] / math.log(2)
    assert [s for s, m in tracker.records if "val_bpb" in m] == val_steps
    assert [s for s, m in tracker.records if "train_loss" in m] == list(range(1, 31))


def test_mask_prompt_changes_what_is_learned(instruct_splits, base_model_dir, enc, tmp_path):
    cfg = InstructConfig(**{**MICRO, "max_steps": 2, "eval_interval": 2, "max_test_generations": 0}, mask_prompt=True)
    summary = finetune_instruct(cfg, base_model_dir, instruct_splits[0], tmp_path / "m", tmp_path / "r", seed=0, enc=enc)
    assert summary["mask_prompt"] and summary["test_responses"] == 0


def test_lora_instruct_and_phi3_template(instruct_splits, base_model_dir, enc, tmp_path):
    cfg = InstructConfig(**{**MICRO, "max_steps": 3, "eval_interval": 3, "max_test_generations": 1}, template="phi3",
                         lora=LoraConfig(enabled=True, rank=2, alpha=4))
    summary = finetune_instruct(cfg, base_model_dir, instruct_splits[0], tmp_path / "m", tmp_path / "r", seed=0, enc=enc)
    assert summary["lora"] and summary["trainable_params"] == 2 * 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert (tmp_path / "m" / ADAPTER).is_file() and template_of(tmp_path / "m") == "phi3"
    assert read_model_config(tmp_path / "m")[1]["tokenizer"] == "gpt2"
    load_model(tmp_path / "m")  # merged: loads as a plain GPT


def test_malformed_instruction_json_names_the_record(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    records = [{"instruction": "Say hi", "input": "", "output": "hi"}] * 30 + [{"instruction": "Say bye", "input": ""}]
    (raw / "d.json").write_text(json.dumps(records, indent=1))
    (raw / "manifest.json").write_text(json.dumps({"sources": [{"name": "d", "file": "d.json"}]}))
    with pytest.raises(DataError, match=r"d\.json.*record 30.*output"):
        prepare_instructions(InstructConfig(), raw, tmp_path / "splits", seed=0)
    stats = prepare_instructions(InstructConfig(on_bad="skip", max_bad_fraction=0.1), raw, tmp_path / "splits", seed=0)
    assert stats["records"] == 30 and stats["read"]["bad"] == 1


def test_dpo_loss_matches_the_formula():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -3.0]))
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    logits = 0.5 * ((pc - rc) - (pr - rr))
    assert loss.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(logits).mean()))
    assert m["chosen_reward"] == pytest.approx(0.5 * float((pc - rc).mean()))
    assert m["reward_margin"] == pytest.approx(m["chosen_reward"] - m["rejected_reward"])
    assert m["reward_accuracy"] == pytest.approx(0.5)


def test_sequence_logprobs_sums_response_tokens_only(base_model_dir):
    model = load_model(base_model_dir)
    inputs = torch.tensor([[5, 6, 7, 8]])
    targets = torch.tensor([[-100, -100, 8, 9]])
    logp = torch.log_softmax(model(inputs)[0].float(), -1)
    expected = logp[0, 2, 8] + logp[0, 3, 9]
    assert sequence_logprobs(model, inputs, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dpo_raises_the_reward_margin(instruct_model, enc, tmp_path):
    out, _, _ = instruct_model
    cfg = DpoConfig(**{**MICRO, "lr": 1e-3, "max_steps": 12, "eval_interval": 6, "max_test_generations": 1}, beta=0.5)
    stats = prepare_instructions(cfg, collect_source(PREFERENCE_DATA, tmp_path), tmp_path / "splits", seed=3, fields=PREFERENCE_FIELDS)
    assert stats["records"] == 1100
    tracker = ListTracker()
    summary = train_dpo(cfg, out / "model", tmp_path / "splits", tmp_path / "m", tmp_path / "r", seed=0, enc=enc, tracker=tracker)
    # the policy starts as the reference: loss log 2, margin 0
    assert summary["first_val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert summary["first_val_reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert summary["final_val_reward_margin"] > 0.05
    assert summary["final_val_loss"] < math.log(2)
    logged = {k for _, m in tracker.records for k in m}
    assert {"train_loss", "train_chosen_reward", "train_rejected_reward", "train_reward_margin", "val_reward_margin"} <= logged
    assert template_of(tmp_path / "m") == "alpaca"


def test_prompt_template_is_the_books(instruct_splits):
    entry = {"instruction": "Rewrite the sentence.", "input": "He go home."}
    assert format_prompt(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nHe go home.\n\n### Response:\n"
    )
