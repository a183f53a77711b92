"""Scores from log-likelihoods, as lm-evaluation-harness computes them.

- acc: the choice with the highest log-likelihood is the gold one (numpy argmax: the first of equal maxima).
- acc_norm: the same after dividing each log-likelihood by the choice's length in characters (not tokens);
  the length is that of the choice text, without the target delimiter.
- truthfulqa_mc2 `acc`: the probability mass on the true answers, exp(ll) normalised over all answers.
- standard error: the sample standard deviation (n - 1) over sqrt(n), per task (lm-eval's `mean_stderr`);
  a group (mmlu and its categories) is the size-weighted mean of its subtasks with their pooled standard
  error (lm-eval's `pooled_sample_stderr`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lmcore.harness.benchmarks import ACC, ACC_NORM, Item
from lmcore.harness.scoring import ChoiceScores


def item_result(item: Item, scores: ChoiceScores) -> dict:
    """The per-item record: what was asked, each choice's log-likelihood, the picks and whether they were right."""
    lls = np.array(scores.loglikelihoods, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in item.choices])
    pick, pick_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
    result = {
        "task": item.task,
        "doc_id": item.doc_id,
        "prompt": item.context,
        "choices": list(item.choices),
        "loglikelihoods": [float(x) for x in lls],
        "n_tokens": list(scores.n_tokens),
        "is_greedy": list(scores.is_greedy),
        "truncated": scores.truncated,
        "gold": item.gold,
        "pick": pick,
        "pick_norm": pick_norm,
    }
    if item.labels is not None:  # truthfulqa_mc2: normalised probability on the true answers
        probs = np.exp(lls)
        probs = probs / probs.sum()
        result["labels"] = list(item.labels)
        result[ACC] = float(probs[np.array(item.labels) == 1].sum())
    else:
        result[ACC] = float(pick == item.gold)
        result[ACC_NORM] = float(pick_norm == item.gold)
    return result


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1) over sqrt(n); None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def task_scores(results: Sequence[dict], metrics: Sequence[str]) -> dict:
    """{"n", <metric>, <metric>_stderr, ...} over one task's per-item records."""
    out: dict = {"n": len(results)}
    for m in metrics:
        values = [r[m] for r in results]
        out[m] = sum(values) / len(values)
        out[f"{m}_stderr"] = mean_stderr(values)
    return out


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float | None:
    """Pooled standard error of a size-weighted mean of subtasks (lm-eval's `pooled_sample_stderr`)."""
    if len(stderrs) != len(sizes) or any(s is None for s in stderrs) or sum(sizes) <= len(sizes):
        return None
    var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def group_scores(subtasks: Sequence[dict]) -> dict:
    """A group's acc: the size-weighted mean of its subtasks' acc, with the pooled standard error."""
    sizes = [t["n"] for t in subtasks]
    acc = sum(t[ACC] * t["n"] for t in subtasks) / sum(sizes)
    return {"n": sum(sizes), ACC: acc, f"{ACC}_stderr": pooled_stderr([t[f"{ACC}_stderr"] for t in subtasks], sizes)}
