"""run_benchmarks: what lands on disk, the numbers recomputed by hand from the per-item records, reproducibility."""

from __future__ import annotations

import json
import math

from lmcore.harness.run import flat_metrics, run_benchmarks
from lmcore.tracking import ListTracker


def _records(out):
    return [json.loads(line) for f in sorted((out / "samples").glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_outputs_and_numbers(micro_lm, enc, bench_dir, tmp_path, one_thread):
    out = tmp_path / "bench"
    tracker = ListTracker()
    tasks = ["arc_easy", "truthfulqa_mc2", "mmlu_anatomy", "mmlu_marketing", "mmlu_philosophy"]
    results = run_benchmarks(micro_lm, enc, bench_dir, out, tasks=tasks, limit=9, sample_seed=5, batch_size=4,
                             model_ref="models/x", progress=False, tracker=tracker)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "results.json", "samples", "scores.png", "table.md"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["arc_easy.jsonl", "mmlu.jsonl", "truthfulqa_mc2.jsonl"]
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text()) == results
    assert results["config"] == {"tasks": tasks, "limit": 9, "mmlu_limit": None, "sample_seed": 5, "num_fewshot": 0, "batch_size": 4, "context_length": 128}
    assert results["model"] == "models/x" and results["n_items"] == 45

    records = _records(out)
    assert len(records) == 45
    r = next(r for r in records if r["task"] == "arc_easy")
    assert set(r) >= {"doc_id", "prompt", "choices", "loglikelihoods", "pick", "pick_norm", "gold", "acc", "acc_norm"}
    assert r["pick"] == max(range(len(r["choices"])), key=lambda j: r["loglikelihoods"][j])
    norm = [ll / len(c) for ll, c in zip(r["loglikelihoods"], r["choices"])]
    assert r["pick_norm"] == norm.index(max(norm)) and r["acc_norm"] == float(r["pick_norm"] == r["gold"])

    # task scores: the mean of per-item values, standard error with n - 1
    arc = [x["acc"] for x in records if x["task"] == "arc_easy"]
    mean = sum(arc) / 9
    assert results["tasks"]["arc_easy"]["acc"] == mean
    assert math.isclose(results["tasks"]["arc_easy"]["acc_stderr"], math.sqrt(sum((a - mean) ** 2 for a in arc) / 8 / 9))
    mc2 = next(x for x in records if x["task"] == "truthfulqa_mc2")
    probs = [math.exp(ll) for ll in mc2["loglikelihoods"]]
    assert math.isclose(mc2["acc"], sum(p for p, lab in zip(probs, mc2["labels"]) if lab) / sum(probs))
    # groups: size-weighted over subjects; mmlu_other holds only marketing here
    mmlu = [x["acc"] for x in records if x["task"].startswith("mmlu_")]
    assert math.isclose(results["groups"]["mmlu"]["acc"], sum(mmlu) / 27)
    assert results["groups"]["mmlu_other"]["acc"] == results["tasks"]["mmlu_marketing"]["acc"]
    assert set(results["groups"]) == {"mmlu", "mmlu_stem", "mmlu_other", "mmlu_humanities"}

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"arc_easy", "truthfulqa_mc2", "mmlu", "mmlu_stem", "mmlu_other", "mmlu_humanities"}
    assert metrics["arc_easy"]["chance"] == 0.25 and metrics["mmlu"]["n"] == 27
    table = (out / "table.md").read_text()
    assert f"| arc_easy | acc_norm | {metrics['arc_easy']['acc_norm']:.4f} |" in table
    (step, logged), = tracker.records
    assert logged == flat_metrics(results) and logged["mmlu_anatomy.acc"] == results["tasks"]["mmlu_anatomy"]["acc"]
    assert "arc_easy.acc_norm_stderr" in logged


def test_the_same_config_scores_the_same_items(micro_lm, enc, bench_dir, tmp_path, one_thread):
    def run(name, **kw):
        return run_benchmarks(micro_lm, enc, bench_dir, tmp_path / name, tasks=["arc_challenge"], progress=False, **kw)

    a, b = run("a", limit=6, sample_seed=1), run("b", limit=6, sample_seed=1, batch_size=2)
    assert a["sample_sha256"] == b["sample_sha256"] and a["tasks"] == b["tasks"]
    assert run("c", limit=6, sample_seed=2)["sample_sha256"] != a["sample_sha256"]
    assert [r["doc_id"] for r in _records(tmp_path / "a")] == [r["doc_id"] for r in _records(tmp_path / "b")]


def test_items_whose_choices_outgrow_the_context_are_left_out_and_counted(enc, bench_dir, tmp_path, one_thread):
    import torch

    from lmcore.config import ModelConfig
    from lmcore.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=12, n_embd=16, n_layer=1, n_head=2)).eval()
    results = run_benchmarks(model, enc, bench_dir, tmp_path / "out", tasks=["hellaswag", "arc_easy"], limit=20, progress=False)
    hs = results["tasks"]["hellaswag"]
    assert hs["too_long"] > 0 and hs["n"] == 20 - hs["too_long"] and hs["truncated"] == hs["n"]
    assert results["n_items"] == hs["n"] + results["tasks"]["arc_easy"]["n"]
    assert f"hellaswag: {hs['too_long']} sampled items left out" in (tmp_path / "out" / "table.md").read_text()
    # no item fits at all: the task is n/a with the reason, not a score and not an error that stops the others
    tiny = GPT(ModelConfig(vocab_size=50257, context_length=2, n_embd=16, n_layer=1, n_head=2)).eval()
    none = run_benchmarks(tiny, enc, bench_dir, tmp_path / "none", tasks=["hellaswag"], limit=3, progress=False)
    hs = none["tasks"]["hellaswag"]
    assert (hs["n"], hs["too_long"], hs["meaningful"]) == (0, 3, False) and "acc_norm" not in hs
    assert hs["note"] == "n/a: all 3 items left out: a choice is longer than the 2-token context"
    assert "n/a: all 3 items left out" in (tmp_path / "none" / "table.md").read_text()
    assert not any(k.startswith("hellaswag.acc") for k in flat_metrics(none))
