"""Benchmark decontamination: which benchmark items share a word 13-gram with the training data, and where.

    index = benchmark_ngrams([(str(i), q["question"]) for i, q in enumerate(gsm8k)], benchmark="gsm8k")
    index.add("ifeval", [(str(r["key"]), r["prompt"]) for r in ifeval])
    report = scan(index, {"corpus": [Path("data/clean/documents.jsonl")], "sft": [Path("instruction-data.json")],
                          "classifier": [Path("SMSSpamCollection.tsv")], "base_card": [Path("models/base/MODEL_CARD.md")]})
    report.counts()                      # {"corpus": {"gsm8k": 1, "ifeval": 0}, ...}: contaminated items
    keep = clean_ids(report, "gsm8k")    # score the sample on all of it, and on these ids alone
    report.to_dict(); report.rows()      # JSON; one row per contaminated item and source (an MLflow table)

The method is lm-evaluation-harness's (0.4.13, `lm_eval/decontamination/`): a text is normalised by its `Janitor`
(ASCII letters lowercased, `string.punctuation` deleted; nothing else, so curly quotes and non-ASCII letters stay
as they are), split on whitespace, and its word n-grams (n = 13) are the n consecutive words joined by one space
(`janitor.word_ngrams`; kept here as word tuples, which hash faster). An item is contaminated when one of its
n-grams is an n-gram of a training text (`decontaminate.get_train_overlap`). lm-eval's module is not imported:
janitor.py prints a warning and a traceback when its C++ helper is missing, and archiver.py needs `jsonlines`; the
few lines are replicated here, and a test checks them against lm-eval's own functions.

One departure: an item with fewer than n words has no n-gram at all in lm-eval, so it can never be flagged. Here its
whole normalised text is one gram of its k < n words, looked up among the k-grams of the training texts (a text
gets a pass over its k-grams only when it holds the longest word of such an item; an item of a word or two matches
wherever those words occur). An item with no word left after normalisation has no gram and is never contaminated.

Training texts are streamed, file by file and line by line (gzip or zstd too), so memory is bounded by the index
(about 400 bytes per distinct gram: 16 MB for the 45k 13-grams of GSM8K's test set) and the report, never by the
training data:

- .jsonl: every string value of each record, each on its own (grams never span two fields); `line` is the line.
  A line that is not JSON is skipped and counted (`bad`), and the first few are logged.
- .json: a top-level array of records, parsed one record at a time; `line` is the record number (index + 1),
  `unit` "record". A malformed array raises DecontaminationError naming the file and record.
- anything else (.txt, .md, .tsv, .csv): per line. In text and markdown files (hard-wrapped prose) a gram may span
  a line break: a match is reported on the line where it starts. TSV and CSV lines are records and stand alone.

Invalid UTF-8 is replaced (U+FFFD): a bad byte costs the words around it, not the scan.
"""

from __future__ import annotations

import codecs
import json
import logging
import string
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import count, islice
from pathlib import Path
from typing import Any, BinaryIO

from lmcore.data.formats import COMPRESSION_SUFFIXES, compression_of, open_binary
from lmcore.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

N = 13  # lm-eval's n-gram size (decontaminate.py, the Pile's 13-gram files)
# lm-eval's Janitor.translation_table: ASCII upper -> lower, ASCII punctuation deleted.
NORMALIZE = str.maketrans(string.ascii_lowercase + string.ascii_uppercase, string.ascii_lowercase * 2, string.punctuation)
JSON_CHUNK = 1 << 20  # characters read at a time from a JSON array
MAX_BAD_LOGGED = 3  # malformed JSONL lines logged per source (all are counted)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown")  # prose: a gram may span a line break
ROW_COLUMNS = ("item", "benchmark", "ngram", "source", "file", "line", "unit", "field")


class DecontaminationError(InputError):
    """A training file that cannot be scanned; the message names the file and the record."""


def normalize(text: str) -> str:
    """lm-eval's `Janitor.normalize_string`: ASCII letters lowercased, ASCII punctuation deleted."""
    return text.translate(NORMALIZE)


def words_of(text: str) -> list[str]:
    """The normalised words of a text (whitespace split, as lm-eval's `word_ngrams`)."""
    return normalize(text).split()


def ngrams(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    """The n-grams of a word list as word tuples; lm-eval's `janitor.word_ngrams` joins each with one space."""
    # n staggered iterators zipped: built and hashed in C, about twice as fast as joining each gram into a string
    return zip(*(islice(words, j, None) for j in range(n)))


@dataclass
class NgramIndex:
    """The grams of benchmark items: gram -> the items holding it. Build with `benchmark_ngrams` and `add`."""

    n: int = N
    slots: list[tuple[str, str]] = field(default_factory=list)  # slot -> (benchmark, item id)
    grams: dict[tuple[str, ...], list[int]] = field(default_factory=dict)  # gram -> slots of the items holding it
    lengths: set[int] = field(default_factory=set)  # gram lengths in words: n, and those of items shorter than n
    # k < n -> the longest word of each k-word gram: a text with none of them needs no pass over its k-grams
    anchors: dict[int, set[str]] = field(default_factory=dict)
    items: dict[str, list[str]] = field(default_factory=dict)  # benchmark -> every item id, in order
    gramless: dict[str, list[str]] = field(default_factory=dict)  # benchmark -> ids with no word: never flagged

    def add(self, benchmark: str, items: Iterable[tuple[str, str]]) -> NgramIndex:
        """Index a benchmark's (item id, text) pairs; returns self. ValueError for a repeated benchmark or item id."""
        if benchmark in self.items:
            raise ValueError(f"benchmark {benchmark!r} is indexed already")
        pairs = [(str(item_id), text) for item_id, text in items]
        ids = [item_id for item_id, _ in pairs]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"benchmark {benchmark!r}: item ids repeat: {repeated[:5]}")
        self.items[benchmark] = ids
        gramless = self.gramless[benchmark] = []
        for item_id, text in pairs:
            words = words_of(text)
            if not words:
                gramless.append(item_id)
                continue
            slot = len(self.slots)
            self.slots.append((benchmark, item_id))
            k = min(len(words), self.n)  # an item shorter than n is one gram of all its words
            self.lengths.add(k)
            if k < self.n:
                self.anchors.setdefault(k, set()).add(max(words, key=len))
            for gram in set(ngrams(words, k)):
                self.grams.setdefault(gram, []).append(slot)
        if gramless:
            log.warning("decontamination: %s: %d items have no words after normalisation and are never flagged: %s",
                        benchmark, len(gramless), gramless[:5])
        return self


def benchmark_ngrams(items: Iterable[tuple[str, str]], n: int = N, *, benchmark: str) -> NgramIndex:
    """Index one benchmark's (item id, text) pairs by their word n-grams; `NgramIndex.add` adds more benchmarks."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return NgramIndex(n).add(benchmark, items)


@dataclass(frozen=True)
class Match:
    """Where an item was first found in a source: one shared gram (normalised) and the file and line or record."""

    item: str
    benchmark: str
    ngram: str
    source: str
    file: str
    line: int  # the line number, or for a JSON array the record number (index + 1)
    unit: str  # "line" or "record"
    field: str  # the JSON key path of the string ("output", "messages[1].content"); "" for a text line


@dataclass
class Report:
    """What `scan` found: per source its stats and, per benchmark, the first match of each contaminated item."""

    n: int
    items: dict[str, list[str]]  # benchmark -> every item id
    sources: dict[str, dict] = field(default_factory=dict)  # source -> {"files", "texts", "bytes", "bad", "seconds"}
    found: dict[str, dict[str, dict[str, Match]]] = field(default_factory=dict)  # source -> benchmark -> id -> match

    def counts(self) -> dict[str, dict[str, int]]:
        """Contaminated items per source and benchmark (every benchmark listed, 0 included)."""
        return {s: {b: len(self.found[s][b]) for b in self.items} for s in self.sources}

    def contaminated(self, benchmark: str, sources: Iterable[str] | None = None) -> set[str]:
        """The ids of `benchmark`'s items found in any of `sources` (default: all)."""
        if benchmark not in self.items:
            raise KeyError(f"benchmark {benchmark!r} was not scanned (scanned: {sorted(self.items)})")
        return {i for s in (self.sources if sources is None else sources) for i in self.found[s][benchmark]}

    def matches(self) -> Iterator[Match]:
        """Every match: by source, benchmark and item order."""
        for source in self.sources:
            for benchmark, ids in self.items.items():
                found = self.found[source][benchmark]
                yield from (found[i] for i in ids if i in found)

    def rows(self) -> list[dict]:
        """One row per match, ROW_COLUMNS: item, benchmark, ngram, source, file, line, unit, field."""
        return [asdict(m) for m in self.matches()]

    def to_dict(self) -> dict:
        """JSON-able: n, per benchmark items/contaminated/clean, per source stats and counts, every match."""
        benchmarks = {}
        for b, ids in self.items.items():
            k = len(self.contaminated(b))
            benchmarks[b] = {"items": len(ids), "contaminated": k, "clean": len(ids) - k}
        counts = self.counts()
        return {
            "n": self.n,
            "benchmarks": benchmarks,
            "sources": {s: {**stats, "contaminated": counts[s]} for s, stats in self.sources.items()},
            "matches": self.rows(),
        }


def clean_ids(report: Report, benchmark: str, sources: Iterable[str] | None = None) -> set[str]:
    """The ids of `benchmark`'s items found in none of `sources` (default: every scanned source)."""
    contaminated = report.contaminated(benchmark, sources)
    return set(report.items[benchmark]) - contaminated


# ---------------------------------------------------------------------------------------------------------------
# Scanning.


class _Scanner:
    """Looks a source's texts up in the index and records the first match of each item."""

    def __init__(self, index: NgramIndex, found: dict[str, dict[str, Match]], source: str):
        self.index, self.found, self.source = index, found, source
        self.keys = index.grams.keys()
        self.lengths = sorted(index.lengths, reverse=True)

    def check(self, words: list[str], file: str, line: int, unit: str = "line", key: str = "",
              starts: Sequence[int] = ()) -> None:
        """Look up every gram of `words`, which are on `line` but for the first len(`starts`), on those lines."""
        present = set(words) if self.index.anchors else None
        for k in self.lengths:
            if len(words) < k or (k < self.index.n and self.index.anchors[k].isdisjoint(present)):
                continue
            if self.keys.isdisjoint(ngrams(words, k)):
                continue
            for i, gram in enumerate(ngrams(words, k)):
                for slot in self.index.grams.get(gram, ()):
                    benchmark, item = self.index.slots[slot]
                    if item not in self.found[benchmark]:
                        at = starts[i] if i < len(starts) else line
                        match = Match(item, benchmark, " ".join(gram), self.source, file, at, unit, key)
                        self.found[benchmark][item] = match


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, string) for every string in a JSON value, in document order."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, v in value.items():
            yield from _strings(v, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def _base_suffix(path: Path) -> str:
    """The suffix that names the format, under a compression suffix (.jsonl for x.jsonl.zst)."""
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return Path(name).suffix


def _scan_jsonl(f: BinaryIO, scanner: _Scanner, display: str, stats: dict) -> None:
    for lineno, raw in enumerate(f, 1):
        stats["bytes"] += len(raw)
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8-sig", "replace"))  # -sig: a byte-order mark on line 1
        except json.JSONDecodeError as err:
            stats["bad"] += 1
            if stats["bad"] <= MAX_BAD_LOGGED:
                log.warning("decontamination: %s:%d: not JSON (%s); skipped and counted", display, lineno, err.msg)
            continue
        stats["texts"] += 1
        for key, text in _strings(record):
            scanner.check(words_of(text), display, lineno, "line", key)


def _scan_lines(f: BinaryIO, scanner: _Scanner, display: str, stats: dict, carry: bool) -> None:
    """Per line; with `carry`, the last n - 1 words of the lines before start the next (a gram may span lines)."""
    keep = scanner.index.n - 1
    tail: list[str] = []
    tail_lines: list[int] = []
    for lineno, raw in enumerate(f, 1):
        stats["bytes"] += len(raw)
        stats["texts"] += 1
        words = words_of(raw.decode("utf-8-sig", "replace"))  # -sig: a byte-order mark on line 1
        if not carry:
            scanner.check(words, display, lineno)
            continue
        if not words:
            continue
        scanner.check(tail + words, display, lineno, starts=tail_lines)
        tail = (tail + words)[-keep:] if keep else []
        tail_lines = (tail_lines + [lineno] * min(len(words), keep))[-keep:] if keep else []


def _json_array(f: BinaryIO, display: str, stats: dict) -> Iterator[Any]:
    """The entries of a top-level JSON array, parsed one at a time from a stream (memory: one entry and a chunk).

    An empty (or blank) file has no entries.
    """
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")("replace")
    buf, pos, eof = "", 0, False

    def fill(size: int) -> None:
        nonlocal buf, pos, eof
        chunk = f.read(size)
        stats["bytes"] += len(chunk)
        eof = not chunk
        buf, pos = buf[pos:] + utf8.decode(chunk, final=eof), 0

    def peek() -> str:
        """The next non-whitespace character ("" at the end), not consumed."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\n\r":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos : pos + 1]
            fill(JSON_CHUNK)

    def fail(record: int, what: str) -> DecontaminationError:
        return DecontaminationError(f"{display}: record {record}: {what}; expected a JSON array of records")

    def value(record: int) -> Any:
        """The next JSON value, reading on until it is whole."""
        nonlocal pos
        while True:
            peek()
            try:
                parsed, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or eof:  # else a number at the buffer's end may go on in the next chunk
                    pos = end
                    return parsed
            except json.JSONDecodeError as err:
                if eof:
                    raise fail(record, f"malformed JSON ({err.msg})") from None
            fill(max(JSON_CHUNK, len(buf) - pos))  # doubling: a record larger than a chunk parses in O(size)

    first = peek()
    if not first:
        return
    if first != "[":
        raise fail(1, f"the file starts with {first!r}")
    pos += 1
    if peek() == "]":
        pos += 1
    else:
        for record in count(1):
            yield value(record)
            sep = peek()
            pos += 1
            if sep == "]":
                break
            if sep != ",":
                raise fail(record + 1, f"{sep!r} after a record, not ',' or ']'" if sep else "the file ends inside the array")
    if peek():
        raise DecontaminationError(f"{display}: {peek()!r} after the array's closing ']'; expected a JSON array of records")


def _scan_json(f: BinaryIO, scanner: _Scanner, display: str, stats: dict) -> None:
    for number, record in enumerate(_json_array(f, display, stats), 1):
        stats["texts"] += 1
        for key, text in _strings(record):
            scanner.check(words_of(text), display, number, "record", key)


def _scan_file(path: Path, scanner: _Scanner, stats: dict) -> None:
    if not path.is_file():
        raise MissingInputError(f"{path}: training file of source {scanner.source!r} not found")
    suffix, display = _base_suffix(path), str(path)
    with open_binary(path, compression_of(path)) as f:
        if suffix in (".jsonl", ".ndjson"):
            _scan_jsonl(f, scanner, display, stats)
        elif suffix == ".json":
            _scan_json(f, scanner, display, stats)
        else:
            _scan_lines(f, scanner, display, stats, carry=suffix in TEXT_SUFFIXES)


def scan(index: NgramIndex, sources: Mapping[str, Iterable[Path]], n: int | None = None) -> Report:
    """Stream every training text of each named source and look its grams up in `index`.

    Args:
        index: the benchmarks' grams (`benchmark_ngrams`).
        sources: source name ("corpus", "sft", "dpo", "classifier", "base_card", ...) -> its files, scanned in
            order; a source with no files (or empty files) is fine.
        n: the gram size, when given it must be the index's (the index fixes it).

    Returns:
        The Report: per source its stats ("files", "texts" (lines or records), "bytes", "bad" (skipped JSONL
        lines), "seconds") and per benchmark the first match of each contaminated item.

    Raises MissingInputError for a file that is not there, DecontaminationError for a malformed JSON array.
    """
    if n is not None and n != index.n:
        raise ValueError(f"scan: n={n} but the index holds {index.n}-grams")
    report = Report(index.n, {b: list(ids) for b, ids in index.items.items()})
    for source, paths in sources.items():
        found = report.found[source] = {b: {} for b in index.items}
        stats = report.sources[source] = {"files": 0, "texts": 0, "bytes": 0, "bad": 0, "seconds": 0.0}
        scanner = _Scanner(index, found, source)
        start = time.perf_counter()
        for path in paths:
            _scan_file(Path(path), scanner, stats)
            stats["files"] += 1
        stats["seconds"] = round(time.perf_counter() - start, 3)
        log.info("decontamination: %s: %d files, %d texts, %.1f MB in %.1f s; contaminated: %s", source, stats["files"],
                 stats["texts"], stats["bytes"] / 1e6, stats["seconds"], {b: len(m) for b, m in found.items()})
    return report
