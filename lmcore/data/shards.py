"""Token shards: Arrow IPC files with one row per document and a `tokens` column of list<uint16>.

uint32 is used when the vocabulary does not fit in 16 bits. Each document's tokens end with the
end-of-text token, so the flattened column is the training stream. Reading memory-maps the file and
hands out the flat token array without copying.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

TOKENS = "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: str | Path, docs: Sequence[np.ndarray], dtype: np.dtype) -> None:
    """Write documents (1-D token arrays) to an Arrow IPC file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pa_type = pa.from_numpy_dtype(dtype)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int32 if lengths.sum() < 2**31 else np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]) if docs else np.empty(0, dtype)
    list_cls = pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray
    column = list_cls.from_arrays(pa.array(offsets), pa.array(flat, type=pa_type))
    table = pa.table({TOKENS: column})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with pa.ipc.new_file(f, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(1, len(docs)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Shard:
    """A memory-mapped shard. `tokens` is the flat stream (zero-copy); `offsets` cut it into documents."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        table = pa.ipc.open_file(self._source).read_all()
        column = table.column(TOKENS)
        if column.num_chunks != 1:
            column = pa.chunked_array([column.combine_chunks()])  # only for shards not written here
        arr = column.chunk(0)
        self.offsets = arr.offsets.to_numpy()
        values = arr.values
        self.tokens: np.ndarray = values.to_numpy(zero_copy_only=True)[: self.offsets[-1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def open_shards(paths: Sequence[str | Path]) -> list[Shard]:
    return [Shard(p) for p in paths]
