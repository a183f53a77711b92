"""The dpo stage: the preference pairs collected into data/finetune/dpo and split; models/instruct tuned by
direct preference optimisation against a frozen copy of itself into models/dpo, with reward curves, metrics and
test responses in reports/dpo (also an MLflow table, tables/test_responses.json). Registered as a new version of
the instruction model (alias @dpo).

    lmcore run dpo
    lmcore run dpo --set dpo.beta=0.2
"""

from __future__ import annotations

from lmcore.finetune.dpo import PREFERENCE_FIELDS, train_dpo
from lmcore.finetune.instruct import prepare_instructions
from lmcore.paths import TEST_RESPONSES, model_path, reports_path
from lmcore.stages import ItemTable, ProbeSummary, StageContext, StageResult
from lmcore.stages._finetune import CURVES, RESPONSES_TABLE, finetune_card, finetuned, prepare_data, response_rows
from lmcore.stages._probe import PROBE_SUMMARY_KEYS, bench_sample
from lmcore.tokenizer import load_tokenizer

SUMMARY_KEYS = ("first_val_loss", "final_val_loss", "first_val_reward_margin", "final_val_reward_margin",
                "final_val_reward_accuracy", "trainable_params")


class Summary(ProbeSummary):
    first_val_loss: float
    final_val_loss: float
    first_val_reward_margin: float
    final_val_reward_margin: float
    final_val_reward_accuracy: float
    trainable_params: int


def run(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.params.dpo, ctx.seed
    start, reports = ctx.inputs[model_path("instruct")], ctx.outputs[reports_path("dpo")]
    data = prepare_data(ctx, "dpo", [cfg.source],
                        lambda raw, splits: prepare_instructions(cfg, raw, splits, seed=seed, fields=PREFERENCE_FIELDS))
    summary = train_dpo(
        cfg, start, data.splits, ctx.outputs[model_path("dpo")], reports,
        seed=seed, enc=load_tokenizer(start), params=ctx.params.to_dict(), tracker=ctx.tracker,
        checkpoint_dir=ctx.layout.checkpoints("dpo"), bench_items=bench_sample(ctx, "dpo"),
    )
    return finetuned(
        ctx, "dpo", start=start, data=data, reports=CURVES + (TEST_RESPONSES,),
        item_tables=[ItemTable(RESPONSES_TABLE, response_rows(reports / TEST_RESPONSES))],
        summary={k: summary[k] for k in SUMMARY_KEYS + PROBE_SUMMARY_KEYS if k in summary},
        version_tags={"template": summary["template"], "eval.val_reward_margin": f"{summary['final_val_reward_margin']:.6f}"},
        card=finetune_card(ctx, "dpo", "dpo", start, data, summary,
                           {k: summary[k] for k in ("final_val_reward_margin", "final_val_reward_accuracy") if k in summary}),
        log=f"dpo: val loss {summary['first_val_loss']:.4f} -> {summary['final_val_loss']:.4f}, reward margin "
            f"{summary['first_val_reward_margin']:.4f} -> {summary['final_val_reward_margin']:.4f}",
    )
