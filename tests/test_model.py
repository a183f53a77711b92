"""The GPT model (lmcore.model) and its folder on disk (lmcore.checkpoint), on micro configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from lmcore.checkpoint import CheckpointError, load_model, read_model_config, save_model
from lmcore.config import ModelConfig
from lmcore.model import GPT
from lmcore.paths import MODEL_CONFIG, RESOLVED_PARAMS, WEIGHTS

MICRO = dict(vocab_size=64, context_length=16, n_embd=32, n_layer=2, n_head=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def micro(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**MICRO, **overrides})).eval()


def tokens(B: int = 2, T: int = 16, V: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- model -------------------------------------------------------------------------------------


def test_forward_shapes():
    model = micro()
    idx = tokens(3, 10)
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 64)
    assert loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 64) and loss.shape == ()


def test_loss_is_cross_entropy_of_logits():
    model = micro()
    idx, targets = tokens(2, 16, seed=1), tokens(2, 16, seed=2)
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    # an untrained model predicts about uniformly: loss near ln(V)
    assert abs(loss.item() - math.log(64)) < 0.3


def test_causal_future_tokens_do_not_change_the_past():
    model = micro()
    idx = tokens(1, 16)
    changed = idx.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_tied_weights_share_storage():
    model = micro()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = micro(tie_weights=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_sequence_longer_than_context_is_an_error():
    model = micro()
    with pytest.raises(ValueError, match="context_length 16"):
        model(tokens(1, 17))


def test_param_count_matches_gpt2_124m():
    # Golden numbers: GPT-2 small has 124,439,808 parameters; nanoGPT reports 123.65M without wpe.
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(ModelConfig(vocab_size=50257, context_length=1024, n_embd=768, n_layer=12, n_head=12))
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_formula(bias: bool, tie: bool):
    V, ctx, C, L = 64, 16, 32, 2
    model = micro(bias=bias, tie_weights=tie)
    norm = 2 * C if bias else C
    # qkv 3C^2 (+3C), attn.proj C^2 (+C), fc 4C^2 (+4C), mlp.proj 4C^2 (+C), two norms
    block = 12 * C * C + (9 * C if bias else 0) + 2 * norm
    expected = V * C + ctx * C + L * block + norm + (0 if tie else V * C)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - ctx * C - (0 if tie else V * C)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, context_length=16, n_embd=64, n_layer=8, n_head=4))
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.norm_f.weight == 1)


def test_backward_reaches_every_parameter():
    model = micro().train()
    _, loss = model(tokens(), tokens(seed=2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_dropout_only_in_train_mode():
    model = micro(dropout=0.5)
    idx = tokens()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


# --- checkpoint --------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie: bool):
    model = micro(tie_weights=tie, bias=not tie)
    params = {"seed": 3, "pretrain": {"lr": 0.001}}
    save_model(model, tmp_path / "m", params=params, extra={"tokenizer": "gpt2"})

    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([WEIGHTS, MODEL_CONFIG, RESOLVED_PARAMS])
    meta = json.loads((tmp_path / "m" / MODEL_CONFIG).read_text())
    assert meta["format_version"] == 1 and meta["tokenizer"] == "gpt2"
    assert meta["model"] == model.config.model_dump()
    assert yaml.safe_load((tmp_path / "m" / RESOLVED_PARAMS).read_text()) == params
    config, extra = read_model_config(tmp_path / "m")
    assert config == model.config and extra == {"tokenizer": "gpt2"}

    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    idx = tokens()
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    if tie:
        assert loaded.lm_head.weight is loaded.wte.weight  # still one tensor after loading
        stored = load_file(tmp_path / "m" / WEIGHTS)
        assert "wte.weight" in stored and "lm_head.weight" not in stored  # stored once
    else:
        assert loaded.lm_head.weight.data_ptr() != loaded.wte.weight.data_ptr()


def test_same_weights_give_identical_files(tmp_path):
    # DVC and the registry hash model.safetensors: equal weights must give equal bytes
    # (safetensors' own save_model writes its metadata in a varying order; saved 5 times to catch that)
    files = []
    for i in range(5):
        save_model(micro(), tmp_path / str(i))
        files.append((tmp_path / str(i) / WEIGHTS).read_bytes())
    assert all(f == files[0] for f in files)


def test_save_model_overwrites_and_leaves_no_temp_files(tmp_path):
    save_model(micro(), tmp_path)
    save_model(micro(n_embd=16), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, MODEL_CONFIG])  # no params.yaml asked
    assert load_model(tmp_path).config.n_embd == 16


def test_reserved_extra_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_model(micro(), tmp_path, extra={"model": "x"})


def test_missing_key_is_an_error_naming_the_file(tmp_path):
    save_model(micro(), tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    del state["blocks.1.mlp.fc.bias"]
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing keys \['blocks\.1\.mlp\.fc\.bias'\]"):
        load_model(tmp_path)


def test_unexpected_key_is_an_error(tmp_path):
    save_model(micro(), tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    state["blocks.2.mlp.fc.bias"] = torch.zeros(128)
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks\.2\.mlp\.fc\.bias'\]"):
        load_model(tmp_path)


def test_corrupt_weights_are_an_error_naming_the_file(tmp_path):
    save_model(micro(), tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(tmp_path)


def test_config_that_does_not_match_the_weights_is_an_error(tmp_path):
    save_model(micro(), tmp_path)
    meta = json.loads((tmp_path / MODEL_CONFIG).read_text())
    meta["model"]["n_embd"] = 16
    (tmp_path / MODEL_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(tmp_path)


def test_unknown_format_version_is_an_error(tmp_path):
    save_model(micro(), tmp_path)
    meta = json.loads((tmp_path / MODEL_CONFIG).read_text())
    meta["format_version"] = 99
    (tmp_path / MODEL_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: format_version 99"):
        load_model(tmp_path)


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    save_model(micro(), tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_packed_prefix_equals_separate_sequences():
    """A context followed by two continuations in one row (positions restart, block-causal mask) gives the same
    logits as feeding context+continuation separately: what benchmark scoring relies on."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, context_length=32, n_embd=32, n_layer=2, n_head=2)).eval()
    ctx, a, b = torch.randint(0, 97, (5,)), torch.randint(0, 97, (3,)), torch.randint(0, 97, (4,))
    seg = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    positions = torch.cat([torch.arange(5), 5 + torch.arange(3), 5 + torch.arange(4)])
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    mask = causal & ((seg[:, None] == seg[None, :]) | (seg[None, :] == 0))
    with torch.no_grad():
        packed, _ = model(torch.cat([ctx, a, b])[None], positions=positions, mask=mask)
        la, _ = model(torch.cat([ctx, a])[None])
        lb, _ = model(torch.cat([ctx, b])[None])
    torch.testing.assert_close(packed[0, :8], la[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 8:], lb[0, 5:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([0, 32]))
