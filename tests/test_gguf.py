"""GGUF both ways (lmcore.gguf) against transformers' own GGUF loader: equal logits, equal token ids.

Tiny random models only (no download): a Llama-style model with grouped-query attention and a byte-level BPE
trained here (SmolLM2's pre-tokenizer), a GPT-2 with GPT-2's tiktoken vocabulary, and a GPT-2 with a small BPE.
Weights are drawn with a large std (0.3) so attention is far from uniform: a wrong q/k row permutation, head
order or transpose moves the logits by far more than the tolerances.

    python -m pytest tests/test_gguf.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcore.checkpoint import load_model, save_model
from lmcore.config import ModelConfig
from lmcore.errors import InputError
from lmcore.model import GPT
from lmcore.tokenizer import HFTokenizer, TiktokenTokenizer, get_tokenizer, load_tokenizer

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from lmcore.gguf import FastReader, export_gguf, import_gguf, open_gguf  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
Q = gguf.GGMLQuantizationType
F32_TOL = dict(atol=1e-4, rtol=0)
TEXTS = ["Hello world 12345", " leading spaces  and\n\nnewlines\t x", "café naïve 2024年 — ünïcödé 🙂",
         "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n", "don't won't it's", "x<|endoftext|>y"]
TRAIN = [
    "The quick brown fox jumps over the lazy dog 12345 times. Don't you think it's odd?",
    "Hello world! Café, naïve, façade: 2024年 is a year. ünïcödé and emoji 🙂 too.",
    "def f(x):\n    return x * 2  # double it\n\nprint(f(21))\n",
    "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n56<|im_end|>\n",
] * 8
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True)
def fast_gguf_reader(monkeypatch):
    """transformers opens each file with gguf.GGUFReader up to three times; lmcore's subclass reads the same
    values ~4x faster (test_fast_reader_reads_what_gguf_reads checks that), which keeps this file within seconds."""
    monkeypatch.setattr(gguf, "GGUFReader", FastReader)


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def _bpe(folder: Path, pre: str) -> HFTokenizer:
    """A byte-level BPE of ~300 tokens trained on TRAIN, with SmolLM2's special tokens, split before BPE as
    tokenizer.ggml.pre `pre` says (lmcore.gguf.PRE_TOKENIZERS)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmcore.gguf import PRE_TOKENIZERS, _pre_tokenizer

    tk = tokenizers.Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tk.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TRAIN, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    return HFTokenizer(folder / "tokenizer.json", name=f"bpe-{pre}", eos_token="<|im_end|>", bos_token="<|im_start|>",
                       chat_template=CHAT_TEMPLATE)


def _model_dir(folder: Path, cfg: ModelConfig, tok, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm weights around one
                p.normal_(1.0, 0.1)
    save_model(model, folder, extra={"tokenizer": tok.name})
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def llama_dir(work) -> Path:
    """Llama-style: GQA 4/2, untied head, no bias, vocabulary padded 3 past the tokenizer's; rows of 256 for K-quants."""
    tok = _bpe(work / "tok-smollm", "smollm")
    cfg = ModelConfig(vocab_size=tok.n_vocab + 3, context_length=32, n_embd=256, n_layer=2, n_head=4, n_kv_head=2,
                      intermediate_size=256, norm="rmsnorm", mlp="swiglu", positions="rope", rope_base=500.0,
                      bias=False, tie_weights=False)
    return _model_dir(work / "llama", cfg, tok)


@pytest.fixture(scope="module")
def llama_bias_dir(work) -> Path:
    """Llama-style with biases, a tied head and plain multi-head attention (transformers' GGUF loader drops biases)."""
    tok = _bpe(work / "tok-smollm-2", "smollm")
    cfg = ModelConfig(vocab_size=tok.n_vocab, context_length=32, n_embd=64, n_layer=2, n_head=2, intermediate_size=96,
                      norm="rmsnorm", mlp="swiglu", positions="rope", bias=True, tie_weights=True)
    return _model_dir(work / "llama-bias", cfg, tok, seed=1)


@pytest.fixture(scope="module")
def gpt2_dir(work) -> Path:
    """GPT-2 with GPT-2's own tiktoken vocabulary. context_length 1024: transformers' GGUF loader ignores
    gpt2.context_length and builds 1024 positions, so any other length fails to load there."""
    tok = get_tokenizer("gpt2", SHARED / "tokenizers" / "gpt2.tiktoken")
    cfg = ModelConfig(vocab_size=tok.n_vocab, context_length=1024, n_embd=32, n_layer=2, n_head=4)
    return _model_dir(work / "gpt2", cfg, tok, seed=2)


@pytest.fixture(scope="module")
def gpt2_bpe_dir(work) -> Path:
    """GPT-2 (untied head) with a small BPE split by GPT-2's regex: the gpt2 layout without a 50k vocabulary."""
    tok = _bpe(work / "tok-gpt2", "gpt-2")
    cfg = ModelConfig(vocab_size=tok.n_vocab, context_length=1024, n_embd=64, n_layer=2, n_head=4, tie_weights=False)
    return _model_dir(work / "gpt2-bpe", cfg, tok, seed=3)


@pytest.fixture(scope="module")
def exported(work, llama_dir, gpt2_dir, gpt2_bpe_dir) -> dict[str, Path]:
    files = {}
    for name, folder, dtypes in (("llama", llama_dir, ("f32", "f16", "bf16", "q8_0")), ("gpt2", gpt2_dir, ("f32",)),
                                 ("gpt2-bpe", gpt2_bpe_dir, ("f32",))):
        for dtype in dtypes:
            out = work / "gguf" / f"{name}.{dtype}.gguf"
            summary = export_gguf(folder, out, dtype=dtype)
            assert summary["path"] == str(out) and out.is_file() and summary["dtype"] == dtype
            files[f"{name}.{dtype}"] = out
    return files


def _hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Export: transformers reads what we write


@pytest.mark.parametrize("key", ["llama.f32", "gpt2.f32", "gpt2-bpe.f32"])
def test_export_f32_gives_transformers_the_same_logits(exported, key, llama_dir, gpt2_dir, gpt2_bpe_dir):
    folder = {"llama": llama_dir, "gpt2": gpt2_dir, "gpt2-bpe": gpt2_bpe_dir}[key.split(".")[0]]
    ours = load_model(folder)
    idx = _ids(ours.config.vocab_size)
    torch.testing.assert_close(_logits(_hf_model(exported[key]), idx), _logits(ours, idx), **F32_TOL)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_export_lower_precision_is_the_model_rounded(exported, llama_dir, work, dtype):
    """transformers and lmcore read the same rounded weights alike; the rounding stays small against the original."""
    path = exported[f"llama.{dtype}"]
    reader = open_gguf(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"  # norms stay F32
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["token_embd.weight"] == dtype.upper()
    imported = import_gguf(path, work / f"from-{dtype}")
    assert imported["tensor_types"][dtype.upper()] == 16
    ours, original = load_model(work / f"from-{dtype}"), load_model(llama_dir)
    idx = _ids(ours.config.vocab_size, seed=1)
    ref = _logits(original, idx)
    torch.testing.assert_close(_logits(_hf_model(path), idx), _logits(ours, idx), **F32_TOL)
    rounding = (_logits(ours, idx) - ref).abs().max() / ref.abs().max()
    # seen: f16 0.009, bf16 0.17, q8_0 0.21 of the largest logit (std-0.3 random weights amplify rounding)
    assert 0 < rounding < {"f16": 3e-2, "bf16": 0.5, "q8_0": 0.5}[dtype], rounding


@pytest.mark.parametrize("key", ["llama.f32", "gpt2.f32"])
def test_transformers_tokenizer_from_our_gguf_encodes_alike(exported, key, llama_dir, gpt2_dir):
    tok = load_tokenizer(llama_dir if key.startswith("llama") else gpt2_dir)
    path = exported[key]
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert theirs.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text
    if tok.chat_template:
        assert theirs.chat_template == tok.chat_template
        assert theirs.eos_token == "<|im_end|>" and theirs.bos_token == "<|im_start|>"


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_other_pre_tokenizers_round_trip_and_match_transformers(work, pre):
    tok = _bpe(work / f"tok-{pre}", pre)
    cfg = ModelConfig(vocab_size=tok.n_vocab, context_length=16, n_embd=32, n_layer=1, n_head=2, norm="rmsnorm",
                      mlp="swiglu", positions="rope", bias=False)
    folder = _model_dir(work / f"llama-{pre}", cfg, tok)
    path = work / "gguf" / f"{pre}.gguf"
    export_gguf(folder, path)
    assert open_gguf(path).fields["tokenizer.ggml.pre"].contents() == pre
    import_gguf(path, work / f"back-{pre}")
    back = load_tokenizer(work / f"back-{pre}")
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text) == theirs.encode(text, add_special_tokens=False), text


def test_gpt2_merges_are_gpt2s(exported):
    """The merges derived from tiktoken's ranks are GPT-2's merges.txt: one per token after the 256 bytes, in rank
    order, each joining two lower-ranked tokens into that token."""
    reader = open_gguf(exported["gpt2.f32"])
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(merges) == 50000
    assert merges[:3] == ["Ġ t", "Ġ a", "h e"]  # GPT-2's merges.txt begins so
    assert all(a + b == tokens[256 + i] for i, (a, b) in enumerate(m.split(" ") for m in merges))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert tokens[50256] == "<|endoftext|>" and reader.fields["tokenizer.ggml.token_type"].contents()[50256] == 3


# ---------------------------------------------------------------------------------------------------------------
# Import: we read what llama.cpp's quantizers write as transformers does


def _random_k_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (gguf has no numpy quantizer for them) with small fp16 scales: (rows, bytes)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = lambda v: np.frombuffer(np.float16(v).tobytes(), np.uint8)  # noqa: E731
    if qtype == Q.Q6_K:  # ql, qh, int8 scales, then d
        data[..., 208:210] = scale(1e-3)
    else:  # d, dmin, then scales and quants
        data[..., 0:2], data[..., 2:4] = scale(2e-3), scale(1e-3)
    return data.reshape(rows, -1)


def _rewrite(src: Path, dst: Path, tensor=None, fields: dict | None = None, arch: str | None = None,
             extra: dict[str, np.ndarray] | None = None) -> Path:
    """Copy a GGUF, `tensor(name, float32 array)` -> (data, raw_dtype) or None (as it is), metadata overridden by
    `fields` {key: (value, GGUFValueType[, sub_type])} or dropped ({key: None}), `extra` tensors added."""
    reader = open_gguf(src)
    writer = gguf.GGUFWriter(dst, arch or reader.fields["general.architecture"].contents())
    fields = fields or {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in fields:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, spec in fields.items():
        if spec is not None:
            writer.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    for t in reader.tensors:
        new = None
        if tensor is not None:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
            new = tensor(t.name, w)
        if new is None:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        else:
            writer.add_tensor(t.name, new[0], raw_dtype=new[1])
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


QTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _quantizer(qtypes: list[str], rng: np.random.Generator):
    """Each 2-D tensor in turn as the next of `qtypes` (a mixed file, as llama.cpp's quantizer writes them)."""
    turn = iter(range(1 << 30))

    def quantize(name: str, w: np.ndarray):
        if w.ndim < 2:
            return None
        qtype = Q[qtypes[next(turn) % len(qtypes)]]
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            return _random_k_blocks(qtype, *w.shape, rng), qtype
        return gguf.quants.quantize(w, qtype), qtype
    return quantize


def test_import_quantized_llama_matches_transformers(exported, work):
    """One file, the 16 matrices in eight types, twice each; transformers dequantizes with the same gguf code."""
    path = _rewrite(exported["llama.f32"], work / "gguf" / "llama.mixed.gguf", tensor=_quantizer(QTYPES, np.random.default_rng(0)))
    summary = import_gguf(path, work / "llama-mixed")
    assert summary["tensor_types"] == {"F32": 5, **{q: 2 for q in QTYPES}}
    ours = load_model(work / "llama-mixed")
    idx = _ids(ours.config.vocab_size, seed=2)
    theirs = _logits(_hf_model(path), idx)
    torch.testing.assert_close(_logits(ours, idx), theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)


def test_import_quantized_gpt2_matches_transformers(exported, work):
    path = _rewrite(exported["gpt2-bpe.f32"], work / "gguf" / "gpt2-bpe.Q8_0.gguf",
                    tensor=_quantizer(["Q8_0"], np.random.default_rng(1)))
    import_gguf(path, work / "gpt2-bpe-q8")
    ours = load_model(work / "gpt2-bpe-q8")
    assert not ours.config.tie_weights
    idx = _ids(ours.config.vocab_size, seed=3)
    torch.testing.assert_close(_logits(ours, idx), _logits(_hf_model(path), idx), **F32_TOL)


# ---------------------------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("name", ["llama", "llama-bias", "gpt2", "gpt2-bpe"])
def test_round_trip_keeps_logits_and_tokenizer(work, exported, name, llama_dir, llama_bias_dir, gpt2_dir, gpt2_bpe_dir):
    folder = {"llama": llama_dir, "llama-bias": llama_bias_dir, "gpt2": gpt2_dir, "gpt2-bpe": gpt2_bpe_dir}[name]
    path = exported.get(f"{name}.f32") or Path(export_gguf(folder, work / "gguf" / f"{name}.f32.gguf")["path"])
    summary = import_gguf(path, work / f"round-{name}")
    back, original = load_model(work / f"round-{name}"), load_model(folder)
    assert back.config.kv_heads == original.config.kv_heads
    assert back.config.model_dump(exclude={"n_kv_head"}) == original.config.model_dump(exclude={"n_kv_head"})
    idx = _ids(original.config.vocab_size, seed=4)
    torch.testing.assert_close(_logits(back, idx), _logits(original, idx), atol=0, rtol=0)
    tok, before = load_tokenizer(work / f"round-{name}"), load_tokenizer(folder)
    assert [tok.encode(t) for t in TEXTS] == [before.encode(t) for t in TEXTS]
    assert tok.stop_tokens == before.stop_tokens and tok.chat_template == before.chat_template
    if name == "gpt2":  # exactly GPT-2's vocabulary: back to tiktoken, the very same ranks
        assert isinstance(tok, TiktokenTokenizer) and tok.same_as(before)
    else:
        assert isinstance(tok, HFTokenizer) and tok.n_vocab == original.config.vocab_size  # padded as llama.cpp pads
    config = json.loads((work / f"round-{name}" / "config.json").read_text())
    assert config["source"]["format"] == "gguf" and config["source"]["file"] == path.name
    assert config["source"]["architecture"] == summary["architecture"] == ("gpt2" if name.startswith("gpt2") else "llama")
    if name == "gpt2":
        return  # out again below: seconds for a 50k vocabulary; the gpt2 layout is covered by gpt2-bpe
    # and out again: the same tensors
    again = work / "gguf" / f"round-{name}-again.gguf"
    export_gguf(work / f"round-{name}", again)
    assert [t.data.tobytes() for t in open_gguf(again).tensors] == [t.data.tobytes() for t in open_gguf(path).tensors]


def test_fast_reader_reads_what_gguf_reads(exported, monkeypatch):
    monkeypatch.undo()  # the original gguf.GGUFReader
    path = exported["llama.q8_0"]
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert type(theirs) is not type(ours)
    assert list(ours.fields) == list(theirs.fields)
    assert all(ours.fields[k].contents() == theirs.fields[k].contents() for k in theirs.fields)
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == [(t.name, t.tensor_type, list(t.shape)) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing written


def _refused(call, *names: str) -> str:
    with pytest.raises(InputError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


def _s(value: str):
    return value, gguf.GGUFValueType.STRING, None


@pytest.mark.parametrize("case", ["mamba", "tensor-type", "truncated", "not-gguf", "missing", "vocab", "pre",
                                  "sentencepiece", "unknown-tensor", "rope-scaling"])
def test_import_refuses_bad_files_with_one_line(exported, work, case):
    src = exported["llama.f32"]
    bad = work / "bad" / f"{case}.gguf"
    bad.parent.mkdir(exist_ok=True)
    names = [str(bad)]
    if case == "mamba":
        _rewrite(src, bad, arch="mamba")
        names.append("'mamba'")
    elif case == "tensor-type":
        _rewrite(src, bad, tensor=lambda n, w: (w.astype(np.int32), Q.I32) if n == "blk.1.ffn_up.weight" else None)
        names += ["blk.1.ffn_up.weight", "I32"]
    elif case == "truncated":
        bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        names.append("truncated")
    elif case == "not-gguf":
        bad.write_text("not a model\n")
        names.append("not a GGUF file")
    elif case == "missing":
        names.append("no such file")
    elif case == "vocab":  # 400 tokens for an embedding of 303 rows
        reader = open_gguf(src)
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        types = reader.fields["tokenizer.ggml.token_type"].contents()
        more = 400 - len(tokens)
        arr = gguf.GGUFValueType.ARRAY
        _rewrite(src, bad, fields={
            "tokenizer.ggml.tokens": (tokens + [f"<extra{i}>" for i in range(more)], arr, gguf.GGUFValueType.STRING),
            "tokenizer.ggml.token_type": (types + [1] * more, arr, gguf.GGUFValueType.INT32)})
        names += ["400 tokens", "303"]
    elif case == "pre":
        _rewrite(src, bad, fields={"tokenizer.ggml.pre": _s("no-such-pre")})
        names.append("'no-such-pre'")
    elif case == "sentencepiece":
        _rewrite(src, bad, fields={"tokenizer.ggml.model": _s("llama")})
        names.append("tokenizer.ggml.model 'llama'")
    elif case == "unknown-tensor":
        _rewrite(src, bad, extra={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)})
        names.append("blk.0.attn_sinks.weight")
    elif case == "rope-scaling":
        _rewrite(src, bad, fields={"llama.rope.scaling.type": _s("yarn")})
        names.append("RoPE")
    dst = work / "bad" / f"out-{case}"
    _refused(lambda: import_gguf(bad, dst), *names)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".out-{case}")]  # no temporary folder left


def test_import_refuses_to_replace_another_folder(exported, work):
    dst = work / "bad" / "precious"
    dst.mkdir(parents=True)
    (dst / "notes.txt").write_text("mine")
    _refused(lambda: import_gguf(exported["llama.f32"], dst), str(dst), "refusing to replace")
    assert (dst / "notes.txt").read_text() == "mine"


def test_export_refusals(work, llama_dir, llama_bias_dir):
    out = work / "bad" / "refused.gguf"
    _refused(lambda: export_gguf(llama_dir, out, dtype="q4_k"), "'q4_k'", "f16")
    classifier = work / "bad" / "classifier"
    model = load_model(llama_bias_dir)
    save_model(model, classifier, extra={"head": {"type": "classifier", "labels": ["a", "b"]}})
    load_tokenizer(llama_bias_dir).save(classifier)
    _refused(lambda: export_gguf(classifier, out), "config.json", "classifier")
    no_tokenizer = work / "bad" / "no-tokenizer"
    save_model(model, no_tokenizer)
    _refused(lambda: export_gguf(no_tokenizer, out), str(no_tokenizer), "tokenizer")
    assert not out.exists()
    out.write_text("someone's notes")
    _refused(lambda: export_gguf(llama_dir, out), str(out), "not a GGUF file")
    assert out.read_text() == "someone's notes"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".refused.gguf")]


def test_export_refuses_a_pre_tokenizer_gguf_cannot_name(work, llama_bias_dir):
    folder = work / "bad" / "metaspace"
    model = load_model(llama_bias_dir)
    save_model(model, folder)
    config = json.loads((llama_bias_dir / "tokenizer.json").read_text())
    config["pre_tokenizer"] = {"type": "Whitespace"}
    (work / "bad" / "ws").mkdir(parents=True, exist_ok=True)
    (work / "bad" / "ws" / "tokenizer.json").write_text(json.dumps(config))
    HFTokenizer(work / "bad" / "ws" / "tokenizer.json", name="ws", eos_token="<|im_end|>").save(folder)
    message = _refused(lambda: export_gguf(folder, work / "bad" / "ws.gguf"), str(folder), "Whitespace")
    assert "llama.cpp would split text differently" in message


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_import_and_export(exported, work):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    src = exported["llama.q8_0"]
    done = runner.invoke(app, ["import-gguf", str(src), str(work / "cli-llama")])
    assert done.exit_code == 0, done.output
    assert "imported llama" in done.output and "Q8_0" in done.output and str(work / "cli-llama") in done.output
    out = work / "cli" / "llama.f16.gguf"
    done = runner.invoke(app, ["export-gguf", str(work / "cli-llama"), str(out), "--dtype", "f16"])
    assert done.exit_code == 0, done.output
    assert "exported llama" in done.output and "f16" in done.output and out.is_file()
    failed = runner.invoke(app, ["import-gguf", str(work / "cli" / "nothing.gguf"), str(work / "cli-none")])
    assert failed.exit_code == 2 and "no such file" in failed.output and "Traceback" not in failed.output
    failed = runner.invoke(app, ["export-gguf", str(work / "cli-llama"), str(out), "--dtype", "q3"])
    assert failed.exit_code == 2 and "'q3'" in failed.output
