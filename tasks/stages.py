"""One Prefect task per lifecycle stage. Each resolves paths, calls one lmcore function, and logs.

A task takes a `StageContext` (project root, validated params, where MLflow runs go) and returns a
small dict; the stage's real outputs are the files it writes under the project root, at the paths
dvc.yaml names (`lmcore.paths.Layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from lmcore.config import CollectConfig, Source
from lmcore.data.collect import collect, mirror_from_env
from lmcore.data.preprocess import FILTERS_PLOT, preprocess
from lmcore.evaluation import evaluate
from lmcore.finetune.classifier import PREDICTIONS, finetune_classifier, prepare_classification
from lmcore.finetune.dpo import PREFERENCE_FIELDS, train_dpo
from lmcore.finetune.instruct import finetune_instruct, prepare_instructions
from lmcore.io import sha256_file
from lmcore.paths import (
    ADAPTER,
    ADAPTER_CONFIG,
    CONFUSION_PLOT,
    LOSS_PLOT,
    MANIFEST,
    METRICS,
    MODEL_CONFIG,
    RESOLVED_PARAMS,
    SAMPLES,
    STATS,
    SUMMARY,
    TEST_RESPONSES,
    TRAIN_LOSS,
    VAL_LOSS,
    WEIGHTS,
    Layout,
)
from lmcore.tokenizer import get_encoding
from lmcore.training import PRETRAIN_CHECKPOINTS, pretrain
from tasks.context import StageContext, logger, section
from tasks.evaluation import benchmark_task, judge_task
from tasks.lineage import FINETUNE_MANIFEST_DIR, RAW_MANIFEST_DIR, TOKENS_MANIFEST_DIR
from tasks.tokenize import tokenize_stage
from tasks.registry import find_version, log_and_register
from tasks.tracking import (
    TAG_BASE_WEIGHTS_SHA,
    TAG_FINETUNE,
    TAG_FINETUNE_MANIFEST_SHA,
    TAG_PARAMS_SHA,
    TAG_RAW_MANIFEST_SHA,
    TAG_TOKENS_MANIFEST_SHA,
    TAG_WEIGHTS_SHA,
)

STAGES = (
    "collect", "preprocess", "tokenize", "pretrain", "evaluate", "benchmark",
    "finetune_classifier", "finetune_instruct", "dpo", "judge",
)


@task(name="collect", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def collect_task(ctx: StageContext) -> dict:
    out = ctx.layout.raw
    with ctx.tracking.run("collect") as run:
        run.log_params(section(ctx.params, "collect"))
        manifest = collect(ctx.params.collect, out, mirror=mirror_from_env(), base_dir=ctx.root)
        sha = sha256_file(out / MANIFEST)
        sources = manifest["sources"]
        metrics = {
            "sources": len(sources),
            "files": sum(len(s["files"]) for s in sources),
            "bytes": sum(s["bytes"] for s in sources),
            "skipped_files": sum(len(s["skipped_files"]) for s in sources),
        }
        run.set_tags({TAG_RAW_MANIFEST_SHA: sha})
        run.log_metrics(metrics)
        run.log_artifact(out / MANIFEST)
    origins = ", ".join(f"{s['name']} ({s['origin']}, {len(s['files'])} file(s))" for s in sources)
    logger().info("collected %d bytes: %s", metrics["bytes"], origins)
    if metrics["skipped_files"]:
        logger().warning("skipped %d file(s); the reasons are in %s", metrics["skipped_files"], out / MANIFEST)
    return {"sources": metrics["sources"], "files": metrics["files"], "bytes": metrics["bytes"],
            "raw_manifest_sha256": sha}


@task(name="preprocess", cache_policy=NO_CACHE)
def preprocess_task(ctx: StageContext) -> dict:
    out = ctx.layout.clean
    with ctx.tracking.run("preprocess") as run:
        run.log_params(section(ctx.params, "preprocess"))
        if (ctx.layout.raw / MANIFEST).is_file():  # lineage: the collected data this run cleans
            run.set_tags({TAG_RAW_MANIFEST_SHA: sha256_file(ctx.layout.raw / MANIFEST)})
        stats = preprocess(ctx.params.preprocess, ctx.layout.raw, out)
        total = stats["total"]
        run.log_metrics(stats["metrics"])
        run.log_artifact(out / STATS)
        run.log_artifact(out / FILTERS_PLOT)
    logger().info(
        "preprocess kept %d of %d documents (%d of %d bytes)",
        total["documents_out"], total["documents_split"], total["bytes_out"], total["bytes_split"],
    )
    return {"documents": total["documents_out"], "bytes": total["bytes_out"]}


def _manifest_tags(run, manifests: dict[str, tuple[Path, str]]) -> dict[str, str]:
    """{tag: (data folder, artifact folder)} -> {tag: sha256 of the folder's manifest.json}, each manifest logged
    to the run under its artifact folder; a folder without a manifest is left out."""
    tags = {}
    for tag, (folder, artifact_dir) in manifests.items():
        if (folder / MANIFEST).is_file():
            tags[tag] = sha256_file(folder / MANIFEST)
            run.log_artifact(folder / MANIFEST, artifact_dir)
    run.set_tags(tags)
    return tags


def pretrain_checkpoints(ctx: StageContext) -> Path:
    """Training checkpoints of the pretrain stage (`pretrain.checkpoint_interval`, `pretrain.resume`): beside
    the model folders, outside the stage's DVC outputs (models/ is git-ignored)."""
    return ctx.layout.root / PRETRAIN_CHECKPOINTS


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(ctx: StageContext) -> dict:
    layout = ctx.layout
    with ctx.tracking.run("pretrain") as run:
        run.log_params(section(ctx.params, "pretrain"))
        # Lineage: the manifests of the data it trains on, as tags and artifacts (data/tokens/manifest.json,
        # data/raw/manifest.json), so a model version leads to its data from MLflow alone.
        data_tags = _manifest_tags(run, {TAG_TOKENS_MANIFEST_SHA: (layout.tokens, TOKENS_MANIFEST_DIR),
                                         TAG_RAW_MANIFEST_SHA: (layout.raw, RAW_MANIFEST_DIR)})
        run.set_tags({TAG_PARAMS_SHA: ctx.params.fingerprint()})
        summary = pretrain(
            ctx.params.pretrain,
            layout.tokens,
            layout.base_model,
            layout.pretrain_reports,
            seed=ctx.params.seed,
            params=ctx.params.to_dict(),
            tracker=run,
            checkpoint_dir=pretrain_checkpoints(ctx),
        )
        weights_sha = sha256_file(layout.base_model / WEIGHTS)
        run.set_tags({TAG_WEIGHTS_SHA: weights_sha})
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        for name in (LOSS_PLOT, TRAIN_LOSS, VAL_LOSS, SUMMARY):
            run.log_artifact(layout.pretrain_reports / name, "reports")
        for name in (MODEL_CONFIG, RESOLVED_PARAMS):
            run.log_artifact(layout.base_model / name, "checkpoint")
        version = log_and_register(
            ctx.tracking,
            run.run_id,
            layout.base_model,
            ctx.params.tracking.registered_model,
            ranks_file=ctx.ranks_file(),
            tags={
                TAG_WEIGHTS_SHA: weights_sha,
                TAG_PARAMS_SHA: ctx.params.fingerprint(),
                **data_tags,
            },
        )
    logger().info(
        "pretrained %s params: val loss %.3f -> %.3f; registered %s v%s",
        summary["n_params"], summary["first_val_loss"], summary["final_val_loss"],
        ctx.params.tracking.registered_model, version,
    )
    return {**summary, "run_id": run.run_id, "model_version": version, "weights_sha256": weights_sha}


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(ctx: StageContext) -> dict:
    layout = ctx.layout
    out = layout.evaluate_reports
    enc = get_encoding(ctx.params.tokenize.encoding, ctx.ranks_file())
    with ctx.tracking.run("evaluate") as run:
        run.log_params(section(ctx.params, "evaluate"))
        weights_sha = sha256_file(layout.base_model / WEIGHTS)
        run.set_tags({TAG_WEIGHTS_SHA: weights_sha})
        metrics = evaluate(
            ctx.params.evaluate, layout.base_model, layout.tokens, out, seed=ctx.params.seed, enc=enc, tracker=run
        )
        run.log_artifact(out / METRICS)
        run.log_artifact(out / SAMPLES)
        name = ctx.params.tracking.registered_model
        version = find_version(ctx.tracking, name, weights_sha)
        if version is not None:
            client = ctx.tracking.client()
            for key in ("val_loss", "perplexity"):
                client.set_model_version_tag(name, version, f"eval.{key}", f"{metrics[key]:.6f}")
    logger().info("val loss %.4f, perplexity %.2f", metrics["val_loss"], metrics["perplexity"])
    return {**metrics, "model_version": version, "samples": len(ctx.params.evaluate.prompts)}


def _finetune(
    ctx: StageContext,
    stage: str,
    *,
    start_dir: Path,
    sources: list[Source],
    prepare: Callable[[Path, Path], dict],
    train: Callable[..., dict],
    report_files: tuple[str, ...],
    registered: str,
    kind: str = "generator",
    aliases: tuple[str, ...] = (),
    eval_tags: Callable[[dict], dict[str, str]],
) -> tuple[dict, str, str, str]:
    """What every fine-tuning task does: collect its data, prepare splits, train from `start_dir`, log, register.

    prepare(raw_dir, splits_dir) -> stats; train(splits_dir, model_dir, reports_dir, enc, tracker) -> summary.
    Returns: (summary, MLflow run id, registered version, weights sha256).
    """
    name = {"finetune_classifier": "classifier", "finetune_instruct": "instruct", "dpo": "dpo"}[stage]
    layout = ctx.layout
    data_dir, model_dir, reports_dir = layout.finetune_data(name), layout.model(name), layout.reports(name)
    enc = get_encoding(ctx.params.tokenize.encoding, ctx.ranks_file())
    with ctx.tracking.run(stage, tags={TAG_FINETUNE: name}) as run:
        run.log_params(section(ctx.params, stage))
        base_sha = sha256_file(start_dir / WEIGHTS)
        run.set_tags({TAG_BASE_WEIGHTS_SHA: base_sha, TAG_PARAMS_SHA: ctx.params.fingerprint()})
        cfg = CollectConfig(sources=sources, retries=ctx.params.collect.retries, timeout_s=ctx.params.collect.timeout_s)
        collect(cfg, data_dir / "raw", mirror=mirror_from_env(), base_dir=ctx.root)
        data_tags = _manifest_tags(run, {TAG_FINETUNE_MANIFEST_SHA: (data_dir / "raw", FINETUNE_MANIFEST_DIR)})
        stats = prepare(data_dir / "raw", data_dir / "splits")
        _log_data_stats(run, stats, data_dir / "splits")
        summary = train(data_dir / "splits", model_dir, reports_dir, enc, run)

        for file in report_files:
            run.log_artifact(reports_dir / file, "reports")
        for file in (MODEL_CONFIG, ADAPTER_CONFIG, ADAPTER):
            if (model_dir / file).is_file():
                run.log_artifact(model_dir / file, "checkpoint")
        weights_sha = sha256_file(model_dir / WEIGHTS)
        run.set_tags({TAG_WEIGHTS_SHA: weights_sha})
        tags = {
            TAG_WEIGHTS_SHA: weights_sha,
            TAG_BASE_WEIGHTS_SHA: base_sha,
            TAG_PARAMS_SHA: ctx.params.fingerprint(),
            TAG_FINETUNE: name,
            **data_tags,
            **eval_tags(summary),
        }
        version = log_and_register(
            ctx.tracking, run.run_id, model_dir, registered, ranks_file=ctx.ranks_file(), kind=kind, aliases=aliases, tags=tags
        )
    return summary, run.run_id, version, weights_sha


def _log_data_stats(run, stats: dict, splits_dir: Path) -> None:
    read = stats["read"]
    files = read.get("files", [read])
    run.log_metrics(
        {
            "records_read": sum(f["read"] for f in files),
            "records_bad": sum(f["bad"] for f in files),
            **{f"{name}_examples": (sum(v.values()) if isinstance(v, dict) else v) for name, v in stats["splits"].items()},
        }
    )
    run.log_artifact(splits_dir / STATS, "data")


CURVES = (TRAIN_LOSS, VAL_LOSS, LOSS_PLOT, METRICS, SUMMARY)


@task(name="finetune_classifier", cache_policy=NO_CACHE)
def finetune_classifier_task(ctx: StageContext) -> dict:
    cfg, seed, params = ctx.params.finetune_classifier, ctx.params.seed, ctx.params.to_dict()
    summary, run_id, version, weights_sha = _finetune(
        ctx,
        "finetune_classifier",
        start_dir=ctx.layout.base_model,
        sources=cfg.sources,
        prepare=lambda raw, splits: prepare_classification(cfg, raw, splits, seed=seed),
        train=lambda splits, model, reports, enc, run: finetune_classifier(
            cfg, ctx.layout.base_model, splits, model, reports, seed=seed, enc=enc, params=params, tracker=run
        ),
        report_files=CURVES + (CONFUSION_PLOT, PREDICTIONS),
        registered=ctx.params.tracking.classifier_model,
        kind="classifier",
        eval_tags=lambda s: {
            "labels": ",".join(cfg.labels),
            "eval.test_accuracy": f"{s['metrics']['test']['accuracy']:.6f}",
            "eval.test_f1": f"{s['metrics']['test']['f1']:.6f}",
        },
    )
    test = summary["metrics"]["test"]
    logger().info(
        "classifier: test accuracy %.3f (majority baseline %.3f), F1 %.3f; registered %s v%s",
        test["accuracy"], test["majority_baseline_accuracy"], test["f1"], ctx.params.tracking.classifier_model, version,
    )
    return {
        "test_accuracy": test["accuracy"],
        "test_f1": test["f1"],
        "val_accuracy": summary["metrics"]["val"]["accuracy"],
        "majority_baseline_accuracy": test["majority_baseline_accuracy"],
        "trainable_params": summary["trainable_params"],
        "run_id": run_id,
        "model_version": version,
        "weights_sha256": weights_sha,
    }


@task(name="finetune_instruct", cache_policy=NO_CACHE)
def finetune_instruct_task(ctx: StageContext) -> dict:
    cfg, seed, params = ctx.params.finetune_instruct, ctx.params.seed, ctx.params.to_dict()
    summary, run_id, version, weights_sha = _finetune(
        ctx,
        "finetune_instruct",
        start_dir=ctx.layout.base_model,
        sources=[cfg.source],
        prepare=lambda raw, splits: prepare_instructions(cfg, raw, splits, seed=seed),
        train=lambda splits, model, reports, enc, run: finetune_instruct(
            cfg, ctx.layout.base_model, splits, model, reports, seed=seed, enc=enc, params=params, tracker=run
        ),
        report_files=CURVES + (TEST_RESPONSES,),
        registered=ctx.params.tracking.instruct_model,
        aliases=("sft",),
        eval_tags=lambda s: {
            "template": cfg.template,
            "eval.val_loss": f"{s['final_val_loss']:.6f}",
            "eval.test_loss": f"{s['test_loss']:.6f}",
        },
    )
    logger().info(
        "instruct: val loss %.3f -> %.3f, test loss %.3f; registered %s v%s (@sft)",
        summary["first_val_loss"], summary["final_val_loss"], summary["test_loss"], ctx.params.tracking.instruct_model, version,
    )
    keys = ("first_val_loss", "final_val_loss", "test_loss", "trainable_params", "test_responses")
    return {**{k: summary[k] for k in keys}, "run_id": run_id, "model_version": version, "weights_sha256": weights_sha}


@task(name="dpo", cache_policy=NO_CACHE)
def dpo_task(ctx: StageContext) -> dict:
    cfg, seed, params = ctx.params.dpo, ctx.params.seed, ctx.params.to_dict()
    start_dir = ctx.layout.model("instruct")
    # A new version of the instruction model (same task and interface), told apart by alias and tag.
    summary, run_id, version, weights_sha = _finetune(
        ctx,
        "dpo",
        start_dir=start_dir,
        sources=[cfg.source],
        prepare=lambda raw, splits: prepare_instructions(cfg, raw, splits, seed=seed, fields=PREFERENCE_FIELDS),
        train=lambda splits, model, reports, enc, run: train_dpo(
            cfg, start_dir, splits, model, reports, seed=seed, enc=enc, params=params, tracker=run
        ),
        report_files=CURVES + (TEST_RESPONSES,),
        registered=ctx.params.tracking.instruct_model,
        aliases=("dpo",),
        eval_tags=lambda s: {"template": s["template"], "eval.val_reward_margin": f"{s['final_val_reward_margin']:.6f}"},
    )
    logger().info(
        "dpo: val loss %.4f -> %.4f, reward margin %.4f -> %.4f; registered %s v%s (@dpo)",
        summary["first_val_loss"], summary["final_val_loss"], summary["first_val_reward_margin"],
        summary["final_val_reward_margin"], ctx.params.tracking.instruct_model, version,
    )
    keys = ("first_val_loss", "final_val_loss", "first_val_reward_margin", "final_val_reward_margin", "final_val_reward_accuracy", "trainable_params")
    return {**{k: summary[k] for k in keys}, "run_id": run_id, "model_version": version, "weights_sha256": weights_sha}


TASKS = {
    "collect": collect_task,
    "preprocess": preprocess_task,
    "tokenize": tokenize_stage,
    "pretrain": pretrain_task,
    "evaluate": evaluate_task,
    "finetune_classifier": finetune_classifier_task,
    "finetune_instruct": finetune_instruct_task,
    "dpo": dpo_task,
    "benchmark": benchmark_task,
    "judge": judge_task,
}

__all__ = ["StageContext", "STAGES", "TASKS"]
