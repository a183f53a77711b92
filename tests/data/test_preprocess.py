"""preprocess(): the whole chain on collect-stage folders, and the counts reported for every step."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmcore.config import CollectConfig, PreprocessConfig, load_params
from lmcore.data.collect import collect
from lmcore.data.filters import GutenbergReport, strip_gutenberg
from lmcore.data.formats import detect
from lmcore.data.preprocess import (
    COUNTERS,
    FILTERS_PLOT,
    STEPS,
    PreprocessError,
    clean_lines,
    clean_text,
    flat_metrics,
    preprocess,
)
from lmcore.io import read_json, write_json
from lmcore.paths import DOCUMENTS, MANIFEST, STATS
from tests.conftest import MICRO, ROOT, SHARED

CORPUS = SHARED / "data" / "corpus"
ALICE = CORPUS / "gutenberg" / "pg11_alices_adventures_in_wonderland.txt"
# Only the steps under test: no Gopher, repetition or near-dedup rules.
PLAIN = dict(gopher={"enabled": False}, repetition={"enabled": False}, near_dedup={"enabled": False})
CHAIN_STEPS = ("pii", "length", "gopher", "repetition", "dedup", "near_dedup")  # after the split


def make_raw(raw: Path, sources: dict[str, bytes | dict[str, bytes]], text_field: str = "text") -> Path:
    """A collect-stage folder with a manifest in collect's format.

    {name: bytes} is one file <name>.txt; {name: {relpath: bytes}} several, format and compression from suffixes.
    """
    raw.mkdir(parents=True)
    entries = []
    for name, files in sources.items():
        if isinstance(files, bytes):
            files = {f"{name}.txt": files}
        listed = []
        for rel, data in files.items():
            (raw / rel).parent.mkdir(parents=True, exist_ok=True)
            (raw / rel).write_bytes(data)
            found = detect(rel)
            listed.append({"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                           "format": found.format, "compression": found.compression})
        entries.append({"name": name, "origin": "local", "source": name, "license": "test", "format": None,
                        "text_field": text_field, "bytes": sum(f["bytes"] for f in listed), "files": listed})
    write_json(raw / MANIFEST, {"sources": entries})
    return raw


def read_docs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / DOCUMENTS).read_text(encoding="utf-8").splitlines()]


def utf8(*texts: str) -> int:
    return sum(len(t.encode()) for t in texts)


def assert_counts_add_up(stats: dict, out: Path) -> None:
    """Documents and bytes in = out + removed; sources add up to the total; the file holds what is counted."""
    for counts in [*stats["sources"].values(), stats["total"]]:
        steps = counts["steps"]
        assert counts["documents_split"] == counts["documents_out"] + sum(steps[s]["documents_removed"] for s in CHAIN_STEPS)
        assert counts["bytes_split"] == counts["bytes_out"] + sum(steps[s]["bytes_removed"] for s in CHAIN_STEPS)
        assert steps["read"]["documents_removed"] == counts["bad_records"] + counts["skipped_non_utf8"]
        for step in ("length", "gopher", "repetition"):
            assert sum(steps[step]["reasons"].values()) == steps[step]["documents_removed"]
    for key in COUNTERS:
        assert stats["total"][key] == sum(c[key] for c in stats["sources"].values())
    docs = read_docs(out)
    assert len(docs) == stats["total"]["documents_out"]
    assert utf8(*(d["text"] for d in docs)) == stats["total"]["bytes_out"]
    for name, counts in stats["sources"].items():
        assert [d["id"] for d in docs if d["source"] == name] == [f"{name}/{i}" for i in range(counts["documents_out"])]
    assert stats["metrics"] == flat_metrics(stats["total"])


A = ("\ufeffFirst paragraph has enough chars.\r\n\r\n\r\nshort\r\n\r\n"
     "Cafe\u0301 au lait is served here.   \r\nSecond line\t\r\n").encode()
B = "\n\nCaf\u00e9 au lait is served here.\nSecond line\n\nA unique paragraph in b.\n\n\n\n".encode()
C = b"Old Mac line one\rOld Mac line two"
E = "\ufeff\r\n  \r\n".encode()  # nothing but a BOM and blank lines


def test_clean_split_filter_dedup_with_exact_stats(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": A, "b": B, "e": E, "c": C})
    out = tmp_path / "clean"
    cfg = PreprocessConfig(min_chars=10, **PLAIN)
    stats = preprocess(cfg, raw, out)

    cafe = "Caf\u00e9 au lait is served here.\nSecond line"
    assert read_docs(out) == [
        {"id": "a/0", "source": "a", "text": "First paragraph has enough chars."},
        # BOM gone, CRLF -> LF, e + combining acute -> U+00E9 (NFC), trailing spaces and tab stripped
        {"id": "a/1", "source": "a", "text": cafe},
        # b's copy of that paragraph is a duplicate once a's is normalised
        {"id": "b/0", "source": "b", "text": "A unique paragraph in b."},
        {"id": "c/0", "source": "c", "text": "Old Mac line one\nOld Mac line two"},
    ]
    assert stats == read_json(out / STATS)
    assert stats["config"] == cfg.model_dump(mode="json")
    a, b, e, c = (stats["sources"][k] for k in "abec")
    assert {k: a[k] for k in COUNTERS} == {
        "files": 1, "empty_files": 0, "bytes_in": len(A), "records": 0, "bad_records": 0, "replaced_chars": 0,
        "skipped_non_utf8": 0, "documents_split": 3, "bytes_split": utf8("First paragraph has enough chars.", "short", cafe),
        "documents_out": 2, "bytes_out": utf8("First paragraph has enough chars.", cafe)}
    assert a["steps"]["length"] == {"documents_removed": 1, "bytes_removed": 5,
                                    "reasons": {"empty": 0, "min_chars": 1, "max_chars": 0, "max_line_chars": 0}}
    # leading and trailing blank lines are not documents
    assert (b["documents_split"], b["documents_out"]) == (2, 1)
    assert b["steps"]["dedup"] == {"documents_removed": 1, "bytes_removed": utf8(cafe)}
    assert {k: e[k] for k in ("files", "empty_files", "bytes_in", "documents_split", "documents_out")} == {
        "files": 1, "empty_files": 1, "bytes_in": 9, "documents_split": 0, "documents_out": 0}
    assert (c["bytes_in"], c["documents_out"], c["bytes_out"]) == (33, 1, 33)
    total = stats["total"]
    assert (total["files"], total["empty_files"], total["documents_split"], total["documents_out"]) == (4, 1, 6, 4)
    assert list(total)[: len(COUNTERS)] == list(COUNTERS) and list(total["steps"]) == list(STEPS)
    assert stats["metrics"]["dedup.documents_removed"] == 1 and stats["metrics"]["length.reasons.min_chars"] == 1
    assert_counts_add_up(stats, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([DOCUMENTS, STATS, FILTERS_PLOT])
    assert (out / FILTERS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dedup_off_keeps_duplicates(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": A, "b": B})
    stats = preprocess(PreprocessConfig(min_chars=10, dedup=False, **PLAIN), raw, tmp_path / "clean")
    assert stats["total"]["steps"]["dedup"]["documents_removed"] == 0
    assert [d["id"] for d in read_docs(tmp_path / "clean")] == ["a/0", "a/1", "b/0", "b/1"]


def test_file_split_keeps_each_file_whole(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": A, "b": B})
    stats = preprocess(PreprocessConfig(split="file", min_chars=0, **PLAIN), raw, tmp_path / "clean")
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
    assert clean_text("\ufeffA b \n\n\nC", whitespace=False, lowercase=True) == "a b \n\n\nc"
    assert list(clean_lines(["X ", "", "  ", "", "Y"])) == ["X", "", "Y"]


def test_every_format_and_compression_in_one_source(tmp_path):
    body = lambda i: f"Record {i} of the mixed source has some words."  # noqa: E731
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": [body(7), body(8)]}), parquet)
    raw = make_raw(tmp_path / "raw", {"mixed": {
        "mixed/a.jsonl.gz": gzip.compress(json.dumps({"body": body(0)}).encode() + b"\n"),
        "mixed/b.csv": f'id,body\n1,"{body(1)}"\n2,"{body(2)}"\n'.encode(),
        "mixed/c.json": json.dumps({"rows": [{"body": body(3)}]}).encode(),
        "mixed/d.txt.zst": zstandard.ZstdCompressor().compress(f"{body(4)}\n\n{body(5)}\n".encode()),
        "mixed/e.md": f"# {body(6)}\n".encode(),
        "mixed/f.parquet": parquet.read_bytes(),
    }}, text_field="body")
    stats = preprocess(PreprocessConfig(**PLAIN), raw, tmp_path / "clean")
    docs = read_docs(tmp_path / "clean")
    assert [d["text"] for d in docs] == [body(i) for i in range(6)] + [f"# {body(6)}", body(7), body(8)]
    assert [d["id"] for d in docs] == [f"mixed/{i}" for i in range(9)]
    assert stats["total"]["files"] == 6 and stats["total"]["records"] == 6
    assert_counts_add_up(stats, tmp_path / "clean")


def test_records_are_cleaned_like_text(tmp_path):
    records = [{"text": "  Cafe\u0301 AU LAIT  \r\nline two\t\r\n\r\n\r\n\r\nend "}, {"text": "   "}]
    raw = make_raw(tmp_path / "raw", {"r": {"r.jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in records)}})
    stats = preprocess(PreprocessConfig(min_chars=1, lowercase=True, **PLAIN), raw, tmp_path / "clean")
    assert [d["text"] for d in read_docs(tmp_path / "clean")] == ["caf\u00e9 au lait\nline two\n\nend"]
    assert stats["total"]["steps"]["length"]["reasons"]["empty"] == 1


def test_raw_file_changed_since_collect(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": {"a/part.txt.gz": gzip.compress(A)}})
    (raw / "a/part.txt.gz").write_bytes(gzip.compress(A + b"edited"))
    out = tmp_path / "clean"
    out.mkdir()
    (out / "old.jsonl").write_text("previous run\n")
    with pytest.raises(PreprocessError, match=r"raw/a/part\.txt\.gz: does not match the sha256 .*re-run collect"):
        preprocess(PreprocessConfig(), raw, out)
    assert [p.name for p in out.iterdir()] == ["old.jsonl"]


def test_missing_file_and_missing_manifest(tmp_path):
    raw = make_raw(tmp_path / "raw", {"a": A})
    (raw / "a.txt").unlink()
    with pytest.raises(PreprocessError, match=r"source 'a': raw/a\.txt is listed in .*manifest\.json but missing"):
        preprocess(PreprocessConfig(), raw, tmp_path / "clean")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessError, match=r"manifest\.json: no collect manifest"):
        preprocess(PreprocessConfig(), tmp_path / "empty", tmp_path / "clean")
    assert not (tmp_path / "clean").exists()


def test_invalid_utf8_names_file_offset_and_line(tmp_path):
    files = {"good": b"A perfectly fine paragraph of text.\n", "bad": b"hello\nworld \xff bad\n"}
    raw = make_raw(tmp_path / "raw", files)
    with pytest.raises(PreprocessError, match=r"raw/bad\.txt: invalid UTF-8 at byte offset 12 \(line 2\)"):
        preprocess(PreprocessConfig(min_chars=1), raw, tmp_path / "clean")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_replace_and_skip_are_counted(tmp_path):
    data = b"Broken \xff\xfe bytes here, and a real \xef\xbf\xbd too.\n\nA clean paragraph stays.\n"
    raw = make_raw(tmp_path / "raw", {"bad": data})
    stats = preprocess(PreprocessConfig(decode_errors="replace", min_chars=1, **PLAIN), raw, tmp_path / "clean")
    assert stats["total"]["replaced_chars"] == 2  # the U+FFFD already in the file is not counted
    assert read_docs(tmp_path / "clean")[0]["text"] == "Broken \ufffd\ufffd bytes here, and a real \ufffd too."

    stats = preprocess(PreprocessConfig(decode_errors="skip", min_chars=1, **PLAIN), raw, tmp_path / "clean")
    assert [d["text"] for d in read_docs(tmp_path / "clean")] == ["A clean paragraph stays."]
    total = stats["total"]
    assert (total["skipped_non_utf8"], total["replaced_chars"], total["documents_split"]) == (1, 0, 1)
    assert total["steps"]["read"] == {"documents_removed": 1, "bytes_removed": len(data.split(b"\n\n")[0])}
    assert_counts_add_up(stats, tmp_path / "clean")


def jsonl(n_good: int, bad_lines: dict[int, bytes]) -> bytes:
    lines = [b'{"text": "good record %d"}' % i for i in range(n_good)]
    for at, line in sorted(bad_lines.items()):
        lines.insert(at - 1, line)
    return b"\n".join(lines) + b"\n"


def test_malformed_records_skipped_counted_or_failing(tmp_path):
    data = jsonl(98, {3: b'{"text": "cut', 50: b'{"title": "no text"}'})
    raw = make_raw(tmp_path / "raw", {"web": {"web/part-0.jsonl": data}})
    with pytest.raises(PreprocessError, match=r"raw/web/part-0\.jsonl:3: malformed JSON"):
        preprocess(PreprocessConfig(min_chars=1, **PLAIN), raw, tmp_path / "clean")
    stats = preprocess(PreprocessConfig(min_chars=1, on_bad="skip", max_bad_fraction=0.02, **PLAIN), raw, tmp_path / "clean")
    total = stats["total"]
    assert (total["records"], total["bad_records"], total["documents_out"]) == (100, 2, 98)
    assert total["steps"]["read"]["documents_removed"] == 2
    assert_counts_add_up(stats, tmp_path / "clean")
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessConfig(min_chars=1, on_bad="skip", max_bad_fraction=0.01), raw, tmp_path / "clean")
    assert "raw/web/part-0.jsonl: 2 of 100 records are bad (2.00% > preprocess.max_bad_fraction=0.01)" in str(err.value)
    assert "raw/web/part-0.jsonl:3: malformed JSON" in str(err.value)


def test_empty_files_are_counted_and_an_empty_corpus_lists_the_counts(tmp_path):
    raw = make_raw(tmp_path / "raw", {"blank": b" \r\n\t\n\n", "tiny": b"hi\n\nyo\n", "none": {"none/e.jsonl": b""}})
    out = tmp_path / "clean"
    with pytest.raises(PreprocessError) as exc:
        preprocess(PreprocessConfig(min_chars=10), raw, out)
    msg = str(exc.value)
    assert "no documents left from sources ['blank', 'tiny', 'none']" in msg
    assert "3 files (2 empty)" in msg and "2 documents split" in msg and "length 2 (min_chars 2)" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]

    raw2 = make_raw(tmp_path / "raw2", {"blank": b"", "text": b"Enough text in this one paragraph."})
    stats = preprocess(PreprocessConfig(**PLAIN), raw2, out)
    assert stats["sources"]["blank"]["empty_files"] == 1 and stats["total"]["documents_out"] == 1


def test_over_long_lines_are_dropped(tmp_path):
    minified = "var a=1;" * 2000  # 16,000 characters on one line
    normal = "A normal paragraph of text, long enough to stay."
    raw = make_raw(tmp_path / "raw", {"code": f"{normal}\n\n{minified}\n".encode()})
    stats = preprocess(PreprocessConfig(max_line_chars=10_000, **PLAIN), raw, tmp_path / "clean")
    assert [d["text"] for d in read_docs(tmp_path / "clean")] == [normal]
    assert stats["total"]["steps"]["length"]["reasons"]["max_line_chars"] == 1
    assert stats["total"]["steps"]["length"]["bytes_removed"] == len(minified)


def test_gutenberg_book_through_the_stage(tmp_path):
    data = ALICE.read_bytes()
    raw = make_raw(tmp_path / "raw", {"alice": {"alice/pg11.txt": data}})
    stats = preprocess(PreprocessConfig(split="file", **PLAIN), raw, tmp_path / "clean")
    (doc,) = read_docs(tmp_path / "clean")
    assert doc["text"].startswith("ALICE’S ADVENTURES IN WONDERLAND\n\nLewis Carroll")
    assert doc["text"].endswith("THE END") and "Gutenberg" not in doc["text"]
    # The stage removes what strip_gutenberg removes from the cleaned lines.
    lines = list(clean_lines(data.decode().replace("\r\n", "\n").removesuffix("\n").split("\n")))
    report = GutenbergReport()
    list(strip_gutenberg(lines, report))
    assert stats["total"]["steps"]["gutenberg"] == {"documents_removed": 0, "bytes_removed": report.bytes_removed,
                                                   "files_stripped": 1}
    kept = preprocess(PreprocessConfig(split="file", strip_gutenberg=False, **PLAIN), raw, tmp_path / "clean")
    assert "Project Gutenberg" in read_docs(tmp_path / "clean")[0]["text"]
    assert kept["total"]["steps"]["gutenberg"]["files_stripped"] == 0


def test_pii_is_replaced_and_counted(tmp_path):
    text = b"Mail me at jo@example.com or call 555-123-4567.\n\nThe year 1984 had 12,345 days? No.\n"
    raw = make_raw(tmp_path / "raw", {"p": text})
    stats = preprocess(PreprocessConfig(min_chars=1, **PLAIN), raw, tmp_path / "clean")
    assert [d["text"] for d in read_docs(tmp_path / "clean")] == [
        "Mail me at <EMAIL> or call <PHONE>.", "The year 1984 had 12,345 days? No."]
    pii = stats["total"]["steps"]["pii"]
    assert pii["matches"] == {"email": 1, "phone": 1, "ip": 0}
    assert pii["bytes_removed"] == len("jo@example.com555-123-4567") - len("<EMAIL><PHONE>")
    assert_counts_add_up(stats, tmp_path / "clean")


def test_counts_add_up_on_real_data_with_every_step(tmp_path):
    verdict = (CORPUS / "the-verdict.txt").read_bytes()
    records = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in [
        "Write to someone@example.org about the plan, and the date of the meeting with them.",
        "short",
        "the the the the the the the the the the the the the the the the the the",
    ])
    raw = make_raw(tmp_path / "raw", {
        "the-verdict": verdict,
        "verdict-again": verdict.replace(b"Gisburn", b"Gisborne"),  # near and exact duplicates of the first
        "alice": {"alice/pg11.txt.gz": gzip.compress(ALICE.read_bytes())},
        "records": {"records/r.jsonl": records + b"not json\n"},
    })
    cfg = load_params(MICRO, overrides=["preprocess.on_bad=skip", "preprocess.max_bad_fraction=0.5"]).preprocess
    stats = preprocess(cfg, raw, tmp_path / "clean")
    assert_counts_add_up(stats, tmp_path / "clean")
    total = stats["total"]["steps"]
    for step in ("read", "pii", "length", "gopher", "repetition", "dedup", "near_dedup"):
        assert total[step]["documents_removed"] + total[step].get("matches", {}).get("email", 0) > 0, step
    assert total["gutenberg"]["files_stripped"] == 1


def test_shipped_params_keep_enough_documents(tmp_path):
    """The default pipeline (tinyshakespeare + the-verdict) and the micro profile (the-verdict) keep most text."""
    both = make_raw(tmp_path / "raw", {"tinyshakespeare": (CORPUS / "tinyshakespeare.txt").read_bytes(),
                                       "the-verdict": (CORPUS / "the-verdict.txt").read_bytes()})
    stats = preprocess(load_params(ROOT / "params.yaml").preprocess, both, tmp_path / "clean")
    total = stats["total"]
    assert total["documents_out"] >= 5000 and total["bytes_out"] >= 0.9 * total["bytes_split"]
    verdict = make_raw(tmp_path / "raw-micro", {"the-verdict": (CORPUS / "the-verdict.txt").read_bytes()})
    stats = preprocess(load_params(MICRO).preprocess, verdict, tmp_path / "clean-micro")
    # tokenize.val_fraction 0.2 of the micro profile needs documents on both sides of the split.
    assert stats["total"]["documents_out"] >= 60


def test_one_file_manifest_entries_still_read(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_bytes(A)
    write_json(raw / MANIFEST, {"sources": [{"name": "a", "origin": "local", "source": "a.txt", "file": "a.txt",
                                             "sha256": hashlib.sha256(A).hexdigest(), "bytes": len(A)}]})
    stats = preprocess(PreprocessConfig(min_chars=10, **PLAIN), raw, tmp_path / "clean")
    assert stats["total"]["documents_out"] == 2


def test_reads_what_collect_writes(tmp_path):
    (tmp_path / "a.txt").write_bytes(A)
    (tmp_path / "b.txt").write_bytes(B)
    collect(CollectConfig(sources=[{"name": "a", "path": "a.txt"}, {"name": "b", "path": "b.txt"}]),
            tmp_path / "raw", base_dir=tmp_path)
    stats = preprocess(PreprocessConfig(min_chars=10, **PLAIN), tmp_path / "raw", tmp_path / "clean")
    assert stats["total"]["documents_out"] == 3


def test_shipped_params_files_validate():
    for path in (ROOT / "params.yaml", MICRO):
        cfg = load_params(path).preprocess
        assert cfg.gopher.min_words == 5 and cfg.gopher.min_stop_words == 1, path


def test_same_input_gives_byte_identical_output(tmp_path):
    raw = make_raw(tmp_path / "raw", {"the-verdict": (CORPUS / "the-verdict.txt").read_bytes()})
    cfg = load_params(MICRO).preprocess
    preprocess(cfg, raw, tmp_path / "one")
    preprocess(cfg, raw, tmp_path / "two")
    for name in (DOCUMENTS, STATS, FILTERS_PLOT):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
