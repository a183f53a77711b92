"""Train a byte-level BPE tokenizer on the corpus, and measure tokenizers in bytes per token.

    text = train_bpe(documents, vocab_size=8192, special_tokens=["<|endoftext|>"], pattern="gpt2")
    tok = save_trained(text, "models/tokenizer", name="bpe-8192", eot="<|endoftext|>")  # tokenizer.json + config
    tok.encode_ordinary("Hello")                                         # through tiktoken (tok.fast)
    report = compare({"bpe-8192": tok, "gpt2": gpt2}, {"train": train_docs, "held-out": val_docs})

Training is Hugging Face `tokenizers`' BpeTrainer (Rust, multi-threaded) over the text split by the same regex
tiktoken splits with: GPT-2's (`gpt2`) or GPT-4's cl100k (`gpt4`, digits in runs of at most three). Every one of
the 256 bytes is in the vocabulary, so any text encodes; special tokens come last, after the merges, as GPT-2's
<|endoftext|> does. The trainer breaks ties between equally frequent pairs by the pair itself, so the same
corpus and params give the same tokenizer.json, byte for byte, whatever the thread count.

The file is the tokenizer: a tokenizer.json that `transformers` loads as it is. lmcore encodes with it through
tiktoken (lmcore.tokenizer.tiktoken_encoding): its vocabulary is the ranks, its regex the pattern, and its merges
are exactly the merges tiktoken's rank order implies, which `save_trained` checks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tiktoken_ext.openai_public import r50k_pat_str

from lmcore.errors import InputError

log = logging.getLogger(__name__)

# tiktoken's split patterns by name; a trained tokenizer's regex is one of these.
# cl100k's is written out: tiktoken_ext only hands it over with the ranks, which it downloads.
CL100K_PAT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
PATTERNS = {"gpt2": r50k_pat_str, "gpt4": CL100K_PAT}
N_BYTES = 256


class TokenizerTrainingError(InputError):
    """Params or a corpus a tokenizer cannot be trained from; the message names the key or file."""


def min_vocab_size(special_tokens: Sequence[str]) -> int:
    """The smallest vocabulary: the 256 bytes and the special tokens (no merges)."""
    return N_BYTES + len(special_tokens)


def train_bpe(texts: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str], pattern: str = "gpt2",
              min_frequency: int = 2, length: int | None = None, key: str = "train_tokenizer") -> str:
    """A byte-level BPE tokenizer trained on `texts`, as tokenizer.json text.

    Args:
        texts: the training documents.
        vocab_size: tokens in all: 256 bytes, the merges, the special tokens. Fewer when the corpus runs out of
            pairs seen `min_frequency` times (the caller reports it).
        special_tokens: appended after the merges, in this order; the first is the end-of-text token.
        pattern: a name in PATTERNS.
        length: the number of texts, for the trainer's progress only.
        key: the params section named in errors.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if pattern not in PATTERNS:
        raise TokenizerTrainingError(f"{key}.pattern {pattern!r}: expected one of {', '.join(PATTERNS)}")
    if not special_tokens:
        raise TokenizerTrainingError(f"{key}.special_tokens: needs at least the end-of-text token (e.g. <|endoftext|>)")
    if vocab_size < min_vocab_size(special_tokens):
        raise TokenizerTrainingError(
            f"{key}.vocab_size {vocab_size} is smaller than the byte alphabet plus the special tokens "
            f"({N_BYTES} + {len(special_tokens)} = {min_vocab_size(special_tokens)})"
        )
    tok = Tokenizer(models.BPE(ignore_merges=True))  # a piece that is a token is that token, as in tiktoken
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Special tokens are added after training so that they take the last ids (GPT-2's layout: bytes, merges, then
    # <|endoftext|>); the trainer would put them first.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens), min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    tok.add_special_tokens(list(special_tokens))
    return _canonical(tok.to_str())


def _canonical(text: str) -> str:
    """tokenizer.json with ids in GPT-2's order: the 256 bytes by byte value, then merges in the order they were
    learned (the trainer numbers the alphabet by character instead), then the special tokens."""
    from lmcore.tokenizer import byte_decoder

    config = json.loads(text)
    model = config["model"]
    alphabet = byte_decoder()
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    singles = sorted((t for t, _ in by_id if len(t) == 1 and t in alphabet), key=lambda t: alphabet[t])
    if len(singles) != N_BYTES:
        raise TokenizerTrainingError(f"trained vocabulary holds {len(singles)} of the 256 byte tokens")
    merged = [t for t, _ in by_id if not (len(t) == 1 and t in alphabet)]
    vocab = {t: i for i, t in enumerate(singles + merged)}
    model["vocab"] = vocab
    for added in config["added_tokens"]:
        added["id"] = len(vocab) + config["added_tokens"].index(added)
    return json.dumps(config, ensure_ascii=False, indent=2, sort_keys=False) + "\n"


# -- bytes per token ---------------------------------------------------------------------------------------------


def bytes_per_token(tok, texts: Sequence[str]) -> dict[str, float | int]:
    """UTF-8 bytes per token of `texts` under `tok` (ordinary encoding, no special tokens): the higher, the more
    text a context window and a training step hold."""
    ids = tok.encode_ordinary_batch(list(texts))
    n_tokens = sum(map(len, ids))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else 0.0}


def compare(tokenizers: Mapping[str, object], texts: Mapping[str, Sequence[str]]) -> dict[str, dict[str, dict]]:
    """bytes_per_token of each tokenizer on each named text set: {tokenizer: {text set: counts}}, as nanochat's
    tok_eval compares its tokenizer with GPT-2's."""
    return {name: {what: bytes_per_token(tok, docs) for what, docs in texts.items() if docs} for name, tok in tokenizers.items()}


def markdown(report: Mapping[str, Mapping[str, Mapping]], vocab: Mapping[str, int]) -> str:
    """The comparison as a markdown table: one row per text set, bytes/token per tokenizer and the ratio to the
    first tokenizer's."""
    names = list(report)
    sets = list(dict.fromkeys(s for r in report.values() for s in r))
    head = "| text | bytes | " + " | ".join(f"{n} ({vocab[n]:,} tokens) bytes/token" for n in names)
    head += " | " + " | ".join(f"{n} vs {names[0]}" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names) - 1)]
    for s in sets:
        first = report[names[0]].get(s, {}).get("bytes_per_token") or 0.0
        cells = [f"{report[n][s]['bytes_per_token']:.3f}" for n in names]
        ratios = [f"{(report[n][s]['bytes_per_token'] / first - 1) * 100:+.1f}%" if first else "n/a" for n in names[1:]]
        lines.append(f"| {s} | {report[names[0]][s]['bytes']:,} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines) + "\n"


def save_trained(text: str, folder: str | Path, *, name: str, eot: str):
    """Write a trained tokenizer.json into `folder` with its tokenizer_config.json; returns the loaded tokenizer,
    which must encode through tiktoken (TokenizerTrainingError otherwise: a trainer that made merges tiktoken's
    rank order would not)."""
    from lmcore.io import write_text
    from lmcore.tokenizer import HF_TOKENIZER_FILE, HFTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / HF_TOKENIZER_FILE, text)
    tok = HFTokenizer(folder / HF_TOKENIZER_FILE, name=name, eot_token=eot, bos_token=eot, eos_token=eot)
    if tok.fast is None:
        raise TokenizerTrainingError(f"{folder / HF_TOKENIZER_FILE}: the trained merges are not tiktoken's rank order")
    tok.save(folder)
    return tok
