"""Hugging Face GPT-2 interop: lmcore GPT weights <-> `transformers` GPT2LMHeadModel weights, both ways.

    config, state = to_hf_gpt2(model)        # then: GPT2LMHeadModel(GPT2Config(**config)).load_state_dict(state)
    model = from_hf_gpt2(config, state)      # config: GPT2Config.to_dict(); state: hf_model.state_dict()

Only tensors and plain dicts cross the boundary, so this module does not import transformers (the tests and the
lm-evaluation-harness parity check do). The mapping is exact: same GELU (tanh approximation, HF "gelu_new"),
LayerNorm eps 1e-5, fused q/k/v in the same order. HF's Conv1D stores weights as (in, out), the transpose of
nn.Linear's (out, in).
"""

from __future__ import annotations

import torch

from lmcore.config import ModelConfig
from lmcore.model import GPT

# lmcore name suffix -> HF name suffix, per block; Conv1D weights are transposed.
_BLOCK = {
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
_TRANSPOSED = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"}
_TOP = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
        "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias"}


def hf_gpt2_config(cfg: ModelConfig) -> dict:
    """GPT2Config keyword arguments for an lmcore ModelConfig (which must have biases: GPT-2 always does)."""
    if not cfg.bias:
        raise ValueError("a Hugging Face GPT-2 has biases everywhere; this model was built with bias: false")
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def to_hf_gpt2(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    """Returns: GPT2Config kwargs and a GPT2LMHeadModel state dict holding copies of the model's weights."""
    config = hf_gpt2_config(model.config)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if name in _TOP:
            state[_TOP[name]] = tensor
        elif name == "lm_head.weight":
            state["lm_head.weight"] = tensor
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            state[f"transformer.h.{i}.{_BLOCK[rest]}"] = tensor.t().contiguous() if rest in _TRANSPOSED else tensor
        else:
            raise ValueError(f"to_hf_gpt2: no Hugging Face name for {name!r} (a classifier head cannot be exported)")
    return config, state


def from_hf_gpt2(config: dict, state: dict[str, torch.Tensor]) -> GPT:
    """An lmcore GPT with the weights of a GPT2LMHeadModel (config: GPT2Config.to_dict(), state: its state_dict())."""
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {config['activation_function']!r}: lmcore's MLP uses the tanh-approximated GELU")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise ValueError(f"n_inner {config['n_inner']}: lmcore's MLP is 4 * n_embd wide")
    cfg = ModelConfig(
        vocab_size=config["vocab_size"],
        context_length=config["n_positions"],
        n_embd=config["n_embd"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        dropout=config.get("resid_pdrop", 0.0),
        bias=True,
        tie_weights=config.get("tie_word_embeddings", True),
    )
    model = GPT(cfg)
    inverse = {hf: ours for ours, hf in _TOP.items()}
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in inverse:
            ours[inverse[name]] = tensor
        elif name == "lm_head.weight":
            ours["lm_head.weight"] = tensor
        elif name.startswith("transformer.h."):
            _, _, i, rest = name.split(".", 3)
            key = next((k for k, v in _BLOCK.items() if v == rest), None)
            if key is None:
                continue  # non-parameter buffers some transformers versions keep (attn.bias, masked_bias)
            ours[f"blocks.{i}.{key}"] = tensor.t().contiguous() if key in _TRANSPOSED else tensor
    if cfg.tie_weights:
        ours.setdefault("lm_head.weight", ours["wte.weight"])
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise ValueError(f"from_hf_gpt2: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return model
