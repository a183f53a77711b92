"""The pretrain stage: a decoder trained on data/tokens into models/base, from random weights or (with
`pretrain.init: base`) continuing the base model of models/base_model, with its loss curves in reports/pretrain;
the orchestration layer registers it as `tracking.registered_model`. With init base and max_steps 0 the base is
taken as it is (scored on the validation split), so the fine-tuning stages start from it directly.

    lmcore run pretrain
    lmcore run pretrain --set pretrain.max_steps=50 --set pretrain.checkpoint_interval=10
"""

from __future__ import annotations

from lmcore.io import sha256_file
from lmcore.paths import BASE_MANIFEST, LOSS_PLOT, MODEL_CONFIG, RESOLVED_PARAMS, SUMMARY, TRAIN_LOSS, VAL_LOSS
from lmcore.pretrain import pretrain
from lmcore.stages import (
    BASE_MANIFEST_DIR,
    BASE_MANIFEST_SHA,
    RAW_MANIFEST_DIR,
    RAW_MANIFEST_SHA,
    TOKENS_MANIFEST_DIR,
    TOKENS_MANIFEST_SHA,
    Artifact,
    StageContext,
    StageResult,
    base_dir,
    manifest_tags,
    numeric,
)


def run(ctx: StageContext) -> StageResult:
    layout = ctx.layout
    # Lineage: the manifests of the data it trains on, as tags and artifacts, so that a model version leads to
    # its data from its own run.
    tags, artifacts = manifest_tags({TOKENS_MANIFEST_SHA: (layout.tokens, TOKENS_MANIFEST_DIR), RAW_MANIFEST_SHA: (layout.raw, RAW_MANIFEST_DIR)})
    if ctx.params.pretrain.init == "base":  # lineage: the pretrained base it continued (source, sha256, licence)
        base_json = layout.base_source / BASE_MANIFEST
        tags[BASE_MANIFEST_SHA] = sha256_file(base_json)
        artifacts.append(Artifact(base_json, BASE_MANIFEST_DIR))
    summary = pretrain(
        ctx.params.pretrain, layout.tokens, layout.base_model, layout.pretrain_reports,
        seed=ctx.seed, params=ctx.params.to_dict(), tracker=ctx.tracker, checkpoint_dir=layout.checkpoints("pretrain"),
        init_dir=base_dir(ctx) if ctx.params.pretrain.init == "base" else None,
    )
    artifacts += [Artifact(layout.pretrain_reports / name, "reports") for name in (LOSS_PLOT, TRAIN_LOSS, VAL_LOSS, SUMMARY)]
    artifacts += [Artifact(layout.base_model / name, "checkpoint") for name in (MODEL_CONFIG, RESOLVED_PARAMS)]
    resumed = f" (resumed from step {summary['resumed_from_step']})" if summary.get("resumed_from_step") else ""
    return StageResult(
        summary={k: v for k, v in summary.items() if k != "loader_state"},
        metrics=numeric(summary),
        artifacts=artifacts,
        tags=tags,
        log=f"pretrained {summary['n_params']:,} params{resumed}: val loss {summary['first_val_loss']:.3f} -> "
            f"{summary['final_val_loss']:.3f}",
    )
