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

Limits, so that a small hostile archive cannot fill the disk or the memory: at most `max_members` members
(MAX_MEMBERS) and `max_bytes` bytes once uncompressed (MAX_TOTAL_BYTES), counted from the sizes the
archive declares before anything is written (zipfile and tarfile never give more than a member declares);
a link's target, a GNU long name and a pax header are read only up to a size cap.
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
# Defaults of extract's limits: members, and bytes once uncompressed (both far above any corpus source).
MAX_MEMBERS = 100_000
MAX_TOTAL_BYTES = 16 << 30
MAX_LINK_TARGET = 4096  # bytes of a link target or a member name (Linux's PATH_MAX)
MAX_PAX_HEADER = 1 << 20  # bytes of a tar pax header (a path, times, attributes)


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


def extract(path: Path, dest: Path, name: str | None = None, *, max_members: int = MAX_MEMBERS,
            max_bytes: int = MAX_TOTAL_BYTES) -> Extracted:
    """Check every member of the archive at `path`, then extract it into `dest`.

    Args:
        path: the archive (its kind from `archive_kind`).
        dest: the folder to extract into; created when missing.
        name: the archive's file name, which gives its kind and names it in errors (default: `path`'s);
            collect passes the downloaded file's name, as the file itself sits under a temporary one.
        max_members, max_bytes: the most members, and bytes of their contents once uncompressed, an archive
            may have; more is an ArchiveError before anything is written.

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
    limits = _Limits(label, max_members, max_bytes)
    try:
        members = _zip_members(path, limits) if kind == ZIP else _tar_members(path, kind, limits)
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
    except RecursionError:  # tarfile follows a chain of GNU long-name or pax headers by recursion
        raise ArchiveError(f"archive {label}: cannot be extracted: a chain of extended headers too long") from None
    skipped = [(m.raw, f"symbolic link to {m.target!r} (not created; its target is a member of its own)")
               for m in members if m.kind == _SYMLINK]
    return Extracted(members=len(members), skipped=skipped)


# ---------------------------------------------------------------------------------------------------------------
# Checks: done on the whole member list before anything is written.


@dataclass
class _Limits:
    """Counts members and their declared bytes as they are listed; ArchiveError past either limit."""

    label: str
    max_members: int
    max_bytes: int
    members: int = 0
    bytes: int = 0

    def add(self, raw: str, size: int) -> None:
        self.members += 1
        self.bytes += max(size, 0)
        if self.members > self.max_members:
            raise ArchiveError(f"archive {self.label}: more than {self.max_members} members (at {raw!r}); "
                               f"lmcore extracts up to {self.max_members}")
        if self.bytes > self.max_bytes:
            raise ArchiveError(f"archive {self.label}: more than {self.max_bytes} bytes once extracted (at {raw!r}, "
                               f"which declares {size}); lmcore extracts up to {self.max_bytes}")


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


def _zip_members(path: Path, limits: _Limits) -> list[_Member]:
    label = limits.label
    members = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16  # the Unix mode, when the zipper recorded one
            target = None
            if info.is_dir() or stat.S_ISDIR(mode):
                kind = _DIR
            elif stat.S_ISLNK(mode):
                kind = _SYMLINK
            elif mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                kind = _SPECIAL
            else:
                kind = _FILE
            limits.add(info.filename, info.file_size if kind == _FILE else 0)  # only files are written
            if kind == _SYMLINK:
                target = _zip_link_target(zf, info, label)
            members.append(_Member(info.filename, _parts(info.filename, label), kind, target))
    return members


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> str:
    """A zip symbolic link's target (the member's contents), read no further than MAX_LINK_TARGET bytes."""
    with zf.open(info) as f:
        target = f.read(MAX_LINK_TARGET + 1)
    if len(target) > MAX_LINK_TARGET:
        raise ArchiveError(f"archive {label}: member {info.filename!r} is a symbolic link to a target of more than "
                           f"{MAX_LINK_TARGET} bytes")
    return target.decode("utf-8", "surrogateescape")


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


class _CappedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing a GNU long name or link, or a pax header, larger than its cap before
    reading it (tarfile reads each whole into memory, whatever size the archive declares)."""

    def _proc_gnulong(self, tarfile_):
        if self.size > MAX_LINK_TARGET:
            raise tarfile.HeaderError(f"a GNU long name or link target of {self.size} bytes (more than {MAX_LINK_TARGET})")
        return super()._proc_gnulong(tarfile_)

    def _proc_pax(self, tarfile_):
        if self.size > MAX_PAX_HEADER:
            raise tarfile.HeaderError(f"a pax header of {self.size} bytes (more than {MAX_PAX_HEADER})")
        return super()._proc_pax(tarfile_)


@contextlib.contextmanager
def _open_tar(path: Path, kind: str) -> Iterator[tarfile.TarFile]:
    if kind == TAR_ZSTD:
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True
        ) as stream, tarfile.open(fileobj=stream, mode="r|", tarinfo=_CappedTarInfo) as tf:
            yield tf
    else:
        with tarfile.open(path, mode="r|*", tarinfo=_CappedTarInfo) as tf:
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


def _tar_members(path: Path, kind: str, limits: _Limits) -> list[_Member]:
    members = []
    with _open_tar(path, kind) as tf:
        for ti in tf:  # the limits are checked before tarfile reads on past this member's data
            m_kind = _tar_kind(ti)
            limits.add(ti.name, ti.size if m_kind == _FILE else 0)
            target = ti.linkname if m_kind in (_SYMLINK, _HARDLINK) else None
            members.append(_Member(ti.name, _parts(ti.name, limits.label), m_kind, target))
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
