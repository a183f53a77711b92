"""The evaluate stage: validation loss, perplexity and bits per byte of models/base on the whole validation split,
and a seeded sample per prompt, into reports/evaluate; the registered version with these weights is tagged eval.*.

    lmcore run evaluate
"""

from __future__ import annotations

from lmcore.evaluation import evaluate
from lmcore.io import sha256_file
from lmcore.paths import METRICS, SAMPLES, WEIGHTS
from lmcore.stages import WEIGHTS_SHA, Artifact, StageContext, StageResult, VersionTags
from lmcore.tokenizer import load_tokenizer


def run(ctx: StageContext) -> StageResult:
    layout = ctx.layout
    out, weights = layout.evaluate_reports, layout.base_model / WEIGHTS
    enc = load_tokenizer(layout.base_model)
    metrics = evaluate(ctx.params.evaluate, layout.base_model, layout.tokens, out, seed=ctx.seed, enc=enc, tracker=ctx.tracker)
    return StageResult(
        summary={**metrics, "samples": len(ctx.params.evaluate.prompts)},
        artifacts=[Artifact(out / METRICS), Artifact(out / SAMPLES)],
        tags={WEIGHTS_SHA: sha256_file(weights)},
        scored=[VersionTags("registered_model", weights,
                            {f"eval.{k}": f"{metrics[k]:.6f}" for k in ("val_loss", "perplexity", "val_bpb") if k in metrics})],
        log=f"val loss {metrics['val_loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
            + (f", {metrics['val_bpb']:.4f} bits per byte" if "val_bpb" in metrics else ""),
    )
