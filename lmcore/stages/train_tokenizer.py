"""The train_tokenizer stage: a byte-level BPE trained on the cleaned corpus into models/tokenizer, and its report.

    lmcore run train_tokenizer
    lmcore run train_tokenizer --set train_tokenizer.vocab_size=8192

It trains on the documents `tokenize` puts in the train split (the same seeded hash of the text, so the val
split stays held out from the tokenizer too) with `train_tokenizer`'s vocabulary size, special tokens and split
pattern, and writes tokenizer.json (which transformers loads as it is), tokenizer_config.json and train.json
(what it was trained on). `tokenize.tokenizer: trained` tokenizes with it, through tiktoken.

reports/tokenizer/tok_eval.json (a DVC metric) and tok_eval.md compare it with GPT-2's in bytes per token on the
train split, the held-out split and benchmark texts, as nanochat's tok_eval does.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from typing_extensions import TypedDict  # extra_items (PEP 728)

from lmcore.bpe import (
    TokenizerTrainingError,
    compare,
    markdown,
    save_trained,
    train_bpe,
)
from lmcore.data.tokenize import in_val_split
from lmcore.errors import InputError, MissingInputError, TransientError, one_line
from lmcore.io import atomic_dir, sha256_file, write_json, write_text
from lmcore.paths import CLEAN, DOCUMENTS, TOK_EVAL, TOKENIZER, TOKENIZER_RECORD, reports_path
from lmcore.stages import Artifact, StageContext, StageResult
from lmcore.stages._probe import benchmark_items
from lmcore.tokenizer import (
    HF_TOKENIZER_FILE,
    TOKENIZER_CONFIG,
    configured_ranks_file,
    get_tokenizer,
    load_tokenizer,
)

log = logging.getLogger(__name__)

EVAL_CHARS = 8 << 20  # text per split the report measures (the first 8M characters): enough for three decimals
TOK_EVAL_MD = "tok_eval.md"


class TokenCount(TypedDict):
    bytes: int
    tokens: int
    bytes_per_token: float


class Summary(TypedDict, extra_items=float):
    """Also bytes_per_token.<text> of the trained tokenizer and <name>.bytes_per_token.<text> of the others."""

    n_vocab: int
    train_seconds: float
    tokenizer: str
    tokenizer_sha256: str
    train_documents: int
    report: dict[str, dict[str, TokenCount]]  # tokenizer -> text (train, held-out, a benchmark) -> its counts


def run(ctx: StageContext) -> StageResult:
    cfg, seed, out = ctx.params.train_tokenizer, ctx.seed, ctx.outputs[TOKENIZER]
    val_fraction = ctx.params.tokenize.val_fraction
    documents = ctx.inputs[CLEAN] / DOCUMENTS
    if not documents.is_file():
        raise MissingInputError(f"{documents} not found: run preprocess first")
    counts = {"train": 0, "held-out": 0}
    sample: dict[str, list[str]] = {"train": [], "held-out": []}  # what the report measures: each split's start
    sampled = {"train": 0, "held-out": 0}

    def train_texts() -> Iterator[str]:
        """One pass over the documents: every one counted, each split's first EVAL_CHARS kept for the report, the
        train split's first `max_chars` handed to the trainer."""
        used = 0
        for split, text in read_documents(documents, seed, val_fraction):
            counts[split] += 1
            if sampled[split] < EVAL_CHARS:
                sample[split].append(text)
                sampled[split] += len(text)
            if split == "train" and (cfg.max_chars is None or used < cfg.max_chars):
                used += len(text)
                yield text

    started = time.perf_counter()
    texts = train_texts()
    first = next(texts, None)
    if first is None:
        raise TokenizerTrainingError(f"{documents}: no documents in the train split to train a tokenizer on")
    text = train_bpe(itertools.chain([first], texts), vocab_size=cfg.vocab_size, special_tokens=cfg.special_tokens,
                     pattern=cfg.pattern, min_frequency=cfg.min_frequency)
    seconds = time.perf_counter() - started
    with atomic_dir(out) as tmp:
        tok = save_trained(text, tmp, name=f"bpe-{cfg.vocab_size}", eot=cfg.special_tokens[0])
        record = {
            "name": tok.name, "sha256": tok.sha256, "n_vocab": tok.n_vocab, "vocab_size": cfg.vocab_size,
            "special_tokens": cfg.special_tokens, "pattern": cfg.pattern, "min_frequency": cfg.min_frequency,
            "max_chars": cfg.max_chars, "documents_sha256": sha256_file(documents),
            "train_documents": counts["train"], "held_out_documents": counts["held-out"],
            "encoder": "tiktoken",  # lmcore encodes with it through tiktoken (tok.fast); save_trained checks it can
        }
        write_json(tmp / TOKENIZER_RECORD, record)
    tok = load_tokenizer(out)
    warnings = []
    if tok.n_vocab < cfg.vocab_size:
        warnings.append(f"train_tokenizer.vocab_size {cfg.vocab_size}: the corpus gave {tok.n_vocab} tokens (no pair "
                        f"left seen {cfg.min_frequency} times); the model's extra embedding rows stay unused")

    report, vocab, note = tokenizer_report(ctx, tok, sample)
    if note:
        warnings.append(note)
    reports = ctx.outputs[reports_path("tokenizer")]
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / TOK_EVAL, {"vocab": vocab, "bytes_per_token": report})
    write_text(reports / TOK_EVAL_MD, markdown(report, vocab))
    metrics = {"n_vocab": tok.n_vocab, "train_seconds": round(seconds, 3)}
    metrics |= {f"bytes_per_token.{what}": r["bytes_per_token"] for what, r in report[tok.name].items()}
    metrics |= {f"{name}.bytes_per_token.{what}": r["bytes_per_token"] for name, sets in report.items()
                if name != tok.name for what, r in sets.items()}
    return StageResult(
        summary={**metrics, "tokenizer": tok.name, "tokenizer_sha256": tok.sha256, "train_documents": counts["train"],
                 "report": report},
        metrics=metrics,
        artifacts=[Artifact(out / f, "tokenizer") for f in (HF_TOKENIZER_FILE, TOKENIZER_CONFIG, TOKENIZER_RECORD)]
        + [Artifact(reports / f, "reports") for f in (TOK_EVAL, TOK_EVAL_MD)],
        tags={"tokenizer": tok.name, "tokenizer_sha256": tok.sha256},
        log=f"trained {tok.name} ({tok.n_vocab:,} tokens) on {counts['train']:,} documents in {seconds:.1f} s\n"
            + markdown(report, vocab),
        warnings=warnings,
    )


def read_documents(path: Path, seed: int, val_fraction: float) -> Iterator[tuple[str, str]]:
    """("train" | "held-out", text) of each document of documents.jsonl, split as `tokenize` splits them."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as err:
                raise InputError(f"{path}:{line_no}: not a document object with a 'text' ({one_line(err)})") from None
            yield ("held-out" if in_val_split(text, seed, val_fraction) else "train"), text


def tokenizer_report(ctx: StageContext, tok, sample: dict[str, list[str]]) -> tuple[dict, dict, str]:
    """bytes per token of `tok` and GPT-2's on `sample` ({"train": texts, "held-out": texts}) and benchmark texts; a
    note when GPT-2's ranks or the benchmark files could not be had (the report then leaves them out)."""
    sets = dict(sample)
    notes = []
    try:
        sets |= benchmark_texts(ctx)
    except (InputError, TransientError, OSError) as err:
        notes.append(f"no benchmark texts in the tokenizer report: {one_line(err)}")
    tokenizers = {tok.name: tok}
    try:
        gpt2 = get_tokenizer("gpt2", configured_ranks_file(ctx.params.tokenize.ranks_file, ctx.root))
        tokenizers["gpt2"] = gpt2
    except (InputError, TransientError) as err:
        notes.append(f"GPT-2 left out of the tokenizer report: {one_line(err)}")
    vocab = {name: t.n_vocab for name, t in tokenizers.items()}
    return compare(tokenizers, sets), vocab, "; ".join(notes)


def benchmark_texts(ctx: StageContext) -> dict[str, list[str]]:
    """{task: texts} of `train_tokenizer.eval_benchmarks`: each item's context followed by each of its choices, as
    the benchmarks score them; the items drawn with benchmark.sample_seed, as the benchmark stage draws them."""
    cfg = ctx.params.train_tokenizer
    if not cfg.eval_benchmarks:
        return {}
    items = benchmark_items(ctx, cfg.eval_benchmarks, cfg.eval_benchmarks_limit)
    texts: dict[str, list[str]] = {}
    for item in items:
        texts.setdefault(item.task, []).append(item.context + "".join(item.continuations))
    return texts
