"""Low-Rank Adaptation (Hu et al. 2021), written here: no peft.

    wrapped = apply_lora(model, rank=8, alpha=16, dropout=0.0, target_modules=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    ...  # train: only the lora_A / lora_B tensors have requires_grad
    save_tensors(lora_state_dict(model), path)  # the adapter alone, if wanted
    merge_lora(model)  # plain nn.Linear layers again, with the original parameter names

Each targeted Linear y = x @ W.T + b becomes y = x @ W.T + b + (x @ A.T @ B.T) * alpha / rank, with W and b
frozen, A (rank, in) and B (out, rank) trainable. B starts at zero, so a fresh adapter changes nothing
(Raschka's "Build a Large Language Model (From Scratch)" appendix E; litgpt lora.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmcore.errors import InputError


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ A.T @ B.T) * (alpha / rank); base frozen, A and B trainable."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dropout sits on the adapter path only: the frozen base sees the input unchanged.
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., rank) -> (..., out)
        return self.base(x) + lora * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """Returns: the adapter as a weight update (out, in) = B @ A * scaling."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """Returns: a new nn.Linear with weight base.weight + delta_weight() and the base's bias (frozen)."""
        w = self.base.weight
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w + self.delta_weight())
        linear.weight.requires_grad_(w.requires_grad)
        if self.base.bias is not None:
            linear.bias = self.base.bias  # unchanged by the adapter: keep the same parameter
        return linear


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> list[str]:
    """Freeze every parameter of `model`, then wrap each nn.Linear whose name matches a target in a LoRALinear.

    A target matches a module name equal to it or ending in "." + target: "proj" matches both
    blocks.{i}.attn.proj and blocks.{i}.mlp.proj. The model is left untouched when an error is raised.

    Args:
        model: the model, changed in place.
        rank, alpha, dropout: the adapter's rank, scale numerator (scaling = alpha / rank) and input dropout.
        target_modules: module-name suffixes to adapt.
    Returns: the wrapped module names, in model order.
    Raises: ValueError for rank < 1, alpha <= 0, a target that matches no nn.Linear, a matched Linear whose
        weight is shared with another parameter (a tied LM head: merging would untie it), or a model
        that already has adapters.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    modules = dict(model.named_modules())
    if any(isinstance(m, LoRALinear) for m in modules.values()):
        raise ValueError("the model already has LoRA adapters; merge_lora it before applying new ones")
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    for target in target_modules:
        if not any(_matches(name, target) for name in linears):
            raise InputError(f"LoRA target {target!r} matches no nn.Linear; the model's Linear modules are {linears}")
    wrapped = [name for name in linears if any(_matches(name, t) for t in target_modules)]
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name in wrapped:
        if uses[id(modules[name].weight)] > 1:
            raise InputError(f"LoRA target {name!r} shares its weight with another parameter (tied); merging would untie it")

    model.requires_grad_(False)
    for name in wrapped:
        _replace(model, name, LoRALinear(modules[name], rank, alpha, dropout))
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` by its merged nn.Linear, in place.

    Returns: the model, whose parameter names are those it had before apply_lora (blocks.0.attn.qkv.weight, ...).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns: only the adapter tensors (names ending in lora_A / lora_B), for an adapter file."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns: (trainable, total) parameter counts, each shared tensor counted once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
