"""Params of the data stages: collect (sources), preprocess (filters, deduplication), train_tokenizer, tokenize."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmcore.config.base import Section


TEXT_FORMATS = ("txt", "md", "jsonl", "json", "csv", "parquet")


class Source(Section):
    """One raw source: a URL pinned by sha256, a local path (file, folder or glob), or a sha256 alone.

    A source with only a sha256 has no public URL (e.g. a file repacked for the offline mirror): it is
    found in the mirror by checksum or not at all. A folder is taken recursively and a glob (`*`, `?`,
    `[..]`, `**`) as matched; either keeps the files whose format is known (see `lmcore.data.formats`).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    url: str | None = None
    path: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    license: str = "unknown"
    # How preprocessing reads the files: null infers it from each file's suffix (`.jsonl.zst`, `.csv.gz`, ...).
    format: Literal["txt", "md", "jsonl", "json", "csv", "parquet"] | None = None
    text_field: str = Field(default="text", min_length=1)  # the text column/key of jsonl, json, csv and parquet
    # A zip or tar archive (.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .tar.zst) extracted into raw/<name>/.
    # Absolute paths, `..` and links pointing outside are refused.
    extract: bool = False

    @model_validator(mode="after")
    def _one_location(self) -> Source:
        if self.url is not None and self.path is not None:
            raise ValueError(f"source {self.name!r} needs at most one of 'url' or 'path'")
        if self.path is None and self.sha256 is None:
            what = "is a URL and" if self.url is not None else "has no 'url' or 'path', so it"
            raise ValueError(f"source {self.name!r} {what} needs its 'sha256'")
        return self


class CollectConfig(Section):
    sources: list[Source] = Field(min_length=1)
    retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> CollectConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate source names: {dupes}")
        return self


class GopherQualityConfig(Section):
    """Gopher's quality rules (Rae et al. 2021, appendix A): a document failing any one is dropped.

    Each threshold can be null to switch that rule off. The defaults are the paper's, made for web pages;
    profiles of short documents (paragraphs of a play) lower `min_words`.
    """

    enabled: bool = True
    min_words: int | None = Field(default=50, ge=0)
    max_words: int | None = Field(default=100_000, ge=1)
    min_mean_word_length: float | None = Field(default=3.0, ge=0)
    max_mean_word_length: float | None = Field(default=10.0, gt=0)
    max_symbol_word_ratio: float | None = Field(default=0.1, ge=0)  # "#" and "..." per word
    max_bullet_lines_ratio: float | None = Field(default=0.9, ge=0, le=1)  # lines starting with a bullet
    max_ellipsis_lines_ratio: float | None = Field(default=0.3, ge=0, le=1)  # lines ending with "..." or "…"
    min_alpha_words_ratio: float | None = Field(default=0.8, ge=0, le=1)  # words with an alphabetic character
    min_stop_words: int | None = Field(default=2, ge=0)  # of: the, be, to, of, and, that, have, with


class RepetitionConfig(Section):
    """Gopher's repetition rules (Rae et al. 2021, table A1): duplicated lines, paragraphs and n-grams."""

    enabled: bool = True
    max_duplicate_line_fraction: float | None = Field(default=0.3, ge=0, le=1)
    max_duplicate_paragraph_fraction: float | None = Field(default=0.3, ge=0, le=1)
    max_duplicate_line_char_fraction: float | None = Field(default=0.2, ge=0, le=1)
    max_duplicate_paragraph_char_fraction: float | None = Field(default=0.2, ge=0, le=1)
    # Characters in the most frequent n-gram (when it occurs more than once), as a fraction of all
    # characters, for n = 2, 3, 4. Leave an n out to switch its rule off; {} switches all off.
    max_top_ngram_char_fraction: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    # Characters of the words covered by n-grams that occur more than once, for n = 5..10.
    max_duplicate_ngram_char_fraction: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

    @model_validator(mode="after")
    def _ngram_limits(self) -> RepetitionConfig:
        for key in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            for n, limit in getattr(self, key).items():
                if not 1 <= n <= 64:
                    raise ValueError(f"{key}: n-gram size {n} is not in 1..64")
                if not 0 <= limit <= 1:
                    raise ValueError(f"{key}: the limit for n={n} ({limit}) is not a fraction in [0, 1]")
        return self


class PiiConfig(Section):
    """PII scrubbing: matches are replaced by a placeholder and counted."""

    emails: bool = True
    phones: bool = True
    ips: bool = True
    email_replacement: str = "<EMAIL>"
    phone_replacement: str = "<PHONE>"
    ip_replacement: str = "<IP>"


class NearDedupConfig(Section):
    """Near-duplicate removal with MinHash LSH (datasketch): the first of a near-duplicate group is kept."""

    enabled: bool = True
    threshold: float = Field(default=0.8, gt=0, le=1)  # estimated Jaccard similarity of word shingles
    num_perm: int = Field(default=128, ge=16)
    shingle_words: int = Field(default=5, ge=1)
    seed: int = 1


class PreprocessConfig(Section):
    """The cleaning chain, in order: decode, normalise, whitespace, lowercase, Gutenberg boilerplate, split,
    PII scrubbing, length and Gopher filters, exact dedup, near dedup."""

    # Non-UTF-8 bytes: "error" stops naming the file, byte offset and line; "replace" substitutes U+FFFD and
    # counts; "skip" drops the document (or record) holding them and counts it.
    decode_errors: Literal["error", "replace", "skip"] = "error"
    # Malformed records (bad JSON, a missing or non-string text field): "error" stops naming the file and line;
    # "skip" drops and counts them, and fails when more than max_bad_fraction of a file's records are bad.
    on_bad: Literal["error", "skip"] = "error"
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    whitespace: bool = True  # strip trailing spaces, unify line endings, collapse runs of blank lines
    lowercase: bool = False
    strip_gutenberg: bool = True  # Project Gutenberg's "*** START OF ..." header and "*** END OF ..." footer
    # How a text file is cut into documents: whole files, or blank-line separated paragraphs.
    # jsonl/json/csv/parquet records are one document each.
    split: Literal["file", "paragraph"] = "paragraph"
    min_chars: int = Field(default=32, ge=0)  # empty documents are always dropped
    max_chars: int | None = Field(default=None, ge=1)
    # A document with a line longer than this (minified code, a table dumped on one line) is dropped.
    max_line_chars: int | None = Field(default=100_000, ge=1)
    pii: PiiConfig = PiiConfig()
    gopher: GopherQualityConfig = GopherQualityConfig()
    repetition: RepetitionConfig = RepetitionConfig()
    dedup: bool = True  # exact duplicates by sha256 of the cleaned text (after PII scrubbing)
    near_dedup: NearDedupConfig = NearDedupConfig()


class TrainTokenizerConfig(Section):
    """A byte-level BPE trained on the train split of the cleaned corpus (lmcore.bpe), into models/tokenizer."""

    # Tokens in all: the 256 bytes, the merges and the special tokens (fewer when the corpus runs out of pairs).
    vocab_size: int = Field(default=8192, ge=1)
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>"])  # the first ends every document
    pattern: Literal["gpt2", "gpt4"] = "gpt2"  # tiktoken's split regex: GPT-2's, or GPT-4's cl100k (digits by 3)
    min_frequency: int = Field(default=2, ge=1)  # a pair seen fewer times is never merged
    max_chars: int | None = Field(default=None, ge=1)  # train on the first N characters of the train split; null: all
    # Texts the tokenizer report measures bytes per token on, besides the corpus: benchmark items (contexts and
    # choices) of these tasks (files from benchmark.sources), `eval_benchmarks_limit` each, drawn with
    # benchmark.sample_seed. []: none (params.yaml names hellaswag and arc_easy).
    eval_benchmarks: list[str] = Field(default_factory=list)
    eval_benchmarks_limit: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> TrainTokenizerConfig:
        smallest = 256 + len(self.special_tokens)  # the byte alphabet and the special tokens: lmcore.bpe.min_vocab_size
        if not self.special_tokens or any(not t for t in self.special_tokens):
            raise ValueError("train_tokenizer.special_tokens: needs the end-of-text token first (e.g. <|endoftext|>), no empty names")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"train_tokenizer.special_tokens: {self.special_tokens} names a token twice")
        if self.vocab_size < smallest:
            raise ValueError(
                f"train_tokenizer.vocab_size {self.vocab_size} is smaller than the byte alphabet plus the special tokens "
                f"(256 + {len(self.special_tokens)} = {smallest})"
            )
        return self


class TokenizeConfig(Section):
    # auto: the base model's tokenizer when `base_model.source` is not scratch, else gpt2. gpt2: GPT-2's BPE
    # (tiktoken). trained: the train_tokenizer stage's (models/tokenizer). base: the base model's. A path
    # (relative to the project root): a folder carrying a tokenizer (tokenizer_config.json + its file, e.g. a
    # model folder) or a Hugging Face tokenizer.json.
    tokenizer: str = Field(default="auto", min_length=1)
    # A local tiktoken ranks file for gpt2; when null, LMCORE_TIKTOKEN_FILE, else tiktoken's own (online) loader.
    ranks_file: str | None = None
    # Each document goes to val when a seeded hash of its text falls below this fraction.
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    # Input text (bytes of documents.jsonl) per shard: shard k holds the train and val documents of the
    # k-th slice, so shards depend on the input alone, never on the worker count. GPT-2 averages about
    # 4 bytes of English per token: 256 MiB of text is about 60M tokens.
    shard_bytes: int = Field(default=64 * 2**20, ge=4096)
    workers: int = Field(default=0, ge=0)  # encoding processes; 0: one per core
    # "local": a process pool inside the stage. "dask": one Prefect task per shard on prefect-dask's
    # DaskTaskRunner, at `dask_address` or, when null, on a local cluster of `workers` processes.
    runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
