"""What the fine-tuning stages share: collect their data like `collect` does, prepare the splits, and return the
trained model folder's lineage, artifacts and data metrics in one StageResult."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmcore.config import Source
from lmcore.data.collect import collect, mirror_from_env
from lmcore.io import sha256_file
from lmcore.paths import ADAPTER, ADAPTER_CONFIG, BENCH_CURVE, LOSS_PLOT, METRICS, MODEL_CONFIG, STATS, SUMMARY, TRAIN_LOSS, VAL_LOSS, WEIGHTS
from lmcore.stages import BASE_WEIGHTS_SHA, FINETUNE_MANIFEST_DIR, FINETUNE_MANIFEST_SHA, Artifact, StageContext, StageResult, manifest_tags

CURVES = (TRAIN_LOSS, VAL_LOSS, LOSS_PLOT, METRICS, SUMMARY)  # every fine-tune's report files


@dataclass
class Data:
    """A fine-tune's prepared data: where its splits are, and what to record about them."""

    splits: Path
    tags: dict[str, str]
    artifacts: list[Artifact] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_data(ctx: StageContext, name: str, sources: list[Source], prepare: Callable[[Path, Path], dict]) -> Data:
    """Collect `sources` into data/finetune/<name>/raw (mirror first) and `prepare(raw_dir, splits_dir)` the splits."""
    data_dir = ctx.layout.finetune_data(name)
    collect(ctx.collect_config(sources), data_dir / "raw", mirror=mirror_from_env(), base_dir=ctx.root)
    tags, artifacts = manifest_tags({FINETUNE_MANIFEST_SHA: (data_dir / "raw", FINETUNE_MANIFEST_DIR)})
    stats = prepare(data_dir / "raw", data_dir / "splits")
    read = stats["read"]
    files = read.get("files", [read])
    metrics = {
        "records_read": sum(f["read"] for f in files),
        "records_bad": sum(f["bad"] for f in files),
        **{f"{split}_examples": (sum(v.values()) if isinstance(v, dict) else v) for split, v in stats["splits"].items()},
    }
    return Data(data_dir / "splits", tags, [*artifacts, Artifact(data_dir / "splits" / STATS, "data")], metrics)


def finetuned(
    ctx: StageContext, name: str, *, start: Path, data: Data, reports: tuple[str, ...], summary: dict,
    version_tags: dict[str, str], log: str,
) -> StageResult:
    """The StageResult of a fine-tune that wrote models/<name> and reports/<name>, starting from the folder `start`."""
    model_dir, reports_dir = ctx.layout.model(name), ctx.layout.reports(name)
    artifacts = [*data.artifacts, *(Artifact(reports_dir / f, "reports") for f in reports)]
    artifacts += [Artifact(reports_dir / f, "reports") for f in (BENCH_CURVE,) if (reports_dir / f).is_file()]  # the probe's
    artifacts += [Artifact(model_dir / f, "checkpoint") for f in (MODEL_CONFIG, ADAPTER_CONFIG, ADAPTER) if (model_dir / f).is_file()]
    return StageResult(
        summary=summary,
        metrics=data.metrics,
        artifacts=artifacts,
        tags={BASE_WEIGHTS_SHA: sha256_file(start / WEIGHTS), **data.tags},
        version_tags=version_tags,
        log=log,
    )
