"""Run benchmark tasks on a model and write what a person and a pipeline need: scores, per-item records, a table, a plot.

    results = run_benchmarks(model, enc, Path("data/benchmarks"), Path("reports/benchmark"),
                             tasks=["hellaswag", "mmlu"], limit=100, num_fewshot=5, sample_seed=1234)
    results["tasks"]["hellaswag"]["acc_norm"], results["groups"]["mmlu"]["acc_stderr"]
    results = benchmark_model(params.benchmark, Path("models/base"), data_dir, out_dir, enc=enc)  # a model folder

Outputs (out_dir, replaced whole):
    results.json       config (tasks, limit, sample_seed, num_fewshot, batch size), the sample's sha256, every task's
                       and group's scores with standard errors, chance levels, timing; per task the items whose
                       prompt was cut from the left (`truncated`, as lm-eval cuts it) and those left out because a
                       choice alone is longer than the model's context (`too_long`; lm-eval stops on those)
    metrics.json       the reported tasks and groups (not the 57 MMLU subjects): a DVC metric
    samples/<t>.jsonl  one record per item (prompt, choices, log-likelihoods, picks, gold, acc): t is a task, or
                       mmlu for all its subjects
    table.md           the scores as a markdown table
    scores.png         the scores with 95% intervals against chance
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from lmcore.checkpoint import load_model
from lmcore.config import BenchmarkConfig
from lmcore.harness.benchmarks import SPECS, expand, groups_of, sample, task_items
from lmcore.harness.metrics import group_scores, item_result, task_scores
from lmcore.harness.scoring import TooLongError, score_items
from lmcore.io import atomic_dir, atomic_file, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import METRICS
from lmcore.tracking import NullTracker, Tracker
from lmcore.training import resolve_device

log = logging.getLogger(__name__)

RESULTS = "results.json"
SAMPLES_DIR = "samples"
TABLE = "table.md"
PLOT = "scores.png"


def family(task: str) -> str:
    """The samples file a leaf task's records go to: mmlu for every subject, else the task itself."""
    return "mmlu" if task.startswith("mmlu_") else task


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
) -> dict:
    """Score `tasks` (names or groups) on `model`; write out_dir; return the results dict (results.json).

    Args:
        data_dir: a collected benchmark folder (manifest.json + the source files).
        limit: items per leaf task (per subject for MMLU), drawn with `sample_seed`; None scores all.
        mmlu_limit: items per MMLU subject instead of `limit`; None: `limit`.
        num_fewshot: MMLU's dev examples before each question (other tasks are zero-shot, as lm-eval's defaults).
        model_ref: how the model was named (folder or models:/ URI), recorded in the results.
        tracker: receives the flat metrics ("hellaswag.acc_norm", "mmlu.acc_stderr", ...).
    """
    leaves = expand(tasks)
    items = []
    for task in leaves:
        n = mmlu_limit if mmlu_limit is not None and task.startswith("mmlu_") else limit
        items += sample(task_items(task, Path(data_dir), num_fewshot), n, sample_seed)
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
        if not rows:
            raise TooLongError(
                f"{task}: none of its {too_long[task]} items can be scored: a choice is longer than the model's "
                f"context ({model.config.context_length} tokens)"
            )
        if too_long[task]:
            log.warning("%s: %d items left out: a choice is longer than the context (%d tokens)", task, too_long[task], model.config.context_length)
        task_results[task] = {
            **task_scores(rows, SPECS[task].metrics),
            "num_fewshot": num_fewshot if SPECS[task].fewshot else 0,
            "truncated": sum(r["truncated"] for r in rows),
            "too_long": too_long[task],
            "chance": _chance(rows),
        }
    group_results = {
        g: {**group_scores([task_results[t] for t in members]), "chance": _mean([task_results[t]["chance"] for t in members])}
        for g, members in groups_of(leaves).items()
    }
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
        write_json(tmp / METRICS, reported)
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
) -> dict:
    """run_benchmarks on a model folder with the `benchmark` params section (tasks, limit, seed, device, threads)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model = load_model(model_dir, device=resolve_device(cfg.device))
    return run_benchmarks(
        model, enc, data_dir, out_dir, tasks=cfg.tasks, limit=cfg.limit, mmlu_limit=cfg.mmlu_limit, num_fewshot=cfg.num_fewshot,
        sample_seed=cfg.sample_seed, batch_size=cfg.batch_size, model_ref=model_ref or str(model_dir),
        progress=progress, tracker=tracker,
    )


def sample_sha256(items) -> str:
    """Identifies exactly what was scored: every item's task, doc id, context and choices, in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.task, it.doc_id, it.context, list(it.choices)], ensure_ascii=False).encode())
    return h.hexdigest()


def reported_scores(results: dict) -> dict:
    """The scores people look at: each task that is not an MMLU subject, and the MMLU groups."""
    out = {t: s for t, s in results["tasks"].items() if not t.startswith("mmlu_")}
    out.update(results["groups"])
    return out


def flat_metrics(results: dict) -> dict[str, float]:
    """{"<task>.<metric>": value} for every task, subject and group, standard errors included (None left out)."""
    flat = {}
    for name, scores in {**results["tasks"], **results["groups"]}.items():
        for key, value in scores.items():
            if key != "n" and isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{name}.{key}"] = float(value)
    return flat


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _chance(rows: list[dict]) -> float:
    """What guessing scores: 1 / number of choices (truthfulqa_mc2: the share of true answers)."""
    if rows and "labels" in rows[0]:
        return _mean([sum(r["labels"]) / len(r["labels"]) for r in rows])
    return _mean([1 / len(r["choices"]) for r in rows])


def table_rows(reported: dict) -> list[dict]:
    """One row per task (or group) and metric: what table.md, scores.png and the Prefect table artifact show."""
    return [
        {"task": name, "metric": m, "value": scores[m], "stderr": scores.get(f"{m}_stderr"), "n": scores["n"], "chance": scores["chance"]}
        for name, scores in reported.items()
        for m in ("acc", "acc_norm")
        if m in scores
    ]


def markdown_table(reported: dict) -> str:
    lines = ["| task | metric | value | ± stderr | n | chance |", "|---|---|---:|---:|---:|---:|"]
    for r in table_rows(reported):
        se = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {se} | {r['n']} | {r['chance']:.4f} |")
    notes = [
        f"{name}: {scores['too_long']} sampled items left out (a choice is longer than the model's context)"
        for name, scores in reported.items()
        if scores.get("too_long")
    ]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot_scores(reported: dict, path: Path) -> None:
    """Horizontal bars with 95% intervals (1.96 standard errors); a tick marks chance for each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(reported)
    labels = [f"{r['task']} {r['metric']}" for r in rows]
    values = [r["value"] for r in rows]
    errors = [1.96 * r["stderr"] if r["stderr"] is not None else 0.0 for r in rows]
    chance = [r["chance"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    ys = list(range(len(labels)))[::-1]
    ax.barh(ys, values, xerr=errors, color="#4C72B0", capsize=3, label="score ± 95% CI")
    ax.scatter(chance, ys, marker="|", s=300, color="#C44E52", zorder=3, label="chance")
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("benchmark scores", fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


__all__ = ["run_benchmarks", "benchmark_model", "flat_metrics", "reported_scores", "table_rows", "RESULTS", "TABLE", "PLOT", "SAMPLES_DIR"]
