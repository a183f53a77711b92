"""Pretraining: next-token prediction on the tokenized corpus with AdamW and a warmup-cosine schedule.

    summary = pretrain(params.pretrain, Path("data/tokens"), Path("models/base"), Path("reports/pretrain"),
                       seed=params.seed, params=params.to_dict())

Step numbering: the train metrics of the k-th optimizer update (its batch loss, lr and gradient norm)
are logged at step k = 1 .. max_steps, as litgpt and the HF Trainer count; "val_loss at step k" is
the model after k updates: step 0 (the initial model), every `eval_interval` steps and at step
max_steps (the saved model).

Weight decay: applied to every parameter with 2 or more dimensions (matmul weights and the embedding
tables, as nanoGPT; the token embedding is the tied LM head anyway), never to biases or LayerNorm gains.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmcore.checkpoint import save_model
from lmcore.config import FinetuneConfig, PretrainConfig
from lmcore.data.loader import RANDOM, TokenDataset, TokenLoader
from lmcore.io import atomic_dir, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import LOSS_PLOT, MANIFEST, SUMMARY, TRAIN_LOSS, VAL_LOSS
from lmcore.tracking import NullTracker, Tracker


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


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig | FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: 2-D+ parameters decay, biases and norm weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied tensor appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


@torch.no_grad()
def _val_loss(model: GPT, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [model(x, y)[1].item() for x, y in windows]
    model.train()
    return sum(losses) / len(losses)


def check_finite(value: float, what: str, step: int, lr: float) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{what} is {value} at step {step} (lr {lr:.3g}); training diverged, "
            "try a lower lr, more warmup_steps or grad_clip > 0. Nothing was written."
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


def pretrain(
    cfg: PretrainConfig,
    tokens_dir: Path,
    model_dir: Path,
    reports_dir: Path,
    *,
    seed: int,
    params: dict | None = None,
    tracker: Tracker = NullTracker(),
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
        tracker: receives train_loss, lr, grad_norm, tokens_per_s each step and val_loss at each eval.

    Returns: the summary (also written to summary.json).
    Raises: ValueError if the model's vocabulary is smaller than the data's; FloatingPointError on a
        NaN/inf loss. On any error nothing is written.
    """
    tokens_dir, model_dir, reports_dir = Path(tokens_dir), Path(model_dir), Path(reports_dir)
    seed_everything(seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)

    train = TokenDataset(tokens_dir, "train")
    val = TokenDataset(tokens_dir, "val")
    if cfg.model.vocab_size < train.vocab_size:
        raise ValueError(
            f"pretrain.model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocab_size "
            f"({train.vocab_size}) in {tokens_dir / MANIFEST}"
        )
    B, T = cfg.batch_size, cfg.model.context_length

    model = GPT(cfg.model).to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device)

    train_loader = TokenLoader(train, B, T, mode=RANDOM, seed=seed)
    # The same validation windows at every eval, so the val curve measures the model and not the sample.
    val_loader = TokenLoader(val, B, T, mode=RANDOM, seed=seed)
    val_windows = [tuple(t.to(device) for t in val_loader.next_batch()) for _ in range(cfg.eval_batches)]

    train_rows: list[tuple[int, float, float]] = []  # (step 1.., train_loss, lr)
    val_rows: list[tuple[int, float]] = []  # (step, val_loss)
    train_time = 0.0
    bar = tqdm(total=cfg.max_steps, desc="pretrain", unit="step", dynamic_ncols=True)
    try:
        for step in range(cfg.max_steps + 1):  # updates done so far
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val_loss = _val_loss(model, val_windows)
                check_finite(val_loss, "pretrain: val loss", step, lr_at(step, cfg))
                val_rows.append((step, val_loss))
                tracker.log_metrics({"val_loss": val_loss}, step=step)
                bar.set_postfix(loss=f"{train_rows[-1][1]:.4f}" if train_rows else "-", val=f"{val_loss:.4f}", refresh=False)
            if step == cfg.max_steps:
                break

            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = (t.to(device) for t in train_loader.next_batch())
            _, loss = model(x, y)
            loss_value = loss.item()
            check_finite(loss_value, "pretrain: train loss", step + 1, lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # max_norm=inf computes the norm without clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
            optimizer.step()
            dt = time.perf_counter() - t0
            train_time += dt

            train_rows.append((step + 1, loss_value, lr))
            tracker.log_metrics(
                {"train_loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": B * T / dt}, step=step + 1
            )
            bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{val_rows[-1][1]:.4f}", refresh=False)
            bar.update()
    finally:
        bar.close()

    tokens_seen = cfg.max_steps * B * T
    summary = {
        "n_params": model.num_params(),
        "steps": cfg.max_steps,
        "tokens_seen": tokens_seen,
        "train_time_s": round(train_time, 3),
        "tokens_per_s": round(tokens_seen / train_time, 1) if train_time > 0 else None,
        "first_val_loss": val_rows[0][1],
        "final_val_loss": val_rows[-1][1],
        "final_train_loss": train_rows[-1][1],
        "train_tokens": train.n_tokens,
        "val_tokens": val.n_tokens,
        # Train documents cut across windows (longer than context_length + 1 tokens).
        "documents_longer_than_context": train_loader.documents_longer_than_context,
        "loader_state": train_loader.state_dict(),  # resume: TokenLoader.from_state_dict(train, loader_state)
    }

    # Both folders are built aside and renamed into place only when everything was written.
    with atomic_dir(model_dir) as model_tmp, atomic_dir(reports_dir) as reports_tmp:
        write_text(reports_tmp / TRAIN_LOSS, "step,train_loss,lr\n" + "".join(f"{s},{loss:.6f},{lr:.6g}\n" for s, loss, lr in train_rows))
        write_text(reports_tmp / VAL_LOSS, "step,val_loss\n" + "".join(f"{s},{loss:.6f}\n" for s, loss in val_rows))
        plot_losses(reports_tmp / LOSS_PLOT, train_rows, val_rows)
        write_json(reports_tmp / SUMMARY, summary)
        extra = {"tokenizer": train.manifest["encoding"]} if "encoding" in train.manifest else None
        save_model(model, model_tmp, params=params, extra=extra)
    return summary
