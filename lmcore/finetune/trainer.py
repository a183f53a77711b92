"""What every fine-tuning stage trains with: `fit`, a stream of shuffled batches over the epochs run through
lmcore.training.train_loop, the loop pretraining runs too (its docstring lays it out: validation, benchmark probe,
checkpoints, the updates with AdamW, warmup-cosine, precision, gradient accumulation, clipping and the NaN guard).

    history = fit(model, cfg, train_items, collate, loss_fn, evaluate_fn, seed=0, tracker=tracker, desc="finetune_instruct",
                  checkpoint_dir=Path("models/checkpoints/instruct"))
    write_curves(reports_dir, history, title="instruction fine-tuning")

A stage supplies what differs: how items become a batch (`collate`), the loss and its extra metrics
(`loss_fn`, e.g. DPO rewards) and what validation measures (`evaluate_fn`). Only parameters with
`requires_grad` are optimised, so freezing blocks or adding LoRA adapters is done before `fit`.

Batches: each epoch visits the items in a new order drawn from a generator seeded with `seed`, `batch_size` at
a time (the last batch of an epoch may be smaller); the epochs form one stream, and an optimizer step consumes
`grad_accum_steps` batches of it. Total steps = ceil(epochs x batches per epoch / grad_accum_steps), capped by
`max_steps`; the lr schedule runs over them.

What fit gives the loop: validation on `eval_batches` batches, on the whole split after the last update, rows
(step, {metric: value}), logged as val_<metric> with val_time_s; per step the loss_fn's metrics with lr and
grad_norm, rows (step, {metric: value}), logged as train_<metric>, lr, grad_norm and step_time_s. No early
stopping (the fine-tunes' params have none). With a `probe` (lmcore.harness.probe.BenchProbe) a fixed benchmark
sample is scored at step 0, every N steps and after the last update, logged as train_bench.<task>.<metric> and
kept in History.bench (bench_curve.csv).

Checkpoints (lmcore.training.save_checkpoint) every `checkpoint_interval` steps into `checkpoint_dir`: the
model (LoRA adapters and heads included), the optimizer, the RNG states (dropout) and the position in the batch
stream. With `resume` the run continues from the latest one and ends as an uninterrupted run ends, bit for bit
on CPU; what is built before `fit` (the start model, a DPO reference) is rebuilt from its folder as before.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmcore.config import FinetuneConfig
from lmcore.io import sha256_file, write_text
from lmcore.paths import BENCH_CURVE, LOSS_PLOT, TRAIN_LOSS, VAL_LOSS, WEIGHTS
from lmcore.tracking import NullTracker, Tracker
from lmcore.training import (
    Precision,
    Probe,
    StepResult,
    TrainState,
    lr_at,
    make_optimizer,
    metrics_csv,
    plot_losses,
    resolve_precision,
    start_or_resume,
    train_loop,
)

# loss_fn(model, batch) -> (loss to backpropagate, metrics to log: {"loss": ..., ...}).
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
# evaluate_fn(model, max_batches) -> validation metrics ({"loss": ..., ...}); max_batches None: the whole split.
EvalFn = Callable[[torch.nn.Module, int | None], dict[str, float]]
STREAM_STATE_VERSION = 1


@dataclass
class History:
    """Per-step train metrics (with lr) and periodic validation metrics, as (step, {name: value}) rows."""

    train: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    val: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    train_time_s: float = 0.0
    bench: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # the benchmark probe's scores, if any

    @property
    def steps(self) -> int:
        return self.train[-1][0] if self.train else 0


def batches(items: Sequence, batch_size: int, generator: torch.Generator | None = None) -> list[list]:
    """Cut `items` into batches, shuffled with `generator` when given (the last batch may be smaller)."""
    order = torch.randperm(len(items), generator=generator).tolist() if generator is not None else range(len(items))
    order = list(order)
    return [[items[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


class EpochBatches:
    """An endless stream of batches: epoch after epoch, the items in a new order from a generator seeded with
    `seed` (epoch e's order is the generator's (e+1)-th permutation), `batch_size` at a time.

    state_dict() is the position (epoch, batch within it) and a fingerprint of the items; load_state_dict()
    replays the earlier epochs' permutations, so the next batch is the one that followed.
    """

    def __init__(self, items: Sequence, batch_size: int, seed: int):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.per_epoch = math.ceil(len(items) / batch_size)
        self.epoch, self.position = 0, 0  # the next batch: `position` of epoch `epoch`
        self._generator = torch.Generator().manual_seed(seed)
        self._order: list[int] | None = None  # this epoch's order, drawn at its first batch
        self._fingerprint: str | None = None

    def next_batch(self) -> list:
        if self._order is None:
            self._order = torch.randperm(len(self.items), generator=self._generator).tolist()
        start = self.position * self.batch_size
        batch = [self.items[i] for i in self._order[start : start + self.batch_size]]
        self.position += 1
        if self.position == self.per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    @property
    def fingerprint(self) -> str:
        """sha256 of the items' repr: a resumed run must see the same examples in the same order."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(repr(list(self.items)).encode()).hexdigest()
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STREAM_STATE_VERSION, "seed": self.seed, "batch_size": self.batch_size, "items": len(self.items),
            "fingerprint": self.fingerprint, "epoch": self.epoch, "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises: ValueError when the state was saved for other items, another seed or another batch size."""
        if state.get("version") != STREAM_STATE_VERSION:
            raise ValueError(f"batch stream state version {state.get('version')!r}; this lmcore reads {STREAM_STATE_VERSION}")
        here = self.state_dict()
        wrong = [f"{k}={state[k]!r} (saved) vs {here[k]!r} (now)" for k in ("seed", "batch_size", "items", "fingerprint") if state[k] != here[k]]
        if wrong:
            raise ValueError("batch stream state does not match these training items: " + ", ".join(wrong))
        self._generator = torch.Generator().manual_seed(self.seed)
        for _ in range(state["epoch"]):  # the finished epochs' orders
            torch.randperm(len(self.items), generator=self._generator)
        self.epoch, self.position, self._order = state["epoch"], 0, None
        if state["position"]:
            self._order = torch.randperm(len(self.items), generator=self._generator).tolist()
            self.position = state["position"]


def total_steps(cfg: FinetuneConfig, n_items: int) -> int:
    """Updates the run will make: every batch of every epoch, `grad_accum_steps` per update, capped by `max_steps`."""
    per_epoch = math.ceil(n_items / cfg.batch_size)
    total = math.ceil(cfg.epochs * per_epoch / cfg.grad_accum_steps)
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
    checkpoint_dir: Path | None = None,
    start: Path | None = None,
    probe: Probe | None = None,
) -> History:
    """Train the parameters of `model` that require grad.

    Args:
        cfg: epochs / max_steps, batch size, grad_accum_steps, precision and optimiser settings, eval cadence,
            checkpoint_interval / keep_checkpoints / resume.
        train_items: examples; each epoch visits them in a new seeded order, `batch_size` at a time.
        collate: a list of items -> a batch (moved to the device by the caller's collate or loss_fn).
        seed: seeds the shuffling (the same seed gives the same batches).
        tracker: receives train_<metric>, lr, grad_norm per step and val_<metric> at each evaluation.
        desc: the stage, its params section (finetune_classifier, finetune_instruct, dpo): names it in
            messages and in the checkpoints' config.
        checkpoint_dir: where training checkpoints go every `cfg.checkpoint_interval` steps; None writes none.
            With `cfg.resume` the run continues from the latest one there; without, old ones are removed.
        start: the model folder training started from; its weights' sha256 is part of the checkpoints' config, so a
            run does not resume from checkpoints of another start model.
        probe: a benchmark probe scored when `probe.due(step)`, its metrics logged at that step.

    Returns: the History.
    Raises: FloatingPointError on a NaN/inf loss or gradient norm, naming the step; CheckpointError when the
        checkpoint to resume was written under other settings.
    """
    if not train_items:
        raise ValueError(f"{desc}: no training examples")
    if cfg.resume and checkpoint_dir is None:
        raise ValueError(f"{desc}: resume needs a checkpoint_dir")
    device = next(model.parameters()).device
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{desc}: no parameter requires grad; nothing to train")
    precision = resolve_precision(cfg.precision, device, key=f"{desc}.precision")
    optimizer = make_optimizer(model, cfg, device)
    total = total_steps(cfg, len(train_items))
    state = TrainState(loader=EpochBatches(train_items, cfg.batch_size, seed), scaler=precision.grad_scaler())
    run_config = {desc: cfg.resume_key(), "seed": seed}
    if start is not None:
        run_config["start_weights_sha256"] = sha256_file(Path(start) / WEIGHTS)
    resumed_at = start_or_resume(checkpoint_dir, cfg.resume, model, optimizer, state, run_config, what=desc)

    def evaluate(step: int) -> tuple[tuple, dict[str, float]]:
        t0 = time.perf_counter()
        metrics = validate(model, evaluate_fn, None if step == total else cfg.eval_batches, precision)
        # its own time: between two logged steps an evaluation would otherwise look like a slow step
        return (step, metrics), {**{f"val_{k}": v for k, v in metrics.items()}, "val_time_s": time.perf_counter() - t0}

    def record(step: int, out: StepResult, lr: float, dt: float) -> tuple[tuple, dict[str, float]]:
        row = {**out.metrics, "lr": lr, "grad_norm": out.grad_norm}
        return (step, row), {**{(k if k in ("lr", "grad_norm") else f"train_{k}"): v for k, v in row.items()}, "step_time_s": dt}

    model.train()
    train_loop(model, optimizer, state, cfg, total=total, next_batch=lambda: collate(state.loader.next_batch()),
               loss_fn=lambda batch: loss_fn(model, batch), schedule=lambda step: lr_at(step, cfg, total),
               evaluate=evaluate, record=record, precision=precision, run_config=run_config, checkpoint_dir=checkpoint_dir,
               resumed_at=resumed_at, probe=probe, tracker=tracker, what=desc)
    return History(train=state.train_rows, val=state.val_rows, train_time_s=state.train_time_s, bench=state.bench_rows)


def validate(model: torch.nn.Module, evaluate_fn: EvalFn, max_batches: int | None, precision: Precision) -> dict[str, float]:
    """evaluate_fn in eval mode, without gradients, under the training precision."""
    model.eval()
    with torch.no_grad(), precision.autocast():
        metrics = evaluate_fn(model, max_batches)
    model.train()
    return metrics


def _csv(rows: list[tuple[int, dict[str, float]]], prefix: str) -> str:
    return metrics_csv(rows, lambda k: k if k in ("lr", "grad_norm") else f"{prefix}_{k}")


def write_curves(out_dir: Path, history: History, title: str | None = None) -> None:
    """train_loss.csv (step, train_<metric>.., lr, grad_norm), val_loss.csv (step, val_<metric>..) and loss.png;
    bench_curve.csv (step, train_bench.<task>.<metric>..) when a benchmark probe ran."""
    write_text(out_dir / TRAIN_LOSS, _csv(history.train, "train"))
    write_text(out_dir / VAL_LOSS, _csv(history.val, "val"))
    if history.bench:
        write_text(out_dir / BENCH_CURVE, metrics_csv(history.bench))
    plot_losses(
        out_dir / LOSS_PLOT,
        [(s, row["loss"], row["lr"]) for s, row in history.train],
        [(s, row["loss"]) for s, row in history.val],
        title=title,
    )
