"""The tokenize stage: clean documents -> train/val token shards and a manifest, streamed and in parallel.

    manifest = tokenize(params.tokenize, "data/clean", "data/tokens", seed=params.seed, tokenizer=get_tokenizer("gpt2"))
    manifest = tokenize(cfg, "data/clean", "s3://bucket/tokens", seed=1337, tokenizer=load_tokenizer("models/base"))

`documents.jsonl` (one `{"id", "source", "text"}` object per line) is cut into slices of about
`shard_bytes` at line boundaries; slice k becomes `train-0000k.arrow` and `val-0000k.arrow`. A document
goes to val when a seeded hash of its text falls below `val_fraction`, so the split needs no pass over
the data and duplicates never straddle it. Slices depend on the input bytes and the config alone, so
the output is byte-identical whatever the number of workers or the runner (a process pool here,
Dask through `tasks/`).

Memory stays bounded: a worker holds one slice's tokens, encodes its text a megabyte at a time and
reads the input line by line; the planner reads the input once, in blocks, to hash it.

Resuming: a local output is built in a hidden sibling (`.tokens.partial/`) and renamed over the old
folder only when complete, so a failure leaves the previous output as it was. Every finished slice
leaves a record there (`_progress/<k>.json`: its fingerprint and the sha256 of its shards) beside
shards written atomically. A re-run after a kill re-uses every slice whose record matches and whose
shards still hash to the recorded sha256, encodes the rest, and ends with the same bytes as an
uninterrupted run. A URL output (s3://...) is written in place, `manifest.json` last: a folder
without it is unfinished.

The three steps are public so that an orchestrator can run the middle one anywhere:

    plan = plan_tokenize(cfg, clean_dir, out_dir, seed)
    records = [encode_shard(job) for job in plan.pending]   # any executor: a pool, Dask workers
    manifest = finish_tokenize(plan, records)
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmcore.config import TokenizeConfig
from lmcore.data.shards import (
    Shard,
    exists,
    file_size,
    join,
    list_dir,
    local_path,
    open_binary,
    read_bytes,
    remove,
    sha256_bytes_of,
    token_dtype,
    write_bytes,
    write_shard_flat,
)
from lmcore.errors import InputError, MissingInputError
from lmcore.io import replace_dir
from lmcore.paths import DOCUMENTS, MANIFEST
from lmcore.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
PROGRESS = "_progress"
# Bumped when the shard layout changes, so old progress records are never re-used.
FORMAT_VERSION = 2
# Text handed to one encode call: tiktoken returns Python lists of ints (~36 bytes a token), so
# encoding a slice a megabyte at a time keeps that transient cost small.
ENCODE_BATCH_BYTES = 1 << 20
READ_BLOCK = 1 << 22


class TokenizeError(InputError):
    """Input that cannot be tokenized; the message names the file and line."""


@dataclass(frozen=True)
class ShardJob:
    """One slice of documents.jsonl (bytes [start, end), lines from `first_line`) and where its shards go."""

    index: int
    start: int
    end: int
    first_line: int
    documents: str
    out_dir: str
    fingerprint: str
    tokenizer_dir: str  # a local folder carrying the tokenizer (lmcore.tokenizer.load_tokenizer)
    tokenizer_sha256: str
    val_fraction: float
    seed: int
    threads: int = 1

    def shard_name(self, split: str) -> str:
        return f"{split}-{self.index:05d}.arrow"


@dataclass
class TokenizePlan:
    jobs: list[ShardJob]
    pending: list[ShardJob]
    reused: dict[int, dict]  # slice index -> its progress record, verified
    out_dir: str
    work_dir: str  # where shards are written: a hidden sibling of a local out_dir, else out_dir itself
    header: dict[str, Any] = field(default_factory=dict)  # the manifest's fields that describe the run
    tokenizer_dir: str = ""  # the local folder the tokenizer's files were saved in


def _scan(location: str | Path, size: int, shard_bytes: int) -> tuple[str, list[tuple[int, int, int]]]:
    """One pass in blocks: the file's sha256 and its slices (start, end, first line number).

    A slice ends at the first line end that makes it at least `shard_bytes` long; the last takes the rest.
    """
    h = hashlib.sha256()
    cuts, first_lines = [0], [1]
    lines = 0  # newlines before the current block
    pos = 0  # offset of the current block
    next_cut = shard_bytes
    with open_binary(location) as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
            counted, lines_at = 0, lines
            search = max(next_cut - 1 - pos, 0)
            while search < len(block):
                nl = block.find(b"\n", search)
                if nl < 0:
                    break
                lines_at += block.count(b"\n", counted, nl + 1)
                counted = nl + 1
                if pos + nl + 1 < size:
                    cuts.append(pos + nl + 1)
                    first_lines.append(lines_at + 1)
                next_cut = pos + nl + 1 + shard_bytes
                search = next_cut - 1 - pos
            lines = lines_at + block.count(b"\n", counted)
            pos += len(block)
    cuts.append(size)
    return h.hexdigest(), [(cuts[i], cuts[i + 1], first_lines[i]) for i in range(len(cuts) - 1)]


def plan_tokenize(cfg: TokenizeConfig, clean_dir: str | Path, out_dir: str | Path, seed: int, tokenizer: Tokenizer) -> TokenizePlan:
    """Slice the input, and find which slices a previous (killed or finished) run already wrote.

    Args:
        cfg: val fraction, shard size.
        clean_dir: the preprocess output (path or URL) holding documents.jsonl.
        out_dir: the shard folder (path or URL); an unfinished run's shards there are re-used when they
            match, anything else is replaced. The tokenizer's files are written into it beside the shards.
        seed: seeds the train/val split.
        tokenizer: what encodes the text (lmcore.tokenizer); its sha256 is part of every slice's fingerprint.
    """
    documents = str(join(clean_dir, DOCUMENTS))
    try:
        size = file_size(documents)
    except FileNotFoundError:
        raise MissingInputError(f"{documents}: no documents file (run the preprocess stage first)") from None
    if size == 0:
        raise TokenizeError(f"{documents}: no documents to tokenize (the file is empty)")
    digest, slices = _scan(documents, size, cfg.shard_bytes)
    config = {
        "format_version": FORMAT_VERSION,
        "documents_sha256": digest,
        "tokenizer": tokenizer.identity,
        "val_fraction": cfg.val_fraction,
        "seed": seed,
        "shard_bytes": cfg.shard_bytes,
    }
    config_fp = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    out = str(out_dir)
    work = _work_dir(out)
    # The workers load the tokenizer from a local folder: the hidden work folder itself, or a temporary one
    # beside a URL output (whose files are uploaded with the manifest).
    tokenizer_dir = work if local_path(work) is not None else tempfile.mkdtemp(prefix="lmcore-tokenizer-")
    tokenizer.save(local_path(tokenizer_dir) or tokenizer_dir)
    jobs = [
        ShardJob(
            index=k, start=s, end=e, first_line=line, documents=documents, out_dir=work,
            fingerprint=hashlib.sha256(f"{config_fp}:{k}:{s}:{e}".encode()).hexdigest(),
            tokenizer_dir=str(local_path(tokenizer_dir) or tokenizer_dir), tokenizer_sha256=tokenizer.sha256, val_fraction=cfg.val_fraction, seed=seed,
        )
        for k, (s, e, line) in enumerate(slices)
    ]
    # The manifest goes first: from here until finish_tokenize the folder is visibly unfinished.
    remove(join(work, MANIFEST))
    reused = _verified_records(jobs, work)
    pending = [j for j in jobs if j.index not in reused]
    header = {
        "encoding": tokenizer.name,
        "tokenizer": tokenizer.identity,
        "vocab_size": tokenizer.n_vocab,
        "eot_token": tokenizer.eot_token,
        "dtype": token_dtype(tokenizer.n_vocab).name,
        "seed": seed,
        "val_fraction": cfg.val_fraction,
        "shard_bytes": cfg.shard_bytes,
        "documents_sha256": digest,
        "documents_bytes": size,
        "config_fingerprint": config_fp,
    }
    log.info(
        "tokenize plan: %s (%d bytes) in %d slice(s) with %s; %d re-used from an earlier run, %d to encode",
        documents, size, len(jobs), tokenizer.name, len(reused), len(pending),
    )
    return TokenizePlan(jobs=jobs, pending=pending, reused=reused, out_dir=out, work_dir=work, header=header,
                        tokenizer_dir=str(local_path(tokenizer_dir) or tokenizer_dir))


def _work_dir(out_dir: str) -> str:
    path = local_path(out_dir)
    if path is None:
        return out_dir
    work = path.parent / f".{path.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    return str(work)


def _verified_records(jobs: list[ShardJob], out_dir: str) -> dict[int, dict]:
    """Progress records of slices already done: same fingerprint, shards present with the recorded sha256."""
    done: dict[int, dict] = {}
    names = set(list_dir(join(out_dir, PROGRESS)))
    for job in jobs:
        name = f"{job.index:05d}.json"
        if name not in names:
            continue
        try:
            record = json.loads(read_bytes(join(join(out_dir, PROGRESS), name)))
        except (OSError, ValueError):
            continue
        if record.get("fingerprint") != job.fingerprint:
            continue
        shards = [s for s in record.get("shards", [])]
        if all(exists(join(out_dir, s["file"])) and sha256_bytes_of(join(out_dir, s["file"])) == s["sha256"] for s in shards):
            done[job.index] = record
        else:
            log.warning("slice %d: a shard is missing or does not match its recorded sha256; encoding it again", job.index)
    return done


def _in_val(text: bytes, seed: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(text, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0**64


def _lines(job: ShardJob):
    """(line number, raw line) for the slice, read line by line."""
    with open_binary(job.documents) as f:
        f.seek(job.start)
        pos, lineno = job.start, job.first_line
        while pos < job.end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            yield lineno, raw
            lineno += 1


def _parse(raw: bytes, where: str) -> str:
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as err:
        raise TokenizeError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise TokenizeError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(doc, dict):
        raise TokenizeError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    for key in ("id", "source", "text"):
        if not isinstance(doc.get(key), str):
            raise TokenizeError(f"{where}: key {key!r} missing or not a string")
    return doc["text"]


class _SplitBuffer:
    """Tokens of one split as a growing flat array plus document lengths (with the end-of-text token)."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.parts: list[np.ndarray] = []
        self.lengths: list[int] = []

    def add(self, batch: list[list[int]], eot: int) -> None:
        if not batch:
            return
        n = [len(ids) for ids in batch]
        flat = np.fromiter(itertools.chain.from_iterable(batch), dtype=self.dtype, count=sum(n))
        self.parts.append(np.insert(flat, np.cumsum(n), eot))  # eot after each document
        self.lengths.extend(k + 1 for k in n)

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.concatenate(self.parts) if self.parts else np.empty(0, self.dtype)
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return tokens, offsets


def encode_shard(job: ShardJob) -> dict:
    """Encode one slice into its train and val shards (atomic writes) and record it as done.

    Returns:
        The slice's record: {"index", "fingerprint", "shards": [{"file", "split", "documents", "tokens",
        "sha256"}], "longest_document": tokens}.
    """
    enc = _tokenizer(job.tokenizer_dir, job.tokenizer_sha256)
    eot = enc.eot_token
    dtype = token_dtype(enc.n_vocab)
    buffers = {s: _SplitBuffer(dtype) for s in SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending_bytes = 0

    def flush() -> None:
        for split, texts in pending.items():
            if texts:
                buffers[split].add(enc.encode_ordinary_batch(texts, num_threads=job.threads), eot)
                texts.clear()

    for lineno, raw in _lines(job):
        text = _parse(raw, f"{job.documents}:{lineno}")
        split = "val" if _in_val(text.encode("utf-8", "surrogatepass"), job.seed, job.val_fraction) else "train"
        pending[split].append(text)
        pending_bytes += len(raw)
        if pending_bytes >= ENCODE_BATCH_BYTES:
            flush()
            pending_bytes = 0
    flush()

    shards, longest = [], 0
    for split in SPLITS:
        tokens, offsets = buffers[split].flat()
        if len(offsets) == 1:
            continue  # no document of this split in the slice
        name = job.shard_name(split)
        sha = write_shard_flat(join(job.out_dir, name), tokens, offsets, dtype)
        longest = max(longest, int(np.diff(offsets).max()))
        shards.append({"file": name, "split": split, "documents": len(offsets) - 1, "tokens": int(len(tokens)), "sha256": sha})
    record = {"index": job.index, "fingerprint": job.fingerprint, "shards": shards, "longest_document": longest}
    write_bytes(join(join(job.out_dir, PROGRESS), f"{job.index:05d}.json"), json.dumps(record).encode())
    return record


@functools.lru_cache(maxsize=2)
def _tokenizer(folder: str, sha256: str) -> Tokenizer:
    """The tokenizer saved in `folder`, once per process (a worker encodes many slices)."""
    tok = load_tokenizer(folder)
    if tok.sha256 != sha256:
        raise TokenizeError(f"{folder}: holds tokenizer {tok.name} ({tok.sha256[:12]}), not the planned {sha256[:12]}")
    return tok


def finish_tokenize(plan: TokenizePlan, records: list[dict]) -> dict[str, Any]:
    """Check every slice is done, write manifest.json (last), and remove progress records and stale files."""
    by_index = {**plan.reused, **{r["index"]: r for r in records}}
    missing = [j.index for j in plan.jobs if j.index not in by_index]
    if missing:
        raise RuntimeError(f"tokenize: slices {missing[:10]} have no result; run again to finish them")
    shards: list[dict] = []
    totals = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    longest = 0
    for job in plan.jobs:
        record = by_index[job.index]
        longest = max(longest, record["longest_document"])
        for s in record["shards"]:
            shards.append({**s, "slice": job.index, "input_bytes": [job.start, job.end]})
            totals[s["split"]]["documents"] += s["documents"]
            totals[s["split"]]["tokens"] += s["tokens"]
    shards.sort(key=lambda s: (SPLITS.index(s["split"]), s["slice"]))
    for split in SPLITS:
        if totals[split]["documents"] == 0:
            n = sum(t["documents"] for t in totals.values())
            raise TokenizeError(
                f"{plan.jobs[0].documents}: no document fell in the {split} split ({n} documents, "
                f"val_fraction={plan.header['val_fraction']}); add documents or change val_fraction"
            )
    manifest = {
        **plan.header,
        "splits": totals,
        "longest_document_tokens": longest,
        "slices": len(plan.jobs),
        "shards": shards,
    }
    work = plan.work_dir
    keep = {s["file"] for s in shards}
    for name in list_dir(work):
        if name != MANIFEST and name not in keep and (name.endswith(".arrow") or name.endswith(".tmp")):
            remove(join(work, name))
    progress = join(work, PROGRESS)
    for name in list_dir(progress):
        remove(join(progress, name))
    if local_path(progress) is not None and local_path(progress).is_dir():
        local_path(progress).rmdir()
    if local_path(work) is None:  # a URL output: its tokenizer files go up beside the shards
        for path in Path(plan.tokenizer_dir).iterdir():
            write_bytes(join(work, path.name), path.read_bytes())
    write_bytes(join(work, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    if work != plan.out_dir:
        replace_dir(Path(work), Path(local_path(plan.out_dir)))
    return manifest


def tokenize(
    cfg: TokenizeConfig,
    clean_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    *,
    tokenizer: Tokenizer | None = None,
    workers: int | None = None,
    map_jobs: Callable[[Callable[[ShardJob], dict], list[ShardJob]], list[dict]] | None = None,
) -> dict[str, Any]:
    """Tokenize `clean_dir/documents.jsonl` into train/val shards under `out_dir` (a path or fsspec URL).

    Args:
        cfg: val fraction, shard size, workers.
        clean_dir: the preprocess stage's output folder.
        out_dir: the shard folder; slices an earlier, unfinished run completed are re-used. It carries the
            tokenizer's files (tokenizer_config.json and its vocabulary), and the manifest its identity.
        seed: seeds the train/val split.
        tokenizer: what encodes the text (lmcore.tokenizer: GPT-2's, a base model's, a tokenizer.json); None:
            what `cfg.tokenizer` names (relative paths from the working directory; no base model).
        workers: overrides cfg.workers (0: one process per core).
        map_jobs: runs `encode_shard` over the pending slices elsewhere, as (fn, jobs) -> records in order
            (e.g. a Prefect task per slice on Dask); None: a local process pool of `workers`.

    Returns:
        The manifest, as written to `out_dir/manifest.json`, plus a "run" entry (slices encoded and re-used,
        workers, seconds) that is not written, since it differs between a resumed and a fresh run.
    """
    t0 = time.perf_counter()
    if tokenizer is None:
        tokenizer = resolve_tokenizer(cfg.tokenizer, root=Path.cwd(), ranks_file=cfg.ranks_file, base_dir=None)
    plan = plan_tokenize(cfg, clean_dir, out_dir, seed, tokenizer)
    n_workers = workers if workers is not None else cfg.workers
    n_workers = n_workers or os.cpu_count() or 1
    if map_jobs is not None:
        records = map_jobs(encode_shard, plan.pending) if plan.pending else []
    else:
        records = run_jobs(plan.pending, n_workers, total_bytes=sum(j.end - j.start for j in plan.pending))
    manifest = finish_tokenize(plan, records)
    seconds = time.perf_counter() - t0
    log.info(
        "tokenized %d documents: train %d tokens, val %d tokens, %d shards (%d slices encoded, %d re-used) in %.1f s -> %s",
        sum(s["documents"] for s in manifest["splits"].values()), manifest["splits"]["train"]["tokens"],
        manifest["splits"]["val"]["tokens"], len(manifest["shards"]), len(plan.pending), len(plan.reused), seconds, out_dir,
    )
    return {**manifest, "run": {"encoded_slices": len(plan.pending), "reused_slices": len(plan.reused), "workers": n_workers, "seconds": round(seconds, 3)}}


def run_jobs(jobs: list[ShardJob], workers: int, total_bytes: int | None = None) -> list[dict]:
    """Encode `jobs` in a pool of `workers` processes (in this process when one would do)."""
    bar = tqdm(total=total_bytes, desc="tokenize", unit="B", unit_scale=True, disable=None)
    try:
        if workers <= 1 or len(jobs) <= 1:
            # One process: let tiktoken's threads use the cores instead.
            threads = 1 if workers <= 1 else workers
            records = []
            for job in jobs:
                records.append(encode_shard(dataclasses.replace(job, threads=threads)))
                bar.update(job.end - job.start)
            return records
        # spawn, not fork: the caller may be a threaded Prefect worker, where fork can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(encode_shard, job): job for job in jobs}
            records = []
            try:
                for fut in cf.as_completed(futures):
                    records.append(fut.result())
                    bar.update(futures[fut].end - futures[fut].start)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            return records
    finally:
        bar.close()


def decode_shard(path: str | Path, enc: Tokenizer) -> list[str]:
    """The text of each document in a shard, without its trailing end-of-text token.

    Raises:
        ValueError: a document that does not end with the end-of-text token.
    """
    shard = Shard(path)
    eot = enc.eot_token
    texts = []
    for i in range(len(shard)):
        doc = shard.document(i)
        if len(doc) == 0 or doc[-1] != eot:
            raise ValueError(f"{path}: document {i} does not end with the end-of-text token {eot}")
        texts.append(enc.decode(doc[:-1].tolist()))
    return texts


def in_val_split(text: str, seed: int, val_fraction: float) -> bool:
    """Whether `tokenize` puts a document with this text in the val split."""
    return _in_val(text.encode("utf-8", "surrogatepass"), seed, val_fraction)
