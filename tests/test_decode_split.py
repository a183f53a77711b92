"""Decoding's matrix-vector products cut into one block per thread (lmcore.model.linear, SwiGLU's gate and up in one
bmm, the LM head in lmcore.generation.decode_head): nn.Linear's values up to float rounding, and used only where they
pay (no autograd, a few float32 rows on the CPU, big weights, more than one thread)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmcore.config import ModelConfig
from lmcore.finetune.lora import LoRALinear
from lmcore.generation import decode_head, generate
from lmcore.model import GPT, split_blocks, linear
from tests.conftest import torch_threads

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def _model(**overrides) -> GPT:
    """Llama-style, weights big enough to be split (qkv 384 x 256, gate/up 688 x 256), a 512-token vocabulary."""
    torch.manual_seed(0)
    return GPT(ModelConfig(preset="llama-tiny", vocab_size=512, n_layer=2, context_length=64, **overrides)).eval()


@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 1, 256), (4, 256), (1, 2, 256)])
def test_linear_equals_nn_linear(two_threads, shape):
    torch.manual_seed(0)
    layer = nn.Linear(256, 384)
    x = torch.randn(shape)
    with torch.no_grad():
        assert split_blocks(x, layer) == 2
        torch.testing.assert_close(linear(layer, x), layer(x), **TOL)


def test_split_only_where_it_pays(two_threads):
    big, small = nn.Linear(256, 384), nn.Linear(64, 64)
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert split_blocks(x, big) == 2
        assert split_blocks(torch.randn(5, 256), big) == 0  # many rows: a matrix-matrix product, MKL threads it
        assert split_blocks(torch.randn(1, 64), small) == 0  # in cache: the split costs more than it gains
        assert split_blocks(x.double(), big.double()) == 0
        assert split_blocks(x, nn.Linear(256, 385)) == 0  # rows not divisible by the thread count
        assert split_blocks(x, LoRALinear(big, rank=2, alpha=4)) == 0  # adapters run as they are
        torch.set_num_threads(1)
        assert split_blocks(x, big) == 0
    assert split_blocks(x, big) == 0  # autograd on: training never takes this path


@pytest.mark.parametrize("bias", [False, True])
def test_one_token_forward_equals_the_unsplit_model(two_threads, bias):
    """A forward pass on one token per row splits every matmul of the blocks; with autograd on nothing is split."""
    model = _model(bias=bias)
    idx = torch.randint(0, 512, (2, 1))
    with torch.no_grad():
        split, _ = model(idx)
    reference, _ = model(idx)
    torch.testing.assert_close(split, reference.detach(), **TOL)


def test_gate_up_copy_follows_the_weights(two_threads):
    model = _model()
    idx = torch.randint(0, 512, (1, 1))
    with torch.no_grad():
        before, _ = model(idx)
        model.blocks[0].mlp.fc_2.weight.mul_(2.0)  # a new version of the weight: the copy is made again
        after, _ = model(idx)
    reference, _ = model(idx)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference.detach(), **TOL)


def test_lm_head_blocks_equal_the_head(two_threads):
    model = _model()
    h = torch.randn(3, 256)
    with torch.no_grad():
        torch.testing.assert_close(decode_head(model)(h), model.lm_head(h), **TOL)
        torch.set_num_threads(1)  # another thread count: another copy, one block
        torch.testing.assert_close(decode_head(model)(h), model.lm_head(h), **TOL)


def test_greedy_tokens_do_not_depend_on_the_split(two_threads):
    model = _model()
    idx = torch.randint(0, 512, (1, 8))
    split = generate(model, idx, 16, temperature=0)
    torch.set_num_threads(1)
    assert torch.equal(generate(model, idx, 16, temperature=0), split)
