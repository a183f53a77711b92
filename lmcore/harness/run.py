"""Run benchmark tasks on a model and write what a person and a pipeline need: scores, per-item records, a table, a plot.

    results = run_benchmarks(model, enc, Path("data/benchmarks"), Path("reports/benchmark"),
                             tasks=["hellaswag", "mmlu"], limit=100, num_fewshot=5, sample_seed=1234)
    results["tasks"]["hellaswag"]["acc_norm"], results["groups"]["mmlu"]["acc_stderr"]
    results = benchmark_model(params.benchmark, Path("models/base"), data_dir, out_dir, enc=enc)  # a model folder

Outputs (out_dir, replaced whole):
    results.json       config (tasks, limit, sample_seed, num_fewshot, batch size), the sample's sha256, every task's
                       and group's scores with standard errors, chance levels, timing; per task the items whose
                       prompt was cut from the left (`truncated`, as lm-eval cuts it) and those left out because a
                       choice alone is longer than the model's context (`too_long`; lm-eval stops on those); the
                       share of both (`cut_fraction`), and whether the score measures the task at all (`meaningful`,
                       `note`; see MAX_CUT_FRACTION: if not, its scores are kept under `raw_scores` alone)
    metrics.json       the reported tasks and groups (not the 57 MMLU subjects): a DVC metric (no raw_scores)
    samples/<t>.jsonl  one record per item (prompt, choices, log-likelihoods, picks, gold, acc): t is a task, or
                       mmlu for all its subjects
    table.md           the scores as a markdown table ("n/a" and the note for a task that is not meaningful)
    scores.png         the scores with 95% intervals against chance (the note, greyed, instead of a bar)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from lmcore.checkpoint import load_model, read_model_config
from lmcore.config import BenchmarkConfig
from lmcore.harness.benchmarks import (
    ACC,
    ACC_NORM,
    MMLU_SUBJECTS,
    SPECS,
    expand,
    groups_of,
    sample,
    task_items,
)
from lmcore.harness.metrics import group_scores, item_result, task_scores
from lmcore.harness.scoring import score_items
from lmcore.harness.cache import EvalCache, cached
from lmcore.io import atomic_dir, atomic_file, jsonl_objects, read_json, sha256_file, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import METRICS, WEIGHTS
from lmcore.tracking import NullTracker, Tracker
from lmcore.training import resolve_device

log = logging.getLogger(__name__)

RESULTS = "results.json"
SAMPLES_DIR = "samples"
TABLE = "table.md"
PLOT = "scores.png"

# A task (or group) is not meaningful for a model when more than this share of its sampled items had their prompt
# cut from the left to fit the model's context or were left out (a choice alone longer than it): what comes out
# is a score of what was left of the prompts, not of the task. It is then reported as n/a with a note: not in
# metrics, the table's values, the plot or the promotion; its numbers stay in results.json under RAW_SCORES.
MAX_CUT_FRACTION = 0.5
RAW_SCORES = "raw_scores"
# The evaluation cache's task version and scorer of these multiple-choice tasks: bump on a change of prompts or
# scoring that changes a score.
MC_VERSION = "lmcore-mc-1"
MC_SCORER = "lmcore.harness.scoring 1 (lm-eval 0.4.13 parity)"
SCORE_KEYS = tuple(k for m in (ACC, ACC_NORM) for k in (m, f"{m}_stderr"))


def family(task: str) -> str:
    """The samples file a leaf task's records go to: mmlu for every subject, else the task itself."""
    return "mmlu" if task.startswith("mmlu_") else task


def table_part(task: str) -> str:
    """The per-item table a leaf task's rows go to: the task itself, or its MMLU category (mmlu_stem, ...). The MLflow
    UI's table view renders a few thousand rows in seconds, and stalls on the 14k rows of MMLU in one."""
    subject = task.removeprefix("mmlu_")
    return f"mmlu_{MMLU_SUBJECTS[subject]}" if task.startswith("mmlu_") and subject in MMLU_SUBJECTS else task


def item_tables(rows: list[dict]) -> dict[str, list[dict]]:
    """`item_rows` (or any rows with a "task") split by `table_part`, in the order parts first appear."""
    parts: dict[str, list[dict]] = {}
    for row in rows:
        parts.setdefault(table_part(row["task"]), []).append(row)
    return parts


def run_benchmarks(
    model: GPT,
    enc,
    data_dir: Path,
    out_dir: Path,
    *,
    tasks: list[str],
    limit: int | None = None,
    mmlu_limit: int | None = None,
    num_fewshot: int = 0,
    sample_seed: int = 1234,
    batch_size: int = 16,
    model_ref: str = "",
    progress: bool = True,
    tracker: Tracker = NullTracker(),
    max_cut_fraction: float = MAX_CUT_FRACTION,
) -> dict:
    """Score `tasks` (names or groups) on `model`; write out_dir; return the results dict (results.json).

    Args:
        data_dir: a collected benchmark folder (manifest.json + the source files).
        limit: items per leaf task (per subject for MMLU), drawn with `sample_seed`; None scores all.
        mmlu_limit: items per MMLU subject instead of `limit`; None: `limit`.
        num_fewshot: MMLU's dev examples before each question (other tasks are zero-shot, as lm-eval's defaults).
        model_ref: how the model was named (folder or models:/ URI), recorded in the results.
        tracker: receives the flat metrics ("hellaswag.acc_norm", "mmlu.acc_stderr", ...) of the meaningful tasks.
        max_cut_fraction: a task with a larger share of its items cut or left out is not meaningful (`coverage`).
    """
    leaves = expand(tasks)
    items = benchmark_items(data_dir, tasks=tasks, limit=limit, mmlu_limit=mmlu_limit, num_fewshot=num_fewshot, sample_seed=sample_seed)
    start = time.perf_counter()
    scores = score_items(model, enc, items, batch_size=batch_size, skip_too_long=True, progress=progress)
    elapsed = time.perf_counter() - start
    # A choice longer than the model's context cannot be scored: such items are left out and counted.
    too_long = Counter(it.task for it, sc in zip(items, scores) if sc is None)
    items, scores = [it for it, sc in zip(items, scores) if sc is not None], [sc for sc in scores if sc is not None]
    records = [item_result(it, sc) for it, sc in zip(items, scores)]

    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    task_results = {}
    for task in leaves:
        rows = by_task[task]
        if not rows:  # no score at all: n/a (`coverage`), never an error that stops the other tasks
            log.warning("%s: none of its %d items can be scored: a choice is longer than the context (%d tokens)",
                        task, too_long[task], model.config.context_length)
            task_results[task] = {"n": 0, "num_fewshot": num_fewshot if SPECS[task].fewshot else 0, "truncated": 0,
                                  "too_long": too_long[task], "chance": None}
            continue
        if too_long[task]:
            log.warning("%s: %d items left out: a choice is longer than the context (%d tokens)", task, too_long[task], model.config.context_length)
        task_results[task] = {
            **task_scores(rows, SPECS[task].metrics),
            "num_fewshot": num_fewshot if SPECS[task].fewshot else 0,
            "truncated": sum(r["truncated"] for r in rows),
            "too_long": too_long[task],
            "chance": _chance(rows),
        }
    group_results = {g: _group([task_results[t] for t in members]) for g, members in groups_of(leaves).items()}
    # judged after the groups: a group is the size-weighted mean of all its subjects, judged on its own coverage
    length = model.config.context_length
    task_results = {t: coverage(s, length, max_cut_fraction) for t, s in task_results.items()}
    group_results = {g: coverage(s, length, max_cut_fraction) for g, s in group_results.items()}
    for name, scores in {**task_results, **group_results}.items():
        if not scores["meaningful"] and (name in group_results or not name.startswith("mmlu_")):
            log.warning("%s: %s", name, scores["note"])
    results = {
        "model": model_ref,
        "config": {
            "tasks": list(tasks),
            "limit": limit,
            "mmlu_limit": mmlu_limit,
            "sample_seed": sample_seed,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "context_length": model.config.context_length,
        },
        "sample_sha256": sample_sha256(items),
        "n_items": len(items),
        "elapsed_s": round(elapsed, 3),
        "items_per_s": round(len(items) / elapsed, 2) if elapsed > 0 else None,
        "tasks": task_results,
        "groups": group_results,
    }
    reported = reported_scores(results)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / RESULTS, results)
        write_json(tmp / METRICS, {name: {k: v for k, v in s.items() if k != RAW_SCORES} for name, s in reported.items()})
        (tmp / SAMPLES_DIR).mkdir()
        for name in dict.fromkeys(family(t) for t in leaves):
            with atomic_file(tmp / SAMPLES_DIR / f"{name}.jsonl", "w") as f:
                for r in records:
                    if family(r["task"]) == name:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
        write_text(tmp / TABLE, markdown_table(reported))
        plot_scores(reported, tmp / PLOT)
    tracker.log_metrics(flat_metrics(results))
    return results


def benchmark_items(data_dir: Path, *, tasks: list[str], limit: int | None, mmlu_limit: int | None = None, num_fewshot: int = 0,
                    sample_seed: int = 1234) -> list:
    """The items `run_benchmarks` scores: per leaf task `limit` (`mmlu_limit` per MMLU subject) drawn with `sample_seed`."""
    items = []
    for task in expand(tasks):
        n = mmlu_limit if mmlu_limit is not None and task.startswith("mmlu_") else limit
        items += sample(task_items(task, Path(data_dir), num_fewshot), n, sample_seed)
    return items


def benchmark_model(
    cfg: BenchmarkConfig,
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    enc,
    model_ref: str = "",
    progress: bool = True,
    tracker: Tracker = NullTracker(),
    cache: EvalCache | None = None,
) -> dict:
    """run_benchmarks on a model folder with the `benchmark` params section (tasks, limit, seed, device, threads).

    cache: results are looked up by the weights' sha256, the tasks, the sample's sha256 and the scoring settings
        first (lmcore.harness.cache): a model scored before on the same items is not loaded, let alone run.
    """
    def compute(out: Path) -> None:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        model = load_model(model_dir, device=resolve_device(cfg.device))
        run_benchmarks(
            model, enc, data_dir, out, tasks=cfg.tasks, limit=cfg.limit, mmlu_limit=cfg.mmlu_limit, num_fewshot=cfg.num_fewshot,
            sample_seed=cfg.sample_seed, batch_size=cfg.batch_size, model_ref=model_ref or str(model_dir),
            progress=progress, tracker=tracker, max_cut_fraction=cfg.max_cut_fraction,
        )

    if cache is None:
        compute(Path(out_dir))
        return read_json(Path(out_dir) / RESULTS)
    items = benchmark_items(data_dir, tasks=cfg.tasks, limit=cfg.limit, mmlu_limit=cfg.mmlu_limit, num_fewshot=cfg.num_fewshot,
                            sample_seed=cfg.sample_seed)
    context_length = read_model_config(model_dir)[0].context_length
    fields = {
        "weights_sha256": sha256_file(Path(model_dir) / WEIGHTS), "task": ",".join(cfg.tasks), "task_version": MC_VERSION,
        "sample_sha256": sample_sha256(items), "prompt_template": "plain",
        "generation": {"loglikelihood": True, "num_fewshot": cfg.num_fewshot, "context_length": context_length,
                       "max_cut_fraction": cfg.max_cut_fraction},
        "scorer_version": MC_SCORER,
    }
    if cached(cache, fields, compute, Path(out_dir)):
        results = read_json(Path(out_dir) / RESULTS)
        tracker.log_metrics(flat_metrics(results))
        log.info("%s: scores of weights %s on these items from the evaluation cache", model_ref or model_dir, fields["weights_sha256"][:12])
        return results
    return read_json(Path(out_dir) / RESULTS)


def coverage(scores: dict, context_length: int, max_cut_fraction: float = MAX_CUT_FRACTION) -> dict:
    """A task's or group's scores judged on how much of its sample was scored as asked: with `cut_fraction` (the
    share of its sampled items whose prompt was cut from the left, or that were left out), `meaningful` (that share
    is at most `max_cut_fraction`) and `note` (why not, else None). The scores of a task that is not meaningful
    (acc, acc_norm and their standard errors) move under RAW_SCORES, so that nothing reads them as a measurement.
    """
    sampled = scores["n"] + scores["too_long"]
    cut = (scores["truncated"] + scores["too_long"]) / sampled
    out = {**scores, "cut_fraction": cut, "meaningful": scores["n"] > 0 and cut <= max_cut_fraction, "note": None}
    if out["meaningful"]:
        return out
    how = "cut or left out" if scores["too_long"] else "cut"
    out["note"] = (f"n/a: {cut:.0%} of {sampled} items {how} to fit the {context_length}-token context" if scores["n"]
                   else f"n/a: all {sampled} items left out: a choice is longer than the {context_length}-token context")
    out[RAW_SCORES] = {k: out.pop(k) for k in SCORE_KEYS if k in out}
    return out


def score_of(results: dict, metric: str) -> dict:
    """One metric ("hellaswag.acc_norm", "mmlu.acc") of a results dict: {"value", "stderr", "meaningful", "note"};
    value and stderr are None when its task is not meaningful for the model (`coverage`)."""
    name, _, key = metric.rpartition(".")
    scores = {**results["tasks"], **results.get("groups", {})}[name]
    if not scores.get("meaningful", True):
        return {"value": None, "stderr": None, "meaningful": False, "note": scores["note"]}
    return {"value": scores[key], "stderr": scores.get(f"{key}_stderr"), "meaningful": True, "note": None}


def sample_sha256(items) -> str:
    """Identifies exactly what was scored: every item's task, doc id, context and choices, in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.task, it.doc_id, it.context, list(it.choices)], ensure_ascii=False).encode())
    return h.hexdigest()


def reported_scores(results: dict) -> dict:
    """The scores people look at: each task that is not an MMLU subject, and the MMLU groups."""
    out = {t: s for t, s in results["tasks"].items() if not t.startswith("mmlu_")}
    out.update(results.get("groups", {}))
    return out


def flat_metrics(results: dict) -> dict[str, float]:
    """{"<task>.<metric>": value} for every task, subject and group, standard errors included (None left out); of a
    task that is not meaningful, only its counts and `cut_fraction` (its scores are under RAW_SCORES)."""
    flat = {}
    for name, scores in {**results["tasks"], **results["groups"]}.items():
        for key, value in scores.items():
            if key != "n" and isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{name}.{key}"] = float(value)
    return flat


def _group(members: list[dict]) -> dict:
    """A group's scores over its subtasks that have any (a subtask with no item scorable has none)."""
    scored = [m for m in members if m["n"]]
    return {
        **(group_scores(scored) if scored else {"n": 0}),
        "truncated": sum(m["truncated"] for m in members),
        "too_long": sum(m["too_long"] for m in members),
        "chance": _mean([m["chance"] for m in scored]) if scored else None,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _chance(rows: list[dict]) -> float:
    """What guessing scores: 1 / number of choices (truthfulqa_mc2: the share of true answers)."""
    if rows and "labels" in rows[0]:
        return _mean([sum(r["labels"]) / len(r["labels"]) for r in rows])
    return _mean([1 / len(r["choices"]) for r in rows])


def table_rows(reported: dict) -> list[dict]:
    """One row per task (or group) and metric: what table.md, scores.png and the Prefect table artifact show. A task
    that is not meaningful has value and stderr None and its note."""
    return [
        {"task": name, "metric": m, "value": scores.get(m), "stderr": scores.get(f"{m}_stderr"), "n": scores["n"],
         "chance": scores.get("chance"), "note": scores.get("note")}
        for name, scores in reported.items()
        for m in _metrics(scores)
    ]


def _metrics(scores: dict) -> list[str]:
    """A task's reported metrics: acc and acc_norm of a multiple-choice task (acc alone when nothing was scored);
    of another task (generative, a classifier's test split), every key that has a standard error beside it."""
    mc = [m for m in (ACC, ACC_NORM) if m in scores or m in scores.get(RAW_SCORES, {}) or (not scores["n"] and m == ACC)]
    return mc or [k for k in scores if f"{k}_stderr" in scores]


def item_rows(samples_dir: Path) -> list[dict]:
    """One row per scored item of a samples folder (samples/<family>.jsonl, files in name order), for people to
    filter and sort (an MLflow table). Every row has the same columns, whatever the task:

        task, doc_id; correct: pick is gold (None for truthfulqa_mc2, which scores a probability); acc: 0 or 1
        (truthfulqa_mc2: the probability on the true answers); acc_norm: 0 or 1 (None for truthfulqa_mc2);
        gold, pick, pick_norm: choice indices; prompt, choices; labels: 1 for each true choice (the gold one, or
        truthfulqa_mc2's true answers); loglikelihoods: one per choice; truncated: the prompt was cut from the left.
    """
    rows = []
    for path in sorted(Path(samples_dir).glob("*.jsonl")):
        for _, r in jsonl_objects(path.read_text(encoding="utf-8"), path):
            mc2 = "labels" in r
            rows.append({
                "task": r["task"],
                "doc_id": r["doc_id"],
                "correct": None if mc2 else r["pick"] == r["gold"],
                ACC: r[ACC],
                ACC_NORM: r.get(ACC_NORM),
                "gold": r["gold"],
                "pick": r["pick"],
                "pick_norm": r.get("pick_norm"),
                "prompt": r["prompt"],
                "choices": r["choices"],
                "labels": r["labels"] if mc2 else [int(i == r["gold"]) for i in range(len(r["choices"]))],
                "loglikelihoods": r["loglikelihoods"],
                "truncated": r["truncated"],
            })
    return rows


def markdown_table(reported: dict) -> str:
    lines = ["| task | metric | value | ± stderr | n | chance |", "|---|---|---:|---:|---:|---:|"]
    for r in table_rows(reported):
        value = r["note"] if r["value"] is None else f"{r['value']:.4f}"
        se = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        chance = "" if r["chance"] is None else f"{r['chance']:.4f}"
        lines.append(f"| {r['task']} | {r['metric']} | {value} | {se} | {r['n']} | {chance} |")
    notes = [
        f"{name}: {scores['too_long']} sampled items left out (a choice is longer than the model's context)"
        for name, scores in reported.items()
        if scores.get("too_long")
    ]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot_scores(reported: dict, path: Path) -> None:
    """Horizontal bars with 95% intervals (1.96 standard errors); a tick marks chance for each row. A task that is
    not meaningful has no bar and no tick: its note, in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(reported)
    labels = [f"{r['task']} {r['metric']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    ys = list(range(len(labels)))[::-1]
    scored = [(y, r) for y, r in zip(ys, rows) if r["value"] is not None]
    ax.barh([y for y, _ in scored], [r["value"] for _, r in scored], color="#4C72B0", capsize=3, label="score ± 95% CI",
            xerr=[1.96 * r["stderr"] if r["stderr"] is not None else 0.0 for _, r in scored])
    ax.scatter([r["chance"] for _, r in scored], [y for y, _ in scored], marker="|", s=300, color="#C44E52", zorder=3, label="chance")
    for y, r in zip(ys, rows):
        if r["value"] is None:
            ax.text(0.01, y, r["note"], va="center", fontsize=7, color="grey")
    ax.set_yticks(ys, labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)  # rows without a bar count too
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("benchmark scores", fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


__all__ = [
    "MAX_CUT_FRACTION",
    "PLOT",
    "RAW_SCORES",
    "RESULTS",
    "SAMPLES_DIR",
    "SCORE_KEYS",
    "TABLE",
    "benchmark_model",
    "coverage",
    "flat_metrics",
    "item_rows",
    "item_tables",
    "reported_scores",
    "run_benchmarks",
    "score_of",
    "table_part",
    "table_rows",
]
