"""GGUF (llama.cpp's single-file format) both ways: a GGUF file <-> an lmcore model folder with its tokenizer.

    import_gguf("../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")
    export_gguf("models/smollm2", "smollm2.f16.gguf", dtype="f16")   # for llama.cpp, ollama, transformers' gguf_file=
    lmcore import-gguf ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
    lmcore export-gguf models/smollm2 smollm2.f16.gguf --dtype f16     # --dtype f32 (default), f16, bf16 or q8_0

Tests: `python -m pytest tests/test_gguf.py -q` (tiny random models, seconds) and
`python -m pytest -m slow tests/test_smollm2.py -q` (the real SmolLM2 file).

A GGUF file is untrusted input. FastReader checks every count and length against the bytes left before it reads
or allocates, the hyperparameters are checked (head counts here, plausible bounds and memory in lmcore.config)
before anything is dequantized, and anything wrong is one GGUFError line naming the file and the key, tensor or
offset; `python -m pytest tests/test_hostile_files.py -q` feeds the readers a few hundred mutated files.

Import dequantizes every tensor to float32 (gguf.quants: F32, F16, BF16, Q4_0 ... Q8_0, the K and IQ quants) and
goes through lmcore.hf: GGUF names -> Hugging Face names and config -> `from_hf`. Export is the reverse: `to_hf`
-> GGUF names. What llama.cpp's converter (convert_hf_to_gguf.py) does differently from Hugging Face, undone here:
    llama  the rows of attn_q and attn_k (weights and biases) are permuted for llama.cpp's interleaved RoPE:
           HF row order back is w.reshape(n, rows // n // 2, 2, ...).swapaxes(1, 2), n = n_head for q and
           n_kv_head for k; export applies the inverse. No output.weight: the head is tied to token_embd.
    gpt2   weights in nn.Linear's (out, in) layout, where HF's Conv1D stores (in, out); output.weight written
           even when tied (as llama.cpp's converter does; an output equal to token_embd imports as tied).
           transformers' GGUF loader ignores gpt2.context_length and builds 1024 positions: a GPT-2 with
           another context length loads in llama.cpp, not there.
    dims   GGUF lists a tensor's dimensions fastest-first (ne[0] = columns): numpy's shape reversed.
Export writes 2-D weights as `dtype` and keeps 1-D tensors (norms, biases) and position_embd in F32, as
llama.cpp's converter does; q8_0 falls back to F16 for a tensor whose rows are not whole 32-value blocks.

The tokenizer travels as GGUF metadata (tokenizer.ggml.*): a byte-level BPE ("gpt2" model) as tokens, merges and
token types; `tokenizer.ggml.pre` names the pre-tokenizer (the regex that splits text before BPE), which is spelled
out below as llama.cpp's llama-vocab.cpp applies each name. Import writes it as a Hugging Face tokenizer.json
(lmcore.tokenizer.HFTokenizer), or as GPT-2's tiktoken ranks when the vocabulary is exactly GPT-2's. SentencePiece
vocabularies (tokenizer.ggml.model "llama") are refused for now.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmcore.checkpoint import HEAD_KEY, load_model, read_model_config, save_model
from lmcore.errors import InputError, one_line
from lmcore.hf import GPT2, LLAMA, HFError, check_target, from_hf, model_config_from_hf, to_hf
from lmcore.io import atomic_dir, fsync_dir, sha256_file
from lmcore.paths import MODEL_CONFIG
from lmcore.tokenizer import (
    EOT,
    GPT2_N_RANKS,
    GPT2_RANKS_SHA256,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    byte_decoder,
    check_vocab,
    get_encoding,
    load_tokenizer,
    tiktoken_merges,
)

log = logging.getLogger(__name__)

# Key of an imported model's config.json: {"format": "gguf", "file", "sha256", "architecture", "name", "license"}.
SOURCE_KEY = "source"
GGUF_FORMAT = "gguf"
ARCHITECTURES = (LLAMA, GPT2)  # general.architecture values lmcore reads and writes
# export_gguf's choices, named as llama.cpp's converter names them (--outtype): the 2-D weights' type, general.file_type
DTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
GGUF_MAGIC = b"GGUF"

# tokenizer.ggml.token_type values (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenizers: tokenizer.ggml.pre <-> a Hugging Face pre-tokenizer, as a spec of (type, options...) steps.
# llama.cpp's llama-vocab.cpp: "smollm" (also starcoder, refact) splits every digit off, then GPT-2's regex;
# "llama-bpe" is Llama 3's regex (and takes a word that is itself a token whole: ignore_merges); "qwen2" is
# Llama 3's with single digits.

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_GPT2 = ("ByteLevel", True)  # ByteLevel with GPT-2's own regex
_BYTE_LEVEL_ONLY = ("ByteLevel", False)  # bytes to the byte alphabet, no splitting (after a Split)
PRE_TOKENIZERS: dict[str, tuple[tuple, ...]] = {
    "gpt-2": (_BYTE_LEVEL_GPT2,),
    "smollm": (("Digits", True), _BYTE_LEVEL_GPT2),
    "llama-bpe": (("Split", _LLAMA3_REGEX), _BYTE_LEVEL_ONLY),
    "qwen2": (("Split", _QWEN2_REGEX), _BYTE_LEVEL_ONLY),
}
PRE_ALIASES = {"starcoder": "smollm", "refact": "smollm", "llama3": "llama-bpe", "llama-v3": "llama-bpe",
               "smaug-bpe": "llama-bpe", "dbrx": "llama-bpe", "deepseek-r1-qwen": "qwen2"}
IGNORE_MERGES = {"llama-bpe"}

# ---------------------------------------------------------------------------------------------------------------
# Tensor names: GGUF (llama.cpp) <-> Hugging Face, at the top and per block (blk.{i}.<name> <-> <prefix>{i}.<name>).

_LLAMA_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
}
_GPT2_TOP = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
             "output.weight": "lm_head.weight"}
_GPT2_BLOCK = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
_GPT2_CONV1D = {"attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"}  # HF stores (in, out)
_TOP = {LLAMA: _LLAMA_TOP, GPT2: _GPT2_TOP}
_BLOCK = {LLAMA: _LLAMA_BLOCK, GPT2: _GPT2_BLOCK}
_BLOCK_PREFIX = {LLAMA: "model.layers.", GPT2: "transformer.h."}
_KEEP_F32 = ("position_embd.weight",)  # llama.cpp's converter never quantizes these


# Limits of the GGUF reader: a tensor's dimensions (llama.cpp's GGML_MAX_DIMS); and lmcore's own, as gguf's reader
# keeps a few small Python objects per key, tensor and array item (~100 bytes each): keys and tensors (real files
# have tens of keys and up to a few thousand tensors), and items of all metadata arrays together (a vocabulary's
# tokens, types and merges are 0.2-1M).
GGML_MAX_DIMS = 4
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY_ITEMS = 1 << 22
_MIN_KV_BYTES = 8 + 4 + 1  # a key's length, the value's type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # a name's length, n_dims, the type, the data offset
_INT64_MAX = (1 << 63) - 1


class GGUFError(InputError):
    """A GGUF file or an lmcore model that cannot be converted; the message names the file and what is refused."""


# ---------------------------------------------------------------------------------------------------------------
# Reading


class FastReader(gguf.GGUFReader):
    """gguf's reader, reading the header through a plain ndarray view of the same memory map, and checking every
    length and count against the bytes left before it reads or allocates (as llama.cpp's gguf_init_from_file does).

    gguf 0.19's GGUFReader slices its np.memmap once per metadata value; a memmap slice costs several times a plain
    array's, and a vocabulary is ~100k strings: 6 s against 1.5 s to open SmolLM2's file here. The values and the
    (still memory-mapped) tensor data are the same; tests/test_gguf.py compares the two readers.

    gguf's own reader trusts the file: a read past the end gives an empty array, so an array that claims 2^62 items
    loops forever on a 58-byte file while its list of parts grows. Here every count is checked against the bytes
    left first, and a file that cannot be what it claims is a GGUFError naming the file, the key or tensor, and
    the offset (tests/test_hostile_files.py feeds it mutated files).
    """

    def __init__(self, path: os.PathLike[str] | str, mode: str = "r"):
        self.src = Path(path)
        self._what = "the header"  # what is being read, for messages
        self._items = 0  # metadata array items so far
        super().__init__(path, mode)

    def _refuse(self, offset: int, problem: str) -> GGUFError:
        size = int(self.data.size)
        return GGUFError(f"{self.src}: truncated or malformed GGUF: {self._what} at offset {offset}: {problem} "
                         f"(the file has {size} bytes, {max(size - offset, 0)} after that offset)")

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dtype, count, offset = np.dtype(dtype), int(count), int(offset)
        n_bytes = dtype.itemsize * count
        if count < 0 or offset + n_bytes > plain.size:
            raise self._refuse(offset, f"needs {n_bytes} bytes")
        arr = plain[offset:offset + n_bytes].view(dtype)
        order = self.byte_order if override_order is None else override_order
        if order == "I" or (order == "<" and sys.byteorder == "little"):
            return arr  # already in the host's order
        return arr.view(arr.dtype.newbyteorder(order))

    def _fits(self, offset: int, count: int, min_bytes: int, what: str, limit: int) -> None:
        """Refuse `count` items of at least `min_bytes` each that the bytes left after `offset` cannot hold, or more
        than `limit` of them."""
        if count * min_bytes > int(self.data.size) - offset:
            raise self._refuse(offset, f"{count} {what} of at least {min_bytes} bytes each cannot fit")
        if count > limit:
            raise self._refuse(offset, f"{count} {what}, more than the {limit} lmcore reads")

    def _text(self, data: np.ndarray, offset: int) -> str:
        try:
            return str(bytes(data), encoding="utf-8")
        except UnicodeDecodeError as err:
            raise self._refuse(offset, f"a name that is not UTF-8 ({err.reason} at byte {err.start})") from None

    def _build_fields(self, offs: int, count: int) -> int:
        count = int(count)
        self._what = "GGUF.kv_count"
        self._fits(offs, count, _MIN_KV_BYTES, "key-value pairs", MAX_KEYS)
        for i in range(count):
            orig_offs = offs
            self._what = f"metadata key {i}"
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            key = self._text(kv_kdata, orig_offs)
            self._what = f"metadata {_short(key)}"
            if key in self.fields:
                raise self._refuse(orig_offs, "the key appears twice")
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            size, parts, idxs, types = self._get_field_parts(offs, raw_kv_type[0])
            self._push_field(gguf.ReaderField(orig_offs, key, [kv_klen, kv_kdata, raw_kv_type, *parts],
                                              [i + 3 for i in idxs], types), skip_sum=True)
            offs += size
        return offs

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        gtype = _member(gguf.GGUFValueType, raw_type)
        if gtype is None:
            raise self._refuse(orig_offs, f"unknown value type {int(raw_type)}")
        if gtype != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, gtype)  # a string (its length checked by _get) or a scalar
        # An array: its item type and count, checked against the bytes left before any item is read.
        offs = orig_offs
        raw_itype = self._get(offs, np.uint32)
        offs += int(raw_itype.nbytes)
        alen = self._get(offs, np.uint64)
        offs += int(alen.nbytes)
        itype, n = _member(gguf.GGUFValueType, raw_itype[0]), int(alen[0])
        if itype == gguf.GGUFValueType.STRING:
            min_bytes = 8  # each string's length
        elif itype in self.gguf_scalar_to_np:
            min_bytes = np.dtype(self.gguf_scalar_to_np[itype]).itemsize
        else:  # an unknown type, or an array of arrays, which llama.cpp refuses too
            raise self._refuse(orig_offs, f"an array of item type {int(raw_itype[0])}, which lmcore and llama.cpp do not read")
        self._fits(offs, n, min_bytes, "array items", MAX_ARRAY_ITEMS - self._items)  # of all arrays together
        self._items += n
        types = [gguf.GGUFValueType.ARRAY, itype]
        aparts: list[np.ndarray] = [raw_itype, alen]
        data_idxs: list[int] = []
        for _ in range(n):  # as gguf's reader: one part (two for a string) per item, which transformers reads
            size, parts, idxs, _ = super()._get_field_parts(offs, itype)
            first = len(aparts)
            aparts += parts
            data_idxs += (i + first for i in idxs)
            offs += size
        return offs - orig_offs, aparts, data_idxs, types

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list]:
        count = int(count)
        self._what = "GGUF.tensor_count"
        self._fits(offs, count, _MIN_TENSOR_INFO_BYTES, "tensor infos", MAX_TENSORS)
        fields = []
        for i in range(count):
            orig_offs = offs
            self._what = f"tensor info {i}"
            name_len, name_data = self._get_str(offs)
            offs += int(name_len.nbytes + name_data.nbytes)
            name = self._text(name_data, orig_offs)
            self._what = f"tensor {_short(name)}"
            n_dims = self._get(offs, np.uint32)
            if int(n_dims[0]) > GGML_MAX_DIMS:
                raise self._refuse(offs, f"{int(n_dims[0])} dimensions (GGUF tensors have up to {GGML_MAX_DIMS})")
            offs += int(n_dims.nbytes)
            dims = self._get(offs, np.uint64, n_dims[0])
            offs += int(dims.nbytes)
            raw_dtype = self._get(offs, np.uint32)
            offs += int(raw_dtype.nbytes)
            offset_tensor = self._get(offs, np.uint64)
            offs += int(offset_tensor.nbytes)
            fields.append(gguf.ReaderField(orig_offs, name, [name_len, name_data, n_dims, dims, raw_dtype, offset_tensor],
                                           [1, 3, 4, 5]))
        return offs, fields

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        """Each tensor's type, shape and data checked against the file before gguf's reader maps it."""
        size, names = int(self.data.size), set()
        for field in fields:
            _, _, _, dims, raw_dtype, offset_tensor = field.parts
            self._what = f"tensor {_short(field.name)}"
            if field.name in names:
                raise self._refuse(field.offset, "a second tensor of this name")
            names.add(field.name)
            qtype = _member(gguf.GGMLQuantizationType, raw_dtype[0])
            if qtype is None:
                raise self._refuse(field.offset, f"unknown tensor type {int(raw_dtype[0])}")
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            shape = [int(d) for d in dims]
            if any(d > _INT64_MAX for d in shape):
                raise self._refuse(field.offset, f"shape {shape} has a dimension over 2^63 - 1")
            if shape and shape[0] % block:
                raise self._refuse(field.offset, f"shape {shape} is not whole {qtype.name} rows of {block}-value blocks")
            n_bytes = math.prod(shape) // block * type_size
            offset = int(offset_tensor[0])
            if offset % self.alignment:
                raise self._refuse(field.offset, f"data offset {offset} is not a multiple of the alignment {self.alignment}")
            if start_offs + offset + n_bytes > size:
                raise self._refuse(start_offs + offset, f"{n_bytes} bytes of {qtype.name} data for shape {shape} run "
                                                         f"past the end of the file")
        self._what = "the tensors"
        super()._build_tensors(start_offs, fields)


def _member(enum: type, value) -> Any:
    """enum(value), or None when `value` names no member."""
    try:
        return enum(int(value))
    except ValueError:
        return None


def open_gguf(src: str | Path):
    """A `gguf.GGUFReader` of `src` (a FastReader); GGUFError naming the file when it is missing,
    not a GGUF file or truncated."""
    src = Path(src)
    if not src.is_file():
        raise GGUFError(f"{src}: no such file")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{src}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        return FastReader(src)
    except GGUFError:
        raise
    except Exception as err:  # noqa: BLE001 - the reader raises ValueError, IndexError, struct and numpy errors alike
        raise GGUFError(f"{src}: truncated or malformed GGUF ({type(err).__name__}: {one_line(err)})") from None


class _Metadata:
    """The key-value metadata of a GGUF file, read on demand; errors name the file and the key."""

    def __init__(self, reader, src: Path):
        self.fields, self.src = reader.fields, src

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except UnicodeDecodeError as err:
            raise GGUFError(f"{self.src}: metadata {key} is not UTF-8 text ({err.reason} at byte {err.start})") from None

    def require(self, key: str, kind: type, default: Any = None) -> Any:
        """The value of `key`, one `kind`; `default` when the file has no such key (None: the key is required)."""
        if key not in self.fields:
            if default is None:
                raise GGUFError(f"{self.src}: metadata {key} is missing")
            return default
        value = self.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind is float and isinstance(value, float) and self.fields[key].types[0] == gguf.GGUFValueType.FLOAT32:
            value = float(str(np.float32(value)))  # 1e-5 stored as float32 reads 9.9999997e-06: give back 1e-5
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise GGUFError(f"{self.src}: metadata {key} is {_short(value)}; lmcore expects one {kind.__name__} "
                            f"(per-layer values are not supported)")
        return value

    def text(self, key: str) -> str | None:
        """The text value of `key`, or None when the file has no such key."""
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise GGUFError(f"{self.src}: metadata {key} is {_short(value)}; expected text")
        return value

    def array(self, key: str, item: type) -> list | None:
        """The array value of `key`, every item one `item`, or None when the file has no such key."""
        value = self.get(key)
        if value is not None and not (isinstance(value, list) and all(
                isinstance(v, item) and isinstance(v, bool) == (item is bool) for v in value)):
            raise GGUFError(f"{self.src}: metadata {key} is {_short(value)}; expected an array of {item.__name__}")
        return value


def _short(value: Any) -> str:
    """repr(value), at most 80 characters, for messages (an array may hold 100k tokens)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _dequantize(tensor, src: Path) -> np.ndarray:
    """The tensor as float32 in numpy's (row-major) shape: GGUF's dims reversed."""
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        if qtype == gguf.GGMLQuantizationType.F64:
            data = np.asarray(tensor.data).view(np.float64).astype(np.float32)
        elif qtype in (gguf.GGMLQuantizationType.I8, gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I32,
                       gguf.GGMLQuantizationType.I64):
            raise NotImplementedError("integer tensors are not weights")
        else:
            data = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise GGUFError(f"{src}: tensor {tensor.name}: type {qtype.name} is not supported (lmcore dequantizes F32, F16, "
                        f"BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K and the IQ quants)") from None
    except (ValueError, TypeError) as err:
        raise GGUFError(f"{src}: tensor {tensor.name} ({qtype.name}, shape {shape}) cannot be read: {one_line(err)}") from None
    if data.size != int(np.prod(shape)):
        raise GGUFError(f"{src}: tensor {tensor.name}: {data.size} values for shape {shape} (truncated?)")
    return np.array(data.reshape(shape), dtype=np.float32, order="C")  # a copy: F32 data is a view of the memory map


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved-RoPE rows of attn_q / attn_k (or their bias) back to Hugging Face's rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half rows to llama.cpp's interleaved order (convert_hf_to_gguf.py's LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_heads(arch: str, n_embd: int, n_head: int, n_kv: int, src: Path) -> None:
    """Head counts that can be right, before anything divides by them; GGUFError naming the key otherwise."""
    key = f"{arch}.attention.head_count"
    if n_embd < 1:
        raise GGUFError(f"{src}: {arch}.embedding_length {n_embd}: a model needs a width of at least 1")
    for name, n in ((key, n_head), (f"{key}_kv", n_kv)):
        if n < 1:
            raise GGUFError(f"{src}: {name} {n}: a model needs at least one head")
    if n_embd % n_head:
        raise GGUFError(f"{src}: {key} {n_head} does not divide {arch}.embedding_length {n_embd} into whole heads")
    if n_head % n_kv:
        raise GGUFError(f"{src}: {key}_kv {n_kv} does not divide {key} {n_head}: each key/value head serves a whole "
                        f"group of query heads")


def _llama_config(meta: _Metadata, shapes: dict[str, tuple], src: Path) -> dict:
    """The Hugging Face LlamaConfig dict of a llama GGUF (its llama.* metadata and tensor shapes).

    Keys llama.cpp reads as optional take its defaults: head_count_kv = head_count, rope.freq_base 10000; a
    missing layer_norm_rms_epsilon is 1e-5, what llama.cpp's converter writes for Llama 2 and 3 and SmolLM2.
    """
    arch = LLAMA
    n_embd = meta.require(f"{arch}.embedding_length", int)
    n_head = meta.require(f"{arch}.attention.head_count", int)
    n_kv = meta.require(f"{arch}.attention.head_count_kv", int, default=n_head)
    _check_heads(arch, n_embd, n_head, n_kv, src)
    head = n_embd // n_head
    for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
        if key in meta and meta.require(key, int) != head:
            raise GGUFError(f"{src}: {key} {meta.get(key)} != embedding_length / head_count ({head}): lmcore's heads "
                            f"are n_embd / n_head wide and rotate whole")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in shapes:
        raise GGUFError(f"{src}: scaled RoPE ({scaling or 'rope_freqs.weight'}): lmcore implements unscaled RoPE only")
    if meta.get(f"{arch}.expert_count", 0):
        raise GGUFError(f"{src}: a mixture of experts ({arch}.expert_count {meta.get(f'{arch}.expert_count')}): not supported")
    bias = any(name.endswith(".bias") for name in shapes)
    return {
        "model_type": LLAMA,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": n_embd,
        "intermediate_size": meta.require(f"{arch}.feed_forward_length", int),
        "num_hidden_layers": meta.require(f"{arch}.block_count", int),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": meta.require(f"{arch}.context_length", int),
        "rms_norm_eps": meta.require(f"{arch}.attention.layer_norm_rms_epsilon", float, default=1e-5),
        "rope_theta": meta.require(f"{arch}.rope.freq_base", float, default=10000.0),
        "hidden_act": "silu",
        "attention_bias": bias,
        "mlp_bias": bias,
        "tie_word_embeddings": "output.weight" not in shapes,
    }


def _gpt2_config(meta: _Metadata, shapes: dict[str, tuple], src: Path) -> dict:
    """The Hugging Face GPT2Config dict of a gpt2 GGUF."""
    arch = GPT2
    n_embd = meta.require(f"{arch}.embedding_length", int)
    n_head = meta.require(f"{arch}.attention.head_count", int)
    _check_heads(arch, n_embd, n_head, n_head, src)
    if meta.get(f"{arch}.attention.head_count_kv", n_head) != n_head:
        raise GGUFError(f"{src}: {arch}.attention.head_count_kv != head_count: a GPT-2 has no grouped-query attention")
    return {
        "model_type": GPT2,
        "vocab_size": shapes["token_embd.weight"][0],
        "n_positions": meta.require(f"{arch}.context_length", int),
        "n_embd": n_embd,
        "n_layer": meta.require(f"{arch}.block_count", int),
        "n_head": n_head,
        "n_inner": meta.require(f"{arch}.feed_forward_length", int),
        "layer_norm_epsilon": meta.require(f"{arch}.attention.layer_norm_epsilon", float, default=1e-5),
        "activation_function": "gelu_new",
        "tie_word_embeddings": "output.weight" not in shapes,
    }


def _hf_name(arch: str, name: str, src: Path) -> str:
    if name in _TOP[arch]:
        return _TOP[arch][name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK[arch]:
        return f"{_BLOCK_PREFIX[arch]}{parts[1]}.{_BLOCK[arch][parts[2]]}"
    raise GGUFError(f"{src}: tensor {name}: lmcore's {arch} has no place for it")


def _read_model(reader, meta: _Metadata, src: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any]]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{src}: architecture {_short(arch)} is not supported; lmcore reads {' and '.join(map(repr, ARCHITECTURES))}")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    if len(shapes.get("token_embd.weight", ())) != 2:
        raise GGUFError(f"{src}: no token_embd.weight tensor of (vocabulary, width)")
    config = (_llama_config if arch == LLAMA else _gpt2_config)(meta, shapes, src)
    try:  # bounds and memory, before anything is dequantized or allocated
        cfg = model_config_from_hf(config, origin=str(src), names=_gguf_keys(arch))
    except HFError as err:
        raise GGUFError(str(err)) from None
    hf_names = [_hf_name(arch, t.name, src) for t in reader.tensors]  # refuse an unknown tensor before dequantizing
    state: dict[str, torch.Tensor] = {}
    types: Counter[str] = Counter()
    for tensor, hf in zip(reader.tensors, hf_names):
        name = tensor.name
        short = name.split(".", 2)[-1]
        n_rows = None  # the heads of a llama q or k projection, whose rows llama.cpp permuted
        if arch == LLAMA and short.startswith(("attn_q.", "attn_k.")):
            n_rows = cfg.n_head if short.startswith("attn_q.") else cfg.kv_heads
        if n_rows is not None and shapes[name][:1] != (n_rows * cfg.head_size,):
            raise GGUFError(f"{src}: tensor {name} has shape {shapes[name]}; {n_rows} heads of {cfg.head_size} make "
                            f"{n_rows * cfg.head_size} rows")
        w = _dequantize(tensor, src)
        types[tensor.tensor_type.name] += 1
        if n_rows is not None:
            w = _unpermute(w, n_rows)
        elif arch == GPT2 and short in _GPT2_CONV1D and name.startswith("blk."):
            w = np.ascontiguousarray(w.T)
        state[hf] = torch.from_numpy(w)
    lm_head, wte = state.get("lm_head.weight"), state[_TOP[arch]["token_embd.weight"]]
    if lm_head is not None and torch.equal(lm_head, wte):  # llama.cpp's GPT-2 files repeat the embedding as output
        config["tie_word_embeddings"] = True
        del state["lm_head.weight"]
    info = {"architecture": arch, "name": meta.text("general.name") or src.stem,
            "license": meta.text("general.license"), "tensor_types": dict(sorted(types.items()))}
    return config, state, info


def _gguf_keys(arch: str) -> dict[str, str]:
    """The GGUF key each ModelConfig field comes from, to name it in messages."""
    return {"vocab_size": "token_embd.weight rows", "context_length": f"{arch}.context_length",
            "n_embd": f"{arch}.embedding_length", "n_layer": f"{arch}.block_count",
            "n_head": f"{arch}.attention.head_count", "n_kv_head": f"{arch}.attention.head_count_kv",
            "intermediate_size": f"{arch}.feed_forward_length", "rope_base": f"{arch}.rope.freq_base",
            "norm_eps": f"{arch}.attention.layer_norm_{'rms_' if arch == LLAMA else ''}epsilon"}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: GGUF metadata -> tokenizer.json (or GPT-2's tiktoken ranks)


def _pre_tokenizer(spec: tuple[tuple, ...]):
    from tokenizers import Regex, pre_tokenizers

    steps = []
    for step in spec:
        if step[0] == "ByteLevel":
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=step[1]))
        elif step[0] == "Digits":
            steps.append(pre_tokenizers.Digits(individual_digits=step[1]))
        else:
            steps.append(pre_tokenizers.Split(Regex(step[1]), behavior="isolated", invert=False))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _gpt2_ranks(tokens: list[str], types: list[int]) -> bytes | None:
    """GPT-2's tiktoken ranks file when `tokens` is exactly GPT-2's vocabulary (then lmcore keeps its tiktoken
    tokenizer, whose sha256 other GPT-2 artifacts carry), else None. Tokens after <|endoftext|> may only be padding."""
    if len(tokens) <= GPT2_N_RANKS or tokens[GPT2_N_RANKS] != EOT or any(t != UNUSED for t in types[GPT2_N_RANKS + 1:]):
        return None
    table = byte_decoder()
    lines = []
    for rank, token in enumerate(tokens[:GPT2_N_RANKS]):
        if not all(c in table for c in token):
            return None
        lines.append(base64.b64encode(bytes(table[c] for c in token)) + b" " + str(rank).encode() + b"\n")
    data = b"".join(lines)
    return data if hashlib.sha256(data).hexdigest() == GPT2_RANKS_SHA256 else None


def _build_tokenizer(meta: _Metadata, src: Path, folder: Path, name: str, context_length: int) -> Tokenizer:
    """The tokenizer a GGUF's metadata describes, written into `folder` (tokenizer.json or tokenizer.tiktoken and
    tokenizer_config.json). Raises GGUFError naming the file for a tokenizer lmcore cannot rebuild exactly."""
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as RustTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{src}: carries no tokenizer (tokenizer.ggml.model / tokens); a model folder needs one")
    if kind != "gpt2":
        raise GGUFError(f"{src}: tokenizer.ggml.model {_short(kind)}: lmcore rebuilds byte-level BPE ('gpt2') tokenizers only")
    pre = meta.text("tokenizer.ggml.pre") or "gpt-2"  # files from before llama.cpp named pre-tokenizers: GPT-2's
    pre = PRE_ALIASES.get(pre, pre)
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{src}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer lmcore knows "
                        f"({', '.join(sorted({*PRE_TOKENIZERS, *PRE_ALIASES}))})")
    tokens: list[str] = meta.array("tokenizer.ggml.tokens", str)
    types: list[int] = meta.array("tokenizer.ggml.token_type", int) or [NORMAL] * len(tokens)
    merges: list[str] = meta.array("tokenizer.ggml.merges", str) or []
    if len(types) != len(tokens):
        raise GGUFError(f"{src}: {len(types)} token types for {len(tokens)} tokens")
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:
            raise GGUFError(f"{src}: token {token!r} appears twice (ids {seen[token]} and {i})")
        seen[token] = i

    def text(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise GGUFError(f"{src}: tokenizer.ggml.{key} {i!r} is not a token id (0..{len(tokens) - 1})")
        return tokens[i]

    bos, eos, unk, pad, eot = (text(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                                                  "eot_token_id"))
    # lmcore's eot_token separates documents and ends generated text; the file's own, else <|endoftext|>, else eos
    eot = eot or (EOT if EOT in seen else eos)
    template = meta.text("tokenizer.chat_template")
    if pre == "gpt-2" and not template and (ranks := _gpt2_ranks(tokens, types)) is not None:
        staged = folder / ".gguf-ranks.tiktoken"  # save() replaces tokenizer.tiktoken: stage the ranks beside it
        staged.write_bytes(ranks)
        try:
            tok: Tokenizer = TiktokenTokenizer(get_encoding("gpt2", staged), staged)
            tok.save(folder)
        finally:
            staged.unlink(missing_ok=True)
        return tok
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{src}: tokenizer.ggml.merges has {merge!r}, not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    try:
        bpe = models.BPE(vocab=seen, merges=pairs, ignore_merges=pre in IGNORE_MERGES)
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception (a merge of tokens not in the vocabulary)
        raise GGUFError(f"{src}: tokenizer.ggml.tokens and merges make no BPE: {one_line(err)[:200]}") from None
    rust = RustTokenizer(bpe)
    rust.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
    rust.decoder = decoders.ByteLevel()
    rust.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    rust.add_special_tokens(special)
    rust.add_tokens(added)
    if rust.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFError(f"{src}: the tokenizer rebuilt from {len(tokens)} tokens has {rust.get_vocab_size(True)}")
    path = folder / ".gguf-tokenizer.json"
    rust.save(str(path))
    try:
        tok = HFTokenizer(
            path, name=name, eot_token=eot, bos_token=bos, eos_token=eos, chat_template=template,
            extra_config={"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                          "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                          "unk_token": unk, "pad_token": pad, "model_max_length": context_length},
        )
        tok.save(folder)
    finally:
        path.unlink(missing_ok=True)
    return tok


def import_gguf(src: str | Path, dst_dir: str | Path, *, name: str | None = None) -> dict[str, Any]:
    """Convert a GGUF file (llama or gpt2, any dequantizable tensor type) into an lmcore model folder (float32).

    Args:
        src: the .gguf file.
        dst_dir: the lmcore model folder to write, with the tokenizer; replaced whole if it is one already.
        name: what to call the model and its tokenizer; default the file's general.name.
    Returns: {"architecture", "name", "params", "tensor_types": {type: count}, "tokenizer", "n_vocab", "path"}.
    Raises: GGUFError (an InputError) naming the file and what is refused; TokenizerError when the tokenizer has
        more tokens than the model's embedding. Nothing is written then.
    """
    src, dst = Path(src), Path(dst_dir)
    reader = open_gguf(src)
    meta = _Metadata(reader, src)
    check_target(dst, "format_version", "an lmcore model folder")
    config, state, info = _read_model(reader, meta, src)
    info["name"] = name or info["name"]
    model = from_hf(config, state, origin=str(src))
    del state
    cfg = model.config
    with atomic_dir(dst) as tmp:
        tok = _build_tokenizer(meta, src, tmp, info["name"], cfg.context_length)
        check_vocab(tok, cfg.vocab_size, str(src))
        source = {"format": GGUF_FORMAT, "file": src.name, "sha256": sha256_file(src), "architecture": info["architecture"],
                  "name": info["name"], **({"license": info["license"]} if info["license"] else {})}
        save_model(model, tmp, extra={"tokenizer": tok.name, SOURCE_KEY: source})
    log.info("imported %s (%s) from %s into %s", info["name"], info["architecture"], src, dst)
    return {"architecture": info["architecture"], "name": info["name"], "params": model.num_params(),
            "tensor_types": info["tensor_types"], "tokenizer": tok.name, "n_vocab": tok.n_vocab, "path": str(dst)}


# ---------------------------------------------------------------------------------------------------------------
# Writing




def _tokenizer_metadata(tok: Tokenizer, vocab_size: int, where: str) -> dict[str, Any]:
    """tokenizer.ggml.* and tokenizer.chat_template of an lmcore tokenizer, tokens padded to the model's vocabulary."""
    spell = {b: c for c, b in byte_decoder().items()}
    meta: dict[str, Any] = {"model": "gpt2", "add_bos_token": False, "add_eos_token": False}
    if isinstance(tok, TiktokenTokenizer):
        ranks = tok.enc._mergeable_ranks  # noqa: SLF001 - tiktoken keeps no public accessor
        tokens = [""] * tok.n_vocab
        types = [NORMAL] * tok.n_vocab
        for token, rank in ranks.items():
            tokens[rank] = "".join(spell[b] for b in token)
        for text, i in tok.enc._special_tokens.items():  # noqa: SLF001
            tokens[i], types[i] = text, CONTROL
        merges = tiktoken_merges(tok)
        meta.update(pre="gpt-2", merges=[f"{''.join(spell[b] for b in a)} {''.join(spell[b] for b in b_)}" for a, b_ in merges],
                    bos=tok.eot_token, eos=tok.eot_token)
    elif isinstance(tok, HFTokenizer):
        from tokenizers import Tokenizer as RustTokenizer

        config = json.loads(Path(tok.path).read_text(encoding="utf-8"))
        model = config.get("model") or {}
        if model.get("type") != "BPE":
            raise GGUFError(f"{where}: tokenizer model {model.get('type')!r}: lmcore writes byte-level BPE tokenizers only")
        if config.get("normalizer"):
            raise GGUFError(f"{where}: the tokenizer has a normalizer ({config['normalizer'].get('type')}), which GGUF "
                            f"cannot express")
        pre = _pre_name(config.get("pre_tokenizer"), where)
        if bool(model.get("ignore_merges")) != (pre in IGNORE_MERGES):
            raise GGUFError(f"{where}: ignore_merges {bool(model.get('ignore_merges'))} with pre-tokenizer {pre!r}: "
                            f"llama.cpp would tokenize differently")
        rust = RustTokenizer.from_str(json.dumps(config))
        n = rust.get_vocab_size(with_added_tokens=True)
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [UNUSED] * n
        for text, i in rust.get_vocab(with_added_tokens=True).items():
            tokens[i], types[i] = text, NORMAL
        for i, added in rust.get_added_tokens_decoder().items():
            types[i] = CONTROL if added.special else USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        extra = tok.extra_config
        meta.update(pre=pre, merges=merges, bos=tok.bos_token, eos=tok.eos_token,
                    add_bos_token=bool(extra.get("add_bos_token", False)), add_eos_token=bool(extra.get("add_eos_token", False)))
        for key in ("pad", "unk"):
            text = extra.get(f"{key}_token")
            text = text.get("content") if isinstance(text, dict) else text
            if isinstance(text, str) and rust.token_to_id(text) is not None:
                meta[key] = rust.token_to_id(text)
    else:
        raise GGUFError(f"{where}: tokenizer kind {tok.kind!r} cannot be written to GGUF")
    check_vocab(tok, vocab_size, where)
    for i in range(len(tokens), vocab_size):  # as llama.cpp's converter pads a vocabulary to the embedding
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
    meta.update(tokens=tokens, token_type=types, chat_template=tok.chat_template, eot=tok.eot_token)
    return meta


def _pre_name(pre: dict | None, where: str) -> str:
    """The tokenizer.ggml.pre name of a tokenizer.json pre_tokenizer; GGUFError when llama.cpp has none like it."""
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    spec = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space", False):
            spec.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            spec.append(("Digits", bool(step.get("individual_digits", False))))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") and "Regex" in (step.get("pattern") or {}):
            spec.append(("Split", step["pattern"]["Regex"]))
        else:
            spec.append((kind, json.dumps(step, sort_keys=True)))
    for name, known in PRE_TOKENIZERS.items():
        if tuple(spec) == known:
            return name
    raise GGUFError(f"{where}: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is none of those GGUF names "
                    f"({', '.join(PRE_TOKENIZERS)}): llama.cpp would split text differently")


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise GGUFError(f"{out}: is a folder; give the path of the .gguf file to write")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise GGUFError(f"{out}: exists and is not a GGUF file; refusing to replace it")


def export_gguf(model_dir: str | Path, out_path: str | Path, dtype: str = "f32") -> dict[str, Any]:
    """Write an lmcore model folder (GPT-2 or Llama style) with its tokenizer as one GGUF file.

    The file loads in llama.cpp and in transformers (`from_pretrained(folder, gguf_file=name)`).

    Args:
        model_dir: an lmcore model folder carrying its tokenizer.
        out_path: the .gguf file; written to a temporary name, fsynced and renamed (an existing GGUF is replaced).
        dtype: the type of the 2-D weights: "f32", "f16", "bf16" or "q8_0" (1-D tensors stay F32).
    Returns: {"architecture", "params", "dtype", "tensor_types": {type: count}, "tokenizer", "bytes", "sha256", "path"}.
    Raises: GGUFError (or HFError) naming what GGUF or llama.cpp cannot express: a classifier head, an lmcore-only
        combination of options, a tokenizer that is not byte-level BPE.
    """
    src, out = Path(model_dir), Path(out_path)
    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    cfg, extra = read_model_config(src)
    if extra.get(HEAD_KEY) is not None:
        raise GGUFError(f"{src / MODEL_CONFIG}: '{HEAD_KEY}' {extra[HEAD_KEY]!r}: a classifier has no GGUF equivalent")
    tok = load_tokenizer(src)
    tok_meta = _tokenizer_metadata(tok, cfg.vocab_size, str(src))
    _check_out(out)
    model = load_model(src, device="cpu")
    hf_config, state = to_hf(model)
    arch = hf_config["model_type"]
    if arch == GPT2 and "lm_head.weight" not in state:
        # llama.cpp's converter writes GPT-2's tied head out as output.weight too; so do we (import ties it again)
        state["lm_head.weight"] = state[_GPT2_TOP["token_embd.weight"]]
    qtype, file_type = DTYPES[dtype]
    source = extra.get(SOURCE_KEY) if isinstance(extra.get(SOURCE_KEY), dict) else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    types: Counter[str] = Counter()
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _add_metadata(writer, cfg, arch, file_type, name=source.get("name") or src.resolve().name,
                          license=source.get("license"))
            _add_tokenizer(writer, tok_meta)
            for hf_name, tensor in state.items():
                types[_add_tensor(writer, hf_name, tensor, arch, cfg, qtype)] += 1
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (%s, %s) to %s", src, arch, dtype, out)
    return {"architecture": arch, "params": model.num_params(), "dtype": dtype, "tensor_types": dict(sorted(types.items())),
            "tokenizer": tok.name, "bytes": out.stat().st_size, "sha256": sha256_file(out), "path": str(out)}


def _add_metadata(writer: gguf.GGUFWriter, cfg, arch: str, file_type: int, name: str, license: str | None) -> None:
    """general.* and the architecture's hyperparameters, under the keys llama.cpp's converter writes."""
    writer.add_name(name)
    if license:
        writer.add_license(license)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_size)
    writer.add_head_count(cfg.n_head)
    if arch == LLAMA:
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.head_size)
        writer.add_rope_freq_base(cfg.rope_base)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)


def _add_tensor(writer: gguf.GGUFWriter, hf_name: str, tensor: torch.Tensor, arch: str, cfg, qtype) -> str:
    """One Hugging Face tensor under its GGUF name, in llama.cpp's layout and type; returns the type's name."""
    top = {hf: ours for ours, hf in _TOP[arch].items()}
    block = {hf: ours for ours, hf in _BLOCK[arch].items()}
    if hf_name in top:
        name = top[hf_name]
    else:
        i, rest = hf_name.removeprefix(_BLOCK_PREFIX[arch]).split(".", 1)
        name = f"blk.{i}.{block[rest]}"
    w = tensor.detach().float().numpy()
    short = name.split(".", 2)[-1]
    if arch == LLAMA and short.startswith("attn_q."):
        w = _permute(w, cfg.n_head)
    elif arch == LLAMA and short.startswith("attn_k."):
        w = _permute(w, cfg.kv_heads)
    elif arch == GPT2 and short in _GPT2_CONV1D and name.startswith("blk."):
        w = w.T
    w = np.ascontiguousarray(w, dtype=np.float32)
    kind = qtype if w.ndim >= 2 and name not in _KEEP_F32 else gguf.GGMLQuantizationType.F32
    if kind == gguf.GGMLQuantizationType.Q8_0 and w.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        log.info("%s: rows of %d values are not whole Q8_0 blocks; written as F16", name, w.shape[-1])
        kind = gguf.GGMLQuantizationType.F16
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, w)
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
    return kind.name


def _add_tokenizer(writer: gguf.GGUFWriter, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_type"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("eot", writer.add_eot_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if meta.get(key) is not None:
            add(int(meta[key]))
    writer.add_add_bos_token(meta["add_bos_token"])
    writer.add_add_eos_token(meta["add_eos_token"])
    if meta.get("chat_template"):
        writer.add_chat_template(meta["chat_template"])
