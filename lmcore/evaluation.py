"""Evaluation of a trained model: validation loss, perplexity and bits per byte, and seeded text samples.

    metrics = evaluate(params.evaluate, Path("models/base"), Path("data/tokens"), Path("reports/evaluate"),
                       seed=params.seed, enc=load_tokenizer("models/base"))

Outputs (out_dir, replaced whole):
    metrics.json   {"val_loss", "perplexity", "val_tokens", "val_bpb", "val_bytes"}
    samples.jsonl  one line per prompt: {"prompt", "completion", "temperature", "top_k", "max_new_tokens", "seed"}

val_bpb (lmcore.training.bpb_sums) is the loss over the same tokens in bits per UTF-8 byte of the text they stand
for (special tokens left out; val_bytes of them): unlike val_loss and perplexity it compares models with different
tokenizers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lmcore.checkpoint import load_model
from lmcore.config import EvaluateConfig
from lmcore.data.loader import TokenDataset
from lmcore.errors import InputError
from lmcore.generation import generate_text
from lmcore.io import atomic_dir, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import MANIFEST, METRICS, SAMPLES
from lmcore.tokenizer import Tokenizer, TokenizerError, has_tokenizer, load_tokenizer
from lmcore.tracking import NullTracker, Tracker
from lmcore.training import bits_per_byte, bpb_sums, resolve_device, token_bytes


class ValScore(NamedTuple):
    """What `perplexity` measured: mean loss in nats per token over `tokens` predicted tokens, and bits per byte
    over the `bytes` they stand for (None without a tokenizer, or when no byte was scored)."""

    loss: float
    tokens: int
    bpb: float | None = None
    bytes: int = 0


@torch.no_grad()
def perplexity(
    model: GPT,
    dataset: TokenDataset,
    batch_size: int,
    context_length: int,
    max_batches: int | None,
    device: str | torch.device,
    bytes_per_token: torch.Tensor | None = None,
) -> ValScore:
    """Token-weighted mean cross-entropy over the dataset's non-overlapping windows, and their bits per byte.

    Args: bytes_per_token: lmcore.training.token_bytes of the model's tokenizer; None: no bits per byte.
    Returns: the ValScore; perplexity is exp(loss).
    """
    model.eval()
    total, n_tokens, nats, n_bytes = 0.0, 0, 0.0, 0.0
    for x, y in dataset.sequential_batches(batch_size, context_length, max_batches):
        x, y = x.to(device), y.to(device)  # (B, T) each
        logits, _ = model(x)  # (B, T, V)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")  # (B*T,)
        # Summed, not averaged, per batch: the last batch may be smaller and must weigh by its tokens.
        total += losses.sum().item()
        n_tokens += y.numel()
        if bytes_per_token is not None:
            batch_nats, batch_bytes = bpb_sums(losses, y, bytes_per_token.to(y.device))
            nats, n_bytes = nats + batch_nats.item(), n_bytes + batch_bytes.item()
    bpb = bits_per_byte(nats, n_bytes) if bytes_per_token is not None else None
    return ValScore(total / n_tokens, n_tokens, bpb, int(n_bytes))


def evaluate(
    cfg: EvaluateConfig,
    model_dir: Path,
    tokens_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    enc,
    tracker: Tracker = NullTracker(),
) -> dict:
    """Score model_dir on the validation split of tokens_dir and sample a completion for each prompt.

    Args:
        cfg: the evaluate section of params.
        model_dir: a folder written by lmcore.checkpoint.save_model.
        tokens_dir: a tokenize output folder; its val split is scored.
        out_dir: replaced whole by metrics.json and samples.jsonl.
        seed: each prompt is sampled with a torch.Generator seeded from it.
        enc: the tokenizer the model carries (the one the data was tokenized with).
        tracker: receives the metrics.

    Returns: the metrics dict written to metrics.json.
    """
    model_dir, tokens_dir, out_dir = Path(model_dir), Path(tokens_dir), Path(out_dir)
    device = resolve_device("auto")
    model = load_model(model_dir, device=device)
    val = TokenDataset(tokens_dir, "val")
    if has_tokenizer(tokens_dir) and hasattr(enc, "same_as") and not enc.same_as(load_tokenizer(tokens_dir)):
        shards = load_tokenizer(tokens_dir)
        raise TokenizerError(
            f"{tokens_dir}: the shards were made with tokenizer {shards.name} ({shards.sha256[:12]}), but the model "
            f"{model_dir} carries {enc.name} ({enc.sha256[:12]}): its loss on them would mean nothing"
        )
    if model.config.vocab_size < val.vocab_size:
        raise InputError(
            f"{model_dir}: model vocab_size ({model.config.vocab_size}) is smaller than the data's "
            f"({val.vocab_size}) in {tokens_dir / MANIFEST}"
        )

    seq_len = min(cfg.seq_len or model.config.context_length, model.config.context_length)
    # bits per byte needs the tokenizer's bytes per token (a bare tiktoken Encoding has no special_ids)
    bytes_per_token = token_bytes(enc, model.config.vocab_size) if isinstance(enc, Tokenizer) else None
    score = perplexity(model, val, cfg.batch_size, seq_len, cfg.max_batches, device, bytes_per_token)
    metrics = {
        "val_loss": round(score.loss, 6),
        "perplexity": round(math.exp(score.loss), 6) if score.loss < 700 else math.inf,
        "val_tokens": score.tokens,
        **({"val_bpb": round(score.bpb, 6), "val_bytes": score.bytes} if score.bpb is not None else {}),
    }

    samples = [
        {
            "prompt": prompt,
            # Seeded per prompt: a sample does not depend on which prompts come before it.
            "completion": generate_text(model, enc, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, seed),
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": seed,
        }
        for prompt in cfg.prompts
    ]

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / METRICS, metrics)
        write_text(tmp / SAMPLES, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    tracker.log_metrics(metrics)
    return metrics
