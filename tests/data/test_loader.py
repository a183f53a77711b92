"""lmcore.data.loader: windows read from memory-mapped shards, checked against the raw token stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lmcore.data.loader import TokenDataset
from lmcore.data.shards import Shard, token_dtype, write_shard
from lmcore.io import write_json
from lmcore.paths import MANIFEST

VOCAB = 50257
DTYPE = token_dtype(VOCAB)


def make_split(root: Path, shard_docs: dict[str, list[np.ndarray]]) -> Path:
    """Shards named `<split>-<n>.arrow` -> documents, plus the manifest fields the loader reads."""
    shards = []
    for name, docs in shard_docs.items():
        write_shard(root / name, docs, DTYPE)
        n_tokens = int(sum(map(len, docs)))
        shards.append({"file": name, "split": name.split("-")[0], "documents": len(docs), "tokens": n_tokens})
    write_json(root / MANIFEST, {"vocab_size": VOCAB, "dtype": DTYPE.name, "shards": shards})
    return root


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """Three train shards of unequal size over one stream of distinct ids 0..3999, and a tiny val shard."""
    stream = np.arange(4000, dtype=DTYPE)
    docs = np.split(stream, [700, 1000, 1500, 2600, 3000, 3300])  # documents of varied length
    return make_split(
        tmp_path,
        {
            "train-00000.arrow": docs[:2],  # ids 0..999
            "train-00001.arrow": docs[2:5],  # 1000..2999
            "train-00002.arrow": docs[5:],  # 3000..3999
            "val-00000.arrow": [np.arange(5000, 5010, dtype=DTYPE)],
        },
    )


SHARD_OF = np.repeat([0, 1, 2], [1000, 2000, 1000])  # which train shard each stream id lives in


def test_random_batch_shapes_and_shift(data_dir):
    data = TokenDataset(data_dir, "train")
    assert data.n_tokens == 4000 and data.vocab_size == VOCAB
    x, y = data.random_batch(32, 64, np.random.default_rng(0))
    assert x.shape == y.shape == (32, 64) and x.dtype == y.dtype == torch.int64
    for xr, yr in zip(x.numpy(), y.numpy()):
        start = int(xr[0])  # ids are their own positions in the raw stream
        np.testing.assert_array_equal(xr, np.arange(start, start + 64))
        np.testing.assert_array_equal(yr, np.arange(start + 1, start + 65))
        assert SHARD_OF[start] == SHARD_OF[start + 64]  # a window never spans two shards


def test_random_batch_reaches_every_shard_and_the_last_window(data_dir):
    data = TokenDataset(data_dir, "train")
    x, y = data.random_batch(4096, 8, np.random.default_rng(1))
    starts = x[:, 0].numpy()
    assert set(SHARD_OF[starts]) == {0, 1, 2}
    assert starts.min() == 0 and y[:, -1].max().item() == 3999


def test_random_batch_deterministic_for_seed(data_dir):
    data = TokenDataset(data_dir, "train")
    a = data.random_batch(8, 16, np.random.default_rng(123))
    b = data.random_batch(8, 16, np.random.default_rng(123))
    c = data.random_batch(8, 16, np.random.default_rng(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_sequential_batches_cover_windows_in_order(data_dir):
    data = TokenDataset(data_dir, "train")
    T = 100
    shards = ((0, 1000), (1000, 2000), (3000, 1000))  # (first id, length)
    expected = [np.arange(lo + off, lo + off + T) for lo, n in shards for off in range(0, n - T, T)]
    batches = list(data.sequential_batches(7, T))
    assert [len(b[0]) for b in batches] == [7] * (len(expected) // 7) + ([len(expected) % 7] if len(expected) % 7 else [])
    xs = torch.cat([x for x, _ in batches]).numpy()
    ys = torch.cat([y for _, y in batches]).numpy()
    np.testing.assert_array_equal(xs, np.stack(expected))
    np.testing.assert_array_equal(ys, np.stack(expected) + 1)
    assert len(list(data.sequential_batches(7, T, max_batches=2))) == 2


def test_too_small_split_is_a_clear_error(data_dir):
    val = TokenDataset(data_dir, "val")
    with pytest.raises(ValueError, match=r"'val' has 10 tokens, too few for windows of 10\+1"):
        val.random_batch(2, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="too few"):
        next(val.sequential_batches(2, 10))
    x, y = val.random_batch(2, 9, np.random.default_rng(0))  # exactly one window fits
    assert x[0].tolist() == list(range(5000, 5009)) and y[0].tolist() == list(range(5001, 5010))


def test_missing_manifest_or_split(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="tokenize"):
        TokenDataset(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="no shards for split 'test'"):
        TokenDataset(data_dir, "test")


def test_shard_tokens_are_memory_mapped(tmp_path):
    n = 2_000_000  # 4 MB of uint16
    write_shard(tmp_path / "big.arrow", [np.arange(n, dtype=np.uint64).astype(DTYPE)], DTYPE)
    before = pa.total_allocated_bytes()
    shard = Shard(tmp_path / "big.arrow")
    assert pa.total_allocated_bytes() - before < n * DTYPE.itemsize // 10  # nothing copied into Arrow memory
    assert shard.tokens.dtype == DTYPE and len(shard.tokens) == n
    assert not shard.tokens.flags.writeable and not shard.tokens.flags.owndata  # a read-only view of the map
    assert shard.tokens[12345] == 12345 and shard.tokens[-1] == (n - 1) % 65536
