"""A GPT-2-style decoder-only transformer, in one file.

    model = GPT(ModelConfig(vocab_size=50257, context_length=128, n_embd=128, n_layer=2, n_head=4))
    logits, loss = model(idx, targets)  # idx, targets: (B, T) int64 -> logits (B, T, vocab_size)

Follows Raschka's "Build a Large Language Model (From Scratch)" ch. 4 and nanoGPT: learned position
embeddings, pre-LayerNorm blocks, causal multi-head self-attention, a 4x GELU MLP, a final LayerNorm
and a linear LM head whose weight is tied to the token embedding when `tie_weights` is set.

Shape letters: B batch, T sequence length, C n_embd, V vocab_size, nh n_head, hs head size (C // nh).

Parameter names (the keys in model.safetensors):
    wte.weight, wpe.weight
    blocks.{i}.norm_1.{weight,bias}   blocks.{i}.attn.qkv.{weight,bias}  blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.norm_2.{weight,bias}   blocks.{i}.mlp.fc.{weight,bias}    blocks.{i}.mlp.proj.{weight,bias}
    norm_f.{weight,bias}, lm_head.weight (the same tensor as wte.weight when tied)
    lm_head.{weight,bias} of shape (n_classes, C) and (n_classes,) after `replace_head` (a classifier)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmcore.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # residual projection
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_drop(self.proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)  # residual projection
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc(x), approximate="tanh")  # (B, T, 4C); GPT-2 used the tanh approximation
        return self.drop(self.proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), mask)  # (B, T, C)
        x = x + self.mlp(self.norm_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.context_length, config.n_embd)  # learned position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one tensor, two roles (GPT-2)

        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # since each block adds two of them to the stream.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args: idx (B, T) token ids; targets (B, T) next-token ids, or None; positions, mask: see `hidden`.

        Returns: logits (B, T, V) and the mean cross-entropy over all B*T positions (None without targets).
        """
        logits = self.lm_head(self.hidden(idx, positions=positions, mask=mask))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # (B*T, V) vs (B*T,)
        return logits, loss

    def hidden(
        self, idx: torch.Tensor, *, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final-norm hidden states (B, T, C), before the LM head: callers that need the head at a few
        positions only (benchmark scoring) apply `lm_head` there and skip the rest of the (T, V) logits.

        Args: idx (B, T) token ids.
        positions: (T,) or (B, T) position ids instead of 0..T-1, and mask: a boolean (T, T) or (B, 1, T, T)
            attention mask (True = may attend) instead of the causal one. Together they let several
            sequences share a prefix in one row (benchmark scoring packs a context with all its choices).
        """
        B, T = idx.shape
        if positions is None:
            if T > self.config.context_length:
                raise ValueError(f"sequence length {T} exceeds the model's context_length {self.config.context_length}")
            positions = torch.arange(T, device=idx.device)  # (T,)
        elif int(positions.max()) >= self.config.context_length:
            raise ValueError(f"position {int(positions.max())} exceeds the model's context_length {self.config.context_length}")
        x = self.wte(idx) + self.wpe(positions)  # (B, T, C) + (T, C) or (B, T, C) -> (B, T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask)  # (B, T, C)
        return self.norm_f(x)  # (B, T, C)

    def replace_head(self, n_out: int) -> None:
        """Swap the LM head for a fresh `n_out`-way linear head with a bias (classification, book ch. 6).

        The new head is never tied to the token embedding, so the config says `tie_weights: false`.
        """
        self.lm_head = nn.Linear(self.config.n_embd, n_out, bias=True).to(self.wte.weight.device)
        self._init_weights(self.lm_head)
        self.config = self.config.model_copy(update={"tie_weights": False})

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, each shared tensor counted once.

        non_embedding=True leaves out the lookup-only tables: the position embedding always, the token
        embedding only when it is not tied (a tied one is also the LM head's matmul weight), as nanoGPT.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n
