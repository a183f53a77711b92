"""Fixtures for the benchmark tests: the benchmark files collected from the offline mirror, a micro GPT with the
GPT-2 vocabulary and a context short enough that long prompts (MMLU k-shot, the TruthfulQA primer) are cut."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcore.config import BENCHMARK_SOURCES, CollectConfig, ModelConfig
from lmcore.data.collect import collect
from lmcore.model import GPT
from lmcore.tokenizer import get_tokenizer
from tests.conftest import SHARED


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("benchmarks")
    collect(CollectConfig(sources=BENCHMARK_SOURCES), out, mirror=SHARED / "data")
    return out


@pytest.fixture(scope="session")
def enc():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="session")
def micro_lm() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50257, context_length=128, n_embd=64, n_layer=2, n_head=2)).eval()
