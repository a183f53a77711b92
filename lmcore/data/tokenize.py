"""The tokenize stage: clean documents -> train/val token shards and a manifest.

    manifest = tokenize(params.tokenize, Path("data/clean"), Path("data/tokens"), seed=params.seed)

Reads `documents.jsonl` (one `{"id", "source", "text"}` object per line), splits it by document
into train and val with a seeded permutation, encodes each document with the end-of-text token
appended, and writes Arrow shards (`train-00000.arrow`, `val-00000.arrow`, ...) plus
`manifest.json`. The same input and seed give byte-identical output.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tqdm import tqdm

from lmcore.config import TokenizeConfig
from lmcore.data.shards import Shard, token_dtype, write_shard
from lmcore.io import atomic_dir, sha256_file, write_json
from lmcore.paths import DOCUMENTS, MANIFEST
from lmcore.tokenizer import eot_token, get_encoding

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Characters handed to one encode_ordinary_batch call: enough to keep every thread busy, since
# tiktoken's threads pay off on long texts, not on many tiny ones.
BATCH_CHARS = 1 << 20


def read_documents(path: Path) -> list[str]:
    """The `text` of every document in a documents.jsonl file, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object with string `id`, `source` and `text`
            (the message names the file and line number), or a file without documents.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no documents file (run the preprocess stage first)")
    texts: list[str] = []
    with open(path, "rb") as f:  # binary: lines split on b"\n" only, and bad UTF-8 names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                doc = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(doc).__name__}")
            for key in ("id", "source", "text"):
                if not isinstance(doc.get(key), str):
                    raise ValueError(f"{path}:{lineno}: key {key!r} missing or not a string")
            texts.append(doc["text"])
    if not texts:
        raise ValueError(f"{path}: no documents to tokenize")
    return texts


def split_documents(n_docs: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Document indices per split, each in original order; val is round(val_fraction * n), at least 1.

    Raises:
        ValueError: fewer than 2 documents (each split needs one).
    """
    if n_docs < 2:
        raise ValueError(f"{n_docs} document(s): need at least 2 to make both a train and a val split")
    n_val = min(max(round(val_fraction * n_docs), 1), n_docs - 1)
    perm = np.random.default_rng(seed).permutation(n_docs)
    return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}


def _encoded(enc: tiktoken.Encoding, texts: Sequence[str], dtype: np.dtype, eot: int) -> Iterator[np.ndarray]:
    """Each text's tokens followed by `eot`, in order, encoded in multi-threaded batches."""
    threads = os.cpu_count() or 1
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and (end == start or chars + len(texts[end]) <= BATCH_CHARS):
            chars += len(texts[end])
            end += 1
        for ids in enc.encode_ordinary_batch(list(texts[start:end]), num_threads=threads):
            doc = np.empty(len(ids) + 1, dtype=dtype)
            doc[:-1] = ids
            doc[-1] = eot
            yield doc
        start = end


def tokenize(cfg: TokenizeConfig, clean_dir: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    """Tokenize `clean_dir/documents.jsonl` into train/val shards under `out_dir`, atomically.

    Args:
        cfg: encoding, ranks file, validation fraction and shard size.
        clean_dir: the preprocess stage's output folder.
        out_dir: replaced whole on success; untouched on failure.
        seed: seeds the train/val split.

    Returns:
        The manifest, as written to `out_dir/manifest.json`.
    """
    clean_dir, out_dir = Path(clean_dir), Path(out_dir)
    docs_path = clean_dir / DOCUMENTS
    texts = read_documents(docs_path)
    splits = split_documents(len(texts), cfg.val_fraction, seed)
    enc = get_encoding(cfg.encoding, cfg.ranks_file)
    eot = eot_token(enc)
    dtype = token_dtype(enc.n_vocab)

    shards: list[dict[str, Any]] = []
    totals = {name: {"documents": 0, "tokens": 0} for name in SPLITS}
    with atomic_dir(out_dir) as tmp, tqdm(total=len(texts), desc="tokenize", unit="doc", disable=None) as bar:

        def flush(split: str, buf: list[np.ndarray]) -> None:
            name = f"{split}-{sum(s['split'] == split for s in shards):05d}.arrow"
            write_shard(tmp / name, buf, dtype)
            n_tokens = int(sum(len(d) for d in buf))
            shards.append(
                {"file": name, "split": split, "documents": len(buf), "tokens": n_tokens, "sha256": sha256_file(tmp / name)}
            )
            totals[split]["documents"] += len(buf)
            totals[split]["tokens"] += n_tokens

        for split in SPLITS:
            buf: list[np.ndarray] = []
            buf_tokens = 0
            for doc in _encoded(enc, [texts[i] for i in splits[split]], dtype, eot):
                if buf and buf_tokens + len(doc) > cfg.shard_tokens:
                    flush(split, buf)
                    buf, buf_tokens = [], 0
                buf.append(doc)
                buf_tokens += len(doc)
                if buf_tokens >= cfg.shard_tokens:  # full, or one document larger than a shard
                    flush(split, buf)
                    buf, buf_tokens = [], 0
                bar.update(1)
            if buf:
                flush(split, buf)

        manifest = {
            "encoding": cfg.encoding,
            "vocab_size": enc.n_vocab,
            "eot_token": eot,
            "dtype": dtype.name,
            "seed": seed,
            "val_fraction": cfg.val_fraction,
            "shard_tokens": cfg.shard_tokens,
            "documents_sha256": sha256_file(docs_path),
            "splits": totals,
            "shards": shards,
        }
        write_json(tmp / MANIFEST, manifest)
    log.info(
        "tokenized %d documents: train %d tokens, val %d tokens, %d shards -> %s",
        len(texts), totals["train"]["tokens"], totals["val"]["tokens"], len(shards), out_dir,
    )
    return manifest


def decode_shard(path: str | Path, enc: tiktoken.Encoding) -> list[str]:
    """The text of each document in a shard, without its trailing end-of-text token.

    Raises:
        ValueError: a document that does not end with the end-of-text token.
    """
    shard = Shard(path)
    eot = eot_token(enc)
    texts = []
    for i in range(len(shard)):
        doc = shard.document(i)
        if len(doc) == 0 or doc[-1] != eot:
            raise ValueError(f"{path}: document {i} does not end with the end-of-text token {eot}")
        texts.append(enc.decode(doc[:-1].tolist()))
    return texts
