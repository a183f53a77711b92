"""The benchmark stage: models/base scored on HellaSwag, MMLU, TruthfulQA and ARC as lm-evaluation-harness scores
them (lmcore.harness), the benchmark files collected into data/benchmarks (mirror first), the scores, per-item
records, table and plot into reports/benchmark; the per-item records also go to the run as an MLflow table
(tables/benchmark_items/<task>.json, MMLU by category) to filter and sort. Its `Scores` feed the promotion gate: the orchestration layer
tags the registered version and moves `champion` only past the combined standard error (lmcore.promotion).
A primary metric whose task is not meaningful for the model (most of its prompts cut to fit the context:
lmcore.harness.run.coverage) has no value to compare: its `Scores` carry the note instead, and the gate compares
nothing (the version is `challenger`, or `champion` when there is none yet).

    lmcore run benchmark
    lmcore run benchmark --set benchmark.limit=50 --set benchmark.tasks=[hellaswag,arc_easy]

Before the scores decide anything, the sampled items are checked against what models/base saw (the corpus, and
what its pretrained base's card declares): reports/benchmark/decontamination.json (a DVC metric), the matches as an
MLflow table (tables/decontamination.json), and every score also on the clean part of the sample
(`<task>.<metric>_clean`). Scores are looked up in the evaluation cache (lmcore.harness.cache) first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from lmcore.data.collect import collect, mirror_from_env
from lmcore.harness.benchmarks import ACC, ACC_NORM
from lmcore.harness.cache import EvalCache, cache_root
from lmcore.harness.run import (
    PLOT,
    RESULTS,
    SAMPLES_DIR,
    SCORE_KEYS,
    TABLE,
    benchmark_model,
    family,
    flat_metrics,
    item_rows,
    item_tables,
    reported_scores,
    score_of,
    table_rows,
)
from lmcore.io import read_json, sha256_file
from lmcore.paths import BENCHMARK_DATA, CARD_FACTS, MANIFEST, METRICS, WEIGHTS, model_path, reports_path
from lmcore.promotion import Adaptation
from lmcore.stages import WEIGHTS_SHA, Artifact, Counts, ItemTable, Scores, StageContext, StageResult, Table, VersionTags
from lmcore.stages import _decontam
from lmcore.tokenizer import load_tokenizer

ITEMS_TABLES = "tables/benchmark_items"  # /<task>.json: one row per scored item (lmcore.harness.run.item_rows)


def adaptation(model_dir: Path) -> tuple[Adaptation | None, str | None]:
    """What pretraining bought, from the model card pretrain wrote: the held-out bits per byte of the corpus before
    and after on the same windows, with the paired standard error of the change, and the sha256 of the weights it
    started from. (None, None) for a model trained from random weights or without those numbers."""
    training = read_json(model_dir / CARD_FACTS).get("training", {}) if (model_dir / CARD_FACTS).is_file() else {}
    values = [training.get(k) for k in ("first_val_bpb", "final_val_bpb", "val_bpb_change_stderr")]
    if None in values or not training.get("start_weights_sha256"):
        return None, None
    return Adaptation(*values), training["start_weights_sha256"]


def version_scores(results: dict, primary: str) -> dict[str, float]:
    """What goes on a model version: the scores and standard errors of the reported tasks and groups (not the
    57 subjects, unless one is the primary metric)."""
    everything = flat_metrics(results)
    reported = {f"{name}.{key}" for name in reported_scores(results) for key in SCORE_KEYS}
    keep = reported | {primary, f"{primary}_stderr"}
    return {k: v for k, v in everything.items() if k in keep}


def decontaminate(ctx: StageContext, results: dict, samples_dir: Path, out_dir: Path) -> tuple[dict[str, float], dict[str, str], list[dict], dict]:
    """The sampled items (their prompts) checked against what models/base saw: the corpus and what its pretrained
    base's card declares (lmcore.stages._decontam). Returns the clean-part scores of the reported tasks (MMLU as a
    whole), the version tags, the table's rows and the per-benchmark counts."""
    benchmarks: dict[str, list[tuple[str, str]]] = {}
    for row in item_rows(samples_dir):
        benchmarks.setdefault(family(row["task"]), []).append((_decontam.item_id(row), row["prompt"]))
    report = _decontam.check(ctx, benchmarks, ("corpus", "base_card"), out_dir)
    reported = reported_scores(results)
    metrics = {name: [m for m in (ACC, ACC_NORM) if m in reported[name]] for name in benchmarks if name in reported}
    clean = _decontam.clean_scores(samples_dir, report, metrics, benchmark_of=family)
    return clean, _decontam.version_tags(report), _decontam.table_rows(report, ctx.root), _decontam.summary(report)


class HeldOut(TypedDict):
    before: float
    after: float
    stderr: float | None


class Summary(TypedDict):
    primary_metric: str
    primary_value: float | None  # None when not meaningful for the model
    primary_stderr: float | None
    primary_note: str | None  # why primary_value is None
    n_items: int
    items_per_s: float
    sample_sha256: str
    decontamination: dict[str, Counts] | None
    heldout_bpb: HeldOut | None


def run(ctx: StageContext) -> StageResult:
    cfg, model_dir = ctx.params.benchmark, ctx.inputs[model_path("base")]
    data_dir, out, weights = ctx.outputs[BENCHMARK_DATA], ctx.outputs[reports_path("benchmark")], model_dir / WEIGHTS
    collect(ctx.collect_config(cfg.sources), data_dir, mirror=mirror_from_env(), base_dir=ctx.root)
    enc = load_tokenizer(model_dir)
    results = benchmark_model(cfg, model_dir, data_dir, out, enc=enc, model_ref="models/base", tracker=ctx.tracker,
                              cache=EvalCache(cache_root(ctx.root)))
    clean, decontam_tags, decontam_rows, decontam = decontaminate(ctx, results, out / SAMPLES_DIR, out)
    primary = score_of(results, cfg.primary_metric)
    shown = primary["note"] if primary["value"] is None else f"{primary['value']:.4f}"
    adapted, started_from = adaptation(model_dir)
    return StageResult(
        summary={
            "primary_metric": cfg.primary_metric,
            "primary_value": primary["value"],  # None when not meaningful
            "primary_stderr": primary["stderr"],
            "primary_note": primary["note"],  # "n/a: 71% of 400 items cut to fit the 128-token context", else None
            "n_items": results["n_items"],
            "items_per_s": results["items_per_s"],
            "sample_sha256": results["sample_sha256"],
            "decontamination": decontam,
            # held-out bits per byte of the corpus before and after pretraining (the gate weighs it when the run
            # continued the champion), None from random weights
            "heldout_bpb": None if adapted is None else {"before": adapted.before, "after": adapted.after, "stderr": adapted.stderr},
        },
        artifacts=[
            Artifact(data_dir / MANIFEST, "data"),
            *(Artifact(out / name, "reports") for name in (RESULTS, METRICS, TABLE, PLOT, _decontam.REPORT)),
            Artifact(out / SAMPLES_DIR, f"reports/{SAMPLES_DIR}"),
        ],
        tags={WEIGHTS_SHA: sha256_file(weights)},
        scores=Scores(weights, {**version_scores(results, cfg.primary_metric), **clean}, cfg.primary_metric, results["sample_sha256"],
                      note=primary["note"], results_dir=out, results_artifact="reports", adaptation=adapted, started_from=started_from),
        scored=[VersionTags("registered_model", weights, decontam_tags)],
        tables=[Table("lmcore-benchmark", table_rows(reported_scores(results)), f"benchmark scores of models/base ({results['n_items']} items)")],
        item_tables=[ItemTable(f"{ITEMS_TABLES}/{part}.json", rows) for part, rows in item_tables(item_rows(out / SAMPLES_DIR)).items()]
                    + [ItemTable(_decontam.TABLE, decontam_rows)],
        log=f"{cfg.primary_metric} {shown} on {results['n_items']} items",
        warnings=[] if primary["meaningful"] else [
            f"{cfg.primary_metric} is not meaningful for models/base ({primary['note']}): not compared with the champion"
        ],
    )


def rescore(ctx: StageContext, model_dir: Path, out_dir: Path, model_ref: str) -> Scores:
    """Another model folder (the champion, downloaded) scored on the very items `run` scored."""
    cfg = ctx.params.benchmark
    enc = load_tokenizer(model_dir)
    results = benchmark_model(cfg, model_dir, ctx.outputs[BENCHMARK_DATA], out_dir, enc=enc, model_ref=model_ref, progress=False,
                              cache=EvalCache(cache_root(ctx.root)))
    return Scores(Path(model_dir) / WEIGHTS, version_scores(results, cfg.primary_metric), cfg.primary_metric, results["sample_sha256"],
                  results_dir=Path(out_dir))
