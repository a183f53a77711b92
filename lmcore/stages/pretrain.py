"""The pretrain stage: a decoder trained on data/tokens into models/base, from random weights or (with
`pretrain.init: base`) continuing the base model of models/base_model, with its loss curves in reports/pretrain;
the orchestration layer registers it as `tracking.registered_model`. With init base and max_steps 0 the base is
taken as it is (scored on the validation split), so the fine-tuning stages start from it directly.

    lmcore run pretrain
    lmcore run pretrain --set pretrain.max_steps=50 --set pretrain.checkpoint_interval=10
    torchrun --standalone --nproc_per_node 2 -m lmcore.pretrain --params params.yaml   # `main`: no MLflow, no registry
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from lmcore import distributed
from lmcore.checkpoint import read_model_config
from lmcore.config import PretrainConfig, load_params
from lmcore.errors import NotRegisteredError, one_line
from lmcore.io import read_json, sha256_file
from lmcore.model_card import card_facts, write_card
from lmcore.paths import (
    BASE_MANIFEST,
    BENCH_CURVE,
    CARD,
    LOSS_PLOT,
    MANIFEST,
    MODEL_CONFIG,
    REGISTERED,
    RESOLVED_PARAMS,
    SUMMARY,
    TRAIN_LOSS,
    VAL_LOSS,
    WEIGHTS,
)
from lmcore.pretrain import PRETRAIN_STEPS, pretrain
from lmcore.stages import (
    BASE_MANIFEST_DIR,
    BASE_MANIFEST_SHA,
    CONTINUED_WEIGHTS_SHA,
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
from lmcore.stages._probe import bench_sample
from lmcore.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    layout = ctx.layout
    # Lineage: the manifests of the data it trains on, as tags and artifacts, so that a model version leads to
    # its data from its own run.
    warnings: list[str] = []
    tags, artifacts = manifest_tags({TOKENS_MANIFEST_SHA: (layout.tokens, TOKENS_MANIFEST_DIR), RAW_MANIFEST_SHA: (layout.raw, RAW_MANIFEST_DIR)})
    start = starting_point(ctx)
    if start.warning:
        warnings.append(start.warning)
    if start.init == "base" or (start.init == "champion" and base_dir(ctx) is not None):
        # lineage: the pretrained base it (or the champion it continues) started from: source, sha256, licence
        base_json = layout.base_source / BASE_MANIFEST
        tags[BASE_MANIFEST_SHA] = sha256_file(base_json)
        artifacts.append(Artifact(base_json, BASE_MANIFEST_DIR))
    started_from = sha256_file(start.folder / WEIGHTS) if start.folder is not None and (start.folder / WEIGHTS).is_file() else None
    if start.init == "champion":  # lineage: the registered version it continued
        tags[CONTINUED_WEIGHTS_SHA] = started_from
    summary = pretrain(
        start.cfg, layout.tokens, layout.pretrained, layout.pretrain_reports,
        seed=ctx.seed, params=ctx.params.to_dict(), tracker=ctx.tracker, checkpoint_dir=layout.checkpoints("pretrain"),
        bench_items=bench_sample(ctx, "pretrain"),  # the benchmark probe's sample; None when it is off
        init_dir=start.folder, start_step=start.step,
    )
    summary.update(init=start.init, continued_from=start.continued_from, start_weights_sha256=started_from)
    if distributed.current().is_main:  # under torchrun the other ranks write nothing
        write_card(layout.pretrained, pretrain_card(ctx, start, summary))
    artifacts += [Artifact(layout.pretrain_reports / name, "reports") for name in (LOSS_PLOT, TRAIN_LOSS, VAL_LOSS, SUMMARY)]
    artifacts += [Artifact(layout.pretrained / name, "checkpoint") for name in (MODEL_CONFIG, RESOLVED_PARAMS, CARD)]
    artifacts += [Artifact(layout.pretrain_reports / f, "reports") for f in (BENCH_CURVE,) if (layout.pretrain_reports / f).is_file()]
    resumed = f" (resumed from step {summary['resumed_from_step']})" if summary.get("resumed_from_step") else ""
    return StageResult(
        summary={k: v for k, v in summary.items() if k != "loader_state"},
        metrics=numeric(summary),
        artifacts=artifacts,
        tags=tags,
        log=f"pretrained {summary['n_params']:,} params{resumed} ({start.note}): val loss {summary['first_val_loss']:.3f} -> "
            f"{summary['final_val_loss']:.3f}",
        warnings=warnings,
    )


def pretrain_card(ctx: StageContext, start: Start, summary: dict) -> dict:
    """The model card's facts of models/base (lmcore.model_card)."""
    layout, cfg = ctx.layout, start.cfg
    if start.init == "champion":
        started = f"{start.continued_from} (@champion, {start.step:,} steps), continued on new data"
    elif start.init == "base":
        base = read_json(layout.base_source / BASE_MANIFEST)
        started = f"the pretrained base {base['name']} ({base['source']}, licence {base.get('license', 'unknown')})"
    else:
        started = "random weights"
    training = {
        "init": start.init, "steps": summary["steps"], "tokens_seen": summary["tokens_seen"],
        "batch_size": f"{cfg.batch_size} × {cfg.grad_accum_steps} accumulation × {summary['world_size']} process(es)",
        "seq_len": cfg.seq_len or cfg.model.context_length, "lr": f"{cfg.lr:g} (min {cfg.min_lr:g}, warmup {cfg.warmup_steps})",
        "precision": summary["precision"], "stopped_early": summary["stopped_early"],
        **{k: summary.get(k) for k in ("first_val_loss", "first_val_bpb", "final_val_loss", "final_val_bpb",
                                       "val_bpb_change", "val_bpb_change_stderr")},
        # the weights it started from (the base's, or the champion's): the gate weighs the held-out bits per byte
        # it bought against the benchmark change it cost when these are the champion's
        "start_weights_sha256": summary["start_weights_sha256"],
    }
    return card_facts(layout.pretrained, kind="base", stage="pretrain", started_from=started,
                      data={"corpus": layout.raw / MANIFEST}, training=training,
                      extra={"tokens": {"train": summary["train_tokens"], "val": summary["val_tokens"]}})


@dataclass(frozen=True)
class Start:
    """What a pretrain run starts from.

    init: scratch | base | champion, as it turned out (`pretrain.init: champion` falls back when there is none);
    folder: the model folder it continues (None: random weights); cfg: the schedule (the `continued` one for a
    champion); step: the optimizer steps behind the weights; continued_from: "name vN" of the champion;
    note: one line for the log; warning: why `init: champion` fell back, when it did.
    """

    init: str
    folder: Path | None
    cfg: PretrainConfig
    step: int = 0
    continued_from: str | None = None
    note: str = ""
    warning: str = ""


def starting_point(ctx: StageContext) -> Start:
    cfg, base = ctx.params.pretrain, base_dir(ctx)
    scratch = Start("scratch", None, cfg.model_copy(update={"init": "scratch"}), note="from random weights")
    from_base = Start("base", base, cfg.model_copy(update={"init": "base"}), note="continuing the base model")
    if cfg.init != "champion":
        return from_base if cfg.init == "base" else scratch
    champion, why = registered_champion(ctx)
    if champion is not None:
        return champion
    otherwise = from_base if base is not None else scratch
    return replace(otherwise, warning=f"pretrain.init champion: {why}; starting {otherwise.note.replace('continuing', 'from')}")


def registered_champion(ctx: StageContext) -> tuple[Start | None, str]:
    """The champion of `tracking.registered_model` to continue, or None and why not: none registered, no registry
    here, another tokenizer than the shards', or another architecture than this run would otherwise train."""
    uri = f"models:/{ctx.params.tracking.registered_model}@champion"
    if ctx.resolve_model is None:
        return None, f"no model registry to find {uri} in (the stage ran without the orchestration layer)"
    try:
        folder = Path(ctx.resolve_model(uri))
    except NotRegisteredError as err:
        return None, f"no champion yet ({one_line(err)})"
    record = read_json(folder / REGISTERED) if (folder / REGISTERED).is_file() else {}
    name = f"{record.get('name', ctx.params.tracking.registered_model)} v{record.get('version', '?')}"
    shards, champion_tok = read_tokenizer(ctx.layout.tokens), load_tokenizer(folder)
    if shards is None or not champion_tok.same_as(shards):
        made = f"{shards.name} ({shards.sha256[:12]})" if shards else "no recorded tokenizer"
        return None, f"{name} uses tokenizer {champion_tok.name} ({champion_tok.sha256[:12]}), the shards {made}"
    config, extra = read_model_config(folder)
    base = base_dir(ctx)
    expected = read_model_config(base)[0] if base is not None else ctx.params.pretrain.model
    if config != expected:
        differ = ", ".join(f"{k} {getattr(config, k)} vs {getattr(expected, k)}" for k in type(config).model_fields
                           if getattr(config, k) != getattr(expected, k))
        return None, f"{name} is another architecture than this run trains ({differ})"
    step = int(extra.get(PRETRAIN_STEPS, 0))
    return Start("champion", folder, ctx.params.pretrain.continuation(), step, name,
                 note=f"continuing {name} (@champion, {step} steps)"), ""


def read_tokenizer(folder: Path) -> Tokenizer | None:
    return load_tokenizer(folder) if has_tokenizer(folder) else None


def main(argv: list[str] | None = None) -> dict:
    """The pretrain stage (`lmcore.stages.pretrain.run`) without the orchestration layer: the same inputs, outputs
    and card, no MLflow and no registry (`init: champion` starts as the stage would without a champion, with a
    warning). Alone, or one process per device under torchrun (rank 0 writes). Returns the stage's summary."""
    ap = argparse.ArgumentParser(prog="python -m lmcore.pretrain", description="The pretrain stage without the orchestration layer: alone, or one process per device under torchrun.")
    ap.add_argument("--params", default="params.yaml", help="the params file (default params.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    ap.add_argument("--root", default=".", help="project root: data/tokens is read, models/base and reports/pretrain are written")
    args = ap.parse_args(argv)

    params = load_params(args.params, overrides=args.overrides)
    info = distributed.init_from_env(params.pretrain.device)
    try:
        result = run(StageContext(root=Path(args.root), params=params))
    finally:
        distributed.destroy()
    if info.is_main:
        for line in result.warnings:
            log.warning(line)
        print(json.dumps(result.summary, indent=2, default=str), file=sys.stderr)
    return result.summary


if __name__ == "__main__":
    main()
