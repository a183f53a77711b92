"""The preprocess stage: data/raw cleaned, filtered and deduplicated into data/clean/documents.jsonl, with
stats.json (documents and bytes removed per step and rule) and filters.png.

    lmcore run preprocess
"""

from __future__ import annotations

from lmcore.data.preprocess import FILTERS_PLOT, preprocess
from lmcore.paths import STATS
from lmcore.stages import RAW_MANIFEST_SHA, Artifact, StageContext, StageResult, manifest_tags


def run(ctx: StageContext) -> StageResult:
    layout = ctx.layout
    tags, _ = manifest_tags({RAW_MANIFEST_SHA: (layout.raw, "")})  # lineage: the collected data it cleans
    stats = preprocess(ctx.params.preprocess, layout.raw, layout.clean)
    total = stats["total"]
    return StageResult(
        summary={"documents": total["documents_out"], "bytes": total["bytes_out"]},
        metrics=stats["metrics"],
        artifacts=[Artifact(layout.clean / STATS), Artifact(layout.clean / FILTERS_PLOT)],
        tags=tags,
        log=f"preprocess kept {total['documents_out']} of {total['documents_split']} documents "
            f"({total['bytes_out']} of {total['bytes_split']} bytes)",
    )
