"""The pretrain stage: a decoder trained on data/tokens into models/base, from random weights or (with
`pretrain.init: base`) continuing the base model of models/base_model, with its loss curves in reports/pretrain;
the orchestration layer registers it as `tracking.registered_model`. With init base and max_steps 0 the base is
taken as it is (scored on the validation split), so the fine-tuning stages start from it directly.

    lmcore run pretrain
    lmcore run pretrain --set pretrain.max_steps=50 --set pretrain.checkpoint_interval=10
    torchrun --standalone --nproc_per_node 2 -m lmcore.pretrain --params params.yaml   # lmcore.launch: no MLflow, no registry
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from lmcore import distributed
from lmcore.checkpoint import read_model_config
from lmcore.config import PretrainConfig
from lmcore.errors import NotRegisteredError, one_line
from lmcore.io import read_json, sha256_file
from lmcore.model_card import card_facts, write_card
from lmcore.paths import (
    BASE_MANIFEST,
    BASE_SOURCE,
    BENCH_CURVE,
    CARD,
    LOSS_PLOT,
    MANIFEST,
    MODEL_CONFIG,
    RAW,
    REGISTERED,
    RESOLVED_PARAMS,
    SUMMARY,
    TOKENS,
    TRAIN_LOSS,
    VAL_LOSS,
    WEIGHTS,
    model_path,
    reports_path,
)
from lmcore.pretrain import PRETRAIN_STEPS, pretrain
from lmcore.stages import (
    BASE_MANIFEST_DIR,
    BASE_MANIFEST_SHA,
    CONTINUED_WEIGHTS_SHA,
    START_WEIGHTS_SHA,
    RAW_MANIFEST_DIR,
    RAW_MANIFEST_SHA,
    TOKENS_MANIFEST_DIR,
    TOKENS_MANIFEST_SHA,
    Artifact,
    ProbeSummary,
    StageContext,
    StageResult,
    base_dir,
    manifest_tags,
    numeric,
)
from lmcore.stages._probe import bench_sample
from lmcore.tokenizer import Tokenizer, has_tokenizer, load_tokenizer



class Summary(ProbeSummary):
    """lmcore.pretrain.pretrain's summary (less loader_state), and where the run started."""

    n_params: int
    steps: int
    resumed_from_step: int | None
    tokens_seen: int
    train_time_s: float
    tokens_per_s: float | None
    mfu: float | None
    peak_flops: float
    precision: str
    world_size: int
    first_val_loss: float
    final_val_loss: float
    first_val_bpb: float | None
    final_val_bpb: float | None
    best_val_loss: float
    best_step: int
    stopped_early: bool
    final_train_loss: float | None
    train_tokens: int
    val_tokens: int
    documents_longer_than_context: int
    val_bpb_change: float | None
    val_bpb_change_stderr: float | None
    init: str  # scratch | base | champion, as it turned out
    start: str
    tokenizer: str | None
    start_step: int
    pretrain_steps: int
    continued_from: str | None
    start_weights_sha256: str | None


def run(ctx: StageContext) -> StageResult:
    tokens, model_dir, reports = ctx.inputs[TOKENS], ctx.outputs[model_path("base")], ctx.outputs[reports_path("pretrain")]
    # Lineage: the manifests of the data it trains on, as tags and artifacts, so that a model version leads to
    # its data from its own run.
    warnings: list[str] = []
    raw = ctx.inputs[f"{RAW}/{MANIFEST}"].parent
    tags, artifacts = manifest_tags({TOKENS_MANIFEST_SHA: (tokens, TOKENS_MANIFEST_DIR), RAW_MANIFEST_SHA: (raw, RAW_MANIFEST_DIR)})
    start = starting_point(ctx)
    if start.warning:
        warnings.append(start.warning)
    if start.init == "base" or (start.init == "champion" and base_dir(ctx) is not None):
        # lineage: the pretrained base it (or the champion it continues) started from: source, sha256, licence
        base_json = ctx.inputs[BASE_SOURCE] / BASE_MANIFEST
        tags[BASE_MANIFEST_SHA] = sha256_file(base_json)
        artifacts.append(Artifact(base_json, BASE_MANIFEST_DIR))
    started_from = sha256_file(start.folder / WEIGHTS) if start.folder is not None and (start.folder / WEIGHTS).is_file() else None
    if start.init == "champion":  # lineage: the registered version it continued
        tags[CONTINUED_WEIGHTS_SHA] = started_from
    if started_from is not None:  # a champion with these weights is no new start (tasks.incremental.registry_moves)
        tags[START_WEIGHTS_SHA] = started_from
    summary = pretrain(
        start.cfg, tokens, model_dir, reports,
        seed=ctx.seed, params=ctx.params.to_dict(), tracker=ctx.tracker, checkpoint_dir=ctx.layout.checkpoints("pretrain"),
        bench_items=bench_sample(ctx, "pretrain"),  # the benchmark probe's sample; None when it is off
        init_dir=start.folder, start_step=start.step,
    )
    summary.update(init=start.init, continued_from=start.continued_from, start_weights_sha256=started_from)
    if distributed.current().is_main:  # under torchrun the other ranks write nothing
        write_card(model_dir, pretrain_card(ctx, start, summary))
    artifacts += [Artifact(reports / name, "reports") for name in (LOSS_PLOT, TRAIN_LOSS, VAL_LOSS, SUMMARY)]
    artifacts += [Artifact(model_dir / name, "checkpoint") for name in (MODEL_CONFIG, RESOLVED_PARAMS, CARD)]
    artifacts += [Artifact(reports / f, "reports") for f in (BENCH_CURVE,) if (reports / f).is_file()]
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
    cfg = start.cfg
    if start.init == "champion":
        started = f"{start.continued_from} (@champion, {start.step:,} steps), continued on new data"
    elif start.init == "base":
        base = read_json(ctx.inputs[BASE_SOURCE] / BASE_MANIFEST)
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
    return card_facts(ctx.outputs[model_path("base")], kind="base", stage="pretrain", started_from=started,
                      data={"corpus": ctx.inputs[f"{RAW}/{MANIFEST}"]}, training=training,
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
    shards, champion_tok = read_tokenizer(ctx.inputs[TOKENS]), load_tokenizer(folder)
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
