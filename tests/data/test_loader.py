"""lmcore.data.loader: windows read from memory-mapped shards, checked against the raw token stream."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lmcore.data.loader import TokenDataset, TokenLoader
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


# TokenLoader. In the fixture every token id is its own position in the stream, so a row names its window.
T = 50  # windows of 51 tokens: (1000-1)//50 + (2000-1)//50 + (1000-1)//50 = 19 + 39 + 19 = 77 sequential windows
SEQ_STARTS = np.array([lo + off for lo, n in ((0, 1000), (1000, 2000), (3000, 1000)) for off in range(0, n - T, T)])


def starts_of(batches) -> np.ndarray:
    return np.concatenate([x[:, 0].numpy() for x, _ in batches])


def check_windows(x: torch.Tensor, y: torch.Tensor) -> None:
    """Every row is a slice of the raw stream inside one shard, y one token ahead of x."""
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
    starts = x[:, :1].numpy()
    np.testing.assert_array_equal(x.numpy(), starts + np.arange(x.shape[1]))
    np.testing.assert_array_equal(y.numpy(), starts + 1 + np.arange(x.shape[1]))
    assert (SHARD_OF[starts[:, 0]] == SHARD_OF[starts[:, 0] + x.shape[1]]).all()


def same(a, b) -> bool:
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_loader_windows_are_stream_slices(data_dir, mode):
    loader = TokenLoader(TokenDataset(data_dir, "train"), 16, T, mode=mode, seed=3)
    batches = list(islice(loader, 6))  # sequential: one epoch of 77 windows, the last batch partial
    assert [len(x) for x, _ in batches] == ([16] * 6 if mode == "random" else [16] * 4 + [13])
    for x, y in batches:
        assert x.shape[1] == T
        check_windows(x, y)


def test_random_mode_is_a_pure_function_of_seed_and_batch_index(data_dir):
    data = TokenDataset(data_dir, "train")
    a = list(islice(TokenLoader(data, 8, T, seed=5), 5))
    b = list(islice(TokenLoader(data, 8, T, seed=5), 5))
    c = list(islice(TokenLoader(data, 8, T, seed=6), 5))
    assert same(a, b) and not torch.equal(a[0][0], c[0][0])
    # batch k depends on (seed, k) alone: uniform over the 3976 valid starts, shards in order
    counts = np.array([1000 - T, 2000 - T, 1000 - T])
    flat = np.random.default_rng([5, 3]).integers(0, counts.sum(), size=8)
    shard = np.searchsorted(np.cumsum(counts), flat, side="right")
    expected = flat - (np.cumsum(counts) - counts)[shard] + np.array([0, 1000, 3000])[shard]
    np.testing.assert_array_equal(a[3][0][:, 0].numpy(), expected)
    shard_ids, offsets = TokenLoader(data, 8, T, seed=5).windows(0, 3)  # where batch 3 reads, without reading it
    np.testing.assert_array_equal(np.array([0, 1000, 3000])[shard_ids] + offsets, expected)


def test_random_mode_is_uniform_over_window_starts(data_dir):
    starts = starts_of(islice(TokenLoader(TokenDataset(data_dir, "train"), 64, T, seed=0), 200))  # 12800 windows
    valid = np.array([1000 - T, 2000 - T, 1000 - T])  # starts with T+1 tokens left in the shard
    share = np.bincount(SHARD_OF[starts], minlength=3) / len(starts)
    np.testing.assert_allclose(share, valid / valid.sum(), atol=0.02)  # sd about 0.004
    assert starts.min() < 10 and 3940 < starts.max() <= 3999 - T
    span = np.concatenate([np.arange(end - T, end) for end in (1000, 3000, 4000)])  # would leave their shard
    assert not np.isin(starts, span).any()


def test_sequential_epoch_covers_every_window_once_and_reshuffles(data_dir):
    data = TokenDataset(data_dir, "train")
    loader = TokenLoader(data, 7, T, mode="sequential", seed=1)
    assert len(loader) == loader.batches_per_epoch == 11  # 77 windows: 11 batches of 7
    first = list(loader)
    assert loader.epoch == 1 and loader.step == 0
    second = list(loader)
    assert loader.epoch == 2
    for batches in (first, second):
        for x, y in batches:
            check_windows(x, y)
        np.testing.assert_array_equal(np.sort(starts_of(batches)), SEQ_STARTS)  # each window exactly once
    assert not np.array_equal(starts_of(first), starts_of(second))  # a new order each epoch
    assert not np.array_equal(starts_of(first), SEQ_STARTS)
    ordered = TokenLoader(data, 7, T, mode="sequential", shuffle=False)
    np.testing.assert_array_equal(starts_of(ordered), SEQ_STARTS)
    # drop_last: 77 windows in batches of 10 -> 7 full batches; the 8th partial one dropped or kept
    assert [len(x) for x, _ in TokenLoader(data, 10, T, mode="sequential", shuffle=False, drop_last=True)] == [10] * 7
    assert [len(x) for x, _ in TokenLoader(data, 10, T, mode="sequential", shuffle=False)] == [10] * 7 + [7]


@pytest.mark.parametrize("mode,interrupt", [("random", 7), ("sequential", 4), ("sequential", 15)])
def test_resume_mid_epoch_equals_an_uninterrupted_run(data_dir, mode, interrupt):
    data = TokenDataset(data_dir, "train")
    make = lambda: TokenLoader(data, 7, T, mode=mode, seed=11)  # noqa: E731
    whole = make()
    expected = [whole.next_batch() for _ in range(25)]  # sequential: more than two epochs of 11
    first = make()
    got = [first.next_batch() for _ in range(interrupt)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (summary.json)
    assert (state["epoch"], state["step"]) == (divmod(interrupt, 11) if mode == "sequential" else (0, interrupt))
    resumed = TokenLoader.from_state_dict(TokenDataset(data_dir, "train"), state)
    got += [resumed.next_batch() for _ in range(25 - interrupt)]
    assert same(got, expected)
    again = make()
    again.load_state_dict(state)
    assert same([again.next_batch()], [expected[interrupt]])
    assert resumed.state_dict() == whole.state_dict()


def test_ranks_take_disjoint_shares_that_cover_the_epoch(data_dir):
    data = TokenDataset(data_dir, "train")
    shares = [starts_of(TokenLoader(data, 5, T, mode="sequential", seed=2, rank=r, world_size=3)) for r in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), SEQ_STARTS)  # disjoint and complete
    even = [list(TokenLoader(data, 5, T, mode="sequential", seed=2, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert [[len(x) for x, _ in batches] for batches in even] == [[5] * 5] * 3  # 77 // 3 = 25 windows each
    flat = np.concatenate([starts_of(batches) for batches in even])
    assert len(np.unique(flat)) == 75 and np.isin(flat, SEQ_STARTS).all()
    # random mode: rank r takes batches r, r + world_size, ... of the single-process stream
    single = list(islice(TokenLoader(data, 4, T, seed=9), 6))
    for r in range(3):
        assert same(islice(TokenLoader(data, 4, T, seed=9, rank=r, world_size=3), 2), single[r::3])


def test_mismatched_state_is_a_clear_error(tmp_path, data_dir):
    data = TokenDataset(data_dir, "train")
    loader = TokenLoader(data, 8, T, mode="sequential", seed=0)
    loader.next_batch()
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"seed=0 \(saved\) vs 1 \(this loader\), batch_size=8 \(saved\) vs 16"):
        TokenLoader(data, 16, T, mode="sequential", seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="mode='sequential'"):
        TokenLoader(data, 8, T, seed=0).load_state_dict(state)
    other = make_split(tmp_path / "other", {"train-00000.arrow": [np.arange(4000, dtype=DTYPE)]})
    with pytest.raises(ValueError, match=r"saved for other shards: split 'train', 3 shards, 4000 tokens .* 1 shards, 4000 tokens"):
        TokenLoader.from_state_dict(TokenDataset(other, "train"), state)
    with pytest.raises(ValueError, match="outside an epoch of 10 batches"):
        loader.load_state_dict({**state, "step": 10})
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({**state, "version": 99})


def test_bad_settings_are_errors(data_dir):
    data = TokenDataset(data_dir, "train")
    with pytest.raises(ValueError, match="mode 'shuffled'"):
        TokenLoader(data, 8, T, mode="shuffled")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        TokenLoader(data, 8, T, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"77 windows of 50\+1, no batch for rank 0 of 1 at batch_size 100"):
        TokenLoader(data, 100, T, mode="sequential", drop_last=True)
    with pytest.raises(TypeError, match="infinite"):
        len(TokenLoader(data, 8, T))
    with pytest.raises(ValueError, match=r"'train' has 4000 tokens, too few for windows of 2000\+1 \(windows never span"):
        TokenLoader(data, 8, 2000)


def test_shards_shorter_than_a_window_are_skipped(tmp_path):
    stream = np.arange(300, dtype=DTYPE)
    root = make_split(tmp_path, {"train-0.arrow": [stream[:100]], "train-1.arrow": [stream[100:120]], "train-2.arrow": [stream[120:]]})
    data = TokenDataset(root, "train")
    starts = starts_of(islice(TokenLoader(data, 64, 30, seed=0), 20))
    assert not ((starts >= 70) & (starts < 120)).any() and (starts < 70).any() and (starts >= 120).any()
    seq = starts_of(TokenLoader(data, 4, 30, mode="sequential", shuffle=False))
    np.testing.assert_array_equal(seq, [0, 30, 60, 120, 150, 180, 210, 240])


def test_file_and_memory_urls(data_dir):
    local = list(islice(TokenLoader(TokenDataset(data_dir, "train"), 8, T, seed=4), 3))
    data = TokenDataset(data_dir.as_uri(), "train")  # file:///...
    assert data.dir == data_dir.as_uri() and data.fingerprint == TokenDataset(data_dir, "train").fingerprint
    assert same(islice(TokenLoader(data, 8, T, seed=4), 3), local)
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in data_dir.iterdir():
        fs.pipe_file(f"/lmcore-loader-test/{f.name}", f.read_bytes())
    try:
        remote = TokenDataset("memory://lmcore-loader-test", "train")  # read into memory whole, same windows
        assert same(islice(TokenLoader(remote, 8, T, seed=4), 3), local)
    finally:
        fs.rm("/lmcore-loader-test", recursive=True)


def test_dataset_tokens_are_read_only_views_of_the_file_map(tmp_path, data_dir):
    data = TokenDataset(data_dir, "train")
    maps = Path("/proc/self/maps")
    for shard, name in zip(data.shards, data.files):
        assert not shard.tokens.flags.writeable and not shard.tokens.flags.owndata
        if maps.exists():  # Linux: the array's memory lies inside a mapping of the shard file itself
            address = shard.tokens.ctypes.data
            ranges = [line.split()[0].split("-") for line in maps.read_text().splitlines() if line.endswith(str(data_dir / name))]
            assert any(int(lo, 16) <= address < int(hi, 16) for lo, hi in ranges)
    x, y = TokenLoader(data, 4, T).next_batch()
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # x and y are views of one batch
    assert not any(np.shares_memory(x.numpy(), s.tokens) for s in data.shards)  # the batch is its own copy

    n = 2_000_000  # opening a 4 MB split allocates nothing in Arrow memory
    big = make_split(tmp_path / "big", {"train-00000.arrow": [np.arange(n, dtype=np.uint64).astype(DTYPE)]})
    before = pa.total_allocated_bytes()
    TokenDataset(big, "train")
    assert pa.total_allocated_bytes() - before < n * DTYPE.itemsize // 10


def test_documents_longer_than_context(data_dir):
    data = TokenDataset(data_dir, "train")  # documents of 700, 300, 500, 1100, 400, 300, 700 tokens
    assert data.n_documents == 7
    assert data.documents_longer_than_context(499) == 3  # more than 500 tokens: 700, 1100, 700
    assert data.documents_longer_than_context(498) == 4  # 500 now counts
    assert TokenLoader(data, 4, 1099).documents_longer_than_context == 0
    assert TokenLoader(data, 4, 1098).documents_longer_than_context == 1
    assert TokenDataset(data_dir, "val").documents_longer_than_context(8) == 1
