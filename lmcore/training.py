"""What every trainer shares: device and precision, AdamW and its schedule, the optimizer step, the training
state, checkpoint save and restore, the training loop, the loss plot.

    state = TrainState(loader=loader, scaler=precision.grad_scaler())
    resumed_at = start_or_resume(checkpoint_dir, resume, model, optimizer, state, run_config, what="pretrain")
    stopped_early = train_loop(model, optimizer, state, cfg, total=cfg.max_steps, next_batch=loader.next_batch,
                               loss_fn=loss_fn, schedule=lambda step: lr_at(step, cfg), evaluate=evaluate, record=record,
                               precision=precision, run_config=run_config, checkpoint_dir=checkpoint_dir,
                               resumed_at=resumed_at, what="pretrain")

Used by lmcore.pretrain (pretraining) and lmcore.finetune.trainer (classifier, instruct, DPO): both run
`train_loop`, and say only what differs through its arguments.

The loop (`train_loop`), top to bottom, for step = the updates done so far, from state.step to `total`:
    1. evaluate at step 0 (the initial model), every `eval_interval` steps and at the last step: the caller's
       `evaluate(step)` gives the row TrainState.val_rows keeps and the metrics to log; a NaN/inf val loss stops
       the run; with `early_stopping` the val loss updates state.early_stopping, which may end the run;
    2. the benchmark probe, when due (step 0, every N steps, the last step: `total` or where early stopping ended);
    3. a training checkpoint every `checkpoint_interval` steps (`save_checkpoint`);
    4. stop at `total` (or early); else one update (`train_step`) on `grad_accum_steps` micro-batches, each drawn
       by `next_batch()`, at the lr `schedule(step)`; the caller's `record(step + 1, result, lr, seconds)` gives the row
       TrainState.train_rows keeps and the metrics to log at step + 1 (train metrics of the k-th update at step k).
Metrics go to the tracker with their steps moved by `step_offset` (a continued champion's), from rank 0 only;
the progress bar shows the last train and val loss. A resumed run skips 1-3 at the step it resumes at: they ran
before that checkpoint was written.

One update (`train_step`): the micro-batches forward and backward under the configured precision (fp32, or
bf16/fp16 autocast; fp16 with a gradient scaler), each micro-batch's loss divided by their number so that the
summed gradients are those of their mean; under DDP only the last backward all-reduces. Then the NaN/inf guard
on the loss, gradients clipped to `grad_clip`, the guard on the gradient norm, AdamW, zero_grad.

Weight decay: only on the matmul weights (Linear layers). Biases, norm gains and the embedding tables
(the tied LM head is the token embedding) never decay.

Checkpoints (`save_checkpoint` / `restore_checkpoint`, on top of lmcore.checkpoint's step folders): the model,
the optimizer, the python/numpy/torch RNG states, the `TrainState` (step, loss history, train time,
early-stopping state, the data loader's position, the gradient scaler) and the run's config with its hash. A
resumed run ends with the weights an uninterrupted run ends with, bit for bit on CPU. Checkpoints are only
written from finite weights, so the last one on disk is the last good state.

MFU = FLOPs per token x tokens per second per device / peak FLOP/s of the device in the precision used, with
FLOPs per token = 6N + 12 L H Q T (PaLM, appendix B; N the non-embedding parameters, L layers, H heads, Q head
size, T context); the peak is `peak_flops` or measured once by `measure_peak_flops`.

Bits per byte (`token_bytes`, `bpb_sums`, `bits_per_byte`), as nanochat's evaluate_bpb: the summed next-token
loss in nats / ln 2 / the UTF-8 bytes of the targets scored. Special tokens and ids past the tokenizer's
vocabulary stand for no bytes, and their loss is left out too. Unlike a per-token loss it does not depend on
the tokenizer, so runs with different vocabularies compare.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from lmcore import distributed
from lmcore.checkpoint import (
    CONFIG_HASH_KEY,
    CONFIG_KEY,
    STEP_KEY,
    CheckpointError,
    TrainingCheckpoint,
    config_hash,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    remove_checkpoints,
    save_training_checkpoint,
    step_dir,
)
from lmcore.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from lmcore.tracking import NullTracker, OffsetTracker, Tracker

log = logging.getLogger(__name__)

FP32, BF16, FP16, AUTO = "fp32", "bf16", "fp16", "auto"
# Keys of trainer_state.json in a training checkpoint (TrainState.state_dict), besides lmcore.checkpoint's own.
LOADER_KEY = "loader"
TRAIN_ROWS_KEY = "train_rows"
VAL_ROWS_KEY = "val_rows"
TRAIN_TIME_KEY = "train_time_s"
SCALER_KEY = "grad_scaler"
EARLY_STOP_KEY = "early_stopping"
BENCH_ROWS_KEY = "bench_rows"  # the in-training benchmark probe's scores (lmcore.harness.probe)

_TOKEN_BYTES: dict[tuple[str, int], torch.Tensor] = {}  # (tokenizer sha256, vocabulary size) -> token_bytes

# loss_fn(batch) -> (the batch's mean loss to backpropagate, metrics to log: {"loss": ..., ...} or {}).
LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]
# evaluate(step) -> (the row TrainState.val_rows keeps, the metrics to log at `step`).
EvalFn = Callable[[int], tuple[tuple, dict[str, float]]]
# record(the update's number, its StepResult, its lr, its seconds) -> (the row TrainState.train_rows keeps, the
# metrics to log at that step).
RecordFn = Callable[[int, "StepResult", float, float], tuple[tuple, dict[str, float]]]


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; any other name as given."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def lr_at(step: int, cfg: PretrainConfig | FinetuneConfig, total_steps: int | None = None) -> float:
    """Linear warmup from lr/(warmup+1) to lr over `warmup_steps`, then cosine decay to `min_lr` at
    `total_steps` (default `cfg.max_steps`)."""
    total = total_steps if total_steps is not None else cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def decay_groups(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Trainable parameters split into (decayed, not decayed): matmul weights decay; biases, norm gains and
    embedding tables do not. A tied tensor appears once, on the no-decay side when it is an embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied tensor once
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    return decay, no_decay


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device, *, impl: str = "auto"
) -> torch.optim.AdamW:
    """AdamW with two groups (`decay_groups`): weight decay on matmul weights only.

    Args: impl: "fused" (one kernel over all tensors), "foreach" (batched ops), "for-loop", or "auto":
        fused on CPU and CUDA, where torch has a fused AdamW (3x faster than foreach on this project's
        2-core CPU for the default model), foreach elsewhere.
    """
    decay, no_decay = decay_groups(model)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if impl == "auto":
        impl = "fused" if device.type in ("cpu", "cuda") else "foreach"
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    if impl not in options:
        raise ValueError(f"optimizer_impl {impl!r}: expected auto, fused, foreach or for-loop")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **options[impl])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (avx512_bf16 or AMX), read from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """How forward and backward compute: `name` fp32, bf16 or fp16; autocast dtype; gradient scaling."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype matmuls run in."""
        return {FP32: torch.float32, BF16: torch.bfloat16, FP16: torch.float16}[self.name]

    @property
    def scaled(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
        return self.name == FP16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == FP32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh gradient scaler for fp16; None otherwise."""
        return torch.amp.GradScaler(self.device_type) if self.scaled else None


def resolve_precision(name: str, device: torch.device, key: str = "pretrain.precision") -> Precision:
    """The precision to train in; "auto" is bf16 where the device has it natively, else fp16 on GPUs, fp32 on CPU.

    Raises: ValueError naming `key` (the params key) when bf16 is asked of a CUDA device without it.
    """
    if name == AUTO:
        if device.type == "cuda":
            name = BF16 if torch.cuda.is_bf16_supported() else FP16
        elif device.type == "cpu":
            name = BF16 if cpu_has_native_bf16() else FP32
        else:
            name = FP32
    if name == BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{key}=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
    if name not in (FP32, BF16, FP16):
        raise ValueError(f"{key} {name!r}: expected fp32, bf16, fp16 or auto")
    return Precision(name, device.type)


def check_compile(device: torch.device) -> None:
    """torch.compile's CPU backend builds C++: refuse early, naming the key, when no compiler is on PATH."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ValueError("pretrain.compile=true: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH")
    if sys.platform == "win32":
        raise ValueError("pretrain.compile=true: torch.compile is not supported on Windows")


def flops_per_token(config: ModelConfig, non_embedding_params: int, seq_len: int | None = None) -> int:
    """Training FLOPs per token, forward and backward: 6N + 12 L H Q T (PaLM, appendix B); T the window trained on
    (default the context length)."""
    L, H, Q, T = config.n_layer, config.n_head, config.head_size, seq_len or config.context_length
    return 6 * non_embedding_params + 12 * L * H * Q * T


@functools.lru_cache(maxsize=None)
def _measured_peak(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    n = 4096 if device.type == "cuda" else 1024
    gen = torch.Generator(device).manual_seed(0)  # a private generator: the training RNG streams stay untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    best, started = math.inf, time.perf_counter()
    for i in range(8):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for the result
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - started > 1.0:  # a dtype without fast kernels: enough
            break
    return 2 * n**3 / best


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable matmul FLOP/s of `device` in `dtype`: the best of up to 7 timed n x n products (n = 1024 on
    CPU, 4096 on GPU; about a second at most). Measured once per process, device, dtype and thread count."""
    return _measured_peak(device, dtype, torch.get_num_threads())


def kept_message(checkpoint_dir: Path | None) -> str:
    """What is left after a failed run: the last good checkpoint in `checkpoint_dir`, if any."""
    found = list_checkpoints(checkpoint_dir) if checkpoint_dir is not None else []
    if not found:
        return "No checkpoint was written; model_dir and reports_dir are untouched."
    step, path = found[-1]
    return f"The last good checkpoint is {path} (step {step}); model_dir and reports_dir are untouched."


def check_finite(value: float, what: str, step: int, lr: float, checkpoint_dir: Path | None = None) -> None:
    """Raises: FloatingPointError naming `what`, the step, the lr and the last good checkpoint when `value` is NaN/inf."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{what} is {value} at step {step} (lr {lr:.3g}); training diverged, "
            f"try a lower lr, more warmup_steps or grad_clip > 0. {kept_message(checkpoint_dir)}"
        )


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float  # the mean loss over the micro-batches (and, under torchrun, the ranks)
    grad_norm: float  # before clipping; NaN/inf when the fp16 scaler skipped the update
    metrics: dict[str, float]  # loss_fn's metrics (this rank's), averaged over the micro-batches


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    micro_batches: Sequence[Any],
    *,
    step: int,
    lr: float,
    precision: Precision,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None = None,
    what: str = "train",
    checkpoint_dir: Path | None = None,
) -> StepResult:
    """One optimizer update over `micro_batches`: gradients accumulated as if they were one batch, then AdamW.

    Args:
        model: the module being trained (a DDP wrapper or an FSDP-sharded model under torchrun: its gradients
            are all-reduced on the last micro-batch only); its parameters are clipped.
        loss_fn: batch -> (mean loss, metrics); it runs under `precision`'s autocast.
        step: this update's number (1 for the first), for error messages.
        lr: set on every parameter group before the update.
        grad_clip: max gradient norm; 0 computes the norm without clipping.
        scaler: fp16's gradient scaler (an overflowing step is skipped and the scale lowered).
        what, checkpoint_dir: name the run and its last good checkpoint in error messages.

    Raises: FloatingPointError on a NaN/inf loss, or gradient norm without a scaler, naming the step.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(micro_batches)
    total, metrics = None, []
    for i, batch in enumerate(micro_batches):
        with distributed.gradient_sync(model, i == n - 1):
            with precision.autocast():
                loss, batch_metrics = loss_fn(batch)
            loss = loss / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
        metrics.append(batch_metrics)
    loss_value = distributed.all_reduce_mean(total).item()
    check_finite(loss_value, f"{what}: train loss", step, lr, checkpoint_dir)
    if scaler is not None:
        scaler.unscale_(optimizer)
    # max_norm=inf computes the norm without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if scaler is None:  # with fp16 an inf norm is an overflow: the scaler skips that update
        check_finite(grad_norm, f"{what}: gradient norm", step, lr, checkpoint_dir)
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # one micro-batch: its metrics as they are (a mean of one could turn -0.0 into 0.0 in the CSVs)
    mean = metrics[0] if n == 1 else {k: sum(m[k] for m in metrics) / n for k in metrics[0]}
    return StepResult(loss_value, grad_norm, mean)


@dataclass
class EarlyStopping:
    """Stop when the val loss has not improved on its best by more than `min_delta` for `patience` evaluations."""

    patience: int | None = None  # None: never stop
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0

    def update(self, step: int, val_loss: float) -> bool:
        """Record an evaluation; True when the run should stop."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_evals = val_loss, step, 0
        else:
            self.bad_evals += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_step, self.bad_evals = state["best_loss"], state["best_step"], state["bad_evals"]


@dataclass
class TrainState:
    """A run's progress besides the model and the optimizer: what a checkpoint's trainer_state.json holds.

    loader: the train batches (any object with state_dict / load_state_dict); scaler: fp16's GradScaler.
    train_rows / val_rows / bench_rows: what the trainer logged, as (step, ...) tuples (bench_rows: the benchmark
    probe's (step, {metric: value}); empty without the probe).
    """

    loader: Any = None
    scaler: torch.amp.GradScaler | None = None
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    step: int = 0  # optimizer updates done
    train_rows: list[tuple] = field(default_factory=list)
    val_rows: list[tuple] = field(default_factory=list)
    bench_rows: list[tuple] = field(default_factory=list)
    train_time_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the keys of a pretraining checkpoint's trainer_state.json (besides config and its hash)."""
        return {
            STEP_KEY: self.step,
            LOADER_KEY: self.loader.state_dict() if self.loader is not None else None,
            TRAIN_ROWS_KEY: list(self.train_rows),
            VAL_ROWS_KEY: list(self.val_rows),
            BENCH_ROWS_KEY: list(self.bench_rows),
            TRAIN_TIME_KEY: self.train_time_s,
            SCALER_KEY: self.scaler.state_dict() if self.scaler is not None else None,
            EARLY_STOP_KEY: self.early_stopping.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state[STEP_KEY])
        self.train_rows = [tuple(r) for r in state[TRAIN_ROWS_KEY]]  # JSON made them lists
        self.val_rows = [tuple(r) for r in state[VAL_ROWS_KEY]]
        if BENCH_ROWS_KEY not in state:  # written before the benchmark probe existed: it had no probe rows
            log.info("training checkpoint without %r (written before the benchmark probe): none to restore", BENCH_ROWS_KEY)
        self.bench_rows = [tuple(r) for r in state.get(BENCH_ROWS_KEY, [])]
        self.train_time_s = state[TRAIN_TIME_KEY]
        self.early_stopping.load_state_dict(state[EARLY_STOP_KEY])
        if self.loader is not None:
            loader_state = state[LOADER_KEY]
            if "rank" in loader_state and hasattr(self.loader, "rank"):
                # a checkpoint holds rank 0's loader; every rank is at the same position of its own share
                loader_state = {**loader_state, "rank": self.loader.rank}
            self.loader.load_state_dict(loader_state)
        if self.scaler is not None:
            self.scaler.load_state_dict(state[SCALER_KEY])


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Second names of shared tensors -> their first name (lm_head.weight -> wte.weight when tied)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Full (unsharded) model and optimizer state dicts keyed by parameter name, on CPU; each tied tensor once.

    Collective under fsdp: every rank calls it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    aliases = tied_aliases(model)
    model_sd = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in aliases}
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def save_checkpoint(
    checkpoint_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    run_config: dict[str, Any],
    keep: int,
    *,
    what: str = "train",
) -> Path:
    """Write <checkpoint_dir>/step-<state.step>/: model, optimizer, RNG states, `state`, `run_config` and its hash.

    Every rank calls it (the state is gathered collectively under fsdp); rank 0 writes, atomically, and keeps
    the `keep` latest checkpoints.

    Returns: the step folder.
    Raises: FloatingPointError when the weights are not finite: nothing is written, and the message names the
        last good checkpoint.
    """
    # this rank's values: under fsdp its shards
    finite = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    if not distributed.all_ranks_true(finite, next(model.parameters()).device):
        raise FloatingPointError(
            f"{what}: weights are not finite after step {state.step}; no checkpoint written. {kept_message(checkpoint_dir)}"
        )
    model_sd, optim_sd = full_state(model, optimizer)
    if distributed.current().is_main:
        meta = {CONFIG_KEY: run_config, CONFIG_HASH_KEY: config_hash(run_config), **state.state_dict()}
        save_training_checkpoint(checkpoint_dir, TrainingCheckpoint(model_sd, optim_sd, meta), keep=keep)
    distributed.barrier()
    return step_dir(checkpoint_dir, state.step)


def restore_checkpoint(
    checkpoint_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    run_config: dict[str, Any],
) -> Path | None:
    """Load the latest complete checkpoint in `checkpoint_dir` into `model`, `optimizer` and `state`, and restore
    the python, numpy and torch RNG states it holds. Every rank calls it, after wrapping the model (fsdp shards
    the full tensors) and building the optimizer.

    Returns: the checkpoint folder; None when there is none (then nothing changed).
    Raises: CheckpointError when it was written under another `run_config` (naming the keys that differ) or holds
        other parameters than `model`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    ckpt = load_training_checkpoint(path, expect_config=run_config)  # also restores the RNG states
    model_sd = {**ckpt.model, **{a: ckpt.model[f] for a, f in tied_aliases(model).items() if f in ckpt.model}}
    expected = model.state_dict().keys()
    missing, unexpected = expected - model_sd.keys(), model_sd.keys() - expected
    if missing or unexpected:
        raise CheckpointError(f"{path}: the model's tensors differ: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, ckpt.optimizer, options=options)
    state.load_state_dict(ckpt.state)
    return path


def start_or_resume(
    checkpoint_dir: Path | None,
    resume: bool,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    run_config: dict[str, Any],
    *,
    what: str = "train",
) -> int | None:
    """With `resume`, continue from the latest checkpoint (`restore_checkpoint`); without, remove the old
    checkpoints in `checkpoint_dir` (rank 0), so that the folder only ever holds this run's.

    Returns: the step the run resumes at; None for a fresh start (also when there is no checkpoint to resume).
    """
    if checkpoint_dir is None:
        return None
    if resume:
        path = restore_checkpoint(checkpoint_dir, model, optimizer, state, run_config)
        if path is None:
            log.info("%s: no complete checkpoint in %s; starting afresh", what, checkpoint_dir)
            return None
        log.info("%s: resuming from %s (step %d)", what, path, state.step)
        return state.step
    if distributed.current().is_main:
        removed = remove_checkpoints(checkpoint_dir)
        if removed:
            log.info("%s: removed %d old checkpoint(s) from %s (resume is off)", what, removed, checkpoint_dir)
    return None


def checkpoint_due(step: int, interval: int | None, checkpoint_dir: Path | None) -> bool:
    """Whether to write a checkpoint after `step` updates: every `interval` steps, when there is a folder."""
    return checkpoint_dir is not None and bool(interval) and step > 0 and step % interval == 0


class Probe(Protocol):
    """What train_loop needs of lmcore.harness.probe.BenchProbe: when to score, and the scores (model back in its mode)."""

    def due(self, step: int, *, last: bool) -> bool: ...

    def score(self, model: torch.nn.Module) -> dict[str, float]: ...


def row_loss(row: tuple) -> float:
    """The loss in a TrainState row: pretraining's (step, loss, ...) or a fine-tune's (step, {"loss": ..., ...})."""
    return row[1]["loss"] if isinstance(row[1], dict) else row[1]


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    cfg: TrainConfig,
    *,
    total: int,
    next_batch: Callable[[], Any],
    loss_fn: LossFn,
    schedule: Callable[[int], float],
    evaluate: EvalFn,
    record: RecordFn,
    precision: Precision,
    run_config: dict[str, Any],
    checkpoint_dir: Path | None = None,
    resumed_at: int | None = None,
    wrapped: torch.nn.Module | None = None,
    early_stopping: bool = False,
    probe: Probe | None = None,
    tracker: Tracker = NullTracker(),
    step_offset: int = 0,
    what: str = "train",
) -> bool:
    """Train from `state.step` to `total` updates: evaluation, benchmark probe, checkpoints, early stopping, the
    updates, per-step metrics and a progress bar, as the module docstring lays out. Every rank calls it.

    Args:
        model: the model: checkpointed, probed; `wrapped` (its DDP or FSDP wrapper under torchrun; None: `model`)
            is the module `train_step` runs.
        state: the run's TrainState, restored by start_or_resume when resuming (`resumed_at` its step).
        cfg: grad_accum_steps, grad_clip, eval_interval, checkpoint_interval and keep_checkpoints.
        total: the updates the run makes at most.
        next_batch: draws the next micro-batch (on the device), `grad_accum_steps` times per update.
        loss_fn: batch -> (mean loss, metrics), run under `precision` by `train_step`.
        schedule: step -> the lr of the update after `step` updates (also named in divergence messages).
        evaluate: step -> (val row, metrics to log); row_loss(row) is the val loss.
        record: (the update's number, its StepResult, lr, seconds) -> (train row, metrics to log).
        run_config: what the checkpoints record and a resumed run must match.
        early_stopping: update state.early_stopping at each evaluation and stop when it says so.
        probe: the benchmark probe, or None.
        tracker, step_offset: where metrics go (rank 0), their steps moved by `step_offset`.
        what: the run in messages, checkpoints and the progress bar.

    Returns: whether early stopping ended the run before `total`.
    Raises: FloatingPointError on a NaN/inf val loss, train loss or gradient norm, naming the step.
    """
    info = distributed.current()
    log_metrics = OffsetTracker(tracker, step_offset).log_metrics if info.is_main else NullTracker().log_metrics
    early = state.early_stopping
    # A run resumed from the checkpoint of an evaluation that ended it early stays stopped.
    stopped = early.stopped and state.step < total
    bar = tqdm(total=total, initial=state.step, desc=what, unit="step", dynamic_ncols=True, disable=not info.is_main)
    for step in range(state.step, total + 1):  # updates done so far
        if step != resumed_at:  # a resumed step was evaluated and saved before the checkpoint was written
            if step % cfg.eval_interval == 0 or step == total:
                row, metrics = evaluate(step)
                check_finite(row_loss(row), f"{what}: val loss", step, schedule(step), checkpoint_dir)
                state.val_rows.append(row)
                log_metrics(metrics, step=step)
                if early_stopping:
                    stopped = early.update(step, row_loss(row)) and step < total
            if probe is not None and probe.due(step, last=step == total or stopped):
                scores = probe.score(model)  # every rank: the same forwards
                state.bench_rows.append((step, scores))
                log_metrics(scores, step=step)
            if checkpoint_due(step, cfg.checkpoint_interval, checkpoint_dir):
                save_checkpoint(checkpoint_dir, model, optimizer, state, run_config, cfg.keep_checkpoints, what=what)
        if step == total or stopped:
            break

        t0 = time.perf_counter()
        lr = schedule(step)
        micro_batches = [next_batch() for _ in range(cfg.grad_accum_steps)]
        out = train_step(model if wrapped is None else wrapped, optimizer, loss_fn, micro_batches, step=step + 1, lr=lr,
                         precision=precision, grad_clip=cfg.grad_clip, scaler=state.scaler, what=what,
                         checkpoint_dir=checkpoint_dir)
        dt = time.perf_counter() - t0
        state.step, state.train_time_s = step + 1, state.train_time_s + dt
        row, metrics = record(step + 1, out, lr, dt)
        state.train_rows.append(row)
        log_metrics(metrics, step=step + 1)
        bar.set_postfix(loss=f"{row_loss(row):.4f}", val=f"{row_loss(state.val_rows[-1]):.4f}", refresh=False)
        bar.update()
    bar.close()
    return stopped


def token_bytes(tok, size: int) -> torch.Tensor:
    """The UTF-8 bytes each token id stands for, for bits per byte.

    Args:
        tok: a lmcore.tokenizer.Tokenizer (decode_single_token_bytes, special_ids, n_vocab, sha256).
        size: the model's vocabulary size (it may pad the tokenizer's).

    Returns: (size,) int64 on the CPU; special tokens and ids from tok.n_vocab on count 0. Cached per tokenizer
        sha256 and size.
    """
    key = (tok.sha256, size)
    if key not in _TOKEN_BYTES:
        special, counts = tok.special_ids, []
        for i in range(min(size, tok.n_vocab)):
            try:
                counts.append(0 if i in special else len(tok.decode_single_token_bytes(i)))
            except KeyError:  # a hole in tiktoken's ranks: no token there
                counts.append(0)
        _TOKEN_BYTES[key] = torch.tensor(counts + [0] * (size - len(counts)), dtype=torch.long)
    return _TOKEN_BYTES[key]


def bpb_sums(
    losses: torch.Tensor, targets: torch.Tensor, bytes_per_token: torch.Tensor, dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (nats, bytes) that bits per byte divides, of per-token losses: only targets that stand for bytes count.

    Args:
        losses: per-token cross-entropy in nats (F.cross_entropy(..., reduction="none")), as many as the targets.
        targets: their target ids; ids outside token_bytes (an ignore_index) count 0.
        bytes_per_token: `token_bytes`, on the targets' device.
        dim: sum over this dimension of `targets` only (each window's sums: (B,) of (B, T) targets); None: all.

    Returns: two float64 tensors, summed over the tokens; add them up over batches (and ranks) before dividing.
    """
    inside = (targets >= 0) & (targets < bytes_per_token.numel())
    n_bytes = torch.where(inside, bytes_per_token[targets.clamp(0, bytes_per_token.numel() - 1)], 0)
    nats = torch.where(n_bytes > 0, losses.reshape(targets.shape).double(), 0.0)
    return (nats.sum(), n_bytes.sum().double()) if dim is None else (nats.sum(dim), n_bytes.sum(dim).double())


def bits_per_byte(nats: float, n_bytes: float) -> float | None:
    """nats / ln 2 / bytes; None when no byte was scored."""
    return nats / (math.log(2) * n_bytes) if n_bytes > 0 else None


def bpb_change(before: torch.Tensor, after: torch.Tensor) -> tuple[float | None, float | None]:
    """The change in bits per byte from `before` to `after`, two models' (nats, bytes) on the same windows ((N, 2)
    each, lmcore.pretrain.validation_loss), and its paired standard error: the ratio estimator's, over windows
    weighted by their bytes (sqrt(n / (n - 1) * sum(r_i^2)) / sum(bytes), r_i = d_i - D * bytes_i with d_i the
    window's change in bits and D the overall change). (None, None) without two windows holding bytes."""
    n_bytes = before[:, 1]
    if not torch.equal(n_bytes, after[:, 1]):
        raise ValueError("bpb_change: the two models were scored on other windows (their bytes differ)")
    keep = n_bytes > 0
    if int(keep.sum()) < 2:
        return None, None
    bits = (after[keep, 0] - before[keep, 0]) / math.log(2)
    total = float(n_bytes[keep].sum())
    change = float(bits.sum()) / total
    residual = bits - change * n_bytes[keep]
    n = int(keep.sum())
    return change, math.sqrt(n / (n - 1) * float((residual**2).sum())) / total


def metrics_csv(rows: list[tuple[int, dict[str, float]]], column=lambda name: name, fmt: str = ".6g") -> str:
    """(step, {metric: value}) rows as CSV: `step`, then a column per metric in first-seen order (its header
    `column(name)`, its values formatted with `fmt`); a metric a row lacks is an empty cell."""
    names = list(dict.fromkeys(k for _, row in rows for k in row))
    lines = [",".join(["step", *map(column, names)])]
    lines += [",".join([str(step)] + [format(row[k], fmt) if k in row else "" for k in names]) for step, row in rows]
    return "\n".join(lines) + "\n"


def plot_losses(path: Path, train: list[tuple[int, float, float]], val: list[tuple[int, float]], title: str | None = None) -> None:
    """Train (step, loss, lr) and val (step, loss, ...) curves as a PNG at `path` (inside an atomic_dir)."""
    # Figure without pyplot: no global backend switch, renders with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([s for s, _, _ in train], [loss for _, loss, _ in train], label="train", linewidth=1, alpha=0.7)
    ax.plot([r[0] for r in val], [r[1] for r in val], label="val", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with open(path, "wb") as f:  # inside an atomic_dir; fsynced with the folder
        fig.savefig(f, format="png")


__all__ = [
    "EarlyStopping", "EvalFn", "LossFn", "Precision", "Probe", "RecordFn", "StepResult", "TrainState", "bits_per_byte",
    "bpb_sums", "check_compile", "check_finite", "checkpoint_due", "cpu_has_native_bf16", "decay_groups", "flops_per_token",
    "full_state", "kept_message", "lr_at", "make_optimizer", "measure_peak_flops", "metrics_csv", "plot_losses",
    "resolve_device", "resolve_precision", "restore_checkpoint", "row_loss", "save_checkpoint", "seed_everything",
    "start_or_resume", "tied_aliases", "token_bytes", "train_loop", "train_step",
]
