"""Batches of token windows read from memory-mapped Arrow shards: random windows or sequential epochs, resumable.

    data = TokenDataset("data/tokens", "train")  # or a URL: "file:///data/tokens", "s3://bucket/tokens"
    loader = TokenLoader(data, batch_size=16, context_length=128, mode="random", seed=0)
    for x, y in loader:  # (B, T) int64 each; y is x shifted by one
        ...
    state = loader.state_dict()  # small and JSON-able
    loader = TokenLoader.from_state_dict(data, state)  # continues with the very next batch

A window is T+1 consecutive tokens of one shard (x its first T, y its last T); windows never span two
shards. Documents are not respected: a window may hold the end of one document, the end-of-text token and
the start of the next, and a document longer than a window is cut across windows, as in GPT-2 pretraining.

Modes:
- random: batch k holds `batch_size` window starts drawn from `np.random.default_rng([seed, k])`, uniform
  over every valid start of every shard (so shards weigh by their size). Infinite; batch k is a pure
  function of (seed, k), so a resumed run sees exactly the batches an uninterrupted one would.
- sequential: epochs over the non-overlapping windows (stride T) of every shard, in a permutation drawn from
  `np.random.default_rng([seed, epoch])` when `shuffle`, in shard order otherwise. One `for` loop over the
  loader is the rest of one epoch; the epoch counter then advances.

With world_size > 1 rank r takes random batches r, r + world_size, ... and, in sequential mode, windows
r, r + world_size, ... of each epoch's order: disjoint slices that together cover the epoch. drop_last=True
gives every rank the same number of full batches (what DDP needs).

Zero-copy: local shards are memory maps (lmcore.data.shards.Shard); a batch is gathered by one fancy index
per shard it touches, on a strided window view of the map, and only the (B, T+1) batch is materialised.
x and y are views of that one tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from lmcore.data.shards import Shard, ShardError, exists, is_url, join, read_bytes
from lmcore.errors import MissingInputError
from lmcore.paths import MANIFEST

RANDOM = "random"
SEQUENTIAL = "sequential"
MODES = (RANDOM, SEQUENTIAL)
STATE_VERSION = 1
# state_dict keys that must equal the loader's own settings for a resume to be exact.
_SETTINGS = ("mode", "seed", "shuffle", "drop_last", "batch_size", "context_length", "rank", "world_size")


class TokenDataset:
    """The shards of one split (`train` or `val`) listed in a tokenize manifest.

    Args:
        tokens_dir: a tokenize output folder, a local path or an fsspec URL.
        split: the manifest split to read.
    """

    def __init__(self, tokens_dir: str | Path, split: str):
        self.dir: str | Path = str(tokens_dir) if is_url(tokens_dir) else Path(tokens_dir)
        manifest_loc = join(self.dir, MANIFEST)
        if not exists(manifest_loc):
            raise MissingInputError(f"{manifest_loc}: no tokenize manifest (run the tokenize stage first)")
        self.manifest = _read_manifest(manifest_loc)
        self.split = split
        entries = [s for s in self.manifest["shards"] if s["split"] == split]
        if not entries:
            raise ShardError(f"{manifest_loc}: no shards for split {split!r}")
        self.files = [s["file"] for s in entries]
        self.shards = [Shard(join(self.dir, f)) for f in self.files]
        self.shard_tokens = np.array([len(s.tokens) for s in self.shards], dtype=np.int64)
        self.n_tokens = int(self.shard_tokens.sum())
        # Names, sizes and (when the manifest has them) checksums: a resume against other shards is an error.
        listing = [[f, int(n), s.get("sha256")] for f, n, s in zip(self.files, self.shard_tokens, entries)]
        self.fingerprint = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()[:16]
        self._views: dict[tuple[int, int], np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eot_token(self) -> int | None:
        return self.manifest.get("eot_token")

    @property
    def n_documents(self) -> int:
        return sum(len(s) for s in self.shards)

    def documents_longer_than_context(self, context_length: int) -> int:
        """Documents with more than context_length+1 tokens (cut across windows), counted from the offsets."""
        return int(sum(np.count_nonzero(np.diff(s.offsets) > context_length + 1) for s in self.shards))

    def random_window_counts(self, context_length: int) -> np.ndarray:
        """Valid window starts per shard: every start with T+1 tokens left in the shard."""
        return self._checked(np.maximum(0, self.shard_tokens - context_length), context_length)

    def sequential_window_counts(self, context_length: int) -> np.ndarray:
        """Non-overlapping windows (stride T) per shard."""
        return self._checked(np.maximum(0, (self.shard_tokens - 1) // context_length), context_length)

    def _checked(self, counts: np.ndarray, context_length: int) -> np.ndarray:
        if counts.sum() == 0:
            spans = (
                f" (windows never span shards; its largest shard has {self.shard_tokens.max()})"
                if self.n_tokens > context_length
                else ""
            )
            raise ShardError(
                f"{self.dir}: split {self.split!r} has {self.n_tokens} tokens, too few for windows of "
                f"{context_length}+1{spans}; lower context_length or add data"
            )
        return counts

    def _windows(self, shard: int, width: int) -> np.ndarray:
        """(n_starts, width) strided view of a shard's tokens: row i is tokens[i : i + width], no copy."""
        view = self._views.get((shard, width))
        if view is None:
            view = self._views[(shard, width)] = sliding_window_view(self.shards[shard].tokens, width)
        return view

    def gather(self, shard_ids: np.ndarray, offsets: np.ndarray, context_length: int) -> torch.Tensor:
        """Rows `tokens[off : off + T + 1]` of the given shards as one (B, T+1) int64 tensor.

        One fancy index per shard reached, straight from the (memory-mapped) token arrays.
        """
        width = context_length + 1
        groups = np.unique(shard_ids) if len(self.shards) > 1 else (0,)
        if len(groups) == 1:
            out = self._windows(int(groups[0]), width)[offsets].astype(np.int64)  # (B, T+1)
        else:
            out = np.empty((len(offsets), width), dtype=np.int64)  # (B, T+1)
            for s in groups:
                rows = np.flatnonzero(shard_ids == s)
                out[rows] = self._windows(int(s), width)[offsets[rows]]
        return torch.from_numpy(out)

    def random_batch(self, batch_size: int, context_length: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows at uniformly random positions across the split (shards weighted by size), drawn from rng."""
        counts = self.random_window_counts(context_length)
        cum = np.cumsum(counts)
        starts = rng.integers(0, cum[-1], size=batch_size)
        shard_ids = np.searchsorted(cum, starts, side="right")
        batch = self.gather(shard_ids, starts - (cum - counts)[shard_ids], context_length)
        return batch[:, :-1], batch[:, 1:]

    def sequential_batches(
        self, batch_size: int, context_length: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering each shard in order; the last batch may be smaller."""
        loader = TokenLoader(self, batch_size, context_length, mode=SEQUENTIAL, shuffle=False)
        n = loader.batches_per_epoch if max_batches is None else min(max_batches, loader.batches_per_epoch)
        for _ in range(n):
            yield loader.next_batch()


def _read_manifest(location: str | Path) -> dict[str, Any]:
    """A tokenize manifest, checked for what the loader reads: "vocab_size" and "shards" of {"file", "split"}."""
    try:
        manifest = json.loads(read_bytes(location))
    except json.JSONDecodeError as err:
        raise ShardError(f"{location}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}; re-run the tokenize stage") from None
    except UnicodeDecodeError as err:
        raise ShardError(f"{location}: not UTF-8 text ({err.reason} at byte offset {err.start}); re-run the tokenize stage") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "split"} <= s.keys() for s in shards):
        raise ShardError(f"{location}: not a tokenize manifest (no 'shards' list of {{file, split}}); re-run the tokenize stage")
    if "vocab_size" not in manifest:
        raise ShardError(f"{location}: not a tokenize manifest (no 'vocab_size'); re-run the tokenize stage")
    return manifest


class TokenLoader:
    """Batches of (x, y) windows from a TokenDataset, deterministic for a seed, resumable mid-epoch.

    Args:
        dataset: the split to read.
        batch_size: windows per batch (B).
        context_length: tokens per row of x and y (T); each window reads T+1 tokens.
        mode: "random" (infinite, uniform window starts) or "sequential" (epochs of non-overlapping windows).
        seed: a non-negative int; batch k (random) or epoch e's order (sequential) depends on (seed, k|e) only.
        shuffle: sequential mode: permute the windows per epoch (else shard order).
        rank, world_size: this process's disjoint share of the batches (random) or windows (sequential).
        drop_last: sequential mode: drop each epoch's last partial batch (and even out the ranks' shares).
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        context_length: int,
        *,
        mode: str = RANDOM,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        if batch_size < 1 or context_length < 1:
            raise ValueError(f"batch_size ({batch_size}) and context_length ({context_length}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 (world_size {world_size})")
        if seed < 0:
            raise ValueError(f"seed {seed} must be >= 0")
        self.dataset = dataset
        self.batch_size, self.context_length = int(batch_size), int(context_length)
        self.mode, self.seed, self.shuffle, self.drop_last = mode, int(seed), bool(shuffle), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0  # sequential: epochs completed; random: always 0
        self.step = 0  # batches this rank has yielded (random: in all; sequential: in the current epoch)

        window_counts = dataset.random_window_counts if mode == RANDOM else dataset.sequential_window_counts
        counts = window_counts(context_length)
        self._cum = np.cumsum(counts)  # window (start) ids below _cum[i] live in shards 0..i
        self._first = self._cum - counts  # first window id of each shard
        self.n_windows = int(self._cum[-1])  # random: valid starts; sequential: windows per epoch
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, this rank's window ids in order)
        if mode == SEQUENTIAL:
            per_rank = len(range(self.rank, self.n_windows, self.world_size))
            if drop_last:
                per_rank = (self.n_windows // self.world_size) // self.batch_size * self.batch_size
            self._per_rank = per_rank
            if per_rank == 0:
                raise ShardError(
                    f"{dataset.dir}: split {dataset.split!r} has {self.n_windows} windows of {context_length}+1, "
                    f"no batch for rank {rank} of {world_size} at batch_size {batch_size} (drop_last={drop_last})"
                )

    @property
    def batches_per_epoch(self) -> int | None:
        """This rank's batches per sequential epoch; None in random mode (no epochs)."""
        if self.mode == RANDOM:
            return None
        return -(-self._per_rank // self.batch_size)

    def __len__(self) -> int:
        if self.mode == RANDOM:
            raise TypeError("a random-mode TokenLoader is infinite")
        return self.batches_per_epoch

    @property
    def documents_longer_than_context(self) -> int:
        """Documents of the split with more than context_length+1 tokens: each is cut across windows."""
        return self.dataset.documents_longer_than_context(self.context_length)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Random: batches forever. Sequential: the rest of the current epoch."""
        if self.mode == RANDOM:
            while True:
                yield self.next_batch()
        for _ in range(self.batches_per_epoch - self.step):
            yield self.next_batch()

    def windows(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Where this rank's batch `step` of `epoch` (random mode: epoch 0) reads: (shard index, token offset) per row."""
        B, T = self.batch_size, self.context_length
        if self.mode == RANDOM:
            k = step * self.world_size + self.rank  # global batch index
            starts = np.random.default_rng([self.seed, k]).integers(0, self.n_windows, size=B)
            shard_ids = np.searchsorted(self._cum, starts, side="right")
            return shard_ids, starts - self._first[shard_ids]
        ids = self._epoch_order(epoch)[step * B : (step + 1) * B]
        shard_ids = np.searchsorted(self._cum, ids, side="right")
        return shard_ids, (ids - self._first[shard_ids]) * T

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (x, y), (B, T) int64 each, views of one (B, T+1) tensor; advances the state."""
        shard_ids, offsets = self.windows(self.epoch, self.step)
        batch = self.dataset.gather(shard_ids, offsets, self.context_length)  # (B, T+1)
        self.step += 1
        if self.mode == SEQUENTIAL and self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch[:, :-1], batch[:, 1:]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's window ids for an epoch, in order (drawn once per epoch)."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                order = np.arange(self.n_windows)
            self._order = (epoch, order[self.rank :: self.world_size][: self._per_rank])
        return self._order[1]

    def state_dict(self) -> dict[str, Any]:
        """The loader's settings and position, plus the dataset's fingerprint; JSON-able."""
        return {
            "version": STATE_VERSION,
            **{key: getattr(self, key) for key in _SETTINGS},
            "epoch": self.epoch,
            "step": self.step,
            "dataset": {
                "split": self.dataset.split,
                "shards": len(self.dataset.shards),
                "tokens": self.dataset.n_tokens,
                "fingerprint": self.dataset.fingerprint,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (a state_dict): the next batch is the one that followed it.

        Raises: ValueError when the state was saved for other shards or other loader settings.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this lmcore reads version {STATE_VERSION}")
        saved, here = state["dataset"], self.state_dict()["dataset"]
        if saved["fingerprint"] != here["fingerprint"]:
            raise ValueError(
                f"loader state was saved for other shards: split {saved['split']!r}, {saved['shards']} shards, "
                f"{saved['tokens']} tokens (fingerprint {saved['fingerprint']}); {self.dataset.dir} has split "
                f"{here['split']!r}, {here['shards']} shards, {here['tokens']} tokens (fingerprint {here['fingerprint']})"
            )
        wrong = [
            f"{key}={state[key]!r} (saved) vs {getattr(self, key)!r} (this loader)"
            for key in _SETTINGS
            if state[key] != getattr(self, key)
        ]
        if wrong:
            raise ValueError(
                "loader state does not match this loader: " + ", ".join(wrong)
                + "; build it with TokenLoader.from_state_dict(dataset, state) to resume exactly"
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or step < 0 or (self.mode == SEQUENTIAL and step >= self.batches_per_epoch):
            raise ValueError(
                f"loader state position epoch={epoch}, step={step} is outside an epoch of {self.batches_per_epoch} batches"
            )
        self.epoch, self.step = epoch, step

    @classmethod
    def from_state_dict(cls, dataset: TokenDataset, state: dict[str, Any]) -> TokenLoader:
        """A loader with the saved settings, positioned where the state was taken."""
        options = ("mode", "seed", "shuffle", "rank", "world_size", "drop_last")
        loader = cls(dataset, state["batch_size"], state["context_length"], **{key: state[key] for key in options})
        loader.load_state_dict(state)
        return loader
