"""preprocess(): decoding, cleaning, splitting, filtering and the counts reported for each step."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lmcore.config import CollectConfig, PreprocessConfig
from lmcore.data.collect import collect
from lmcore.data.preprocess import COUNTERS, PreprocessError, clean_text, preprocess
from lmcore.io import read_json, write_json
from lmcore.paths import DOCUMENTS, MANIFEST, STATS


def make_raw(raw: Path, files: dict[str, bytes]) -> Path:
    """A collect-stage folder: the files plus a manifest in collect's format, in the given order."""
    raw.mkdir(parents=True)
    entries = []
    for name, data in files.items():
        (raw / f"{name}.txt").write_bytes(data)
        entries.append({"name": name, "origin": "local", "source": f"{name}.txt", "file": f"{name}.txt",
                        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "license": "test"})
    write_json(raw / MANIFEST, {"sources": entries})
    return raw


def read_docs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / DOCUMENTS).read_text(encoding="utf-8").splitlines()]


A = ("\ufeffFirst paragraph has enough chars.\r\n\r\n\r\nshort\r\n\r\n"
     "Cafe\u0301 au lait is served here.   \r\nSecond line\t\r\n").encode()
B = "\n\nCaf\u00e9 au lait is served here.\nSecond line\n\nA unique paragraph in b.\n\n\n\n".encode()
C = b"Old Mac line one\rOld Mac line two"
E = "\ufeff\r\n  \r\n".encode()  # nothing but a BOM and blank lines


def test_clean_split_filter_dedup_with_exact_stats(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": A, "b": B, "e": E, "c": C})
    out = tmp_path / "clean"
    stats = preprocess(PreprocessConfig(min_chars=10), raw, out)

    assert read_docs(out) == [
        {"id": "a/0", "source": "a", "text": "First paragraph has enough chars."},
        # BOM gone, CRLF -> LF, e + combining acute -> U+00E9 (NFC), trailing spaces and tab stripped
        {"id": "a/1", "source": "a", "text": "Caf\u00e9 au lait is served here.\nSecond line"},
        # b's copy of that paragraph is a duplicate once a's is normalised
        {"id": "b/0", "source": "b", "text": "A unique paragraph in b."},
        {"id": "c/0", "source": "c", "text": "Old Mac line one\nOld Mac line two"},
    ]
    assert stats == read_json(out / STATS)
    assert stats["config"] == PreprocessConfig(min_chars=10).model_dump()
    assert stats["sources"] == {
        "a": {"files": 1, "bytes_in": len(A), "chars": 97, "bom_removed": 1, "replaced_chars": 0,
              "documents_split": 3, "dropped_empty": 0, "dropped_short": 1, "dropped_duplicate": 0,
              "documents_out": 2, "chars_out": 73},
        # leading and trailing blank lines are not documents
        "b": {"files": 1, "bytes_in": len(B), "chars": 72, "bom_removed": 0, "replaced_chars": 0,
              "documents_split": 2, "dropped_empty": 0, "dropped_short": 0, "dropped_duplicate": 1,
              "documents_out": 1, "chars_out": 24},
        "e": {"files": 1, "bytes_in": 9, "chars": 7, "bom_removed": 1, "replaced_chars": 0,
              "documents_split": 1, "dropped_empty": 1, "dropped_short": 0, "dropped_duplicate": 0,
              "documents_out": 0, "chars_out": 0},
        "c": {"files": 1, "bytes_in": 33, "chars": 33, "bom_removed": 0, "replaced_chars": 0,
              "documents_split": 1, "dropped_empty": 0, "dropped_short": 0, "dropped_duplicate": 0,
              "documents_out": 1, "chars_out": 33},
    }
    assert stats["total"] == {
        "files": 4, "bytes_in": len(A) + len(B) + 9 + 33, "chars": 209, "bom_removed": 2, "replaced_chars": 0,
        "documents_split": 7, "dropped_empty": 1, "dropped_short": 1, "dropped_duplicate": 1,
        "documents_out": 4, "chars_out": 130,
    }
    assert list(stats["total"]) == list(COUNTERS)
    assert sorted(p.name for p in out.iterdir()) == [DOCUMENTS, STATS]


def test_dedup_off_keeps_duplicates(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": A, "b": B})
    stats = preprocess(PreprocessConfig(min_chars=10, dedup=False), raw, tmp_path / "clean")
    assert stats["total"]["dropped_duplicate"] == 0
    assert [d["id"] for d in read_docs(tmp_path / "clean")] == ["a/0", "a/1", "b/0", "b/1"]


def test_file_split_keeps_each_file_whole(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": A, "b": B})
    stats = preprocess(PreprocessConfig(split="file", min_chars=0), raw, tmp_path / "clean")
    assert read_docs(tmp_path / "clean") == [
        {"id": "a/0", "source": "a",
         "text": "First paragraph has enough chars.\n\nshort\n\nCaf\u00e9 au lait is served here.\nSecond line"},
        {"id": "b/0", "source": "b",
         "text": "Caf\u00e9 au lait is served here.\nSecond line\n\nA unique paragraph in b."},
    ]
    assert stats["total"]["documents_split"] == 2 and stats["total"]["documents_out"] == 2


@pytest.mark.parametrize(
    ("normalize", "text", "expected"),
    [
        ("NFC", "e\u0301 \ufb01", "\u00e9 \ufb01"),
        ("NFKC", "e\u0301 \ufb01", "\u00e9 fi"),  # the fi ligature is a compatibility character
        ("none", "e\u0301 \ufb01", "e\u0301 \ufb01"),
    ],
)
def test_unicode_normal_forms(normalize, text, expected):
    assert clean_text(text, normalize) == expected


def test_clean_text_is_conservative():
    # Tabs and spaces inside lines stay; trailing ones go; 3+ newlines become one blank line.
    assert clean_text("a\tb  c \t\n\n\n\nd\r\ne\rf ") == "a\tb  c\n\nd\ne\nf"


def test_invalid_utf8_names_file_offset_and_line(tmp_path):
    files = {"good": b"A perfectly fine paragraph of text.\n", "bad": b"hello\nworld \xff bad\n"}
    raw = make_raw(tmp_path / "raw", files)
    out = tmp_path / "clean"
    with pytest.raises(PreprocessError, match=r"bad\.txt: invalid UTF-8 at byte offset 12 \(line 2\)"):
        preprocess(PreprocessConfig(min_chars=1), raw, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_replace_counts_substitutions(tmp_path):
    # \xff and \xfe are two invalid bytes -> two U+FFFD; the U+FFFD already in the file is not counted.
    data = b"Broken \xff\xfe bytes here, and a real \xef\xbf\xbd too.\n"
    raw = make_raw(tmp_path / "raw", {"bad": data})
    stats = preprocess(PreprocessConfig(decode_errors="replace", min_chars=1), raw, tmp_path / "clean")
    assert stats["sources"]["bad"]["replaced_chars"] == 2
    assert stats["total"]["replaced_chars"] == 2
    (doc,) = read_docs(tmp_path / "clean")
    assert doc["text"] == "Broken \ufffd\ufffd bytes here, and a real \ufffd too."


def test_empty_corpus_is_an_error_and_leaves_previous_output(tmp_path):
    raw = make_raw(tmp_path / "raw", {"blank": b" \r\n\t\n\n", "tiny": b"hi\n\nyo\n"})
    out = tmp_path / "clean"
    out.mkdir()
    (out / "old.jsonl").write_text("previous run\n")
    with pytest.raises(PreprocessError) as exc:
        preprocess(PreprocessConfig(min_chars=10), raw, out)
    msg = str(exc.value)
    assert "no documents left" in msg and "'blank'" in msg and "'tiny'" in msg
    assert "1 empty" in msg and "2 shorter than min_chars=10" in msg
    assert [p.name for p in out.iterdir()] == ["old.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "raw"]


def test_missing_manifest(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(PreprocessError, match=r"manifest\.json: no collect manifest"):
        preprocess(PreprocessConfig(), tmp_path / "raw", tmp_path / "clean")
    assert not (tmp_path / "clean").exists()


def test_raw_file_changed_since_collect(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": A})
    (raw / "a.txt").write_bytes(A + b"edited")
    with pytest.raises(PreprocessError, match=r"'a'.*does not match the sha256"):
        preprocess(PreprocessConfig(), raw, tmp_path / "clean")


def test_reads_what_collect_writes(tmp_path):
    (tmp_path / "a.txt").write_bytes(A)
    (tmp_path / "b.txt").write_bytes(B)
    collect(CollectConfig(sources=[{"name": "a", "path": "a.txt"}, {"name": "b", "path": "b.txt"}]),
            tmp_path / "raw", base_dir=tmp_path)
    stats = preprocess(PreprocessConfig(min_chars=10), tmp_path / "raw", tmp_path / "clean")
    assert stats["total"]["documents_out"] == 3
