"""What the fine-tuning stages share: collect their data like `collect` does, prepare the splits, and return the
trained model folder's lineage, artifacts, data metrics and per-example tables in one StageResult."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmcore.config import Source
from lmcore.data.collect import collect, mirror_from_env
from lmcore.io import jsonl_objects, sha256_file
from lmcore.model_card import card_facts, write_card
from lmcore.paths import (
    ADAPTER,
    ADAPTER_CONFIG,
    BENCH_CURVE,
    CARD,
    LOSS_PLOT,
    MANIFEST,
    METRICS,
    MODEL_CONFIG,
    STATS,
    SUMMARY,
    TRAIN_LOSS,
    VAL_LOSS,
    WEIGHTS,
    finetune_data_path,
    model_path,
    reports_path,
)
from lmcore.stages import (
    BASE_WEIGHTS_SHA,
    FINETUNE_MANIFEST_DIR,
    FINETUNE_MANIFEST_SHA,
    Artifact,
    ItemTable,
    StageContext,
    StageResult,
    manifest_tags,
)

CURVES = (TRAIN_LOSS, VAL_LOSS, LOSS_PLOT, METRICS, SUMMARY)  # every fine-tune's report files
RESPONSES_TABLE = "tables/test_responses.json"  # instruct, dpo: one row per test response (response_rows)


@dataclass
class Data:
    """A fine-tune's prepared data: where its splits are, and what to record about them."""

    splits: Path
    tags: dict[str, str]
    artifacts: list[Artifact] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_data(ctx: StageContext, name: str, sources: list[Source], prepare: Callable[[Path, Path], dict]) -> Data:
    """Collect `sources` into data/finetune/<name>/raw (mirror first) and `prepare(raw_dir, splits_dir)` the splits."""
    data_dir = ctx.outputs[finetune_data_path(name)]
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


def response_rows(responses_file: Path) -> list[dict]:
    """One row per test response of test_responses.jsonl (lmcore.finetune.instruct): instruction, input, reference
    (the test split's output; of preference data without one, its chosen response) and response (what the model
    wrote)."""
    path = Path(responses_file)
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "reference": r["output"], "response": r["response"]}
            for _, r in jsonl_objects(path.read_text(encoding="utf-8"), path)]


# The params of a fine-tune's section its model card shows (those the section has).
CARD_PARAMS = ("epochs", "max_steps", "batch_size", "lr", "warmup_steps", "beta", "template", "mask_prompt")


def finetune_card(ctx: StageContext, name: str, stage: str, start: Path, data: Data, trained: dict, scores: dict) -> dict:
    """The model card's facts of models/<name> (lmcore.model_card): what it started from, the data, the key params
    of `stage`'s section, what the training reported (`trained`: the fine-tune's summary) and scored."""
    cfg = getattr(ctx.params, stage).model_dump(mode="json")
    lora = cfg.get("lora") or {}
    training = {
        **{k: cfg[k] for k in CARD_PARAMS if cfg.get(k) is not None},
        **({"lora": f"rank {lora.get('rank')}, alpha {lora.get('alpha')}"} if lora.get("enabled") else {}),
        **{k: trained[k] for k in ("steps", "trainable_params", "template", "first_val_loss", "final_val_loss", "final_val_bpb")
           if trained.get(k) is not None},
    }
    started = f"`{start.relative_to(ctx.root).as_posix()}` of the same run (weights sha256 `{sha256_file(start / WEIGHTS)[:12]}`)"
    return card_facts(ctx.outputs[model_path(name)], kind=name, stage=stage, started_from=started,
                      data={"fine-tuning data": data.splits.parent / "raw" / MANIFEST}, training=training, scores=scores,
                      extra={"examples": {k.removesuffix("_examples"): v for k, v in data.metrics.items() if k.endswith("_examples")}})


def finetuned(
    ctx: StageContext, name: str, *, start: Path, data: Data, reports: tuple[str, ...], summary: dict,
    version_tags: dict[str, str], log: str, item_tables: list[ItemTable] | None = None, card: dict | None = None,
) -> StageResult:
    """The StageResult of a fine-tune that wrote models/<name> and reports/<name>, starting from the folder `start`;
    item_tables: its per-example MLflow tables; card: its model card's facts (`finetune_card`), written into
    models/<name> as MODEL_CARD.md."""
    model_dir, reports_dir = ctx.outputs[model_path(name)], ctx.outputs[reports_path(name)]
    if card is not None:
        write_card(model_dir, card)
    artifacts = [*data.artifacts, *(Artifact(reports_dir / f, "reports") for f in reports)]
    artifacts += [Artifact(reports_dir / f, "reports") for f in (BENCH_CURVE,) if (reports_dir / f).is_file()]  # the probe's
    artifacts += [Artifact(model_dir / f, "checkpoint") for f in (MODEL_CONFIG, ADAPTER_CONFIG, ADAPTER, CARD) if (model_dir / f).is_file()]
    return StageResult(
        summary=summary,
        metrics=data.metrics,
        artifacts=artifacts,
        tags={BASE_WEIGHTS_SHA: sha256_file(start / WEIGHTS), **data.tags},
        version_tags=version_tags,
        item_tables=list(item_tables or []),
        log=log,
    )
