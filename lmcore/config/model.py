"""Params of the model: its shape and architecture (ModelConfig, presets, plausible bounds) and where a run starts
(BaseModelConfig)."""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Literal

from pydantic import Field, model_validator

from lmcore.config.base import Section


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


class BaseModelConfig(Section):
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


class ModelConfig(Section):
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
