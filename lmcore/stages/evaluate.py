"""The evaluate stage: validation loss, perplexity and bits per byte of models/base on the whole validation split,
and a seeded sample per prompt, into reports/evaluate (the samples also as an MLflow table, tables/samples.json);
the registered version with these weights is tagged eval.*.

    lmcore run evaluate
"""

from __future__ import annotations

from pathlib import Path
from typing import NotRequired, TypedDict

from lmcore.evaluation import evaluate
from lmcore.io import jsonl_objects, sha256_file
from lmcore.paths import METRICS, SAMPLES, TOKENS, WEIGHTS, model_path, reports_path
from lmcore.stages import WEIGHTS_SHA, Artifact, ItemTable, StageContext, StageResult, VersionTags
from lmcore.tokenizer import load_tokenizer

SAMPLES_TABLE = "tables/samples.json"  # one row per prompt (sample_rows)


def sample_rows(samples_file: Path) -> list[dict]:
    """One row per seeded sample of samples.jsonl (lmcore.evaluation): prompt, completion, and the settings that
    made it (temperature, top_k, max_new_tokens, seed)."""
    keys = ("prompt", "completion", "temperature", "top_k", "max_new_tokens", "seed")
    path = Path(samples_file)
    return [{k: r.get(k) for k in keys} for _, r in jsonl_objects(path.read_text(encoding="utf-8"), path)]


class Summary(TypedDict):
    val_loss: float
    perplexity: float
    val_tokens: int
    val_bytes: NotRequired[int]  # with a tokenizer
    val_bpb: NotRequired[float]
    samples: int


def run(ctx: StageContext) -> StageResult:
    model_dir, out = ctx.inputs[model_path("base")], ctx.outputs[reports_path("evaluate")]
    weights, enc = model_dir / WEIGHTS, load_tokenizer(model_dir)
    metrics = evaluate(ctx.params.evaluate, model_dir, ctx.inputs[TOKENS], out, seed=ctx.seed, enc=enc, tracker=ctx.tracker)
    return StageResult(
        summary={**metrics, "samples": len(ctx.params.evaluate.prompts)},
        artifacts=[Artifact(out / METRICS), Artifact(out / SAMPLES)],
        tags={WEIGHTS_SHA: sha256_file(weights)},
        scored=[VersionTags("registered_model", weights,
                            {f"eval.{k}": f"{metrics[k]:.6f}" for k in ("val_loss", "perplexity", "val_bpb") if k in metrics})],
        item_tables=[ItemTable(SAMPLES_TABLE, sample_rows(out / SAMPLES))],
        log=f"val loss {metrics['val_loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
            + (f", {metrics['val_bpb']:.4f} bits per byte" if "val_bpb" in metrics else ""),
    )
