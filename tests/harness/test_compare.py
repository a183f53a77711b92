"""compare: two real benchmark out folders (two micro GPTs, the same items) compared score by score and item by item;
numbers checked against each side's results.json and samples, verdicts against lmcore.promotion.decide."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil

import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.harness.compare import (
    BETTER,
    COMPARISON,
    DISAGREEMENTS,
    NA,
    PLOT,
    ROW_FIELDS,
    SCORES_CSV,
    WITHIN,
    WORSE,
    compare_scores,
    disagreements,
    item_counts,
    markdown,
    plot_comparison,
    write_comparison,
)
from lmcore.harness.run import reported_scores, run_benchmarks, score_of, table_rows
from lmcore.model import GPT
from lmcore.promotion import CHAMPION, Champion, Score, decide

TASKS = ["hellaswag", "arc_easy", "truthfulqa_mc1", "truthfulqa_mc2", "mmlu_anatomy", "mmlu_marketing"]
HEADLINE = {"hellaswag": "acc_norm", "arc_easy": "acc_norm", "truthfulqa_mc1": "acc", "mmlu_anatomy": "acc",
            "mmlu_marketing": "acc"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(micro_lm, enc, bench_dir, tmp_path_factory):
    """(challenger out folder, champion out folder): the champion is the 128-token micro GPT (TruthfulQA's primer
    does not fit it: n/a), the challenger another random GPT with 256 tokens (TruthfulQA scored)."""
    torch.manual_seed(1)
    challenger = GPT(ModelConfig(vocab_size=50257, context_length=256, n_embd=32, n_layer=2, n_head=2)).eval()
    root, threads = tmp_path_factory.mktemp("compare"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, model in (("challenger", challenger), ("champion", micro_lm)):
            run_benchmarks(model, enc, bench_dir, root / name, tasks=TASKS, limit=8, sample_seed=3, batch_size=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "challenger", root / "champion"


def _results(out):
    return json.loads((out / "results.json").read_text())


def _records(out):
    files = sorted((out / "samples").glob("*.jsonl"))
    return {(r["task"], r["doc_id"]): r for f in files for r in map(json.loads, f.read_text().splitlines())}


def test_rows_are_both_results_and_their_difference(runs):
    a, b = map(_results, runs)
    assert a["sample_sha256"] == b["sample_sha256"]
    rows = compare_scores(a, b)
    assert [(r["task"], r["metric"]) for r in rows] == [(r["task"], r["metric"]) for r in table_rows(reported_scores(a))]
    assert all(tuple(r) == ROW_FIELDS for r in rows)
    for r in rows:
        ours, theirs = (score_of(res, f"{r['task']}.{r['metric']}") for res in (a, b))
        assert (r["challenger"], r["challenger_stderr"], r["challenger_note"]) == (ours["value"], ours["stderr"], ours["note"])
        assert (r["champion"], r["champion_stderr"], r["champion_note"]) == (theirs["value"], theirs["stderr"], theirs["note"])
        assert r["n"] == {**a["tasks"], **a["groups"]}[r["task"]]["n"]
        if r["challenger"] is None or r["champion"] is None:
            assert r["diff"] is None and r["diff_stderr"] is None and r["verdict"] == NA
            continue
        assert r["diff"] == r["challenger"] - r["champion"]
        assert math.isclose(r["diff_stderr"], math.sqrt(r["challenger_stderr"] ** 2 + r["champion_stderr"] ** 2))
        assert r["verdict"] in (BETTER, WORSE, WITHIN)
    # TruthfulQA fits the challenger's context only: scored on one side, the note on the other, no verdict
    mc2 = next(r for r in rows if r["task"] == "truthfulqa_mc2")
    assert mc2["challenger"] is not None and mc2["champion"] is None and mc2["champion_note"].startswith("n/a: ")
    assert {r["task"] for r in rows if r["verdict"] != NA} >= {"hellaswag", "arc_easy", "mmlu"}


def test_the_verdict_is_the_promotion_rule(runs):
    a, b = map(_results, runs)
    # the champion's numbers moved so that every verdict occurs: arc much worse, hellaswag much better than the challenger
    moved = copy.deepcopy(b)
    moved["tasks"]["arc_easy"]["acc_norm"] = a["tasks"]["arc_easy"]["acc_norm"] + 0.6
    moved["tasks"]["hellaswag"]["acc_norm"] = a["tasks"]["hellaswag"]["acc_norm"] - 0.6
    rows = compare_scores(a, b) + compare_scores(a, moved)
    assert {BETTER, WORSE, WITHIN} <= {r["verdict"] for r in rows}
    sha = a["sample_sha256"]
    for r in rows:
        if r["verdict"] == NA:
            continue
        metric = f"{r['task']}.{r['metric']}"
        new, old = Score(r["challenger"], r["challenger_stderr"], sha), Score(r["champion"], r["champion_stderr"], sha)
        promoted = decide(metric, "3", new, Champion("2", old))
        assert (promoted["alias"] == CHAMPION) == (r["verdict"] == BETTER), r
        assert promoted["difference"] == r["diff"] and promoted["combined_stderr"] == r["diff_stderr"]
        assert (decide(metric, "2", old, Champion("3", new))["alias"] == CHAMPION) == (r["verdict"] == WORSE), r


def test_disagreements_are_the_items_right_on_one_side_only(runs):
    ours, theirs = map(_records, runs)
    assert ours.keys() == theirs.keys() and len(ours) == 48
    expected = {k for k, r in ours.items() if r["task"] != "truthfulqa_mc2" and
                r[HEADLINE[r["task"]]] != theirs[k][HEADLINE[r["task"]]]}
    rows = disagreements(runs[0] / "samples", runs[1] / "samples")
    assert {(r["task"], r["doc_id"]) for r in rows} == expected and len(rows) == len(expected)
    assert 0 < len(expected) < 40  # random models: some items differ, not all
    for r in rows:
        a, b = ours[r["task"], r["doc_id"]], theirs[r["task"], r["doc_id"]]
        pick = "pick_norm" if HEADLINE[r["task"]] == "acc_norm" else "pick"
        assert r["metric"] == HEADLINE[r["task"]] and r["prompt"] == a["prompt"] and r["gold"] == a["choices"][a["gold"]]
        assert r["challenger_pick"] == a["choices"][a[pick]] and r["champion_pick"] == b["choices"][b[pick]]
        assert (r["challenger_correct"], r["champion_correct"]) == (a[pick] == a["gold"], b[pick] == b["gold"])
        assert r["challenger_correct"] != r["champion_correct"]
        gold_ll = (a["loglikelihoods"][a["gold"]], b["loglikelihoods"][b["gold"]])
        assert (r["challenger_gold_ll"], r["champion_gold_ll"]) == gold_ll
    n_items, n_disagree = item_counts(runs[0] / "samples", runs[1] / "samples")
    assert n_items == {"hellaswag": 8, "arc_easy": 8, "truthfulqa_mc1": 8, "truthfulqa_mc2": 8, "mmlu": 16}
    assert n_disagree["truthfulqa_mc2"] is None  # a probability per item: counted, never right or wrong
    assert n_disagree["mmlu"] == sum(r["task"].startswith("mmlu_") for r in rows)
    assert sum(v for v in n_disagree.values() if v is not None) == len(rows)


def test_different_items_are_refused(runs, tmp_path):
    a, b = map(_results, runs)
    other = {**b, "sample_sha256": "f" * 64}
    with pytest.raises(ValueError, match=f"{a['sample_sha256']}.*{'f' * 64}"):
        compare_scores(a, other)
    # an item scored by one model only
    shutil.copytree(runs[1] / "samples", tmp_path / "samples")
    arc = tmp_path / "samples" / "arc_easy.jsonl"
    arc.write_text("".join(arc.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(ValueError, match="1 items scored by one model only, e.g. arc_easy/.* \\(challenger\\)"):
        disagreements(runs[0] / "samples", tmp_path / "samples")


def test_write_comparison_writes_the_four_files(runs, tmp_path):
    out, labels = tmp_path / "cmp", ("lmcore-base v3", "v2 @champion")
    summary = write_comparison(*runs, out, labels)
    assert sorted(p.name for p in out.iterdir()) == sorted([COMPARISON, SCORES_CSV, PLOT, DISAGREEMENTS])
    assert summary["rows"] == compare_scores(*map(_results, runs))
    assert summary["disagreements"] == disagreements(runs[0] / "samples", runs[1] / "samples")
    assert (summary["n_items"], summary["n_disagree"]) == item_counts(runs[0] / "samples", runs[1] / "samples")
    assert summary["sample_sha256"] == _results(runs[0])["sample_sha256"]
    assert (out / PLOT).read_bytes()[:8] == PNG
    assert [json.loads(line) for line in (out / DISAGREEMENTS).read_text().splitlines()] == summary["disagreements"]
    with open(out / SCORES_CSV, newline="") as f:
        table = list(csv.DictReader(f))
    assert [tuple(r) for r in table] == [ROW_FIELDS] * len(summary["rows"])
    hs = next(r for r in table if (r["task"], r["metric"]) == ("hellaswag", "acc_norm"))
    assert float(hs["challenger"]) == _results(runs[0])["tasks"]["hellaswag"]["acc_norm"]
    assert next(r for r in table if r["task"] == "truthfulqa_mc2")["champion"] == ""
    md = (out / COMPARISON).read_text()
    assert md == markdown(summary["rows"], labels, summary["n_disagree"], summary["n_items"])
    assert "| task | metric | n | lmcore-base v3 | v2 @champion | diff ± stderr | verdict |" in md
    assert f"- hellaswag (acc_norm): {summary['n_disagree']['hellaswag']} of 8 items" in md
    assert "- truthfulqa_mc2: scored by probability" in md
    # the plot alone, with a row that is n/a on both sides
    rows = summary["rows"] + [{**summary["rows"][0], "challenger": None, "champion": None, "diff": None, "verdict": NA,
                               "challenger_note": "n/a: cut", "champion_note": "n/a: cut"}]
    plot_comparison(rows, tmp_path / "alone.png", labels)
    assert (tmp_path / "alone.png").read_bytes()[:8] == PNG
