"""Pretraining from a base model (`pretrain.init: base`): the shards' tokenizer must be the base's, the run
starts from the base's weights (max_steps 0 keeps them as they are), and the model folder carries the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcore.checkpoint import load_model, read_model_config, save_model
from lmcore.config import ModelConfig, PretrainConfig
from lmcore.data.tokenize import tokenize
from lmcore.config import TokenizeConfig
from lmcore.model import GPT
from lmcore.paths import DOCUMENTS, WEIGHTS
from lmcore.pretrain import pretrain
from lmcore.tokenizer import HFTokenizer, TokenizerError, get_tokenizer, load_tokenizer
from tests.test_tokenizer import SHARED, tiny_hf_tokenizer

LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_weights=False, norm_eps=1e-5)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random Llama-style model folder carrying a Hugging Face tokenizer (its vocabulary: 300 tokens)."""
    root = tmp_path_factory.mktemp("base")
    tok = HFTokenizer(tiny_hf_tokenizer(root / "tokenizer.json"), name="tiny-bpe")
    torch.manual_seed(3)
    model = GPT(ModelConfig(vocab_size=320, context_length=32, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, **LLAMA))
    folder = root / "model"
    save_model(model, folder, extra={"tokenizer": tok.name})
    tok.save(folder)
    return folder


def documents(clean: Path) -> Path:
    clean.mkdir(parents=True, exist_ok=True)
    text = (SHARED / "data" / "corpus" / "the-verdict.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    (clean / DOCUMENTS).write_text("".join(json.dumps({"id": str(i), "source": "verdict", "text": p}) + "\n" for i, p in enumerate(paragraphs)))
    return clean


def cfg(**kw) -> PretrainConfig:
    return PretrainConfig(**{"init": "base", "seq_len": 16, "batch_size": 4, "max_steps": 3, "lr": 1e-3, "min_lr": 1e-4,
                             "warmup_steps": 1, "eval_interval": 3, "eval_batches": 2, **kw})


def test_continued_pretraining_starts_from_the_base_and_carries_its_tokenizer(base, tmp_path):
    tokens = tmp_path / "tokens"
    manifest = tokenize(TokenizeConfig(val_fraction=0.2), documents(tmp_path / "clean"), tokens, seed=1, tokenizer=load_tokenizer(base))
    assert manifest["tokenizer"]["name"] == "tiny-bpe" and manifest["vocab_size"] == load_tokenizer(base).n_vocab

    kept = pretrain(cfg(max_steps=0), tokens, tmp_path / "kept", tmp_path / "kept-reports", seed=5, init_dir=base)
    assert kept["steps"] == 0 and kept["final_train_loss"] is None and kept["start"].startswith("model@")
    assert load_file(tmp_path / "kept" / WEIGHTS).keys() == load_file(base / WEIGHTS).keys()
    assert all(torch.equal(a, load_file(base / WEIGHTS)[k]) for k, a in load_file(tmp_path / "kept" / WEIGHTS).items())

    trained = pretrain(cfg(), tokens, tmp_path / "out", tmp_path / "reports", seed=5, init_dir=base)
    # the same validation windows at step 0: the base's own loss, whatever came after
    assert trained["first_val_loss"] == pytest.approx(kept["first_val_loss"], abs=1e-6)
    assert trained["steps"] == 3 and trained["final_val_loss"] != trained["first_val_loss"]
    assert read_model_config(tmp_path / "out")[0] == read_model_config(base)[0]  # the base's architecture, not cfg.model
    carried = load_tokenizer(tmp_path / "out")
    assert carried.identity == load_tokenizer(base).identity and trained["tokenizer"] == "tiny-bpe"
    assert not torch.equal(load_model(tmp_path / "out").wte.weight, load_model(base).wte.weight)


def test_shards_of_another_tokenizer_are_refused_naming_both(base, tmp_path):
    gpt2 = get_tokenizer("gpt2", SHARED / "tokenizers" / "gpt2.tiktoken")
    tokens = tmp_path / "tokens"
    tokenize(TokenizeConfig(val_fraction=0.2), documents(tmp_path / "clean"), tokens, seed=1, tokenizer=gpt2)
    with pytest.raises(TokenizerError, match=r"made with tokenizer gpt2 \(306cd27f03c1\), but the base model .* uses tiny-bpe"):
        pretrain(cfg(), tokens, tmp_path / "out", tmp_path / "reports", seed=5, init_dir=base)
    assert not (tmp_path / "out").exists()


def test_a_window_longer_than_the_base_context_is_refused(base, tmp_path):
    tokens = tmp_path / "tokens"
    tokenize(TokenizeConfig(val_fraction=0.2), documents(tmp_path / "clean"), tokens, seed=1, tokenizer=load_tokenizer(base))
    with pytest.raises(ValueError, match=r"pretrain.seq_len \(64\) exceeds the model's context_length \(32\)"):
        pretrain(cfg(seq_len=64), tokens, tmp_path / "out", tmp_path / "reports", seed=5, init_dir=base)
