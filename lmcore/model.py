"""A decoder-only transformer in one file: GPT-2 or Llama-style, by config.

    model = GPT(ModelConfig(vocab_size=50257, context_length=128, n_embd=128, n_layer=2, n_head=4))
    model = GPT(ModelConfig(preset="llama-tiny"))
    logits, loss = model(idx, targets)  # idx, targets: (B, T) int64 -> logits (B, T, vocab_size)

GPT-2 (Raschka's book ch. 4, nanoGPT): learned position embeddings, pre-LayerNorm blocks, a 4x GELU MLP,
biases, the LM head tied to the token embedding. Llama-style options, each on its own switch:
`norm: rmsnorm`, `mlp: swiglu`, `positions: rope` (rotary embeddings, rotate-half layout as in Hugging
Face's Llama), `n_kv_head` < `n_head` (grouped-query attention), `bias: false`, `tie_weights: false`.
Attention is `F.scaled_dot_product_attention` throughout.

Generation keeps keys and values in a preallocated cache (`set_kv_cache`); each call then passes the
positions of its new tokens: `model(idx, positions=torch.arange(t0, t0 + T))`. Sequences of different lengths share
one cache, each in its row from slot 0: positions (B, T) are then each row's own (and its cache slots), and a
(B, 1, T, S) mask hides each row's slots past its own length: `model.hidden(idx, positions=, mask=)`.

Shape letters: B batch, T sequence length, C n_embd, V vocab_size, nh n_head, nkv n_kv_head, hs head size.

Parameter names (the keys in model.safetensors):
    wte.weight, wpe.weight (learned positions only)
    blocks.{i}.norm_1.{weight,bias}   blocks.{i}.attn.qkv.{weight,bias}  blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.norm_2.{weight,bias}   blocks.{i}.mlp.fc.{weight,bias}    blocks.{i}.mlp.proj.{weight,bias}
        (swiglu: blocks.{i}.mlp.fc_1 (gate), mlp.fc_2 (up), mlp.proj (down))
    norm_f.{weight,bias}, lm_head.weight (the same tensor as wte.weight when tied)
    lm_head.{weight,bias} of shape (n_classes, C) and (n_classes,) after `replace_head` (a classifier)
qkv holds the nh query heads, then the nkv key heads, then the nkv value heads. Without biases (or with
RMSNorm) the `.bias` entries are absent.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from lmcore.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (Zhang & Sennrich 2019; Llama)."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (context_length, hs) for rotary embeddings, in the rotate-half layout."""
    hs = config.head_size
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs))  # (hs/2,)
    t = torch.arange(config.context_length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


# Decoding on a CPU multiplies each weight by a few rows only (one token per sequence), and MKL runs such a
# matrix-vector product on one thread: a step then reads the weights at one core's memory bandwidth, however many
# threads torch has. `linear` cuts the weight's rows into one block per thread (a view, no copy) and multiplies the
# blocks in one bmm, which runs them side by side. Only without autograd, for a few float32 rows on the CPU and
# weights too big for the caches; otherwise nn.Linear. SmolLM2-135M's batch-1 decode on 2 threads (AMD EPYC, MKL):
# 20 -> 29 tokens/s; with SwiGLU's gate and up projections in one bmm over a copy laid out for it (`gate_up`),
# 33 tokens/s (llama.cpp: 58, benchmarks/decode_speed.py --gguf).
SPLIT_MAX_ROWS = 4
SPLIT_MIN_WEIGHT = 1 << 16  # elements; smaller weights stay in cache, where the split costs more than it gains

# SwiGLU fc_1 weight -> ((data_ptrs, versions, blocks), fc_1 and fc_2 transposed side by side, cut into blocks).
_GATE_UPS = WeakIdKeyDictionary()


def split_blocks(x: torch.Tensor, *layers: nn.Module) -> int:
    """The number of blocks (torch's threads) to cut these layers' matmul with x into; 0: use the layers as they are.
    Never under autograd nor torch.compile (which makes its own kernels, and would break its graph here)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return 0
    k = torch.get_num_threads()
    if k < 2 or x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() > SPLIT_MAX_ROWS * x.shape[-1]:
        return 0
    for layer in layers:
        if type(layer) is not nn.Linear:  # e.g. a LoRA adapter around one
            return 0
        w = layer.weight
        if w.dtype != torch.float32 or w.shape[0] % k or w.numel() < SPLIT_MIN_WEIGHT or not w.is_contiguous():
            return 0
    return k


def _blockwise(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (..., in) times k column blocks (k, in, out/k) in one bmm: (..., out), the blocks' columns in order."""
    k, n, m = blocks.shape
    rows = x.numel() // n
    y = torch.bmm(x.reshape(1, rows, n).expand(k, rows, n), blocks)  # (k, rows, out/k)
    y = y.view(k * m) if rows == 1 else y.transpose(0, 1)  # (rows, k, out/k)
    return y.reshape(*x.shape[:-1], k * m)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; an nn.Linear on a few float32 CPU rows without autograd: one block of its rows per thread."""
    k = split_blocks(x, layer)
    if not k:
        return layer(x)
    w = layer.weight
    y = _blockwise(x, w.view(k, w.shape[0] // k, w.shape[1]).transpose(1, 2))  # blocks: views of the weight's rows
    return y if layer.bias is None else y + layer.bias


def gate_up(mlp: SwiGLU, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fc_1(x), fc_2(x) in one bmm (see `linear`), over a copy of both weights transposed side by side (C, 2H) and
    cut into k contiguous column blocks: MKL reads that layout faster than views of the weights (SmolLM2: 29 -> 33
    tokens/s). The copy is made once per weight version and thread count and kept while fc_1's weight lives: the
    two weights once more in memory."""
    w1, w2 = mlp.fc_1.weight, mlp.fc_2.weight
    key = (w1.data_ptr(), w1._version, w2.data_ptr(), w2._version, k)
    hit = _GATE_UPS.get(w1)
    if hit is None or hit[0] != key:
        H, C = w1.shape
        blocks = torch.cat((w1, w2)).t().reshape(C, k, 2 * H // k).transpose(0, 1).contiguous()  # (k, C, 2H/k)
        hit = _GATE_UPS[w1] = (key, blocks)
    gate, up = _blockwise(x, hit[1]).chunk(2, dim=-1)  # (..., H) each
    if mlp.fc_1.bias is not None:
        gate, up = gate + mlp.fc_1.bias, up + mlp.fc_2.bias
    return gate, up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, n, T, hs) by the angles of its positions; cos, sin: (T, hs) or (B, 1, T, hs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated to `max_len` (B, nkv, max_len, hs).

    A call with fewer rows than the cache has uses its first rows. `rows(first, n)` is a view of some rows, as a
    cache of its own that writes into this one's memory (a prompt prefilled alone into its row of a batch).
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_size: int, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at `slots`: (T,) for every row, or (B, T) each row its own; return the first B
        rows' keys and values up to the last slot written."""
        B = k.shape[0]
        if slots.dim() == 1:
            self.k[:B].index_copy_(2, slots, k.to(self.k.dtype))
            self.v[:B].index_copy_(2, slots, v.to(self.v.dtype))
            end = int(slots[-1]) + 1
        else:
            index = slots[:, None, :, None].expand_as(k)  # (B, nkv, T, hs)
            self.k[:B].scatter_(2, index, k.to(self.k.dtype))
            self.v[:B].scatter_(2, index, v.to(self.v.dtype))
            end = int(slots.max()) + 1
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def grow(self, max_len: int) -> None:
        """Lengthen every row to `max_len` slots, keeping what is stored (views from `rows` are not updated)."""
        B, nkv, old, hs = self.k.shape
        if max_len <= old:
            return
        for name in ("k", "v"):
            buf = getattr(self, name)
            longer = buf.new_zeros((B, nkv, max_len, hs))
            longer[:, :, :old] = buf
            setattr(self, name, longer)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` slots to row dst (a finished row's place goes to another)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def rows(self, first: int, n: int) -> KVCache:
        """Rows first..first+n-1 as a cache of their own, sharing this one's memory."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[first : first + n], persistent=False)
        view.register_buffer("v", self.v[first : first + n], persistent=False)
        return view


def _cache_mask(slots: torch.Tensor, T: int) -> torch.Tensor | None:
    """The attention mask of T new tokens written at cache `slots` ((T,) or (B, T)), made once for every layer: each
    token sees the cached slots up to its own (rows at their own slots: none of a longer row's past). None where
    no mask is needed: the first tokens of an empty cache (plain causal attention), or one token per row at one slot.
    """
    S = int(slots.max()) + 1
    if (T > 1 and S == T) or (T == 1 and slots.dim() == 1):
        return None
    mask = slots[..., :, None] >= torch.arange(S, device=slots.device)  # (T, S) or (B, T, S)
    return mask[:, None] if mask.dim() == 3 else mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        # q for nh heads, k and v for nkv heads, in one matmul
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_size, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # residual projection
        self.resid_drop = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        qk, v = linear(self.qkv, x).split(((nh + nkv) * hs, nkv * hs), dim=2)
        qk = qk.view(B, T, nh + nkv, hs).transpose(1, 2)  # (B, nh + nkv, T, hs): the query heads, then the key heads
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated in one go
        q, k = qk.split((nh, nkv), dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        is_causal = mask is None
        if self.kv_cache is not None:
            if slots is None:
                raise ValueError("with a KV cache, pass the positions (or cache slots) of the new tokens")
            k, v = self.kv_cache.update(slots, k, v)  # (B, nkv, S, hs), S = last slot + 1
            is_causal = mask is None and T > 1  # GPT.hidden: then the cache was empty (S == T)
        if T == 1 and nkv != nh and not (self.training and self.dropout):
            # One query per row: each key head's query heads go in as that head's rows (B, nkv, nh/nkv, hs), one
            # plain attention, instead of repeating keys and values for every query head (enable_gqa).
            y = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hs), k, v, attn_mask=mask)
            y = y.reshape(B, nh, 1, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
                enable_gqa=nkv != nh,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_drop(linear(self.proj, y))  # (B, T, C)


class MLP(nn.Module):
    """GPT-2's 4x GELU MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_size, bias=config.bias)
        self.proj = nn.Linear(config.mlp_size, config.n_embd, bias=config.bias)  # residual projection
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(linear(self.fc, x), approximate="tanh")  # (B, T, 4C); GPT-2 used the tanh approximation
        return self.drop(linear(self.proj, x))  # (B, T, C)


class SwiGLU(nn.Module):
    """Llama's MLP: proj(silu(fc_1(x)) * fc_2(x)) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.mlp_size, bias=config.bias)  # gate
        self.fc_2 = nn.Linear(config.n_embd, config.mlp_size, bias=config.bias)  # up
        self.proj = nn.Linear(config.mlp_size, config.n_embd, bias=config.bias)  # down, residual projection
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = split_blocks(x, self.fc_1, self.fc_2)
        gate, up = gate_up(self, k, x) if k else (self.fc_1(x), self.fc_2(x))  # (B, T, H) each
        return self.drop(linear(self.proj, F.silu(gate) * up))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), mask, rope, slots)  # (B, T, C)
        x = x + self.mlp(self.norm_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.context_length, config.n_embd)  # learned position embedding
        else:
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (context_length, hs)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
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
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states (B, T, C), before the LM head: callers that need the head at a few
        positions only (benchmark scoring) apply `lm_head` there and skip the rest of the (T, V) logits.

        Args: idx (B, T) token ids.
        positions: (T,) or (B, T) position ids instead of 0..T-1, and mask: a boolean (T, T) or (B, 1, T, T)
            attention mask (True = may attend) instead of the causal one. Together they let several
            sequences share a prefix in one row (benchmark scoring packs a context with all its choices).
        slots: with a KV cache, the cache slots the new tokens go to, (T,) for every row or (B, T); None: the
            positions. Rows of different lengths in one cache (each from slot 0, its slots its positions) need a
            (B, 1, T, S) mask over the S = last slot + 1 cached slots that hides each row's slots past its length.
        """
        positions = self._positions(idx.shape[1], positions, idx.device)
        x = self._embed(idx, positions)  # (B, T, C)
        if self.blocks[0].attn.kv_cache is None:
            slots = None
        else:
            slots = positions if slots is None else slots
            mask = _cache_mask(slots, idx.shape[1]) if mask is None else mask
        rope = self._rope(positions)
        for block in self.blocks:
            x = block(x, mask, rope, slots)  # (B, T, C)
        return self.norm_f(x)  # (B, T, C)

    def prefix(self, idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The residual stream (B, T, C) after the first `n_blocks` blocks, causal, positions 0..T-1 (no cache).

        With `suffix`: the frozen blocks of a fine-tuning run are computed once per example (a right-padded row's
        real tokens never see its padding), and each step runs only the blocks that train:
        `suffix(prefix(idx, k), k) == hidden(idx)`.
        """
        positions = self._positions(idx.shape[1], None, idx.device)
        x = self._embed(idx, positions)  # (B, T, C)
        rope = self._rope(positions)
        for block in self.blocks[:n_blocks]:
            x = block(x, None, rope)
        return x

    def suffix(self, x: torch.Tensor, first_block: int) -> torch.Tensor:
        """The final-norm hidden states (B, T, C) of a residual stream from `prefix(idx, first_block)`: the blocks
        from `first_block` on, causal, positions 0..T-1 (no cache)."""
        rope = self._rope(self._positions(x.shape[1], None, x.device))
        for block in self.blocks[first_block:]:
            x = block(x, None, rope)
        return self.norm_f(x)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C), plus learned position embeddings at `positions`, through dropout."""
        x = self.wte(idx)
        if self.config.positions == "learned":
            x = x + self.wpe(positions)  # + (T, C) or (B, T, C)
        return self.drop(x)

    def _positions(self, T: int, positions: torch.Tensor | None, device) -> torch.Tensor:
        """positions, checked against the context; None: 0..T-1."""
        if positions is None:
            if T > self.config.context_length:
                raise ValueError(f"sequence length {T} exceeds the model's context_length {self.config.context_length}")
            return torch.arange(T, device=device)  # (T,)
        if int(positions.max()) >= self.config.context_length:
            raise ValueError(f"position {int(positions.max())} exceeds the model's context_length {self.config.context_length}")
        return positions

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin at `positions` ((T,) -> (T, hs); (B, T) -> (B, 1, T, hs)); None with learned positions."""
        if self.config.positions == "learned":
            return None
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        return (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))

    def set_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Give every attention layer a key/value cache for `batch_size` sequences of up to `max_len` tokens."""
        max_len = max_len or self.config.context_length
        device = self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.config.kv_heads, max_len, self.config.head_size, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def replace_head(self, n_out: int) -> None:
        """Swap the LM head for a fresh `n_out`-way linear head with a bias (classification, book ch. 6).

        The new head is never tied to the token embedding, so the config says `tie_weights: false`.
        """
        self.lm_head = nn.Linear(self.config.n_embd, n_out, bias=True).to(self.wte.weight.device)
        self._init_weights(self.lm_head)
        self.config = self.config.model_copy(update={"tie_weights": False})

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, each shared tensor counted once.

        non_embedding=True leaves out the lookup-only tables: the learned position embedding, the token
        embedding only when it is not tied (a tied one is also the LM head's matmul weight), as nanoGPT.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            if self.config.positions == "learned":
                n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n
