"""Typed parameters for every stage, read from params.yaml.

params.yaml is the one source of parameters for DVC, Prefect and the CLI. It is validated here:
an unknown key or a value of the wrong type is a `ParamsError` that names the dotted key.

    params = load_params("params.yaml", overrides=["pretrain.lr=3e-4"])
    params.pretrain.lr  # 0.0003
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmcore.errors import InputError, one_line


class ParamsError(InputError):
    """A params file or override that does not validate; the message names the file and key."""


class _Section(BaseModel):
    # extra="forbid": a mistyped key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


TEXT_FORMATS = ("txt", "md", "jsonl", "json", "csv", "parquet")


class Source(_Section):
    """One raw source: a URL pinned by sha256, a local path (file, folder or glob), or a sha256 alone.

    A source with only a sha256 has no public URL (e.g. a file repacked for the offline mirror): it is
    found in the mirror by checksum or not at all. A folder is taken recursively and a glob (`*`, `?`,
    `[..]`, `**`) as matched; either keeps the files whose format is known (see `lmcore.data.formats`).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    url: str | None = None
    path: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    license: str = "unknown"
    # How preprocessing reads the files: null infers it from each file's suffix (`.jsonl.zst`, `.csv.gz`, ...).
    format: Literal["txt", "md", "jsonl", "json", "csv", "parquet"] | None = None
    text_field: str = Field(default="text", min_length=1)  # the text column/key of jsonl, json, csv and parquet
    # A zip or tar archive (.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .tar.zst) extracted into raw/<name>/.
    # Absolute paths, `..` and links pointing outside are refused.
    extract: bool = False

    @model_validator(mode="after")
    def _one_location(self) -> Source:
        if self.url is not None and self.path is not None:
            raise ValueError(f"source {self.name!r} needs at most one of 'url' or 'path'")
        if self.path is None and self.sha256 is None:
            what = "is a URL and" if self.url is not None else "has no 'url' or 'path', so it"
            raise ValueError(f"source {self.name!r} {what} needs its 'sha256'")
        return self


class CollectConfig(_Section):
    sources: list[Source] = Field(min_length=1)
    retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> CollectConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate source names: {dupes}")
        return self


class GopherQualityConfig(_Section):
    """Gopher's quality rules (Rae et al. 2021, appendix A): a document failing any one is dropped.

    Each threshold can be null to switch that rule off. The defaults are the paper's, made for web pages;
    profiles of short documents (paragraphs of a play) lower `min_words`.
    """

    enabled: bool = True
    min_words: int | None = Field(default=50, ge=0)
    max_words: int | None = Field(default=100_000, ge=1)
    min_mean_word_length: float | None = Field(default=3.0, ge=0)
    max_mean_word_length: float | None = Field(default=10.0, gt=0)
    max_symbol_word_ratio: float | None = Field(default=0.1, ge=0)  # "#" and "..." per word
    max_bullet_lines_ratio: float | None = Field(default=0.9, ge=0, le=1)  # lines starting with a bullet
    max_ellipsis_lines_ratio: float | None = Field(default=0.3, ge=0, le=1)  # lines ending with "..." or "…"
    min_alpha_words_ratio: float | None = Field(default=0.8, ge=0, le=1)  # words with an alphabetic character
    min_stop_words: int | None = Field(default=2, ge=0)  # of: the, be, to, of, and, that, have, with


class RepetitionConfig(_Section):
    """Gopher's repetition rules (Rae et al. 2021, table A1): duplicated lines, paragraphs and n-grams."""

    enabled: bool = True
    max_duplicate_line_fraction: float | None = Field(default=0.3, ge=0, le=1)
    max_duplicate_paragraph_fraction: float | None = Field(default=0.3, ge=0, le=1)
    max_duplicate_line_char_fraction: float | None = Field(default=0.2, ge=0, le=1)
    max_duplicate_paragraph_char_fraction: float | None = Field(default=0.2, ge=0, le=1)
    # Characters in the most frequent n-gram (when it occurs more than once), as a fraction of all
    # characters, for n = 2, 3, 4. Leave an n out to switch its rule off; {} switches all off.
    max_top_ngram_char_fraction: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    # Characters of the words covered by n-grams that occur more than once, for n = 5..10.
    max_duplicate_ngram_char_fraction: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

    @model_validator(mode="after")
    def _ngram_limits(self) -> RepetitionConfig:
        for key in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            for n, limit in getattr(self, key).items():
                if not 1 <= n <= 64:
                    raise ValueError(f"{key}: n-gram size {n} is not in 1..64")
                if not 0 <= limit <= 1:
                    raise ValueError(f"{key}: the limit for n={n} ({limit}) is not a fraction in [0, 1]")
        return self


class PiiConfig(_Section):
    """PII scrubbing: matches are replaced by a placeholder and counted."""

    emails: bool = True
    phones: bool = True
    ips: bool = True
    email_replacement: str = "<EMAIL>"
    phone_replacement: str = "<PHONE>"
    ip_replacement: str = "<IP>"


class NearDedupConfig(_Section):
    """Near-duplicate removal with MinHash LSH (datasketch): the first of a near-duplicate group is kept."""

    enabled: bool = True
    threshold: float = Field(default=0.8, gt=0, le=1)  # estimated Jaccard similarity of word shingles
    num_perm: int = Field(default=128, ge=16)
    shingle_words: int = Field(default=5, ge=1)
    seed: int = 1


class PreprocessConfig(_Section):
    """The cleaning chain, in order: decode, normalise, whitespace, lowercase, Gutenberg boilerplate, split,
    PII scrubbing, length and Gopher filters, exact dedup, near dedup."""

    # Non-UTF-8 bytes: "error" stops naming the file, byte offset and line; "replace" substitutes U+FFFD and
    # counts; "skip" drops the document (or record) holding them and counts it.
    decode_errors: Literal["error", "replace", "skip"] = "error"
    # Malformed records (bad JSON, a missing or non-string text field): "error" stops naming the file and line;
    # "skip" drops and counts them, and fails when more than max_bad_fraction of a file's records are bad.
    on_bad: Literal["error", "skip"] = "error"
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    whitespace: bool = True  # strip trailing spaces, unify line endings, collapse runs of blank lines
    lowercase: bool = False
    strip_gutenberg: bool = True  # Project Gutenberg's "*** START OF ..." header and "*** END OF ..." footer
    # How a text file is cut into documents: whole files, or blank-line separated paragraphs.
    # jsonl/json/csv/parquet records are one document each.
    split: Literal["file", "paragraph"] = "paragraph"
    min_chars: int = Field(default=32, ge=0)  # empty documents are always dropped
    max_chars: int | None = Field(default=None, ge=1)
    # A document with a line longer than this (minified code, a table dumped on one line) is dropped.
    max_line_chars: int | None = Field(default=100_000, ge=1)
    pii: PiiConfig = PiiConfig()
    gopher: GopherQualityConfig = GopherQualityConfig()
    repetition: RepetitionConfig = RepetitionConfig()
    dedup: bool = True  # exact duplicates by sha256 of the cleaned text (after PII scrubbing)
    near_dedup: NearDedupConfig = NearDedupConfig()


FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
# base_model.source -> the location keys it reads (name and license are read by every source but scratch).
BASE_SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "scratch": (),
    "huggingface": ("url", "files"),
    "gguf": ("url", "path", "sha256"),
    "folder": ("path",),
    "registry": ("uri",),
}
_REGISTRY_URI = r"^models:/[^/@]+(@[^/@]+|/[0-9]+)$"


class BaseModelConfig(_Section):
    """The model a run starts from (the base_model stage writes it to models/base_model; lmcore.base_model).

    scratch: random weights (pretrain.model); nothing is fetched. huggingface: the files of a Hugging Face repo,
    each pinned by sha256, from `url` (its resolve URL prefix) or the offline mirror. gguf: one GGUF file, from
    `url` pinned by `sha256`, or a local `path`. folder: a local Hugging Face folder (safetensors) or lmcore model
    folder. registry: a registered model, `models:/name@alias` or `models:/name/version`.
    """

    source: Literal["scratch", "huggingface", "gguf", "folder", "registry"] = "scratch"
    name: str | None = Field(default=None, min_length=1)  # what to call it; null: from the source
    url: str | None = None
    files: dict[str, str] = {}
    sha256: str | None = Field(default=None, pattern=_SHA256_PATTERN)
    path: str | None = None
    uri: str | None = None
    license: str = "unknown"

    @model_validator(mode="after")
    def _source_keys(self) -> BaseModelConfig:
        src = self.source
        reads = BASE_SOURCE_KEYS[src]
        stray = [k for k in ("url", "files", "sha256", "path", "uri") if getattr(self, k) and k not in reads]
        if stray:
            what = f"reads {', '.join(f'base_model.{k}' for k in reads)}" if reads else "fetches nothing"
            raise ValueError(f"base_model.{stray[0]} is set, but source {src!r} does not read it (it {what})")
        if src == "huggingface":
            if not self.url:
                raise ValueError("base_model.source 'huggingface' needs base_model.url: the repo's resolve URL prefix, "
                                 "e.g. https://huggingface.co/<org>/<repo>/resolve/<revision>")
            if not self.files:
                raise ValueError("base_model.source 'huggingface' needs base_model.files: file name -> sha256 of "
                                 "config.json, model.safetensors (or model.safetensors.index.json and its shards), tokenizer.json")
            for name, digest in self.files.items():
                if not re.fullmatch(FILE_NAME_PATTERN, name):
                    raise ValueError(f"base_model.files: {name!r} is not a plain file name (letters, digits, '.', '_', '-')")
                if not isinstance(digest, str) or not re.fullmatch(_SHA256_PATTERN, digest):
                    raise ValueError(f"base_model.files[{name!r}]: {digest!r} is not a sha256 (64 lowercase hex digits)")
            if "config.json" not in self.files:
                raise ValueError("base_model.files has no 'config.json' (the model's architecture)")
            if not {"model.safetensors", "model.safetensors.index.json"} & self.files.keys():
                raise ValueError("base_model.files names no weights: add model.safetensors, or "
                                 "model.safetensors.index.json and its shards (pickled .bin weights are refused)")
        elif src == "gguf":
            if self.url and self.path:
                raise ValueError("base_model.source 'gguf' needs one of base_model.url or base_model.path, not both")
            if not self.url and not self.path:
                raise ValueError("base_model.source 'gguf' needs base_model.url (with base_model.sha256) or a local base_model.path")
            if self.url and not self.sha256:
                raise ValueError("base_model.url of a gguf source needs base_model.sha256 (the file's pinned checksum)")
        elif src == "folder" and not self.path:
            raise ValueError("base_model.source 'folder' needs base_model.path: a Hugging Face folder or an lmcore model folder")
        elif src == "registry":
            if not self.uri:
                raise ValueError("base_model.source 'registry' needs base_model.uri: models:/<name>@<alias> or models:/<name>/<version>")
            if not re.fullmatch(_REGISTRY_URI, self.uri):
                raise ValueError(f"base_model.uri {self.uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
        return self


class TrainTokenizerConfig(_Section):
    """A byte-level BPE trained on the train split of the cleaned corpus (lmcore.bpe), into models/tokenizer."""

    # Tokens in all: the 256 bytes, the merges and the special tokens (fewer when the corpus runs out of pairs).
    vocab_size: int = Field(default=8192, ge=1)
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>"])  # the first ends every document
    pattern: Literal["gpt2", "gpt4"] = "gpt2"  # tiktoken's split regex: GPT-2's, or GPT-4's cl100k (digits by 3)
    min_frequency: int = Field(default=2, ge=1)  # a pair seen fewer times is never merged
    max_chars: int | None = Field(default=None, ge=1)  # train on the first N characters of the train split; null: all
    # Texts the tokenizer report measures bytes per token on, besides the corpus: benchmark items (contexts and
    # choices) of these tasks (files from benchmark.sources), `eval_benchmarks_limit` each, drawn with
    # benchmark.sample_seed. []: none (params.yaml names hellaswag and arc_easy).
    eval_benchmarks: list[str] = Field(default_factory=list)
    eval_benchmarks_limit: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> TrainTokenizerConfig:
        smallest = 256 + len(self.special_tokens)  # the byte alphabet and the special tokens: lmcore.bpe.min_vocab_size
        if not self.special_tokens or any(not t for t in self.special_tokens):
            raise ValueError("train_tokenizer.special_tokens: needs the end-of-text token first (e.g. <|endoftext|>), no empty names")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"train_tokenizer.special_tokens: {self.special_tokens} names a token twice")
        if self.vocab_size < smallest:
            raise ValueError(
                f"train_tokenizer.vocab_size {self.vocab_size} is smaller than the byte alphabet plus the special tokens "
                f"(256 + {len(self.special_tokens)} = {smallest})"
            )
        return self


class TokenizeConfig(_Section):
    # auto: the base model's tokenizer when `base_model.source` is not scratch, else gpt2. gpt2: GPT-2's BPE
    # (tiktoken). trained: the train_tokenizer stage's (models/tokenizer). base: the base model's. A path
    # (relative to the project root): a folder carrying a tokenizer (tokenizer_config.json + its file, e.g. a
    # model folder) or a Hugging Face tokenizer.json.
    tokenizer: str = Field(default="auto", min_length=1)
    # A local tiktoken ranks file for gpt2; when null, LMCORE_TIKTOKEN_FILE, else tiktoken's own (online) loader.
    ranks_file: str | None = None
    # Each document goes to val when a seeded hash of its text falls below this fraction.
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    # Input text (bytes of documents.jsonl) per shard: shard k holds the train and val documents of the
    # k-th slice, so shards depend on the input alone, never on the worker count. GPT-2 averages about
    # 4 bytes of English per token: 256 MiB of text is about 60M tokens.
    shard_bytes: int = Field(default=64 * 2**20, ge=4096)
    workers: int = Field(default=0, ge=0)  # encoding processes; 0: one per core
    # "local": a process pool inside the stage. "dask": one Prefect task per shard on prefect-dask's
    # DaskTaskRunner, at `dask_address` or, when null, on a local cluster of `workers` processes.
    runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None


# Named architectures: `pretrain.model.preset: gpt2-124m`, any field set beside it overrides the preset's.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 (Radford et al. 2019): LayerNorm, GELU, learned positions, biases, tied head.
    "gpt2-124m": dict(vocab_size=50257, context_length=1024, n_embd=768, n_layer=12, n_head=12),
    "gpt2-355m": dict(vocab_size=50257, context_length=1024, n_embd=1024, n_layer=24, n_head=16),
    "gpt2-774m": dict(vocab_size=50257, context_length=1024, n_embd=1280, n_layer=36, n_head=20),
    "gpt2-1558m": dict(vocab_size=50257, context_length=1024, n_embd=1600, n_layer=48, n_head=25),
    # CPU profiles of the GPT-2 shape (params.yaml and profiles/micro.yaml).
    "gpt2-tiny": dict(vocab_size=50257, context_length=128, n_embd=128, n_layer=4, n_head=4),
    "gpt2-micro": dict(vocab_size=50257, context_length=32, n_embd=32, n_layer=2, n_head=2),
}
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_weights=False, norm_eps=1e-5)
MODEL_PRESETS.update({
    # Llama-style (Touvron et al. 2023): RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied head.
    "llama-micro": dict(_LLAMA, vocab_size=50257, context_length=32, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96),
    "llama-tiny": dict(_LLAMA, vocab_size=50257, context_length=256, n_embd=256, n_layer=4, n_head=8, n_kv_head=2, intermediate_size=688),
    "llama-125m": dict(_LLAMA, vocab_size=50257, context_length=1024, n_embd=768, n_layer=12, n_head=12, n_kv_head=4, intermediate_size=2048),
    "llama-350m": dict(_LLAMA, vocab_size=50257, context_length=2048, n_embd=1024, n_layer=24, n_head=16, n_kv_head=8, intermediate_size=2816),
})


# Plausible bounds of a model's shape, checked before anything is allocated (a config.json or GGUF header is
# untrusted input): far above any released decoder (vocabularies up to 262k, contexts up to 1M, widths up to 25k,
# MLPs up to 74k, 126 layers), far below what would exhaust memory by itself. MAX_MODEL_BYTES caps the float32
# parameters and buffers GPT(config) allocates (ModelConfig.alloc_bytes): 16B parameters.
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 20
MAX_WIDTH = 1 << 16
MAX_MLP = 1 << 18
MAX_LAYERS = 1 << 10
MAX_MODEL_BYTES = 64 << 30


class ModelConfig(_Section):
    """The decoder's shape and its architecture options (GPT-2 by default; see MODEL_PRESETS for Llama-style)."""

    preset: str | None = None  # a MODEL_PRESETS name; fields given beside it override the preset's
    vocab_size: int = Field(default=50257, ge=1, le=MAX_VOCAB)
    context_length: int = Field(default=128, ge=1, le=MAX_CONTEXT)
    n_embd: int = Field(default=128, ge=1, le=MAX_WIDTH)
    n_layer: int = Field(default=2, ge=1, le=MAX_LAYERS)
    n_head: int = Field(default=4, ge=1)
    n_kv_head: int | None = Field(default=None, ge=1)  # grouped-query attention; null: n_head (multi-head)
    # MLP width; null: 4C (gelu) or 8C/3 rounded up to 64 (swiglu)
    intermediate_size: int | None = Field(default=None, ge=1, le=MAX_MLP)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(default=1e-5, gt=0, allow_inf_nan=False)
    mlp: Literal["gelu", "swiglu"] = "gelu"
    positions: Literal["learned", "rope"] = "learned"
    rope_base: float = Field(default=10000.0, gt=0, allow_inf_nan=False)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    bias: bool = True
    tie_weights: bool = True

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in MODEL_PRESETS:
                hint = difflib.get_close_matches(str(name), list(MODEL_PRESETS), n=1)
                raise ValueError(
                    f"unknown preset {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; presets: {sorted(MODEL_PRESETS)}"
                )
            return {**MODEL_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.positions == "rope" and self.head_size % 2:
            raise ValueError(f"RoPE needs an even head size, got n_embd / n_head = {self.head_size}")
        return self

    @model_validator(mode="after")
    def _fits_in_memory(self) -> ModelConfig:
        need = self.alloc_bytes()
        if need > MAX_MODEL_BYTES:
            raise ValueError(
                f"vocab_size {self.vocab_size}, context_length {self.context_length}, n_embd {self.n_embd}, "
                f"n_layer {self.n_layer}, intermediate_size {self.mlp_size} make {self.param_count():,} parameters: "
                f"{need / 2**30:.1f} GiB in float32, over the {MAX_MODEL_BYTES / 2**30:.0f} GiB lmcore builds"
            )
        return self

    def tensor_shapes(self, n_out: int | None = None) -> dict[str, tuple[int, ...]]:
        """Every tensor GPT(self) saves, by name, with its shape (a tied head once, as wte.weight), computed from
        the config alone; with `n_out`, those of the model with an n_out-way classifier head (GPT.replace_head).
        Checked against GPT itself in tests/test_hostile_files.py."""
        C, V, M, b = self.n_embd, self.vocab_size, self.mlp_size, self.bias
        qkv = (self.n_head + 2 * self.kv_heads) * self.head_size

        def linear(name: str, n_in: int, n_out_: int, bias: bool = b) -> dict[str, tuple[int, ...]]:
            return {f"{name}.weight": (n_out_, n_in), **({f"{name}.bias": (n_out_,)} if bias else {})}

        def norm(name: str) -> dict[str, tuple[int, ...]]:
            return {f"{name}.weight": (C,), **({f"{name}.bias": (C,)} if self.norm == "layernorm" and b else {})}

        shapes = {"wte.weight": (V, C), **({"wpe.weight": (self.context_length, C)} if self.positions == "learned" else {})}
        for i in range(self.n_layer):
            block = f"blocks.{i}."
            shapes |= norm(f"{block}norm_1") | linear(f"{block}attn.qkv", C, qkv) | linear(f"{block}attn.proj", C, C)
            shapes |= norm(f"{block}norm_2")
            if self.mlp == "swiglu":
                shapes |= linear(f"{block}mlp.fc_1", C, M) | linear(f"{block}mlp.fc_2", C, M)
            else:
                shapes |= linear(f"{block}mlp.fc", C, M)
            shapes |= linear(f"{block}mlp.proj", M, C)
        shapes |= norm("norm_f")
        if n_out:
            shapes |= linear("lm_head", C, n_out, bias=True)
        elif not self.tie_weights:
            shapes |= linear("lm_head", C, V, bias=False)
        return shapes

    def param_count(self, n_out: int | None = None) -> int:
        """The parameters GPT(self) has, each shared tensor once (with `n_out`: see tensor_shapes)."""
        return sum(math.prod(shape) for shape in self.tensor_shapes(n_out).values())

    def alloc_bytes(self) -> int:
        """What GPT(self) allocates at most, in bytes: its float32 parameters, and with RoPE the (context_length,
        head_size) cos and sin tables with the two temporaries they are made from."""
        rope = 4 * self.context_length * self.head_size if self.positions == "rope" else 0
        return 4 * (self.param_count() + rope)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return -(-8 * self.n_embd // 3 // 64) * 64


def _known_probe_tasks(tasks: list[str]) -> list[str]:
    """eval_benchmarks: task or group names lmcore.harness.benchmarks knows (ValueError with a hint otherwise)."""
    from lmcore.harness.benchmarks import expand

    expand(tasks)
    return tasks


class ContinuedConfig(_Section):
    """The schedule of a run that continues the champion (`pretrain.init: champion`); null keeps the pretrain value.

    A continued run starts a fresh AdamW (the registry keeps weights, not optimizer state), warms up again to a
    peak usually below the first run's and decays to min_lr over its own max_steps: re-warming and re-decaying, as
    continual pretraining does (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs").
    Its steps are numbered on from the champion's, so its metrics continue the champion's curve.
    """

    max_steps: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)
    min_lr: float | None = Field(default=None, ge=0)
    warmup_steps: int | None = Field(default=None, ge=0)


class PretrainConfig(_Section):
    """Pretraining (lmcore.pretrain.pretrain); docs/models.md "## Training" explains each option.

    One optimizer step consumes batch_size x grad_accum_steps windows per process, and world_size times
    that under torchrun: the global batch.
    """

    # scratch: `model` from random weights. base: continue pretraining the base model (`base_model`), whose
    # architecture and tokenizer it keeps (`model` is then not used); with max_steps 0 the base is taken as it is,
    # so the fine-tuning stages start from it directly. champion: continue the registered champion
    # (models:/<tracking.registered_model>@champion) on the new shards with the `continued` schedule, when there
    # is one with the shards' tokenizer and the architecture this run would otherwise train; else as base when
    # base_model names one, else as scratch (the run says which, and why).
    init: Literal["scratch", "base", "champion"] = "scratch"
    continued: ContinuedConfig = ContinuedConfig()
    model: ModelConfig = ModelConfig()
    # Training window in tokens; null: the model's context_length (a base's may be 8k: far beyond a CPU's budget).
    seq_len: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=16, ge=1)  # windows per forward pass (micro-batch), per process
    grad_accum_steps: int = Field(default=1, ge=1)  # micro-batches per optimizer step
    max_steps: int = Field(default=300, ge=0)  # 0: no update (with init base: the base as it is)
    lr: float = Field(default=1e-3, gt=0)
    min_lr: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)  # matmul weights only: never norms, biases, embeddings
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    eval_interval: int = Field(default=25, ge=1)
    eval_batches: int = Field(default=8, ge=1)
    # The in-training benchmark probe (lmcore.harness.probe): at step 0, every N steps and at the last step, score a
    # fixed sample of `eval_benchmarks_limit` items per task (drawn with benchmark.sample_seed, zero-shot) and log
    # train_bench.<task>.<metric>; null: off. It changes no weight, so a run may resume with other settings.
    eval_benchmarks_every: int | None = Field(default=None, ge=1)
    eval_benchmarks: list[str] = Field(default=["hellaswag"], min_length=1)  # benchmark task names (benchmark.tasks)
    eval_benchmarks_limit: int = Field(default=50, ge=1)
    # Stop when val_loss has not improved on its best by more than min_delta for `patience` evaluations
    # in a row; null trains to max_steps.
    early_stopping_patience: int | None = Field(default=None, ge=1)
    early_stopping_min_delta: float = Field(default=0.0, ge=0)
    # fp32; bf16 autocast; fp16 autocast with a gradient scaler; auto: bf16 where the device computes it
    # natively (a GPU with bf16, a CPU with avx512_bf16 or AMX), else fp16 on a GPU and fp32 on a CPU.
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    compile: bool = False  # torch.compile the training forward and backward (needs a C++ compiler on CPU)
    # AdamW implementation: auto is fused on CPU and CUDA (one kernel over all tensors), foreach elsewhere.
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    # Device peak FLOP/s for MFU in the precision used; null measures it once with a short matmul benchmark.
    peak_flops: float | None = Field(default=None, gt=0)
    # Training checkpoints every N optimizer steps (in the checkpoint folder the caller names; the pipeline's
    # is models/checkpoints/pretrain); null writes none. The last `keep_checkpoints` are kept.
    checkpoint_interval: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    # Continue from the latest complete checkpoint (refused when it was written under other settings);
    # false starts afresh and removes the folder's old checkpoints.
    resume: bool = False
    # Under torchrun (world size > 1): ddp replicates the model; fsdp shards parameters, gradients and
    # optimizer state (FSDP2 fully_shard, one group per block).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(default=0, ge=0)  # torch intra-op threads; 0 keeps torch's default

    _probe_tasks = field_validator("eval_benchmarks")(_known_probe_tasks)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        self.continuation()  # the continued schedule's min_lr must not exceed its lr either
        return self

    def continuation(self) -> PretrainConfig:
        """These settings with the `continued` schedule in place of the first run's."""
        update = {k: v for k, v in self.continued.model_dump().items() if v is not None}
        merged = self.model_copy(update=update)
        if merged.min_lr > merged.lr:
            raise ValueError(f"pretrain.continued: min_lr ({merged.min_lr}) must not exceed lr ({merged.lr})")
        return merged

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run resuming it: all but how it runs and saves."""
        return self.model_dump(mode="json", exclude=set(RESUME_FREE_KEYS))


# PretrainConfig keys a run may change when it resumes: they change how fast it runs or what it saves,
# not which numbers it computes.
RESUME_FREE_KEYS = ("threads", "checkpoint_interval", "keep_checkpoints", "resume", "peak_flops",
                    "eval_benchmarks_every", "eval_benchmarks", "eval_benchmarks_limit")


class EvaluateConfig(_Section):
    batch_size: int = Field(default=16, ge=1)
    max_batches: int | None = Field(default=None, ge=1)  # None: the whole validation split
    seq_len: int | None = Field(default=None, ge=1)  # tokens per scored window; null: the model's context length
    prompts: list[str] = ["Every effort moves you", "ROMEO:"]
    max_new_tokens: int = Field(default=40, ge=1)
    temperature: float = Field(default=0.8, ge=0)  # 0 is greedy
    top_k: int | None = Field(default=40, ge=1)


# Fine-tuning data: public files pinned by sha256 (found in LMCORE_MIRROR by checksum before any download).
_RAW = "https://raw.githubusercontent.com"
SMS_SPAM = Source(
    name="sms-spam",
    url=f"{_RAW}/PARKER-X/SpamClassifier/5fa41eaf3ec0d21d3ffced673800d25b6b8ffc20/smsspamcollection/SMSSpamCollection",
    sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
    license="UCI SMS Spam Collection v.1 (Almeida & Gomez Hidalgo 2011), CC BY 4.0",
)
_CH07 = f"{_RAW}/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57/ch07"
INSTRUCTION_DATA = Source(
    name="instruction-data",
    url=f"{_CH07}/01_main-chapter-code/instruction-data.json",
    sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    license="Apache-2.0 (rasbt/LLMs-from-scratch)",
)
PREFERENCE_DATA = Source(
    name="instruction-data-with-preference",
    url=f"{_CH07}/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
    sha256="305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
    license="Apache-2.0 (rasbt/LLMs-from-scratch)",
)


class LoraConfig(_Section):
    """Low-rank adapters on the named Linear layers; the base weights stay frozen."""

    enabled: bool = False
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Suffixes of module names: "attn.qkv" matches blocks.{i}.attn.qkv.
    target_modules: list[str] = Field(default=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], min_length=1)


class FinetuneConfig(_Section):
    """What every fine-tuning stage shares: data policy, split, optimisation, LoRA."""

    # Bad records (malformed, missing fields, unknown labels): "error" stops at the first, naming file and
    # record; "skip" drops and counts them, and fails when more than max_bad_fraction of the records are bad.
    on_bad: Literal["error", "skip"] = "error"
    max_bad_fraction: float = Field(default=0.0, ge=0, le=1)
    train_fraction: float = Field(default=0.85, gt=0, lt=1)
    val_fraction: float = Field(default=0.05, gt=0, lt=1)  # test gets the rest
    max_length: int | None = Field(default=None, ge=2)  # tokens per example; null: the model's context length
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # stop early after this many updates; null: run all epochs
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=5e-5, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.999, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    eval_interval: int = Field(default=50, ge=1)
    eval_batches: int | None = Field(default=4, ge=1)  # val batches per periodic eval; null: the whole split
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(default=0, ge=0)
    # fp32; bf16 autocast; fp16 autocast with a gradient scaler; auto as pretrain.precision.
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    grad_accum_steps: int = Field(default=1, ge=1)  # batches per optimizer step, from one stream over the epochs
    # Training checkpoints every N optimizer steps (in the checkpoint folder the caller names); null writes none.
    checkpoint_interval: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    # Continue from the latest complete checkpoint (refused when it was written under other settings);
    # false starts afresh and removes the folder's old checkpoints.
    resume: bool = False
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _test_split_left(self) -> FinetuneConfig:
        if self.train_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"train_fraction + val_fraction ({self.train_fraction} + {self.val_fraction}) must be < 1: the rest is the test split"
            )
        return self


class ClassifierConfig(FinetuneConfig):
    """Classification fine-tuning (book ch. 6): an n-class head read from the last real token."""

    sources: list[Source] = Field(default=[SMS_SPAM], min_length=1)
    # Two columns per line, no header: the label (one of `labels`) and the text.
    labels: list[str] = Field(default=["ham", "spam"], min_length=2)
    label_column: Literal[0, -1] = 0  # 0: label<TAB>text; -1: text<TAB>label
    delimiter: str = Field(default="\t", min_length=1)
    balance: bool = True  # undersample every class to the smallest
    stratify: bool = True  # every split keeps the class ratio
    train_fraction: float = Field(default=0.7, gt=0, lt=1)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    # Train the last N transformer blocks, the final norm and the head; null trains everything.
    # With LoRA enabled the adapters and the head train instead.
    trainable_blocks: int | None = Field(default=1, ge=0)
    # With the first blocks frozen (trainable_blocks, no LoRA, no dropout), their output for each example is
    # computed once and every epoch and evaluation pass runs only the blocks that train. false: the whole model
    # at every step (the same results within float rounding).
    cache_frozen: bool = True

    @model_validator(mode="after")
    def _unique_labels(self) -> ClassifierConfig:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}")
        return self


class _Responses(FinetuneConfig):
    # Test-split responses, generated after training (greedy by default) and saved as JSONL.
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_k: int | None = Field(default=None, ge=1)
    max_test_generations: int | None = Field(default=None, ge=0)  # null: the whole test split
    # The in-training benchmark probe, as pretrain.eval_benchmarks_every / eval_benchmarks / eval_benchmarks_limit.
    eval_benchmarks_every: int | None = Field(default=None, ge=1)
    eval_benchmarks: list[str] = Field(default=["hellaswag"], min_length=1)
    eval_benchmarks_limit: int = Field(default=50, ge=1)

    _probe_tasks = field_validator("eval_benchmarks")(_known_probe_tasks)


class InstructConfig(_Responses):
    """Instruction fine-tuning (book ch. 7): prompt template, shifted targets, padding masked."""

    source: Source = INSTRUCTION_DATA
    # auto: the start model's own chat template when its tokenizer has one (chat), else alpaca.
    template: Literal["auto", "chat", "alpaca", "phi3"] = "auto"
    mask_prompt: bool = False  # also leave the prompt tokens out of the loss


class DpoConfig(_Responses):
    """Direct preference optimisation (Rafailov et al. 2023) of the instruction model, against a frozen copy.

    The prompt template is the instruction model's (read from its config.json).
    """

    source: Source = PREFERENCE_DATA
    beta: float = Field(default=0.1, gt=0)
    lr: float = Field(default=5e-6, gt=0)


# Benchmark data (MANIFEST of ../shared/data gives each file's provenance). Found in LMCORE_MIRROR by checksum first.
BENCHMARK_SOURCES = [
    Source(
        name="hellaswag",
        url=f"{_RAW}/klosax/hellaswag_text_data/1105d370f8340eac3c63a91fd1fa58e8999f9505/hellaswag_val_full.txt.bz2",
        sha256="50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
        license="MIT (HellaSwag, Zellers et al. 2019); validation split, six-line text form",
    ),
    Source(
        name="arc-easy",
        url=f"{_RAW}/RazvanDu/TemporalRNNs/93811e3f9f8c5c1f63650153541cd6c626dafcc0/ARC-Easy/ARC-Easy-Test.jsonl",
        sha256="ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
        license="CC BY-SA 4.0 (AI2 Reasoning Challenge)",
    ),
    Source(
        name="arc-challenge",
        url=f"{_RAW}/RazvanDu/TemporalRNNs/93811e3f9f8c5c1f63650153541cd6c626dafcc0/ARC-Challenge/ARC-Challenge-Test.jsonl",
        sha256="9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
        license="CC BY-SA 4.0 (AI2 Reasoning Challenge)",
    ),
    Source(
        name="truthfulqa-mc",
        url=f"{_RAW}/newBlanco/Modified_truthX/39e91d49c5b26bdef976da70be6c12829739e83e/TruthfulQA/data/mc_task.json",
        sha256="b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a",
        license="Apache-2.0 (TruthfulQA, Lin et al. 2021)",
    ),
    # The 57-subject CSVs of the MMLU release, repacked as a tarball for the mirror: it has no public URL.
    # Online, use url: https://people.eecs.berkeley.edu/~hendrycks/data.tar with that file's sha256 instead
    # (the reader takes either archive: both hold data/{dev,test}/<subject>_{dev,test}.csv).
    Source(
        name="mmlu",
        sha256="1367baf725bff533e504686a5d59611eae5db7aaa2fc04e106614dbf739a3c19",
        license="MIT (MMLU, Hendrycks et al. 2021)",
    ),
]


class BenchmarkConfig(_Section):
    """Multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores them."""

    sources: list[Source] = Field(default=BENCHMARK_SOURCES, min_length=1)
    # hellaswag, mmlu (all 57 subjects) or mmlu_<subject>, truthfulqa_mc1, truthfulqa_mc2, arc_easy, arc_challenge.
    tasks: list[str] = Field(
        default=["hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "arc_easy", "arc_challenge"], min_length=1
    )
    # Items per task (per subject for MMLU), drawn with sample_seed; null scores every item.
    limit: int | None = Field(default=None, ge=1)
    # Items per MMLU subject (57 of them); null: `limit`. A small model's whole sample stays affordable with 1-2.
    mmlu_limit: int | None = Field(default=None, ge=1)
    # Fixed apart from the top-level seed: a model is compared with the champion on the same items.
    sample_seed: int = 1234
    num_fewshot: int = Field(default=0, ge=0)  # MMLU only, from its dev split (first k, as lm-eval)
    batch_size: int = Field(default=16, ge=1)  # packed rows (one item each) per forward pass
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(default=0, ge=0)
    # Eval-gated promotion: `champion` moves to a new version only when it beats the current champion on
    # this metric by more than the combined standard error; otherwise the version becomes `challenger`.
    # null: the first task's headline metric (acc_norm for hellaswag and arc, else acc).
    primary_metric: str | None = "hellaswag.acc_norm"
    # A task with more than this share of its sampled items cut to fit the model's context (or left out) is n/a:
    # reported, logged and promoted on as no score (lmcore.harness.run.MAX_CUT_FRACTION). 1: every task is scored.
    max_cut_fraction: float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _known_tasks(self) -> BenchmarkConfig:
        from lmcore.harness.benchmarks import check_tasks, headline_metric

        metrics = check_tasks(self.tasks, self.num_fewshot, {s.name for s in self.sources})
        if self.primary_metric is None:
            object.__setattr__(self, "primary_metric", headline_metric(self.tasks[0]))
        if self.primary_metric not in metrics:
            hint = difflib.get_close_matches(self.primary_metric, sorted(metrics), n=1)
            shown = sorted(m for m in metrics if not m.startswith("mmlu_")) or sorted(metrics)[:8]
            raise ValueError(
                f"primary_metric {self.primary_metric!r} is not a metric of the configured tasks"
                + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; e.g. {shown}"
            )
        return self


# Generative benchmark data (MANIFEST of ../shared/data), found in LMCORE_MIRROR by checksum first.
GENERATIVE_SOURCES = [
    Source(
        name="ifeval",
        url=f"{_RAW}/google-research/google-research/19638399cc9e03623c5b9087a1d6fa8813974ce9/instruction_following_eval/data/input_data.jsonl",
        sha256="67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
        license="CC BY 4.0 (IFEval, Zhou et al. 2023)",
    ),
    Source(
        name="gsm8k-test",
        url=f"{_RAW}/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/test.jsonl",
        sha256="3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
        license="MIT (GSM8K, Cobbe et al. 2021)",
    ),
    Source(
        name="gsm8k-train",
        url=f"{_RAW}/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/train.jsonl",
        sha256="17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
        license="MIT (GSM8K, Cobbe et al. 2021); its few-shot examples",
    ),
]


# The generative tasks: their metrics (lm-evaluation-harness's names; gsm8k's per answer filter), test items and
# the sources they read. lmcore.harness.generative scores them.
class InstructEvalConfig(_Section):
    """Generative benchmarks of the instruction models, scored as lm-evaluation-harness scores them (IFEval,
    GSM8K), and the gate of tracking.instruct_model's `champion` on `primary_metric`."""

    sources: list[Source] = Field(default=GENERATIVE_SOURCES, min_length=1)
    tasks: list[str] = Field(default=["ifeval", "gsm8k"], min_length=1)
    # Items per task, a fixed sample drawn with sample_seed (every model of the family on the same items); null: all.
    limit: int | None = Field(default=50, ge=1)
    sample_seed: int = 1234
    # Generated tokens per item. lm-eval's are 1280 (ifeval) and 256 (gsm8k); a lower value is recorded with
    # the scores and shown in the card. null: lm-eval's.
    max_gen_toks: int | None = Field(default=256, ge=1)
    chat_template: Literal["auto", "chat", "none"] = "auto"  # auto: the model's own when it has one (--apply_chat_template); chat: required
    batch_size: int = Field(default=16, ge=1)  # sequences decoded together
    models: list[Literal["instruct", "dpo"]] = Field(default=["instruct", "dpo"], min_length=1)
    primary_metric: str = "ifeval.prompt_level_loose_acc"  # `champion` moves only past the combined standard error on it
    decontaminate: bool = True  # check every training text the models saw against the benchmark items (13-grams)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _known_tasks(self) -> InstructEvalConfig:
        from lmcore.harness.gentasks import TASKS

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; generative tasks: {', '.join(TASKS)}")
        metrics = [f"{t}.{m}" for t in self.tasks for m in TASKS[t].metrics]
        if self.primary_metric not in metrics:
            hint = difflib.get_close_matches(self.primary_metric, metrics, n=1)
            raise ValueError(f"primary_metric {self.primary_metric!r} is not a metric of the configured tasks"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; allowed: {', '.join(metrics)}")
        for t in self.tasks:
            size = TASKS[t].size
            if self.limit is not None and self.limit > size:
                raise ValueError(f"limit {self.limit} is larger than {t}'s {size} items; at most {size}, or null for all")
            missing = [n for n in TASKS[t].sources if n not in {s.name for s in self.sources}]
            if missing:
                raise ValueError(f"task {t} needs the source {missing[0]!r} in instruct_eval.sources")
        return self


# judge.api_key_env: names made for an API key (OPENAI_API_KEY, GROQ_API_KEY, LMCORE_JUDGE_API_KEY, SERVICE_API_TOKEN)
# and Hugging Face's HF_TOKEN (its inference endpoints speak the OpenAI API). Deliberately not every *_KEY or *_TOKEN:
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and GITHUB_TOKEN are credentials for other services.
API_KEY_ENV = re.compile(r"[A-Z][A-Z0-9_]*_API_(?:KEY|TOKEN)|HF_TOKEN")


class JudgeConfig(_Section):
    """LLM-as-judge (book ch. 7): an OpenAI-compatible chat endpoint scores responses 0-100.

    With no `url`, the judge stage is skipped with a message; scores are never made up.
    """

    url: str | None = None  # base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1 (Ollama)
    model: str | None = None  # the judge model's name at that endpoint, e.g. llama3
    # Instead of `url`: a model the stage serves itself for the judging, as `lmcore serve` does (127.0.0.1, a
    # free port, for the stage's duration): a registered model (models:/name@alias) or a model folder.
    serve: str | None = None
    # The variable holding the API key, if the endpoint needs one. Its value is sent to `url` as a bearer token, so
    # only a name made for an API key is taken (API_KEY_ENV): a params file cannot send HOME, a database URL or the
    # AWS/GitHub credentials of the shell that runs the stage to a judge endpoint.
    api_key_env: str = "OPENAI_API_KEY"
    responses: list[Literal["instruct", "dpo"]] = Field(default=["instruct", "dpo"], min_length=1)
    max_items: int | None = Field(default=None, ge=1)  # responses judged per model; null: all
    temperature: float = Field(default=0.0, ge=0)
    seed: int | None = 123  # the book's; sent to the endpoint (not every server honours it)
    max_tokens: int = Field(default=16, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    retries: int = Field(default=3, ge=0)
    # Worked examples (a right and a wrong answer with their scores) sent as earlier turns before each request:
    # a small judge (a 135M model) answers the question instead of scoring it without them. 0: the book's prompt alone.
    calibration_examples: int = Field(default=0, ge=0, le=2)
    # Replies without a 0-100 score are counted and left out of the mean; above this share the judge is not
    # following the prompt and the stage fails.
    max_unparsed_fraction: float = Field(default=0.5, ge=0, le=1)

    @field_validator("api_key_env")
    @classmethod
    def _api_key_name(cls, name: str) -> str:
        if not API_KEY_ENV.fullmatch(name):
            raise ValueError("not the name of an API key variable: expected <NAME>_API_KEY or <NAME>_API_TOKEN in "
                             "capitals (OPENAI_API_KEY, LMCORE_JUDGE_API_KEY), or HF_TOKEN")
        return name

    @model_validator(mode="after")
    def _model_with_url(self) -> JudgeConfig:
        if self.url is not None and self.serve is not None:
            raise ValueError("judge.url and judge.serve are both set: judge at an endpoint, or serve a model, not both")
        if self.url is not None and not self.model:
            raise ValueError("judge.url is set but judge.model is not: name the judge model served there")
        return self


class TrackingConfig(_Section):
    experiment: str = "lmcore"
    registered_model: str = "lmcore-base"
    classifier_model: str = "lmcore-classifier"
    instruct_model: str = "lmcore-instruct"  # the DPO model is a later version of it, alias "dpo"


# The sections with the in-training benchmark probe (eval_benchmarks_every, eval_benchmarks, eval_benchmarks_limit).
PROBE_SECTIONS = ("pretrain", "finetune_instruct", "dpo")


class Params(_Section):
    seed: int = 1337
    collect: CollectConfig
    preprocess: PreprocessConfig = PreprocessConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    train_tokenizer: TrainTokenizerConfig = TrainTokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    finetune_classifier: ClassifierConfig = ClassifierConfig()
    finetune_instruct: InstructConfig = InstructConfig()
    dpo: DpoConfig = DpoConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    instruct_eval: InstructEvalConfig = InstructEvalConfig()
    judge: JudgeConfig = JudgeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _trained_vocab_fits(self) -> Params:
        vocab = self.train_tokenizer.vocab_size
        if self.tokenize.tokenizer == "trained" and self.base_model.source == "scratch" and self.pretrain.model.vocab_size < vocab:
            raise ValueError(
                f"pretrain.model.vocab_size {self.pretrain.model.vocab_size} is smaller than train_tokenizer.vocab_size "
                f"{vocab}, the tokenizer tokenize.tokenizer 'trained' uses; make them equal"
            )
        return self

    @model_validator(mode="after")
    def _probe_sources(self) -> Params:
        from lmcore.harness.benchmarks import check_tasks

        for name in PROBE_SECTIONS:
            section = getattr(self, name)
            if section.eval_benchmarks_every is not None:
                try:
                    check_tasks(section.eval_benchmarks, 0, {s.name for s in self.benchmark.sources})
                except ValueError as err:
                    raise ValueError(f"{name}.eval_benchmarks: {err} (in benchmark.sources)") from None
        if self.train_tokenizer.eval_benchmarks:
            try:
                check_tasks(self.train_tokenizer.eval_benchmarks, 0, {s.name for s in self.benchmark.sources})
            except ValueError as err:
                raise ValueError(f"train_tokenizer.eval_benchmarks: {err} (in benchmark.sources)") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the resolved params (canonical JSON); the same params give the same hash."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a section accepts, for did-you-mean hints."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        sub = getattr(ann, "__args__", None)
        cands = [ann] + list(sub or [])
        nxt = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        model = nxt
    return list(model.model_fields)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            known = _known_keys(Params, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown key '{key}'" + (f" (did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?)" if hint else "")
        elif e["type"] == "missing":
            msg = f"missing key '{key}'"
        else:
            got = e.get("input")
            msg = f"key '{key}': {e['msg']} (got {got!r})" if not isinstance(got, dict) else f"key '{key}': {e['msg']}"
        lines.append(msg)
    return one_line(f"{origin}: " + "; ".join(lines))  # one line, every bad key named


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ParamsError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`pretrain.lr=3e-4` -> ("pretrain.lr", 0.0003). Values are YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    # YAML 1.1 reads "3e-4" as a string; pydantic's lax mode turns it into the float a user meant.
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def params_from_dict(data: dict, origin: str = "params", overrides: list[str] | None = None) -> Params:
    data = json.loads(json.dumps(data))  # deep copy; also rejects non-JSON-able YAML tags
    for ov in overrides or []:
        key, value = parse_override(ov)
        _set_dotted(data, key, value)
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, origin)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read and validate a params file; `overrides` are dotted `key=value` strings applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {one_line(err)}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return params_from_dict(data, origin=str(path), overrides=overrides)
