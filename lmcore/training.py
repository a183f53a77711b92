"""Pretraining: next-token prediction on the tokenized corpus with AdamW and a warmup-cosine schedule.

    summary = pretrain(params.pretrain, Path("data/tokens"), Path("models/base"), Path("reports/pretrain"),
                       seed=params.seed, params=params.to_dict(), checkpoint_dir=Path("models/checkpoints/pretrain"))

Step numbering: the train metrics of the k-th optimizer update (its batch loss, lr and gradient norm)
are logged at step k = 1 .. max_steps, as litgpt and the HF Trainer count; "val_loss at step k" is
the model after k updates: step 0 (the initial model), every `eval_interval` steps and at the last step
(max_steps, or where early stopping ended the run).

One update: `grad_accum_steps` micro-batches of `batch_size` windows, forward and backward under the
configured precision (fp32, or bf16/fp16 autocast; fp16 with a gradient scaler), gradients clipped to
`grad_clip`, then AdamW. Under torchrun every rank does the same on its own batches and gradients are
averaged (lmcore.distributed); rank r's micro-batch j of step s is the loader's global batch
(s * grad_accum_steps + j) * world_size + r, so one process with grad_accum_steps = A * W sees the very
windows that W processes with A micro-batches each see.

Weight decay: only on the matmul weights (Linear layers). Biases, norm gains and the embedding tables
(the tied LM head is the token embedding) never decay.

Checkpoints and resume: every `checkpoint_interval` steps the model, the optimizer, the python/numpy/torch
RNG states, the loader position, the loss history and a hash of the config are written to `checkpoint_dir`
(lmcore.checkpoint: atomic, COMPLETE marker last, the last `keep_checkpoints` kept). With `resume` the run
continues from the latest complete one and ends with the weights an uninterrupted run ends with, bit for bit
on CPU. A NaN/inf loss or gradient norm stops the run with FloatingPointError; checkpoints are only written
from finite weights, so the last one on disk is the last good state.

Throughput: `tokens_per_s` (all ranks) and `mfu` are logged every step. MFU = FLOPs per token x tokens
per second per device / peak FLOP/s of the device in the precision used, with FLOPs per token = 6N +
12 L H Q T (PaLM, appendix B; N the non-embedding parameters, L layers, H heads, Q head size, T context);
the peak is `peak_flops` or measured once by `measure_peak_flops`.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmcore import distributed
from lmcore.checkpoint import (
    CONFIG_HASH_KEY,
    CONFIG_KEY,
    STEP_KEY,
    TrainingCheckpoint,
    config_hash,
    latest_checkpoint,
    load_training_checkpoint,
    remove_checkpoints,
    save_model,
    save_training_checkpoint,
    step_dir,
)
from lmcore.config import FinetuneConfig, ModelConfig, PretrainConfig
from lmcore.data.loader import RANDOM, TokenDataset, TokenLoader
from lmcore.io import atomic_dir, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import LOSS_PLOT, MANIFEST, SUMMARY, TRAIN_LOSS, VAL_LOSS
from lmcore.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

FP32, BF16, FP16, AUTO = "fp32", "bf16", "fp16", "auto"
# The pretrain stage's training checkpoints, relative to the project root (beside the model folders).
PRETRAIN_CHECKPOINTS = Path("models") / "checkpoints" / "pretrain"
# Keys of trainer_state.json in a training checkpoint, besides lmcore.checkpoint's own.
LOADER_KEY = "loader"
TRAIN_ROWS_KEY = "train_rows"
VAL_ROWS_KEY = "val_rows"
TRAIN_TIME_KEY = "train_time_s"
SCALER_KEY = "grad_scaler"
EARLY_STOP_KEY = "early_stopping"


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
    model: torch.nn.Module, cfg: PretrainConfig | FinetuneConfig, device: torch.device, *, impl: str = "auto"
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


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision to train in; "auto" is bf16 where the device has it natively, else fp16 on GPUs, fp32 on CPU.

    Raises: ValueError naming `pretrain.precision` when bf16 is asked of a CUDA device without it.
    """
    if name == AUTO:
        if device.type == "cuda":
            name = BF16 if torch.cuda.is_bf16_supported() else FP16
        elif device.type == "cpu":
            name = BF16 if cpu_has_native_bf16() else FP32
        else:
            name = FP32
    if name == BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"pretrain.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
    if name not in (FP32, BF16, FP16):
        raise ValueError(f"pretrain.precision {name!r}: expected fp32, bf16, fp16 or auto")
    return Precision(name, device.type)


def check_compile(device: torch.device) -> None:
    """torch.compile's CPU backend builds C++: refuse early, naming the key, when no compiler is on PATH."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ValueError("pretrain.compile=true: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH")
    if sys.platform == "win32":
        raise ValueError("pretrain.compile=true: torch.compile is not supported on Windows")


def flops_per_token(config: ModelConfig, non_embedding_params: int) -> int:
    """Training FLOPs per token, forward and backward: 6N + 12 L H Q T (PaLM, appendix B)."""
    L, H, Q, T = config.n_layer, config.n_head, config.head_size, config.context_length
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


def accumulate_gradients(
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
    sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext(),
) -> torch.Tensor:
    """Forward and backward over the micro-batches, gradients summed as if they were one batch.

    Each micro-batch's mean loss is divided by their number, so the gradient is that of the mean over all
    windows. `sync(is_last)` wraps each backward (under DDP only the last one all-reduces).

    Returns: the mean loss over the micro-batches (a detached scalar tensor; no host sync).
    """
    n = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        with sync(i == n - 1):
            with precision.autocast():
                _, loss = forward(x, y)
            loss = loss / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
    return total


def check_finite(value: float, what: str, step: int, lr: float, kept: str = "Nothing was written.") -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{what} is {value} at step {step} (lr {lr:.3g}); training diverged, "
            f"try a lower lr, more warmup_steps or grad_clip > 0. {kept}"
        )


def plot_losses(path: Path, train: list[tuple[int, float, float]], val: list[tuple[int, float]], title: str | None = None) -> None:
    """Train (step, loss, lr) and val (step, loss) curves as a PNG at `path` (inside an atomic_dir)."""
    # Figure without pyplot: no global backend switch, renders with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([s for s, _, _ in train], [loss for _, loss, _ in train], label="train", linewidth=1, alpha=0.7)
    ax.plot([s for s, _ in val], [loss for _, loss in val], label="val", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with open(path, "wb") as f:  # inside an atomic_dir; fsynced with the folder
        fig.savefig(f, format="png")


@dataclass
class _EarlyStopping:
    patience: int | None
    min_delta: float
    best_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0

    def update(self, step: int, val_loss: float) -> bool:
        """Record an evaluation; True when the run should stop."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_evals = val_loss, step, 0
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}


@torch.no_grad()
def _val_loss(model: torch.nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]], precision: Precision) -> float:
    """Mean loss over the validation batches; under torchrun each rank scores its share and the sums meet.

    Every rank runs the same number of forwards (FSDP gathers parameters collectively): a rank short of one
    scores its last batch again with weight 0.
    """
    info = distributed.current()
    mine = windows[info.rank :: info.world_size]
    share = -(-len(windows) // info.world_size)
    weights = [1.0] * len(mine) + [0.0] * (share - len(mine))
    mine = mine + [windows[-1]] * (share - len(mine))
    model.eval()
    total = torch.zeros((), device=windows[0][0].device, dtype=torch.float64)
    for (x, y), w in zip(mine, weights):
        with precision.autocast():
            total += w * model(x, y)[1].double()
    model.train()
    return distributed.all_reduce_sum(total).item() / len(windows)


def _full_state(model: GPT, optimizer: torch.optim.Optimizer | None, aliases: set[str]):
    """Full (unsharded) model and optimizer state dicts keyed by parameter name, on CPU. Collective under fsdp."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in aliases}
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Second names of shared tensors -> their first name (lm_head.weight -> wte.weight when tied)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _batches(loader: TokenLoader, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.to(device, non_blocking=True) for t in loader.next_batch()) for _ in range(n)]


def pretrain(
    cfg: PretrainConfig,
    tokens_dir: Path,
    model_dir: Path,
    reports_dir: Path,
    *,
    seed: int,
    params: dict | None = None,
    tracker: Tracker = NullTracker(),
    checkpoint_dir: Path | None = None,
    resume: bool | None = None,
) -> dict:
    """Train a GPT from scratch on tokens_dir and write the model and the loss reports.

    Args:
        cfg: the pretrain section of params (model architecture and optimisation).
        tokens_dir: a tokenize output folder (manifest.json with train and val shards).
        model_dir: replaced whole by model.safetensors, config.json and params.yaml.
        reports_dir: replaced whole by train_loss.csv, val_loss.csv, loss.png and summary.json.
        seed: seeds python, numpy, torch and the batch sampling (train batch k is a pure function of
            (seed, k); summary["loader_state"] is the train loader's state_dict after the last step).
        params: the resolved params dict, saved beside the weights.
        tracker: receives train_loss, lr, grad_norm, tokens_per_s and mfu each step and val_loss at each eval
            (rank 0 only under torchrun).
        checkpoint_dir: where training checkpoints go every `cfg.checkpoint_interval` steps; None writes none.
        resume: continue from the latest complete checkpoint in checkpoint_dir (a fresh start when there is
            none); None takes `cfg.resume`. Without resume, old checkpoints in checkpoint_dir are removed.

    Returns: the summary (also written to summary.json).
    Raises: ValueError if the model's vocabulary is smaller than the data's or an option cannot run here;
        lmcore.checkpoint.CheckpointError if the checkpoint to resume was written under other settings;
        FloatingPointError on a NaN/inf loss or gradient norm. On any error model_dir and reports_dir are
        left as they were; checkpoints already written stay.
    """
    tokens_dir, model_dir, reports_dir = Path(tokens_dir), Path(model_dir), Path(reports_dir)
    resume = cfg.resume if resume is None else resume
    if resume and checkpoint_dir is None:
        raise ValueError("pretrain: resume needs a checkpoint_dir")
    info = distributed.current()
    seed_everything(seed)  # the same on every rank: identical initial weights
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    if cfg.compile:
        check_compile(device)

    train = TokenDataset(tokens_dir, "train")
    val = TokenDataset(tokens_dir, "val")
    if cfg.model.vocab_size < train.vocab_size:
        raise ValueError(
            f"pretrain.model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocab_size "
            f"({train.vocab_size}) in {tokens_dir / MANIFEST}"
        )
    B, T, A, W = cfg.batch_size, cfg.model.context_length, cfg.grad_accum_steps, info.world_size
    run_config = {"pretrain": cfg.resume_key(), "seed": seed, "world_size": W}

    model = GPT(cfg.model)
    aliases = _tied_aliases(model)
    train_loader = TokenLoader(train, B, T, mode=RANDOM, seed=seed, rank=info.rank, world_size=W)
    # The same validation windows at every eval, so the val curve measures the model and not the sample.
    val_loader = TokenLoader(val, B, T, mode=RANDOM, seed=seed)
    val_windows = _batches(val_loader, cfg.eval_batches, device)

    ckpt = None
    last_saved: tuple[int, Path] | None = None  # (step, folder) of the latest checkpoint on disk
    if resume:
        path = latest_checkpoint(checkpoint_dir)
        if path is None:
            log.info("pretrain: no complete checkpoint in %s; starting afresh", checkpoint_dir)
        else:
            ckpt = load_training_checkpoint(path, expect_config=run_config)  # also restores the RNG states
            model.load_state_dict({**ckpt.model, **{a: ckpt.model[f] for a, f in aliases.items()}})
            # Rank 0's loader state; every rank is at the same position of its own share.
            train_loader.load_state_dict({**ckpt.state[LOADER_KEY], "rank": info.rank})
            log.info("pretrain: resuming from %s (step %d)", path, ckpt.step)
            last_saved = (ckpt.step, path)
    elif checkpoint_dir is not None and info.is_main:
        removed = remove_checkpoints(checkpoint_dir)
        if removed:
            log.info("pretrain: removed %d old checkpoint(s) from %s (resume is off)", removed, checkpoint_dir)

    model.to(device).train()
    wrapped = distributed.wrap(model, cfg.distributed, info, device)
    optimizer = make_optimizer(model, cfg, device, impl=cfg.optimizer_impl)
    scaler = torch.amp.GradScaler(device.type) if precision.scaled else None
    forward = torch.compile(wrapped) if cfg.compile else wrapped

    def sync(last: bool) -> contextlib.AbstractContextManager:
        return distributed.gradient_sync(wrapped, last)

    early = _EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    train_rows: list[tuple[int, float, float]] = []  # (step 1.., train_loss, lr)
    val_rows: list[tuple[int, float]] = []  # (step, val_loss)
    train_time = 0.0
    start = 0
    if ckpt is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, ckpt.optimizer, options=StateDictOptions(full_state_dict=True))
        if scaler is not None:
            scaler.load_state_dict(ckpt.state[SCALER_KEY])
        train_rows = [tuple(r) for r in ckpt.state[TRAIN_ROWS_KEY]]
        val_rows = [tuple(r) for r in ckpt.state[VAL_ROWS_KEY]]
        train_time = ckpt.state[TRAIN_TIME_KEY]
        e = ckpt.state[EARLY_STOP_KEY]
        early.best_loss, early.best_step, early.bad_evals = e["best_loss"], e["best_step"], e["bad_evals"]
        start = ckpt.step
        ckpt = None  # free the host copy
    resumed_at = start if start > 0 else None
    # A run resumed from the checkpoint of an evaluation that ended it early stays stopped.
    stopped_early = early.patience is not None and early.bad_evals >= early.patience and start < cfg.max_steps

    fpt = flops_per_token(cfg.model, model.num_params(non_embedding=True))
    peak = cfg.peak_flops or measure_peak_flops(device, precision.dtype)

    def kept() -> str:
        if last_saved is None:
            return "No checkpoint was written; model_dir and reports_dir are untouched."
        return f"The last good checkpoint is {last_saved[1]} (step {last_saved[0]}); model_dir and reports_dir are untouched."

    def save_checkpoint(step: int) -> None:
        nonlocal last_saved
        # this rank's values: under fsdp its shards
        finite = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
        if not distributed.all_ranks_true(finite, device):
            raise FloatingPointError(f"pretrain: weights are not finite after step {step}; no checkpoint written. {kept()}")
        model_sd, optim_sd = _full_state(model, optimizer, set(aliases))
        if info.is_main:
            state = {
                STEP_KEY: step,
                CONFIG_KEY: run_config,
                CONFIG_HASH_KEY: config_hash(run_config),
                LOADER_KEY: train_loader.state_dict(),
                TRAIN_ROWS_KEY: train_rows,
                VAL_ROWS_KEY: val_rows,
                TRAIN_TIME_KEY: train_time,
                SCALER_KEY: scaler.state_dict() if scaler is not None else None,
                EARLY_STOP_KEY: early.state(),
            }
            save_training_checkpoint(checkpoint_dir, TrainingCheckpoint(model_sd, optim_sd, state), keep=cfg.keep_checkpoints)
        distributed.barrier()
        last_saved = (step, step_dir(checkpoint_dir, step))

    log_metrics = tracker.log_metrics if info.is_main else NullTracker().log_metrics
    step = start
    bar = tqdm(total=cfg.max_steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True, disable=not info.is_main)
    try:
        for step in range(start, cfg.max_steps + 1):  # updates done so far
            if step != resumed_at:  # a resumed step was evaluated and saved before the checkpoint was written
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    val_loss = _val_loss(model, val_windows, precision)
                    check_finite(val_loss, "pretrain: val loss", step, lr_at(step, cfg), kept())
                    val_rows.append((step, val_loss))
                    log_metrics({"val_loss": val_loss}, step=step)
                    bar.set_postfix(loss=f"{train_rows[-1][1]:.4f}" if train_rows else "-", val=f"{val_loss:.4f}", refresh=False)
                    stopped_early = early.update(step, val_loss) and step < cfg.max_steps
                if checkpoint_dir is not None and cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step > 0:
                    save_checkpoint(step)
            if step == cfg.max_steps or stopped_early:
                break

            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = _batches(train_loader, A, device)
            loss = accumulate_gradients(forward, micro, precision=precision, scaler=scaler, sync=sync)
            loss_value = distributed.all_reduce_mean(loss).item()
            check_finite(loss_value, "pretrain: train loss", step + 1, lr, kept())
            if scaler is not None:
                scaler.unscale_(optimizer)
            # max_norm=inf computes the norm without clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if scaler is None:  # with fp16 an inf norm is an overflow: the scaler skips that update
                check_finite(grad_norm, "pretrain: gradient norm", step + 1, lr, kept())
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_time += dt

            train_rows.append((step + 1, loss_value, lr))
            log_metrics(
                {
                    "train_loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": B * T * A * W / dt,
                    "mfu": fpt * B * T * A / dt / peak,
                },
                step=step + 1,
            )
            bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{val_rows[-1][1]:.4f}", refresh=False)
            bar.update()
    finally:
        bar.close()

    steps = step
    tokens_seen = steps * B * T * A * W
    summary = {
        "n_params": model.num_params(),
        "steps": steps,
        "resumed_from_step": resumed_at,  # None for a fresh start
        "tokens_seen": tokens_seen,
        "train_time_s": round(train_time, 3),
        "tokens_per_s": round(tokens_seen / train_time, 1) if train_time > 0 else None,
        "mfu": round(fpt * tokens_seen / W / train_time / peak, 4) if train_time > 0 else None,
        "peak_flops": peak,
        "precision": precision.name,
        "world_size": W,
        "first_val_loss": val_rows[0][1],
        "final_val_loss": val_rows[-1][1],
        "best_val_loss": early.best_loss,
        "best_step": early.best_step,
        "stopped_early": stopped_early,
        "final_train_loss": train_rows[-1][1],
        "train_tokens": train.n_tokens,
        "val_tokens": val.n_tokens,
        # Train documents cut across windows (longer than context_length + 1 tokens).
        "documents_longer_than_context": train_loader.documents_longer_than_context,
        "loader_state": train_loader.state_dict(),  # resume: TokenLoader.from_state_dict(train, loader_state)
    }

    # fsdp: the shards gathered (collectively) into a plain CPU copy on rank 0.
    final_sd = _full_state(model, None, set(aliases))[0] if info.enabled and cfg.distributed == distributed.FSDP else None
    if info.is_main:
        out = model
        if final_sd is not None:
            out = GPT(cfg.model)
            out.load_state_dict({**final_sd, **{a: final_sd[f] for a, f in aliases.items()}})
        # Both folders are built aside and renamed into place only when everything was written.
        with atomic_dir(model_dir) as model_tmp, atomic_dir(reports_dir) as reports_tmp:
            write_text(reports_tmp / TRAIN_LOSS, "step,train_loss,lr\n" + "".join(f"{s},{loss:.6f},{lr:.6g}\n" for s, loss, lr in train_rows))
            write_text(reports_tmp / VAL_LOSS, "step,val_loss\n" + "".join(f"{s},{loss:.6f}\n" for s, loss in val_rows))
            plot_losses(reports_tmp / LOSS_PLOT, train_rows, val_rows)
            write_json(reports_tmp / SUMMARY, summary)
            extra = {"tokenizer": train.manifest["encoding"]} if "encoding" in train.manifest else None
            save_model(out, model_tmp, params=params, extra=extra)
    distributed.barrier()
    return summary


__all__ = [
    "accumulate_gradients", "check_finite", "decay_groups", "flops_per_token", "lr_at", "make_optimizer",
    "measure_peak_flops", "plot_losses", "pretrain", "resolve_device", "resolve_precision", "seed_everything",
]
