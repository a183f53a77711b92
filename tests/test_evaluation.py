"""Evaluation (lmcore.evaluation) with micro models; sampling is tested in test_generation.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmcore.checkpoint import save_model
from lmcore.config import EvaluateConfig, ModelConfig
from lmcore.data.loader import TokenDataset
from lmcore.data.shards import token_dtype, write_shard
from lmcore.evaluation import evaluate, perplexity
from lmcore.model import GPT
from lmcore.paths import MANIFEST, METRICS, SAMPLES
from lmcore.tokenizer import get_tokenizer
from lmcore.tracking import ListTracker

GPT2_VOCAB = 50257
RANKS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2.tiktoken"
T = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def micro(vocab_size: int = 64, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": vocab_size, "context_length": T, "n_embd": 16, "n_layer": 2, "n_head": 2, **overrides})
    return GPT(cfg).eval()


def write_tokens(tokens_dir: Path, splits: dict[str, list[list[np.ndarray]]], vocab_size: int) -> Path:
    """A tokenize-like output: for each split a list of shards, each a list of documents."""
    shards = []
    for split, split_shards in splits.items():
        for i, docs in enumerate(split_shards):
            name = f"{split}_{i:03d}.arrow"
            write_shard(tokens_dir / name, docs, token_dtype(vocab_size))
            shards.append({"file": name, "split": split})
    (tokens_dir / MANIFEST).write_text(json.dumps({"vocab_size": vocab_size, "shards": shards}))
    return tokens_dir


@pytest.fixture
def enc(monkeypatch):
    if not RANKS.is_file():
        pytest.skip(f"{RANKS} not found")
    monkeypatch.setenv("LMCORE_TIKTOKEN_FILE", str(RANKS))
    return get_tokenizer("gpt2")


@pytest.fixture
def val_streams() -> list[np.ndarray]:
    """Two val shards of 120 and 50 tokens: 7 + 3 non-overlapping windows of 16+1 tokens."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, GPT2_VOCAB, 120), rng.integers(0, GPT2_VOCAB, 50)]


@pytest.fixture
def setup(tmp_path, val_streams) -> tuple[GPT, Path, Path]:
    model = micro(GPT2_VOCAB)
    save_model(model, tmp_path / "model")
    train = [np.random.default_rng(1).integers(0, GPT2_VOCAB, 100)]
    tokens_dir = write_tokens(tmp_path / "tokens", {"train": [train], "val": [[s[:60], s[60:]] for s in val_streams]}, GPT2_VOCAB)
    return model, tmp_path / "model", tokens_dir


# --- evaluation --------------------------------------------------------------------------------


def manual_val_loss(model: GPT, streams: list[np.ndarray]) -> tuple[float, int]:
    """Cross-entropy over every non-overlapping window of T+1 tokens, all in one batch."""
    windows = [s[off : off + T + 1] for s in streams for off in range(0, len(s) - T, T)]
    batch = torch.tensor(np.stack(windows), dtype=torch.long)
    logits, _ = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="mean")
    return loss.item(), batch[:, 1:].numel()


def test_perplexity_matches_a_manual_computation(setup, val_streams):
    model, _, tokens_dir = setup
    val = TokenDataset(tokens_dir, "val")
    # batch_size 4 over 10 windows: batches of 4, 4 and 2, which must weigh by their tokens
    loss, n_tokens, *_ = perplexity(model, val, 4, T, None, "cpu")
    expected, expected_n = manual_val_loss(model, val_streams)
    assert n_tokens == expected_n == 10 * T
    assert loss == pytest.approx(expected, rel=1e-5)
    assert loss == pytest.approx(math.log(GPT2_VOCAB), abs=0.3)  # untrained: about uniform

    loss2, n2, *_ = perplexity(model, val, 4, T, 2, "cpu")
    assert n2 == 8 * T
    assert loss2 == pytest.approx(manual_val_loss(model, [val_streams[0], val_streams[1][:T + 1]])[0], rel=1e-5)


def test_evaluate_writes_metrics_and_samples(tmp_path, setup, val_streams, enc):
    model, model_dir, tokens_dir = setup
    cfg = EvaluateConfig(batch_size=4, prompts=["Every effort moves you", "ROMEO:", ""], max_new_tokens=6, temperature=0.8, top_k=40)
    tracker = ListTracker()
    metrics = evaluate(cfg, model_dir, tokens_dir, tmp_path / "eval", seed=11, enc=enc, tracker=tracker)

    assert metrics.keys() == {"val_loss", "perplexity", "val_tokens", "val_bpb", "val_bytes"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(manual_val_loss(model, val_streams)[0], abs=2e-6)
    assert metrics["val_tokens"] == 10 * T
    # bits per byte over the same targets: their UTF-8 bytes (no <|endoftext|> among them), the same nats
    targets = [int(t) for s in val_streams for off in range(0, len(s) - T, T) for t in s[off + 1 : off + T + 1]]
    assert enc.eot_token not in targets
    assert metrics["val_bytes"] == sum(len(enc.decode_single_token_bytes(t)) for t in targets)
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] * 10 * T / math.log(2) / metrics["val_bytes"], rel=1e-5)
    assert json.loads((tmp_path / "eval" / METRICS).read_text()) == metrics
    assert tracker.records == [(None, metrics)]

    lines = (tmp_path / "eval" / SAMPLES).read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert [s["prompt"] for s in samples] == cfg.prompts
    for s in samples:
        assert s.keys() == {"prompt", "completion", "temperature", "top_k", "max_new_tokens", "seed"}
        assert isinstance(s["completion"], str)
        assert (s["temperature"], s["top_k"], s["max_new_tokens"], s["seed"]) == (0.8, 40, 6, 11)

    # the same seed gives the same samples; another seed other samples
    evaluate(cfg, model_dir, tokens_dir, tmp_path / "again", seed=11, enc=enc)
    assert (tmp_path / "again" / SAMPLES).read_bytes() == (tmp_path / "eval" / SAMPLES).read_bytes()
    evaluate(cfg, model_dir, tokens_dir, tmp_path / "other", seed=12, enc=enc)
    other = [json.loads(line)["completion"] for line in (tmp_path / "other" / SAMPLES).read_text().splitlines()]
    assert other != [s["completion"] for s in samples]


def test_evaluate_max_batches_and_vocab_check(tmp_path, setup, enc):
    _, model_dir, tokens_dir = setup
    cfg = EvaluateConfig(batch_size=2, max_batches=3, prompts=["Hi"], max_new_tokens=2)
    assert evaluate(cfg, model_dir, tokens_dir, tmp_path / "eval", seed=0, enc=enc)["val_tokens"] == 6 * T

    save_model(micro(1000), tmp_path / "small")
    with pytest.raises(ValueError, match=r"vocab_size \(1000\) is smaller"):
        evaluate(cfg, tmp_path / "small", tokens_dir, tmp_path / "eval2", seed=0, enc=enc)
    assert not (tmp_path / "eval2").exists()
