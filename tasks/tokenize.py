"""The tokenize stage on Prefect: a process pool in one task, or a Prefect task per shard on Dask.

    lmcore run tokenize                                   # tokenize.runner: local (the default)
    lmcore run tokenize --set tokenize.runner=dask        # a local Dask cluster of tokenize.workers processes
    lmcore run tokenize --set tokenize.runner=dask --set tokenize.dask_address=tcp://scheduler:8786

Both runners call the same `lmcore.data.tokenize` steps (plan, encode_shard per slice, finish), so the
shards are byte-identical whichever runs them; a re-run after a failure re-uses finished slices.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lmcore.config import TokenizeConfig
from lmcore.data.tokenize import ShardJob, encode_shard, finish_tokenize, plan_tokenize, tokenize
from lmcore.io import sha256_file
from lmcore.paths import MANIFEST
from tasks.context import StageContext, logger, section
from tasks.tracking import TAG_TOKENS_MANIFEST_SHA


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize_local_task(cfg: TokenizeConfig, clean_dir: Path, out_dir: Path, seed: int) -> dict:
    return tokenize(cfg, clean_dir, out_dir, seed)


@task(name="tokenize-shard", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def tokenize_shard_task(job: ShardJob) -> dict:
    return encode_shard(job)


@flow(name="lmcore-tokenize-dask", validate_parameters=False)
def tokenize_dask_flow(cfg: TokenizeConfig, clean_dir: str, out_dir: str, seed: int) -> dict:
    """Plan here, encode every pending slice as its own task on the flow's (Dask) task runner, finish here."""
    plan = plan_tokenize(cfg, clean_dir, out_dir, seed)
    futures = tokenize_shard_task.map(plan.pending)
    records = [f.result() for f in futures]
    manifest = finish_tokenize(plan, records)
    return {**manifest, "run": {"encoded_slices": len(plan.pending), "reused_slices": len(plan.reused), "runner": "dask"}}


def dask_task_runner(cfg: TokenizeConfig):
    """prefect-dask's runner: on the scheduler at `dask_address`, or on a local cluster of `workers` processes."""
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    n_workers = cfg.workers or os.cpu_count() or 1
    # One thread per worker process: tiktoken's encoding holds the GIL for part of its work.
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})


def run_tokenize(cfg: TokenizeConfig, clean_dir: str | Path, out_dir: str | Path, seed: int) -> dict:
    """The stage's work on the configured runner; returns the manifest with its "run" counts."""
    if cfg.runner == "dask":
        return tokenize_dask_flow.with_options(task_runner=dask_task_runner(cfg))(cfg, str(clean_dir), str(out_dir), seed)
    return tokenize_local_task(cfg, Path(clean_dir), Path(out_dir), seed)


def tokenize_stage(ctx: StageContext) -> dict:
    out = ctx.layout.tokens
    cfg = ctx.params.tokenize.model_copy(update={"ranks_file": ctx.ranks_file()})
    with ctx.tracking.run("tokenize") as run:
        run.log_params(section(ctx.params, "tokenize"))
        manifest = run_tokenize(cfg, ctx.layout.clean, out, ctx.params.seed)
        sha = sha256_file(out / MANIFEST)
        run.set_tags({TAG_TOKENS_MANIFEST_SHA: sha, "lmcore.tokenize.runner": cfg.runner})
        metrics = {f"{split}_{k}": v for split, d in manifest["splits"].items() for k, v in d.items()}
        metrics.update(
            shards=len(manifest["shards"]),
            slices=manifest["slices"],
            longest_document_tokens=manifest["longest_document_tokens"],
            reused_slices=manifest["run"]["reused_slices"],
        )
        run.log_metrics(metrics)
        run.log_artifact(out / MANIFEST)
    logger().info("tokenized (%s runner): %s", cfg.runner, metrics)
    return {**metrics, "tokens_manifest_sha256": sha}
