"""The training loop every fine-tuning stage shares: epochs of shuffled batches, AdamW, warmup-cosine,
clipping, periodic validation, per-step metrics, a NaN guard.

    history = fit(model, cfg, train_items, collate, loss_fn, evaluate_fn, seed=0, tracker=tracker, desc="instruct")
    write_curves(reports_dir, history, title="instruction fine-tuning")

A stage supplies what differs: how items become a batch (`collate`), the loss and its extra metrics
(`loss_fn`, e.g. DPO rewards) and what validation measures (`evaluate_fn`). Only parameters with
`requires_grad` are optimised, so freezing blocks or adding LoRA adapters is done before `fit`.

Step numbering as in pretraining: train metrics of the k-th update at step k = 1..total; validation
at step 0 (before any update), every `eval_interval` steps and after the last update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmcore.config import FinetuneConfig
from lmcore.io import write_text
from lmcore.paths import LOSS_PLOT, TRAIN_LOSS, VAL_LOSS
from lmcore.tracking import NullTracker, Tracker
from lmcore.training import check_finite, lr_at, make_optimizer, plot_losses

# loss_fn(model, batch) -> (loss to backpropagate, metrics to log: {"loss": ..., ...}).
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
# evaluate_fn(model, max_batches) -> validation metrics ({"loss": ..., ...}); max_batches None: the whole split.
EvalFn = Callable[[torch.nn.Module, int | None], dict[str, float]]


@dataclass
class History:
    """Per-step train metrics (with lr) and periodic validation metrics, as (step, {name: value}) rows."""

    train: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    val: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    train_time_s: float = 0.0

    @property
    def steps(self) -> int:
        return self.train[-1][0] if self.train else 0


def batches(items: Sequence, batch_size: int, generator: torch.Generator | None = None) -> list[list]:
    """Cut `items` into batches, shuffled with `generator` when given (the last batch may be smaller)."""
    order = torch.randperm(len(items), generator=generator).tolist() if generator is not None else range(len(items))
    order = list(order)
    return [[items[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def total_steps(cfg: FinetuneConfig, n_items: int) -> int:
    """Updates the run will make: every batch of every epoch, capped by `max_steps`."""
    per_epoch = math.ceil(n_items / cfg.batch_size)
    total = cfg.epochs * per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps else total


def fit(
    model: torch.nn.Module,
    cfg: FinetuneConfig,
    train_items: Sequence,
    collate: Callable[[list], Any],
    loss_fn: LossFn,
    evaluate_fn: EvalFn,
    *,
    seed: int,
    tracker: Tracker = NullTracker(),
    desc: str = "finetune",
) -> History:
    """Train the parameters of `model` that require grad.

    Args:
        cfg: epochs / max_steps, batch size and optimiser settings, eval cadence.
        train_items: examples; each epoch visits them in a new seeded order, `batch_size` at a time.
        collate: a list of items -> a batch (moved to the device by the caller's collate or loss_fn).
        seed: seeds the shuffling (the same seed gives the same batches).
        tracker: receives train_<metric>, lr, grad_norm per step and val_<metric> at each evaluation.

    Returns: the History. Raises FloatingPointError on a NaN/inf loss, naming the step.
    """
    if not train_items:
        raise ValueError(f"{desc}: no training examples")
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{desc}: no parameter requires grad; nothing to train")
    optimizer = make_optimizer(model, cfg, device)
    total = total_steps(cfg, len(train_items))
    generator = torch.Generator().manual_seed(seed)
    history = History()

    def validate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            metrics = evaluate_fn(model, None if step == total else cfg.eval_batches)
        model.train()
        check_finite(metrics["loss"], f"{desc}: val loss", step, lr_at(step, cfg, total))
        history.val.append((step, metrics))
        tracker.log_metrics({f"val_{k}": v for k, v in metrics.items()}, step=step)

    model.train()
    validate(0)
    step = 0
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
    try:
        while step < total:
            for batch_items in batches(train_items, cfg.batch_size, generator):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, metrics = loss_fn(model, collate(batch_items))
                check_finite(loss.item(), f"{desc}: train loss", step + 1, lr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf).item()
                optimizer.step()
                history.train_time_s += time.perf_counter() - t0
                step += 1

                row = {**metrics, "lr": lr, "grad_norm": grad_norm}
                history.train.append((step, row))
                tracker.log_metrics({(k if k in ("lr", "grad_norm") else f"train_{k}"): v for k, v in row.items()}, step=step)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", val=f"{history.val[-1][1]['loss']:.4f}", refresh=False)
                bar.update()
                if step % cfg.eval_interval == 0 or step == total:
                    validate(step)
                if step == total:
                    break
    finally:
        bar.close()
    return history


def _csv(rows: list[tuple[int, dict[str, float]]], prefix: str) -> str:
    names = list(dict.fromkeys(k for _, row in rows for k in row))  # first-seen order
    header = ["step"] + [k if k in ("lr", "grad_norm") else f"{prefix}_{k}" for k in names]
    lines = [",".join(header)]
    lines += [",".join([str(step)] + [f"{row[k]:.6g}" if k in row else "" for k in names]) for step, row in rows]
    return "\n".join(lines) + "\n"


def write_curves(out_dir: Path, history: History, title: str | None = None) -> None:
    """train_loss.csv (step, train_<metric>.., lr, grad_norm), val_loss.csv (step, val_<metric>..) and loss.png."""
    write_text(out_dir / TRAIN_LOSS, _csv(history.train, "train"))
    write_text(out_dir / VAL_LOSS, _csv(history.val, "val"))
    plot_losses(
        out_dir / LOSS_PLOT,
        [(s, row["loss"], row["lr"]) for s, row in history.train],
        [(s, row["loss"]) for s, row in history.val],
        title=title,
    )
