"""The finetune_classifier stage (book ch. 6): SMS spam (or any labelled text) collected into
data/finetune/classifier, balanced and split; models/base given an n-class head and fine-tuned into
models/classifier, with metrics, curves, confusion matrix and test predictions in reports/classifier (the
predictions, beside each test text, also as an MLflow table, tables/test_predictions.json).

    lmcore run finetune_classifier
    lmcore run finetune_classifier --set finetune_classifier.lora.enabled=true

The classifier's gate: its test accuracy, item by item, against the champion of tracking.classifier_model on the
same test split (a paired test: the standard error of the per-item differences). The test split is fixed by the
data, the seed and the split fractions; a champion scored on another split is re-scored on this one (`rescore`).
The per-item verdicts are in reports/classifier/gate (results.json, samples/test.jsonl).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TypedDict

from lmcore.finetune.classifier import PREDICTIONS, classify, finetune_classifier, load_classifier, prepare_classification
from lmcore.finetune.common import read_split
from lmcore.harness.metrics import mean_stderr
from lmcore.io import atomic_dir, write_json, write_text
from lmcore.paths import CONFUSION_PLOT, WEIGHTS, finetune_data_path, model_path, reports_path
from lmcore.stages import Artifact, ItemTable, Scores, StageContext, StageResult
from lmcore.stages._finetune import CURVES, finetune_card, finetuned, prepare_data
from lmcore.tokenizer import load_tokenizer

PREDICTIONS_TABLE = "tables/test_predictions.json"  # one row per test example (prediction_rows)
GATE_DIR = "gate"  # reports/classifier/gate: the test split's per-item verdicts, for the promotion gate
TASK = "test"  # the gate's task name: its metric is test.accuracy
METRIC = f"{TASK}.accuracy"


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


def split_sha256(examples: list[dict]) -> str:
    """Identifies the test split scored: every example's text and label, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["text"], ex["label"]], ensure_ascii=False).encode())
    return h.hexdigest()


def write_gate_results(out_dir: Path, examples: list[dict], predicted: list[str], labels: list[str], model_ref: str) -> Scores:
    """The per-item verdicts of one classifier on the test split (results.json, samples/test.jsonl: prompt = the
    text, gold and answer = the labels) into `out_dir`, and its Scores on METRIC."""
    records = [{"task": TASK, "doc_id": i, "prompt": ex["text"], "gold": labels[ex["label"]], "answer": p,
                "correct": p == labels[ex["label"]]} for i, (ex, p) in enumerate(zip(examples, predicted, strict=True))]
    verdicts = [float(r["correct"]) for r in records]
    accuracy, stderr = sum(verdicts) / len(verdicts), mean_stderr(verdicts) or 0.0
    sha = split_sha256(examples)
    results = {"kind": "classifier", "model": model_ref, "sample_sha256": sha, "n_items": len(records), "groups": {},
               "tasks": {TASK: {"n": len(records), "accuracy": accuracy, "accuracy_stderr": stderr, "meaningful": True,
                                "note": None, "chance": 1 / len(labels)}}}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "results.json", results)
        write_text(tmp / "samples" / f"{TASK}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Scores(Path(), {METRIC: accuracy, f"{METRIC}_stderr": stderr}, METRIC, sha, results_dir=Path(out_dir))


def rescore(ctx: StageContext, model_dir: Path, out_dir: Path, model_ref: str) -> Scores:
    """Another classifier (the champion, downloaded) scored on this run's test split."""
    model, labels, max_length = load_classifier(model_dir)
    examples = read_split(ctx.outputs[finetune_data_path("classifier")] / "splits", "test")
    probs = classify(model, load_tokenizer(model_dir), [ex["text"] for ex in examples], max_length)
    scores = write_gate_results(out_dir, examples, [labels[i] for i in probs.argmax(axis=1)], labels, model_ref)
    return dataclasses.replace(scores, weights=Path(model_dir) / WEIGHTS)


class Summary(TypedDict):
    test_accuracy: float
    test_f1: float
    val_accuracy: float
    majority_baseline_accuracy: float
    trainable_params: int


def run(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.params.finetune_classifier, ctx.seed
    start, model_dir, reports = ctx.inputs[model_path("base")], ctx.outputs[model_path("classifier")], ctx.outputs[reports_path("classifier")]
    data = prepare_data(ctx, "classifier", cfg.sources, lambda raw, splits: prepare_classification(cfg, raw, splits, seed=seed))
    summary = finetune_classifier(
        cfg, start, data.splits, model_dir, reports,
        seed=seed, enc=load_tokenizer(start), params=ctx.params.to_dict(), tracker=ctx.tracker,
        checkpoint_dir=ctx.layout.checkpoints("finetune_classifier"),
    )
    test = summary["metrics"]["test"]
    rows = prediction_rows(data.splits, reports / PREDICTIONS, cfg.labels)
    scores = write_gate_results(reports / GATE_DIR, read_split(data.splits, "test"),
                                [r["predicted"] for r in rows], cfg.labels, "models/classifier")
    result = finetuned(
        ctx, "classifier", start=start, data=data, reports=CURVES + (CONFUSION_PLOT, PREDICTIONS),
        item_tables=[ItemTable(PREDICTIONS_TABLE, rows)],
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
        card=finetune_card(ctx, "classifier", "finetune_classifier", start, data, summary, {
            "labels": ", ".join(cfg.labels), "test_accuracy": test["accuracy"], "test_f1": test["f1"],
            "majority_baseline_accuracy": test["majority_baseline_accuracy"], "val_accuracy": summary["metrics"]["val"]["accuracy"],
        }),
        log=f"classifier: test accuracy {test['accuracy']:.3f} (majority baseline {test['majority_baseline_accuracy']:.3f}), "
            f"F1 {test['f1']:.3f}",
    )
    result.scores = dataclasses.replace(scores, weights=model_dir / WEIGHTS, results_artifact=f"reports/{GATE_DIR}")
    result.artifacts.append(Artifact(reports / GATE_DIR, f"reports/{GATE_DIR}"))
    return result
