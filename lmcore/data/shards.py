"""Token shards: Arrow IPC files with one row per document and a `tokens` column of list<uint16>.

uint32 is used when the vocabulary does not fit in 16 bits. Each document's tokens end with the
end-of-text token, so the flattened column is the training stream.

Shards live in a folder given as a local path or an fsspec URL (`file:///data/tokens`,
`s3://bucket/tokens` with s3fs installed, `memory://...`). Local shards are memory-mapped and the flat
token array is handed out without copying; remote shards are read into memory whole.

    sha = write_shard("s3://bucket/tokens/train-00000.arrow", docs, np.dtype(np.uint16))
    shard = Shard("data/tokens/train-00000.arrow"); shard.tokens[:10]
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import fsspec
import numpy as np
import pyarrow as pa

from lmcore.errors import InputError, one_line
from lmcore.io import atomic_file

TOKENS = "tokens"


class ShardError(InputError):
    """Token shards or their tokenize manifest that cannot be read, or hold too few tokens for the windows asked
    for; the message names the file or folder."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def local_path(location: str | Path) -> Path | None:
    """The local path of a plain path or a file:// URL; None for any other URL."""
    text = str(location)
    if not is_url(text):
        return Path(text)
    fs, path = fsspec.core.url_to_fs(text)
    return Path(path) if "file" in _protocols(fs) else None


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def join(base: str | Path, name: str) -> str | Path:
    """`base/name` for a local folder (a Path) or a URL (a string)."""
    return f"{str(base).rstrip('/')}/{name}" if is_url(base) else Path(base) / name


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file atomically: temp file + fsync + rename locally, temp object + move elsewhere."""
    path = local_path(location)
    if path is not None:
        with atomic_file(path, "wb") as f:
            f.write(data)
        return
    fs, target = fsspec.core.url_to_fs(str(location))
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, target)  # object stores publish a whole object; the move keeps half-uploads out of sight


def read_bytes(location: str | Path) -> bytes:
    path = local_path(location)
    if path is not None:
        return path.read_bytes()
    fs, target = fsspec.core.url_to_fs(str(location))
    return fs.cat_file(target)


def open_binary(location: str | Path) -> BinaryIO:
    """A file opened for binary reading, local or remote (seekable either way)."""
    path = local_path(location)
    return open(path, "rb") if path is not None else fsspec.open(str(location), "rb").open()


def file_size(location: str | Path) -> int:
    """Size in bytes; FileNotFoundError naming the location when it is absent."""
    path = local_path(location)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{location}: no such file")
        return path.stat().st_size
    fs, target = fsspec.core.url_to_fs(str(location))
    if not fs.exists(target):
        raise FileNotFoundError(f"{location}: no such file")
    return int(fs.size(target))


def exists(location: str | Path) -> bool:
    path = local_path(location)
    if path is not None:
        return path.is_file()
    fs, target = fsspec.core.url_to_fs(str(location))
    return fs.exists(target)


def remove(location: str | Path) -> None:
    path = local_path(location)
    if path is not None:
        path.unlink(missing_ok=True)
        return
    fs, target = fsspec.core.url_to_fs(str(location))
    if fs.exists(target):
        fs.rm(target)


def list_dir(location: str | Path) -> list[str]:
    """File names directly inside a folder (empty when it does not exist)."""
    path = local_path(location)
    if path is not None:
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    fs, target = fsspec.core.url_to_fs(str(location))
    if not fs.exists(target):
        return []
    return sorted(Path(p).name for p in fs.ls(target, detail=False) if fs.isfile(p))


def ipc_bytes(tokens: np.ndarray, offsets: np.ndarray, dtype: np.dtype) -> bytes:
    """The Arrow IPC file of a flat token array cut into documents at `offsets` (len = documents + 1)."""
    offsets = np.asarray(offsets, dtype=np.int32 if offsets[-1] < 2**31 else np.int64)
    list_cls = pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray
    column = list_cls.from_arrays(pa.array(offsets), pa.array(np.asarray(tokens, dtype=dtype), type=pa.from_numpy_dtype(dtype)))
    table = pa.table({TOKENS: column})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, len(offsets) - 1))
    return sink.getvalue().to_pybytes()


def shard_bytes(docs: Sequence[np.ndarray], dtype: np.dtype) -> bytes:
    """The Arrow IPC file holding `docs` (1-D token arrays), one record batch, as bytes."""
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    flat = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]) if docs else np.empty(0, dtype)
    return ipc_bytes(flat, offsets, dtype)


def write_shard(location: str | Path, docs: Sequence[np.ndarray], dtype: np.dtype) -> str:
    """Write documents (1-D token arrays) to an Arrow IPC file, atomically. Returns its sha256."""
    data = shard_bytes(docs, dtype)
    write_bytes(location, data)
    return hashlib.sha256(data).hexdigest()


def write_shard_flat(location: str | Path, tokens: np.ndarray, offsets: np.ndarray, dtype: np.dtype) -> str:
    """`write_shard` for documents already laid out flat (tokens, offsets). Returns the file's sha256."""
    data = ipc_bytes(tokens, offsets, dtype)
    write_bytes(location, data)
    return hashlib.sha256(data).hexdigest()


class Shard:
    """A shard: `tokens` is the flat stream (zero-copy from a memory map when local); `offsets` cut it into documents."""

    def __init__(self, location: str | Path):
        self.location = location
        path = local_path(location)
        if path is not None:
            self.path = path
            source = pa.memory_map(str(path), "r")
        else:
            self.path = None
            source = pa.BufferReader(read_bytes(location))
        try:
            table = pa.ipc.open_file(source).read_all()
            column = table.column(TOKENS)
        except (pa.ArrowInvalid, KeyError) as err:  # truncated or not Arrow IPC; no tokens column
            raise ShardError(
                f"{location}: not a token shard (an Arrow IPC file with a {TOKENS!r} column): {one_line(err)}; "
                f"re-run the tokenize stage"
            ) from None
        if column.num_chunks != 1:
            column = pa.chunked_array([column.combine_chunks()])  # only for shards not written here
        arr = column.chunk(0)
        self.offsets = arr.offsets.to_numpy()
        self.tokens: np.ndarray = arr.values.to_numpy(zero_copy_only=True)[: self.offsets[-1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def sha256_bytes_of(location: str | Path) -> str:
    """sha256 of a shard file, local or remote."""
    path = local_path(location)
    if path is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    return hashlib.sha256(read_bytes(location)).hexdigest()

