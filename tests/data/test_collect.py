"""collect(): local copies, the offline mirror, and real downloads from a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest

from lmcore.config import CollectConfig
from lmcore.data.collect import CollectError, collect
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
    """Everything in `parent` that a failed collect could have left (temp folders are hidden)."""
    return sorted(p.name for p in parent.iterdir())


class Server:
    """A real HTTP server on 127.0.0.1: serves `files`, failing the first `fail_first` requests with 503."""

    def __init__(self, files: dict[str, bytes], fail_first: int = 0, status: int = 503):
        self.files = files
        self.fail_first = fail_first
        self.status = status
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if len(server.requests) <= server.fail_first:
                    self.send_error(server.status)
                    return
                body = server.files.get(urllib.parse.urlsplit(self.path).path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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
        {"name": "verdict", "origin": "local", "source": "src/verdict.txt", "file": "verdict.txt",
         "sha256": TEXT_SHA, "bytes": len(TEXT), "license": "public domain"},
        {"name": "notes", "origin": "local", "source": str(tmp_path / "src" / "notes"), "file": "notes.txt",
         "sha256": sha(b"no suffix\n"), "bytes": 10, "license": "unknown"},
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
    assert manifest["sources"] == [
        {"name": "book", "origin": "download", "source": url, "file": "book.md",
         "sha256": sha(body), "bytes": len(body), "license": "CC0"},
    ]
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
        with pytest.raises(CollectError, match=r"'t'.*after 2 attempt.*503"):
            collect(cfg({"name": "t", "url": srv.url("/t.txt"), "sha256": TEXT_SHA}, retries=1), tmp_path / "raw",
                    backoff_s=0.01)
        assert len(srv.requests) == 2
    assert leftovers(tmp_path) == []


def test_client_error_is_not_retried(tmp_path):
    with Server({}) as srv:
        with pytest.raises(CollectError, match=r"'gone'.*HTTP 404"):
            collect(cfg({"name": "gone", "url": srv.url("/gone.txt"), "sha256": TEXT_SHA}, retries=3),
                    tmp_path / "raw", backoff_s=0.01)
        assert len(srv.requests) == 1
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


def test_connection_errors_are_retried(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused, quickly
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CollectError, match=r"'t'.*after 2 attempt"):
        collect(cfg({"name": "t", "url": f"http://127.0.0.1:{port}/t.txt", "sha256": TEXT_SHA}, retries=1),
                tmp_path / "raw", backoff_s=0.01)
    assert leftovers(tmp_path) == []
