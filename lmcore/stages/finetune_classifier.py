"""The finetune_classifier stage (book ch. 6): SMS spam (or any labelled text) collected into
data/finetune/classifier, balanced and split; models/base given an n-class head and fine-tuned into
models/classifier, with metrics, curves, confusion matrix and test predictions in reports/classifier.

    lmcore run finetune_classifier
    lmcore run finetune_classifier --set finetune_classifier.lora.enabled=true
"""

from __future__ import annotations

from lmcore.finetune.classifier import PREDICTIONS, finetune_classifier, prepare_classification
from lmcore.paths import CONFUSION_PLOT
from lmcore.stages import StageContext, StageResult
from lmcore.stages._finetune import CURVES, finetuned, prepare_data
from lmcore.tokenizer import load_tokenizer


def run(ctx: StageContext) -> StageResult:
    cfg, layout, seed = ctx.params.finetune_classifier, ctx.layout, ctx.seed
    data = prepare_data(ctx, "classifier", cfg.sources, lambda raw, splits: prepare_classification(cfg, raw, splits, seed=seed))
    summary = finetune_classifier(
        cfg, layout.base_model, data.splits, layout.model("classifier"), layout.reports("classifier"),
        seed=seed, enc=load_tokenizer(layout.base_model), params=ctx.params.to_dict(), tracker=ctx.tracker,
        checkpoint_dir=layout.checkpoints("finetune_classifier"),
    )
    test = summary["metrics"]["test"]
    return finetuned(
        ctx, "classifier", start=layout.base_model, data=data, reports=CURVES + (CONFUSION_PLOT, PREDICTIONS),
        summary={
            "test_accuracy": test["accuracy"],
            "test_f1": test["f1"],
            "val_accuracy": summary["metrics"]["val"]["accuracy"],
            "majority_baseline_accuracy": test["majority_baseline_accuracy"],
            "trainable_params": summary["trainable_params"],
        },
        version_tags={
            "labels": ",".join(cfg.labels),
            "eval.test_accuracy": f"{test['accuracy']:.6f}",
            "eval.test_f1": f"{test['f1']:.6f}",
        },
        log=f"classifier: test accuracy {test['accuracy']:.3f} (majority baseline {test['majority_baseline_accuracy']:.3f}), "
            f"F1 {test['f1']:.3f}",
    )
