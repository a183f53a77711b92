"""The evaluation stages after pretraining: benchmarks (with eval-gated promotion) and LLM-as-judge.

benchmark: collect the benchmark files (mirror first), score models/base as lm-evaluation-harness would, log the
scores, per-item records, table and plot to MLflow and a Prefect table artifact, tag the registered version with
its scores, then move `champion` to it only if it beats the champion by more than the combined standard error
(else it becomes `challenger`). A champion scored on other items is re-scored on these first.

judge: score the instruction models' test responses with an OpenAI-compatible judge; skipped, with the reason
written and logged, when no endpoint is configured.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from lmcore.config import CollectConfig
from lmcore.data.collect import collect, mirror_from_env
from lmcore.harness.run import PLOT, RESULTS, SAMPLES_DIR, TABLE, benchmark_model, flat_metrics, reported_scores, table_rows
from lmcore.io import atomic_dir, sha256_file, write_json
from lmcore.judge import judge_responses, judge_skip_reason
from lmcore.paths import JUDGE_SCORES, MANIFEST, METRICS, SUMMARY, TEST_RESPONSES, WEIGHTS
from lmcore.tokenizer import get_encoding
from tasks.context import StageContext, logger, section
from tasks.registry import (
    TAG_BENCH_SAMPLE,
    champion_version,
    download_model_dir,
    find_version,
    promote,
    registry_lock,
    tag_scores,
)
from tasks.tracking import TAG_WEIGHTS_SHA

PROMOTION = "promotion.json"  # the decision, as an MLflow artifact of the benchmark run


SCORE_KEYS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def _tagged_scores(results: dict, primary: str) -> dict[str, float]:
    """What goes on a model version: the scores and standard errors of the reported tasks and groups (not the
    57 subjects, unless one is the primary metric)."""
    everything = flat_metrics(results)
    reported = {f"{name}.{key}" for name in reported_scores(results) for key in SCORE_KEYS}
    keep = reported | {primary, f"{primary}_stderr"}
    return {k: v for k, v in everything.items() if k in keep}


@task(name="benchmark", cache_policy=NO_CACHE)
def benchmark_task(ctx: StageContext) -> dict:
    cfg, layout = ctx.params.benchmark, ctx.layout
    data_dir, out = layout.benchmark_data, layout.reports("benchmark")
    enc = get_encoding(ctx.params.tokenize.encoding, ctx.ranks_file())
    with ctx.tracking.run("benchmark") as run:
        run.log_params(section(ctx.params, "benchmark"))
        weights_sha = sha256_file(layout.base_model / WEIGHTS)
        run.set_tags({TAG_WEIGHTS_SHA: weights_sha})
        collect(CollectConfig(sources=cfg.sources, retries=ctx.params.collect.retries, timeout_s=ctx.params.collect.timeout_s),
                data_dir, mirror=mirror_from_env(), base_dir=ctx.root)
        run.log_artifact(data_dir / MANIFEST, "data")
        results = benchmark_model(cfg, layout.base_model, data_dir, out, enc=enc, model_ref="models/base", tracker=run)
        for name in (RESULTS, METRICS, TABLE, PLOT):
            run.log_artifact(out / name, "reports")
        run.log_artifact(out / SAMPLES_DIR, f"reports/{SAMPLES_DIR}")
        run.set_tags({TAG_BENCH_SAMPLE: results["sample_sha256"]})
        create_table_artifact(table_rows(reported_scores(results)), key="lmcore-benchmark", description=f"benchmark scores of models/base ({results['n_items']} items)")

        name = ctx.params.tracking.registered_model
        version = find_version(ctx.tracking, name, weights_sha)
        decision = None
        if version is None:
            logger().warning("models/base (sha256 %s) is not registered as %s: no promotion", weights_sha[:12], name)
        else:
            tag_scores(ctx.tracking, name, version, _tagged_scores(results, cfg.primary_metric), results["sample_sha256"])
            with registry_lock(name):  # another run may be promoting a version of `name` right now
                _rescore_champion_if_needed(ctx, name, version, results["sample_sha256"], enc)
                decision = promote(ctx.tracking, name, version, cfg.primary_metric)
            run.set_tags({f"promotion.{k}": str(v) for k, v in decision.items() if isinstance(v, str)})
            run.log_metrics({f"promotion.{k}": v for k, v in decision.items() if isinstance(v, float)})
            run.client.log_text(run.run_id, json.dumps(decision, indent=2), PROMOTION)
            logger().info("%s v%s: %s (%s)", name, version, decision["alias"], decision["reason"])
    primary = flat_metrics(results)
    return {
        "primary_metric": cfg.primary_metric,
        "primary_value": primary[cfg.primary_metric],
        "primary_stderr": primary.get(f"{cfg.primary_metric}_stderr"),
        "n_items": results["n_items"],
        "items_per_s": results["items_per_s"],
        "sample_sha256": results["sample_sha256"],
        "model_version": version,
        "promotion": decision,
        "run_id": run.run_id,
    }


def _rescore_champion_if_needed(ctx: StageContext, name: str, version: str, sample_sha256: str, enc) -> None:
    """A champion scored on other items (another task list, limit or seed) is scored on this sample first,
    so that the promotion compares like with like."""
    champion = champion_version(ctx.tracking, name)
    if champion is None or str(champion.version) == str(version) or champion.tags.get(TAG_BENCH_SAMPLE) == sample_sha256:
        return
    cfg = ctx.params.benchmark
    logger().info("champion %s v%s was scored on other items: scoring it on this sample", name, champion.version)
    with tempfile.TemporaryDirectory(prefix="lmcore-champion-") as tmp:
        model_dir = download_model_dir(f"models:/{name}/{champion.version}", ctx.tracking.uri, Path(tmp) / "model")
        results = benchmark_model(cfg, model_dir, ctx.layout.benchmark_data, Path(tmp) / "scores", enc=enc,
                                  model_ref=f"models:/{name}/{champion.version}", progress=False)
    tag_scores(ctx.tracking, name, str(champion.version), _tagged_scores(results, cfg.primary_metric), results["sample_sha256"])


@task(name="judge", cache_policy=NO_CACHE)
def judge_task(ctx: StageContext) -> dict:
    cfg, layout = ctx.params.judge, ctx.layout
    out = layout.reports("judge")
    with ctx.tracking.run("judge") as run:
        run.log_params(section(ctx.params, "judge"))
        reason = judge_skip_reason(cfg)
        if reason is not None:
            logger().warning("judge skipped: %s", reason)
            with atomic_dir(out) as tmp:
                write_json(tmp / SUMMARY, {"skipped": True, "reason": reason})
            run.set_tags({"lmcore.judge": "skipped", "lmcore.judge_skip_reason": reason})
            run.log_artifact(out / SUMMARY, "reports")
            return {"skipped": True, "reason": reason}

        api_key = os.environ.get(cfg.api_key_env) or None
        scored: dict[str, dict] = {}
        with atomic_dir(out) as tmp:
            for name in cfg.responses:
                scored[name] = judge_responses(cfg, layout.reports(name) / TEST_RESPONSES, tmp / name, api_key=api_key)
            summary = {
                "skipped": False,
                "judge": next(iter(scored.values()))["judge"],
                **{name: {k: v for k, v in m.items() if k != "judge"} for name, m in scored.items()},
            }
            write_json(tmp / SUMMARY, summary)
        run.set_tags({"lmcore.judge": "scored", "lmcore.judge_model": cfg.model})
        run.log_metrics({f"{name}.{k}": v for name, m in scored.items() for k, v in m.items() if isinstance(v, (int, float)) and v is not None})
        run.log_artifact(out / SUMMARY, "reports")
        for name in scored:
            run.log_artifact(out / name / JUDGE_SCORES, f"reports/{name}")
        _tag_judged_versions(ctx, scored)
        create_table_artifact(
            [{"model": name, "mean_score": m["mean_score"], "stderr": m["stderr"], "scored": m["n_scored"], "unparsed": m["n_unparsed"]}
             for name, m in scored.items()],
            key="lmcore-judge",
            description=f"LLM-as-judge scores (0-100) by {cfg.model}",
        )
    return {"skipped": False, "mean_scores": {name: m["mean_score"] for name, m in scored.items()}}


def _tag_judged_versions(ctx: StageContext, scored: dict[str, dict]) -> None:
    """judge.mean_score on the registered versions whose weights produced the judged responses."""
    name = ctx.params.tracking.instruct_model
    client = ctx.tracking.client()
    for which, metrics in scored.items():
        weights = ctx.layout.model(which) / WEIGHTS
        if not weights.is_file():  # responses judged without their model folder: nothing to tag
            continue
        version = find_version(ctx.tracking, name, sha256_file(weights))
        if version is not None and metrics["mean_score"] is not None:
            client.set_model_version_tag(name, version, "judge.mean_score", f"{metrics['mean_score']:.4f}")
            client.set_model_version_tag(name, version, "judge.model", str(metrics["judge"]["model"]))


