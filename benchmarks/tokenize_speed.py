"""Tokenize throughput: the whole tokenize stage against raw tiktoken on the same text, in one process.

    .venv/bin/python -m benchmarks.tokenize_speed                  # >= 100 MB from ../shared/data/corpus
    .venv/bin/python -m benchmarks.tokenize_speed --mb 20 --repeats 1

The text is every corpus file of the offline mirror cut into blank-line paragraphs, repeated until it
reaches `--mb` megabytes, written as the preprocess stage writes it (documents.jsonl). Then, `--repeats`
times each, alternating:

- raw: `enc.encode_ordinary_batch(texts, num_threads=cores)` over the texts already in memory, a
  16 MB batch at a time. This is the ceiling the issue names. It does not read, parse, split or write.
- stage: `lmcore.data.tokenize.tokenize` with the default config and `workers=cores`: read
  documents.jsonl, parse, split train/val, encode, write Arrow shards and the manifest.
- raw (processes): the same tiktoken calls spread over a pool of `cores` processes. tiktoken's threads
  share one interpreter, so the stage, which encodes in processes, can pass the threaded ceiling; this
  row shows the ceiling of processes too.

Throughput is megabytes of UTF-8 text per second (the same numerator for all rows); ratios are stage / raw.
Medians are printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from lmcore.config import TokenizeConfig
from lmcore.data.tokenize import tokenize
from lmcore.tokenizer import get_encoding

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
RANKS = os.environ.get("LMCORE_TIKTOKEN_FILE") or str(ROOT.parent / "shared" / "tokenizers" / "gpt2.tiktoken")
BATCH_BYTES = 16 << 20


def build_texts(megabytes: float) -> list[str]:
    paragraphs = []
    for path in sorted(CORPUS.rglob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        paragraphs += [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise SystemExit(f"no corpus under {CORPUS}")
    texts, size, copy = [], 0, 0
    while size < megabytes * 1e6:
        for p in paragraphs:
            # Each copy is marked so repeated text is not byte-identical across copies.
            t = p if copy == 0 else f"{p} [{copy}]"
            texts.append(t)
            size += len(t.encode("utf-8"))
        copy += 1
    return texts


def batches(texts: list[str]) -> list[list[str]]:
    out, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= BATCH_BYTES:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def _encode_batch(texts: list[str]) -> int:
    enc = get_encoding("gpt2", RANKS)
    return sum(map(len, enc.encode_ordinary_batch(texts, num_threads=1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="megabytes of text (default 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-mb", type=float, default=4.0, help="tokenize.shard_bytes in MB (default 4)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    enc = get_encoding("gpt2", RANKS)

    texts = build_texts(args.mb)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    mb = n_bytes / 1e6
    work = Path(tempfile.mkdtemp(prefix="lmcore-tokbench-"))
    try:
        clean = work / "clean"
        clean.mkdir()
        with open(clean / "documents.jsonl", "w", encoding="utf-8") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": f"bench/{i}", "source": "bench", "text": t}, ensure_ascii=False) + "\n")
        chunks = batches(texts)
        cfg = TokenizeConfig(ranks_file=RANKS, shard_bytes=int(args.shard_mb * 2**20))
        print(f"{len(texts):,} documents, {mb:.1f} MB of text; {cores} cores; shard_bytes {cfg.shard_bytes:,}")

        raw, stage, procs = [], [], []
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(cores, mp_context=ctx) as pool:
            list(pool.map(_encode_batch, [["warm up"]] * cores))  # start the workers before timing
            for r in range(args.repeats):
                t0 = time.perf_counter()
                raw_tokens = sum(sum(map(len, enc.encode_ordinary_batch(c, num_threads=cores))) for c in chunks)
                raw.append(time.perf_counter() - t0)

                out = work / f"tokens-{r}"
                t0 = time.perf_counter()
                manifest = tokenize(cfg, clean, out, seed=1337, workers=cores)
                stage.append(time.perf_counter() - t0)
                stage_tokens = sum(s["tokens"] for s in manifest["splits"].values())
                shutil.rmtree(out)

                t0 = time.perf_counter()
                proc_tokens = sum(pool.map(_encode_batch, chunks))
                procs.append(time.perf_counter() - t0)
                print(f"  repeat {r + 1}: raw {mb / raw[-1]:.2f} MB/s, stage {mb / stage[-1]:.2f} MB/s, raw processes {mb / procs[-1]:.2f} MB/s")
        # The stage adds one end-of-text token per document; everything else must be the same tokens.
        assert stage_tokens == raw_tokens + len(texts) == proc_tokens + len(texts), (stage_tokens, raw_tokens, proc_tokens)

        med = {k: statistics.median(v) for k, v in {"raw": raw, "stage": stage, "procs": procs}.items()}
        print()
        print("| run | MB/s (median) | stage / run |")
        print("|---|---|---|")
        print(f"| raw tiktoken encode_ordinary_batch, {cores} threads | {mb / med['raw']:.2f} | {med['raw'] / med['stage']:.2f}x |")
        print(f"| raw tiktoken, {cores} processes | {mb / med['procs']:.2f} | {med['procs'] / med['stage']:.2f}x |")
        print(f"| lmcore tokenize stage (read, encode, Arrow shards), {cores} workers | {mb / med['stage']:.2f} | 1.00x |")
        print(f"\n{raw_tokens:,} tokens; stage / raw threads = {med['raw'] / med['stage']:.2f} (target >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
