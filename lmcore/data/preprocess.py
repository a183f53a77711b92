"""Preprocess stage: raw source files -> cleaned, deduplicated documents.

    stats = preprocess(params.preprocess, Path("data/raw"), Path("data/clean"))

Each file listed in the collect manifest goes through, in order:

1. decode as UTF-8 (`decode_errors`: "error" stops naming the file, byte offset and line;
   "replace" substitutes U+FFFD and counts the substitutions);
2. clean: drop a leading byte-order mark, turn \\r\\n and \\r into \\n, Unicode-normalise
   (`normalize`: NFC, NFKC or none), strip trailing whitespace from every line, collapse runs of
   three or more newlines to two. Nothing else is touched (no tab or inner-space rewriting);
3. split into documents (`split`: the whole file, or blank-line separated paragraphs), each
   stripped of leading and trailing whitespace (a file with no text gives one empty document);
4. drop empty documents, documents shorter than `min_chars`, and (`dedup`) exact duplicates by
   sha256 of the cleaned text, keeping the first occurrence across all sources.

Every drop is counted in stats.json, per source and in total. The output folder holds
documents.jsonl and stats.json and is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from pathlib import Path

from lmcore.config import PreprocessConfig
from lmcore.io import atomic_dir, read_json, utf8_error, write_json
from lmcore.paths import DOCUMENTS, MANIFEST, STATS

log = logging.getLogger(__name__)

BOM = "\ufeff"
_REPLACEMENT_UTF8 = "\ufffd".encode()
_MANY_NEWLINES = re.compile(r"\n{3,}")

# Counters kept per source and in total, in the order they are reported.
COUNTERS = (
    "files",
    "bytes_in",  # raw file size
    "chars",  # characters after decoding, before cleaning
    "bom_removed",
    "replaced_chars",  # U+FFFD substituted for invalid UTF-8 (decode_errors="replace")
    "documents_split",
    "dropped_empty",
    "dropped_short",
    "dropped_duplicate",
    "documents_out",
    "chars_out",
)


class PreprocessError(RuntimeError):
    """Raw data that cannot be preprocessed: no manifest, a missing or undecodable file, nothing left."""


def preprocess(cfg: PreprocessConfig, raw_dir: Path, out_dir: Path) -> dict:
    """Clean and split the collected sources into documents.

    Args:
        cfg: normalisation, splitting, filtering and decoding options.
        raw_dir: the collect stage's folder (manifest.json and the source files).
        out_dir: the stage folder; replaced whole on success, untouched on failure.

    Returns:
        The stats written to `out_dir/stats.json`:
        {"config": {...}, "sources": {name: counts}, "total": counts}.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    manifest_path = raw_dir / MANIFEST
    if not manifest_path.is_file():
        raise PreprocessError(f"{manifest_path}: no collect manifest (run the collect stage first)")
    entries = read_json(manifest_path).get("sources", [])

    per_source: dict[str, dict[str, int]] = {}
    seen: set[bytes] = set()
    with atomic_dir(out_dir) as tmp:
        with open(tmp / DOCUMENTS, "w", encoding="utf-8", newline="\n") as out:
            for entry in entries:
                name = entry["name"]
                counts = per_source[name] = dict.fromkeys(COUNTERS, 0)
                path = raw_dir / entry["file"]
                if not path.is_file():
                    raise PreprocessError(f"source {name!r}: {path} is listed in {manifest_path} but missing")
                data = path.read_bytes()
                expected = entry.get("sha256")
                if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                    raise PreprocessError(
                        f"source {name!r}: {path} does not match the sha256 in {manifest_path}; re-run collect"
                    )
                counts["files"] = 1
                counts["bytes_in"] = len(data)
                text = _decode(data, path, cfg.decode_errors, counts)
                text = clean_text(text, cfg.normalize, counts)
                for doc in _split(text, cfg.split):
                    counts["documents_split"] += 1
                    if not doc:
                        counts["dropped_empty"] += 1
                        continue
                    if len(doc) < cfg.min_chars:
                        counts["dropped_short"] += 1
                        continue
                    if cfg.dedup:
                        key = hashlib.sha256(doc.encode("utf-8")).digest()
                        if key in seen:
                            counts["dropped_duplicate"] += 1
                            continue
                        seen.add(key)
                    record = {"id": f"{name}/{counts['documents_out']}", "source": name, "text": doc}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    counts["documents_out"] += 1
                    counts["chars_out"] += len(doc)
                log.info(
                    "%s: %d documents out of %d (%d empty, %d short, %d duplicate dropped)",
                    name,
                    counts["documents_out"],
                    counts["documents_split"],
                    counts["dropped_empty"],
                    counts["dropped_short"],
                    counts["dropped_duplicate"],
                )

        total = {k: sum(c[k] for c in per_source.values()) for k in COUNTERS}
        if total["documents_out"] == 0:
            raise PreprocessError(
                f"no documents left from sources {list(per_source)}: {total['documents_split']} split, "
                f"{total['dropped_empty']} empty, {total['dropped_short']} shorter than "
                f"min_chars={cfg.min_chars}, {total['dropped_duplicate']} duplicate"
            )
        stats = {"config": cfg.model_dump(mode="json"), "sources": per_source, "total": total}
        write_json(tmp / STATS, stats)
    return stats


def _decode(data: bytes, path: Path, errors: str, counts: dict[str, int]) -> str:
    if errors == "error":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PreprocessError(f"{utf8_error(path, data, err)}; set preprocess.decode_errors=replace to substitute") from None
    else:
        text = data.decode("utf-8", errors="replace")
        # A U+FFFD already in the file is valid UTF-8 and decodes to itself: not a replacement.
        counts["replaced_chars"] = text.count("\ufffd") - data.count(_REPLACEMENT_UTF8)
    counts["chars"] = len(text)
    return text


def clean_text(text: str, normalize: str = "NFC", counts: dict[str, int] | None = None) -> str:
    """BOM, line endings, Unicode normal form, trailing whitespace, blank-line runs (see module doc)."""
    if text.startswith(BOM):
        text = text[1:]
        if counts is not None:
            counts["bom_removed"] += 1
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if normalize != "none":
        text = unicodedata.normalize(normalize, text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text)


def _split(text: str, mode: str) -> list[str]:
    # Stripped first so that leading or trailing blank lines do not count as empty documents: an
    # empty document is an empty file. After clean_text a blank line is exactly "\n\n".
    text = text.strip()
    parts = [text] if mode == "file" else text.split("\n\n")
    return [p.strip() for p in parts]
