"""Tokenizers behind one interface, carried with the model they belong to.

Two implementations of `Tokenizer`:
    TiktokenTokenizer  GPT-2's byte-level BPE (tiktoken, built offline from a local ranks file)
    HFTokenizer        any Hugging Face `tokenizers` tokenizer.json (Llama-family, SmolLM2, a trained BPE),
                       with its special tokens and chat template

Every model folder, token-shard folder and registered model carries its tokenizer as files beside the weights:

    tokenizer_config.json   {"lmcore": {"kind", "name", "file", "sha256", "eot_token"},
                             "bos_token", "eos_token", "chat_template", ...}  (the Hugging Face keys too,
                             so transformers' AutoTokenizer loads an "huggingface" folder as it is)
    tokenizer.json          kind "huggingface"
    tokenizer.tiktoken      kind "tiktoken": the BPE ranks

    tok = load_tokenizer("models/base")          # whatever the folder carries; no network, no environment
    tok.encode_ordinary("Hello world")           # [15496, 995] for GPT-2
    tok.save("models/instruct")                  # the same files into another folder
    gpt2 = get_tokenizer("gpt2", "../shared/tokenizers/gpt2.tiktoken")

`get_encoding` is the GPT-2 tiktoken encoding itself. Where its ranks come from, in order: the `ranks_file`
argument, the `LMCORE_TIKTOKEN_FILE` environment variable, else tiktoken's own loader (which downloads on first
use and fails offline). A folder that carries its tokenizer never needs either.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

from lmcore.errors import InputError, MissingInputError, TransientError, one_line
from lmcore.io import read_json, sha256_file, write_bytes, write_json

log = logging.getLogger(__name__)

RANKS_ENV = "LMCORE_TIKTOKEN_FILE"
EOT = "<|endoftext|>"

# GPT-2 (= tiktoken's r50k_base): 50,256 mergeable ranks, then <|endoftext|> as id 50256.
GPT2_N_RANKS = 50256
GPT2_N_VOCAB = 50257
GPT2_EOT_ID = 50256
# sha256 of the canonical gpt2/r50k_base ranks file; tiktoken pins the same hash for r50k_base.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# Files of a folder that carries a tokenizer.
TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
LMCORE_KEY = "lmcore"  # our section of tokenizer_config.json
TIKTOKEN, HUGGINGFACE = "tiktoken", "huggingface"


class TokenizerError(InputError):
    """A tokenizer file or folder that cannot be used; the message names it."""


class Tokenizer(ABC):
    """Text <-> token ids, with the method names of tiktoken's Encoding so either can be handed around.

    name: what the tokenizer is called ("gpt2", "SmolLM2-135M-Instruct", "bpe-8192").
    sha256: the hash of its vocabulary file; two tokenizers with the same sha256 encode alike.
    eot_token: the id appended after every document in token shards, and the end of generated text.
    stop_tokens: every id that ends generation (eot_token, the template's end-of-turn, eos).
    chat_template: a Jinja chat template (Hugging Face's convention), or None.
    """

    kind: str
    name: str
    sha256: str
    n_vocab: int
    eot_token: int
    bos_token: int | None = None
    chat_template: str | None = None

    @property
    def stop_tokens(self) -> list[int]:
        return [self.eot_token]

    @property
    @abstractmethod
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (end of text, chat markers): control symbols, not text; they stand for no bytes
        of the text (bits per byte counts neither their bytes nor their loss)."""

    @property
    def identity(self) -> dict[str, Any]:
        """What a manifest records of the tokenizer: enough to refuse another one."""
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256, "n_vocab": self.n_vocab}

    def same_as(self, other: Tokenizer | dict) -> bool:
        ident = other if isinstance(other, dict) else other.identity
        return ident.get("sha256") == self.sha256 and ident.get("kind") == self.kind

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, special tokens spelled in it encoded as plain text."""

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, a special token spelled in it (`<|endoftext|>`, `<|im_end|>`) as that token."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a character's UTF-8 bytes may span several tokens)."""

    @abstractmethod
    def encode_single_token(self, text: str) -> int:
        """The id of a special token given as text; TokenizerError when it is not one token."""

    @abstractmethod
    def _write_files(self, folder: Path) -> dict[str, Any]:
        """Write the vocabulary file into `folder`; returns the extra tokenizer_config.json keys."""

    def save(self, folder: str | Path) -> None:
        """Write this tokenizer's files into `folder` (each atomically), replacing any other tokenizer there."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        extra = self._write_files(folder)
        for stale in {HF_TOKENIZER_FILE, TIKTOKEN_FILE} - {extra["file"]}:  # another tokenizer's file
            (folder / stale).unlink(missing_ok=True)
        section = {"kind": self.kind, "name": self.name, "file": extra.pop("file"), "sha256": self.sha256,
                   "eot_token": self.decode_single_token_bytes(self.eot_token).decode("utf-8", "replace")}
        write_json(folder / TOKENIZER_CONFIG, {**extra, "chat_template": self.chat_template, LMCORE_KEY: section})


# ---------------------------------------------------------------------------------------------------------------
# tiktoken (GPT-2)


class TiktokenTokenizer(Tokenizer):
    kind = TIKTOKEN

    def __init__(self, enc: tiktoken.Encoding, ranks_file: str | Path | None):
        self.enc = enc
        self.name = enc.name
        # None: the ranks came through tiktoken's own (online) loader; they are written out from memory.
        self.ranks_file = Path(ranks_file) if ranks_file else None
        self.sha256 = sha256_file(self.ranks_file) if self.ranks_file else hashlib.sha256(self._ranks_bytes()).hexdigest()
        self.n_vocab = enc.n_vocab
        self.eot_token = enc.eot_token

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.enc.encode_single_token(t) for t in self.enc.special_tokens_set)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.enc.decode_single_token_bytes(token)

    def encode_single_token(self, text: str) -> int:
        try:
            return self.enc.encode_single_token(text)
        except KeyError:
            raise TokenizerError(f"{text!r} is not a single token of {self.name}") from None

    def _ranks_bytes(self) -> bytes:
        """The ranks in tiktoken's file format (base64 token, space, rank; by rank), as gpt2.tiktoken has them."""
        ranks = self.enc._mergeable_ranks
        return b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))

    def _write_files(self, folder: Path) -> dict[str, Any]:
        if self.ranks_file:
            _copy_atomic(self.ranks_file, folder / TIKTOKEN_FILE)
        else:
            write_bytes(folder / TIKTOKEN_FILE, self._ranks_bytes())
        # The Hugging Face keys a GPT-2 tokenizer_config.json has; transformers reads tokenizer.json, not these ranks.
        return {"file": TIKTOKEN_FILE, "bos_token": EOT, "eos_token": EOT, "model_max_length": 1024}


@functools.lru_cache(maxsize=4)
def _merges_of(ranks_sha256: str, enc: tiktoken.Encoding) -> tuple[tuple[bytes, bytes], ...]:
    ranks = enc._mergeable_ranks
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"tokenizer {enc.name}: token {token!r} (rank {rank}) is not two lower-ranked tokens merged")
        merges.append((parts[0], parts[1]))
    return tuple(merges)


def tiktoken_merges(tok: TiktokenTokenizer) -> list[tuple[bytes, bytes]]:
    """The BPE merges of tiktoken ranks, one per multi-byte token in rank order: the two parts BPE leaves of the
    token when only lower-ranked merges are allowed (how GPT-2's merges.txt made the ranks in the first place).
    GGUF and Hugging Face exports write them; GPT-2's take about a second to derive, once per process."""
    return list(_merges_of(tok.sha256, tok.enc))


def _copy_atomic(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def get_encoding(name: str = "gpt2", ranks_file: str | Path | None = None) -> tiktoken.Encoding:
    """The tiktoken encoding called `name`, built from a local ranks file when one is given or configured.

    Args:
        name: the encoding; only "gpt2" can be built from a local ranks file.
        ranks_file: a tiktoken `.tiktoken` ranks file; when None, `$LMCORE_TIKTOKEN_FILE` if set and
            non-empty, else `tiktoken.get_encoding(name)` (online on first use).

    Returns:
        The encoding; the same object for the same name and resolved ranks path.
    """
    if not name:
        raise InputError("no tokenizer named; lmcore's tiktoken encodings are 'gpt2'")
    ranks_file = _ranks_file(ranks_file)
    if ranks_file is None:
        try:
            return tiktoken.get_encoding(name)
        except OSError as err:  # requests' and urllib's network errors are OSErrors
            raise TransientError(
                f"tiktoken could not download the {name!r} ranks ({type(err).__name__}); offline, point "
                f"${RANKS_ENV} (or tokenize.ranks_file) at a local .tiktoken file"
            ) from err
    if name != "gpt2":
        raise InputError(f"encoding {name!r} cannot be built from a local ranks file; only 'gpt2' can")
    path = Path(ranks_file).expanduser()
    if not path.is_file():
        raise MissingInputError(
            f"tiktoken ranks file not found: {path} (given as ranks_file or ${RANKS_ENV}; "
            f"point it at a gpt2.tiktoken file, or unset both to let tiktoken download)"
        )
    return _local_gpt2(name, str(path.resolve()))


def _ranks_file(ranks_file: str | Path | None) -> str | Path | None:
    if ranks_file is None or str(ranks_file) == "":
        return os.environ.get(RANKS_ENV) or None
    return ranks_file


@functools.lru_cache(maxsize=8)
def _local_gpt2(name: str, path: str) -> tiktoken.Encoding:
    digest = sha256_file(path)
    # tiktoken caches every file it reads under a key made of the path alone (in $TIKTOKEN_CACHE_DIR
    # or a temp folder) and, without a hash, would serve a stale copy after the file changed.
    # Passing the file's own hash makes it check the cached copy against the file.
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=digest)
    except ValueError as err:  # a line that is not "<base64 token> <rank>" (binascii.Error is a ValueError)
        raise TokenizerError(f"{path}: not a tiktoken ranks file ({one_line(err)[:200]})") from None
    if len(ranks) != GPT2_N_RANKS:
        raise InputError(f"{path}: {len(ranks)} BPE ranks, expected {GPT2_N_RANKS} for gpt2; not a GPT-2 ranks file")
    if set(ranks.values()) != set(range(GPT2_N_RANKS)):
        raise InputError(f"{path}: BPE ranks are not exactly 0..{GPT2_N_RANKS - 1}; not a GPT-2 ranks file")
    if digest != GPT2_RANKS_SHA256:
        # Same number of ranks but other bytes (reordered lines, other line endings, other merges).
        log.warning("%s: sha256 %s differs from the canonical GPT-2 ranks file (%s)", path, digest, GPT2_RANKS_SHA256)
    log.info("built tokenizer %s from %s", name, path)
    return tiktoken.Encoding(
        name=name,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_N_VOCAB,
    )


def get_tokenizer(name: str = "gpt2", ranks_file: str | Path | None = None) -> TiktokenTokenizer:
    """GPT-2's tokenizer as a `Tokenizer` that can be saved with a model (its ranks file goes with it)."""
    enc = get_encoding(name, ranks_file)
    path = _ranks_file(ranks_file)
    return TiktokenTokenizer(enc, Path(path).expanduser().resolve() if path else None)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json) with its special tokens and chat template.

    Args:
        path: the tokenizer.json file.
        name: what to call it.
        eot_token: the document separator / end of text, as text (e.g. "<|endoftext|>"); default the first of
            "<|endoftext|>", "<|end_of_text|>", "</s>", eos_token that is a token.
        bos_token, eos_token: as text, or None; eos_token (the end of an assistant turn) also stops generation.
        chat_template: a Jinja chat template, or None.
    """

    kind = HUGGINGFACE

    def __init__(self, path: str | Path, *, name: str | None = None, eot_token: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, chat_template: str | None = None,
                 extra_config: dict | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        try:
            self._plain = RustTokenizer.from_file(str(self.path))
            self._special = RustTokenizer.from_file(str(self.path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({one_line(err)[:300]})") from None
        self._plain.encode_special_tokens = True  # special tokens in text are plain text, as tiktoken's ordinary
        self.sha256 = sha256_file(self.path)
        self.name = name or f"tokenizer-{self.sha256[:12]}"
        self.n_vocab = self._plain.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.bos_name, self.eos_name = bos_token, eos_token
        self.extra_config = dict(extra_config or {})
        # The document separator: a base model's end-of-text, before a chat model's end of turn (its eos).
        candidates = [eot_token] if eot_token else [EOT, "<|end_of_text|>", "</s>", eos_token]
        eot = next((self._plain.token_to_id(t) for t in candidates if t and self._plain.token_to_id(t) is not None), None)
        if eot is None:
            raise TokenizerError(f"{self.path}: none of {[c for c in candidates if c]} is a token; name the end-of-text token")
        self.eot_token = eot
        self.bos_token = self._plain.token_to_id(bos_token) if bos_token else None
        self.eos_token = self._plain.token_to_id(eos_token) if eos_token else None
        config = json.loads(self._plain.to_str())
        self._byte_level = _is_byte_level(config)
        # tiktoken's encoder where this tokenizer is one tiktoken can run (a trained BPE is): the same ids, faster.
        self.fast = _tiktoken_of(self.path, self.sha256, self.name, config)

    @property
    def stop_tokens(self) -> list[int]:
        return list(dict.fromkeys(t for t in (self.eot_token, self.eos_token) if t is not None))

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._plain.get_added_tokens_decoder().items() if t.special)

    def encode_ordinary(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode_ordinary(text)
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        if self.fast is not None:
            return self.fast.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode(text, allowed_special="all")
        return self._special.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._plain.decode(list(ids), skip_special_tokens=False)

    def decode_single_token_bytes(self, token: int) -> bytes:
        if self.fast is not None:
            return self.fast.decode_single_token_bytes(int(token))
        piece = self._plain.id_to_token(int(token))
        if piece is None:
            return b""
        added = {t.content for t in self._plain.get_added_tokens_decoder().values()}
        if piece in added:
            return piece.encode()
        if self._byte_level:
            table = byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def encode_single_token(self, text: str) -> int:
        token = self._plain.token_to_id(text)
        if token is None:
            raise TokenizerError(f"{text!r} is not a single token of {self.name}")
        return token

    def _write_files(self, folder: Path) -> dict[str, Any]:
        _copy_atomic(self.path, folder / HF_TOKENIZER_FILE)
        return {**self.extra_config, "file": HF_TOKENIZER_FILE, "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": self.bos_name, "eos_token": self.eos_name,
                "eot_token_text": self._plain.id_to_token(self.eot_token)}


def _is_byte_level(config: dict) -> bool:
    decoder = config.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


def _split_pattern(pre: dict | None) -> str | None:
    """The regex a tokenizer.json's pre-tokenizer splits text with, where tiktoken can split alike: ByteLevel with
    its built-in GPT-2 regex, or a regex Split (isolated) followed by ByteLevel without one. None otherwise
    (digit splitting, Metaspace, a prefix space, ...)."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return r50k_pat_str if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    regex = (split.get("pattern") or {}).get("Regex")
    if (split.get("type") != "Split" or regex is None or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space")):
        return None
    return regex


_FAST: dict[tuple[str, str], tiktoken.Encoding | None] = {}  # (tokenizer.json sha256, name) -> tiktoken_encoding


def _tiktoken_of(path: Path, sha256: str, name: str, config: dict) -> tiktoken.Encoding | None:
    """tiktoken_encoding, once per file and name in a process (deriving the merges takes a second for 50k tokens)."""
    if (sha256, name) not in _FAST:
        _FAST[sha256, name] = tiktoken_encoding(config, sha256, name)
    return _FAST[sha256, name]


def tiktoken_encoding(config: dict, sha256: str, name: str) -> tiktoken.Encoding | None:
    """A tiktoken Encoding that encodes exactly as the tokenizer.json `config` does, or None where tiktoken cannot.

    It can when the tokenizer is a byte-level BPE with no normalizer, a pre-tokenizer regex tiktoken runs
    (`_split_pattern`), every byte a token, only special added tokens, and merges that are exactly those tiktoken's
    rank order implies (each token's two parts are what BPE leaves of it with the lower-ranked merges alone, as
    GPT-2's are). The vocabulary ids are then tiktoken's ranks. lmcore's trained tokenizers are such tokenizers.
    """
    model = config.get("model") or {}
    pattern = _split_pattern(config.get("pre_tokenizer"))
    if (model.get("type") != "BPE" or pattern is None or config.get("normalizer") or not _is_byte_level(config)
            or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        return None
    added = config.get("added_tokens") or []
    if not all(t.get("special") for t in added):
        return None
    specials = {t["content"]: t["id"] for t in added}
    table = byte_decoder()
    try:
        ranks = {bytes(table[c] for c in piece): i for piece, i in model["vocab"].items() if piece not in specials}
    except KeyError:  # a piece outside the byte-level alphabet
        return None
    if sum(len(t) == 1 for t in ranks) != 256 or len(set(ranks.values())) != len(ranks):
        return None
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    try:
        written = [(bytes(table[c] for c in a), bytes(table[c] for c in b)) for a, b in merges]
        enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except (KeyError, ValueError):
        return None
    try:
        implied = list(_merges_of(sha256, enc))
    except TokenizerError:  # a token that is not two lower-ranked tokens merged
        return None
    if written != implied:
        log.debug("%s: merges are not tiktoken's rank order; encoding with tokenizers", name)
        return None
    return enc


# ---------------------------------------------------------------------------------------------------------------
# Folders


def has_tokenizer(folder: str | Path) -> bool:
    return (Path(folder) / TOKENIZER_CONFIG).is_file()


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer a model, token-shard or tokenizer folder carries (tokenizer_config.json and its file).

    A Hugging Face folder without our section (tokenizer.json, maybe tokenizer_config.json) loads too.
    Raises: MissingInputError when the folder carries none; TokenizerError naming the file when one is malformed
    or its vocabulary file does not match the sha256 recorded for it.
    """
    folder = Path(folder)
    config_path = folder / TOKENIZER_CONFIG
    if not config_path.is_file():
        if (folder / HF_TOKENIZER_FILE).is_file():
            return HFTokenizer(folder / HF_TOKENIZER_FILE, name=folder.name)
        if _names_gpt2(folder):
            # A model folder from before tokenizers were carried (config.json says "tokenizer": "gpt2"): GPT-2's
            # ranks from tokenize.ranks_file's fallbacks ($LMCORE_TIKTOKEN_FILE, else tiktoken's download).
            log.warning("%s carries no tokenizer files; using GPT-2's, which its config.json names", folder)
            return get_tokenizer("gpt2")
        raise MissingInputError(
            f"{folder}: carries no tokenizer ({TOKENIZER_CONFIG} is missing); model folders and token shards made by "
            f"lmcore carry theirs: make it again, or copy a tokenizer's {TOKENIZER_CONFIG} and vocabulary file into it"
        )
    config = read_tokenizer_config(config_path)
    section = config.get(LMCORE_KEY) or {}
    if not isinstance(section, dict):
        raise TokenizerError(f"{config_path}: '{LMCORE_KEY}' is {_short(section)}, not an object")
    for key in ("kind", "name", "sha256", "eot_token"):
        _check_text(section.get(key), config_path, f"{LMCORE_KEY}.{key}")
    _check_text(config.get("eot_token_text"), config_path, "eot_token_text")
    kind = section.get("kind") or (HUGGINGFACE if (folder / HF_TOKENIZER_FILE).is_file() else None)
    file_name = section.get("file") or (HF_TOKENIZER_FILE if kind == HUGGINGFACE else TIKTOKEN_FILE)
    file = folder / _plain_name(file_name, config_path, f"{LMCORE_KEY}.file")
    if not file.is_file():
        raise MissingInputError(f"{config_path}: names {file.name}, which is not in {folder}")
    expected = section.get("sha256")
    if expected and sha256_file(file) != expected:
        raise TokenizerError(f"{file}: sha256 {sha256_file(file)} differs from {expected} recorded in {config_path}")
    if kind == TIKTOKEN:
        name = section.get("name") or "gpt2"
        if name != "gpt2":
            raise TokenizerError(f"{config_path}: {LMCORE_KEY}.name {name!r}: the one tiktoken encoding lmcore builds "
                                 f"from a ranks file is 'gpt2'")
        return TiktokenTokenizer(get_encoding(name, file), file)
    if kind == HUGGINGFACE:
        known = {LMCORE_KEY, "chat_template", "bos_token", "eos_token", "eot_token_text", "tokenizer_class"}
        return HFTokenizer(
            file, name=section.get("name"), eot_token=config.get("eot_token_text") or section.get("eot_token"),
            bos_token=token_text(config.get("bos_token")), eos_token=token_text(config.get("eos_token")),
            chat_template=template_text(config.get("chat_template")),
            extra_config={k: v for k, v in config.items() if k not in known},
        )
    raise TokenizerError(f"{config_path}: unknown tokenizer kind {kind!r} (expected {TIKTOKEN!r} or {HUGGINGFACE!r})")


def _plain_name(name: Any, config_path: Path, key: str) -> str:
    """`name`, a file name inside the tokenizer's folder: no folder part, no "..", not absolute (a tokenizer config
    is untrusted input: it must not point lmcore at another file on the machine)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\x00")
            or Path(name).is_absolute() or Path(name).name != name):
        raise TokenizerError(f"{config_path}: {key} {_short(name)} is not a plain file name inside its folder")
    return name


def _check_text(value: Any, config_path: Path, key: str) -> None:
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{config_path}: {key} is {_short(value)}; expected text")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def read_tokenizer_config(path: Path) -> dict:
    """A tokenizer_config.json as a dict ({} when there is none); TokenizerError naming it when it is not an object."""
    if not path.is_file():
        return {}
    try:
        config = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not a JSON object ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: not a JSON object")
    return config


def _names_gpt2(folder: Path) -> bool:
    try:
        return read_json(folder / "config.json").get("tokenizer") == "gpt2"
    except (OSError, ValueError, AttributeError):
        return False


def token_text(value: Any) -> str | None:
    """HF writes special tokens as text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def template_text(value: Any) -> str | None:
    """HF's chat_template is a string, or a list of {"name", "template"} of which "default" is the one."""
    if isinstance(value, list):
        named = {t.get("name"): t["template"] for t in value if isinstance(t, dict) and isinstance(t.get("template"), str)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def check_vocab(tok: Tokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding (a model may pad its vocabulary up)."""
    if tok.n_vocab > vocab_size:
        raise TokenizerError(
            f"{where}: the tokenizer {tok.name} has {tok.n_vocab} tokens but the model's vocabulary is {vocab_size}; "
            f"they do not belong together"
        )


def configured_ranks_file(ranks_file: str | None, root: str | Path) -> str | None:
    """The local ranks file a run uses: `tokenize.ranks_file` (relative to the project root), else
    $LMCORE_TIKTOKEN_FILE, else None (tiktoken's own loader)."""
    if ranks_file:
        path = Path(ranks_file)
        return str(path if path.is_absolute() else Path(root) / path)
    return os.environ.get(RANKS_ENV) or None


def resolve_tokenizer(spec: str, *, root: str | Path, ranks_file: str | None, base_dir: Path | None,
                      trained_dir: Path | None = None) -> Tokenizer:
    """The tokenizer `tokenize.tokenizer` names.

    Args:
        spec: auto (the base model's when there is one, else gpt2) | gpt2 | trained | base | a path, relative to
            `root`, to a folder carrying a tokenizer or to a Hugging Face tokenizer.json.
        ranks_file: GPT-2's local ranks file (configured_ranks_file), or None for tiktoken's own loader.
        base_dir: the base model folder, or None when the run starts from scratch.
        trained_dir: the train_tokenizer stage's folder (models/tokenizer).
    """
    if spec == "auto":
        spec = "base" if base_dir is not None else "gpt2"
    if spec == "gpt2":
        return get_tokenizer("gpt2", ranks_file)
    if spec == "trained":
        if trained_dir is None or not has_tokenizer(trained_dir):
            raise MissingInputError(f"tokenize.tokenizer: 'trained', but {trained_dir} holds no tokenizer: run train_tokenizer first")
        return load_tokenizer(trained_dir)
    if spec == "base":
        if base_dir is None:
            raise TokenizerError("tokenize.tokenizer: 'base', but base_model.source is scratch: there is no base tokenizer")
        return load_tokenizer(base_dir)
    path = Path(spec) if Path(spec).is_absolute() else Path(root) / spec
    if path.is_file():
        return HFTokenizer(path, name=path.parent.name)
    if path.is_dir():
        return load_tokenizer(path)
    raise MissingInputError(f"tokenize.tokenizer: {spec!r} is not auto, gpt2, trained, base, a folder or a tokenizer.json ({path} does not exist)")


def eot_token(enc: tiktoken.Encoding | Tokenizer) -> int:
    """The id of the document separator appended after every document (`<|endoftext|>` for GPT-2)."""
    return enc.eot_token
