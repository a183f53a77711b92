"""lmcore's evaluation harness: benchmarks scored as lm-evaluation-harness scores them, but faster: multiple choice by
log-likelihood (same prompts, tokenization split, truncation, acc / acc_norm / mc2, standard errors), and the
generative IFEval and GSM8K by greedy batched generation, scored by lm-eval's own checkers and filters.

    benchmarks.py HellaSwag, MMLU (57 subjects, 0- or k-shot), TruthfulQA MC1/MC2, ARC-Easy/Challenge: documents -> Items
    scoring.py  score_items: one packed row per item (context once, all choices), long rows alone and short ones
                batched (no padding wasted), LM head only at the scored positions
    metrics.py  acc, acc_norm, mc2, standard errors, size-weighted groups
    run.py      run_benchmarks: sample, score, write results.json / metrics.json / samples/*.jsonl / table.md / scores.png
    probe.py    BenchProbe: a fixed small sample scored every N training steps (train_bench.<task>.<metric>)
    generative.py  IFEval and GSM8K: items, prompts in the model's chat template, generation, lm-eval's scorers
    gentasks.py the generative tasks' settings and metric names as lm-eval configures them (read by params validation)
    punkt.py    NLTK's English Punkt installed offline (IFEval counts sentences with it)
    compare.py  champion vs challenger on the same items: scores, disagreements, paired verdicts
    cache.py    EvalCache: a result per (weights, task, sample, template, generation settings, scorer)
    decontam.py 13-gram overlap of training texts with benchmark items (lm-eval's method)
"""
