"""Collect stage: bring every configured source into one folder, pinned by sha256.

    manifest = collect(params.collect, Path("data/raw"), mirror=Path("../shared/data"))

A source is one of:
- a URL pinned by sha256: first looked up by checksum in the offline mirror (`LMCORE_MIRROR`, e.g.
  ../shared/data), else downloaded with retries and resumed from `<cache_dir>/<sha256>.part`;
- a local `path`: a file (verified when a sha256 is given), a folder (taken recursively) or a glob
  (`*`, `?`, `[..]`, `**`);
- a sha256 alone: found in the mirror or nowhere.
With `extract: true` the single file is a zip or tar archive, checked member by member and unpacked
into raw/<name>/ (see `lmcore.data.archives`); the archive itself is not kept.

A single file lands at raw/<name><suffixes> (`.jsonl.gz` stays whole); the files of a folder, glob or
archive at raw/<name>/<relative path>. Of those, only files of a known format are kept (every regular
file when the source sets `format`); the others are listed under `skipped_files`. The output folder
is written atomically: a failure leaves no folder behind (or the previous one untouched).
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from lmcore.config import CollectConfig, Source
from lmcore.data import archives
from lmcore.data.formats import FileFormat, compression_of, detect, is_archive
from lmcore.errors import InputError, TransientError, one_line
from lmcore.io import atomic_dir, sha256_file, write_json
from lmcore.paths import MANIFEST

log = logging.getLogger(__name__)

# Retry delay is BACKOFF_S * 2**attempt: 0.5 s, 1 s, 2 s, ...
BACKOFF_S = 0.5
CHUNK = 1 << 16
SHA256SUMS = "SHA256SUMS"
DEFAULT_SUFFIX = ".txt"
DEFAULT_FORMAT = "txt"  # how a single file of unknown suffix is read
USER_AGENT = "lmcore-collect"
PART_SUFFIX = ".part"  # a partial download: <cache_dir>/<sha256>.part

# Values of a manifest entry's "origin".
ORIGIN_MIRROR = "mirror"
ORIGIN_DOWNLOAD = "download"
ORIGIN_LOCAL = "local"

_SUFFIX_RE = re.compile(r"^\.[A-Za-z0-9]{1,10}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_SHOWN_SKIPS = 5  # skipped files named in a log line


MIRROR_ENV = "LMCORE_MIRROR"


def mirror_from_env() -> Path | None:
    """The offline mirror folder named by $LMCORE_MIRROR, when it exists."""
    value = os.environ.get(MIRROR_ENV)
    return Path(value) if value and Path(value).is_dir() else None


class CollectError(InputError):
    """A source that cannot be collected: missing, unsafe, refused by its server (HTTP 4xx), or not matching its sha256."""


class SourceUnavailable(TransientError):
    """A download that still failed after its retries (connection, timeout, HTTP 429/5xx, short read): worth a later run.

    What arrived stays in the cache's .part file, and the next run resumes it.
    """


class _RetryableError(Exception):
    """A transient download failure (network error, 5xx, short read): worth another attempt."""


def collect(
    cfg: CollectConfig,
    out_dir: Path,
    mirror: Path | None = None,
    base_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    backoff_s: float = BACKOFF_S,
) -> dict:
    """Collect every source of `cfg` into `out_dir` and write its manifest.

    Args:
        cfg: the sources, download retries and timeout.
        out_dir: the stage folder; replaced whole on success, untouched on failure.
        mirror: an offline mirror folder searched by checksum before any download.
        base_dir: what relative `path` sources are resolved against (default: the current folder).
        cache_dir: where partial downloads wait to be resumed (default: out_dir/../.cache/downloads).
        backoff_s: base of the exponential delay between download attempts.

    Returns:
        The manifest written to `out_dir/manifest.json`: {"sources": [entry, ...]}, one entry per source
        with its origin, files (path, sha256, bytes, format, compression) and skipped files.
    """
    out_dir = Path(out_dir)
    collector = _Collector(
        cfg=cfg,
        base_dir=Path(base_dir) if base_dir is not None else Path.cwd(),
        index=_MirrorIndex(Path(mirror)) if mirror is not None else None,
        cache_dir=Path(cache_dir) if cache_dir is not None else out_dir.parent / ".cache" / "downloads",
        backoff_s=backoff_s,
    )
    entries = []
    with atomic_dir(out_dir) as tmp:
        for src in cfg.sources:
            entry = collector.source(src, tmp)
            log.info(
                "collected %s from %s (%s, %d file(s), %d bytes, %d skipped)",
                src.name,
                entry.get("mirror_path") or entry["source"],
                entry["origin"],
                len(entry["files"]),
                entry["bytes"],
                len(entry["skipped_files"]),
            )
            entries.append(entry)
        manifest = {"sources": entries}
        write_json(tmp / MANIFEST, manifest)
    return manifest


class _Collector:
    """Collects one source at a time into the temporary output folder."""

    def __init__(
        self, cfg: CollectConfig, base_dir: Path, index: _MirrorIndex | None, cache_dir: Path, backoff_s: float
    ):
        self.cfg = cfg
        self.base_dir = base_dir
        self.index = index
        self.cache_dir = cache_dir
        self.backoff_s = backoff_s

    def source(self, src: Source, out: Path) -> dict:
        """Collect `src` into `out` (the temporary output folder); returns its manifest entry."""
        location = src.url if src.url is not None else src.path
        entry = {
            "name": src.name,
            "origin": None,
            "source": location if location is not None else f"sha256:{src.sha256}",
            "license": src.license,
            "format": src.format,
            "text_field": src.text_field,
        }
        if src.path is not None:
            try:
                return self._local(src, out, entry)
            except PermissionError as err:  # a file of the user's that this process may not read
                raise CollectError(f"source {src.name!r}: cannot read {err.filename}: {err.strerror}") from None

        # A URL or a sha256 alone: the mirror first, then (for a URL) the network.
        incoming = out / f".{src.name}.incoming"
        hit = self.index.copy(src.sha256, incoming) if self.index is not None else None
        if hit is not None:
            mirror_path, digest, size = hit
            entry["origin"] = ORIGIN_MIRROR
            entry["mirror_path"] = str(mirror_path)
            file_name = _url_file_name(src.url) if src.url is not None else mirror_path.name
        elif src.url is None:
            where = f"the mirror {self.index.root}" if self.index else "any mirror (LMCORE_MIRROR is not set)"
            raise CollectError(
                f"source {src.name!r} has no url or path and sha256 {src.sha256} is not in {where}; "
                f"give it a 'url' (with that file's sha256) or a local 'path'"
            )
        else:
            digest, size = self._download(src, incoming)
            entry["origin"] = ORIGIN_DOWNLOAD
            file_name = _url_file_name(src.url)
        if src.extract:
            try:
                return self._extract(src, out, entry, incoming, file_name, digest, size)
            finally:
                incoming.unlink(missing_ok=True)
        dest = _claim(out, src.name + _suffixes(file_name), src)
        os.replace(incoming, dest)
        return _single_file(entry, src, dest.name, digest, size)

    # -- local paths -------------------------------------------------------------------------------------------

    def _local(self, src: Source, out: Path, entry: dict) -> dict:
        entry["origin"] = ORIGIN_LOCAL
        path = Path(src.path).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        is_glob = glob.has_magic(src.path) and not path.exists()  # a file may well be named "notes[1].txt"
        if is_glob or path.is_dir():
            what = "a glob" if is_glob else "a folder"
            if src.extract:
                raise CollectError(
                    f"source {src.name!r}: 'extract: true' needs a single archive file, but path {src.path!r} is {what}"
                )
            if src.sha256 is not None:
                raise CollectError(
                    f"source {src.name!r}: 'sha256' pins a single file, but path {src.path!r} is {what}; "
                    f"drop it (every file's sha256 is recorded in the manifest)"
                )
            root, found, skipped = _glob(src.path, self.base_dir) if is_glob else _walk(path)
            return self._copy_tree(src, out, entry, root, found, skipped)
        if not path.is_file():
            raise CollectError(f"source {src.name!r}: file not found: {path} (path {src.path!r})")
        if src.extract:
            if archives.archive_kind(path) is None:
                raise _not_an_archive(src, path.name)
            digest, size = sha256_file(path), path.stat().st_size
            _verify_local(src, path, digest)
            return self._extract(src, out, entry, path, path.name, digest, size)
        dest = _claim(out, src.name + _suffixes(path.name), src)
        digest, size = _copy_hashed(path, dest)
        _verify_local(src, path, digest)
        return _single_file(entry, src, dest.name, digest, size)

    def _copy_tree(
        self, src: Source, out: Path, entry: dict, root: Path, found: list[tuple[str, Path]], skipped: list[dict]
    ) -> dict:
        """Copy the kept files of a folder or glob to out/<name>/<relative path>, hashing while copying."""
        kept, skipped = _select(src, found, skipped)
        if not kept:
            raise _nothing_kept(src, f"path {src.path!r} (looked in {root})", skipped)
        dest_root = _claim(out, src.name, src)
        files = []
        with tqdm(
            total=len(kept), unit="file", desc=src.name, leave=False, disable=len(kept) < 2 or not sys.stderr.isatty()
        ) as bar:
            for rel, path, fmt in kept:
                dest = dest_root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest, size = _copy_hashed(path, dest)
                files.append(_file_record(f"{src.name}/{rel}", digest, size, fmt))
                bar.update(1)
        return _tree_entry(entry, files, skipped)

    # -- archives ------------------------------------------------------------------------------------------------

    def _extract(
        self, src: Source, out: Path, entry: dict, archive: Path, archive_name: str, digest: str, size: int
    ) -> dict:
        """Unpack `archive` into out/<name>/ and keep its files of a known format."""
        if archives.archive_kind(archive, archive_name) is None:
            raise _not_an_archive(src, archive_name)
        dest_root = _claim(out, src.name, src)
        try:
            result = archives.extract(archive, dest_root, name=archive_name)
        except archives.ArchiveError as err:
            raise CollectError(f"source {src.name!r}: {err}") from err
        _, found, skipped = _walk(dest_root)
        skipped += [{"path": member, "reason": reason} for member, reason in result.skipped]
        kept, skipped = _select(src, found, skipped)
        if not kept:
            raise _nothing_kept(src, f"archive {archive_name}", skipped)
        _prune(dest_root, {path for _, path, _ in kept})
        files = [
            _file_record(f"{src.name}/{rel}", sha256_file(path), path.stat().st_size, fmt) for rel, path, fmt in kept
        ]
        entry = _tree_entry(entry, files, skipped)
        entry["archive"] = {"name": archive_name, "sha256": digest, "bytes": size, "members": result.members}
        return entry

    # -- downloads -----------------------------------------------------------------------------------------------

    def _download(self, src: Source, dest: Path) -> tuple[str, int]:
        """Download `src.url` to `dest` with retries, resuming its partial file; verify its sha256."""
        part = self.cache_dir / f"{src.sha256}{PART_SUFFIX}"
        attempts = self.cfg.retries + 1
        for attempt in range(attempts):
            try:
                digest, size = _fetch(src, part, self.cfg.timeout_s)
                break
            except _RetryableError as err:
                if attempt + 1 == attempts:
                    kept = f"; {part.stat().st_size} bytes kept in {part} for the next run" if part.exists() else ""
                    raise SourceUnavailable(
                        f"source {src.name!r}: download of {src.url} failed after {attempts} attempt(s): {err}{kept}"
                    ) from err
                delay = self.backoff_s * 2**attempt
                log.warning(
                    "source %s: %s; retrying in %.1f s (%d/%d)", src.name, err, delay, attempt + 1, self.cfg.retries
                )
                time.sleep(delay)
        if digest != src.sha256:
            part.unlink(missing_ok=True)
            raise CollectError(
                f"source {src.name!r}: sha256 mismatch for {src.url}: expected {src.sha256}, got {digest} "
                f"(the partial file {part} was removed)"
            )
        shutil.move(part, dest)
        return digest, size


# ---------------------------------------------------------------------------------------------------------------
# Entries


def _file_record(file: str, digest: str, size: int, fmt: FileFormat) -> dict:
    return {"file": file, "sha256": digest, "bytes": size, "format": fmt.format, "compression": fmt.compression}


def _single_file(entry: dict, src: Source, file_name: str, digest: str, size: int) -> dict:
    """A single collected file: kept at the top level too (`file`, `sha256`), as readers of one file expect."""
    entry.update(file=file_name, sha256=digest, bytes=size)
    entry["files"] = [_file_record(file_name, digest, size, _single_format(file_name, src))]
    entry["skipped_files"] = []
    return entry


def _tree_entry(entry: dict, files: list[dict], skipped: list[dict]) -> dict:
    entry["bytes"] = sum(f["bytes"] for f in files)
    entry["files"] = files
    entry["skipped_files"] = skipped
    return entry


def _single_format(name: str, src: Source) -> FileFormat:
    """A single file is always kept: the source's format, else its suffix's, else plain text."""
    detected = detect(name)
    compression = detected.compression if detected else (None if is_archive(name) else compression_of(name))
    if src.format is not None:
        return FileFormat(src.format, compression)
    return detected or FileFormat(DEFAULT_FORMAT, compression)


def _select(
    src: Source, found: list[tuple[str, Path]], skipped: list[dict]
) -> tuple[list[tuple[str, Path, FileFormat]], list[dict]]:
    """Split the files of a folder, glob or archive into kept (with their format) and skipped (with a reason)."""
    kept = []
    skipped = list(skipped)
    for rel, path in found:
        if is_archive(rel):
            skipped.append({"path": rel, "reason": "an archive: give it a source of its own with 'extract: true'"})
        elif src.format is not None:
            kept.append((rel, path, FileFormat(src.format, compression_of(rel))))
        elif (fmt := detect(rel)) is not None:
            kept.append((rel, path, fmt))
        else:
            suffix = "".join(PurePosixPath(rel).suffixes) or "no suffix"
            skipped.append({"path": rel, "reason": f"unknown format ({suffix}); set the source's 'format' to keep it"})
    skipped.sort(key=lambda s: s["path"])
    if skipped:
        shown = ", ".join(f"{s['path']} ({s['reason']})" for s in skipped[:_SHOWN_SKIPS])
        more = f" and {len(skipped) - _SHOWN_SKIPS} more" if len(skipped) > _SHOWN_SKIPS else ""
        log.warning("source %s: skipped %d file(s): %s%s", src.name, len(skipped), shown, more)
    return kept, skipped


def _nothing_kept(src: Source, where: str, skipped: list[dict]) -> CollectError:
    if not skipped:
        return CollectError(f"source {src.name!r}: no files found for {where}")
    names = ", ".join(s["path"] for s in skipped[:_SHOWN_SKIPS]) + (" ..." if len(skipped) > _SHOWN_SKIPS else "")
    return CollectError(
        f"source {src.name!r}: none of the {len(skipped)} file(s) found for {where} can be read ({names}); "
        f"set the source's 'format' to read them all as one format"
    )


def _not_an_archive(src: Source, name: str) -> CollectError:
    return CollectError(
        f"source {src.name!r}: 'extract: true' but {name} is not a zip or tar archive "
        f"({', '.join(archives.ARCHIVE_SUFFIXES)}); drop 'extract' to collect it as a file"
    )


def _verify_local(src: Source, path: Path, digest: str) -> None:
    if src.sha256 is not None and digest != src.sha256:
        raise CollectError(f"source {src.name!r}: sha256 mismatch for {path}: expected {src.sha256}, got {digest}")


def _claim(out: Path, rel: str, src: Source) -> Path:
    """out/rel, refused when the manifest or another source already took that name."""
    dest = out / rel
    if rel == MANIFEST or dest.exists() or dest.is_symlink():
        raise CollectError(f"source {src.name!r}: {rel} is already taken in the output folder; rename the source")
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Names and listings


def _url_file_name(url: str) -> str:
    return PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name


def _suffixes(name: str) -> str:
    """The suffixes a single collected file keeps: `.jsonl.gz`, `.tar.zst`, `.md`; `.txt` when it has none."""
    lower = name.lower()
    for suffix in archives.ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return name[len(name) - len(suffix):]
    if detect(name) is not None:
        count = 2 if compression_of(name) else 1  # the format's suffix and the compression's
        return "".join(PurePosixPath(name).suffixes[-count:])
    suffix = PurePosixPath(name).suffix
    return suffix if _SUFFIX_RE.match(suffix) else DEFAULT_SUFFIX


def _walk(root: Path) -> tuple[Path, list[tuple[str, Path]], list[dict]]:
    """Every file under `root` as (relative posix path, path), sorted; hidden files and folders left out."""
    found, skipped, hidden = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                hidden += 1
            elif (folder / name).is_symlink():  # os.walk does not follow it; say so
                skipped.append({"path": (folder / name).relative_to(root).as_posix(),
                                "reason": "symbolic link to a folder (not followed)"})
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            path = folder / name
            if name.startswith("."):
                hidden += 1
            elif path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
            else:
                skipped.append({"path": path.relative_to(root).as_posix(), "reason": "not a regular file"})
    if hidden:
        log.info("%s: left out %d hidden file(s) or folder(s)", root, hidden)
    return root, sorted(found), skipped


def _glob(pattern: str, base_dir: Path) -> tuple[Path, list[tuple[str, Path]], list[dict]]:
    """The files a glob matches, relative to its non-magic prefix (`data/**/*.jsonl` -> data/)."""
    parts = Path(pattern).expanduser().parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first_magic]) if first_magic else Path()
    root = root if root.is_absolute() else base_dir / root
    # Wildcards skip hidden names, as in a shell.
    matches = set(glob.glob(os.path.join(*parts[first_magic:]), root_dir=root, recursive=True))
    found, skipped = [], []
    for rel in sorted(matches):
        path = root / rel
        if path.is_file():
            found.append((PurePosixPath(Path(rel)).as_posix(), path))
        elif not path.is_dir():  # folders matched by `*` or `**` are walked through by the pattern itself
            skipped.append({"path": Path(rel).as_posix(), "reason": "not a regular file"})
    return root, found, skipped


def _prune(root: Path, keep: set[Path]) -> None:
    """Remove from an extracted folder everything not kept, so raw/ holds exactly what the manifest lists."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        folder = Path(dirpath)
        for name in filenames:
            if folder / name not in keep:
                (folder / name).unlink()
        for name in dirnames:
            path = folder / name
            if path.is_symlink():
                path.unlink()
            elif not any(path.iterdir()):
                path.rmdir()


def _copy_hashed(src: Path, dest: Path) -> tuple[str, int]:
    """Copy `src` to `dest`, hashing the bytes actually copied (no second read)."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while block := fin.read(CHUNK):
            h.update(block)
            fout.write(block)
            size += len(block)
    return h.hexdigest(), size


class _MirrorIndex:
    """An offline mirror searched by sha256.

    With a `SHA256SUMS` file (`<hex>  <relative path>` lines) its entries name the candidates;
    without one every file is hashed, once, on the first lookup. A candidate is trusted only when
    the bytes copied out of it hash to the wanted checksum.
    """

    def __init__(self, root: Path):
        self.root = root
        self._by_sha: dict[str, list[Path]] | None = None

    def _build(self) -> dict[str, list[Path]]:
        by_sha: dict[str, list[Path]] = {}
        if not self.root.is_dir():
            log.warning("mirror %s is not a folder; every URL source will be downloaded", self.root)
            return by_sha
        sums = self.root / SHA256SUMS
        if sums.is_file():
            root = self.root.resolve()
            try:
                text = sums.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise CollectError(f"{sums}: not UTF-8 text ({err.reason} at byte offset {err.start})") from None
            for lineno, line in enumerate(text.splitlines(), 1):
                parts = line.strip().split(maxsplit=1)
                if not parts or parts[0].startswith("#"):
                    continue
                if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
                    log.warning("%s:%d: not a '<sha256>  <path>' line, ignored", sums, lineno)
                    continue
                rel = parts[1].lstrip("*")  # sha256sum marks binary mode with '*'
                path = (root / rel).resolve()
                if not path.is_relative_to(root):
                    log.warning("%s:%d: %r is outside the mirror, ignored", sums, lineno, rel)
                    continue
                by_sha.setdefault(parts[0].lower(), []).append(path)
        else:
            for dirpath, dirnames, files in os.walk(self.root):
                dirnames.sort()
                for name in sorted(files):
                    path = Path(dirpath) / name
                    if path.is_file():
                        by_sha.setdefault(sha256_file(path), []).append(path)
        return by_sha

    def copy(self, sha256: str, dest: Path) -> tuple[Path, str, int] | None:
        """Copy the mirror's file with this checksum to `dest`: (mirror path, sha256, bytes), or None."""
        if self._by_sha is None:
            self._by_sha = self._build()
        for path in self._by_sha.get(sha256, []):
            if not path.is_file():
                log.warning("mirror lists %s for %s but the file is missing", path, sha256)
                continue
            digest, size = _copy_hashed(path, dest)
            if digest == sha256:
                return path, digest, size
            log.warning("mirror file %s has sha256 %s, not %s as listed; not used", path, digest, sha256)
        dest.unlink(missing_ok=True)
        return None


# ---------------------------------------------------------------------------------------------------------------
# HTTP(S): one attempt, resuming the partial file


def _hash_prefix(part: Path) -> tuple[hashlib._Hash, int]:
    """The sha256 state and size of what a partial file already holds (fresh when there is none)."""
    h = hashlib.sha256()
    size = 0
    if part.is_file():
        with open(part, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
    return h, size


def _fetch(src: Source, part: Path, timeout_s: float) -> tuple[str, int]:
    """One download attempt into `part`, resuming it with a Range request. Returns (sha256, bytes) of the part.

    What arrived stays in `part` when the attempt fails, for the next attempt or the next run.
    """
    try:
        return _fetch_once(src, part, timeout_s)
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code == 429:
            raise _RetryableError(f"HTTP {err.code} {err.reason}") from err
        raise CollectError(f"source {src.name!r}: download of {src.url} failed: HTTP {err.code} {one_line(err.reason)}") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        # URLError wraps DNS and connection failures; TimeoutError and resets are OSErrors.
        raise _RetryableError(f"{type(err).__name__}: {one_line(getattr(err, 'reason', err))}") from err


def _fetch_once(src: Source, part: Path, timeout_s: float) -> tuple[str, int]:
    h, offset = _hash_prefix(part)
    if offset and h.hexdigest() == src.sha256:
        log.info("source %s: %s is already complete (%d bytes)", src.name, part, offset)
        return src.sha256, offset
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(src.url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # Range Not Satisfiable: the part is not a prefix the server knows (or is longer than the file).
        log.warning("source %s: the server refused to resume at byte %d (HTTP 416); restarting", src.name, offset)
        part.unlink()
        return _fetch_once(src, part, timeout_s)
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if resp.status == 206:
            match = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
            if match is None or int(match.group(1)) != offset:
                got = resp.headers.get("Content-Range")
                log.warning("source %s: asked for bytes=%d-, got Content-Range %r; restarting", src.name, offset, got)
                resp.close()
                part.unlink()
                return _fetch_once(src, part, timeout_s)
            total = int(match.group(3)) if match.group(3) != "*" else (offset + length if length is not None else None)
            mode = "ab"
            log.info("source %s: resuming %s at byte %d", src.name, src.url, offset)
        else:  # 200: the whole file, also from a server that ignores Range
            if offset:
                log.info("source %s: the server sent the whole file, not a range; restarting from zero", src.name)
            h, offset, total, mode = hashlib.sha256(), 0, length, "wb"
        part.parent.mkdir(parents=True, exist_ok=True)
        size = offset
        with open(part, mode) as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=src.name, leave=False,
            disable=not sys.stderr.isatty(),
        ) as bar:
            while block := resp.read(CHUNK):
                h.update(block)
                f.write(block)
                size += len(block)
                bar.update(len(block))
    if total is not None and size != total:
        raise _RetryableError(f"short read: {size} of {total} bytes")
    return h.hexdigest(), size
