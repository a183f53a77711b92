"""Sampling (lmcore.generation) and evaluation (lmcore.evaluation) with micro models."""

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
from lmcore.generation import generate, generate_text
from lmcore.model import GPT
from lmcore.paths import MANIFEST, METRICS, SAMPLES
from lmcore.tokenizer import get_encoding
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
    return get_encoding("gpt2")


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


# --- generation --------------------------------------------------------------------------------


def test_greedy_is_argmax_step_by_step():
    model = micro()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, idx, 6, temperature=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :3], idx)

    expected = idx
    for _ in range(6):
        logits, _ = model(expected)
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(generate(model, idx, 6, temperature=0), out)  # deterministic


def test_top_k_1_equals_greedy():
    model = micro()
    idx = torch.tensor([[7, 8, 9]])
    greedy = generate(model, idx, 8, temperature=0)
    sampled = generate(model, idx, 8, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, greedy)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = micro()
    idx = torch.tensor([[1, 2]])
    a = generate(model, idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = generate(model, idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    c = generate(model, idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_restricts_the_candidates():
    model = micro()
    idx = torch.tensor([[5, 6, 7]])
    top3 = set(torch.topk(model(idx)[0][0, -1], 3).indices.tolist())
    firsts = {
        generate(model, idx, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(s))[0, -1].item()
        for s in range(40)
    }
    assert firsts <= top3 and len(firsts) > 1


def test_eos_stops_generation():
    model = micro()
    idx = torch.tensor([[1, 2, 3]])
    first = generate(model, idx, 1, temperature=0)[0, -1].item()
    out = generate(model, idx, 10, temperature=0, eos_token=first)
    assert out.shape == (1, 4)  # stopped right after the end-of-text token

    # two rows: the finished row is padded with eos while the other continues
    idx2 = torch.tensor([[1, 2, 3], [9, 9, 9]])
    greedy = generate(model, idx2, 10, temperature=0)
    eos = greedy[0, 3].item()
    out2 = generate(model, idx2, 10, temperature=0, eos_token=eos)
    assert torch.all(out2[0, 3:] == eos)
    row1 = greedy[1, 3:].tolist()
    n = row1.index(eos) + 1 if eos in row1 else 10
    assert out2.shape[1] == 3 + n
    assert torch.equal(out2[1], greedy[1, : 3 + n])


def test_prompt_longer_than_context_is_cropped():
    model = micro()
    idx = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    out = generate(model, idx, 5, temperature=0)
    cropped = generate(model, idx[:, -T:], 5, temperature=0)
    assert out.shape == (1, 45) and torch.equal(out[:, -5:], cropped[:, -5:])


def test_generate_restores_the_training_mode():
    model = micro(dropout=0.5).train()
    generate(model, torch.tensor([[1]]), 2)
    assert model.training


def test_generate_text_returns_the_completion_only(enc):
    model = micro(GPT2_VOCAB)
    a = generate_text(model, enc, "Every effort moves you", 10, temperature=1.0, top_k=50, seed=0)
    b = generate_text(model, enc, "Every effort moves you", 10, temperature=1.0, top_k=50, seed=0)
    assert isinstance(a, str) and a == b
    assert not a.startswith("Every effort")

    ids = enc.encode("Every effort moves you")
    greedy = generate(model, torch.tensor([ids]), 10, temperature=0)[0, len(ids) :].tolist()
    expected = greedy[: greedy.index(enc.eot_token)] if enc.eot_token in greedy else greedy
    assert generate_text(model, enc, "Every effort moves you", 10, temperature=0, seed=5) == enc.decode(expected)


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
    loss, n_tokens = perplexity(model, val, 4, T, None, "cpu")
    expected, expected_n = manual_val_loss(model, val_streams)
    assert n_tokens == expected_n == 10 * T
    assert loss == pytest.approx(expected, rel=1e-5)
    assert loss == pytest.approx(math.log(GPT2_VOCAB), abs=0.3)  # untrained: about uniform

    loss2, n2 = perplexity(model, val, 4, T, 2, "cpu")
    assert n2 == 8 * T
    assert loss2 == pytest.approx(manual_val_loss(model, [val_streams[0], val_streams[1][:T + 1]])[0], rel=1e-5)


def test_evaluate_writes_metrics_and_samples(tmp_path, setup, val_streams, enc):
    model, model_dir, tokens_dir = setup
    cfg = EvaluateConfig(batch_size=4, prompts=["Every effort moves you", "ROMEO:", ""], max_new_tokens=6, temperature=0.8, top_k=40)
    tracker = ListTracker()
    metrics = evaluate(cfg, model_dir, tokens_dir, tmp_path / "eval", seed=11, enc=enc, tracker=tracker)

    assert metrics.keys() == {"val_loss", "perplexity", "val_tokens"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(manual_val_loss(model, val_streams)[0], abs=2e-6)
    assert metrics["val_tokens"] == 10 * T
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
