"""Classification fine-tuning (book ch. 6): spam vs ham, or any two-column labelled text file.

    stats = prepare_classification(params.finetune_classifier, Path("data/finetune/classifier/raw"),
                                   Path("data/finetune/classifier/splits"), seed=params.seed)
    summary = finetune_classifier(params.finetune_classifier, Path("models/base"), Path("data/finetune/classifier/splits"),
                                  Path("models/classifier"), Path("reports/classifier"), seed=params.seed, enc=enc)

The pretrained LM head is replaced by an n-class linear head. Texts are padded on the right in each
batch; attention is causal, so padding never changes the real tokens' states, and the class logits
are read at the last real token (the only one that has seen the whole text). By default the last
`trainable_blocks` blocks, the final norm and the head train; with LoRA, the adapters and the head.

Frozen-prefix caching (`cache_frozen`): when only the last blocks train, what the frozen blocks make of each
example never changes, so it is computed once (GPT.prefix) for the train, validation and test examples, and
every step and evaluation pass runs the trainable blocks alone on it (GPT.suffix). With 1 block of SmolLM2's 30
training, a step costs about a thirtieth of the forward it replaces, and the classifier can afford several epochs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from lmcore.checkpoint import HEAD_CLASSIFIER, HEAD_KEY, load_model, read_model_config, save_model
from lmcore.config import ClassifierConfig
from lmcore.finetune.common import (
    add_lora,
    check_length,
    log_trainable,
    raw_files,
    read_split,
    relative_read_stats,
    save_and_merge_lora,
    setup,
    write_splits,
)
from lmcore.finetune.data import balance, collate_classify, read_labelled_text, split
from lmcore.finetune.trainer import batches, fit, write_curves
from lmcore.io import atomic_dir, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import CONFUSION_PLOT, METRICS, SUMMARY
from lmcore.tracking import NullTracker, Tracker
from lmcore.training import Precision, resolve_precision

PREDICTIONS = "test_predictions.csv"  # actual,predicted per test example: DVC's confusion-matrix plot


def prepare_classification(cfg: ClassifierConfig, raw_dir: Path, out_dir: Path, *, seed: int) -> dict:
    """Read the collected files, balance the classes, split train/val/test; write them with stats.json.

    Returns: the stats (rows read, bad records by reason, per-label counts before and after balancing, split sizes).
    """
    records, read_stats = read_labelled_text(
        raw_files(raw_dir),
        labels=cfg.labels,
        label_column=cfg.label_column,
        delimiter=cfg.delimiter,
        on_bad=cfg.on_bad,
        max_bad_fraction=cfg.max_bad_fraction,
    )
    read_stats = relative_read_stats(read_stats, raw_dir)
    if cfg.balance:
        records = balance(records, seed)
    parts = split(records, (cfg.train_fraction, cfg.val_fraction), seed, stratify="label" if cfg.stratify else None)
    named = dict(zip(("train", "val", "test"), parts))
    for name, rows in named.items():
        if not rows:
            raise ValueError(f"finetune_classifier: the {name} split is empty ({len(records)} records after balancing)")
    counts = {name: _per_label(rows, cfg.labels) for name, rows in named.items()}
    stats = {"read": read_stats, "balanced": cfg.balance, "records": len(records), "splits": counts}
    write_splits(out_dir, named, stats)
    return stats


def _per_label(rows: list[dict], labels: list[str]) -> dict[str, int]:
    return {label: sum(r["label"] == i for r in rows) for i, label in enumerate(labels)}


def _last_token_logits(model: GPT, inputs: torch.Tensor, lengths: torch.Tensor, start: int = 0) -> torch.Tensor:
    """(B, K) class logits at each example's last real token. inputs: (B, T) token ids, or with `start` > 0 the
    (B, T, C) residual stream after the first `start` (frozen) blocks (GPT.prefix)."""
    hidden = model.suffix(inputs, start) if start else model.hidden(inputs)  # (B, T, C)
    last = hidden[torch.arange(inputs.size(0), device=inputs.device), lengths - 1]  # (B, C)
    return model.lm_head(last)  # (B, K)


class _Cached:
    """A training example with what the frozen blocks make of it (the (T, C) residual stream); its repr is the
    example's, so the batch stream's fingerprint (exact resume) does not depend on the caching."""

    __slots__ = ("ids", "label", "state")

    def __init__(self, ids: list[int], label: int, state: torch.Tensor):
        self.ids, self.label, self.state = ids, label, state

    def __repr__(self) -> str:
        return repr((self.ids, self.label))


def _frozen_blocks(model: GPT, cfg: ClassifierConfig) -> int:
    """The leading blocks that never change in this run and whose output can be cached: 0 when none (everything
    or LoRA adapters train, caching is off, or dropout makes every pass through them differ)."""
    if not cfg.cache_frozen or cfg.lora.enabled or cfg.trainable_blocks is None or model.config.dropout > 0:
        return 0
    return len(model.blocks) - min(cfg.trainable_blocks, len(model.blocks))


@torch.no_grad()
def _cache_prefix(model: GPT, items: list[tuple[list[int], int]], start: int, to_device, batch_size: int,
                  precision: Precision) -> list[_Cached]:
    """Each example with its frozen blocks' output, computed in length-sorted batches (little padding)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    cached: list[_Cached | None] = [None] * len(items)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        inputs, lengths, _ = to_device([items[i] for i in chunk])
        with precision.autocast():
            states = model.prefix(inputs, start)  # (B, T, C)
        for i, state, n in zip(chunk, states, lengths.tolist()):
            cached[i] = _Cached(items[i][0], items[i][1], state[:n].clone())
    model.train(was_training)
    return cached


def _collate_states(batch: list[_Cached]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached examples -> (B, T, C) residual streams right-padded with zeros, lengths (B,), labels (B,)."""
    lengths = torch.tensor([len(c.state) for c in batch])
    states = torch.zeros(len(batch), int(lengths.max()), batch[0].state.shape[-1], dtype=batch[0].state.dtype,
                         device=batch[0].state.device)
    for b, c in enumerate(batch):
        states[b, : len(c.state)] = c.state
    return states, lengths.to(states.device), torch.tensor([c.label for c in batch], device=states.device)


@torch.no_grad()
def predict(model: GPT, batches: list, start: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Returns: true labels, class probabilities (N, K) and the mean cross-entropy over the examples.

    batches: (inputs, lengths, labels); with `start` the inputs are residual streams after `start` blocks."""
    was_training = model.training
    model.eval()
    ys, probs, loss_sum = [], [], 0.0
    for inputs, lengths, labels in batches:
        logits = _last_token_logits(model, inputs, lengths, start).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        ys.append(labels.cpu())
        probs.append(torch.softmax(logits, dim=-1).cpu())
    model.train(was_training)
    y = torch.cat(ys).numpy()
    return y, torch.cat(probs).numpy(), loss_sum / max(1, len(y))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and the confusion matrix (rows: true label, columns: predicted).

    Two classes: precision/recall/F1 of the positive class, the last label (spam). More: macro averages.
    """
    ids = list(range(len(labels)))
    binary = len(labels) == 2
    p, r, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, pos_label=1, average="binary" if binary else "macro", zero_division=0
    )
    _, _, f1_macro, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f1),
        "f1_macro": float(f1_macro),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def _plot_confusion(path: Path, matrices: dict[str, list[list[int]]], labels: list[str]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(matrices), 3.6), dpi=100)
    for ax, (split_name, cm) in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        for (i, j), n in np.ndenumerate(cm):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > cm.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(split_name)
    fig.tight_layout()
    with open(path, "wb") as f:
        fig.savefig(f, format="png")


def _make_trainable(model: GPT, cfg: ClassifierConfig) -> list[str]:
    """Freeze what stays fixed; returns the LoRA-wrapped modules (empty without LoRA)."""
    if cfg.lora.enabled:
        wrapped = add_lora(model, cfg.lora)  # freezes everything, then adds adapters
        model.lm_head.requires_grad_(True)
        return wrapped
    if cfg.trainable_blocks is None:
        model.requires_grad_(True)
        return []
    model.requires_grad_(False)
    n = min(cfg.trainable_blocks, len(model.blocks))
    for block in model.blocks[len(model.blocks) - n :]:
        block.requires_grad_(True)
    model.norm_f.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    return []


def finetune_classifier(
    cfg: ClassifierConfig,
    base_model_dir: Path,
    splits_dir: Path,
    model_dir: Path,
    reports_dir: Path,
    *,
    seed: int,
    enc,
    params: dict | None = None,
    tracker: Tracker = NullTracker(),
    checkpoint_dir: Path | None = None,
) -> dict:
    """Fine-tune a classifier from the pretrained model and evaluate it on validation and test.

    Args:
        cfg: the finetune_classifier params (labels, trainable blocks or LoRA, optimisation).
        base_model_dir: the pretrained model folder.
        splits_dir: prepare_classification's output (train/val/test.jsonl).
        model_dir: replaced by the classifier (merged weights; config.json names the labels).
        reports_dir: replaced by metrics.json, summary.json, loss curves, confusion matrix, test predictions.
        enc: the tiktoken encoding.
        checkpoint_dir: training checkpoints every cfg.checkpoint_interval steps, resumed with cfg.resume; None: none.

    Returns: the summary: counts, val/test metrics, majority-class baseline, first/final val loss.
    """
    device = setup(cfg, seed)
    labels = list(cfg.labels)
    model = load_model(base_model_dir, device)
    max_length = check_length(cfg.max_length, model, "finetune_classifier")
    model.replace_head(len(labels))
    model.to(device)
    wrapped = _make_trainable(model, cfg)
    counts = log_trainable(model, tracker)

    def encode(rows: list[dict]) -> list[tuple[list[int], int]]:
        return [(enc.encode_ordinary(r["text"]) or [enc.eot_token], r["label"]) for r in rows]

    def to_device(items: list) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in collate_classify(items, pad_id=enc.eot_token, max_length=max_length))

    train, val, test = (encode(read_split(splits_dir, s)) for s in ("train", "val", "test"))
    eval_bs = max(cfg.batch_size, 32)
    train_labels = [label for _, label in train]
    start = _frozen_blocks(model, cfg)
    collate = to_device
    prefix_s = 0.0
    if start:
        t0 = time.perf_counter()
        precision = resolve_precision(cfg.precision, device, "finetune_classifier.precision")
        train, val, test = (_cache_prefix(model, rows, start, to_device, eval_bs, precision) for rows in (train, val, test))
        collate = _collate_states
        prefix_s = time.perf_counter() - t0
        tracker.log_metrics({"cached_prefix_s": prefix_s}, step=0)
    val_batches = [collate(b) for b in batches(val, eval_bs)]
    test_batches = [collate(b) for b in batches(test, eval_bs)]

    def loss_fn(model: GPT, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, lengths, y = batch
        logits = _last_token_logits(model, inputs, lengths, start)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"loss": loss.item(), "accuracy": (logits.argmax(-1) == y).float().mean().item()}

    def evaluate_fn(model: GPT, max_batches: int | None) -> dict[str, float]:
        y, probs, loss = predict(model, val_batches[:max_batches] if max_batches else val_batches, start)
        return {"loss": loss, "accuracy": float((probs.argmax(1) == y).mean())}

    history = fit(model, cfg, train, collate, loss_fn, evaluate_fn, seed=seed, tracker=tracker, desc="finetune_classifier",
                  checkpoint_dir=checkpoint_dir, start=base_model_dir)

    metrics, confusion, predictions = {}, {}, {}
    for name, split_batches in (("val", val_batches), ("test", test_batches)):
        y, probs, loss = predict(model, split_batches, start)
        predictions[name] = (y, probs.argmax(1))
        scores = classification_metrics(y, probs.argmax(1), labels)
        confusion[name] = scores.pop("confusion_matrix")
        metrics[name] = {"loss": loss, **scores}
    majority = int(np.bincount(train_labels, minlength=len(labels)).argmax())
    metrics["test"]["majority_baseline_accuracy"] = float((predictions["test"][0] == majority).mean())
    tracker.log_metrics({f"{name}_{k}": v for name, d in metrics.items() for k, v in d.items()}, step=history.steps)
    summary = {
        "labels": labels,
        "examples": {"train": len(train), "val": len(val), "test": len(test)},
        **counts,
        "lora": bool(wrapped),
        "cached_frozen_blocks": start,
        "cached_prefix_s": round(prefix_s, 3),  # the frozen blocks over every example, once
        "steps": history.steps,
        "train_time_s": round(history.train_time_s, 3),
        "first_val_loss": history.val[0][1]["loss"],
        "final_val_loss": history.val[-1][1]["loss"],
        "majority_label": labels[majority],
        "metrics": metrics,
        "confusion_matrix": confusion,
    }

    with atomic_dir(model_dir) as model_tmp, atomic_dir(reports_dir) as reports_tmp:
        if wrapped:
            save_and_merge_lora(model, cfg.lora, wrapped, model_tmp)
        extra = {HEAD_KEY: {"type": HEAD_CLASSIFIER, "labels": labels}, "max_length": max_length, "tokenizer": enc.name}
        save_model(model, model_tmp, params=params, extra=extra)
        enc.save(model_tmp)
        write_curves(reports_tmp, history, title="classifier fine-tuning")
        write_json(reports_tmp / METRICS, metrics)
        write_json(reports_tmp / SUMMARY, summary)
        _plot_confusion(reports_tmp / CONFUSION_PLOT, summary["confusion_matrix"], labels)
        rows = "".join(f"{labels[a]},{labels[p]}\n" for a, p in zip(*predictions["test"]))
        write_text(reports_tmp / PREDICTIONS, "actual,predicted\n" + rows)
    return summary


def load_classifier(model_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, list[str], int]:
    """The classifier, its labels and its max_length. Raises ValueError for a model folder without a classifier head."""
    _, extra = read_model_config(model_dir)
    head = extra.get(HEAD_KEY) or {}
    if head.get("type") != HEAD_CLASSIFIER:
        raise ValueError(f"{model_dir}: not a classifier (config.json has no classifier head)")
    model = load_model(model_dir, device)
    return model, list(head["labels"]), int(extra.get("max_length") or model.config.context_length)


@torch.no_grad()
def classify(model: GPT, enc, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (N, K) for each text."""
    device = next(model.parameters()).device
    items = [(enc.encode_ordinary(t) or [enc.eot_token], 0) for t in texts]
    return predict(model, [
        tuple(x.to(device) for x in collate_classify(b, pad_id=enc.eot_token, max_length=max_length))
        for b in batches(items, batch_size)
    ])[1]
