"""Decontamination in a gating stage: before a benchmark decides a promotion, every training text the scored model
saw is checked against the benchmark's items (lmcore.harness.decontam: 13-grams of normalised words,
lm-evaluation-harness's method), and the scores are also given on the clean part of the sample.

    report = check(ctx, {"ifeval": [("ifeval/<doc_id>", prompt), ...]}, ("corpus", "sft", "dpo", "base_card"), out_dir)
    clean = clean_scores(samples_dir, report, metrics={"ifeval": ["prompt_level_loose_acc", ...]})

What a stage keeps (out_dir): decontamination.json (a DVC metric: per benchmark its items, contaminated and clean
counts, per source and benchmark the contaminated count; the matches), and the rows of `table_rows` as an MLflow
table (item, benchmark, matching n-gram, source, file and line). Version tags `decontam.<benchmark>.<source>` carry
the counts into the model card.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lmcore.harness.decontam import Report, benchmark_ngrams, clean_ids, scan
from lmcore.harness.metrics import mean_stderr
from lmcore.io import jsonl_objects, write_json
from lmcore.paths import BASE_SOURCE, CARD, CLEAN, DOCUMENTS, finetune_data_path
from lmcore.stages import StageContext

REPORT = "decontamination.json"
TABLE = "tables/decontamination.json"  # the stage run's MLflow table of matches
CARD_FILES = (CARD, "README.md")  # what a base model folder may carry of its card


def training_sources(ctx: StageContext, names: Iterable[str]) -> dict[str, list[Path]]:
    """The training files of each named source, as far as this project holds them:
    corpus (data/clean/documents.jsonl), sft, dpo (their train splits) and base_card (the card a pretrained base
    came with: what it declares of its training data), each from the stage's declared deps. A source with no file
    here has none."""
    where = {
        "corpus": lambda: [ctx.inputs[CLEAN] / DOCUMENTS],
        "sft": lambda: [ctx.inputs[finetune_data_path("instruct")] / "splits" / "train.jsonl"],
        "dpo": lambda: [ctx.inputs[finetune_data_path("dpo")] / "splits" / "train.jsonl"],
        "base_card": lambda: [ctx.inputs[BASE_SOURCE] / f for f in CARD_FILES],
    }
    return {name: [p for p in where[name]() if p.is_file()] for name in names}


def check(ctx: StageContext, benchmarks: dict[str, list[tuple[str, str]]], sources: Iterable[str], out_dir: Path) -> Report:
    """Scan the named training sources for the items of `benchmarks` ({name: [(item id, text)]}); write
    out_dir/decontamination.json."""
    index = None
    for name, items in benchmarks.items():
        index = benchmark_ngrams(items, benchmark=name) if index is None else index.add(name, items)
    report = scan(index, training_sources(ctx, sources))
    data = report.to_dict()
    data["matches"] = [_relative(m, ctx.root) for m in data["matches"]]
    for stats in data["sources"].values():  # a DVC metric: the same inputs give the same bytes (the log has the timing)
        stats.pop("seconds", None)
    write_json(Path(out_dir) / REPORT, data)
    return report


def _relative(row: dict, root: Path) -> dict:
    """A match with its file relative to the project root (as dvc.yaml names files), when inside it."""
    path = Path(row["file"])
    return {**row, "file": path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)}


def version_tags(report: Report) -> dict[str, str]:
    """decontam.<benchmark>.<source>: contaminated items, for the scored versions' cards."""
    return {f"decontam.{b}.{s}": str(n) for s, per in report.counts().items() for b, n in per.items()}


def table_rows(report: Report, root: Path) -> list[dict]:
    """One row per contaminated item and source: item, benchmark, ngram, source, file (relative to the project
    root), line (the MLflow table)."""
    return [{k: r[k] for k in ("item", "benchmark", "ngram", "source", "file", "line")} for r in
            (_relative(m, Path(root)) for m in report.rows())]


def item_id(record: dict) -> str:
    """A per-item record's id in the decontamination report: "<task>/<doc_id>" (unique across MMLU's subjects)."""
    return f"{record['task']}/{record['doc_id']}"


def clean_scores(samples_dir: Path, report: Report, metrics: dict[str, list[str]], benchmark_of=lambda task: task,
                 sources: Iterable[str] | None = None) -> dict[str, float]:
    """The scores on the clean part of the sample: per benchmark and metric ({benchmark: [metric]}), the mean and
    standard error over its items found in no source, as "<benchmark>.<metric>_clean" (and "_clean_stderr"), plus
    "<benchmark>.n_clean". Records are every samples/*.jsonl's, with a task, a doc_id (`item_id`) and each metric's
    value; benchmark_of(task): the benchmark a record's task was indexed under (MMLU's subjects: mmlu, their items
    pooled, which is the size-weighted mean of the group); sources: the training sources the scored model saw
    (default: every one scanned)."""
    by_benchmark: dict[str, list[dict]] = {}
    for path in sorted(Path(samples_dir).glob("*.jsonl")):
        for _, r in jsonl_objects(path.read_text(encoding="utf-8"), path):
            by_benchmark.setdefault(benchmark_of(r["task"]), []).append(r)
    out: dict[str, float] = {}
    for task, names in metrics.items():
        if task not in report.items or task not in by_benchmark:
            continue
        keep = clean_ids(report, task, sources)
        records = [r for r in by_benchmark[task] if item_id(r) in keep]
        out[f"{task}.n_clean"] = float(len(records))
        for metric in names:
            # a list per item (IFEval's instruction-level verdicts) is pooled, as lm-eval pools it, with no stderr
            pooled = any(isinstance(r.get(metric), list) for r in records)
            values = [float(v) for r in records if r.get(metric) is not None
                      for v in (r[metric] if isinstance(r[metric], list) else [r[metric]])]
            if values:
                out[f"{task}.{metric}_clean"] = sum(values) / len(values)
                stderr = None if pooled else mean_stderr(values)
                if stderr is not None:
                    out[f"{task}.{metric}_clean_stderr"] = stderr
    return out


def summary(report: Report) -> dict[str, dict[str, int]]:
    """{benchmark: {"items", "contaminated", "clean"}}: what the stage's summary and log show."""
    return json.loads(json.dumps(report.to_dict()["benchmarks"]))
