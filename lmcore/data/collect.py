"""Collect stage: bring every configured source into one folder, pinned by sha256.

    manifest = collect(params.collect, Path("data/raw"), mirror=Path("../shared/data"))

A URL source is first looked up by checksum in the offline mirror (`LMCORE_MIRROR`, e.g.
../shared/data); only when the mirror lacks it is it downloaded, with retries, and verified. Local
`path` sources are copied and, when a sha256 is given, verified too. The output folder is written
atomically: a failure leaves no folder behind (or the previous one untouched).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from lmcore.config import CollectConfig, Source
from lmcore.io import atomic_dir, sha256_file, write_json
from lmcore.paths import MANIFEST

log = logging.getLogger(__name__)

# Retry delay is BACKOFF_S * 2**attempt: 0.5 s, 1 s, 2 s, ...
BACKOFF_S = 0.5
CHUNK = 1 << 16
SHA256SUMS = "SHA256SUMS"
DEFAULT_SUFFIX = ".txt"

# Values of a manifest entry's "origin".
ORIGIN_MIRROR = "mirror"
ORIGIN_DOWNLOAD = "download"
ORIGIN_LOCAL = "local"

_SUFFIX_RE = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


MIRROR_ENV = "LMCORE_MIRROR"


def mirror_from_env() -> Path | None:
    """The offline mirror folder named by $LMCORE_MIRROR, when it exists."""
    value = os.environ.get(MIRROR_ENV)
    return Path(value) if value and Path(value).is_dir() else None


class CollectError(RuntimeError):
    """A source that cannot be collected: missing, unreachable, or not matching its sha256."""


class _RetryableError(Exception):
    """A transient download failure (network error, 5xx, short read): worth another attempt."""


def collect(
    cfg: CollectConfig,
    out_dir: Path,
    mirror: Path | None = None,
    base_dir: Path | None = None,
    *,
    backoff_s: float = BACKOFF_S,
) -> dict:
    """Collect every source of `cfg` into `out_dir` and write its manifest.

    Args:
        cfg: the sources, download retries and timeout.
        out_dir: the stage folder; replaced whole on success, untouched on failure.
        mirror: an offline mirror folder searched by checksum before any download.
        base_dir: what relative `path` sources are resolved against (default: the current folder).
        backoff_s: base of the exponential delay between download attempts.

    Returns:
        The manifest written to `out_dir/manifest.json`: {"sources": [entry, ...]}.
    """
    out_dir = Path(out_dir)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    index = _MirrorIndex(Path(mirror)) if mirror is not None else None
    entries = []
    with atomic_dir(out_dir) as tmp:
        for src in cfg.sources:
            entry = _collect_one(src, tmp, cfg, index, base_dir, backoff_s)
            log.info(
                "collected %s from %s (%s, %d bytes)",
                src.name,
                entry.get("mirror_path") or entry["source"],
                entry["origin"],
                entry["bytes"],
            )
            entries.append(entry)
        manifest = {"sources": entries}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _collect_one(
    src: Source, dest_dir: Path, cfg: CollectConfig, index: _MirrorIndex | None, base_dir: Path, backoff_s: float
) -> dict:
    location = src.url if src.url is not None else src.path
    if location is None:  # pinned by sha256 alone: the mirror has it or nobody does
        return _collect_from_mirror_only(src, dest_dir, index)
    file_name = src.name + _suffix(location, is_url=src.url is not None)
    dest = dest_dir / file_name
    entry = {"name": src.name, "origin": None, "source": location}

    if src.path is not None:
        path = Path(src.path).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise CollectError(f"source {src.name!r}: file not found: {path} (path {src.path!r})")
        digest, size = _copy_hashed(path, dest)
        if src.sha256 is not None and digest != src.sha256:
            raise CollectError(
                f"source {src.name!r}: sha256 mismatch for {path}: expected {src.sha256}, got {digest}"
            )
        entry["origin"] = ORIGIN_LOCAL
    else:
        hit = index.copy(src.sha256, dest) if index is not None else None
        if hit is not None:
            entry["origin"] = ORIGIN_MIRROR
            entry["mirror_path"] = str(hit[0])
            digest, size = hit[1], hit[2]
        else:
            digest, size = _download(src, dest, cfg, backoff_s)
            entry["origin"] = ORIGIN_DOWNLOAD

    entry.update(file=file_name, sha256=digest, bytes=size, license=src.license)
    return entry


def _collect_from_mirror_only(src: Source, dest_dir: Path, index: _MirrorIndex | None) -> dict:
    """A source with no URL or path: copied out of the mirror by its sha256, named after the mirror's file."""
    tmp = dest_dir / f".{src.name}.part"
    hit = index.copy(src.sha256, tmp) if index is not None else None
    if hit is None:
        where = f"the mirror {index.root}" if index is not None else "any mirror (LMCORE_MIRROR is not set)"
        raise CollectError(
            f"source {src.name!r} has no url or path and sha256 {src.sha256} is not in {where}; "
            f"give it a 'url' (with that file's sha256) or a local 'path'"
        )
    mirror_path, digest, size = hit
    name = mirror_path.name
    suffixes = "".join(s for s in PurePosixPath(name).suffixes[-2:] if _SUFFIX_RE.match(s))
    file_name = src.name + (suffixes or DEFAULT_SUFFIX)
    os.replace(tmp, dest_dir / file_name)
    return {"name": src.name, "origin": ORIGIN_MIRROR, "source": f"sha256:{src.sha256}", "mirror_path": str(mirror_path),
            "file": file_name, "sha256": digest, "bytes": size, "license": src.license}


def _suffix(location: str, is_url: bool) -> str:
    name = PurePosixPath(urllib.parse.urlparse(location).path).name if is_url else Path(location).name
    suffix = PurePosixPath(name).suffix
    return suffix if _SUFFIX_RE.match(suffix) else DEFAULT_SUFFIX


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
            for lineno, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), 1):
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


def _download(src: Source, dest: Path, cfg: CollectConfig, backoff_s: float) -> tuple[str, int]:
    """Download `src.url` to `dest` with retries; verify its sha256. Returns (sha256, bytes)."""
    attempts = cfg.retries + 1
    for attempt in range(attempts):
        try:
            digest, size = _fetch(src, dest, cfg.timeout_s)
            break
        except _RetryableError as err:
            if attempt + 1 == attempts:
                raise CollectError(
                    f"source {src.name!r}: download of {src.url} failed after {attempts} attempt(s): {err}"
                ) from err
            delay = backoff_s * 2**attempt
            log.warning("source %s: %s; retrying in %.1f s (%d/%d)", src.name, err, delay, attempt + 1, cfg.retries)
            time.sleep(delay)
    if digest != src.sha256:
        dest.unlink(missing_ok=True)
        raise CollectError(
            f"source {src.name!r}: sha256 mismatch for {src.url}: expected {src.sha256}, got {digest}"
        )
    return digest, size


def _fetch(src: Source, dest: Path, timeout_s: float) -> tuple[str, int]:
    """One download attempt, streamed into a temporary file beside `dest` and renamed on completion."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        size = 0
        request = urllib.request.Request(src.url, headers={"User-Agent": "lmcore-collect"})
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(request, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=src.name, leave=False, disable=not sys.stderr.isatty()
            ) as bar:
                while block := resp.read(CHUNK):
                    h.update(block)
                    f.write(block)
                    size += len(block)
                    bar.update(len(block))
            if total is not None and size != total:
                raise _RetryableError(f"short read: {size} of {total} bytes")
        os.replace(tmp, dest)
        return h.hexdigest(), size
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code == 429:
            raise _RetryableError(f"HTTP {err.code} {err.reason}") from err
        raise CollectError(f"source {src.name!r}: download of {src.url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        # URLError wraps DNS and connection failures; TimeoutError and resets are OSErrors.
        raise _RetryableError(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from err
    finally:
        Path(tmp).unlink(missing_ok=True)

