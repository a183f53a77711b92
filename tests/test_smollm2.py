"""The real SmolLM2-135M-Instruct (Q4_1 GGUF, ../shared/data/models) through lmcore.gguf, against transformers' own
GGUF loader on the same file: equal logits, equal token ids, a sensible greedy answer, and an f16 export back.

    python -m pytest -m slow tests/test_smollm2.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import load_model
from lmcore.generation import generate_text
from lmcore.tokenizer import HFTokenizer, load_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmcore.gguf import FastReader, export_gguf, import_gguf  # noqa: E402

pytestmark = pytest.mark.slow

SMOLLM2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
TEXTS = [
    PROMPT,
    "In 2024, 1234567 people paid $89.99 (3.5% off) at 10:45pm.",
    "café naïve Zürich — 東京 2024年, emoji 🙂👍🏽 and Ω≈ç√",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "don't won't it's I'm you're we've they'll he'd",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>lmcore<file_sep>x",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is not there")
    dst = tmp_path_factory.mktemp("smollm2") / "model"
    summary = import_gguf(SMOLLM2, dst)
    assert summary["architecture"] == "llama" and summary["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert summary["n_vocab"] == 49152 and 134_000_000 < summary["params"] < 136_000_000
    return dst


@pytest.fixture(scope="module")
def reference():
    """transformers' LlamaForCausalLM and tokenizer built from the same GGUF (the reader as in test_gguf.py)."""
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is not there")
    patch = pytest.MonkeyPatch()
    patch.setattr(gguf, "GGUFReader", FastReader)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name,
                                                                  dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    finally:
        patch.undo()
    return model, tok


def test_import_matches_transformers_logits(smollm2, reference):
    model, tok = reference
    ours = load_model(smollm2)
    cfg = ours.config
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.mlp_size, cfg.context_length) == (576, 30, 9, 3, 1536, 8192)
    assert (cfg.rope_base, cfg.norm_eps, cfg.tie_weights, cfg.bias) == (100000.0, 1e-5, True, False)
    idx = torch.tensor([tok.encode(PROMPT + " Paris. The capital of Italy is Rome.", add_special_tokens=False)])
    with torch.no_grad():
        theirs = model(idx).logits
        logits, _ = ours(idx)
    # both dequantize the same blocks in float32 (seen: max difference 0.0 on logits up to 27); transformers'
    # rms_norm_eps is float32's 9.99999975e-06 against lmcore's 1e-5, far below this tolerance
    torch.testing.assert_close(logits, theirs, atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(-1), theirs.argmax(-1))


def test_tokenizer_matches_transformers(smollm2, reference):
    _, theirs = reference
    tok = load_tokenizer(smollm2)
    assert isinstance(tok, HFTokenizer) and tok.n_vocab == 49152
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == theirs.decode(ids) == text
    assert tok.encode("2024") == [tok.encode_single_token(d) for d in "2024"]  # SmolLM2 splits digits one by one
    assert tok.encode_single_token("<|im_start|>") == 1 and tok.encode_single_token("<|im_end|>") == 2
    assert tok.eot_token == 0 and tok.stop_tokens == [0, 2]  # <|endoftext|> separates documents; <|im_end|> ends a turn
    assert tok.chat_template == theirs.chat_template and "<|im_start|>" in tok.chat_template
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    source = json.loads((smollm2 / "config.json").read_text())["source"]
    assert source["format"] == "gguf" and source["file"] == SMOLLM2.name and source["license"] == "apache-2.0"


def test_greedy_answer_names_paris(smollm2):
    model, tok = load_model(smollm2), load_tokenizer(smollm2)
    text = generate_text(model, tok, PROMPT, max_new_tokens=12, temperature=0)
    assert "Paris" in text, text


def test_export_f16_reads_back_in_transformers(smollm2, tmp_path):
    out = tmp_path / "smollm2.f16.gguf"
    summary = export_gguf(smollm2, out, dtype="f16")
    assert summary["tensor_types"] == {"F16": 211, "F32": 61}  # no output.weight: the head is tied
    ours = load_model(smollm2)
    tok = load_tokenizer(smollm2)
    idx = torch.tensor([tok.encode(PROMPT + " Paris.")])
    patch = pytest.MonkeyPatch()
    patch.setattr(gguf, "GGUFReader", FastReader)
    try:
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    finally:
        patch.undo()
    with torch.no_grad():
        logits, theirs = ours(idx)[0], back(idx).logits
    scale = float(logits.abs().max())
    # Q4_1-dequantized weights rounded to f16; seen: 0.033 on logits up to 27
    assert float((logits - theirs).abs().max()) < 5e-3 * scale
    assert torch.equal(logits.argmax(-1), theirs.argmax(-1))
    assert all(back_tok.encode(t, add_special_tokens=False) == tok.encode(t) for t in TEXTS)
    assert back_tok.chat_template == tok.chat_template
