"""Raw file formats and compression, named by suffix: what collect keeps and preprocess knows how to read.

    detect("wiki/part-0001.jsonl.zst")  # FileFormat(format="jsonl", compression="zstd")
    with open_binary(path) as f: ...    # the decompressed bytes, streamed

Formats: txt, md (plain text), jsonl, json, csv, parquet. Compression: gzip (.gz) and zstd (.zst,
.zstd). A file with another suffix has no known format (`detect` returns None): a folder or glob
source leaves it out and lists it; a single-file source keeps it and reads it as text.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

FORMAT_SUFFIXES = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "md",
    ".markdown": "md",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# Archives are extracted by collect (`extract: true`), never read as documents.
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")


@dataclass(frozen=True)
class FileFormat:
    format: str
    compression: str | None = None


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def detect(path: str | Path) -> FileFormat | None:
    """The format and compression named by the file's suffixes, or None when the format is unknown."""
    name = Path(path).name.lower()
    if is_archive(name):
        return None
    compression = None
    for suffix, kind in COMPRESSION_SUFFIXES.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    fmt = FORMAT_SUFFIXES.get(Path(name).suffix)
    if fmt is None:
        return None
    if fmt == "parquet" and compression is not None:
        return None  # parquet compresses inside the file
    return FileFormat(fmt, compression)


def compression_of(path: str | Path) -> str | None:
    name = Path(path).name.lower()
    return next((kind for suffix, kind in COMPRESSION_SUFFIXES.items() if name.endswith(suffix)), None)


def open_binary(source: str | Path | BinaryIO, compression: str | None = None) -> BinaryIO:
    """A buffered, decompressed (gzip or zstd) stream of a path or of an open binary file, in constant memory.

    Closing the result closes a file it opened; an open file passed in is left for the caller to close.
    """
    if compression not in (None, "gzip", "zstd"):
        raise ValueError(f"{source}: unknown compression {compression!r}")
    if isinstance(source, (str, Path)):
        if compression is None:
            return open(source, "rb")
        if compression == "gzip":
            return gzip.open(source, "rb")
        raw, owned = open(source, "rb"), True
    else:
        raw, owned = source, False
        if compression is None:
            return io.BufferedReader(raw, 1 << 20)
        if compression == "gzip":
            return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb")
    import zstandard

    # read_across_frames: files made by concatenating zstd frames (as `zstd` and pzstd write) read whole.
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=owned), 1 << 20)
