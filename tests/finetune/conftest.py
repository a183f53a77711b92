"""Fixtures for the fine-tuning tests: a micro base model with the GPT-2 vocabulary, real data from the mirror."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import save_model
from lmcore.config import CollectConfig, ModelConfig, Source
from lmcore.data.collect import collect
from lmcore.model import GPT
from lmcore.tokenizer import get_tokenizer
from tests.conftest import SHARED

MIRROR = SHARED / "data"


@pytest.fixture(scope="session")
def enc():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """A random-initialised micro GPT with the real tokenizer's vocabulary."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=64, n_embd=32, n_layer=2, n_head=2))
    out = tmp_path_factory.mktemp("base")
    save_model(model, out, extra={"tokenizer": "gpt2"})
    return out


def collect_source(source: Source, out: Path) -> Path:
    """`source` collected from the offline mirror into out/raw (as the stage does)."""
    collect(CollectConfig(sources=[source]), out / "raw", mirror=MIRROR)
    return out / "raw"
