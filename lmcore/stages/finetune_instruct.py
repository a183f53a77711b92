"""The finetune_instruct stage (book ch. 7): the Alpaca-style instructions collected into
data/finetune/instruct and split; models/base instruction-tuned into models/instruct (its config.json records
the prompt template), with curves, metrics and the test split's responses in reports/instruct (the responses also
as an MLflow table, tables/test_responses.json).

    lmcore run finetune_instruct
    lmcore run finetune_instruct --set finetune_instruct.template=phi3
"""

from __future__ import annotations

from lmcore.finetune.instruct import finetune_instruct, prepare_instructions
from lmcore.paths import TEST_RESPONSES
from lmcore.stages import ItemTable, StageContext, StageResult
from lmcore.stages._finetune import CURVES, RESPONSES_TABLE, finetune_card, finetuned, prepare_data, response_rows
from lmcore.stages._probe import PROBE_SUMMARY_KEYS, bench_sample
from lmcore.tokenizer import load_tokenizer

SUMMARY_KEYS = ("first_val_loss", "final_val_loss", "final_val_bpb", "test_loss", "trainable_params", "test_responses")


def run(ctx: StageContext) -> StageResult:
    cfg, layout, seed = ctx.params.finetune_instruct, ctx.layout, ctx.seed
    data = prepare_data(ctx, "instruct", [cfg.source], lambda raw, splits: prepare_instructions(cfg, raw, splits, seed=seed))
    summary = finetune_instruct(
        cfg, layout.pretrained, data.splits, layout.model("instruct"), layout.reports("instruct"),
        seed=seed, enc=load_tokenizer(layout.pretrained), params=ctx.params.to_dict(), tracker=ctx.tracker,
        checkpoint_dir=layout.checkpoints("finetune_instruct"), bench_items=bench_sample(ctx, "finetune_instruct"),
    )
    return finetuned(
        ctx, "instruct", start=layout.pretrained, data=data, reports=CURVES + (TEST_RESPONSES,),
        item_tables=[ItemTable(RESPONSES_TABLE, response_rows(layout.reports("instruct") / TEST_RESPONSES))],
        summary={k: summary[k] for k in SUMMARY_KEYS + PROBE_SUMMARY_KEYS if k in summary},
        version_tags={
            "template": summary["template"],
            "eval.val_loss": f"{summary['final_val_loss']:.6f}",
            "eval.test_loss": f"{summary['test_loss']:.6f}",
            **({"eval.val_bpb": f"{summary['final_val_bpb']:.6f}"} if "final_val_bpb" in summary else {}),
        },
        card=finetune_card(ctx, "instruct", "finetune_instruct", layout.pretrained, data, summary, {"test_loss": summary["test_loss"]}),
        log=f"instruct: val loss {summary['first_val_loss']:.3f} -> {summary['final_val_loss']:.3f}, test loss {summary['test_loss']:.3f}",
    )
