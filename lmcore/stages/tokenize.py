"""The tokenize stage: data/clean/documents.jsonl into train/val Arrow token shards and their manifest.

    lmcore run tokenize
    lmcore run tokenize --set tokenize.runner=dask        # a Prefect task per shard on a local Dask cluster
    lmcore run tokenize --set tokenize.runner=dask --set tokenize.dask_address=tcp://scheduler:8786

The shards are byte-identical whichever runs the slices: the stage's own process pool, or the orchestration
layer's `ctx.map` (prefect-dask under `tokenize.runner: dask`).
"""

from __future__ import annotations

from lmcore.data.tokenize import tokenize
from lmcore.io import sha256_file
from lmcore.paths import MANIFEST
from lmcore.stages import TOKENS_MANIFEST_SHA, Artifact, StageContext, StageResult
from lmcore.tokenizer import configured_ranks_file


def run(ctx: StageContext) -> StageResult:
    layout = ctx.layout
    cfg = ctx.params.tokenize
    cfg = cfg.model_copy(update={"ranks_file": configured_ranks_file(cfg.ranks_file, ctx.root)})
    manifest = tokenize(cfg, layout.clean, layout.tokens, ctx.seed, map_jobs=ctx.map)
    sha = sha256_file(layout.tokens / MANIFEST)
    metrics = {f"{split}_{k}": v for split, d in manifest["splits"].items() for k, v in d.items()}
    metrics.update(
        shards=len(manifest["shards"]),
        slices=manifest["slices"],
        longest_document_tokens=manifest["longest_document_tokens"],
        reused_slices=manifest["run"]["reused_slices"],
    )
    return StageResult(
        summary={**metrics, "tokens_manifest_sha256": sha},
        metrics=metrics,
        artifacts=[Artifact(layout.tokens / MANIFEST)],
        tags={TOKENS_MANIFEST_SHA: sha, "tokenize.runner": cfg.runner},
        log=f"tokenized ({cfg.runner} runner): {metrics}",
    )
