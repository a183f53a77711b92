"""lmcore's evaluation harness: multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores
them (same prompts, tokenization split, truncation, acc / acc_norm / mc2, standard errors), but faster.

    benchmarks.py HellaSwag, MMLU (57 subjects, 0- or k-shot), TruthfulQA MC1/MC2, ARC-Easy/Challenge: documents -> Items
    scoring.py  score_items: one packed row per item (context once, all choices), rows batched by length, LM head
                only at the scored positions
    metrics.py  acc, acc_norm, mc2, standard errors, size-weighted groups
    run.py      run_benchmarks: sample, score, write results.json / metrics.json / samples/*.jsonl / table.md / scores.png
    probe.py    BenchProbe: a fixed small sample scored every N training steps (train_bench.<task>.<metric>)
"""
