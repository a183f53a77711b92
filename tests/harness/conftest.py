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


# --- generative benchmarks (lmcore.harness.generative) -------------------------------------------------------------

SMOLLM2_GGUF = SHARED / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def nltk_data(tmp_path_factory) -> Path:
    """lmcore's copy of NLTK's English Punkt in a folder of the session ($LMCORE_NLTK_DATA), not ~/.cache: IFEval's
    checkers (lm-eval) find it instead of downloading."""
    from lmcore.harness.punkt import NLTK_DATA_ENV, ensure_punkt

    import nltk

    folder = tmp_path_factory.mktemp("nltk_data")
    mp = pytest.MonkeyPatch()
    mp.setenv(NLTK_DATA_ENV, str(folder))
    # first on NLTK's path, so that a copy an earlier test of this process put on it (~/.cache/lmcore/nltk_data, or
    # another test's folder) does not stand in for this one
    mp.setattr(nltk.data, "path", [str(folder), *nltk.data.path])
    ensure_punkt()
    yield folder
    mp.undo()


@pytest.fixture(scope="session")
def gen_bench_dir(tmp_path_factory) -> Path:
    """IFEval and GSM8K (test and train) collected from the offline mirror, as the generative tasks read them."""
    from lmcore.config import GENERATIVE_SOURCES

    out = tmp_path_factory.mktemp("gen-benchmarks")
    collect(CollectConfig(sources=GENERATIVE_SOURCES), out, mirror=SHARED / "data")
    return out


@pytest.fixture(scope="session")
def smollm2_tok(tmp_path_factory):
    """SmolLM2's tokenizer and ChatML template, rebuilt by lmcore from the GGUF file's metadata (no weights read)."""
    from lmcore.gguf import _build_tokenizer, _Metadata, open_gguf

    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is not there")
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    return _build_tokenizer(_Metadata(open_gguf(SMOLLM2_GGUF), SMOLLM2_GGUF), SMOLLM2_GGUF, folder, "SmolLM2", 2048)
