"""The base_model stage: the model a run starts from (`base_model`) into models/base_model, with its manifest base.json.

    lmcore run base_model

From scratch the folder holds base.json alone and pretraining starts from random weights; otherwise it is an lmcore
model folder carrying its tokenizer, which tokenize (`tokenize.tokenizer: auto`) and pretrain (`pretrain.init: base`)
start from. Downloads use the collect section's retries and timeout, and the offline mirror (LMCORE_MIRROR) first.
"""

from __future__ import annotations

from typing import TypedDict

from lmcore.base_model import origins, prepare_base
from lmcore.data.collect import mirror_from_env
from lmcore.io import sha256_file
from lmcore.paths import BASE_MANIFEST, BASE_SOURCE
from lmcore.stages import BASE_MANIFEST_SHA, Artifact, StageContext, StageResult
from lmcore.tokenizer import configured_ranks_file


class Summary(TypedDict):
    source: str  # scratch | huggingface | gguf | folder | registry
    name: str
    parameters: int
    base_manifest_sha256: str


def run(ctx: StageContext) -> StageResult:
    params = ctx.params
    out = ctx.outputs[BASE_SOURCE]
    manifest = prepare_base(
        params.base_model, out, root=ctx.root, mirror=mirror_from_env(), resolve_model=ctx.resolve_model,
        retries=params.collect.retries, timeout_s=params.collect.timeout_s,
        ranks_file=configured_ranks_file(params.tokenize.ranks_file, ctx.root),
    )
    sha = sha256_file(out / BASE_MANIFEST)
    files = manifest.get("files", [])
    summary = {
        "source": manifest["source"],
        "name": manifest.get("name", "scratch"),
        "parameters": manifest.get("parameters", 0),
        "base_manifest_sha256": sha,
    }
    metrics = {"parameters": summary["parameters"], "files": len(files), "bytes": sum(f["bytes"] for f in files)}
    if manifest["source"] == "scratch":
        line = "from scratch: pretraining starts from random weights (pretrain.model)"
    else:
        where = ", ".join(f"{n} {origin}" for origin, n in origins(manifest).items())
        line = (f"{summary['name']} ({manifest['source']}, {manifest['architecture']}, {summary['parameters']:,} parameters, "
                f"tokenizer {manifest['tokenizer']['name']}): {len(files)} file(s), {where}")
    return StageResult(
        summary=summary,
        metrics=metrics,
        artifacts=[Artifact(out / BASE_MANIFEST)],
        tags={BASE_MANIFEST_SHA: sha},
        log=line,
    )
