"""Batches of token windows read from memory-mapped Arrow shards.

    data = TokenDataset("data/tokens", "train")
    x, y = data.random_batch(16, 128, np.random.default_rng(0))  # (B, T) int64 each; y is x shifted by one
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmcore.data.shards import Shard
from lmcore.io import read_json
from lmcore.paths import MANIFEST


class TokenDataset:
    """The shards of one split (`train` or `val`) listed in a tokenize manifest."""

    def __init__(self, tokens_dir: str | Path, split: str):
        self.dir = Path(tokens_dir)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no tokenize manifest (run the tokenize stage first)")
        self.manifest = read_json(manifest_path)
        self.split = split
        files = [s["file"] for s in self.manifest["shards"] if s["split"] == split]
        if not files:
            raise ValueError(f"{manifest_path}: no shards for split {split!r}")
        self.shards = [Shard(self.dir / f) for f in files]
        self.n_tokens = sum(len(s.tokens) for s in self.shards)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def _windows_per_shard(self, context_length: int) -> np.ndarray:
        counts = np.array([max(0, len(s.tokens) - context_length) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise ValueError(
                f"{self.dir}: split {self.split!r} has {self.n_tokens} tokens, too few for windows of "
                f"{context_length}+1; lower context_length or add data"
            )
        return counts

    def random_batch(self, batch_size: int, context_length: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows at uniformly random positions across the split (shards weighted by size)."""
        counts = self._windows_per_shard(context_length)
        starts = rng.integers(0, counts.sum(), size=batch_size)
        cum = np.cumsum(counts)
        shard_ids = np.searchsorted(cum, starts, side="right")
        offsets = starts - (cum[shard_ids] - counts[shard_ids])
        buf = np.empty((batch_size, context_length + 1), dtype=np.int64)
        for row, (si, off) in enumerate(zip(shard_ids, offsets)):
            buf[row] = self.shards[si].tokens[off : off + context_length + 1]
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def sequential_batches(self, batch_size: int, context_length: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering each shard in order; the last batch may be smaller."""
        self._windows_per_shard(context_length)
        rows: list[np.ndarray] = []
        n_batches = 0
        for shard in self.shards:
            toks = shard.tokens
            for off in range(0, len(toks) - context_length, context_length):
                rows.append(toks[off : off + context_length + 1].astype(np.int64))
                if len(rows) == batch_size:
                    t = torch.from_numpy(np.stack(rows))
                    yield t[:, :-1].contiguous(), t[:, 1:].contiguous()
                    rows, n_batches = [], n_batches + 1
                    if max_batches is not None and n_batches >= max_batches:
                        return
        if rows:
            t = torch.from_numpy(np.stack(rows))
            yield t[:, :-1].contiguous(), t[:, 1:].contiguous()
