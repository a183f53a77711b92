"""collect(): local copies, the offline mirror, and real downloads from a local HTTP server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import re
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest

from lmcore.config import CollectConfig
from lmcore.data.collect import CollectError, SourceUnavailable, collect
from lmcore.errors import is_input_error, is_transient
from lmcore.io import read_json
from lmcore.paths import MANIFEST

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
VERDICT_SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
VERDICT_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"

TEXT = b"It had always been a beautiful thing.\n"
TEXT_SHA = hashlib.sha256(TEXT).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cfg(*sources: dict, retries: int = 0, timeout_s: float = 5.0) -> CollectConfig:
    return CollectConfig(sources=list(sources), retries=retries, timeout_s=timeout_s)


def leftovers(parent: Path) -> list[str]:
    """Everything in `parent` that a failed collect could have left (temp folders are hidden).

    The download cache (.cache/, where partial downloads wait to be resumed) is checked apart: see `parts`.
    """
    return sorted(p.name for p in parent.iterdir() if p.name != ".cache")


def parts(parent: Path) -> dict[str, int]:
    """The partial downloads in the default cache beside `parent`/raw: file name -> bytes."""
    cache = parent / ".cache" / "downloads"
    return {p.name: p.stat().st_size for p in sorted(cache.glob("*.part"))} if cache.is_dir() else {}


def single(name: str, origin: str, source: str, file: str, data: bytes, license: str = "unknown",
           fmt: str = "txt", compression: str | None = None, **extra) -> dict:
    """The manifest entry of a single collected file."""
    return {"name": name, "origin": origin, "source": source, **extra, "license": license, "format": None,
            "text_field": "text", "file": file, "sha256": sha(data), "bytes": len(data),
            "files": [{"file": file, "sha256": sha(data), "bytes": len(data), "format": fmt,
                       "compression": compression}],
            "skipped_files": []}


class Server:
    """A real HTTP server on 127.0.0.1 serving `files`.

    It fails the first `fail_first` requests with `status`, honours `Range: bytes=N-` (206 with a
    Content-Range; 416 past the end) unless `ranges=False`, and on the requests numbered in `cut`
    (1-based) sends only that many body bytes before dropping the connection. `requests` records each
    path, `ranges` each Range header (None when absent) and `served` the body bytes sent.
    """

    def __init__(
        self,
        files: dict[str, bytes],
        fail_first: int = 0,
        status: int = 503,
        ranges: bool = True,
        cut: dict[int, int] | None = None,
    ):
        self.files = files
        self.fail_first = fail_first
        self.status = status
        self.honour_ranges = ranges
        self.cut = cut or {}
        self.requests: list[str] = []
        self.ranges: list[str | None] = []
        self.served = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                server.ranges.append(self.headers.get("Range"))
                number = len(server.requests)
                if number <= server.fail_first:
                    self.send_error(server.status)
                    return
                body = server.files.get(urllib.parse.urlsplit(self.path).path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.honour_ranges:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if number in server.cut:  # a dropped connection mid-body
                    payload = payload[: server.cut[number]]
                    self.close_connection = True
                self.wfile.write(payload)
                self.wfile.flush()
                server.served += len(payload)
                if number in server.cut:
                    self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


# local paths


def test_local_copy_and_manifest(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "verdict.txt").write_bytes(TEXT)
    (tmp_path / "src" / "notes").write_bytes(b"no suffix\n")
    out = tmp_path / "raw"
    manifest = collect(
        cfg({"name": "verdict", "path": "src/verdict.txt", "sha256": TEXT_SHA, "license": "public domain"},
            {"name": "notes", "path": str(tmp_path / "src" / "notes")}),
        out,
        base_dir=tmp_path,
    )
    assert manifest == read_json(out / MANIFEST)
    assert manifest["sources"] == [
        single("verdict", "local", "src/verdict.txt", "verdict.txt", TEXT, license="public domain"),
        single("notes", "local", str(tmp_path / "src" / "notes"), "notes.txt", b"no suffix\n"),
    ]
    assert (out / "verdict.txt").read_bytes() == TEXT
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "notes.txt", "verdict.txt"]
    assert leftovers(tmp_path) == ["raw", "src"]


def test_local_relative_path_defaults_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_bytes(TEXT)
    monkeypatch.chdir(tmp_path)
    manifest = collect(cfg({"name": "a", "path": "a.md"}), tmp_path / "raw")
    assert manifest["sources"][0]["file"] == "a.md"


def test_local_sha256_mismatch_leaves_previous_output(tmp_path):
    (tmp_path / "a.txt").write_bytes(TEXT)
    out = tmp_path / "raw"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    wrong = "0" * 64
    with pytest.raises(CollectError) as exc:
        collect(cfg({"name": "a", "path": "a.txt", "sha256": wrong}), out, base_dir=tmp_path)
    msg = str(exc.value)
    assert "'a'" in msg and wrong in msg and TEXT_SHA in msg
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert leftovers(tmp_path) == ["a.txt", "raw"]


def test_missing_local_source_names_source_and_path(tmp_path):
    (tmp_path / "ok.txt").write_bytes(TEXT)
    out = tmp_path / "raw"
    with pytest.raises(CollectError, match=r"source 'ghost'.*not found.*nowhere\.txt"):
        collect(cfg({"name": "ok", "path": "ok.txt"}, {"name": "ghost", "path": "nowhere.txt"}), out, base_dir=tmp_path)
    assert leftovers(tmp_path) == ["ok.txt"]


# the offline mirror


def make_mirror(root: Path, files: dict[str, bytes], sums: dict[str, str] | None = None) -> Path:
    """Write `files` under `root`; `sums` maps relative path -> listed hash (None: no SHA256SUMS)."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    if sums is not None:
        (root / "SHA256SUMS").write_text("".join(f"{h}  {rel}\n" for rel, h in sums.items()))
    return root


@pytest.mark.parametrize("with_sums", [True, False])
def test_mirror_hit_by_checksum_skips_download(tmp_path, with_sums):
    mirror = make_mirror(
        tmp_path / "mirror",
        {"corpus/verdict.txt": TEXT, "other.txt": b"something else\n"},
        {"corpus/verdict.txt": TEXT_SHA, "other.txt": sha(b"something else\n")} if with_sums else None,
    )
    out = tmp_path / "raw"
    with Server({"/verdict.txt": TEXT}) as srv:
        manifest = collect(
            cfg({"name": "verdict", "url": srv.url("/verdict.txt"), "sha256": TEXT_SHA}), out, mirror=mirror
        )
        assert srv.requests == []
    (entry,) = manifest["sources"]
    assert entry["origin"] == "mirror"
    assert entry["mirror_path"] == str((mirror / "corpus" / "verdict.txt").resolve())
    assert entry["file"] == "verdict.txt" and entry["sha256"] == TEXT_SHA and entry["bytes"] == len(TEXT)
    assert (out / "verdict.txt").read_bytes() == TEXT


def test_mirror_entry_is_rehashed_before_use(tmp_path):
    # SHA256SUMS claims the file has TEXT's hash, but its bytes differ: it must not be used.
    mirror = make_mirror(tmp_path / "mirror", {"verdict.txt": b"tampered\n"}, {"verdict.txt": TEXT_SHA})
    with Server({"/v.txt": TEXT}) as srv:
        manifest = collect(cfg({"name": "v", "url": srv.url("/v.txt"), "sha256": TEXT_SHA}), tmp_path / "raw",
                           mirror=mirror)
        assert srv.requests == ["/v.txt"]
    assert manifest["sources"][0]["origin"] == "download"
    assert "mirror_path" not in manifest["sources"][0]
    assert (tmp_path / "raw" / "v.txt").read_bytes() == TEXT


def test_a_source_pinned_by_sha256_alone_comes_only_from_the_mirror(tmp_path):
    archive = b"\x1f\x8b pretend tarball"
    mirror = make_mirror(tmp_path / "mirror", {"bench/mmlu_data.tar.gz": archive})
    manifest = collect(cfg({"name": "mmlu", "sha256": sha(archive)}), tmp_path / "raw", mirror=mirror)
    (entry,) = manifest["sources"]
    assert entry["origin"] == "mirror" and entry["file"] == "mmlu.tar.gz" and entry["source"] == f"sha256:{sha(archive)}"
    assert (tmp_path / "raw" / "mmlu.tar.gz").read_bytes() == archive
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["manifest.json", "mmlu.tar.gz"]
    with pytest.raises(CollectError, match=r"source 'other' has no url or path and sha256 [0-9a-f]{64} is not in the mirror"):
        collect(cfg({"name": "other", "sha256": sha(b"absent")}), tmp_path / "raw2", mirror=mirror)
    with pytest.raises(CollectError, match="not in any mirror"):
        collect(cfg({"name": "other", "sha256": sha(archive)}), tmp_path / "raw3", mirror=None)
    assert not (tmp_path / "raw2").exists() and not (tmp_path / "raw3").exists()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (the offline mirror) is not beside the checkout")
def test_shared_mirror_serves_the_verdict(tmp_path):
    # retries=0 and a short timeout: if the mirror lookup failed this would try the network and fail.
    manifest = collect(
        cfg({"name": "the-verdict", "url": VERDICT_URL, "sha256": VERDICT_SHA}, timeout_s=2),
        tmp_path / "raw",
        mirror=SHARED_DATA,
    )
    (entry,) = manifest["sources"]
    assert entry["origin"] == "mirror"
    assert entry["mirror_path"] == str((SHARED_DATA / "corpus" / "the-verdict.txt").resolve())
    assert entry["bytes"] == 20479
    assert entry["file"] == "the-verdict.txt"
    assert hashlib.sha256((tmp_path / "raw" / "the-verdict.txt").read_bytes()).hexdigest() == VERDICT_SHA


# downloads


def test_download_verifies_checksum(tmp_path):
    body = TEXT * 5000  # several read chunks
    mirror = make_mirror(tmp_path / "mirror", {"unrelated.txt": b"x"}, {"unrelated.txt": sha(b"x")})
    with Server({"/data/book.md": body}) as srv:
        url = srv.url("/data/book.md?raw=1")  # the suffix comes from the URL's path, not its query
        manifest = collect(
            cfg({"name": "book", "url": url, "sha256": sha(body), "license": "CC0"}), tmp_path / "raw", mirror=mirror
        )
        assert srv.requests == ["/data/book.md?raw=1"]
    assert manifest["sources"] == [single("book", "download", url, "book.md", body, license="CC0", fmt="md")]
    assert (tmp_path / "raw" / "book.md").read_bytes() == body
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["book.md", MANIFEST]


def test_download_retries_transient_errors(tmp_path):
    with Server({"/t.txt": TEXT}, fail_first=2) as srv:
        manifest = collect(
            cfg({"name": "t", "url": srv.url("/t.txt"), "sha256": TEXT_SHA}, retries=2), tmp_path / "raw",
            backoff_s=0.01,
        )
        assert len(srv.requests) == 3
    assert manifest["sources"][0]["origin"] == "download"
    assert (tmp_path / "raw" / "t.txt").read_bytes() == TEXT


def test_download_gives_up_after_retries(tmp_path):
    with Server({"/t.txt": TEXT}, fail_first=2) as srv:
        with pytest.raises(SourceUnavailable, match=r"'t'.*after 2 attempt.*503") as exc:
            collect(cfg({"name": "t", "url": srv.url("/t.txt"), "sha256": TEXT_SHA}, retries=1), tmp_path / "raw",
                    backoff_s=0.01)
        assert len(srv.requests) == 2
    assert is_transient(exc.value) and not is_input_error(exc.value)
    assert leftovers(tmp_path) == []


def test_client_error_is_not_retried(tmp_path):
    with Server({}) as srv:
        with pytest.raises(CollectError, match=r"'gone'.*HTTP 404") as exc:
            collect(cfg({"name": "gone", "url": srv.url("/gone.txt"), "sha256": TEXT_SHA}, retries=3),
                    tmp_path / "raw", backoff_s=0.01)
        assert len(srv.requests) == 1
    assert is_input_error(exc.value) and not is_transient(exc.value)
    assert leftovers(tmp_path) == []


def test_download_checksum_mismatch_fails_and_leaves_nothing(tmp_path):
    (tmp_path / "local.txt").write_bytes(TEXT)
    wrong = "f" * 64
    with Server({"/t.txt": TEXT}) as srv:
        with pytest.raises(CollectError) as exc:
            collect(
                cfg({"name": "local", "path": "local.txt"}, {"name": "t", "url": srv.url("/t.txt"), "sha256": wrong},
                    retries=2),
                tmp_path / "raw",
                base_dir=tmp_path,
                backoff_s=0.01,
            )
        assert len(srv.requests) == 1
    msg = str(exc.value)
    assert "'t'" in msg and srv.url("/t.txt") in msg and wrong in msg and TEXT_SHA in msg
    assert leftovers(tmp_path) == ["local.txt"]
    assert parts(tmp_path) == {}  # a part that hashes wrong is not kept to be resumed


def test_connection_errors_are_retried(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused, quickly
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceUnavailable, match=r"'t'.*after 2 attempt"):
        collect(cfg({"name": "t", "url": f"http://127.0.0.1:{port}/t.txt", "sha256": TEXT_SHA}, retries=1),
                tmp_path / "raw", backoff_s=0.01)
    assert leftovers(tmp_path) == []


# folders and globs


def zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def make_tree(root: Path) -> dict[str, bytes]:
    """A corpus folder with nested folders, mixed formats, hidden files and files collect cannot read."""
    files = {
        "a.txt": b"plain text\n",
        "b.md": b"# markdown\n",
        "sub/c.jsonl.gz": gzip.compress(b'{"text": "gzipped"}\n', mtime=0),
        "sub/deep/d.txt.zst": zst(b"zstd text\n"),
        "sub/e.csv": b"text\nrow\n",
        "notes.bin": b"\x00\x01",
        "books.zip": b"PK\x05\x06" + b"\x00" * 18,  # an empty zip
        ".hidden.txt": b"hidden\n",
        ".git/config.txt": b"hidden folder\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def record(file: str, data: bytes, fmt: str, compression: str | None = None) -> dict:
    return {"file": file, "sha256": sha(data), "bytes": len(data), "format": fmt, "compression": compression}


def test_folder_source_keeps_known_formats_and_lists_the_rest(tmp_path):
    files = make_tree(tmp_path / "corpus")
    out = tmp_path / "raw"
    manifest = collect(cfg({"name": "web", "path": "corpus", "license": "CC-BY"}), out, base_dir=tmp_path)
    (entry,) = manifest["sources"]
    kept = ["a.txt", "b.md", "sub/c.jsonl.gz", "sub/deep/d.txt.zst", "sub/e.csv"]
    assert entry == {
        "name": "web", "origin": "local", "source": "corpus", "license": "CC-BY", "format": None, "text_field": "text",
        "bytes": sum(len(files[k]) for k in kept),
        "files": [
            record("web/a.txt", files["a.txt"], "txt"),
            record("web/b.md", files["b.md"], "md"),
            record("web/sub/c.jsonl.gz", files["sub/c.jsonl.gz"], "jsonl", "gzip"),
            record("web/sub/deep/d.txt.zst", files["sub/deep/d.txt.zst"], "txt", "zstd"),
            record("web/sub/e.csv", files["sub/e.csv"], "csv"),
        ],
        "skipped_files": [
            {"path": "books.zip", "reason": "an archive: give it a source of its own with 'extract: true'"},
            {"path": "notes.bin", "reason": "unknown format (.bin); set the source's 'format' to keep it"},
        ],
    }
    assert "file" not in entry and "sha256" not in entry  # only a single file has them at the top level
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted([MANIFEST] + [f"web/{k}" for k in kept])
    for k in kept:
        assert (out / "web" / k).read_bytes() == files[k]


def test_folder_source_with_a_format_keeps_every_regular_file(tmp_path):
    make_tree(tmp_path / "corpus")
    manifest = collect(cfg({"name": "web", "path": "corpus", "format": "txt"}), tmp_path / "raw", base_dir=tmp_path)
    (entry,) = manifest["sources"]
    assert [(f["file"], f["format"], f["compression"]) for f in entry["files"]] == [
        ("web/a.txt", "txt", None), ("web/b.md", "txt", None), ("web/notes.bin", "txt", None),
        ("web/sub/c.jsonl.gz", "txt", "gzip"), ("web/sub/deep/d.txt.zst", "txt", "zstd"), ("web/sub/e.csv", "txt", None),
    ]
    assert [s["path"] for s in entry["skipped_files"]] == ["books.zip"]  # an archive is never read as text


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("corpus/**/*.txt*", {"g/a.txt": "a.txt", "g/sub/deep/d.txt.zst": "sub/deep/d.txt.zst"}),
        ("corpus/sub/[cd]*", {"g/c.jsonl.gz": "sub/c.jsonl.gz"}),  # the folder deep/ matches but is no file
        ("corpus/?.md", {"g/b.md": "b.md"}),
        ("corpus/*", {"g/a.txt": "a.txt", "g/b.md": "b.md"}),  # `*` does not descend; hidden names are not matched
    ],
)
def test_glob_source_is_relative_to_its_non_magic_prefix(tmp_path, pattern, expected):
    files = make_tree(tmp_path / "corpus")
    out = tmp_path / "raw"
    manifest = collect(cfg({"name": "g", "path": pattern}), out, base_dir=tmp_path)
    (entry,) = manifest["sources"]
    assert entry["source"] == pattern
    assert [f["file"] for f in entry["files"]] == sorted(expected)
    for file, rel in expected.items():
        assert (out / file).read_bytes() == files[rel]
        assert next(f for f in entry["files"] if f["file"] == file)["sha256"] == sha(files[rel])


def test_absolute_glob(tmp_path):
    make_tree(tmp_path / "corpus")
    pattern = str(tmp_path / "corpus" / "sub" / "*.csv")
    manifest = collect(cfg({"name": "g", "path": pattern}), tmp_path / "raw")
    assert [f["file"] for f in manifest["sources"][0]["files"]] == ["g/e.csv"]


def test_empty_or_unreadable_matches_fail_naming_source_and_pattern(tmp_path):
    make_tree(tmp_path / "corpus")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "raw"
    with pytest.raises(CollectError, match=r"source 'g': no files found for path 'corpus/\*\.nothing'"):
        collect(cfg({"name": "ok", "path": "corpus"}, {"name": "g", "path": "corpus/*.nothing"}), out, base_dir=tmp_path)
    with pytest.raises(CollectError, match=r"source 'e': no files found for path 'empty'"):
        collect(cfg({"name": "e", "path": "empty"}), out, base_dir=tmp_path)
    with pytest.raises(CollectError, match=r"source 'b': none of the 1 file\(s\) found for path 'corpus/\*\.bin'.*notes\.bin"):
        collect(cfg({"name": "b", "path": "corpus/*.bin"}), out, base_dir=tmp_path)
    assert leftovers(tmp_path) == ["corpus", "empty"]


def test_folder_refuses_sha256_and_extract(tmp_path):
    make_tree(tmp_path / "corpus")
    with pytest.raises(CollectError, match=r"source 'f': 'sha256' pins a single file, but path 'corpus' is a folder"):
        collect(cfg({"name": "f", "path": "corpus", "sha256": TEXT_SHA}), tmp_path / "raw", base_dir=tmp_path)
    with pytest.raises(CollectError, match=r"source 'f': 'extract: true' needs a single archive file.*is a glob"):
        collect(cfg({"name": "f", "path": "corpus/*.zip", "extract": True}), tmp_path / "raw", base_dir=tmp_path)


def test_single_file_keeps_compound_suffixes(tmp_path):
    files = make_tree(tmp_path / "corpus")
    out = tmp_path / "raw"
    manifest = collect(
        cfg({"name": "c", "path": "corpus/sub/c.jsonl.gz"}, {"name": "d", "path": "corpus/sub/deep/d.txt.zst"},
            {"name": "n", "path": "corpus/notes.bin", "format": "csv"}),
        out,
        base_dir=tmp_path,
    )
    c, d, n = manifest["sources"]
    assert c["file"] == "c.jsonl.gz" and c["files"] == [record("c.jsonl.gz", files["sub/c.jsonl.gz"], "jsonl", "gzip")]
    assert d["file"] == "d.txt.zst" and d["files"] == [record("d.txt.zst", files["sub/deep/d.txt.zst"], "txt", "zstd")]
    assert n["file"] == "n.bin" and n["format"] == "csv" and n["files"][0]["format"] == "csv"
    assert (out / "c.jsonl.gz").read_bytes() == files["sub/c.jsonl.gz"]


def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    (tmp_path / "notes[1].md").write_bytes(TEXT)
    (tmp_path / "notes1.md").write_bytes(b"not this one\n")
    manifest = collect(cfg({"name": "n", "path": "notes[1].md"}), tmp_path / "raw", base_dir=tmp_path)
    assert manifest["sources"][0]["file"] == "n.md" and manifest["sources"][0]["sha256"] == TEXT_SHA


def test_two_sources_cannot_claim_one_name(tmp_path):
    (tmp_path / "a.txt").write_bytes(TEXT)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_bytes(TEXT)
    (tmp_path / "m.json").write_bytes(b"{}")
    with pytest.raises(CollectError, match=r"source 'a\.txt': a\.txt is already taken"):
        collect(cfg({"name": "a", "path": "a.txt"}, {"name": "a.txt", "path": "docs"}), tmp_path / "raw",
                base_dir=tmp_path)
    with pytest.raises(CollectError, match=r"source 'manifest': manifest\.json is already taken"):
        collect(cfg({"name": "manifest", "path": "m.json"}), tmp_path / "raw", base_dir=tmp_path)


def test_manifest_is_identical_run_to_run(tmp_path):
    make_tree(tmp_path / "corpus")
    sources = cfg({"name": "web", "path": "corpus"}, {"name": "g", "path": "corpus/**/*.csv"})
    collect(sources, tmp_path / "raw", base_dir=tmp_path)
    first = (tmp_path / "raw" / MANIFEST).read_bytes()
    collect(sources, tmp_path / "raw", base_dir=tmp_path)
    assert (tmp_path / "raw" / MANIFEST).read_bytes() == first
    assert json.loads(first)["sources"][1]["files"][0]["file"] == "g/sub/e.csv"


# resumed downloads

BIG = bytes(range(256)) * 400  # 100 KiB: several read chunks
BIG_SHA = sha(BIG)
CUT = 30_000


def test_cut_download_resumes_with_a_range_request(tmp_path):
    with Server({"/big.txt": BIG}, cut={1: CUT}) as srv:
        manifest = collect(cfg({"name": "big", "url": srv.url("/big.txt"), "sha256": BIG_SHA}, retries=1),
                           tmp_path / "raw", backoff_s=0.01)
        assert srv.ranges == [None, f"bytes={CUT}-"]
        assert srv.served == len(BIG) < len(BIG) + CUT  # the prefix was not sent twice
    assert manifest["sources"][0]["sha256"] == BIG_SHA
    assert (tmp_path / "raw" / "big.txt").read_bytes() == BIG
    assert parts(tmp_path) == {}  # moved into place


def test_server_ignoring_range_restarts_from_zero(tmp_path):
    with Server({"/big.txt": BIG}, cut={1: CUT}, ranges=False) as srv:
        collect(cfg({"name": "big", "url": srv.url("/big.txt"), "sha256": BIG_SHA}, retries=1), tmp_path / "raw",
                backoff_s=0.01)
        assert srv.ranges == [None, f"bytes={CUT}-"]  # asked, but got a 200 with the whole file
        assert srv.served == CUT + len(BIG)
    assert (tmp_path / "raw" / "big.txt").read_bytes() == BIG


def test_failed_run_keeps_its_part_and_the_next_run_resumes_it(tmp_path):
    source = {"name": "big", "sha256": BIG_SHA}
    with Server({"/big.txt": BIG}, cut={1: CUT, 2: 10_000}) as srv:
        source["url"] = srv.url("/big.txt")
        with pytest.raises(SourceUnavailable, match=rf"after 2 attempt.*{CUT + 10_000} bytes kept in .*{BIG_SHA}\.part"):
            collect(cfg(source, retries=1), tmp_path / "raw", backoff_s=0.01)
        assert parts(tmp_path) == {f"{BIG_SHA}.part": CUT + 10_000}
        assert leftovers(tmp_path) == []
        collect(cfg(source), tmp_path / "raw")  # the next run
        assert srv.ranges == [None, f"bytes={CUT}-", f"bytes={CUT + 10_000}-"]
        assert srv.served == len(BIG)
    assert (tmp_path / "raw" / "big.txt").read_bytes() == BIG
    assert parts(tmp_path) == {}


def test_killed_run_leftover_part_is_resumed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{BIG_SHA}.part").write_bytes(BIG[:CUT])  # what a killed run leaves
    with Server({"/big.txt": BIG}) as srv:
        collect(cfg({"name": "big", "url": srv.url("/big.txt"), "sha256": BIG_SHA}), tmp_path / "raw",
                cache_dir=cache)
        assert srv.ranges == [f"bytes={CUT}-"]
        assert srv.served == len(BIG) - CUT
    assert (tmp_path / "raw" / "big.txt").read_bytes() == BIG
    assert list(cache.iterdir()) == []


def test_complete_leftover_part_needs_no_request(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{BIG_SHA}.part").write_bytes(BIG)  # killed after the last byte, before the move
    with Server({"/big.txt": BIG}) as srv:
        collect(cfg({"name": "big", "url": srv.url("/big.txt"), "sha256": BIG_SHA}), tmp_path / "raw",
                cache_dir=cache)
        assert srv.requests == []
    assert (tmp_path / "raw" / "big.txt").read_bytes() == BIG


def test_part_longer_than_the_file_restarts_after_416(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{BIG_SHA}.part").write_bytes(b"x" * (len(BIG) + 5))
    with Server({"/big.txt": BIG}) as srv:
        collect(cfg({"name": "big", "url": srv.url("/big.txt"), "sha256": BIG_SHA}), tmp_path / "raw",
                cache_dir=cache)
        assert srv.ranges == [f"bytes={len(BIG) + 5}-", None]
    assert (tmp_path / "raw" / "big.txt").read_bytes() == BIG


def test_corrupt_part_fails_the_checksum_and_is_removed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{BIG_SHA}.part").write_bytes(b"\xff" * CUT)  # not BIG's prefix
    with Server({"/big.txt": BIG}) as srv:
        url = srv.url("/big.txt")
        with pytest.raises(CollectError) as exc:
            collect(cfg({"name": "big", "url": url, "sha256": BIG_SHA}), tmp_path / "raw", cache_dir=cache)
    msg = str(exc.value)
    wrong = sha(b"\xff" * CUT + BIG[CUT:])
    assert "'big'" in msg and url in msg and BIG_SHA in msg and wrong in msg
    assert list(cache.iterdir()) == []
    assert leftovers(tmp_path) == ["cache"]
