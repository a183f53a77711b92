"""Benchmark documents and prompts from the real files: counts, lm-eval's prompt formats, sampling, bad input."""

from __future__ import annotations

import bz2
import json

import pytest

from lmcore.harness.benchmarks import (
    GROUPS,
    MMLU_SUBJECTS,
    TRUTHFULQA_PRIMER,
    BenchmarkDataError,
    check_tasks,
    expand,
    read_arc,
    read_hellaswag,
    read_truthfulqa,
    sample,
    task_items,
)


def test_item_counts_match_the_releases(bench_dir):
    assert len(task_items("hellaswag", bench_dir)) == 10042
    assert len(task_items("arc_easy", bench_dir)) == 2376
    assert len(task_items("arc_challenge", bench_dir)) == 1172
    assert len(task_items("truthfulqa_mc1", bench_dir)) == 817
    assert sum(len(task_items(t, bench_dir)) for t in GROUPS["mmlu"]) == 14042
    assert len(MMLU_SUBJECTS) == 57
    assert {c: len(GROUPS[f"mmlu_{c}"]) for c in ("stem", "other", "social_sciences", "humanities")} == {
        "stem": 19, "other": 13, "social_sciences": 12, "humanities": 13
    }


def test_prompts_are_lm_evals(bench_dir):
    hs = task_items("hellaswag", bench_dir)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. he"
    assert hs.continuations[1] == " is ripping level tiles off." and hs.gold == 3

    arc = task_items("arc_easy", bench_dir)[0]
    assert arc.context == "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert arc.choices[0] == "Sunlight is the source of energy for nearly all ecosystems." and arc.gold == 0

    mc1, mc2 = task_items("truthfulqa_mc1", bench_dir)[0], task_items("truthfulqa_mc2", bench_dir)[0]
    assert mc1.context == TRUTHFULQA_PRIMER + "\n\nQ: What happens if you eat a pomegranate?\nA:"
    assert mc1.gold == 0 and len(mc1.choices) == 4 and mc1.labels is None
    assert mc2.labels == (1, 1, 1, 0, 0, 0) and len(mc2.choices) == 6

    zero = task_items("mmlu_anatomy", bench_dir)[0]
    question = (
        "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
        "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
        "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
        "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:"
    )
    description = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert zero.context == description + question and zero.gold == 0
    assert zero.choices == ("A", "B", "C", "D") and zero.continuations == [" A", " B", " C", " D"]
    one = task_items("mmlu_anatomy", bench_dir, num_fewshot=1)[0]
    example = (
        "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
        "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
        "D. The second and third pharyngeal arches\nAnswer: D\n\n"
    )
    assert one.context == description + example + question
    five = task_items("mmlu_anatomy", bench_dir, num_fewshot=5)[0]
    assert five.context.count("\nAnswer:") == 6 and five.context.startswith(description + example)
    with pytest.raises(ValueError, match="num_fewshot 6 exceeds the 5 dev examples"):
        task_items("mmlu_anatomy", bench_dir, num_fewshot=6)
    assert task_items("mmlu_high_school_us_history", bench_dir)[0].context.split("\n")[0].endswith("about high school us history.")


def test_sampling_is_deterministic_and_per_task(bench_dir):
    items = task_items("arc_challenge", bench_dir)
    a, b = sample(items, 50, 1234), sample(items, 50, 1234)
    assert [i.doc_id for i in a] == [i.doc_id for i in b] == sorted(i.doc_id for i in a)
    assert [i.doc_id for i in sample(items, 50, 1235)] != [i.doc_id for i in a]
    assert sample(items, None, 1) == items and sample(items, 10**6, 1) == items
    # what else is evaluated does not change a task's sample
    easy = task_items("arc_easy", bench_dir)
    assert [i.doc_id for i in sample(easy, 50, 1234)] != [i.doc_id for i in a]


def test_task_names_and_sources_are_checked():
    assert expand(["hellaswag", "mmlu_anatomy", "mmlu"])[:2] == ["hellaswag", "mmlu_anatomy"]
    assert len(expand(["mmlu", "mmlu_stem"])) == 57
    with pytest.raises(ValueError, match="unknown benchmark task 'hellaswg' \\(did you mean 'hellaswag'\\?\\)"):
        expand(["hellaswg"])
    all_sources = {"hellaswag", "arc-easy", "arc-challenge", "truthfulqa-mc", "mmlu"}
    metrics = check_tasks(["hellaswag", "mmlu"], 0, all_sources)
    assert {"hellaswag.acc_norm", "mmlu.acc", "mmlu_stem.acc", "mmlu_anatomy.acc"} <= metrics
    with pytest.raises(ValueError, match=r"need benchmark sources \['mmlu'\]"):
        check_tasks(["mmlu_anatomy"], 0, all_sources - {"mmlu"})
    with pytest.raises(ValueError, match="num_fewshot 5"):
        check_tasks(["arc_easy"], 5, all_sources)


def test_params_validate_the_benchmark_section():
    from lmcore.config import ParamsError, load_params
    from tests.conftest import ROOT

    with pytest.raises(ParamsError, match="unknown benchmark task 'arc_eazy'"):
        load_params(ROOT / "params.yaml", overrides=["benchmark.tasks=[arc_eazy]"])
    with pytest.raises(ParamsError, match="primary_metric 'arc_easy.acc_nrom' .*did you mean 'arc_easy.acc_norm'"):
        load_params(ROOT / "params.yaml", overrides=["benchmark.tasks=[arc_easy]", "benchmark.primary_metric=arc_easy.acc_nrom"])
    with pytest.raises(ParamsError, match="judge.url and judge.serve are both set"):
        load_params(ROOT / "params.yaml", overrides=["judge.url=http://127.0.0.1:1/v1"])
    with pytest.raises(ParamsError, match="judge.url is set but judge.model is not"):
        load_params(ROOT / "params.yaml", overrides=["judge.serve=null", "judge.model=null", "judge.url=http://127.0.0.1:1/v1"])


def test_bad_files_name_the_file_and_line(tmp_path):
    hs = tmp_path / "hs.txt"
    hs.write_text("ctx\n3\na\nb\nc\nd\nctx2\nx\na\nb\nc\nd\n")
    with pytest.raises(BenchmarkDataError, match=r"hs.txt:8: gold label 'x'"):
        read_hellaswag(hs)
    hs.write_bytes(bz2.compress(b"ctx\n3\na\nb\nc\n"))
    with pytest.raises(BenchmarkDataError, match="5 lines is not a multiple of 6"):
        read_hellaswag(hs)
    hs.write_bytes(b"")
    with pytest.raises(BenchmarkDataError, match="empty file"):
        read_hellaswag(hs)

    arc = tmp_path / "arc.jsonl"
    good = {"id": "x", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "B"}
    arc.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(BenchmarkDataError, match=r"arc.jsonl:2: malformed JSON"):
        read_arc(arc)
    arc.write_text(json.dumps({**good, "answerKey": "C"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"arc.jsonl:1: answerKey 'C' is not one of the labels \['A', 'B'\]"):
        read_arc(arc)
    assert read_arc(_write(arc, good))[0]["gold"] == 1
    arc.write_bytes(b"\xff\xfe{}")
    with pytest.raises(BenchmarkDataError, match="invalid UTF-8 at byte offset 0"):
        read_arc(arc)

    tqa = tmp_path / "mc.json"
    tqa.write_text(json.dumps([{"question": "q", "mc1_targets": {"wrong": 0, "right": 1}, "mc2_targets": {"right": 1}}]))
    with pytest.raises(BenchmarkDataError, match="record 0: mc1_targets must list the one true answer first"):
        read_truthfulqa(tqa)


def _write(path, record):
    path.write_text(json.dumps(record) + "\n")
    return path
