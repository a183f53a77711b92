"""Readers: every format and compression, and every kind of bad input, counted or named."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmcore.data.readers import FileReport, FileSpec, PreprocessError, ReadOptions, read_documents

TEXTS = ["First record, with a comma.", 'Second "quoted"\nover two lines.', "Third: caf\u00e9 \u2014 \U0001f600"]


def compress(data: bytes, compression: str | None) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def encode(fmt: str, texts: list, field: str = "text") -> bytes:
    if fmt in ("txt", "md"):
        return "\n\n".join(texts).encode() + b"\n"
    if fmt == "jsonl":
        return b"".join(json.dumps({field: t, "n": i}).encode() + b"\n" for i, t in enumerate(texts))
    if fmt == "json":
        return json.dumps([{field: t} for t in texts]).encode()
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["id", field])
        writer.writerows([i, t] for i, t in enumerate(texts))
        return buf.getvalue().encode()
    raise ValueError(fmt)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read(path: Path, fmt: str, compression: str | None = None, *, sha256: str | None = None, field: str = "text",
         report: FileReport | None = None, **options) -> list[str]:
    spec = FileSpec(file=path.name, format=fmt, compression=compression, sha256=sha256, text_field=field)
    return list(read_documents(path, spec, ReadOptions(**options), report if report is not None else FileReport()))


SUFFIX = {None: "", "gzip": ".gz", "zstd": ".zst"}


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
@pytest.mark.parametrize("fmt", ["txt", "md", "jsonl", "json", "csv"])
def test_every_format_and_compression(tmp_path, fmt, compression):
    raw = encode(fmt, TEXTS)
    data = compress(raw, compression)
    path = write(tmp_path, f"part.{fmt}{SUFFIX[compression]}", data)
    report = FileReport()
    docs = read(path, fmt, compression, sha256=hashlib.sha256(data).hexdigest(), report=report)
    assert docs == TEXTS
    assert report.bytes_in == len(raw)  # decompressed
    assert report.documents == 3 and report.records == (0 if fmt in ("txt", "md") else 3)
    assert report.bad_records == report.replaced_chars == report.skipped_non_utf8 == 0


def test_parquet_batches_and_string_or_binary_columns(tmp_path):
    texts = [f"document number {i}" for i in range(2500)]  # three batches of PARQUET_BATCH_ROWS
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"id": list(range(2500)), "body": texts, "raw": [t.encode() for t in texts]}), path,
                   row_group_size=1000)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    report = FileReport()
    assert read(path, "parquet", sha256=sha, field="body", report=report) == texts
    assert report.records == report.documents == 2500 and report.bytes_in == path.stat().st_size
    assert read(path, "parquet", field="raw") == texts
    with pytest.raises(PreprocessError, match=r"part\.parquet: no 'text' column \(columns: \['id', 'body', 'raw'\]\)"):
        read(path, "parquet")
    with pytest.raises(PreprocessError, match="does not match the sha256.*re-run collect"):
        read(path, "parquet", sha256="0" * 64, field="body")


def test_json_object_holding_one_array(tmp_path):
    path = write(tmp_path, "d.json", json.dumps({"version": 2, "data": [{"text": "a b"}, {"text": "c"}]}).encode())
    assert read(path, "json") == ["a b", "c"]
    two = write(tmp_path, "two.json", json.dumps({"train": [], "test": []}).encode())
    with pytest.raises(PreprocessError, match=r"two\.json: expected a JSON array .* holds 2 arrays"):
        read(two, "json")


def test_text_split_file_or_paragraph_and_line_endings(tmp_path):
    path = write(tmp_path, "a.txt", b"one\r\ntwo\r\n\r\n\r\nthree\rfour\r\rfive\n   \nsix")
    assert read(path, "txt") == ["one\ntwo", "three\nfour", "five", "six"]
    assert read(path, "txt", split="file") == ["one\ntwo\n\n\nthree\nfour\n\nfive\n   \nsix"]


def test_csv_field_larger_than_the_default_limit_and_multiline(tmp_path):
    big = "word " * 60_000  # 300 kB in one field; csv's default limit is 128 kB
    path = write(tmp_path, "big.csv", encode("csv", [big.strip(), "line one\r\nline two"]))
    assert read(path, "csv") == [big.strip(), "line one\r\nline two"]


def test_sha256_checked_while_reading_compressed_file(tmp_path):
    data = compress(encode("jsonl", TEXTS), "gzip")
    path = write(tmp_path, "part.jsonl.gz", data)
    with pytest.raises(PreprocessError, match=r"part\.jsonl\.gz: does not match the sha256 .*; re-run collect"):
        read(path, "jsonl", "gzip", sha256=hashlib.sha256(b"other").hexdigest())


def test_zstd_concatenated_frames(tmp_path):
    c = zstandard.ZstdCompressor()
    data = c.compress(b'{"text": "frame one"}\n') + c.compress(b'{"text": "frame two"}\n')
    path = write(tmp_path, "p.jsonl.zst", data)
    assert read(path, "jsonl", "zstd", sha256=hashlib.sha256(data).hexdigest()) == ["frame one", "frame two"]


def test_corrupt_gzip_names_the_file(tmp_path):
    path = write(tmp_path, "broken.txt.gz", gzip.compress(b"hello world\n" * 100)[:40])
    with pytest.raises(PreprocessError, match=r"broken\.txt\.gz: cannot read \(gzip\)"):
        read(path, "txt", "gzip")


# ------------------------------------------------------------------------------------------- non-UTF-8

BAD_TXT = b"Good paragraph one.\n\nbad \xff byte\nhere\n\nGood paragraph \xef\xbf\xbd three.\n"


def test_invalid_utf8_error_names_file_offset_and_line(tmp_path):
    path = write(tmp_path, "bad.txt", BAD_TXT)
    with pytest.raises(PreprocessError, match=r"bad\.txt: invalid UTF-8 at byte offset 25 \(line 3\): b'\\xff'"):
        read(path, "txt")
    gz = write(tmp_path, "bad.txt.gz", gzip.compress(BAD_TXT))
    with pytest.raises(PreprocessError, match=r"bad\.txt\.gz: invalid UTF-8 at byte offset 25 \(line 3\)"):
        read(gz, "txt", "gzip")
    jsonl = write(tmp_path, "bad.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(PreprocessError, match=r"bad\.jsonl: invalid UTF-8 at byte offset 25 \(line 2\)"):
        read(jsonl, "jsonl")
    whole = write(tmp_path, "bad.json", b'[\n{"text": "ok"},\n{"text": "\xff"}\n]')
    with pytest.raises(PreprocessError, match=r"bad\.json: invalid UTF-8 at byte offset 28 \(line 3\)"):
        read(whole, "json")


def test_replace_counts_substituted_chars_only(tmp_path):
    path = write(tmp_path, "bad.txt", BAD_TXT)
    report = FileReport()
    docs = read(path, "txt", report=report, decode_errors="replace")
    assert docs == ["Good paragraph one.", "bad \ufffd byte\nhere", "Good paragraph \ufffd three."]
    assert report.replaced_chars == 1  # the U+FFFD already in the file is not a replacement
    csv_path = write(tmp_path, "bad.csv", b"text\nab\xfe\xffc\n")
    report = FileReport()
    assert read(csv_path, "csv", report=report, decode_errors="replace") == ["ab\ufffd\ufffdc"]
    assert report.replaced_chars == 2


def test_skip_drops_the_document_or_record_holding_bad_bytes(tmp_path):
    report = FileReport()
    assert read(write(tmp_path, "bad.txt", BAD_TXT), "txt", report=report, decode_errors="skip") == [
        "Good paragraph one.", "Good paragraph \ufffd three."]
    assert (report.skipped_non_utf8, report.documents, report.replaced_chars) == (1, 2, 0)
    assert report.skipped_bytes == len("bad \xff byte\nhere".encode("latin-1"))

    report = FileReport()
    jsonl = write(tmp_path, "bad.jsonl", b'{"text": "keep"}\n{"text": "dr\xffop"}\n{"text": "keep too"}\n')
    assert read(jsonl, "jsonl", report=report, decode_errors="skip") == ["keep", "keep too"]
    assert (report.records, report.skipped_non_utf8, report.bad_records) == (3, 1, 0)

    report = FileReport()
    csv_path = write(tmp_path, "bad.csv", b"id,text\n1,keep\n2,dr\xffop\n3,keep too\n")
    assert read(csv_path, "csv", report=report, decode_errors="skip") == ["keep", "keep too"]
    assert report.skipped_non_utf8 == 1

    report = FileReport()
    pq_path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": pa.array([b"keep", b"dr\xffop", b"keep too"], pa.binary())}), pq_path)
    assert read(pq_path, "parquet", report=report, decode_errors="skip") == ["keep", "keep too"]
    assert report.skipped_non_utf8 == 1
    with pytest.raises(PreprocessError, match=r"bad\.parquet: invalid UTF-8 at record 2, byte offset 2 of 'text'"):
        read(pq_path, "parquet")

    report = FileReport()  # a whole file of one paragraph, split=file: the file is the document
    assert read(write(tmp_path, "one.txt", BAD_TXT), "txt", report=report, decode_errors="skip", split="file") == []
    assert report.skipped_non_utf8 == 1 and not report.empty


# ------------------------------------------------------------------------------------------ bad records

JSONL_WITH_BAD = (
    b'{"text": "one"}\n'
    b'{"text": "two"\n'  # line 2: malformed
    b"\n"  # blank lines are not records
    b'["not", "an", "object"]\n'  # line 4
    b'{"body": "no text field"}\n'  # line 5
    b'{"text": 42}\n'  # line 6
    b'{"text": null}\n'  # line 7
    b'{"text": "\\ud800 lone surrogate"}\n'  # line 8
    + b"".join(b'{"text": "good %d"}\n' % i for i in range(93))
)


def test_malformed_jsonl_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "recs.jsonl", JSONL_WITH_BAD)
    with pytest.raises(PreprocessError, match=r"recs\.jsonl:2: malformed JSON at column 15.*on_bad=skip"):
        read(path, "jsonl")


def test_malformed_jsonl_skipped_and_counted(tmp_path):
    path = write(tmp_path, "recs.jsonl", JSONL_WITH_BAD)
    report = FileReport()
    docs = read(path, "jsonl", report=report, on_bad="skip", max_bad_fraction=0.07)
    assert docs == ["one"] + [f"good {i}" for i in range(93)]
    assert (report.records, report.bad_records, report.documents) == (100, 6, 94)
    assert report.bad_bytes == sum(len(line) + 1 for line in JSONL_WITH_BAD.split(b"\n")[1:8] if line)


def test_bad_fraction_above_threshold_fails_naming_file_and_first_line(tmp_path):
    path = write(tmp_path, "recs.jsonl", JSONL_WITH_BAD)
    with pytest.raises(PreprocessError) as err:
        read(path, "jsonl", on_bad="skip", max_bad_fraction=0.05)
    msg = str(err.value)
    assert "recs.jsonl: 6 of 100 records are bad (6.00% > preprocess.max_bad_fraction=0.05)" in msg
    assert "first: " in msg and "recs.jsonl:2: malformed JSON" in msg


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'["a"]', r"recs\.jsonl:2: expected a JSON object, got list"),
        (b'{"body": "x"}', r"recs\.jsonl:2: no 'text' field \(fields: \['body'\]\)"),
        (b'{"text": 42}', r"recs\.jsonl:2: 'text' is a int, not a string"),
        (b'{"text": null}', r"recs\.jsonl:2: 'text' is null"),
        (b'{"text": "\\udc00"}', r"recs\.jsonl:2: 'text' holds a lone surrogate"),
    ],
)
def test_each_bad_record_kind_is_named(tmp_path, line, why):
    path = write(tmp_path, "recs.jsonl", b'{"text": "ok"}\n' + line + b"\n")
    with pytest.raises(PreprocessError, match=why):
        read(path, "jsonl")


def test_csv_bad_rows(tmp_path):
    data = b'id,text\n1,fine\n2,too,many\n3\n4,""\n5,"also fine"\n'
    path = write(tmp_path, "t.csv", data)
    with pytest.raises(PreprocessError, match=r"t\.csv:3: 3 fields, the header has 2"):
        read(path, "csv")
    report = FileReport()
    assert read(path, "csv", report=report, on_bad="skip", max_bad_fraction=0.6) == ["fine", "also fine"]
    assert (report.records, report.bad_records) == (5, 3)
    with pytest.raises(PreprocessError, match=r"t\.csv: the CSV header has no 'body' column"):
        read(path, "csv", field="body")


def test_parquet_nulls_and_non_string_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c", "d"], "n": [1, 2, 3, 4]}), path)
    with pytest.raises(PreprocessError, match=r"t\.parquet: record 2: 'text' is null"):
        read(path, "parquet")
    report = FileReport()
    assert read(path, "parquet", report=report, on_bad="skip", max_bad_fraction=0.25) == ["a", "c", "d"]
    assert (report.records, report.bad_records) == (4, 1)
    with pytest.raises(PreprocessError, match=r"t\.parquet: 4 of 4 records are bad .* record 1: 'n' is int64, not a string"):
        read(path, "parquet", field="n", on_bad="skip")


def test_malformed_json_file_is_one_bad_record(tmp_path):
    path = write(tmp_path, "d.json", b'[{"text": "a"},\n{"text": ]')
    with pytest.raises(PreprocessError, match=r"d\.json:2: malformed JSON at column 10"):
        read(path, "json")
    with pytest.raises(PreprocessError, match=r"d\.json: 1 of 1 records are bad"):
        read(path, "json", on_bad="skip")


@pytest.mark.parametrize(
    ("name", "fmt", "compression", "data"),
    [
        ("e.txt", "txt", None, b""),
        ("blank.md", "md", None, b"\n  \n\t\n"),
        ("e.jsonl.gz", "jsonl", "gzip", gzip.compress(b"", mtime=0)),  # no timestamp: xdist workers collect the same id
        ("e.json", "json", None, b"[]"),
        ("e.csv", "csv", None, b""),
        ("header.csv", "csv", None, b"id,text\n"),
    ],
)
def test_empty_files_are_empty_not_errors(tmp_path, name, fmt, compression, data):
    report = FileReport()
    assert read(write(tmp_path, name, data), fmt, compression, report=report) == []
    assert report.empty


def test_empty_parquet(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    report = FileReport()
    assert read(path, "parquet", report=report) == [] and report.empty
