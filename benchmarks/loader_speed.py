"""Benchmark batch sampling: lmcore's TokenLoader against nanoGPT's `get_batch` on the same tokens, in one run.

    .venv/bin/python -m benchmarks.loader_speed
    .venv/bin/python -m benchmarks.loader_speed --tokens 50000000 --batches 1000 --repeats 9 --shapes 12x1024,32x512

One token stream (random GPT-2 ids, cut into documents of varied length that each end with <|endoftext|>) is
written twice into a temporary folder:
- nanoGPT: `train.bin`, the stream as `np.uint16` (`arr.tofile`), as nanoGPT's prepare.py writes it;
- lmcore: Arrow shards of unequal size through `lmcore.data.shards.write_shard`, plus a manifest.
Then, alternating, `--repeats` times, each reader makes `--batches` batches of each shape (B x T):
- nanoGPT: `get_batch` as its train.py runs it on CPU: a new `np.memmap` every call, `torch.randint` starts,
  `torch.stack` of one `astype(np.int64)` slice per row, for x and again for y;
- lmcore: `TokenLoader(..., mode="random").next_batch()` on a dataset opened once.
A sequential row times a shuffled epoch (`mode="sequential"`) against the same nanoGPT per-row reader given
the same window starts in the same order. Prints batches/s of each (median over repeats) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmcore.data.loader import SEQUENTIAL, TokenDataset, TokenLoader
from lmcore.data.shards import write_shard
from lmcore.paths import MANIFEST

VOCAB = 50257
EOT = 50256
SHARD_FRACTIONS = (0.4, 0.25, 0.2, 0.15)  # unequal shards, as a tokenize run leaves them


def build(root: Path, n_tokens: int, seed: int) -> np.ndarray:
    """Write train.bin and Arrow shards + manifest of one random stream; returns each shard's first stream position."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, EOT, size=n_tokens, dtype=np.uint16)
    ends = np.cumsum(rng.geometric(1 / 1500, size=n_tokens // 100 + 10))  # documents of ~1500 tokens
    ends = np.append(ends[ends < n_tokens], n_tokens)
    stream[ends - 1] = EOT
    stream.tofile(root / "train.bin")  # nanoGPT's format

    bounds = np.concatenate([[0], ends])  # document i is stream[bounds[i] : bounds[i + 1]]
    cuts = np.searchsorted(ends, np.cumsum(SHARD_FRACTIONS)[:-1] * n_tokens) + 1  # shards end at document ends
    shards, firsts = [], []
    for i, doc_ids in enumerate(np.split(np.arange(len(ends)), cuts)):
        lo, hi = int(bounds[doc_ids[0]]), int(bounds[doc_ids[-1] + 1])
        name = f"train-{i:05d}.arrow"
        sha = write_shard(root / name, [stream[bounds[j] : bounds[j + 1]] for j in doc_ids], np.dtype(np.uint16))
        shards.append({"file": name, "split": "train", "documents": len(doc_ids), "tokens": hi - lo, "sha256": sha})
        firsts.append(lo)
    manifest = {"vocab_size": VOCAB, "eot_token": EOT, "dtype": "uint16", "encoding": "random", "shards": shards}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return np.array(firsts)


def nanogpt_get_batch(data_dir: Path, batch_size: int, block_size: int, ix: torch.Tensor | None = None):
    """nanoGPT train.py's get_batch('train') on CPU (device_type 'cpu'); `ix` given only for sequential order."""
    # We recreate np.memmap every batch to avoid a memory leak, as nanoGPT does
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    if ix is None:
        ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix])
    x, y = x.to("cpu"), y.to("cpu")
    return x, y


def timed(fn: Callable[[], object], n: int) -> float:
    """Batches per second over n calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def stream_positions(loader: TokenLoader, firsts: np.ndarray, epoch: int, step: int) -> np.ndarray:
    """train.bin positions of the windows of one loader batch."""
    shard_ids, offsets = loader.windows(epoch, step)
    return firsts[shard_ids] + offsets


def check_same_tokens(data_dir: Path, loader: TokenLoader, firsts: np.ndarray) -> None:
    """The loader's windows are the train.bin slices at the same stream positions."""
    flat = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    T = loader.context_length
    for _ in range(3):
        pos = stream_positions(loader, firsts, loader.epoch, loader.step)
        x, y = loader.next_batch()
        np.testing.assert_array_equal(x.numpy(), np.stack([flat[p : p + T] for p in pos]))
        np.testing.assert_array_equal(y.numpy(), np.stack([flat[p + 1 : p + 1 + T] for p in pos]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=25_000_000, help="stream length (>= 20M for the reported table)")
    parser.add_argument("--shapes", default="12x1024,64x256,8x2048", help="batch x block; the first is nanoGPT's default")
    parser.add_argument("--batches", type=int, default=500, help="batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="loader-speed-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        firsts = build(root, args.tokens, args.seed)
        for f in root.iterdir():  # both readers start from a warm page cache
            f.read_bytes()
        t_open = time.perf_counter()
        dataset = TokenDataset(root, "train")
        t_open = time.perf_counter() - t_open
        print(
            f"{args.tokens:,} tokens: train.bin and {len(dataset.shards)} Arrow shards "
            f"({', '.join(f'{len(s.tokens):,}' for s in dataset.shards)}) written in {time.perf_counter() - t0:.1f}s; "
            f"dataset opened in {t_open * 1e3:.1f} ms; torch threads {torch.get_num_threads()}; "
            f"{args.repeats} repeats x {args.batches} batches, medians"
        )

        rows = []
        for B, T in shapes:
            loader = TokenLoader(dataset, B, T, seed=args.seed)
            check_same_tokens(root, loader, firsts)
            rows.append(("random", B, T, *compare(
                lambda: nanogpt_get_batch(root, B, T), loader.next_batch, args.batches, args.repeats
            )))

        B, T = shapes[0]
        loader = TokenLoader(dataset, B, T, mode=SEQUENTIAL, seed=args.seed)
        check_same_tokens(root, loader, firsts)
        n = min(args.batches, (loader.batches_per_epoch - 3) // (args.repeats + 2))  # all within one epoch
        # nanoGPT's per-row reader fed the same stream positions in the same order (a shuffled epoch)
        positions = iter([torch.from_numpy(stream_positions(loader, firsts, 0, k)) for k in range(loader.step, loader.batches_per_epoch)])
        rows.append(("sequential", B, T, *compare(
            lambda: nanogpt_get_batch(root, B, T, next(positions)), loader.next_batch, n, args.repeats
        )))

    print()
    print("| mode | B x T | nanoGPT get_batch (batches/s) | lmcore TokenLoader (batches/s) | lmcore / nanoGPT |")
    print("|---|---|---:|---:|---:|")
    for mode, B, T, ref, ours in rows:
        print(f"| {mode} | {B} x {T} | {ref:,.0f} | {ours:,.0f} | {ours / ref:.2f}x |")


def compare(reference: Callable, ours: Callable, n: int, repeats: int) -> tuple[float, float]:
    """Median batches/s of each, alternating runs; one untimed warm-up run each."""
    timed(reference, max(1, n // 10))
    timed(ours, max(1, n // 10))
    ref, mine = [], []
    for _ in range(repeats):
        ref.append(timed(reference, n))
        mine.append(timed(ours, n))
    return statistics.median(ref), statistics.median(mine)


if __name__ == "__main__":
    main()
