"""Hugging Face interop: GPT-2 and Llama weights between a Hugging Face folder and an lmcore model folder.

    import_hf("hf/llama", "models/llama")      # config.json + model.safetensors (or shards) -> lmcore folder
    export_hf("models/base", "hf/base")        # lmcore folder -> config.json + model.safetensors for transformers
    lmcore import-hf SRC_DIR DST_DIR            # the same from the command line (flows/cli.py)
    lmcore export-hf SRC_DIR DST_DIR

In memory, for callers that build the transformers model themselves (tests, benchmarks/peers.py):

    config, state = to_hf(model)               # then: LlamaForCausalLM(LlamaConfig(**config)).load_state_dict(state, strict=False)
    model = from_hf(config, state)             # config: PretrainedConfig.to_dict(); state: hf_model.state_dict()
    config, state = to_hf_gpt2(model)          # the same for GPT-2 only: GPT2Config(**config)

Only tensors, dicts and files cross the boundary: this module never imports transformers.

The mapping is exact, no permutation anywhere:
    GPT-2  transformer.wte/wpe/ln_f, h.{i}.ln_1, attn.c_attn (fused q|k|v), attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj.
           HF's Conv1D stores (in, out), the transpose of nn.Linear's (out, in). GELU is the tanh form ("gelu_new").
    Llama  model.embed_tokens, layers.{i}.input_layernorm, self_attn.{q,k,v}_proj (concatenated into attn.qkv in
           that order), self_attn.o_proj, post_attention_layernorm, mlp.gate_proj/up_proj/down_proj (mlp.fc_1, fc_2,
           proj), model.norm, lm_head. HF applies RoPE in the rotate-half layout on the same head-major rows as
           lmcore, and grouped-query attention repeats each key/value head for consecutive query heads, as SDPA does.
A tied LM head is written once (HF re-ties it on load). Weights are read from safetensors only: pickled
checkpoints (pytorch_model.bin) are refused, never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmcore.checkpoint import (
    HEAD_KEY,
    load_model,
    read_model_config,
    save_model,
    save_tensors,
)
from lmcore.config import ModelConfig
from lmcore.errors import InputError, one_line, validation_summary
from lmcore.io import atomic_dir, read_json, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import CARD, MODEL_CONFIG
from lmcore.tokenizer import (
    EOT,
    HF_TOKENIZER_FILE,
    TIKTOKEN,
    TOKENIZER_CONFIG,
    Tokenizer,
    byte_decoder,
    has_tokenizer,
    load_tokenizer,
    tiktoken_merges,
)

GPT2, LLAMA = "gpt2", "llama"
ARCHITECTURES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}
# Files of a Hugging Face model folder.
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Key of an imported model's config.json: {"model_type", "source", and the special token ids}.
HF_KEY = "hf"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
GPT2_EOT = 50256  # <|endoftext|> of the gpt2 encoding

# lmcore name suffix -> HF name suffix, per block. GPT-2's Conv1D weights are transposed.
_GPT2_BLOCK = {
    "norm_1.weight": "ln_1.weight",
    "norm_1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight",
    "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight",
    "attn.proj.bias": "attn.c_proj.bias",
    "norm_2.weight": "ln_2.weight",
    "norm_2.bias": "ln_2.bias",
    "mlp.fc.weight": "mlp.c_fc.weight",
    "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight",
    "mlp.proj.bias": "mlp.c_proj.bias",
}
_GPT2_TRANSPOSED = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"}
_GPT2_TOP = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "norm_f.weight": "ln_f.weight", "norm_f.bias": "ln_f.bias"}
_GPT2_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers older transformers saved; not weights

_LLAMA_BLOCK = {
    "norm_1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "attn.proj.bias": "self_attn.o_proj.bias",
    "norm_2.weight": "post_attention_layernorm.weight",
    "mlp.fc_1.weight": "mlp.gate_proj.weight",
    "mlp.fc_1.bias": "mlp.gate_proj.bias",
    "mlp.fc_2.weight": "mlp.up_proj.weight",
    "mlp.fc_2.bias": "mlp.up_proj.bias",
    "mlp.proj.weight": "mlp.down_proj.weight",
    "mlp.proj.bias": "mlp.down_proj.bias",
}
_LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # concatenated, in this order, into attn.qkv
_LLAMA_TOP = {"wte.weight": "embed_tokens.weight", "norm_f.weight": "norm.weight"}
_LLAMA_BUFFERS = ("self_attn.rotary_emb.inv_freq",)

# The prefix of the decoder's weights inside the *ForCausalLM model (a bare GPT2Model/LlamaModel has none).
_PREFIX = {GPT2: "transformer.", LLAMA: "model."}
_LAYERS = {GPT2: "h.", LLAMA: "layers."}


class HFError(InputError):
    """A Hugging Face folder or an lmcore model that cannot be converted; the message names the file or option."""


# ---------------------------------------------------------------------------------------------------------------
# Configs


def hf_model_type(cfg: ModelConfig) -> str:
    """"gpt2" or "llama": the Hugging Face architecture that expresses `cfg` exactly; HFError naming the option otherwise."""
    gpt2 = dict(norm="layernorm", mlp="gelu", positions="learned")
    llama = dict(norm="rmsnorm", mlp="swiglu", positions="rope")
    options = {k: getattr(cfg, k) for k in gpt2}
    if options == gpt2:
        if not cfg.bias:
            raise HFError("bias: false: a Hugging Face GPT-2 has biases everywhere (use bias: true, or the Llama options)")
        if cfg.kv_heads != cfg.n_head:
            raise HFError(f"n_kv_head: {cfg.n_kv_head}: a Hugging Face GPT-2 has no grouped-query attention")
        return GPT2
    if options == llama:
        return LLAMA
    # Name the options that leave each architecture, so the message says what to change.
    off_gpt2 = [f"{k}: {v}" for k, v in options.items() if v != gpt2[k]]
    off_llama = [f"{k}: {v}" for k, v in options.items() if v != llama[k]]
    raise HFError(
        f"no Hugging Face architecture has this combination ({', '.join(f'{k}: {v}' for k, v in options.items())}): "
        f"GPT-2 needs {', '.join(f'{k}: {gpt2[k]}' for k in gpt2)} (this model has {', '.join(off_gpt2)}); "
        f"Llama needs {', '.join(f'{k}: {llama[k]}' for k in llama)} (this model has {', '.join(off_llama)})"
    )


def hf_gpt2_config(cfg: ModelConfig) -> dict:
    """GPT2Config keyword arguments for an lmcore ModelConfig of the GPT-2 architecture."""
    if hf_model_type(cfg) != GPT2:
        raise HFError("this is a Llama-style model (rmsnorm, swiglu, rope): export it as Llama (hf_llama_config)")
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None if cfg.mlp_size == 4 * cfg.n_embd else cfg.mlp_size,  # None: 4 * n_embd
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "tie_word_embeddings": cfg.tie_weights,
        **_gpt2_token_ids(cfg),
    }


def hf_llama_config(cfg: ModelConfig) -> dict:
    """LlamaConfig keyword arguments for an lmcore ModelConfig of the Llama architecture."""
    if hf_model_type(cfg) != LLAMA:
        raise HFError("this is a GPT-2-style model (layernorm, gelu, learned positions): export it as GPT-2 (hf_gpt2_config)")
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; earlier versions read rope_theta and rope_scaling.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "rope_theta": cfg.rope_base,
        "rope_scaling": None,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_weights,
        **_gpt2_token_ids(cfg),
    }


def _gpt2_token_ids(cfg: ModelConfig) -> dict:
    """<|endoftext|> as bos and eos when the vocabulary has it (lmcore trains on the gpt2 encoding), else none."""
    eot = GPT2_EOT if cfg.vocab_size > GPT2_EOT else None
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None}


def hf_config(cfg: ModelConfig) -> dict:
    """The config.json of the Hugging Face model equal to `cfg`: architectures, model_type and every field."""
    model_type = hf_model_type(cfg)
    fields = hf_gpt2_config(cfg) if model_type == GPT2 else hf_llama_config(cfg)
    return {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, **fields,
            "dtype": "float32", "torch_dtype": "float32", "use_cache": True}


def model_config_from_hf(config: dict, origin: str = HF_CONFIG, names: dict[str, str] | None = None) -> ModelConfig:
    """The lmcore ModelConfig of a Hugging Face GPT-2 or Llama config dict; HFError naming `origin` if it has none.

    Its shape is checked for plausible bounds and its memory estimated (lmcore.config.MAX_MODEL_BYTES) here,
    before any weight is read or allocated. `names`: what `origin` calls each ModelConfig field, for messages
    (default: the config.json keys).
    """
    model_type = config.get("model_type")
    if model_type == GPT2:
        fields = _gpt2_fields(config, origin)
    elif model_type == LLAMA:
        fields = _llama_fields(config, origin)
    else:
        raise HFError(f"{origin}: model_type {model_type!r} is not supported; lmcore imports {GPT2!r} and {LLAMA!r}")
    try:
        return ModelConfig(**fields)
    except ValidationError as err:
        summary = validation_summary(err, _HF_KEYS[model_type] if names is None else names)
        raise HFError(f"{origin}: not a valid lmcore model: {summary}") from None


# The config.json key each ModelConfig field comes from, to name it in messages.
_HF_KEYS = {
    GPT2: {"context_length": "n_positions", "intermediate_size": "n_inner", "norm_eps": "layer_norm_epsilon",
           "dropout": "resid_pdrop", "tie_weights": "tie_word_embeddings"},
    LLAMA: {"context_length": "max_position_embeddings", "n_embd": "hidden_size", "n_layer": "num_hidden_layers",
            "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "norm_eps": "rms_norm_eps",
            "rope_base": "rope_theta", "dropout": "attention_dropout", "bias": "attention_bias",
            "tie_weights": "tie_word_embeddings"},
}


def _require(config: dict, origin: str, *keys: str, optional: tuple[str, ...] = ()) -> None:
    """`keys` are there and, with the `optional` ones that are, whole numbers."""
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise HFError(f"{origin}: missing {', '.join(missing)}")
    for key in (*keys, *(k for k in optional if config.get(k) is not None)):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise HFError(f"{origin}: {key} is {value!r}; expected a whole number")


def _gpt2_fields(config: dict, origin: str) -> dict:
    if "n_positions" not in config and "n_ctx" in config:  # very old configs
        config = {**config, "n_positions": config["n_ctx"]}
    _require(config, origin, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", optional=("n_inner",))
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"{origin}: activation_function {act!r}: lmcore's GPT-2 MLP uses the tanh-approximated GELU (gelu_new)")
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx", False):
        raise HFError(f"{origin}: scale_attn_weights false or scale_attn_by_inverse_layer_idx true: lmcore scales attention by 1/sqrt(head size) only")
    if config.get("add_cross_attention", False):
        raise HFError(f"{origin}: add_cross_attention true: lmcore is a decoder-only model")
    n_inner = config.get("n_inner")
    return dict(
        vocab_size=config["vocab_size"],
        context_length=config["n_positions"],
        n_embd=config["n_embd"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        intermediate_size=None if n_inner in (None, 4 * config["n_embd"]) else n_inner,
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        dropout=config.get("resid_pdrop", 0.0),
        bias=True,
        tie_weights=config.get("tie_word_embeddings", True),
    )


def _llama_fields(config: dict, origin: str) -> dict:
    _require(config, origin, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             optional=("head_dim", "num_key_value_heads", "max_position_embeddings"))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(f"{origin}: hidden_act {act!r}: lmcore's SwiGLU uses silu")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise HFError(f"{origin}: head_dim {head_dim} != hidden_size / num_attention_heads ({hidden} / {heads}): lmcore's head size is n_embd / n_head")
    # transformers >= 5 keeps rope_theta and the rope type in rope_parameters; earlier: rope_theta, rope_scaling.
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    for name, section in (("rope_scaling", scaling), ("rope_parameters", rope)):
        if section is None:
            continue
        if not isinstance(section, dict):
            raise HFError(f"{origin}: {name} {section!r}: expected null or an object")
        rope_type = section.get("rope_type", section.get("type", "default"))
        if rope_type != "default":
            raise HFError(f"{origin}: {name} has rope_type {rope_type!r}: lmcore implements unscaled RoPE only (rope_scaling null or default)")
        factor = section.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise HFError(f"{origin}: {name}.partial_rotary_factor {factor}: lmcore rotates the whole head")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"{origin}: partial_rotary_factor {config['partial_rotary_factor']}: lmcore rotates the whole head")
    attention_bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise HFError(f"{origin}: attention_bias {attention_bias} but mlp_bias {mlp_bias}: lmcore's one `bias` option sets both")
    return dict(
        vocab_size=config["vocab_size"],
        context_length=config.get("max_position_embeddings", 2048),
        n_embd=hidden,
        n_layer=config["num_hidden_layers"],
        n_head=heads,
        n_kv_head=config.get("num_key_value_heads") or heads,
        intermediate_size=config["intermediate_size"],
        norm="rmsnorm",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        positions="rope",
        rope_base=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        dropout=config.get("attention_dropout", 0.0),
        bias=attention_bias,
        tie_weights=config.get("tie_word_embeddings", False),
    )


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def to_hf(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    """Returns: the Hugging Face config dict (config.json's content) and a *ForCausalLM state dict of copies.

    A tied LM head is left out of the state dict: HF ties lm_head.weight to the embedding on load.
    """
    if model.lm_head.bias is not None or model.lm_head.weight.shape[0] != model.config.vocab_size:
        raise HFError("lm_head: a classifier head (replace_head) has no Hugging Face *ForCausalLM equivalent")
    config = hf_config(model.config)
    model_type = config["model_type"]
    prefix, layers = _PREFIX[model_type], _LAYERS[model_type]
    cfg = model.config
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if name == "lm_head.weight":
            if not cfg.tie_weights:
                state["lm_head.weight"] = tensor
        elif not name.startswith("blocks."):
            top = _GPT2_TOP if model_type == GPT2 else _LLAMA_TOP
            state[prefix + top[name]] = tensor
        else:
            _, i, rest = name.split(".", 2)
            block = f"{prefix}{layers}{i}."
            if model_type == GPT2:
                state[block + _GPT2_BLOCK[rest]] = tensor.t().contiguous() if rest in _GPT2_TRANSPOSED else tensor
            elif rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]  # weight or bias
                sizes = (cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.kv_heads * cfg.head_size)
                for hf_name, part in zip(_LLAMA_QKV, tensor.split(sizes, dim=0)):
                    state[f"{block}{hf_name}.{kind}"] = part.contiguous()
            else:
                state[block + _LLAMA_BLOCK[rest]] = tensor
    return config, state


def from_hf(config: dict, state: dict[str, torch.Tensor], origin: str = "state dict") -> GPT:
    """An lmcore GPT with the weights of a Hugging Face GPT-2 or Llama model (float32, eval mode).

    Args:
        config: the HF config as a dict (config.json, or PretrainedConfig.to_dict()).
        state: the HF weights by name (a safetensors file's, or hf_model.state_dict()); names with or without
            the "transformer."/"model." prefix of the *ForCausalLM model.
        origin: where the weights come from, for error messages.
    Raises: HFError naming what is refused, unknown or missing.
    """
    cfg = model_config_from_hf(config, origin=f"{origin} (config)")
    model_type = config["model_type"]
    prefix, layers = _PREFIX[model_type], _LAYERS[model_type]
    top = {hf: ours for ours, hf in (_GPT2_TOP if model_type == GPT2 else _LLAMA_TOP).items()}
    block_map = {hf: ours for ours, hf in (_GPT2_BLOCK if model_type == GPT2 else _LLAMA_BLOCK).items()}
    buffers = _GPT2_BUFFERS if model_type == GPT2 else _LLAMA_BUFFERS
    ours: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block index, weight|bias) -> q/k/v parts
    unknown = []
    for name, tensor in state.items():
        key = name.removeprefix(prefix)
        if name == "lm_head.weight":
            if not cfg.tie_weights:  # a tied checkpoint may still hold a copy; HF ignores it too
                ours["lm_head.weight"] = tensor
        elif key in top:
            ours[top[key]] = tensor
        elif key.startswith(layers):
            i, rest = key.removeprefix(layers).split(".", 1)
            if rest in buffers:
                continue
            part, _, kind = rest.rpartition(".")
            if part in _LLAMA_QKV and model_type == LLAMA:
                qkv.setdefault((i, kind), {})[part] = tensor
            elif rest in block_map:
                ours_name = block_map[rest]
                transposed = model_type == GPT2 and ours_name in _GPT2_TRANSPOSED
                ours[f"blocks.{i}.{ours_name}"] = tensor.t() if transposed else tensor
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    for (i, kind), parts in qkv.items():
        if len(parts) != 3:
            raise HFError(f"{origin}: layer {i} has {sorted(parts)} but not all of q_proj, k_proj, v_proj ({kind})")
        shapes = [tuple(parts[p].shape) for p in _LLAMA_QKV]
        if len({s[1:] for s in shapes}) != 1:
            raise HFError(f"{origin}: layer {i} q_proj, k_proj, v_proj {kind} shapes {shapes} do not stack")
        ours[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in _LLAMA_QKV], dim=0)
    if unknown:
        raise HFError(f"{origin}: weights lmcore has no place for: {sorted(unknown)[:8]}{' ...' if len(unknown) > 8 else ''}")
    expected = cfg.tensor_shapes()  # checked before the model is allocated
    missing = sorted(expected.keys() - ours.keys())
    if missing:
        raise HFError(f"{origin}: missing weights for {missing[:8]}{' ...' if len(missing) > 8 else ''} (lmcore names)")
    wrong = [f"{k}: {tuple(ours[k].shape)} != {s}" for k, s in expected.items() if tuple(ours[k].shape) != s]
    if wrong:
        raise HFError(f"{origin}: shapes do not match config.json: {wrong[:4]}")
    model = GPT(cfg)
    with torch.no_grad():
        model.load_state_dict(ours, strict=False)  # copies into float32; a tied lm_head follows wte
    return model.eval()


def to_hf_gpt2(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    """Returns: GPT2Config kwargs and a GPT2LMHeadModel state dict holding copies of the model's weights."""
    config, state = to_hf(model)
    if config["model_type"] != GPT2:
        raise HFError(f"to_hf_gpt2: this is a {config['model_type']} model; use to_hf")
    return hf_gpt2_config(model.config), state


def from_hf_gpt2(config: dict, state: dict[str, torch.Tensor]) -> GPT:
    """An lmcore GPT with the weights of a GPT2LMHeadModel (config: GPT2Config.to_dict(), state: its state_dict())."""
    return from_hf({**config, "model_type": GPT2}, state)


# ---------------------------------------------------------------------------------------------------------------
# Folders


def read_hf_weights(src_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards model.safetensors.index.json names.

    Raises: HFError naming the file; for a folder with pickled weights only (pytorch_model.bin), a message that
    they are refused (they could run code when unpickled).
    """
    src = Path(src_dir)
    single, index = src / HF_WEIGHTS, src / HF_INDEX
    if single.is_file():
        return _load_safetensors(single)
    if not index.is_file():
        pickled = sorted({p.name for pattern in PICKLED for p in src.glob(pattern)})
        if pickled:
            raise HFError(
                f"{src}: only pickled weights ({', '.join(pickled)}); lmcore reads safetensors only and never unpickles. "
                f"Convert them where you trust the file: model.save_pretrained(dir, safe_serialization=True)"
            )
        raise HFError(f"{src}: no {HF_WEIGHTS} or {HF_INDEX}")
    try:
        weight_map = read_json(index).get("weight_map")
    except (ValueError, AttributeError) as err:
        raise HFError(f"{index}: not a JSON object: {one_line(err)}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFError(f"{index}: no 'weight_map' of tensor name -> shard file")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise HFError(f"{index}: shard {shard!r} is not a file name in {src}")
        path = src / shard
        if not path.is_file():
            raise HFError(f"{index}: shard {shard} is missing")
        tensors.update(_load_safetensors(path))
    missing = sorted(weight_map.keys() - tensors.keys())
    if missing:
        raise HFError(f"{index}: tensors not found in their shards: {missing[:8]}")
    return tensors


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as err:
        raise HFError(f"{path}: is truncated or not a safetensors file ({one_line(err)})") from None
    except OSError as err:
        raise HFError(f"{path}: cannot be read: {err.strerror or one_line(err)}") from None


def read_hf_config(src_dir: str | Path) -> dict:
    path = Path(src_dir) / HF_CONFIG
    if not Path(src_dir).is_dir():
        raise HFError(f"{src_dir}: no such folder")
    if not path.is_file():
        raise HFError(f"{path}: not found (is {src_dir} a Hugging Face model folder?)")
    try:
        config = read_json(path)
    except ValueError as err:
        raise HFError(f"{path}: not valid JSON: {one_line(err)}") from None
    if not isinstance(config, dict):
        raise HFError(f"{path}: expected a JSON object")
    return config


def check_target(dst: Path, marker_key: str, what: str) -> None:
    """Refuse to replace a folder that is not empty and not a previous output of the same kind."""
    if not dst.exists():
        return
    if not dst.is_dir():
        raise HFError(f"{dst}: exists and is not a folder")
    if not any(dst.iterdir()):
        return
    config = dst / MODEL_CONFIG
    try:
        ours = config.is_file() and marker_key in read_json(config)
    except ValueError:
        ours = False
    if not ours:
        raise HFError(f"{dst}: exists and is not {what}; refusing to replace it (choose a new or empty folder)")


def import_hf(src_dir: str | Path, dst_dir: str | Path) -> dict[str, Any]:
    """Convert a Hugging Face GPT-2 or Llama folder (config.json + safetensors) into an lmcore model folder.

    Args:
        src_dir: the HF folder: config.json and model.safetensors, or model.safetensors.index.json and its shards.
        dst_dir: the lmcore model folder to write (lmcore.checkpoint layout); replaced whole if it is one already.
    Returns: {"model_type", "params", "path"}.
    Raises: HFError naming the file and what is refused (unknown model_type, pickled weights, rope scaling, ...).
    """
    src, dst = Path(src_dir), Path(dst_dir)
    config = read_hf_config(src)
    origin = str(src / HF_CONFIG)
    model_config_from_hf(config, origin=origin)  # refuse before reading gigabytes of weights
    model = from_hf(config, read_hf_weights(src), origin=str(src))
    model_type = config["model_type"]
    # The gpt2 encoding is GPT-2's own tokenizer; other vocabularies are not an encoding lmcore can build.
    tokenizer = "gpt2" if model_type == GPT2 and model.config.vocab_size == GPT2_EOT + 1 else None
    hf_meta = {"model_type": model_type, "source": str(src.resolve()), **{k: config.get(k) for k in TOKEN_IDS}}
    check_target(dst, "format_version", "an lmcore model folder")
    with atomic_dir(dst) as tmp:
        save_model(model, tmp, extra={"tokenizer": tokenizer, HF_KEY: hf_meta})
    return {"model_type": model_type, "params": model.num_params(), "path": str(dst)}


def export_hf(src_dir: str | Path, dst_dir: str | Path, *, card: str | None = None) -> dict[str, Any]:
    """Write an lmcore model folder as a Hugging Face folder: config.json and model.safetensors (float32), the
    tokenizer, and the model card as MODEL_CARD.md and as the Hub's README.md (with its metadata header).

    The result loads with transformers' AutoModelForCausalLM.from_pretrained (GPT2LMHeadModel or LlamaForCausalLM).

    Args:
        src_dir: an lmcore model folder (lmcore.checkpoint layout).
        dst_dir: the HF folder to write; replaced whole if it is one already.
        card: the card to write (a registered version's, with its scores); None: the folder's MODEL_CARD.md.
    Returns: {"model_type", "params", "path"}.
    Raises: HFError naming the option HF cannot express (e.g. mlp: gelu with positions: rope, a classifier head).
    """
    src, dst = Path(src_dir), Path(dst_dir)
    _, extra = read_model_config(src)
    if extra.get(HEAD_KEY) is not None:
        raise HFError(f"{src / MODEL_CONFIG}: '{HEAD_KEY}' {extra[HEAD_KEY]!r}: a classifier has no Hugging Face *ForCausalLM equivalent")
    model = load_model(src, device="cpu")
    config, state = to_hf(model)
    hf_meta = extra.get(HF_KEY) or {}
    if hf_meta.get("model_type") == config["model_type"]:  # imported: give back the source's special tokens
        config.update({k: hf_meta[k] for k in TOKEN_IDS if k in hf_meta})
    check_target(dst, "model_type", "a Hugging Face model folder")
    with atomic_dir(dst) as tmp:
        save_tensors({k: v.float().contiguous() for k, v in state.items()}, tmp / HF_WEIGHTS)
        write_json(tmp / HF_CONFIG, config)
        if has_tokenizer(src):
            write_hf_tokenizer(load_tokenizer(src), tmp)
        if card is None and (src / CARD).is_file():
            card = (src / CARD).read_text(encoding="utf-8")
        if card is not None:
            write_text(tmp / CARD, card)
            write_text(tmp / "README.md", f"---\nlibrary_name: transformers\ntags:\n- lmcore\n- {config['model_type']}\n---\n\n{card}")
    return {"model_type": config["model_type"], "params": model.num_params(), "path": str(dst)}


def write_hf_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """The model's tokenizer as transformers reads it: tokenizer.json + tokenizer_config.json (AutoTokenizer).

    A Hugging Face tokenizer is written as it is (lmcore's tokenizer_config.json has Hugging Face's keys); GPT-2's
    tiktoken ranks become the byte-level BPE tokenizer.json they were made from (merges derived from the ranks).
    """
    if tok.kind != TIKTOKEN:
        tok.save(folder)
        return
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    spell = {b: c for c, b in byte_decoder().items()}
    word = lambda b: "".join(spell[x] for x in b)
    ranks = tok.enc._mergeable_ranks
    vocab = {word(t): r for t, r in ranks.items()}
    merges = [(word(a), word(b)) for a, b in tiktoken_merges(tok)]
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rust.decoder = decoders.ByteLevel()
    rust.post_processor = processors.ByteLevel(trim_offsets=False)
    rust.add_special_tokens([EOT])
    atomic_tmp = folder / f".{HF_TOKENIZER_FILE}.tmp"
    rust.save(str(atomic_tmp))
    os.replace(atomic_tmp, folder / HF_TOKENIZER_FILE)
    write_json(folder / TOKENIZER_CONFIG, {"tokenizer_class": "GPT2TokenizerFast", "bos_token": EOT, "eos_token": EOT,
                                           "unk_token": EOT, "add_prefix_space": False, "model_max_length": 1024})

