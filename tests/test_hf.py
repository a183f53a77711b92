"""GPT-2 and Llama weights both ways against `transformers` (random-initialised: no hub download): equal logits.

In memory (to_hf / from_hf) and through folders (import_hf / export_hf, and the `lmcore import-hf` /
`lmcore export-hf` commands). Models are built with a large init (std 0.2-0.3) so attention is far from
uniform: a wrong RoPE base, head order or GQA grouping moves the logits by far more than the 1e-5 tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmcore.checkpoint import load_model, read_model_config, save_model
from lmcore.config import ModelConfig
from lmcore.hf import HFError, export_hf, from_hf_gpt2, import_hf, model_config_from_hf, to_hf_gpt2
from lmcore.model import GPT

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=0)  # float32, max abs difference


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def _gpt2(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=157, n_positions=24, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tie, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(tie: bool, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=151, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=24, rope_theta=500.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, initializer_range=0.3, **overrides,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _save_hf(hf, folder: Path, **kwargs) -> Path:
    hf.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# In memory


def test_lmcore_to_hf_gives_the_same_logits():
    torch.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=211, context_length=24, n_embd=48, n_layer=3, n_head=4)).eval()
    config, state = to_hf_gpt2(ours)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    hf.load_state_dict(state, strict=False)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied
    idx = torch.randint(0, 211, (2, 24))
    torch.testing.assert_close(_logits(hf, idx), _logits(ours, idx), **TOL)


def test_hf_to_lmcore_gives_the_same_logits():
    hf = _gpt2(tie=True, seed=1)
    ours = from_hf_gpt2(hf.config.to_dict(), hf.state_dict())
    idx = torch.randint(0, 157, (3, 24))
    torch.testing.assert_close(_logits(ours, idx), _logits(hf, idx), **TOL)
    # and back again: the round trip reproduces HF's state dict
    _, state = to_hf_gpt2(ours)
    for name, tensor in hf.state_dict().items():
        if name in state:
            torch.testing.assert_close(state[name], tensor)


def test_models_without_biases_cannot_be_exported_as_gpt2():
    with pytest.raises(HFError, match="bias: false"):
        to_hf_gpt2(GPT(ModelConfig(vocab_size=11, context_length=8, n_embd=8, n_layer=1, n_head=2, bias=False)))


# ---------------------------------------------------------------------------------------------------------------
# Folders: HF -> lmcore -> HF


@pytest.mark.parametrize(
    "make, tie",
    [(_gpt2, True), (_gpt2, False), (_llama, False), (_llama, True)],
    ids=["gpt2-tied", "gpt2-untied", "llama-gqa-untied", "llama-gqa-tied"],
)
def test_import_then_export_keeps_the_logits(tmp_path, make, tie):
    hf = make(tie=tie)
    src = _save_hf(hf, tmp_path / "hf")
    done = import_hf(src, tmp_path / "lm")
    assert done["model_type"] == hf.config.model_type
    ours = load_model(tmp_path / "lm")
    cfg, extra = read_model_config(tmp_path / "lm")
    assert cfg.tie_weights == tie and done["params"] == ours.num_params()
    assert extra["hf"]["model_type"] == hf.config.model_type
    if hf.config.model_type == "llama":
        assert (cfg.n_head, cfg.kv_heads, cfg.rope_base, cfg.bias) == (4, 2, 500.0, False)
    idx = torch.randint(0, hf.config.vocab_size, (2, 24))
    expected = _logits(hf, idx)
    torch.testing.assert_close(_logits(ours, idx), expected, **TOL)

    export_hf(tmp_path / "lm", tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(back) is type(hf)
    torch.testing.assert_close(_logits(back, idx), expected, **TOL)
    written = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert written["eos_token_id"] == hf.config.eos_token_id  # the source's special tokens come back
    with safe_open(tmp_path / "exported" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)  # a tied head is written once, as the embedding


def test_a_sharded_checkpoint_imports(tmp_path):
    hf = _llama(tie=False, seed=2)
    src = _save_hf(hf, tmp_path / "hf", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    import_hf(src, tmp_path / "lm")
    idx = torch.randint(0, 151, (2, 24))
    torch.testing.assert_close(_logits(load_model(tmp_path / "lm"), idx), _logits(hf, idx), **TOL)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(preset="llama-micro", vocab_size=97),
        ModelConfig(preset="llama-micro", vocab_size=97, bias=True, tie_weights=True, n_kv_head=1, rope_base=1000.0),
        ModelConfig(vocab_size=97, context_length=16, n_embd=32, n_layer=2, n_head=2),
        ModelConfig(vocab_size=97, context_length=16, n_embd=32, n_layer=2, n_head=2, intermediate_size=48, tie_weights=False, norm_eps=1e-6),
    ],
    ids=["llama-micro", "llama-bias-tied-mqa", "gpt2", "gpt2-untied-narrow-mlp"],
)
def test_a_fresh_lmcore_model_exports_and_loads_in_transformers(tmp_path, cfg):
    torch.manual_seed(3)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.3)
    save_model(ours, tmp_path / "lm")
    done = export_hf(tmp_path / "lm", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[done["model_type"]]
    assert hf.config.tie_word_embeddings == cfg.tie_weights
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    torch.testing.assert_close(_logits(hf, idx), _logits(ours, idx), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# What is refused


def test_unknown_model_type_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 10}))
    with pytest.raises(HFError, match=r"config\.json: model_type 'mistral' is not supported"):
        import_hf(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_refused_not_unpickled(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_gpt2(tie=True).config.to_dict()))
    (src / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    with pytest.raises(HFError, match=r"only pickled weights \(pytorch_model\.bin\).*never unpickles"):
        import_hf(src, tmp_path / "out")


@pytest.mark.parametrize(
    "edit",
    [
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
    ],
    ids=["rope_scaling", "rope_parameters"],
)
def test_scaled_rope_is_refused(tmp_path, edit):
    src = _save_hf(_llama(tie=False), tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(HFError, match=r"config\.json: rope_(scaling|parameters) has rope_type '(linear|llama3)'"):
        import_hf(src, tmp_path / "out")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"head_dim": 16}, "head_dim 16 != hidden_size / num_attention_heads"),
        ({"attention_bias": True}, "attention_bias True but mlp_bias False"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_llama_configs_lmcore_cannot_express_are_refused(edit, message):
    config = {**_llama(tie=False).config.to_dict(), **edit}
    with pytest.raises(HFError, match=message):
        model_config_from_hf(config)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    mixed = ModelConfig(vocab_size=11, context_length=8, n_embd=8, n_layer=1, n_head=2, positions="rope")
    save_model(GPT(mixed), tmp_path / "mixed")
    with pytest.raises(HFError, match="positions: rope"):
        export_hf(tmp_path / "mixed", tmp_path / "out")
    classifier = GPT(ModelConfig(vocab_size=11, context_length=8, n_embd=8, n_layer=1, n_head=2))
    classifier.replace_head(2)
    save_model(classifier, tmp_path / "clf", extra={"head": {"type": "classifier", "labels": ["a", "b"]}})
    with pytest.raises(HFError, match="classifier"):
        export_hf(tmp_path / "clf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unrelated_folder_is_not_replaced(tmp_path):
    src = _save_hf(_gpt2(tie=True), tmp_path / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(HFError, match="refusing to replace"):
        import_hf(src, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    import_hf(src, tmp_path / "lm")
    import_hf(src, tmp_path / "lm")  # a previous import is replaced whole


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_import_and_export(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    hf = _llama(tie=False)
    src = _save_hf(hf, tmp_path / "hf")
    runner = CliRunner()
    imported = runner.invoke(app, ["import-hf", str(src), str(tmp_path / "lm")])
    assert imported.exit_code == 0, imported.output
    assert "imported llama" in imported.output and str(tmp_path / "lm") in imported.output
    exported = runner.invoke(app, ["export-hf", str(tmp_path / "lm"), str(tmp_path / "back")])
    assert exported.exit_code == 0, exported.output
    assert "exported llama" in exported.output
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    idx = torch.randint(0, 151, (1, 24))
    torch.testing.assert_close(_logits(back, idx), _logits(hf, idx), **TOL)

    (src / "model.safetensors").unlink()
    failed = runner.invoke(app, ["import-hf", str(src), str(tmp_path / "again")])
    assert failed.exit_code == 2 and "no model.safetensors" in failed.output and "Traceback" not in failed.output


def test_export_carries_the_models_tokenizer_for_transformers(tmp_path):
    """An exported folder loads in AutoTokenizer and encodes like the lmcore model's own tokenizer: GPT-2's tiktoken
    ranks as the byte-level BPE tokenizer.json they were made from, a Hugging Face tokenizer as it is."""
    from transformers import AutoTokenizer

    from lmcore.tokenizer import HFTokenizer, get_tokenizer
    from tests.test_tokenizer import SHARED, TEXTS, tiny_hf_tokenizer

    from lmcore.bpe import save_trained, train_bpe

    gpt2 = get_tokenizer("gpt2", SHARED / "tokenizers" / "gpt2.tiktoken")
    bpe = HFTokenizer(tiny_hf_tokenizer(tmp_path / "tokenizer.json"), name="tiny", eos_token="<|im_end|>")
    shakespeare = (SHARED / "data" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    trained = save_trained(train_bpe(shakespeare.split("\n\n"), vocab_size=400, special_tokens=["<|endoftext|>"]),
                           tmp_path / "trained-tok", name="bpe-400", eot="<|endoftext|>")  # the train_tokenizer stage's
    assert trained.fast is not None  # lmcore encodes it through tiktoken; transformers must agree
    for name, tok, cfg in (("gpt2", gpt2, ModelConfig(n_layer=1, n_embd=16, n_head=2, context_length=32)),
                           ("bpe", bpe, ModelConfig(vocab_size=320, n_layer=1, n_embd=16, n_head=2, context_length=32)),
                           ("trained", trained, ModelConfig(vocab_size=400, n_layer=1, n_embd=16, n_head=2, context_length=32))):
        save_model(GPT(cfg), tmp_path / name, extra={"tokenizer": tok.name})
        tok.save(tmp_path / name)
        export_hf(tmp_path / name, tmp_path / f"hf-{name}")
        theirs = AutoTokenizer.from_pretrained(tmp_path / f"hf-{name}")
        for text in TEXTS:
            assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode(text), (name, text)  # special tokens parsed
        assert theirs.convert_tokens_to_ids("<|endoftext|>") == tok.eot_token
