"""The collect stage: every source of `collect.sources` into data/raw, pinned by sha256, with its manifest.

    lmcore run collect
"""

from __future__ import annotations

from typing import TypedDict

from lmcore.data.collect import collect, mirror_from_env
from lmcore.io import sha256_file
from lmcore.paths import MANIFEST, RAW
from lmcore.stages import RAW_MANIFEST_SHA, Artifact, StageContext, StageResult


class Summary(TypedDict):
    sources: int
    files: int
    bytes: int
    raw_manifest_sha256: str


def run(ctx: StageContext) -> StageResult:
    out = ctx.outputs[RAW]
    manifest = collect(ctx.params.collect, out, mirror=mirror_from_env(), base_dir=ctx.root)
    sha = sha256_file(out / MANIFEST)
    sources = manifest["sources"]
    metrics = {
        "sources": len(sources),
        "files": sum(len(s["files"]) for s in sources),
        "bytes": sum(s["bytes"] for s in sources),
        "skipped_files": sum(len(s["skipped_files"]) for s in sources),
    }
    origins = ", ".join(f"{s['name']} ({s['origin']}, {len(s['files'])} file(s))" for s in sources)
    warnings = [f"skipped {metrics['skipped_files']} file(s); the reasons are in {out / MANIFEST}"] if metrics["skipped_files"] else []
    return StageResult(
        summary={"sources": metrics["sources"], "files": metrics["files"], "bytes": metrics["bytes"], "raw_manifest_sha256": sha},
        metrics=metrics,
        artifacts=[Artifact(out / MANIFEST)],
        tags={RAW_MANIFEST_SHA: sha},
        log=f"collected {metrics['bytes']} bytes: {origins}",
        warnings=warnings,
    )
