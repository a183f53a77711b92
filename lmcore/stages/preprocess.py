"""The preprocess stage: data/raw cleaned, filtered and deduplicated into data/clean/documents.jsonl, with
stats.json (documents and bytes removed per step and rule) and filters.png.

    lmcore run preprocess
"""

from __future__ import annotations

from typing import TypedDict

from lmcore.data.preprocess import FILTERS_PLOT, preprocess
from lmcore.paths import CLEAN, RAW, STATS
from lmcore.stages import RAW_MANIFEST_SHA, Artifact, StageContext, StageResult, manifest_tags


class Summary(TypedDict):
    documents: int
    bytes: int


def run(ctx: StageContext) -> StageResult:
    raw, clean = ctx.inputs[RAW], ctx.outputs[CLEAN]
    tags, _ = manifest_tags({RAW_MANIFEST_SHA: (raw, "")})  # lineage: the collected data it cleans
    stats = preprocess(ctx.params.preprocess, raw, clean)
    total = stats["total"]
    return StageResult(
        summary={"documents": total["documents_out"], "bytes": total["bytes_out"]},
        metrics=stats["metrics"],
        artifacts=[Artifact(clean / STATS), Artifact(clean / FILTERS_PLOT)],
        tags=tags,
        log=f"preprocess kept {total['documents_out']} of {total['documents_split']} documents "
            f"({total['bytes_out']} of {total['bytes_split']} bytes)",
    )
