"""GPT-2 weights both ways against `transformers` (random-initialised: no hub download): equal logits."""

from __future__ import annotations

import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.hf import from_hf_gpt2, to_hf_gpt2
from lmcore.model import GPT

transformers = pytest.importorskip("transformers")


def test_lmcore_to_hf_gives_the_same_logits():
    torch.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=211, context_length=24, n_embd=48, n_layer=3, n_head=4)).eval()
    config, state = to_hf_gpt2(ours)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    hf.load_state_dict(state, strict=False)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied
    idx = torch.randint(0, 211, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=1e-5)


def test_hf_to_lmcore_gives_the_same_logits():
    torch.manual_seed(1)
    hf_config = transformers.GPT2Config(vocab_size=157, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = from_hf_gpt2(hf_config.to_dict(), hf.state_dict()).eval()
    idx = torch.randint(0, 157, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)
    # and back again: the round trip reproduces HF's state dict
    _, state = to_hf_gpt2(ours)
    for name, tensor in hf.state_dict().items():
        if name in state:
            torch.testing.assert_close(state[name], tensor)


def test_models_without_biases_cannot_be_exported():
    with pytest.raises(ValueError, match="bias"):
        to_hf_gpt2(GPT(ModelConfig(vocab_size=11, context_length=8, n_embd=8, n_layer=1, n_head=2, bias=False)))
