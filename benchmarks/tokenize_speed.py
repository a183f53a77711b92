"""Tokenize throughput: the whole tokenize stage against raw tiktoken on the same text, in one process.

    .venv/bin/python -m benchmarks.tokenize_speed                  # >= 100 MB from ../shared/data/corpus
    .venv/bin/python -m benchmarks.tokenize_speed --mb 20 --repeats 1 --vocab 8192

The text is every corpus file of the offline mirror (or of `--corpus`, a folder of .txt files) cut into blank-line
paragraphs, repeated until it reaches `--mb` megabytes (in whole copies of the corpus: at least one), written as the
preprocess stage writes it (documents.jsonl). Then, `--repeats` times each, alternating:

- raw: `enc.encode_ordinary_batch(texts, num_threads=cores)` over the texts already in memory, a
  16 MB batch at a time. This is the ceiling the issue names. It does not read, parse, split or write.
- stage: `lmcore.data.tokenize.tokenize` with the default config and `workers=cores`: read
  documents.jsonl, parse, split train/val, encode, write Arrow shards and the manifest.
- raw (processes): the same tiktoken calls spread over a pool of `cores` processes. tiktoken's threads
  share one interpreter, so the stage, which encodes in processes, can pass the threaded ceiling; this
  row shows the ceiling of processes too.

The same rows again for a BPE trained on the text (`--vocab`, the train_tokenizer stage's trainer; 0 leaves it
out), which lmcore encodes through tiktoken, and one row of the same tokenizer through Hugging Face `tokenizers`
(`encode_batch`), the encoder it would otherwise use. Throughput is megabytes of UTF-8 text per second (the same
numerator for all rows); ratios are stage / raw of the same tokenizer, and each raw row against GPT-2's raw
ceiling. Medians are printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from lmcore.bpe import save_trained, train_bpe
from lmcore.config import TokenizeConfig
from lmcore.data.tokenize import tokenize
from lmcore.tokenizer import Tokenizer, get_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
RANKS = os.environ.get("LMCORE_TIKTOKEN_FILE") or str(ROOT.parent / "shared" / "tokenizers" / "gpt2.tiktoken")
BATCH_BYTES = 16 << 20


def build_texts(megabytes: float, corpus: Path = CORPUS) -> list[str]:
    paragraphs = []
    for path in sorted(corpus.rglob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        paragraphs += [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise SystemExit(f"no corpus under {corpus}")
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


TRAIN_CHARS = 20_000_000  # the trained tokenizer learns from the first 20M characters


@functools.lru_cache(maxsize=2)
def _tokenizer(folder: str) -> Tokenizer:
    return load_tokenizer(folder)


def _encode_batch(job: tuple[str, list[str]]) -> int:
    folder, texts = job
    return sum(map(len, _tokenizer(folder).encode_ordinary_batch(texts, num_threads=1)))


def measure(tok: Tokenizer, folder: Path, texts: list[str], chunks: list[list[str]], clean: Path, cfg: TokenizeConfig,
            pool: cf.ProcessPoolExecutor, repeats: int, mb: float, cores: int) -> dict[str, float]:
    """Median seconds of raw threads, the stage and raw processes for one tokenizer (`folder` carries it)."""
    raw, stage, procs = [], [], []
    list(pool.map(_encode_batch, [(str(folder), ["warm up"])] * cores))  # load it in every worker before timing
    for r in range(repeats):
        t0 = time.perf_counter()
        raw_tokens = sum(sum(map(len, tok.encode_ordinary_batch(c, num_threads=cores))) for c in chunks)
        raw.append(time.perf_counter() - t0)

        out = clean.parent / f"tokens-{tok.name}-{r}"
        t0 = time.perf_counter()
        manifest = tokenize(cfg, clean, out, seed=1337, tokenizer=tok, workers=cores)
        stage.append(time.perf_counter() - t0)
        stage_tokens = sum(s["tokens"] for s in manifest["splits"].values())
        shutil.rmtree(out)

        t0 = time.perf_counter()
        proc_tokens = sum(pool.map(_encode_batch, [(str(folder), c) for c in chunks]))
        procs.append(time.perf_counter() - t0)
        print(f"  {tok.name} repeat {r + 1}: raw {mb / raw[-1]:.2f} MB/s, stage {mb / stage[-1]:.2f} MB/s, "
              f"raw processes {mb / procs[-1]:.2f} MB/s")
    # The stage adds one end-of-text token per document; everything else must be the same tokens.
    assert stage_tokens == raw_tokens + len(texts) == proc_tokens + len(texts), (stage_tokens, raw_tokens, proc_tokens)
    return {"raw": statistics.median(raw), "stage": statistics.median(stage), "procs": statistics.median(procs),
            "tokens": raw_tokens}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="megabytes of text (default 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-mb", type=float, default=4.0, help="tokenize.shard_bytes in MB (default 4)")
    ap.add_argument("--vocab", type=int, default=4096, help="a trained BPE's vocabulary size (default 4096; 0: GPT-2 only)")
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="a folder of .txt files (default: the mirror's corpus)")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1

    texts = build_texts(args.mb, args.corpus)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    mb = n_bytes / 1e6
    work = Path(tempfile.mkdtemp(prefix="lmcore-tokbench-"))
    try:
        clean = work / "clean"
        clean.mkdir()
        with open(clean / "documents.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": f"bench/{i}", "source": "bench", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
        chunks = batches(texts)
        cfg = TokenizeConfig(ranks_file=RANKS, shard_bytes=int(args.shard_mb * 2**20))
        print(f"{len(texts):,} documents, {mb:.1f} MB of text; {cores} cores; shard_bytes {cfg.shard_bytes:,}")

        tokenizers = [(get_tokenizer("gpt2", RANKS), work / "gpt2")]
        tokenizers[0][0].save(tokenizers[0][1])
        if args.vocab:
            sample, size = [], 0
            for t in texts:
                if size >= TRAIN_CHARS:
                    break
                sample.append(t)
                size += len(t)
            t0 = time.perf_counter()
            trained = save_trained(train_bpe(sample, vocab_size=args.vocab, special_tokens=["<|endoftext|>"]),
                                   work / "trained", name=f"bpe-{args.vocab}", eot="<|endoftext|>")
            print(f"trained {trained.name} on {size / 1e6:.1f}M characters in {time.perf_counter() - t0:.1f} s")
            tokenizers.append((trained, work / "trained"))

        med = {}
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(cores, mp_context=ctx) as pool:
            for tok, folder in tokenizers:
                med[tok.name] = measure(tok, folder, texts, chunks, clean, cfg, pool, args.repeats, mb, cores)
        hf_s = None
        if args.vocab:  # the trained tokenizer through Hugging Face tokenizers: what tiktoken replaces
            tok = tokenizers[1][0]
            t0 = time.perf_counter()
            hf_tokens = sum(len(e.ids) for c in chunks for e in tok._plain.encode_batch(c, add_special_tokens=False))
            hf_s = time.perf_counter() - t0
            assert hf_tokens == med[tok.name]["tokens"], (hf_tokens, med[tok.name]["tokens"])
        ceiling = med["gpt2"]["raw"]
        print()
        print("| tokenizer | run | MB/s (median) | stage / run | MB/s against GPT-2 raw threads |")
        print("|---|---|---|---|---|")
        for name, m in med.items():
            print(f"| {name} | raw tiktoken encode_ordinary_batch, {cores} threads | {mb / m['raw']:.2f} | {m['raw'] / m['stage']:.2f}x | {ceiling / m['raw']:.2f}x |")
            print(f"| {name} | raw tiktoken, {cores} processes | {mb / m['procs']:.2f} | {m['procs'] / m['stage']:.2f}x | {ceiling / m['procs']:.2f}x |")
            print(f"| {name} | lmcore tokenize stage (read, encode, Arrow shards), {cores} workers | {mb / m['stage']:.2f} | 1.00x | {ceiling / m['stage']:.2f}x |")
        if hf_s is not None:
            name = tokenizers[1][0].name
            print(f"| {name} | Hugging Face tokenizers encode_batch | {mb / hf_s:.2f} | {hf_s / med[name]['stage']:.2f}x | {ceiling / hf_s:.2f}x |")
        for name, m in med.items():
            print(f"\n{name}: {m['tokens']:,} tokens ({n_bytes / m['tokens']:.2f} bytes/token); stage / raw threads = "
                  f"{m['raw'] / m['stage']:.2f} (target >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
