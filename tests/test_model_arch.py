"""Architecture options and presets: GPT-2 and Llama-style blocks, grouped-query attention, RoPE, the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmcore.config import MODEL_PRESETS, ModelConfig, ParamsError, params_from_dict
from lmcore.model import GPT, RMSNorm, SwiGLU, apply_rope, rope_cache

# Parameter counts of the published models (tied head counted once; GPT-2 has no untied variant).
GPT2_PARAMS = {"gpt2-124m": 124_439_808, "gpt2-355m": 354_823_168, "gpt2-774m": 774_030_080, "gpt2-1558m": 1_557_611_200}


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_builds(name):
    cfg = ModelConfig(preset=name)
    with torch.device("meta"):  # shapes only: no memory for the large ones
        model = GPT(cfg)
    if name in GPT2_PARAMS:
        assert model.num_params() == GPT2_PARAMS[name]
    if name.startswith("llama"):
        assert isinstance(model.blocks[0].norm_1, RMSNorm) and isinstance(model.blocks[0].mlp, SwiGLU)
        assert not hasattr(model, "wpe") and model.lm_head.weight is not model.wte.weight
        assert all(not n.endswith(".bias") for n, _ in model.named_parameters())
        qkv_out = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_size
        assert model.blocks[0].attn.qkv.weight.shape == (qkv_out, cfg.n_embd) and cfg.kv_heads < cfg.n_head


def test_preset_fields_can_be_overridden_and_errors_name_the_preset():
    cfg = ModelConfig(preset="llama-tiny", n_layer=2, context_length=64)
    assert (cfg.n_layer, cfg.context_length, cfg.n_kv_head, cfg.norm) == (2, 64, 2, "rmsnorm")
    with pytest.raises(ValueError, match="unknown preset 'llama-tny' \\(did you mean 'llama-tiny'\\?\\)"):
        ModelConfig(preset="llama-tny")
    with pytest.raises(ValueError, match="n_head \\(8\\) must be divisible by n_kv_head \\(3\\)"):
        ModelConfig(preset="llama-tiny", n_kv_head=3)
    with pytest.raises(ParamsError, match="pretrain.model.norm"):
        params_from_dict({"collect": {"sources": [{"name": "x", "path": "x.txt"}]}, "pretrain": {"model": {"norm": "batchnorm"}}})


def test_grouped_query_attention_equals_repeated_key_value_heads():
    """GQA with nkv heads is multi-head attention whose k/v heads are each shared by nh/nkv query heads."""
    torch.manual_seed(0)
    gqa = GPT(ModelConfig(preset="llama-micro", vocab_size=64, n_head=4, n_kv_head=2)).eval()
    mha = GPT(ModelConfig(preset="llama-micro", vocab_size=64, n_head=4, n_kv_head=4)).eval()
    state = gqa.state_dict()
    hs, C = gqa.config.head_size, gqa.config.n_embd
    for i in range(gqa.config.n_layer):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split((4 * hs, 2 * hs, 2 * hs))
        repeat = lambda t: t.view(2, hs, C).repeat_interleave(2, dim=0).reshape(4 * hs, C)  # noqa: E731
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=0, atol=1e-5)


def test_rope_rotates_relative_positions():
    """q·k after RoPE depends on the distance between positions only."""
    cfg = ModelConfig(preset="llama-micro")
    cos, sin = rope_cache(cfg)
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, cfg.head_size), torch.randn(1, 1, 1, cfg.head_size)
    dot = lambda i, j: (apply_rope(q, cos[i : i + 1], sin[i : i + 1]) * apply_rope(k, cos[j : j + 1], sin[j : j + 1])).sum()  # noqa: E731
    torch.testing.assert_close(dot(3, 1), dot(12, 10))
    torch.testing.assert_close(dot(0, 0), (q * k).sum())


def test_rmsnorm_matches_the_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_()
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)


@pytest.mark.parametrize("preset", ["gpt2-micro", "llama-micro"])
def test_kv_cache_gives_the_full_forward_logits(preset):
    torch.manual_seed(0)
    model = GPT(ModelConfig(preset=preset, vocab_size=101)).eval()
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.set_kv_cache(batch_size=2)
        steps = [model(idx[:, :7], positions=torch.arange(7))[0]]  # prefill, then one token at a time
        steps += [model(idx[:, t : t + 1], positions=torch.tensor([t]))[0] for t in range(7, 20)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["gpt2-micro", "llama-micro"])
def test_both_architectures_train(preset):
    torch.manual_seed(0)
    model = GPT(ModelConfig(preset=preset, vocab_size=50))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(33).remainder(50).repeat(4, 1)  # a fixed sequence: learnable
    for _ in range(40):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * F.cross_entropy(torch.zeros(1, 50), torch.zeros(1, dtype=torch.long)).item()
