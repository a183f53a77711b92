"""The finetune_instruct stage (book ch. 7): the Alpaca-style instructions collected into
data/finetune/instruct and split; models/base instruction-tuned into models/instruct (its config.json records
the prompt template), with curves, metrics and the test split's responses in reports/instruct (the responses also
as an MLflow table, tables/test_responses.json).

    lmcore run finetune_instruct
    lmcore run finetune_instruct --set finetune_instruct.template=phi3
"""

from __future__ import annotations

from typing import NotRequired

from lmcore.finetune.instruct import finetune_instruct, prepare_instructions
from lmcore.paths import TEST_RESPONSES, model_path, reports_path
from lmcore.stages import ItemTable, ProbeSummary, StageContext, StageResult
from lmcore.stages._finetune import CURVES, RESPONSES_TABLE, finetune_card, finetuned, prepare_data, response_rows
from lmcore.stages._probe import PROBE_SUMMARY_KEYS, bench_sample
from lmcore.tokenizer import load_tokenizer

SUMMARY_KEYS = ("first_val_loss", "final_val_loss", "final_val_bpb", "test_loss", "trainable_params", "test_responses")


class Summary(ProbeSummary):
    first_val_loss: float
    final_val_loss: float
    final_val_bpb: NotRequired[float]
    test_loss: float
    trainable_params: int
    test_responses: int


def run(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.params.finetune_instruct, ctx.seed
    start, reports = ctx.inputs[model_path("base")], ctx.outputs[reports_path("instruct")]
    data = prepare_data(ctx, "instruct", [cfg.source], lambda raw, splits: prepare_instructions(cfg, raw, splits, seed=seed))
    summary = finetune_instruct(
        cfg, start, data.splits, ctx.outputs[model_path("instruct")], reports,
        seed=seed, enc=load_tokenizer(start), params=ctx.params.to_dict(), tracker=ctx.tracker,
        checkpoint_dir=ctx.layout.checkpoints("finetune_instruct"), bench_items=bench_sample(ctx, "finetune_instruct"),
    )
    return finetuned(
        ctx, "instruct", start=start, data=data, reports=CURVES + (TEST_RESPONSES,),
        item_tables=[ItemTable(RESPONSES_TABLE, response_rows(reports / TEST_RESPONSES))],
        summary={k: summary[k] for k in SUMMARY_KEYS + PROBE_SUMMARY_KEYS if k in summary},
        version_tags={
            "template": summary["template"],
            "eval.val_loss": f"{summary['final_val_loss']:.6f}",
            "eval.test_loss": f"{summary['test_loss']:.6f}",
            **({"eval.val_bpb": f"{summary['final_val_bpb']:.6f}"} if "final_val_bpb" in summary else {}),
        },
        card=finetune_card(ctx, "instruct", "finetune_instruct", start, data, summary, {"test_loss": summary["test_loss"]}),
        log=f"instruct: val loss {summary['first_val_loss']:.3f} -> {summary['final_val_loss']:.3f}, test loss {summary['test_loss']:.3f}",
    )
