"""Readers: one collected file -> its documents, streamed, with every bad byte and bad record counted.

    report = FileReport()
    for text in read_documents(path, spec, options, report):
        ...

Formats (see `lmcore.data.formats`), each optionally gzip or zstd compressed:

- txt, md: decoded line by line; the lines go through `prepare_lines` (cleaning, Gutenberg stripping) and
  are cut into documents, a whole file or blank-line separated paragraphs (`split`);
- jsonl: one JSON object per line, the document is its `text_field`;
- json: an array of objects, or an object holding exactly one such array (read whole: JSON has no
  record boundaries to stream on);
- csv: a header row naming `text_field`, one record per row (fields of any size);
- parquet: read batch by batch with pyarrow, the `text_field` column.

Invalid UTF-8 (`decode_errors`): "error" stops with the file, byte offset and line; "replace" substitutes
U+FFFD and counts the substituted characters; "skip" drops the document (text files) or record holding
the bytes, and counts it. Malformed records (bad JSON, not an object, a missing, null or non-string text
field, a CSV row with the wrong number of fields): "error" stops naming the file and line (or record);
"skip" counts them, and the file fails when more than `max_bad_fraction` of its records are bad.

While a file is read its bytes are hashed: a file that does not match the sha256 in the manifest stops
the stage once it is read (the stage's output is written atomically, so nothing is kept).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmcore.data.formats import open_binary
from lmcore.errors import InputError, one_line
from lmcore.io import sha256_file

log = logging.getLogger(__name__)

_REPLACEMENT_UTF8 = "\ufffd".encode()
_SURROGATE = re.compile("[\ud800-\udfff]")
PARQUET_BATCH_ROWS = 1024
MAX_BAD_EXAMPLES = 3  # bad records logged per file when they are skipped
_HINT_DECODE = "set preprocess.decode_errors=replace or skip to go on"
_HINT_BAD = "set preprocess.on_bad=skip to skip and count malformed records"


class PreprocessError(InputError):
    """Raw data that cannot be preprocessed: a missing, changed, undecodable or malformed file, or nothing left."""


@dataclass(frozen=True)
class FileSpec:
    """One file of a collect manifest entry."""

    file: str  # posix path relative to the raw folder
    format: str  # txt | md | jsonl | json | csv | parquet
    compression: str | None = None  # None | gzip | zstd
    sha256: str | None = None
    text_field: str = "text"


@dataclass(frozen=True)
class ReadOptions:
    split: str = "paragraph"  # file | paragraph (text files)
    decode_errors: str = "error"  # error | replace | skip
    on_bad: str = "error"  # error | skip
    max_bad_fraction: float = 0.0


@dataclass
class FileReport:
    """What reading one file found; the preprocess stage adds these up per source."""

    bytes_in: int = 0  # bytes read: decompressed for txt/md/jsonl/json/csv, the file size for parquet
    records: int = 0  # jsonl/json/csv/parquet records, bad ones included
    bad_records: int = 0
    bad_bytes: int = 0  # UTF-8 bytes of the bad records (as read) where known
    replaced_chars: int = 0  # U+FFFD substituted for invalid bytes (a U+FFFD in the file is not counted)
    skipped_non_utf8: int = 0  # documents or records dropped for invalid bytes (decode_errors=skip)
    skipped_bytes: int = 0
    documents: int = 0  # documents yielded

    @property
    def empty(self) -> bool:
        """Nothing in the file: no document, record or skipped text."""
        return self.documents == 0 and self.records == 0 and self.skipped_non_utf8 == 0


# ------------------------------------------------------------------------------------------- file access


class _HashingReader(io.RawIOBase):
    """Passes a binary file through, hashing every byte read."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
        return n

    def drain(self) -> str:
        """Read what the decompressor left (trailing padding) and return the hex digest of the whole file."""
        while self.raw.read(1 << 20):
            pass
        return self.sha256.hexdigest()

    def close(self) -> None:
        self.raw.close()
        super().close()


def _check_sha256(display: str, expected: str | None, actual: str) -> None:
    if expected is not None and actual != expected:
        raise PreprocessError(f"{display}: does not match the sha256 in the collect manifest ({actual} != {expected}); re-run collect")


class _Stream:
    """A decompressed binary stream of one file whose sha256 is checked when it has been read.

    The decompressors are `lmcore.data.formats.open_binary`'s, stacked on a hashing reader so that the
    file is read once.
    """

    def __init__(self, path: Path, compression: str | None, display: str, sha256: str | None):
        self.display, self.expected = display, sha256
        self.hashing = _HashingReader(open(path, "rb"))
        try:
            self.stream: BinaryIO = open_binary(self.hashing, compression)
        except ValueError:
            self.hashing.close()
            raise PreprocessError(f"{display}: unknown compression {compression!r}") from None

    def __enter__(self) -> BinaryIO:
        return self.stream

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                _check_sha256(self.display, self.expected, self.hashing.drain())
        finally:
            self.stream.close()
            self.hashing.close()


# ---------------------------------------------------------------------------------------------- decoding


class _Decoder:
    """Decodes lines of one file under `decode_errors`, counting replacements; "skip" leaves surrogates
    (surrogateescape) for the caller to find, and sets `tainted`."""

    def __init__(self, display: str, mode: str, report: FileReport):
        self.display, self.mode, self.report = display, mode, report
        self.tainted = False

    def __call__(self, raw: bytes, offset: int, lineno: int, where: str | None = None) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if self.mode == "error":
                line = lineno + raw.count(b"\n", 0, err.start)  # `raw` is a line, or a whole file (json)
                at = where or f"byte offset {offset + err.start} (line {line})"
                raise PreprocessError(
                    f"{self.display}: invalid UTF-8 at {at}: {raw[err.start:err.end]!r} ({err.reason}); {_HINT_DECODE}"
                ) from None
            if self.mode == "replace":
                text = raw.decode("utf-8", "replace")
                self.report.replaced_chars += text.count("\ufffd") - raw.count(_REPLACEMENT_UTF8)
                return text
            self.tainted = True
            return raw.decode("utf-8", "surrogateescape")


def _binary_lines(stream: BinaryIO, report: FileReport) -> Iterator[tuple[bytes, int, int]]:
    """(line with its ending, byte offset, line number), split on b"\\n" (never inside a UTF-8 character)."""
    offset = 0
    for lineno, raw in enumerate(stream, 1):
        yield raw, offset, lineno
        offset += len(raw)
        report.bytes_in += len(raw)


def _has_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


# ----------------------------------------------------------------------------------------- bad records


class _BadRecords:
    def __init__(self, display: str, options: ReadOptions, report: FileReport):
        self.display, self.options, self.report = display, options, report
        self.examples: list[str] = []

    def __call__(self, message: str, nbytes: int = 0) -> None:
        if self.options.on_bad == "error":
            raise PreprocessError(f"{message}; {_HINT_BAD}")
        self.report.bad_records += 1
        self.report.bad_bytes += nbytes
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append(message)
            log.warning("skipped a bad record: %s", message)

    def finish(self) -> None:
        bad, total = self.report.bad_records, self.report.records
        if not bad:
            return
        fraction = bad / total
        if fraction > self.options.max_bad_fraction:
            raise PreprocessError(
                f"{self.display}: {bad} of {total} records are bad ({fraction:.2%} > preprocess.max_bad_fraction="
                f"{self.options.max_bad_fraction}); first: {self.examples[0]}"
            )
        log.warning("%s: skipped %d bad records of %d", self.display, bad, total)


def _text_field(record, field: str) -> str | None:
    """Why `record` has no usable text, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if field not in record:
        keys = sorted(record)[:8]
        return f"no {field!r} field (fields: {keys})"
    value = record[field]
    if value is None:
        return f"{field!r} is null"
    if not isinstance(value, str):
        return f"{field!r} is a {type(value).__name__}, not a string"
    return None


# ---------------------------------------------------------------------------------------------- readers


def _split(lines: Iterable[str], mode: str) -> Iterator[str]:
    if mode == "file":
        text = "\n".join(lines).strip()
        if text:
            yield text
        return
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph).strip()
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph).strip()


def _text_lines(stream: BinaryIO, decode: _Decoder, report: FileReport) -> Iterator[str]:
    """Decoded lines without their endings; \\r\\n and a lone \\r end a line too."""
    for raw, offset, lineno in _binary_lines(stream, report):
        line = decode(raw, offset, lineno)
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        if "\r" in line:
            yield from line.split("\r")
        else:
            yield line


def _read_text(stream, options, report, display, prepare_lines) -> Iterator[str]:
    decode = _Decoder(display, options.decode_errors, report)
    lines = _text_lines(stream, decode, report)
    if prepare_lines is not None:
        lines = prepare_lines(lines)
    for doc in _split(lines, options.split):
        if decode.tainted and _has_surrogate(doc):
            report.skipped_non_utf8 += 1
            report.skipped_bytes += len(doc.encode("utf-8", "surrogateescape"))
            continue
        report.documents += 1
        yield doc


def _read_jsonl(stream, spec, options, report, display) -> Iterator[str]:
    decode = _Decoder(display, options.decode_errors, report)
    bad = _BadRecords(display, options, report)
    for raw, offset, lineno in _binary_lines(stream, report):
        if not raw.strip():
            continue
        report.records += 1
        line = decode(raw, offset, lineno)
        if decode.tainted and _has_surrogate(line):
            report.skipped_non_utf8 += 1
            report.skipped_bytes += len(raw)
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))  # so that the error's column is on this line
        except json.JSONDecodeError as err:
            bad(f"{display}:{lineno}: malformed JSON at column {err.colno}: {err.msg}", len(raw))
            continue
        why = _text_field(record, spec.text_field)
        if why is None and _has_surrogate(record[spec.text_field]):
            why = f"{spec.text_field!r} holds a lone surrogate (an escaped \\ud800-\\udfff)"
        if why is not None:
            bad(f"{display}:{lineno}: {why}", len(raw))
            continue
        report.documents += 1
        yield record[spec.text_field]
    bad.finish()


def _read_json(stream, spec, options, report, display) -> Iterator[str]:
    data = stream.read()
    report.bytes_in += len(data)
    if not data.strip():
        return
    decode = _Decoder(display, options.decode_errors, report)
    text = decode(data, 0, 1)
    bad = _BadRecords(display, options, report)
    try:
        top = json.loads(text)
    except json.JSONDecodeError as err:
        report.records += 1
        bad(f"{display}:{err.lineno}: malformed JSON at column {err.colno}: {err.msg}", len(data))
        bad.finish()
        return
    if isinstance(top, dict):
        arrays = [k for k, v in top.items() if isinstance(v, list)]
        if len(arrays) != 1:
            raise PreprocessError(
                f"{display}: expected a JSON array of objects, or an object holding one array; "
                f"this object holds {len(arrays)} arrays ({arrays[:8]})"
            )
        top = top[arrays[0]]
    if not isinstance(top, list):
        raise PreprocessError(f"{display}: expected a JSON array of objects, got {type(top).__name__}")
    for i, record in enumerate(top):
        report.records += 1
        if decode.tainted and _has_surrogate(json.dumps(record, ensure_ascii=False)):
            report.skipped_non_utf8 += 1
            continue
        why = _text_field(record, spec.text_field)
        if why is None and _has_surrogate(record[spec.text_field]):
            why = f"{spec.text_field!r} holds a lone surrogate (an escaped \\ud800-\\udfff)"
        if why is not None:
            bad(f"{display}: record {i}: {why}", len(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")))
            continue
        report.documents += 1
        yield record[spec.text_field]
    bad.finish()


def _read_csv(stream, spec, options, report, display) -> Iterator[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a document is one field, of any size
    decode = _Decoder(display, options.decode_errors, report)
    bad = _BadRecords(display, options, report)
    lines = (decode(raw, offset, lineno) for raw, offset, lineno in _binary_lines(stream, report))
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise PreprocessError(f"{display}:1: unreadable CSV header: {one_line(err)}") from None
    if spec.text_field not in header:
        raise PreprocessError(f"{display}: the CSV header has no {spec.text_field!r} column (columns: {header[:16]})")
    column = header.index(spec.text_field)
    while True:
        line_start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            report.records += 1
            bad(f"{display}:{line_start}: malformed CSV: {err}")
            continue
        if not row:
            continue  # a blank line
        report.records += 1
        nbytes = sum(len(v) for v in row)
        if decode.tainted and any(_has_surrogate(v) for v in row):
            report.skipped_non_utf8 += 1
            report.skipped_bytes += nbytes
            continue
        if len(row) != len(header):
            bad(f"{display}:{line_start}: {len(row)} fields, the header has {len(header)}", nbytes)
            continue
        value = row[column]
        if not value:
            bad(f"{display}:{line_start}: {spec.text_field!r} is empty (null)", nbytes)
            continue
        report.documents += 1
        yield value
    bad.finish()


def _read_parquet(path: Path, spec, options, report, display) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if spec.sha256 is not None:  # pyarrow reads by random access: hashed in a pass of its own
        _check_sha256(display, spec.sha256, sha256_file(path))
    report.bytes_in += path.stat().st_size
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise PreprocessError(f"{display}: not a readable parquet file: {one_line(err)}") from None
    schema = pf.schema_arrow
    if spec.text_field not in schema.names:
        raise PreprocessError(f"{display}: no {spec.text_field!r} column (columns: {schema.names[:16]})")
    kind = schema.field(spec.text_field).type
    as_bytes = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    decode = _Decoder(display, options.decode_errors, report)
    bad = _BadRecords(display, options, report)
    index = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[spec.text_field]):
        column = batch.column(0)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            # Decoded here, not by pyarrow, so that decode_errors applies and names the record.
            column = column.cast(pa.large_binary())
        for value in column.to_pylist():
            report.records += 1
            index += 1
            if value is None:
                bad(f"{display}: record {index}: {spec.text_field!r} is null")
                continue
            if not as_bytes:
                bad(f"{display}: record {index}: {spec.text_field!r} is {kind}, not a string")
                continue
            text = decode(value, 0, 1, where=f"record {index}, byte offset {_offset_hint(value)} of {spec.text_field!r}")
            if decode.tainted and _has_surrogate(text):
                report.skipped_non_utf8 += 1
                report.skipped_bytes += len(value)
                continue
            report.documents += 1
            yield text
    bad.finish()


def _offset_hint(value: bytes) -> int:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return 0


def read_documents(
    path: Path,
    spec: FileSpec,
    options: ReadOptions,
    report: FileReport,
    *,
    display: str | None = None,
    prepare_lines: Callable[[Iterator[str]], Iterator[str]] | None = None,
) -> Iterator[str]:
    """The documents of one collected file, as they are read.

    Args:
        path: the file.
        spec: its format, compression, expected sha256 and text field.
        options: splitting, decoding and bad-record policy.
        report: counts, updated as the file is read (complete once the iterator is exhausted).
        display: how messages name the file (default: `path`).
        prepare_lines: for txt/md, a transform of the decoded lines applied before splitting into documents.

    Raises:
        PreprocessError: naming the file (and line or record) on a decoding or record error, a sha256 mismatch
        or too many bad records.
    """
    display = display or str(path)
    if spec.format == "parquet":
        yield from _read_parquet(path, spec, options, report, display)
        return
    readers = {"txt": None, "md": None, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}
    if spec.format not in readers:
        raise PreprocessError(f"{display}: unknown format {spec.format!r} (known: {sorted([*readers, 'parquet'])})")
    try:
        with _Stream(path, spec.compression, display, spec.sha256) as stream:
            if spec.format in ("txt", "md"):
                yield from _read_text(stream, options, report, display, prepare_lines)
            else:
                yield from readers[spec.format](stream, spec, options, report, display)
    except (OSError, EOFError, zlib.error) as err:  # gzip: BadGzipFile is an OSError, a truncated file EOFError
        raise PreprocessError(f"{display}: cannot read ({spec.compression or 'uncompressed'}): {one_line(err)}") from None
    except Exception as err:
        if type(err).__name__ == "ZstdError":
            raise PreprocessError(f"{display}: cannot decompress (zstd): {one_line(err)}") from None
        raise
