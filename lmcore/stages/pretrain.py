"""The pretrain stage: a decoder trained from random weights on data/tokens into models/base, with its loss
curves in reports/pretrain; the orchestration layer registers it as `tracking.registered_model`.

    lmcore run pretrain
    lmcore run pretrain --set pretrain.max_steps=50 --set pretrain.checkpoint_interval=10
"""

from __future__ import annotations

from lmcore.paths import LOSS_PLOT, MODEL_CONFIG, RESOLVED_PARAMS, SUMMARY, TRAIN_LOSS, VAL_LOSS
from lmcore.pretrain import pretrain
from lmcore.stages import (
    RAW_MANIFEST_DIR,
    RAW_MANIFEST_SHA,
    TOKENS_MANIFEST_DIR,
    TOKENS_MANIFEST_SHA,
    Artifact,
    StageContext,
    StageResult,
    manifest_tags,
    numeric,
)


def run(ctx: StageContext) -> StageResult:
    layout = ctx.layout
    # Lineage: the manifests of the data it trains on, as tags and artifacts, so that a model version leads to
    # its data from its own run.
    tags, artifacts = manifest_tags({TOKENS_MANIFEST_SHA: (layout.tokens, TOKENS_MANIFEST_DIR), RAW_MANIFEST_SHA: (layout.raw, RAW_MANIFEST_DIR)})
    summary = pretrain(
        ctx.params.pretrain, layout.tokens, layout.base_model, layout.pretrain_reports,
        seed=ctx.seed, params=ctx.params.to_dict(), tracker=ctx.tracker, checkpoint_dir=layout.checkpoints("pretrain"),
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
