"""lmcore.tokenizer: the offline GPT-2 encoding matches tiktoken's own r50k_base id for id."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.registry

from lmcore.errors import MissingInputError
from lmcore.tokenizer import (
    EOT,
    GPT2_RANKS_SHA256,
    HF_TOKENIZER_FILE,
    RANKS_ENV,
    TIKTOKEN_FILE,
    TOKENIZER_CONFIG,
    HFTokenizer,
    TokenizerError,
    check_vocab,
    eot_token,
    get_encoding,
    get_tokenizer,
    load_tokenizer,
    resolve_tokenizer,
)

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
    with pytest.raises(ValueError, match="no tokenizer named"):
        get_encoding(None)


# -- the Tokenizer interface: any tokenizer, carried by the folder it belongs to ---------------------------------


def tiny_hf_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer.json trained here on a few lines, with ChatML special tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t for t in TEXTS if t] * 20, trainer)
    tok.save(str(path))
    return path


def test_gpt2_tokenizer_round_trips_through_a_folder_and_matches_tiktoken(ranks_file, tmp_path, monkeypatch):
    tok = get_tokenizer("gpt2", ranks_file)
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [TIKTOKEN_FILE, TOKENIZER_CONFIG]
    monkeypatch.delenv(RANKS_ENV, raising=False)  # the folder alone: no environment, no network
    loaded = load_tokenizer(tmp_path)
    assert loaded.identity == {"kind": "tiktoken", "name": "gpt2", "sha256": GPT2_RANKS_SHA256, "n_vocab": 50257}
    reference = tiktoken.Encoding("gpt2", pat_str=get_encoding("gpt2", ranks_file)._pat_str,
                                  mergeable_ranks=get_encoding("gpt2", ranks_file)._mergeable_ranks, special_tokens={EOT: 50256})
    for text in TEXTS:
        assert loaded.encode_ordinary(text) == reference.encode_ordinary(text)
        assert loaded.decode(loaded.encode_ordinary(text)) == text
    assert loaded.encode("a<|endoftext|>b") == [64, 50256, 65] and loaded.stop_tokens == [50256]


def test_hf_tokenizer_round_trips_with_special_tokens_and_template(tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    tok = HFTokenizer(path, name="tiny", eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template="{{ messages }}")
    folder = tmp_path / "model"
    tok.save(folder)
    loaded = load_tokenizer(folder)
    assert loaded.identity == tok.identity and loaded.chat_template == "{{ messages }}"
    assert loaded.eot_token == loaded.encode_single_token("<|endoftext|>")
    assert loaded.stop_tokens == [loaded.eot_token, loaded.encode_single_token("<|im_end|>")]
    reference = PreTrainedTokenizerFast.from_pretrained(folder)  # our tokenizer_config.json is Hugging Face's too
    for text in TEXTS:
        ids = loaded.encode_ordinary(text)
        assert loaded.decode(ids) == text
        assert b"".join(loaded.decode_single_token_bytes(i) for i in ids) == text.encode()
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    assert loaded.encode(chat) == reference(chat, add_special_tokens=False)["input_ids"]
    assert loaded.encode_ordinary("<|im_end|>") != [loaded.encode_single_token("<|im_end|>")]  # ordinary: plain text


def test_a_tokenizer_file_that_does_not_match_its_recorded_sha256_is_refused(tmp_path):
    tok = HFTokenizer(tiny_hf_tokenizer(tmp_path / "tokenizer.json"), name="tiny")
    folder = tmp_path / "model"
    tok.save(folder)
    (folder / HF_TOKENIZER_FILE).write_text((folder / HF_TOKENIZER_FILE).read_text().replace('"ByteLevel"', '"ByteLevel" ', 1))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: sha256 .* differs from .* recorded in .*tokenizer_config\.json"):
        load_tokenizer(folder)


def test_a_folder_without_a_tokenizer_says_so(tmp_path):
    with pytest.raises(MissingInputError, match="carries no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    tok = HFTokenizer(tiny_hf_tokenizer(tmp_path / "tokenizer.json"), name="tiny")
    check_vocab(tok, tok.n_vocab, "here")
    with pytest.raises(TokenizerError, match=r"models/x/config.json: the tokenizer tiny has \d+ tokens but the model's vocabulary is 64"):
        check_vocab(tok, 64, "models/x/config.json")


def test_resolve_tokenizer_follows_the_base_model(ranks_file, tmp_path):
    base = tmp_path / "base"
    HFTokenizer(tiny_hf_tokenizer(tmp_path / "tokenizer.json"), name="tiny").save(base)
    assert resolve_tokenizer("auto", root=tmp_path, ranks_file=str(ranks_file), base_dir=None).name == "gpt2"
    assert resolve_tokenizer("auto", root=tmp_path, ranks_file=str(ranks_file), base_dir=base).name == "tiny"
    assert resolve_tokenizer("base", root=tmp_path, ranks_file=None, base_dir=base).name == "tiny"
    assert resolve_tokenizer("tokenizer.json", root=tmp_path, ranks_file=None, base_dir=None).kind == "huggingface"
    with pytest.raises(TokenizerError, match="base_model.source is scratch"):
        resolve_tokenizer("base", root=tmp_path, ranks_file=None, base_dir=None)
    with pytest.raises(MissingInputError, match="tokenize.tokenizer: 'nowhere'"):
        resolve_tokenizer("nowhere", root=tmp_path, ranks_file=None, base_dir=None)


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
