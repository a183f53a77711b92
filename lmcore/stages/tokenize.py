"""The tokenize stage: data/clean/documents.jsonl into train/val Arrow token shards and their manifest.

    lmcore run tokenize
    lmcore run tokenize --set tokenize.runner=dask        # a Prefect task per shard on a local Dask cluster
    lmcore run tokenize --set tokenize.runner=dask --set tokenize.dask_address=tcp://scheduler:8786

The tokenizer is `tokenize.tokenizer`: `trained` (params.yaml's default) is the train_tokenizer stage's
(models/tokenizer); `auto` the base model's (models/base_model) when the run starts from a pretrained base, else
GPT-2's. Its files go into data/tokens beside the shards, and the manifest records its
name and sha256, so pretraining can refuse a model whose tokenizer is another.

The shards are byte-identical whichever runs the slices: the stage's own process pool, or the orchestration
layer's `ctx.map` (prefect-dask under `tokenize.runner: dask`).
"""

from __future__ import annotations

from typing import TypedDict

from lmcore.data.tokenize import tokenize
from lmcore.io import sha256_file
from lmcore.paths import CLEAN, MANIFEST, TOKENIZER, TOKENS
from lmcore.stages import TOKENS_MANIFEST_SHA, Artifact, StageContext, StageResult, base_dir
from lmcore.tokenizer import configured_ranks_file, resolve_tokenizer


class Summary(TypedDict):
    train_documents: int
    train_tokens: int
    val_documents: int
    val_tokens: int
    shards: int
    slices: int
    longest_document_tokens: int
    reused_slices: int
    tokens_manifest_sha256: str
    tokenizer: str


def run(ctx: StageContext) -> StageResult:
    cfg, tokens = ctx.params.tokenize, ctx.outputs[TOKENS]
    tok = resolve_tokenizer(cfg.tokenizer, root=ctx.root, ranks_file=configured_ranks_file(cfg.ranks_file, ctx.root),
                            base_dir=base_dir(ctx), trained_dir=ctx.inputs[TOKENIZER])
    manifest = tokenize(cfg, ctx.inputs[CLEAN], tokens, ctx.seed, tokenizer=tok, map_jobs=ctx.map)
    sha = sha256_file(tokens / MANIFEST)
    metrics = {f"{split}_{k}": v for split, d in manifest["splits"].items() for k, v in d.items()}
    metrics.update(
        shards=len(manifest["shards"]),
        slices=manifest["slices"],
        longest_document_tokens=manifest["longest_document_tokens"],
        reused_slices=manifest["run"]["reused_slices"],
    )
    return StageResult(
        summary={**metrics, "tokens_manifest_sha256": sha, "tokenizer": tok.name},
        metrics=metrics,
        artifacts=[Artifact(tokens / MANIFEST)],
        tags={TOKENS_MANIFEST_SHA: sha, "tokenize.runner": cfg.runner, "tokenizer": tok.name,
              "tokenizer_sha256": tok.sha256},
        log=f"tokenized with {tok.name} ({cfg.runner} runner): {metrics}",
    )
