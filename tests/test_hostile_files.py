"""Hostile files fail fast and clearly (issue 27): GGUF, safetensors, config.json, tokenizer and archive readers
either load a file or refuse it with one InputError line naming it; none hangs, exhausts memory or crashes.

The fuzz tests feed a few hundred deterministic mutations (seeded byte flips, truncations, huge counts and lengths
patched in, hostile metadata) of small valid files to the readers in a child process that has a memory limit
(RLIMIT_AS) and a time limit per file. The regression tests are the cases the issue names.

    python -m pytest tests/test_hostile_files.py -q
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
import random
import resource
import shutil
import struct
import tarfile
import time
import traceback
import zipfile
from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import CheckpointError, load_model, save_model
from lmcore.config import ModelConfig
from lmcore.data.archives import ArchiveError, extract
from lmcore.errors import InputError
from lmcore.model import GPT
from lmcore.tokenizer import HFTokenizer, TokenizerError, load_tokenizer

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from lmcore.gguf import GGUFError, export_gguf, import_gguf, open_gguf  # noqa: E402
from lmcore.hf import HFError, export_hf, import_hf  # noqa: E402
from tests.test_gguf import _rewrite  # noqa: E402

CASE_TIMEOUT_S = 15  # per file: the slowest legitimate one takes well under a second
MEMORY_HEADROOM = 1 << 30  # bytes a child may map beyond what it has when it starts
V = gguf.GGUFValueType
DROP = None  # tests.test_gguf._rewrite: remove the key
TEXT = ["hello world, the quick brown fox jumps over the lazy dog 12345", "café naïve 🙂 <|endoftext|> don't"] * 4


# ---------------------------------------------------------------------------------------------------------------
# The harness: readers run in a forked child with a memory limit, one answer per file, a timeout per file.


def _read_gguf(path: Path) -> None:
    import_gguf(path, path.with_suffix(".out"))


def _read_model(folder: Path) -> None:
    load_model(folder)


def _read_hf(folder: Path) -> None:
    import_hf(folder, folder.with_suffix(".out"))


def _read_tokenizer(folder: Path) -> None:
    tok = load_tokenizer(folder)
    tok.decode(tok.encode(TEXT[1]))


def _read_archive(path: Path) -> None:
    extract(path, path.with_suffix(".out"), max_members=50, max_bytes=1 << 20)


def _allocate(path: Path) -> None:
    bytearray(2 * MEMORY_HEADROOM)


def _loop(path: Path) -> None:
    while True:
        time.sleep(0.01)


READERS = {"gguf": _read_gguf, "open-gguf": open_gguf, "model": _read_model, "hf": _read_hf,
           "tokenizer": _read_tokenizer, "archive": _read_archive, "allocate": _allocate, "loop": _loop,
           "exit": lambda path: os._exit(3)}


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    return kb * 1024


def _child(conn, reader: str, paths: list[Path]) -> None:
    """Read each path in turn, answering (status, detail): ok, input (an InputError's message) or error."""
    torch.set_num_threads(1)  # forked: no OpenMP pool of the parent's to wait on
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read ranks files directly, no cached copies
    os.fsync = lambda fd: None  # throwaway outputs: fsync is not what is under test, and it is slow
    limit = _vm_bytes() + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for path in paths:
        try:
            READERS[reader](path)
            answer = ("ok", "")
        except InputError as err:
            answer = ("input", str(err))
        except BaseException as err:  # noqa: BLE001 - what the test is looking for: MemoryError, KeyError, panics
            answer = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-4)}")
        conn.send(answer)
    conn.close()


def _feed(reader: str, paths: list[Path], timeout: float = CASE_TIMEOUT_S) -> dict[Path, tuple[str, str]]:
    """Each path's (status, detail), read by READERS[reader] in a child process: "hang" where it gave no answer
    within `timeout` seconds (the child is killed, another reads on), "crash" where the child died."""
    ctx = multiprocessing.get_context("fork")
    results: dict[Path, tuple[str, str]] = {}
    todo = list(paths)
    while todo:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(send, reader, todo), daemon=True)
        proc.start()
        send.close()
        done = 0
        try:
            while done < len(todo):
                if not receive.poll(timeout):
                    results[todo[done]] = ("hang", f"no answer in {timeout} s")
                    done += 1
                    break
                try:
                    results[todo[done]] = receive.recv()
                except EOFError:
                    proc.join(5)
                    results[todo[done]] = ("crash", f"the reader's process died (exit code {proc.exitcode})")
                    done += 1
                    break
                done += 1
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
            receive.close()
        todo = todo[done:]
    return results


def _check(results: dict[Path, tuple[str, str]], *, name_of=lambda p: str(p), expect_ok: int = 1) -> dict[str, int]:
    """Every file loaded or was refused with one line naming it; returns the count of each outcome."""
    bad = []
    for path, (status, detail) in results.items():
        if status == "input" and ("\n" in detail or name_of(path) not in detail):
            bad.append(f"{path.name}: not one line naming {name_of(path)}: {detail[:300]!r}")
        elif status not in ("ok", "input"):
            bad.append(f"{path.name}: {status}: {detail[:1500]}")
    assert not bad, f"{len(bad)} of {len(results)} files:\n" + "\n".join(bad[:15])
    counts = {s: sum(1 for r in results.values() if r[0] == s) for s in ("ok", "input")}
    assert counts["ok"] >= expect_ok, counts  # the unmutated file (and harmless mutations) still load
    return counts


def _only(reader: str, path: Path) -> tuple[str, str]:
    return _feed(reader, [path])[path]


def test_the_harness_reports_memory_hangs_and_crashes(tmp_path):
    paths = [tmp_path / f"{i}" for i in range(3)]
    assert {p: s for p, (s, _) in _feed("allocate", paths[:1]).items()} == {paths[0]: "error"}
    assert "MemoryError" in _feed("allocate", paths[:1])[paths[0]][1]
    assert [s for s, _ in _feed("loop", paths[:2], timeout=0.5).values()] == ["hang", "hang"]
    assert [s for s, _ in _feed("exit", paths[:2]).values()] == ["crash", "crash"]
    paths[0].write_bytes(b"not an archive")
    assert [s for s, _ in _feed("archive", paths[:1]).values()] == ["input"]


# ---------------------------------------------------------------------------------------------------------------
# Small valid files


@pytest.fixture(autouse=True)
def quiet_fork(monkeypatch):
    """The readers' children are forked after tokenizers used its thread pool here: it then disables the pool in
    the child, and with this set says nothing about it."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def model_dir(work) -> Path:
    """A one-layer Llama-style model (GQA 2/1, untied head) with a 280-token byte-level BPE."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmcore.gguf import PRE_TOKENIZERS, _pre_tokenizer

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS["gpt-2"])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXT, trainer)
    (work / "bpe").mkdir()
    tk.save(str(work / "bpe" / "tokenizer.json"))
    tok = HFTokenizer(work / "bpe" / "tokenizer.json", name="tiny-bpe")
    cfg = ModelConfig(vocab_size=tok.n_vocab, context_length=16, n_embd=16, n_layer=1, n_head=2, n_kv_head=1,
                      intermediate_size=32, norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_weights=False)
    torch.manual_seed(0)
    folder = work / "model"
    save_model(GPT(cfg), folder, extra={"tokenizer": tok.name})
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def gguf_file(work, model_dir) -> Path:
    return Path(export_gguf(model_dir, work / "tiny.gguf")["path"])


@pytest.fixture(scope="module")
def gpt2_gguf_file(work, model_dir) -> Path:
    """A one-layer GPT-2 with the same tokenizer, as a GGUF file."""
    folder = work / "gpt2"
    torch.manual_seed(1)
    save_model(GPT(ModelConfig(vocab_size=load_tokenizer(model_dir).n_vocab, context_length=16, n_embd=16, n_layer=1,
                               n_head=2)), folder, extra={"tokenizer": "tiny-bpe"})
    load_tokenizer(model_dir).save(folder)
    return Path(export_gguf(folder, work / "tiny-gpt2.gguf")["path"])


@pytest.fixture(scope="module")
def hf_dir(work, model_dir) -> Path:
    return Path(export_hf(model_dir, work / "hf")["path"])


def _cases(work: Path, name: str) -> Path:
    folder = work / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    return folder


def _flip(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None, n: int | None = None) -> bytes:
    """`data` with 1 to 8 random bytes in [lo, hi) set to random values."""
    out = bytearray(data)
    for _ in range(n or rng.randint(1, 8)):
        out[rng.randrange(lo, hi or len(data))] = rng.randrange(256)
    return bytes(out)


def _truncations(data: bytes, rng: random.Random, n: int) -> list[bytes]:
    return [data[:k] for k in sorted({0, 1, 4, 8, 23, len(data) - 1, *(rng.randrange(len(data)) for _ in range(n))})]


# ---------------------------------------------------------------------------------------------------------------
# GGUF


_SCALAR_BYTES = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4, V.BOOL: 1,
                 V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}


def _gguf_counts(data: bytes, items_per_array: int = 2) -> tuple[list[tuple[int, int, str]], int]:
    """Where a GGUF file keeps its counts, lengths, types and offsets: [(offset, width, what)], and where its
    tensor infos end. Of an array's items, the first `items_per_array` only."""
    u32 = lambda at: struct.unpack_from("<I", data, at)[0]  # noqa: E731
    u64 = lambda at: struct.unpack_from("<Q", data, at)[0]  # noqa: E731
    out = [(8, 8, "tensor count"), (16, 8, "kv count")]
    pos = 24

    def string(what: str, keep: bool = True) -> None:
        nonlocal pos
        if keep:
            out.append((pos, 8, what))
        pos += 8 + u64(pos)

    def value(vtype: int, keep: bool = True) -> None:
        nonlocal pos
        if vtype == V.STRING:
            string("string length", keep)
        elif vtype == V.ARRAY:
            itype, n = u32(pos), u64(pos + 4)
            if keep:
                out.extend([(pos, 4, "array item type"), (pos + 4, 8, "array length")])
            pos += 12
            for i in range(n):
                value(itype, keep and i < items_per_array)
        else:
            pos += _SCALAR_BYTES[V(vtype)]

    for _ in range(u64(16)):
        string("key length")
        out.append((pos, 4, "value type"))
        pos += 4
        value(u32(pos - 4))
    for _ in range(u64(8)):
        string("tensor name length")
        n_dims = u32(pos)
        out.append((pos, 4, "n_dims"))
        out.extend((pos + 4 + 8 * i, 8, "dimension") for i in range(n_dims))
        pos += 4 + 8 * n_dims
        out.extend([(pos, 4, "tensor type"), (pos + 4, 8, "tensor data offset")])
        pos += 12
    return out, pos


# Hostile metadata: what llama.cpp's loader refuses, or what lmcore must not trust (sizes that allocate, counts that
# divide, values of the wrong type).
HOSTILE_METADATA = {
    "head-count-0": {"llama.attention.head_count": (0, V.UINT32)},
    "head-count-3": {"llama.attention.head_count": (3, V.UINT32)},
    "kv-heads-0": {"llama.attention.head_count_kv": (0, V.UINT32)},
    "kv-heads-not-dividing": {"llama.attention.head_count": (4, V.UINT32), "llama.attention.head_count_kv": (3, V.UINT32)},
    "heads-as-array": {"llama.attention.head_count": ([2, 2], V.ARRAY, V.UINT32)},
    "width-0": {"llama.embedding_length": (0, V.UINT32)},
    "width-2^20": {"llama.embedding_length": (1 << 20, V.UINT32)},
    "context-2^28": {"llama.context_length": (1 << 28, V.UINT32)},
    "context-2^62": {"llama.context_length": (1 << 62, V.UINT64)},
    "layers-0": {"llama.block_count": (0, V.UINT32)},
    "layers-10^6": {"llama.block_count": (10**6, V.UINT32)},
    "ffn-2^30": {"llama.feed_forward_length": (1 << 30, V.UINT32)},
    "no-context": {"llama.context_length": DROP},
    "no-rms-eps": {"llama.attention.layer_norm_rms_epsilon": DROP},
    "no-rope-base": {"llama.rope.freq_base": DROP},
    "eps-nan": {"llama.attention.layer_norm_rms_epsilon": (float("nan"), V.FLOAT32)},
    "rope-base-inf": {"llama.rope.freq_base": (float("inf"), V.FLOAT32)},
    "rope-dims": {"llama.rope.dimension_count": (6, V.UINT32)},
    "tokens-as-ints": {"tokenizer.ggml.tokens": (list(range(280)), V.ARRAY, V.INT32)},
    "tokens-as-text": {"tokenizer.ggml.tokens": ("hello", V.STRING)},
    "types-as-text": {"tokenizer.ggml.token_type": (["x"] * 280, V.ARRAY, V.STRING)},
    "few-token-types": {"tokenizer.ggml.token_type": ([1, 1], V.ARRAY, V.INT32)},
    "merges-unknown": {"tokenizer.ggml.merges": (["zz qq", "a b c"], V.ARRAY, V.STRING)},
    "merges-not-in-vocab": {"tokenizer.ggml.merges": (["zzz qqq"], V.ARRAY, V.STRING)},
    "pre-as-int": {"tokenizer.ggml.pre": (7, V.UINT32)},
    "eos-10^9": {"tokenizer.ggml.eos_token_id": (10**9, V.UINT32)},
    "template-as-int": {"tokenizer.chat_template": (5, V.UINT32)},
    "name-as-array": {"general.name": (["a", "b"], V.ARRAY, V.STRING)},
    "model-as-array": {"tokenizer.ggml.model": (["gpt2"], V.ARRAY, V.STRING)},
    "no-tokens": {"tokenizer.ggml.tokens": DROP},
    "alignment-3": {"general.alignment": (3, V.UINT32)},
}


def _gguf_cases(src: Path, folder: Path) -> list[Path]:
    rng = random.Random(27)
    data = src.read_bytes()
    counts, header_end = _gguf_counts(data)
    blobs: dict[str, bytes] = {"valid": data}
    for k, cut in enumerate(_truncations(data, rng, 24)):
        blobs[f"truncated-{k}"] = cut
    # Huge (and zero) counts, lengths, types and offsets patched in where the file keeps them.
    huge = {8: [0, 1, 255, 1 << 31, (1 << 32) - 1, 1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1],
            4: [0, 1, 9, 255, 1 << 31, (1 << 32) - 1]}
    for i, (at, width, what) in enumerate(counts):
        for value in rng.sample(huge[width], 2):
            patched = bytearray(data)
            struct.pack_into("<Q" if width == 8 else "<I", patched, at, value)
            blobs[f"count-{i}-{what.replace(' ', '_')}-{value}"] = bytes(patched)
    for k in range(60):
        blobs[f"flip-header-{k}"] = _flip(data, rng, 4, header_end)
    for k in range(6):
        blobs[f"flip-data-{k}"] = _flip(data, rng, header_end)
    paths = []
    for name, blob in blobs.items():
        (folder / f"{name}.gguf").write_bytes(blob)
        paths.append(folder / f"{name}.gguf")
    for name, fields in HOSTILE_METADATA.items():
        paths.append(_rewrite(src, folder / f"meta-{name}.gguf", fields=fields))
    paths.append(_rewrite(src, folder / "meta-mamba.gguf", arch="mamba"))
    return paths


GPT2_METADATA = {
    "head-count-0": {"gpt2.attention.head_count": (0, V.UINT32)},
    "head-count-3": {"gpt2.attention.head_count": (3, V.UINT32)},
    "kv-heads-1": {"gpt2.attention.head_count_kv": (1, V.UINT32)},
    "context-2^28": {"gpt2.context_length": (1 << 28, V.UINT32)},
    "no-eps": {"gpt2.attention.layer_norm_epsilon": DROP},
    "no-width": {"gpt2.embedding_length": DROP},
    "ffn-0": {"gpt2.feed_forward_length": (0, V.UINT32)},
}


def _gpt2_gguf_cases(src: Path, folder: Path) -> list[Path]:
    rng = random.Random(26)
    data = src.read_bytes()
    _, header_end = _gguf_counts(data)
    blobs = {f"gpt2-truncated-{k}": cut for k, cut in enumerate(_truncations(data, rng, 6))}
    blobs |= {f"gpt2-flip-header-{k}": _flip(data, rng, 4, header_end) for k in range(30)}
    paths = []
    for name, blob in blobs.items():
        (folder / f"{name}.gguf").write_bytes(blob)
        paths.append(folder / f"{name}.gguf")
    return paths + [_rewrite(src, folder / f"gpt2-meta-{name}.gguf", fields=fields) for name, fields in GPT2_METADATA.items()]


def test_fuzzed_gguf_files_load_or_fail_in_one_line(work, gguf_file, gpt2_gguf_file):
    folder = _cases(work, "gguf-cases")
    paths = _gguf_cases(gguf_file, folder) + _gpt2_gguf_cases(gpt2_gguf_file, folder) + [gpt2_gguf_file]
    started = time.monotonic()
    counts = _check(_feed("gguf", paths))
    assert len(paths) >= 250 and counts["input"] > 0.8 * len(paths), (len(paths), counts)
    assert time.monotonic() - started < 60


def _gguf_58(path: Path, n_items: int) -> Path:
    """The issue's file: a GGUF of one metadata array that claims `n_items` uint8 items, and holds two."""
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)  # version 3, no tensors, one key
    data += struct.pack("<Q", 8) + b"arr.test" + struct.pack("<IIQ", V.ARRAY, V.UINT8, n_items) + b"\x00\x00"
    assert len(data) == 58
    path.write_bytes(data)
    return path


def test_array_of_2_62_items_in_58_bytes_is_refused_at_once(work):
    """gguf's own reader loops forever on this file while its memory grows."""
    path = _gguf_58(work / "array-2-62.gguf", 1 << 62)
    started = time.monotonic()
    status, message = _feed("open-gguf", [path], timeout=5)[path]
    assert status == "input" and time.monotonic() - started < 5, (status, message)
    assert "\n" not in message and str(path) in message and "'arr.test'" in message and "offset 56" in message, message
    assert str(1 << 62) in message and "58 bytes" in message
    assert open_gguf(_gguf_58(work / "array-2.gguf", 2)).fields["arr.test"].contents() == [0, 0]


def test_gguf_metadata_arrays_together_have_a_limit(work, monkeypatch):
    import lmcore.gguf

    monkeypatch.setattr(lmcore.gguf, "MAX_ARRAY_ITEMS", 1)
    path = _gguf_58(work / "array-2-limit.gguf", 2)
    with pytest.raises(GGUFError, match=r"'arr.test' at offset 56: 2 array items, more than the 1 lmcore reads"):
        open_gguf(path)


def test_gguf_without_optional_keys_takes_llama_cpp_defaults(work, gguf_file):
    """The issue's KeyError: a file without layer_norm_rms_epsilon (or rope.freq_base) imports with the default."""
    src = _rewrite(gguf_file, work / "no-optional.gguf", fields={
        "llama.attention.layer_norm_rms_epsilon": DROP, "llama.rope.freq_base": DROP})
    import_gguf(src, work / "no-optional")
    cfg = load_model(work / "no-optional").config
    assert (cfg.norm_eps, cfg.rope_base) == (1e-5, 10000.0)


@pytest.mark.parametrize("fields, names", [
    ({"llama.attention.head_count": (0, V.UINT32)}, ["llama.attention.head_count 0"]),
    ({"llama.attention.head_count": (3, V.UINT32)}, ["llama.attention.head_count 3", "embedding_length 16"]),
    ({"llama.attention.head_count_kv": (0, V.UINT32)}, ["llama.attention.head_count_kv 0"]),
    ({"llama.attention.head_count": (4, V.UINT32), "llama.attention.head_count_kv": (3, V.UINT32)},
     ["llama.attention.head_count_kv 3", "head_count 4"]),
    ({"llama.context_length": (1 << 28, V.UINT32)}, ["llama.context_length", str(1 << 28)]),
    ({"llama.block_count": (10**6, V.UINT32)}, ["llama.block_count"]),
])
def test_gguf_with_impossible_counts_is_a_gguf_error(work, gguf_file, fields, names):
    src = _rewrite(gguf_file, work / "counts.gguf", fields=fields)
    with pytest.raises(GGUFError) as err:
        import_gguf(src, work / "counts-out")
    message = str(err.value)
    assert "\n" not in message and str(src) in message and all(n in message for n in names), message
    assert not (work / "counts-out").exists()


def test_gguf_tensor_data_past_the_end_is_refused_naming_the_tensor(work, gguf_file):
    data = bytearray(gguf_file.read_bytes())
    counts, _ = _gguf_counts(bytes(data))
    at = next(at for at, _, what in counts if what == "tensor data offset")
    struct.pack_into("<Q", data, at, len(data))  # aligned, and past the end
    (work / "past-end.gguf").write_bytes(data)
    with pytest.raises(GGUFError, match=r"tensor '[^']+' at offset \d+: \d+ bytes of F32 data .* past the end"):
        open_gguf(work / "past-end.gguf")


# ---------------------------------------------------------------------------------------------------------------
# Model folders: safetensors weights and config.json


def _header(data: bytes) -> tuple[dict, int]:
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8:8 + n]), 8 + n


def _with_header(data: bytes, header: dict) -> bytes:
    _, end = _header(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[end:]


def _model_cases(model_dir: Path, folder: Path) -> list[Path]:
    rng = random.Random(28)
    weights = (model_dir / "model.safetensors").read_bytes()
    config = json.loads((model_dir / "config.json").read_text())
    header, end = _header(weights)
    names = sorted(k for k in header if k != "__metadata__")
    blobs: dict[str, tuple[bytes, dict | bytes]] = {"valid": (weights, config)}
    for k, cut in enumerate(_truncations(weights, rng, 12)):
        blobs[f"truncated-{k}"] = (cut, config)
    for n in (0, 7, 2, end - 8 + 1, len(weights), 100_000_001, (1 << 62), (1 << 64) - 1):
        blobs[f"header-length-{n}"] = (struct.pack("<Q", n) + weights[8:], config)
    for k in range(30):
        blobs[f"flip-header-{k}"] = (_flip(weights, rng, 8, end), config)
    for k in range(4):
        blobs[f"flip-data-{k}"] = (_flip(weights, rng, end), config)
    hostile = {
        "shape-2^40": lambda h, n: h[n].update(shape=[1 << 40]),
        "shape-2^32x2^32": lambda h, n: h[n].update(shape=[1 << 32, 1 << 32]),
        "shape-empty": lambda h, n: h[n].update(shape=[]),
        "dtype-F64": lambda h, n: h[n].update(dtype="F64"),
        "dtype-BOOL": lambda h, n: h[n].update(dtype="BOOL"),
        "dtype-I8": lambda h, n: h[n].update(dtype="I8"),
        "dtype-XYZ": lambda h, n: h[n].update(dtype="XYZ"),
        "offsets-huge": lambda h, n: h[n].update(data_offsets=[0, 1 << 62]),
        "offsets-reversed": lambda h, n: h[n].update(data_offsets=h[n]["data_offsets"][::-1]),
        "missing-tensor": lambda h, n: h.pop(n),
        "metadata-int": lambda h, n: h.update(__metadata__={"format": 5}),
        "tensor-as-list": lambda h, n: h.update({n: [1, 2]}),
    }
    for name, mutate in hostile.items():
        h = json.loads(json.dumps(header))
        mutate(h, rng.choice(names))
        blobs[f"header-{name}"] = (_with_header(weights, h), config)
    model = config["model"]
    for key, value in [("context_length", 1 << 28), ("context_length", 1 << 40), ("vocab_size", 1 << 40),
                       ("vocab_size", 0), ("n_layer", 10**6), ("n_embd", 1 << 20), ("n_embd", 1 << 14),
                       ("n_head", 0), ("n_head", 3), ("n_kv_head", 3), ("intermediate_size", 1 << 30),
                       ("norm_eps", "nan"), ("rope_base", "inf"), ("n_layer", "12"), ("n_layer", [1])]:
        blobs[f"config-{key}-{value}"] = (weights, {**config, "model": {**model, key: value}})
    for key, value in [("model", []), ("model", None), ("format_version", "1"), ("head", 5),
                       ("head", {"type": "classifier", "labels": 3}), ("head", {"type": "classifier", "labels": ["a", "b"]})]:
        blobs[f"config-{key}-{value}"] = (weights, {**config, key: value})
    raw = json.dumps(config).encode()
    for k in range(12):
        blobs[f"config-flip-{k}"] = (weights, _flip(raw, rng))
    paths = []
    for name, (blob, cfg) in blobs.items():
        case = folder / name.replace("/", "_")
        case.mkdir()
        (case / "model.safetensors").write_bytes(blob)
        (case / "config.json").write_bytes(cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode())
        paths.append(case)
    return paths


def test_fuzzed_model_folders_load_or_fail_in_one_line(work, model_dir):
    paths = _model_cases(model_dir, _cases(work, "model-cases"))
    counts = _check(_feed("model", paths))
    assert len(paths) >= 100 and counts["input"] > 0.8 * len(paths), (len(paths), counts)


def _hf_cases(hf_dir: Path, folder: Path) -> list[Path]:
    rng = random.Random(29)
    weights = (hf_dir / "model.safetensors").read_bytes()
    config = json.loads((hf_dir / "config.json").read_text())
    cases: dict[str, tuple[bytes, dict]] = {"valid": (weights, config)}
    for key, value in [("max_position_embeddings", 1 << 28), ("max_position_embeddings", -1),
                       ("max_position_embeddings", "2048"), ("vocab_size", 1 << 40), ("vocab_size", 1.5),
                       ("hidden_size", 1 << 20), ("hidden_size", 0), ("num_attention_heads", 0),
                       ("num_attention_heads", 3), ("num_key_value_heads", 3), ("num_hidden_layers", 10**6),
                       ("num_hidden_layers", True), ("intermediate_size", 1 << 30), ("head_dim", "8"),
                       ("rope_theta", "x"), ("rms_norm_eps", None), ("rope_scaling", []), ("rope_parameters", 5),
                       ("tie_word_embeddings", "maybe"), ("model_type", ["llama"])]:
        cases[f"config-{key}-{value}"] = (weights, {**config, key: value})
    for k, cut in enumerate(_truncations(weights, rng, 6)):
        cases[f"truncated-{k}"] = (cut, config)
    paths = []
    for name, (blob, cfg) in cases.items():
        case = folder / name
        case.mkdir()
        (case / "model.safetensors").write_bytes(blob)
        (case / "config.json").write_text(json.dumps(cfg))
        paths.append(case)
    return paths


def test_fuzzed_hugging_face_folders_import_or_fail_in_one_line(work, hf_dir):
    _check(_feed("hf", _hf_cases(hf_dir, _cases(work, "hf-cases"))))


def test_context_of_2_28_positions_is_refused_before_anything_is_allocated(work, hf_dir, model_dir):
    """Under the harness's memory limit: a 2**28-position RoPE table would be gigabytes; the config is refused first."""
    hf = _cases(work, "hf-2-28") / "hf"
    shutil.copytree(hf_dir, hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1 << 28}))
    status, message = _only("hf", hf)
    assert status == "input" and "\n" not in message, message
    assert f"{hf / 'config.json'}: not a valid lmcore model: max_position_embeddings" in message and str(1 << 28) in message
    ours = hf.parent / "lmcore"
    shutil.copytree(model_dir, ours)
    config = json.loads((ours / "config.json").read_text())
    (ours / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "context_length": 1 << 28}}))
    status, message = _only("model", ours)
    assert status == "input" and f"{ours / 'config.json'}" in message and "context_length" in message, message
    with pytest.raises(CheckpointError, match="context_length"):
        load_model(ours)


def test_a_model_larger_than_its_weights_is_refused_before_it_is_built(work, model_dir):
    folder = _cases(work, "bigger") / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    model = {**config["model"], "n_embd": 8192, "n_head": 64, "n_kv_head": 8, "intermediate_size": 28672}
    (folder / "config.json").write_text(json.dumps({**config, "model": model}))  # 3.4 GB: under the cap
    assert ModelConfig(**model).alloc_bytes() > MEMORY_HEADROOM
    status, message = _only("model", folder)  # under a memory limit the model would not fit in
    assert status == "input", message
    assert "weights do not match config.json: size mismatch for wte.weight: (280, 16) in the file, (280, 8192)" in message


def test_a_model_over_the_memory_cap_is_refused_by_its_config(work):
    with pytest.raises(ValueError, match=r"GiB in float32, over the 64 GiB"):
        ModelConfig(vocab_size=128256, n_embd=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672,
                    norm="rmsnorm", mlp="swiglu", positions="rope")


def test_safetensors_header_of_huge_length_is_one_line(work, model_dir):
    folder = _cases(work, "huge-header") / "model"
    shutil.copytree(model_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert "\n" not in str(err.value) and "header too large" in str(err.value) and str(folder) in str(err.value)


def test_the_shapes_and_memory_estimate_are_what_gpt_builds():
    """ModelConfig.tensor_shapes, param_count and alloc_bytes (checked before anything is allocated) against GPT
    itself, over every architecture option."""
    for norm, mlp, positions, bias, tie, kv, inner in itertools.product(
            ("layernorm", "rmsnorm"), ("gelu", "swiglu"), ("learned", "rope"), (True, False), (True, False), (None, 2),
            (None, 40)):
        cfg = ModelConfig(vocab_size=97, context_length=24, n_embd=32, n_layer=2, n_head=4, n_kv_head=kv, norm=norm,
                          mlp=mlp, positions=positions, bias=bias, tie_weights=tie, intermediate_size=inner)
        model = GPT(cfg)
        saved = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
        assert list(cfg.tensor_shapes().items()) == list(saved.items()), cfg
        assert cfg.param_count() == model.num_params()
        buffers = sum(b.numel() for b in model.buffers())
        assert 4 * (cfg.param_count() + buffers) <= cfg.alloc_bytes() <= 4 * (cfg.param_count() + 2 * buffers)
        model.replace_head(3)  # a classifier
        assert cfg.tensor_shapes(3) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert cfg.param_count(3) == model.num_params()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer folders


def _tokenizer_cases(model_dir: Path, folder: Path) -> list[Path]:
    rng = random.Random(30)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = (model_dir / "tokenizer.json").read_bytes()
    section = config["lmcore"]
    unpinned = {**config, "lmcore": {k: v for k, v in section.items() if k != "sha256"}}
    cases: dict[str, tuple[dict | bytes, bytes]] = {"valid": (config, vocab), "unpinned": (unpinned, vocab)}
    for value in ["../tokenizer.json", "/etc/passwd", "sub/tokenizer.json", "..", ".", "", "tokenizer.json\x00x",
                  "C:\\tokenizer.json", "..\\tokenizer.json", 5, ["tokenizer.json"], "missing.json"]:
        cases[f"file-{value!r}"] = ({**config, "lmcore": {**section, "file": value}}, vocab)
    for key, value in [("kind", 5), ("kind", "tiktoken"), ("kind", "sentencepiece"), ("name", ["x"]),
                       ("sha256", 7), ("eot_token", 3), ("eot_token", "<|nope|>")]:
        cases[f"section-{key}-{value}"] = ({**config, "lmcore": {**section, key: value}}, vocab)
    for key, value in [("lmcore", [1]), ("lmcore", "x"), ("eot_token_text", 5), ("bos_token", {"content": 5}),
                       ("eos_token", ["<|endoftext|>"]), ("chat_template", 5), ("chat_template", [{"name": 1}]),
                       ("chat_template", [{"template": 7}])]:
        cases[f"config-{key}-{value}"] = ({**config, key: value}, vocab)
    raw = json.dumps(config).encode()
    for k in range(15):
        cases[f"config-flip-{k}"] = (_flip(raw, rng), vocab)
    for k, cut in enumerate(_truncations(vocab, rng, 8)):
        cases[f"vocab-truncated-{k}"] = (unpinned, cut)
    for k in range(25):
        cases[f"vocab-flip-{k}"] = (unpinned, _flip(vocab, rng))
    tokenizer = json.loads(vocab)
    for name, mutate in {
        "model-type": lambda t: t["model"].update(type="WordPiece"),
        "vocab-list": lambda t: t["model"].update(vocab=[1, 2]),
        "merges-unknown": lambda t: t["model"].update(merges=["zzz qqq"]),
        "merges-int": lambda t: t["model"].update(merges=[5]),
        "added-id-huge": lambda t: t["added_tokens"][0].update(id=1 << 40),
        "pre-regex-bad": lambda t: t.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "("},
                                                           "behavior": "Isolated", "invert": False}),
        "decoder-5": lambda t: t.update(decoder=5),
    }.items():
        t = json.loads(vocab)
        mutate(t)
        cases[f"vocab-{name}"] = (unpinned, json.dumps(t).encode())
    assert tokenizer["model"]["type"] == "BPE"
    paths = []
    for i, (name, (cfg, blob)) in enumerate(cases.items()):
        case = folder / f"{i:03d}"
        case.mkdir()
        (case / "tokenizer_config.json").write_bytes(cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode())
        (case / "tokenizer.json").write_bytes(blob)
        (case / "case.txt").write_text(name)
        paths.append(case)
    return paths


def test_fuzzed_tokenizer_folders_load_or_fail_in_one_line(work, model_dir):
    paths = _tokenizer_cases(model_dir, _cases(work, "tokenizer-cases"))
    _check(_feed("tokenizer", paths), expect_ok=2)


@pytest.mark.parametrize("name", ["../tokenizer.json", "/etc/passwd", "sub/tokenizer.json", "..", 5])
def test_a_tokenizer_config_names_only_a_file_inside_its_folder(work, model_dir, name):
    folder = _cases(work, "tok-name") / "tok"
    folder.mkdir()
    shutil.copy(model_dir / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["lmcore"]["file"] = name
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder / "tokenizer_config.json") in message and "lmcore.file" in message
    assert "not a plain file name inside its folder" in message


# ---------------------------------------------------------------------------------------------------------------
# Archives


def _tar(members: list[tuple[str, bytes]], mode: str = "w", fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _zip_symlink(target: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("link", (1980, 1, 1, 0, 0, 0))
        info.external_attr = (0o120777) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, target)
    return buf.getvalue()


def _gnu_long_link(size: int) -> bytes:
    """A tar whose first header is a GNU long link name that declares `size` bytes (and holds 512)."""
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGLINK, size
    return header.tobuf(tarfile.GNU_FORMAT) + b"x" * 512 + b"\0" * 1024


MEMBERS = [("books/emma.txt", b"Emma Woodhouse, handsome, clever, and rich.\n" * 20), ("README.md", b"# Books\n"),
           ("books/more/persuasion.jsonl", b'{"text": "Sir Walter Elliot"}\n' * 10)]


def _archive_cases(folder: Path) -> list[Path]:
    rng = random.Random(31)
    blobs = {"valid.tar": _tar(MEMBERS), "valid.tar.gz": _tar(MEMBERS, "w:gz"), "valid.zip": _zip(MEMBERS),
             "valid-gnu.tar": _tar(MEMBERS, fmt=tarfile.GNU_FORMAT)}
    for name, data in list(blobs.items()):
        stem, ext = name.split(".", 1)
        for k, cut in enumerate(_truncations(data, rng, 4)):
            blobs[f"truncated-{stem}-{k}.{ext}"] = cut
        for k in range(10):
            blobs[f"flip-{stem}-{k}.{ext}"] = _flip(data, rng, 0, min(len(data), 2048))
    many = [(f"f{i}.txt", b"x") for i in range(60)]
    zeros = [("zeros.txt", b"\0" * (2 << 20))]
    blobs.update({
        "many.tar": _tar(many), "many.zip": _zip(many),
        "bomb.tar.gz": _tar(zeros, "w:gz"), "bomb.zip": _zip(zeros),
        "long-link.zip": _zip_symlink(b"a/" * (1 << 20)),
        "gnu-long-link.tar": _gnu_long_link(1 << 40),
        "pax-huge.tar": _pax_huge(),
    })
    paths = []
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
        paths.append(folder / name)
    return paths


def _pax_huge() -> bytes:
    """A tar whose first header is a pax extended header that declares 8 GiB."""
    header = tarfile.TarInfo("pax")
    header.type, header.size = tarfile.XHDTYPE, 8 << 30
    return header.tobuf(tarfile.GNU_FORMAT) + b"\0" * 2048


def test_fuzzed_archives_extract_or_fail_in_one_line(work):
    paths = _archive_cases(_cases(work, "archive-cases"))
    _check(_feed("archive", paths), name_of=lambda p: p.name, expect_ok=4)


LIMITED = {
    "many.tar": (lambda: _tar([(f"f{i}.txt", b"x") for i in range(11)]), "more than 10 members"),
    "many.zip": (lambda: _zip([(f"f{i}.txt", b"x") for i in range(11)]), "more than 10 members"),
    "big.tar.gz": (lambda: _tar([("a.txt", b"\0" * 600), ("b.txt", b"\0" * 600)], "w:gz"), "more than 1000 bytes"),
    "big.zip": (lambda: _zip([("zeros.txt", b"\0" * 1001)]), "more than 1000 bytes"),
    "link.zip": (lambda: _zip_symlink(b"a/" * 4096), "target of more than 4096 bytes"),
    "gnu.tar": (lambda: _gnu_long_link(1 << 40), "GNU long name or link target of 1099511627776 bytes"),
    "pax.tar": (lambda: _pax_huge(), "pax header of 8589934592 bytes"),
}


@pytest.mark.parametrize("name", LIMITED)
def test_archive_limits_refuse_before_writing(tmp_path, name):
    make, words = LIMITED[name]
    (tmp_path / name).write_bytes(make())
    with pytest.raises(ArchiveError) as err:
        extract(tmp_path / name, tmp_path / "out", max_members=10, max_bytes=1000)
    message = str(err.value)
    assert "\n" not in message and name in message and words in message, message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_archive_within_the_limits_is_extracted(tmp_path):
    (tmp_path / "ok.zip").write_bytes(_zip([(f"f{i}.txt", b"x" * 100) for i in range(10)]))
    assert extract(tmp_path / "ok.zip", tmp_path / "out", max_members=10, max_bytes=1000).members == 10


def test_errors_are_input_errors():
    for cls in (GGUFError, HFError, CheckpointError, TokenizerError, ArchiveError):
        assert issubclass(cls, InputError)
