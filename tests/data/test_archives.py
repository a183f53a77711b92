"""Archives: extracted safely (every member checked first) from a local path, a download or the mirror."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
import zstandard

from lmcore.data.archives import ArchiveError, archive_kind, extract
from lmcore.data.collect import CollectError, collect
from lmcore.paths import MANIFEST
from tests.data.test_collect import Server, cfg, leftovers, make_mirror, parts, sha

# A member: (name, bytes) for a file, or (name, kind, target) with kind "dir", "symlink", "hardlink", "chr", "fifo".
GOOD = [
    ("books/", "dir", None),
    ("books/emma.txt", b"Emma Woodhouse, handsome, clever, and rich.\n"),
    ("books/more/persuasion.jsonl", b'{"text": "Sir Walter Elliot"}\n'),
    ("books/cover.png", b"\x89PNG not really"),
    ("books/.DS_Store", b"finder"),
    ("__MACOSX/books/._emma.txt", b"resource fork"),
    ("README.md", b"# Books\n"),
]
GOOD_KEPT = {
    "README.md": b"# Books\n",
    "books/emma.txt": b"Emma Woodhouse, handsome, clever, and rich.\n",
    "books/more/persuasion.jsonl": b'{"text": "Sir Walter Elliot"}\n',
}


def tar_bytes(members: list[tuple], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for member in members:
            info = tarfile.TarInfo(member[0].rstrip("/") if member[1] == "dir" else member[0])
            info.mtime = 0
            if isinstance(member[1], bytes):
                info.size = len(member[1])
                tf.addfile(info, io.BytesIO(member[1]))
                continue
            kind, target = member[1], member[2]
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = target or ""
            tf.addfile(info)
    return buf.getvalue()


def zip_bytes(members: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for member in members:
            if isinstance(member[1], bytes):
                zf.writestr(zipfile.ZipInfo(member[0], (1980, 1, 1, 0, 0, 0)), member[1])
                continue
            kind, target = member[1], member[2]
            info = zipfile.ZipInfo(member[0], (1980, 1, 1, 0, 0, 0))
            mode = {"dir": stat.S_IFDIR | 0o755, "symlink": stat.S_IFLNK | 0o777, "chr": stat.S_IFCHR | 0o644,
                    "fifo": stat.S_IFIFO | 0o644}[kind]
            info.external_attr = mode << 16
            zf.writestr(info, (target or "").encode())
    return buf.getvalue()


def archive_bytes(name: str, members: list[tuple]) -> bytes:
    if name.endswith(".zip"):
        return zip_bytes(members)
    if name.endswith(".tar.zst"):
        return zstandard.ZstdCompressor().compress(tar_bytes(members))
    mode = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.bz2": "w:bz2", ".tar.xz": "w:xz"}
    return tar_bytes(members, next(m for suffix, m in mode.items() if name.endswith(suffix)))


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# good archives


@pytest.mark.parametrize("name", ["books.zip", "books.tar", "books.tar.gz", "books.tgz", "books.tar.bz2",
                                  "books.tar.xz", "books.tar.zst"])
def test_local_archive_is_extracted_and_listed(tmp_path, name):
    data = archive_bytes(name, GOOD)
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "raw"
    manifest = collect(cfg({"name": "lib", "path": name, "sha256": sha(data), "extract": True, "license": "PD"}), out,
                       base_dir=tmp_path)
    (entry,) = manifest["sources"]
    assert entry["origin"] == "local" and entry["source"] == name and entry["license"] == "PD"
    assert entry["archive"] == {"name": name, "sha256": sha(data), "bytes": len(data), "members": len(GOOD)}
    assert entry["files"] == [
        {"file": f"lib/{rel}", "sha256": sha(data), "bytes": len(data), "format": fmt, "compression": None}
        for (rel, data), fmt in zip(GOOD_KEPT.items(), ["md", "txt", "jsonl"], strict=True)
    ]
    assert entry["bytes"] == sum(len(d) for d in GOOD_KEPT.values())
    assert entry["skipped_files"] == [
        {"path": "books/cover.png", "reason": "unknown format (.png); set the source's 'format' to keep it"},
    ]
    assert "file" not in entry and "sha256" not in entry
    # raw/ holds exactly what the manifest lists: no archive, no hidden files, no skipped files.
    assert files_under(out) == {MANIFEST: (out / MANIFEST).read_bytes(), **{f"lib/{k}": v for k, v in GOOD_KEPT.items()}}


def test_links_inside_the_destination_are_accepted(tmp_path):
    members = [("data/a.txt", b"alpha\n"), ("data/latest.txt", "symlink", "a.txt"),
               ("data/copy.txt", "hardlink", "data/a.txt"), ("top", "symlink", "data")]
    (tmp_path / "l.tar").write_bytes(tar_bytes(members))
    (tmp_path / "l.zip").write_bytes(zip_bytes(members[:2]))
    for name in ("l.tar", "l.zip"):
        result = extract(tmp_path / name, tmp_path / name.replace(".", "_"))
        symlinks = [m for m, _ in result.skipped]
        assert symlinks == (["data/latest.txt", "top"] if name == "l.tar" else ["data/latest.txt"])
    assert files_under(tmp_path / "l_tar") == {"data/a.txt": b"alpha\n", "data/copy.txt": b"alpha\n"}
    assert files_under(tmp_path / "l_zip") == {"data/a.txt": b"alpha\n"}
    assert not any(p.is_symlink() for p in (tmp_path / "l_tar").rglob("*"))

    manifest = collect(cfg({"name": "l", "path": "l.tar", "extract": True}), tmp_path / "raw", base_dir=tmp_path)
    (entry,) = manifest["sources"]
    assert [f["file"] for f in entry["files"]] == ["l/data/a.txt", "l/data/copy.txt"]
    assert [s["path"] for s in entry["skipped_files"]] == ["data/latest.txt", "top"]
    assert "symbolic link to 'a.txt'" in entry["skipped_files"][0]["reason"]


# malicious archives: refused before anything is written, naming the archive and the member

EVIL = [
    ("absolute", ("/tmp/evil.txt", b"x"), "member '/tmp/evil.txt' has an absolute path"),
    ("dotdot", ("../evil.txt", b"x"), "member '../evil.txt' escapes the destination"),
    ("nested dotdot", ("books/../../evil.txt", b"x"), "member 'books/../../evil.txt' escapes the destination"),
    ("backslash dotdot", ("..\\evil.txt", b"x"), "escapes the destination"),
    ("symlink absolute", ("passwd.txt", "symlink", "/etc/passwd"),
     "member 'passwd.txt' is a symbolic link to '/etc/passwd', outside the destination"),
    ("symlink dotdot", ("books/x.txt", "symlink", "../../x"),
     "member 'books/x.txt' is a symbolic link to '../../x', outside the destination"),
    ("symlink chain", [("a/b/up", "symlink", "../.."), ("x.txt", "symlink", "a/b/up/..")],
     "member 'x.txt' is a symbolic link to 'a/b/up/..', outside the destination"),
    ("write through symlink", [("lnk", "symlink", ".."), ("lnk/evil.txt", b"x")],
     "member 'lnk' is a symbolic link to '..', outside the destination"),
]
TAR_ONLY = [
    ("hardlink dotdot", ("h.txt", "hardlink", "../outside.txt"),
     "member 'h.txt' is a hard link to '../outside.txt', outside the destination"),
    ("hardlink absolute", ("h.txt", "hardlink", "/etc/passwd"),
     "member 'h.txt' is a hard link to '/etc/passwd', outside the destination"),
    ("device", ("null", "chr", None), "member 'null' is a device file, FIFO or other special file"),
    ("fifo", ("pipe", "fifo", None), "member 'pipe' is a device file, FIFO or other special file"),
]
ZIP_ONLY = [("zip fifo", ("pipe", "fifo", None), "member 'pipe' is a device file, FIFO or other special file")]


def evil_cases() -> list:
    cases = []
    for suffix, extra in ((".zip", ZIP_ONLY), (".tar.gz", TAR_ONLY), (".tar.zst", TAR_ONLY)):
        for label, members, message in EVIL + extra:
            members = members if isinstance(members, list) else [members]
            cases.append(pytest.param(f"books{suffix}", members, message, id=f"{suffix[1:]}-{label}"))
    return cases


@pytest.mark.parametrize(("name", "members", "message"), evil_cases())
def test_malicious_archive_is_refused_and_leaves_nothing(tmp_path, name, members, message):
    # Good members first: a refusal must come before any of them is written.
    data = archive_bytes(name, GOOD[:3] + members)
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "raw"
    out.mkdir()
    (out / "previous.txt").write_text("previous run")
    with pytest.raises(CollectError) as exc:
        collect(cfg({"name": "x", "path": name, "extract": True}), out, base_dir=tmp_path)
    assert str(exc.value).startswith(f"source 'x': archive {name}: ")
    assert message in str(exc.value)
    assert files_under(out) == {"previous.txt": b"previous run"}
    assert leftovers(tmp_path) == [name, "raw"]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()

    dest = tmp_path / "direct"
    with pytest.raises(ArchiveError, match="member"):
        extract(tmp_path / name, dest)
    assert not dest.exists()  # nothing created, not even the folder


def test_extract_on_a_non_archive_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"just text\n")
    with pytest.raises(CollectError, match=r"source 'n': 'extract: true' but notes\.txt is not a zip or tar archive"):
        collect(cfg({"name": "n", "path": "notes.txt", "extract": True}), tmp_path / "raw", base_dir=tmp_path)
    assert archive_kind(tmp_path / "notes.txt") is None
    assert leftovers(tmp_path) == ["notes.txt"]


def test_corrupt_archive_names_the_archive(tmp_path):
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(CollectError, match=r"source 'b': archive bad\.tar\.gz: cannot be extracted"):
        collect(cfg({"name": "b", "path": "bad.tar.gz", "extract": True}), tmp_path / "raw", base_dir=tmp_path)
    assert leftovers(tmp_path) == ["bad.tar.gz"]


def test_archive_without_known_files_fails(tmp_path):
    (tmp_path / "img.zip").write_bytes(zip_bytes([("a.png", b"png")]))
    with pytest.raises(CollectError, match=r"source 'i': none of the 1 file\(s\) found for archive img\.zip.*a\.png"):
        collect(cfg({"name": "i", "path": "img.zip", "extract": True}), tmp_path / "raw", base_dir=tmp_path)


# archives from the network and the mirror


def test_archive_served_over_http_is_extracted(tmp_path):
    data = archive_bytes("books.tar.gz", GOOD)
    with Server({"/dl/books.tar.gz": data}, cut={1: len(data) // 2}) as srv:
        url = srv.url("/dl/books.tar.gz")
        manifest = collect(cfg({"name": "lib", "url": url, "sha256": sha(data), "extract": True}, retries=1),
                           tmp_path / "raw", backoff_s=0.01)
        assert srv.ranges == [None, f"bytes={len(data) // 2}-"]  # resumed, then extracted
    (entry,) = manifest["sources"]
    assert entry["origin"] == "download" and entry["source"] == url
    assert entry["archive"] == {"name": "books.tar.gz", "sha256": sha(data), "bytes": len(data), "members": len(GOOD)}
    assert files_under(tmp_path / "raw" / "lib") == GOOD_KEPT
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["lib", MANIFEST]  # no archive, no temp file
    assert parts(tmp_path) == {}


def test_malicious_archive_over_http_is_refused(tmp_path):
    data = archive_bytes("evil.zip", [("../evil.txt", b"x")])
    with Server({"/evil.zip": data}) as srv:
        with pytest.raises(CollectError, match=r"source 'e': archive evil\.zip: member '\.\./evil\.txt' escapes"):
            collect(cfg({"name": "e", "url": srv.url("/evil.zip"), "sha256": sha(data), "extract": True}),
                    tmp_path / "raw")
    assert leftovers(tmp_path) == [] and parts(tmp_path) == {}


@pytest.mark.parametrize("with_url", [True, False])
def test_archive_from_the_mirror_is_extracted(tmp_path, with_url):
    data = archive_bytes("books.zip", GOOD)
    mirror = make_mirror(tmp_path / "mirror", {"packs/books-v1.zip": data})
    source = {"name": "lib", "sha256": sha(data), "extract": True}
    if with_url:
        source["url"] = "http://127.0.0.1:9/never/books.zip"  # nothing listens: only the mirror can serve it
    manifest = collect(cfg(source), tmp_path / "raw", mirror=mirror)
    (entry,) = manifest["sources"]
    assert entry["origin"] == "mirror"
    assert entry["mirror_path"] == str((mirror / "packs" / "books-v1.zip").resolve())
    assert entry["archive"]["name"] == ("books.zip" if with_url else "books-v1.zip")
    assert files_under(tmp_path / "raw" / "lib") == GOOD_KEPT
