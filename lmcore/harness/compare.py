"""Champion vs challenger: two benchmark out folders (lmcore.harness.run.run_benchmarks) of two model versions,
scored on the very same items, compared score by score and item by item.

    rows = compare_scores(read_json(new / "results.json"), read_json(old / "results.json"))
    summary = write_comparison(new, old, Path("reports/compare"), labels=("lmcore-base v3", "v2 @champion"))

Same items (the same sample_sha256) make it a paired comparison: a difference in score is a difference between the
models, not between the samples, and the items where one model is right and the other wrong show where they differ.
A difference counts when it is larger than the combined standard error sqrt(se_a^2 + se_b^2), the rule of
lmcore.promotion.decide (the rule that moves the champion alias), so the verdicts here agree with the promotion.

Outputs (out_dir, replaced whole):
    comparison.md        the score table for people, and per task how many items the two models disagree on
    scores.csv           the rows of `compare_scores`
    scores.png           both models' scores with 95% intervals, side by side per task and metric
    disagreements.jsonl  one record per item where exactly one of the two is right (`disagreements`)
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

from lmcore.harness.benchmarks import headline_metric
from lmcore.harness.run import RESULTS, SAMPLES_DIR, family, reported_scores, table_rows
from lmcore.io import atomic_dir, atomic_file, jsonl_objects, read_json, write_text

COMPARISON = "comparison.md"
SCORES_CSV = "scores.csv"
PLOT = "scores.png"
DISAGREEMENTS = "disagreements.jsonl"

# A row's verdict on the challenger: better or worse by more than the combined standard error, else within error;
# n/a when a side has no score (not meaningful for it) or no standard error (fewer than two items).
BETTER, WORSE, WITHIN, NA = "better", "worse", "within error", "n/a"
ROW_FIELDS = ("task", "metric", "n", "challenger", "challenger_stderr", "champion", "champion_stderr", "diff",
              "diff_stderr", "verdict", "challenger_note", "champion_note")
LABELS = ("challenger", "champion")


def compare_scores(challenger: dict, champion: dict) -> list[dict]:
    """One row per reported task (or group) and metric, as in table.md: both scores, their difference and verdict.

    Args:
        challenger, champion: results dicts (results.json) scored on the same items.
    Returns: rows with ROW_FIELDS. diff is challenger - champion, diff_stderr the combined standard error
        sqrt(se_challenger^2 + se_champion^2); a side on which the task is not meaningful has value None and its note.
    Raises ValueError, naming both sample sha256, when they were scored on different items.
    """
    if challenger["sample_sha256"] != champion["sample_sha256"]:
        raise ValueError(f"scored on different items: challenger sample_sha256 {challenger['sample_sha256']}, "
                         f"champion {champion['sample_sha256']}; rerun both with the same tasks, limit and sample_seed")
    sides = [{(r["task"], r["metric"]): r for r in table_rows(reported_scores(res))} for res in (challenger, champion)]
    missing = {"value": None, "stderr": None, "n": 0, "note": "not scored"}
    rows = []
    for key in dict.fromkeys([*sides[0], *sides[1]]):
        a, b = (s.get(key, missing) for s in sides)
        diff = margin = None
        if a["value"] is not None and b["value"] is not None:
            diff = a["value"] - b["value"]
            if a["stderr"] is not None and b["stderr"] is not None:
                margin = math.sqrt(a["stderr"] ** 2 + b["stderr"] ** 2)  # as lmcore.promotion.decide
        rows.append({
            "task": key[0], "metric": key[1], "n": a["n"] or b["n"],
            "challenger": a["value"], "challenger_stderr": a["stderr"], "champion": b["value"], "champion_stderr": b["stderr"],
            "diff": diff, "diff_stderr": margin, "verdict": verdict(diff, margin),
            "challenger_note": a["note"], "champion_note": b["note"],
        })
    return rows


def verdict(diff: float | None, margin: float | None) -> str:
    """BETTER or WORSE when |diff| exceeds the combined standard error `margin`, else WITHIN; NA without both."""
    if diff is None or margin is None:
        return NA
    return BETTER if diff > margin else WORSE if -diff > margin else WITHIN


def disagreements(challenger_samples: Path, champion_samples: Path) -> list[dict]:
    """The items where one model is right and the other wrong, under the task's headline metric (acc_norm for
    hellaswag and arc, acc for mmlu and truthfulqa_mc1: `headline_metric`), in the challenger's file order.

    truthfulqa_mc2 has no rows: its score is a probability per item, not right or wrong (`item_counts` counts its
    items all the same). A task that is not meaningful for a model (its prompts cut) is compared all the same: the
    records say what it picked from what it saw.

    Args:
        challenger_samples, champion_samples: the samples/ folders of two out folders.
    Returns: rows with task, doc_id, metric, prompt, gold (the gold choice's text), challenger_pick and champion_pick
        (the picked choices' texts), challenger_correct, champion_correct, challenger_gold_ll, champion_gold_ll (each
        model's log-likelihood of the gold choice).
    Raises ValueError when an item is in one folder only (they scored different samples).
    """
    return _disagreements(_paired(challenger_samples, champion_samples))


def item_counts(challenger_samples: Path, champion_samples: Path) -> tuple[dict[str, int], dict[str, int | None]]:
    """({family: items compared}, {family: items the two disagree on}) per samples file (a task, or mmlu for all its
    subjects); the disagreement count is None for a task scored by probability (truthfulqa_mc2)."""
    return _counts(_paired(challenger_samples, champion_samples))


def _paired(challenger_samples: Path, champion_samples: Path) -> list[tuple[dict, dict]]:
    """The two folders' per-item records, joined on (task, doc_id), in the challenger's order."""
    sides = []
    for folder in (challenger_samples, champion_samples):
        records = {}
        for path in sorted(Path(folder).glob("*.jsonl")):
            for _, r in jsonl_objects(path.read_text(encoding="utf-8"), path):
                records[r["task"], r["doc_id"]] = r
        sides.append(records)
    a, b = sides
    only = [(k, "challenger") for k in a if k not in b] + [(k, "champion") for k in b if k not in a]
    if only:
        shown = ", ".join(f"{t}/{d} ({side})" for (t, d), side in only[:5])
        raise ValueError(f"{len(only)} items scored by one model only, e.g. {shown}: {challenger_samples} and "
                         f"{champion_samples} hold different samples")
    what = ("prompt", "choices", "gold")
    changed = [k for k, r in a.items() if [r.get(w) for w in what] != [b[k].get(w) for w in what]]
    if changed:
        raise ValueError(f"{len(changed)} items differ in prompt, choices or gold, e.g. {changed[0][0]}/{changed[0][1]}: "
                         f"{challenger_samples} and {champion_samples} hold different samples")
    return [(r, b[k]) for k, r in a.items()]


def _correct(record: dict) -> tuple[bool, int]:
    """Whether a record is right under its task's headline metric, and the choice it picked under that metric."""
    metric = headline_metric(record["task"]).rpartition(".")[2]
    return record[metric] == 1.0, record["pick_norm" if metric == "acc_norm" else "pick"]


def _verdict_row(a: dict, b: dict) -> dict:
    """A disagreement of two records that carry their own verdict (`correct`): a generated answer (IFEval, GSM8K)
    or a classifier's prediction, against the gold one."""
    return {
        "task": a["task"], "doc_id": a["doc_id"], "metric": a.get("metric", "correct"), "prompt": a["prompt"],
        "gold": a.get("gold"), "challenger_answer": a.get("answer", a.get("response")),
        "champion_answer": b.get("answer", b.get("response")),
        "challenger_correct": bool(a["correct"]), "champion_correct": bool(b["correct"]),
    }


def _disagreements(pairs: list[tuple[dict, dict]]) -> list[dict]:
    rows = []
    for a, b in pairs:
        if "choices" not in a:  # a verdict per record (generative tasks, classifiers)
            if bool(a["correct"]) != bool(b["correct"]):
                rows.append(_verdict_row(a, b))
            continue
        if "labels" in a:  # truthfulqa_mc2: a probability, never right or wrong
            continue
        (a_ok, a_pick), (b_ok, b_pick) = _correct(a), _correct(b)
        if a_ok == b_ok:
            continue
        gold = a["gold"]
        rows.append({
            "task": a["task"], "doc_id": a["doc_id"], "metric": headline_metric(a["task"]).rpartition(".")[2],
            "prompt": a["prompt"], "gold": a["choices"][gold],
            "challenger_pick": a["choices"][a_pick], "champion_pick": b["choices"][b_pick],
            "challenger_correct": a_ok, "champion_correct": b_ok,
            "challenger_gold_ll": a["loglikelihoods"][gold], "champion_gold_ll": b["loglikelihoods"][gold],
        })
    return rows


def paired_verdicts(challenger_samples: Path, champion_samples: Path) -> tuple[list[bool], list[bool]]:
    """Both models' verdicts (`correct`, or the headline metric's) on the same items, in the same order: what a
    paired test compares (lmcore.promotion.paired_difference). Items scored by probability are left out."""
    new, old = [], []
    for a, b in _paired(challenger_samples, champion_samples):
        if "choices" not in a:
            new.append(bool(a["correct"]))
            old.append(bool(b["correct"]))
        elif "labels" not in a:
            new.append(_correct(a)[0])
            old.append(_correct(b)[0])
    return new, old


def _counts(pairs: list[tuple[dict, dict]]) -> tuple[dict[str, int], dict[str, int | None]]:
    n_items = Counter(family(a["task"]) for a, _ in pairs)
    by_probability = {family(a["task"]) for a, _ in pairs if "labels" in a}
    n_disagree: dict[str, int | None] = {f: None if f in by_probability else 0 for f in n_items}
    for r in _disagreements(pairs):
        n_disagree[family(r["task"])] += 1
    return dict(n_items), n_disagree


def markdown(rows: list[dict], labels: tuple[str, str] = LABELS, disagreement_counts: dict[str, int | None] | None = None,
             n_items: dict[str, int] | None = None) -> str:
    """The comparison for people: a table of both scores (± stderr), the difference (± combined stderr) and the
    verdict; then a line per task: on how many of its items exactly one of the two is right."""
    lines = [f"| task | metric | n | {labels[0]} | {labels[1]} | diff ± stderr | verdict |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        a, b = (_score(r[s], r[f"{s}_stderr"], r[f"{s}_note"]) for s in LABELS)
        diff = "" if r["diff"] is None else _score(r["diff"], r["diff_stderr"], None, sign=True)
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {a} | {b} | {diff} | {r['verdict']} |")
    rule = (f"{BETTER} / {WORSE}: {labels[0]} differs from {labels[1]} by more than the combined standard error "
            "sqrt(se1² + se2²), the promotion rule; the same items scored by both.")
    lines += ["", rule]
    if disagreement_counts:
        lines += ["", "Items where one is right and the other wrong:", ""]
        for fam, k in disagreement_counts.items():
            n = (n_items or {}).get(fam)
            if k is None:
                lines.append(f"- {fam}: scored by probability, not right or wrong by item" + (f" ({n} items)" if n else ""))
            else:
                lines.append(f"- {fam} ({headline_metric(fam).rpartition('.')[2]}): {k}" + (f" of {n}" if n else "") + " items")
    return "\n".join(lines) + "\n"


def _score(value: float | None, stderr: float | None, note: str | None, sign: bool = False) -> str:
    if value is None:
        return note or NA
    text = f"{value:+.4f}" if sign else f"{value:.4f}"
    return text if stderr is None else f"{text} ± {stderr:.4f}"


def plot_comparison(rows: list[dict], path: Path, labels: tuple[str, str] = LABELS) -> None:
    """Grouped horizontal bars, the two models per task and metric, with 95% intervals (1.96 standard errors) and
    the difference and verdict on the right; a side with no score has no bar: its note, in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.7 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]
    for side, label, offset, color in zip(LABELS, labels, (0.2, -0.2), ("#4C72B0", "#DD8452")):
        scored = [(y, r) for y, r in zip(ys, rows) if r[side] is not None]
        ax.barh([y + offset for y, _ in scored], [r[side] for _, r in scored], height=0.38, color=color, capsize=2,
                label=label, xerr=[1.96 * (r[f"{side}_stderr"] or 0.0) for _, r in scored])
        for y, r in zip(ys, rows):
            if r[side] is None:
                ax.text(0.01, y + offset, r[f"{side}_note"] or NA, va="center", fontsize=6, color="grey")
    for y, r in zip(ys, rows):
        text = r["verdict"] if r["diff"] is None else f"{r['diff']:+.3f} {r['verdict']}"
        ax.text(1.01, y, text, va="center", fontsize=7, transform=ax.get_yaxis_transform())
    ax.set_yticks(ys, [f"{r['task']} {r['metric']}" for r in rows])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (± 95% CI)")
    ax.set_title(f"{labels[0]} vs {labels[1]}", fontsize=10)
    fig.tight_layout()
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")  # the legend below the axis and the verdicts beside it
    plt.close(fig)


def write_comparison(challenger_dir: Path, champion_dir: Path, out_dir: Path, labels: tuple[str, str] = LABELS) -> dict:
    """Compare two benchmark out folders; write out_dir (COMPARISON, SCORES_CSV, PLOT, DISAGREEMENTS) whole.

    Args:
        labels: how the two are named in the table and the plot, e.g. ("lmcore-base v3", "v2 @champion").
    Returns: {"rows": compare_scores rows, "n_items": {family: items compared}, "n_disagree": {family: count, None for
        truthfulqa_mc2}, "disagreements": the rows of `disagreements`, "sample_sha256": the items' sha256}.
    Raises ValueError when the two were scored on different items.
    """
    challenger_dir, champion_dir = Path(challenger_dir), Path(champion_dir)
    challenger = read_json(challenger_dir / RESULTS)
    rows = compare_scores(challenger, read_json(champion_dir / RESULTS))
    pairs = _paired(challenger_dir / SAMPLES_DIR, champion_dir / SAMPLES_DIR)
    n_items, n_disagree = _counts(pairs)
    order = [r["task"] for r in rows]  # the table's order, then the rest
    n_disagree = dict(sorted(n_disagree.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    n_items = {f: n_items[f] for f in n_disagree}
    items = _disagreements(pairs)
    with atomic_dir(out_dir) as tmp:
        write_text(tmp / COMPARISON, markdown(rows, labels, n_disagree, n_items))
        with atomic_file(tmp / SCORES_CSV, "w") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        plot_comparison(rows, tmp / PLOT, labels)
        write_text(tmp / DISAGREEMENTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    return {"rows": rows, "n_items": n_items, "n_disagree": n_disagree, "disagreements": items,
            "sample_sha256": challenger["sample_sha256"]}


__all__ = [
    "BETTER",
    "COMPARISON",
    "DISAGREEMENTS",
    "NA",
    "PLOT",
    "ROW_FIELDS",
    "SCORES_CSV",
    "WITHIN",
    "WORSE",
    "compare_scores",
    "disagreements",
    "item_counts",
    "paired_verdicts",
    "markdown",
    "plot_comparison",
    "verdict",
    "write_comparison",
]
