"""LoRA: identity at init, exact merge, only adapters train, parameter counts, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmcore.checkpoint import load_model, save_model
from lmcore.config import ModelConfig
from lmcore.finetune.lora import LoRALinear, apply_lora, count_parameters, lora_state_dict, merge_lora
from lmcore.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
RANK = 4


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**dict(vocab_size=97, context_length=16, n_embd=32, n_layer=2, n_head=2), **overrides}))


def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


def randomise_adapters(model: nn.Module) -> None:
    """B starts at zero; give it values so the adapters change the output."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def lora_gpt(dropout: float = 0.0) -> GPT:
    model = tiny_gpt()
    apply_lora(model, rank=RANK, alpha=8, dropout=dropout, target_modules=TARGETS)
    return model


def test_fresh_adapter_is_the_identity():
    model, idx = tiny_gpt().eval(), tokens()
    before = model(idx)[0]
    wrapped = apply_lora(model, rank=RANK, alpha=8, dropout=0.0, target_modules=TARGETS)
    assert wrapped == [f"blocks.{i}.{t}" for i in range(2) for t in TARGETS]
    assert torch.equal(model(idx)[0], before)


def test_parameter_names_inside_a_wrapped_module():
    names = {n for n, _ in lora_gpt().named_parameters()}
    assert {"blocks.0.attn.qkv.base.weight", "blocks.0.attn.qkv.base.bias",
            "blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_B"} <= names
    assert set(lora_state_dict(lora_gpt())) == {f"blocks.{i}.{t}.lora_{ab}" for i in range(2) for t in TARGETS for ab in "AB"}


def test_layer_forward_matches_hand_computation():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), rank=2, alpha=3.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    W, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B
    assert layer.scaling == 1.5
    assert A.shape == (2, 6) and B.shape == (5, 2)
    torch.testing.assert_close(layer(x), x @ (W + B @ A * 1.5).T + b)
    torch.testing.assert_close(layer.delta_weight(), B @ A * 1.5)
    assert not W.requires_grad and not b.requires_grad and A.requires_grad and B.requires_grad


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_merge_equals_unmerged_and_restores_state_dict(dropout):
    model, idx = lora_gpt(dropout), tokens()
    randomise_adapters(model)
    model.eval()
    plain = tiny_gpt().eval()(idx)[0]
    unmerged = model(idx)[0]
    assert not torch.allclose(unmerged, plain, atol=1e-4)  # the adapters matter

    merged = merge_lora(model)
    assert merged is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(idx)[0], unmerged, atol=1e-5, rtol=1e-5)
    fresh = tiny_gpt().state_dict()
    assert list(model.state_dict()) == list(fresh)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.items()}
    assert not model.blocks[0].attn.qkv.weight.requires_grad


def test_merged_model_saves_and_loads(tmp_path):
    model, idx = lora_gpt(), tokens()
    randomise_adapters(model)
    merge_lora(model).eval()
    save_model(model, tmp_path)
    torch.testing.assert_close(load_model(tmp_path)(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_only_adapters_train():
    model, idx = lora_gpt(), tokens()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):  # A's gradient is zero while B is zero; B moves first
            assert not torch.equal(p, before[n]), n
        elif not n.endswith("lora_A"):
            assert torch.equal(p, before[n]), n  # base weights, wte, norms: bit-identical
            assert p.grad is None, n


def test_count_parameters():
    model = tiny_gpt()
    base_total = model.num_params()
    assert count_parameters(model) == (base_total, base_total)
    apply_lora(model, rank=RANK, alpha=8, dropout=0.0, target_modules=TARGETS)
    # rank * (in + out) per layer: qkv 32->96, attn.proj 32->32, mlp.fc 32->128, mlp.proj 128->32; two blocks
    per_block = RANK * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert count_parameters(model) == (2 * per_block, base_total + 2 * per_block)
    assert base_total == sum(p.numel() for n, p in tiny_gpt().named_parameters() if n != "lm_head.weight")  # tied: once


def test_dropout_only_on_adapter_path():
    model, idx = lora_gpt(dropout=0.5), tokens()
    randomise_adapters(model)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    # with B zero, dropout on the adapter input cannot change anything even in train mode
    zero = lora_gpt(dropout=0.5).train()
    assert torch.equal(zero(idx)[0], zero(idx)[0])


def test_untied_lm_head_can_be_adapted():
    model = tiny_gpt(tie_weights=False)
    assert apply_lora(model, rank=2, alpha=4, dropout=0.0, target_modules=["lm_head"]) == ["lm_head"]


def test_errors():
    with pytest.raises(ValueError, match=r"'attn\.nope'.*blocks\.0\.attn\.qkv"):
        apply_lora(tiny_gpt(), rank=RANK, alpha=8, dropout=0.0, target_modules=["attn.qkv", "attn.nope"])
    with pytest.raises(ValueError, match="lm_head.*tied"):
        apply_lora(tiny_gpt(), rank=RANK, alpha=8, dropout=0.0, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="rank"):
        apply_lora(tiny_gpt(), rank=0, alpha=8, dropout=0.0, target_modules=TARGETS)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(tiny_gpt(), rank=RANK, alpha=0, dropout=0.0, target_modules=TARGETS)
    with pytest.raises(ValueError, match="already"):
        apply_lora(lora_gpt(), rank=RANK, alpha=8, dropout=0.0, target_modules=TARGETS)


def test_failed_apply_leaves_model_untouched():
    model = tiny_gpt()
    with pytest.raises(ValueError):
        apply_lora(model, rank=RANK, alpha=8, dropout=0.0, target_modules=["attn.qkv", "lm_head"])
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
