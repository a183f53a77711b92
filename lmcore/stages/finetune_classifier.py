"""The finetune_classifier stage (book ch. 6): SMS spam (or any labelled text) collected into
data/finetune/classifier, balanced and split; models/base given an n-class head and fine-tuned into
models/classifier, with metrics, curves, confusion matrix and test predictions in reports/classifier (the
predictions, beside each test text, also as an MLflow table, tables/test_predictions.json).

    lmcore run finetune_classifier
    lmcore run finetune_classifier --set finetune_classifier.lora.enabled=true
"""

from __future__ import annotations

import csv
from pathlib import Path

from lmcore.finetune.classifier import PREDICTIONS, finetune_classifier, prepare_classification
from lmcore.finetune.common import read_split
from lmcore.paths import CONFUSION_PLOT
from lmcore.stages import ItemTable, StageContext, StageResult
from lmcore.stages._finetune import CURVES, finetune_card, finetuned, prepare_data
from lmcore.tokenizer import load_tokenizer

PREDICTIONS_TABLE = "tables/test_predictions.json"  # one row per test example (prediction_rows)


def prediction_rows(splits_dir: Path, predictions_csv: Path, labels: list[str]) -> list[dict]:
    """One row per test example: text, label (the actual one), predicted, correct, where (file:line of the record).

    test_predictions.csv (actual,predicted) follows the test split's order, line for line: the classifier predicts
    the split in order (lmcore.finetune.classifier). Raises ValueError when the two disagree on length or labels.
    """
    examples = read_split(splits_dir, "test")
    with open(predictions_csv, newline="", encoding="utf-8") as f:
        predictions = list(csv.DictReader(f))
    if len(predictions) != len(examples):
        raise ValueError(f"{predictions_csv}: {len(predictions)} predictions for {len(examples)} test examples in {splits_dir}")
    rows = []
    for i, (ex, p) in enumerate(zip(examples, predictions, strict=True)):
        if p["actual"] != labels[ex["label"]]:
            raise ValueError(f"{predictions_csv}: prediction {i + 1} is for a {p['actual']!r} example, but test example "
                             f"{i + 1} is {labels[ex['label']]!r}")
        rows.append({"text": ex["text"], "label": p["actual"], "predicted": p["predicted"],
                     "correct": p["actual"] == p["predicted"], "where": ex.get("where", "")})
    return rows


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
        item_tables=[ItemTable(PREDICTIONS_TABLE, prediction_rows(data.splits, layout.reports("classifier") / PREDICTIONS, cfg.labels))],
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
        card=finetune_card(ctx, "classifier", "finetune_classifier", layout.base_model, data, summary, {
            "labels": ", ".join(cfg.labels), "test_accuracy": test["accuracy"], "test_f1": test["f1"],
            "majority_baseline_accuracy": test["majority_baseline_accuracy"], "val_accuracy": summary["metrics"]["val"]["accuracy"],
        }),
        log=f"classifier: test accuracy {test['accuracy']:.3f} (majority baseline {test['majority_baseline_accuracy']:.3f}), "
            f"F1 {test['f1']:.3f}",
    )
