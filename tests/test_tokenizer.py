"""lmcore.tokenizer: the offline GPT-2 encoding matches tiktoken's own r50k_base id for id."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.registry

from lmcore.tokenizer import EOT, GPT2_RANKS_SHA256, RANKS_ENV, eot_token, get_encoding

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# The blob tiktoken's r50k_base constructor loads (tiktoken_ext/openai_public.py); tiktoken caches
# it as $TIKTOKEN_CACHE_DIR/<sha1 of this URL> and checks the cached bytes against a pinned sha256.
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

TEXTS = [
    "Hello world",
    "",
    "naïve café, Straße, 東京都, Привет мир, مرحبا, 🤖🚀 and e\u0301 (combining)",
    "tabs\tand   runs of   spaces  \n\n\n   indented\r\n  trailing   \n",
    "   leading spaces and a trailing space ",
    "12345 3.14159 1,000,000 0x1F 2024-06-01 -42 1e-3",
    "I'm sure they'll say we've, you're, she'd, it's and CAN'T WON'T 'tis",
    "<|endoftext|> is ordinary text to encode_ordinary",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.fixture(scope="module")
def ranks_file() -> Path:
    return Path(os.environ.get(RANKS_ENV) or SHARED / "tokenizers" / "gpt2.tiktoken")


@pytest.fixture
def isolated_tiktoken(tmp_path, monkeypatch) -> Path:
    """A fresh tiktoken registry and cache dir, both restored after the test."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    return cache


@pytest.fixture
def reference_r50k(ranks_file, isolated_tiktoken) -> tiktoken.Encoding:
    """tiktoken's own r50k_base (= gpt2), loaded offline from a pre-filled cache."""
    shutil.copyfile(ranks_file, isolated_tiktoken / hashlib.sha1(R50K_URL.encode()).hexdigest())
    return tiktoken.get_encoding("r50k_base")  # raises on a hash mismatch or an attempted download


def test_parity_with_tiktoken_r50k_base(ranks_file, reference_r50k):
    enc = get_encoding("gpt2", ranks_file)
    shakespeare = (SHARED / "data" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    for text in TEXTS + [shakespeare]:
        assert enc.encode_ordinary(text) == reference_r50k.encode_ordinary(text), text[:40]
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode(EOT, allowed_special="all") == reference_r50k.encode(EOT, allowed_special="all") == [50256]
    assert (enc.name, enc.n_vocab, eot_token(enc)) == ("gpt2", reference_r50k.n_vocab, reference_r50k.eot_token)
    for text in TEXTS:
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_ranks_file_is_the_canonical_gpt2_file(ranks_file):
    assert hashlib.sha256(ranks_file.read_bytes()).hexdigest() == GPT2_RANKS_SHA256


def test_env_var_is_used_and_encoding_cached(ranks_file, isolated_tiktoken, monkeypatch):
    monkeypatch.setenv(RANKS_ENV, str(ranks_file))
    enc = get_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert get_encoding("gpt2") is enc
    assert get_encoding("gpt2", ranks_file) is enc  # same resolved path, same object


def test_missing_ranks_file_names_path_and_env_var(tmp_path, monkeypatch):
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*{RANKS_ENV}"):
        get_encoding("gpt2", missing)
    monkeypatch.setenv(RANKS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        get_encoding()


def test_truncated_ranks_file_is_rejected(ranks_file, tmp_path, isolated_tiktoken):
    short = tmp_path / "short.tiktoken"
    short.write_bytes(b"".join(ranks_file.read_bytes().splitlines(keepends=True)[:1000]))
    with pytest.raises(ValueError, match="1000 BPE ranks, expected 50256"):
        get_encoding("gpt2", short)


def test_other_encodings_need_tiktoken_download(ranks_file):
    with pytest.raises(ValueError, match="only 'gpt2'"):
        get_encoding("cl100k_base", ranks_file)


def test_no_tokenizer_named_is_a_clear_error():
    """A Hugging Face import with another vocabulary saves "tokenizer": null; using it says why."""
    with pytest.raises(ValueError, match='"tokenizer": null'):
        get_encoding(None)


def test_a_failed_download_of_the_ranks_is_one_transient_line(monkeypatch):
    """Offline without a local ranks file, tiktoken's download fails: one line saying what to set, retryable."""
    import requests
    import tiktoken

    from lmcore.errors import TransientError, is_transient
    from lmcore.tokenizer import RANKS_ENV, get_encoding

    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.delenv(RANKS_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TransientError) as err:
        get_encoding("gpt2")
    message = str(err.value)
    assert "\n" not in message and "LMCORE_TIKTOKEN_FILE" in message and "ConnectionError" in message
    assert is_transient(err.value)
