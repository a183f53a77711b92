"""A task whose prompts are mostly cut to fit the model's context is reported as n/a, not as a score: the rule
(lmcore.harness.run.coverage), what run_benchmarks writes and logs, and the benchmark stage's summary and promotion."""

from __future__ import annotations

import json

import pytest
import torch

from lmcore.checkpoint import save_model
from lmcore.config import ModelConfig, load_params
from lmcore.harness.run import MAX_CUT_FRACTION, RAW_SCORES, coverage, reported_scores, run_benchmarks, score_of, table_rows
from lmcore.model import GPT
from lmcore.stages import StageContext
from lmcore.stages.benchmark import run as run_stage
from lmcore.tracking import ListTracker
from tests.conftest import ROOT, SHARED

SCORES = {"acc": 0.3, "acc_stderr": 0.1, "acc_norm": 0.4, "acc_norm_stderr": 0.12}


def _lm(context_length: int) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50257, context_length=context_length, n_embd=16, n_layer=1, n_head=2)).eval()


def _records(out, task):
    return [r for r in map(json.loads, (out / "samples" / f"{task}.jsonl").read_text().splitlines())]


def test_more_than_half_cut_or_left_out_is_not_meaningful():
    assert MAX_CUT_FRACTION == 0.5
    half = coverage({"n": 10, **SCORES, "truncated": 5, "too_long": 0, "chance": 0.25}, 128)
    assert half == {"n": 10, **SCORES, "truncated": 5, "too_long": 0, "chance": 0.25, "cut_fraction": 0.5, "meaningful": True, "note": None}
    more = coverage({"n": 10, **SCORES, "truncated": 5, "too_long": 1, "chance": 0.25}, 128)  # 6 of the 11 sampled
    assert not more["meaningful"] and more["cut_fraction"] == 6 / 11
    assert more["note"] == "n/a: 55% of 11 items cut or left out to fit the 128-token context"
    assert more[RAW_SCORES] == SCORES and not set(SCORES) & set(more)  # the numbers, under a name no one reads as a score
    cut = coverage({"n": 4, "acc": 0.5, "acc_stderr": 0.2, "truncated": 3, "too_long": 0, "chance": 0.25}, 16)
    assert cut["note"] == "n/a: 75% of 4 items cut to fit the 16-token context" and cut[RAW_SCORES] == {"acc": 0.5, "acc_stderr": 0.2}
    assert coverage({"n": 4, **SCORES, "truncated": 3, "too_long": 0, "chance": 0.25}, 16, max_cut_fraction=0.8)["meaningful"]


def test_a_task_cut_to_fit_a_short_context_is_reported_as_na(enc, bench_dir, tmp_path, one_thread):
    out, tracker = tmp_path / "out", ListTracker()
    results = run_benchmarks(_lm(16), enc, bench_dir, out, tasks=["arc_easy", "mmlu_anatomy", "mmlu_marketing"], limit=8,
                             sample_seed=5, progress=False, tracker=tracker)
    arc = results["tasks"]["arc_easy"]
    assert not arc["meaningful"] and arc["cut_fraction"] > MAX_CUT_FRACTION and "acc_norm" not in arc
    assert arc["cut_fraction"] == (arc["truncated"] + arc["too_long"]) / 8
    assert arc["note"].startswith(f"n/a: {arc['cut_fraction']:.0%} of 8 items cut") and arc["note"].endswith("the 16-token context")
    records = _records(out, "arc_easy")
    assert arc[RAW_SCORES]["acc_norm"] == sum(r["acc_norm"] for r in records) / len(records)  # nothing is lost
    # a group is judged on its subjects' items together; its raw score is still their size-weighted mean
    mmlu = results["groups"]["mmlu"]
    assert not mmlu["meaningful"] and mmlu["truncated"] == 16 and mmlu["note"] == "n/a: 100% of 16 items cut to fit the 16-token context"
    assert mmlu[RAW_SCORES]["acc"] == sum(r["acc"] for r in _records(out, "mmlu")) / 16
    assert score_of(results, "arc_easy.acc_norm") == {"value": None, "stderr": None, "meaningful": False, "note": arc["note"]}

    table = (out / "table.md").read_text()
    assert f"| arc_easy | acc_norm | {arc['note']} |  | {arc['n']} | 0.2500 |" in table
    assert f"| mmlu | acc | {mmlu['note']} |  | 16 |" in table
    assert all(r["value"] is None and r["note"] for r in table_rows(reported_scores(results)))
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # no bars: the notes, greyed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arc_easy"]["meaningful"] is False and RAW_SCORES not in metrics["arc_easy"] and "acc" not in metrics["mmlu"]
    (_, logged), = tracker.records
    assert not {"arc_easy.acc", "arc_easy.acc_norm", "arc_easy.acc_norm_stderr", "mmlu.acc", "mmlu_anatomy.acc"} & set(logged)
    assert logged["arc_easy.cut_fraction"] == arc["cut_fraction"] and logged["mmlu.cut_fraction"] == 1.0


def test_with_a_context_long_enough_the_task_is_scored_as_before(micro_lm, enc, bench_dir, tmp_path, one_thread):
    out, tracker = tmp_path / "out", ListTracker()
    results = run_benchmarks(micro_lm, enc, bench_dir, out, tasks=["arc_easy", "truthfulqa_mc1"], limit=8, sample_seed=5,
                             progress=False, tracker=tracker)
    arc = results["tasks"]["arc_easy"]
    assert arc["meaningful"] and arc["cut_fraction"] == 0 and arc["note"] is None and RAW_SCORES not in arc
    assert set(arc) == {"n", *SCORES, "num_fewshot", "truncated", "too_long", "chance", "cut_fraction", "meaningful", "note"}
    records = _records(out, "arc_easy")
    assert arc["acc_norm"] == sum(r["acc_norm"] for r in records) / 8
    table = (out / "table.md").read_text()
    assert f"| arc_easy | acc_norm | {arc['acc_norm']:.4f} | {arc['acc_norm_stderr']:.4f} | 8 | 0.2500 |" in table
    (_, logged), = tracker.records
    assert logged["arc_easy.acc_norm"] == arc["acc_norm"] and logged["arc_easy.cut_fraction"] == 0.0
    # the same model: TruthfulQA's six-QA primer never fits 128 tokens
    tqa = results["tasks"]["truthfulqa_mc1"]
    assert tqa["note"] == "n/a: 100% of 8 items cut to fit the 128-token context" and "truthfulqa_mc1.acc" not in logged
    assert f"| truthfulqa_mc1 | acc | {tqa['note']} |" in table


@pytest.mark.parametrize("context_length", [16, 128])
def test_the_stage_promotes_on_a_meaningful_primary_metric_only(context_length, enc, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("LMCORE_MIRROR", str(SHARED / "data"))
    model_dir = tmp_path / "models" / "base"
    save_model(_lm(context_length), model_dir, extra={"tokenizer": "gpt2"})
    enc.save(model_dir)
    params = load_params(ROOT / "params.yaml", ["benchmark.tasks=[arc_easy]", "benchmark.primary_metric=arc_easy.acc_norm", "benchmark.limit=6"])
    result = run_stage(StageContext(root=tmp_path, params=params))
    results = json.loads((tmp_path / "reports" / "benchmark" / "results.json").read_text())
    arc = results["tasks"]["arc_easy"]
    summary = result.summary
    if context_length == 16:
        assert summary["primary_value"] is None and summary["primary_stderr"] is None and summary["primary_note"] == arc["note"]
        assert result.scores.note == arc["note"] and "arc_easy.acc_norm" not in result.scores.values  # nothing to compare
        assert result.warnings == [f"arc_easy.acc_norm is not meaningful for models/base ({arc['note']}): not compared with the champion"]
        assert result.log == f"arc_easy.acc_norm {arc['note']} on {results['n_items']} items"
        assert result.tables[0].rows[1]["value"] is None and result.tables[0].rows[1]["note"] == arc["note"]
    else:
        assert summary["primary_value"] == arc["acc_norm"] and summary["primary_note"] is None and not result.warnings
        assert result.scores.metric == "arc_easy.acc_norm" and result.scores.values["arc_easy.acc_norm"] == arc["acc_norm"]
        assert result.scores.note is None
