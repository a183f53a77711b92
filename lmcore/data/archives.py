"""Safe extraction of zip and tar archives: every member is checked before anything is written.

    result = extract(Path("books.tar.zst"), Path("raw/books"))  # Extracted(members=12, skipped=[...])

Kinds: .zip, .tar, .tar.gz/.tgz, .tar.bz2/.tbz2, .tar.xz/.txz and .tar.zst/.tar.zstd (zstd through the
`zstandard` package, streamed into tarfile's "r|" mode). A file without one of these suffixes is
recognised by its first bytes (zip, or a tar that tarfile can open).

Refused, with an `ArchiveError` naming the archive and the member, before any member is extracted:
an absolute path, a `..` component, a NUL byte in a name, a symbolic or hard link whose target
resolves outside the destination (following the archive's own symbolic links, as the filesystem
would), and device files, FIFOs or other special members. Tar extraction also passes
`filter="data"` as defence in depth. Symbolic links that stay inside are not created: their targets
are members in their own right, and they are reported in `Extracted.skipped`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmcore.data.formats import ARCHIVE_SUFFIXES
from lmcore.errors import InputError, one_line

ZIP = "zip"
TAR = "tar"  # plain, gzip, bzip2 or xz: tarfile's "r|*" reads them all
TAR_ZSTD = "tar.zst"
_ZSTD_SUFFIXES = (".tar.zst", ".tar.zstd")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Member kinds.
_FILE, _DIR, _SYMLINK, _HARDLINK, _SPECIAL = "file", "dir", "symlink", "hardlink", "special"
_MAX_LINK_HOPS = 40  # as Linux's MAXSYMLINKS: a longer chain is a loop
_COPY_CHUNK = 1 << 20


class ArchiveError(InputError):
    """An archive that cannot be read, or a member that would land outside the destination."""


@dataclass(frozen=True)
class Extracted:
    """What `extract` did: `members` entries in the archive; `skipped` (member, reason) not written."""

    members: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Member:
    raw: str  # the name as stored, for messages
    parts: tuple[str, ...]  # normalised relative path ("./", "" and "." components dropped)
    kind: str
    target: str | None = None  # link target as stored


def archive_kind(path: Path, name: str | None = None) -> str | None:
    """ZIP, TAR or TAR_ZSTD by the suffix of `name` (default: the file's), else by content; None: no archive."""
    name = (name or Path(path).name).lower()
    if name.endswith(".zip"):
        return ZIP
    if name.endswith(_ZSTD_SUFFIXES):
        return TAR_ZSTD
    if name.endswith(ARCHIVE_SUFFIXES):
        return TAR
    if zipfile.is_zipfile(path):
        return ZIP
    with open(path, "rb") as f:
        if f.read(4) == _ZSTD_MAGIC:
            return None  # a zstd stream without a .tar.zst name: could be anything, and is not sniffed
    try:
        return TAR if tarfile.is_tarfile(path) else None
    except (OSError, EOFError, tarfile.TarError):
        return None


def extract(path: Path, dest: Path, name: str | None = None) -> Extracted:
    """Check every member of the archive at `path`, then extract it into `dest`.

    Args:
        path: the archive (its kind from `archive_kind`).
        dest: the folder to extract into; created when missing.
        name: the archive's file name, which gives its kind and names it in errors (default: `path`'s);
            collect passes the downloaded file's name, as the file itself sits under a temporary one.

    Returns:
        The member count and the members not written (symbolic links), with reasons.

    Raises:
        ArchiveError: naming the archive and the member, for an unreadable archive or an unsafe member;
        nothing has been extracted when a member is refused.
    """
    path, dest = Path(path), Path(dest)
    label = name or path.name
    kind = archive_kind(path, label)
    if kind is None:
        raise ArchiveError(f"archive {label}: not a zip or tar archive (known: {', '.join(ARCHIVE_SUFFIXES)})")
    try:
        members = _zip_members(path, label) if kind == ZIP else _tar_members(path, kind, label)
        _check(members, label)
        dest.mkdir(parents=True, exist_ok=True)
        if kind == ZIP:
            _extract_zip(path, dest, members, label)
        else:
            _extract_tar(path, kind, dest, label)
    except ArchiveError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, _zstd_error()) as err:
        raise ArchiveError(f"archive {label}: cannot be extracted: {type(err).__name__}: {one_line(err)}") from err
    skipped = [(m.raw, f"symbolic link to {m.target!r} (not created; its target is a member of its own)")
               for m in members if m.kind == _SYMLINK]
    return Extracted(members=len(members), skipped=skipped)


# ---------------------------------------------------------------------------------------------------------------
# Checks: done on the whole member list before anything is written.


def _split(name: str) -> list[str]:
    # Backslashes count as separators: a zip made on Windows may use them, and "..\\x" must not slip through.
    return re.split(r"[/\\]", name)


def _parts(raw: str, label: str) -> tuple[str, ...]:
    if "\x00" in raw:
        raise ArchiveError(f"archive {label}: member {raw!r} has a NUL byte in its name")
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[/\\]", raw):
        raise ArchiveError(f"archive {label}: member {raw!r} has an absolute path")
    parts = tuple(p for p in _split(raw) if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive {label}: member {raw!r} escapes the destination")
    return parts


def _resolve(parts: tuple[str, ...] | list[str], links: dict[tuple[str, ...], str]) -> list[str] | None:
    """Where a relative path lands once the archive's own symbolic links are followed; None if outside."""
    out: list[str] = []
    todo = list(parts)
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(part)
        target = links.get(tuple(out))
        if target is None:
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS or target.startswith(("/", "\\")):
            return None
        out.pop()
        todo = _split(target) + todo
    return out


def _check(members: list[_Member], label: str) -> None:
    links = {m.parts: m.target or "" for m in members if m.kind == _SYMLINK}
    for m in members:
        if m.kind == _SPECIAL:
            raise ArchiveError(f"archive {label}: member {m.raw!r} is a device file, FIFO or other special file")
        if not m.parts:
            continue  # the root folder itself ("./")
        if _resolve(m.parts[:-1], links) is None:
            raise ArchiveError(f"archive {label}: member {m.raw!r} escapes the destination through a symbolic link")
        if m.kind == _SYMLINK:
            target = m.target or ""
            # A symbolic link's target is relative to the link's folder; a hard link's to the archive root.
            if target.startswith(("/", "\\")) or _resolve([*m.parts[:-1], *_split(target)], links) is None:
                raise ArchiveError(
                    f"archive {label}: member {m.raw!r} is a symbolic link to {target!r}, outside the destination"
                )
        elif m.kind == _HARDLINK:
            target = m.target or ""
            if target.startswith(("/", "\\")) or _resolve(_split(target), links) is None:
                raise ArchiveError(
                    f"archive {label}: member {m.raw!r} is a hard link to {target!r}, outside the destination"
                )


# ---------------------------------------------------------------------------------------------------------------
# Zip


def _zip_members(path: Path, label: str) -> list[_Member]:
    members = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16  # the Unix mode, when the zipper recorded one
            target = None
            if info.is_dir() or stat.S_ISDIR(mode):
                kind = _DIR
            elif stat.S_ISLNK(mode):
                kind, target = _SYMLINK, zf.read(info).decode("utf-8", "surrogateescape")
            elif mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                kind = _SPECIAL
            else:
                kind = _FILE
            members.append(_Member(info.filename, _parts(info.filename, label), kind, target))
    return members


def _extract_zip(path: Path, dest: Path, members: list[_Member], label: str) -> None:
    root = dest.resolve()
    with zipfile.ZipFile(path) as zf:
        for info, m in zip(zf.infolist(), members, strict=True):
            if not m.parts or m.kind == _SYMLINK:
                continue
            target = dest.joinpath(*m.parts)
            if not target.resolve().is_relative_to(root):  # defence in depth: the checks above make this unreachable
                raise ArchiveError(f"archive {label}: member {m.raw!r} escapes the destination")
            if m.kind == _DIR:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_CHUNK)


# ---------------------------------------------------------------------------------------------------------------
# Tar: two streamed passes (check, then extract), so a .tar.zst never needs a decompressed copy on disk.


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


@contextlib.contextmanager
def _open_tar(path: Path, kind: str) -> Iterator[tarfile.TarFile]:
    if kind == TAR_ZSTD:
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True
        ) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            yield tf
    else:
        with tarfile.open(path, mode="r|*") as tf:
            yield tf


def _tar_kind(ti: tarfile.TarInfo) -> str:
    if ti.isdir():
        return _DIR
    if ti.issym():
        return _SYMLINK
    if ti.islnk():
        return _HARDLINK
    if ti.isreg():
        return _FILE
    return _SPECIAL  # character/block devices, FIFOs, unknown types


def _tar_members(path: Path, kind: str, label: str) -> list[_Member]:
    members = []
    with _open_tar(path, kind) as tf:
        for ti in tf:
            m_kind = _tar_kind(ti)
            target = ti.linkname if m_kind in (_SYMLINK, _HARDLINK) else None
            members.append(_Member(ti.name, _parts(ti.name, label), m_kind, target))
    return members


def _extract_tar(path: Path, kind: str, dest: Path, label: str) -> None:
    with _open_tar(path, kind) as tf:
        for ti in tf:
            if ti.issym():
                continue
            try:
                tf.extract(ti, dest, set_attrs=False, filter="data")
            except tarfile.FilterError as err:
                raise ArchiveError(f"archive {label}: member {ti.name!r} refused: {one_line(err)}") from err
