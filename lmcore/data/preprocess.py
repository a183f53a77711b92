"""Preprocess stage: collected files -> cleaned, filtered, deduplicated documents.

    stats = preprocess(params.preprocess, Path("data/raw"), Path("data/clean"))

Every file listed in the collect manifest is read as a stream (`lmcore.data.readers`: txt, md, jsonl,
json, csv, parquet; gzip or zstd) and each document goes through, in order (every step can be switched off):

1. read: invalid UTF-8 (`decode_errors`) and malformed records (`on_bad`, `max_bad_fraction`);
2. clean: Unicode normal form (`normalize`), whitespace (`whitespace`: byte-order mark, \\r\\n and \\r line
   endings, trailing spaces, runs of blank lines), `lowercase`;
3. Project Gutenberg header and footer (`strip_gutenberg`);
4. split text files into documents (`split`: whole files or blank-line paragraphs); records are one each;
5. PII (`pii`): e-mail addresses, phone numbers and IP addresses replaced by placeholders;
6. length (`min_chars`, `max_chars`, `max_line_chars`; empty documents always go), then Gopher quality
   (`gopher`) and Gopher repetition (`repetition`) rules (`lmcore.data.filters`);
7. exact duplicates (`dedup`, sha256 of the cleaned text), then near duplicates (`near_dedup`, MinHash LSH,
   `lmcore.data.dedup`); the first document of a group is kept.

The output folder is written atomically and holds documents.jsonl (one {"id": "<source>/<n>", "source",
"text"} per line, written as the documents pass), stats.json and filters.png (documents and bytes removed
per step). stats.json counts, per source and in total:

- files, empty_files, bytes_in, records, bad_records, replaced_chars, skipped_non_utf8 (see readers);
- documents_split / bytes_split: documents (and their UTF-8 bytes) that entered step 5;
- documents_out / bytes_out: documents written;
- steps: for each step, documents_removed and bytes_removed, plus the per-rule `reasons` of length, gopher
  and repetition (the first rule a document fails), PII `matches` per kind and Gutenberg `files_stripped`.

The counts add up: documents_split = documents_out + the documents removed by steps 5-7, and the same for
bytes (PII's bytes_removed is the net change from its placeholders). Read and Gutenberg removals happen
before the split. stats["metrics"] is the total as one flat {"name": number} mapping, for trackers.
"""

from __future__ import annotations

import json
import logging
import time
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from lmcore.config import PreprocessConfig
from lmcore.data.dedup import ExactDuplicates, NearDuplicates
from lmcore.data.filters import (
    GOPHER_RULES,
    LENGTH_RULES,
    PII_KINDS,
    GutenbergReport,
    PiiScrubber,
    gopher_quality,
    gopher_repetition,
    length_reason,
    repetition_rules,
    strip_gutenberg,
    strip_gutenberg_text,
    words_of,
)
from lmcore.data.formats import compression_of, detect
from lmcore.data.readers import FileReport, FileSpec, PreprocessError, ReadOptions, read_documents
from lmcore.io import atomic_dir, read_json, write_json
from lmcore.paths import DOCUMENTS, MANIFEST, STATS

__all__ = ["COUNTERS", "FILTERS_PLOT", "STEPS", "PreprocessError", "clean_lines", "clean_text", "flat_metrics", "preprocess"]

log = logging.getLogger(__name__)

FILTERS_PLOT = "filters.png"
BOM = "\ufeff"
TEXT_FORMATS = ("txt", "md")
NEAR_DEDUP_BATCH = 256  # documents hashed together (MinHash.bulk); decisions stay in document order

# Counters kept per source and in total, in the order they are reported.
COUNTERS = (
    "files",
    "empty_files",  # files with nothing in them (no text, no record)
    "bytes_in",  # bytes read: decompressed, or the file size for parquet
    "records",  # jsonl/json/csv/parquet records, bad ones included
    "bad_records",
    "replaced_chars",  # U+FFFD substituted for invalid UTF-8 (decode_errors=replace)
    "skipped_non_utf8",  # documents or records dropped for invalid UTF-8 (decode_errors=skip)
    "documents_split",  # documents entering PII scrubbing and the filters
    "bytes_split",
    "documents_out",
    "bytes_out",
)
# Steps in chain order; each reports documents_removed and bytes_removed.
STEPS = ("read", "gutenberg", "pii", "length", "gopher", "repetition", "dedup", "near_dedup")


# ------------------------------------------------------------------------------------------- cleaning


def clean_lines(lines: Iterable[str], normalize: str = "NFC", *, whitespace: bool = True, lowercase: bool = False) -> Iterator[str]:
    """Clean a text's lines (without their endings): see `clean_text`."""
    first = True
    blank = False
    for line in lines:
        if first:
            first = False
            if line.startswith(BOM):
                line = line[1:]
        if normalize != "none":
            line = unicodedata.normalize(normalize, line)
        if lowercase:
            line = line.lower()
        if whitespace:
            line = line.rstrip()
            if not line:
                if blank:
                    continue  # a run of blank lines becomes one
                blank = True
            else:
                blank = False
        yield line


def clean_text(text: str, normalize: str = "NFC", *, whitespace: bool = True, lowercase: bool = False) -> str:
    """Drop a leading byte-order mark, end lines with \\n (\\r\\n and \\r too), Unicode-normalise (NFC, NFKC or
    none) and optionally lowercase. With `whitespace`, also strip trailing whitespace from every line and
    collapse runs of blank lines to one. Nothing else is touched (no tab or inner-space rewriting).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(clean_lines(lines, normalize, whitespace=whitespace, lowercase=lowercase))


# ----------------------------------------------------------------------------------------------- counts


def _new_counts(repetition: tuple[str, ...]) -> dict:
    counts: dict = dict.fromkeys(COUNTERS, 0)
    steps = counts["steps"] = {step: {"documents_removed": 0, "bytes_removed": 0} for step in STEPS}
    steps["gutenberg"]["files_stripped"] = 0
    steps["pii"]["matches"] = dict.fromkeys(PII_KINDS, 0)
    steps["length"]["reasons"] = dict.fromkeys(LENGTH_RULES, 0)
    steps["gopher"]["reasons"] = dict.fromkeys(GOPHER_RULES, 0)
    steps["repetition"]["reasons"] = dict.fromkeys(repetition, 0)
    return counts


def _add(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict):
            _add(into[key], value)
        else:
            into[key] += value


def _flatten(tree: dict, prefix: str, out: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value


def flat_metrics(counts: dict) -> dict[str, int]:
    """One source's (or the total) counts as a flat mapping: "documents_out", "gopher.documents_removed",
    "gopher.reasons.min_words", "pii.matches.email", ... (steps are named without a "steps." prefix)."""
    out: dict[str, int] = {}
    _flatten({k: v for k, v in counts.items() if k != "steps"}, "", out)
    _flatten(counts["steps"], "", out)
    return out


def _nbytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- manifest


def _manifest_entries(manifest_path: Path) -> list[dict]:
    """The sources of a collect manifest, each a {"name": str, ...} object; PreprocessError naming the file otherwise."""
    try:
        manifest = read_json(manifest_path)
    except json.JSONDecodeError as err:
        raise PreprocessError(
            f"{manifest_path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}; re-run collect"
        ) from None
    except UnicodeDecodeError as err:
        raise PreprocessError(f"{manifest_path}: not UTF-8 text ({err.reason} at byte offset {err.start}); re-run collect") from None
    entries = manifest.get("sources", []) if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise PreprocessError(f"{manifest_path}: expected an object with a 'sources' list; re-run collect")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise PreprocessError(f"{manifest_path}: sources[{i}] is not an object with a 'name'; re-run collect")
    return entries


def file_specs(entry: dict, manifest_path: Path) -> list[FileSpec]:
    """The files of one manifest entry. An entry written before sources held several files (one "file"
    key, no "files") is read as a one-file source, with a logged notice."""
    text_field = entry.get("text_field") or "text"
    files = entry.get("files")
    if files is None:
        if "file" not in entry:
            raise PreprocessError(f"{manifest_path}: source {entry.get('name')!r} lists no 'files'; re-run collect")
        log.info("%s: source %r has a one-file entry (no 'files'): read as one file", manifest_path, entry.get("name"))
        files = [{"file": entry["file"], "sha256": entry.get("sha256"), "format": entry.get("format"),
                  "compression": compression_of(entry["file"])}]
    specs = []
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("file"), str):
            raise PreprocessError(f"{manifest_path}: source {entry.get('name')!r}: files[{i}] has no 'file'; re-run collect")
        fmt = f.get("format") or entry.get("format")
        if fmt is None:
            found = detect(f["file"])
            fmt = found.format if found is not None else "txt"  # a single file of unknown suffix is text
        compression = f.get("compression") if "compression" in f else compression_of(f["file"])
        specs.append(FileSpec(file=f["file"], format=fmt, compression=compression, sha256=f.get("sha256"), text_field=text_field))
    return specs


# ------------------------------------------------------------------------------------------------- chain


class _Chain:
    """Steps 5-7 of one document: PII, length, Gopher, repetition, exact dedup (near dedup is batched)."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.pii = PiiScrubber(cfg.pii)
        self.exact = ExactDuplicates() if cfg.dedup else None

    def __call__(self, text: str, nbytes: int, steps: dict) -> tuple[str | None, int]:
        """(the text, or None when a step removed it; its bytes)."""
        cfg = self.cfg
        if self.pii.enabled:
            scrubbed, matches = self.pii.scrub(text)
            if any(matches.values()):
                after = _nbytes(scrubbed)
                steps["pii"]["bytes_removed"] += nbytes - after
                text, nbytes = scrubbed, after
            for kind, n in matches.items():
                steps["pii"]["matches"][kind] += n
        reason = length_reason(text, cfg.min_chars, cfg.max_chars, cfg.max_line_chars)
        if reason is not None:
            return self._drop(steps, "length", reason, nbytes)
        words = None
        if cfg.gopher.enabled:
            words = words_of(text)
            reason = gopher_quality(text, cfg.gopher, words)
            if reason is not None:
                return self._drop(steps, "gopher", reason, nbytes)
        if cfg.repetition.enabled:
            reason = gopher_repetition(text, cfg.repetition, words)
            if reason is not None:
                return self._drop(steps, "repetition", reason, nbytes)
        if self.exact is not None and self.exact.seen_before(text):
            return self._drop(steps, "dedup", None, nbytes)
        return text, nbytes

    @staticmethod
    def _drop(steps: dict, step: str, reason: str | None, nbytes: int) -> tuple[None, int]:
        steps[step]["documents_removed"] += 1
        steps[step]["bytes_removed"] += nbytes
        if reason is not None:
            steps[step]["reasons"][reason] += 1
        return None, nbytes


class _Output:
    """Writes documents as they pass; with near dedup, in batches of NEAR_DEDUP_BATCH (in order)."""

    def __init__(self, f, per_source: dict[str, dict], near: NearDuplicates | None):
        self.f, self.per_source, self.near = f, per_source, near
        self.pending: list[tuple[str, str, int]] = []

    def add(self, source: str, text: str, nbytes: int) -> None:
        if self.near is None:
            self._write(source, text, nbytes)
            return
        self.pending.append((source, text, nbytes))
        if len(self.pending) >= NEAR_DEDUP_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        duplicate = self.near.seen_before_batch([text for _, text, _ in self.pending])
        for (source, text, nbytes), dup in zip(self.pending, duplicate):
            if dup:
                step = self.per_source[source]["steps"]["near_dedup"]
                step["documents_removed"] += 1
                step["bytes_removed"] += nbytes
            else:
                self._write(source, text, nbytes)
        self.pending = []

    def _write(self, source: str, text: str, nbytes: int) -> None:
        counts = self.per_source[source]
        record = {"id": f"{source}/{counts['documents_out']}", "source": source, "text": text}
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts["documents_out"] += 1
        counts["bytes_out"] += nbytes


# ------------------------------------------------------------------------------------------------- stage


def preprocess(cfg: PreprocessConfig, raw_dir: Path, out_dir: Path) -> dict:
    """Read, clean, filter and deduplicate the collected sources into documents.

    Args:
        cfg: the chain's options (see the module docstring and `PreprocessConfig`).
        raw_dir: the collect stage's folder (manifest.json and the files it lists).
        out_dir: the stage folder; replaced whole on success, untouched on failure.

    Returns:
        The stats written to `out_dir/stats.json`:
        {"config": {...}, "sources": {name: counts}, "total": counts, "metrics": {flat total}}.

    Raises:
        PreprocessError: no manifest, a missing, changed or unreadable file, too many bad records, or no
        document left.
    """
    started = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    manifest_path = raw_dir / MANIFEST
    if not manifest_path.is_file():
        raise PreprocessError(f"{manifest_path}: no collect manifest (run the collect stage first)")
    entries = _manifest_entries(manifest_path)

    repetition = repetition_rules(cfg.repetition)
    options = ReadOptions(split=cfg.split, decode_errors=cfg.decode_errors, on_bad=cfg.on_bad, max_bad_fraction=cfg.max_bad_fraction)
    chain = _Chain(cfg)
    near = NearDuplicates(cfg.near_dedup) if cfg.near_dedup.enabled else None
    per_source: dict[str, dict] = {}
    with atomic_dir(out_dir) as tmp:
        with open(tmp / DOCUMENTS, "w", encoding="utf-8", newline="\n") as f:
            output = _Output(f, per_source, near)
            for entry in entries:
                name = entry["name"]
                counts = per_source[name] = _new_counts(repetition)
                for spec in file_specs(entry, manifest_path):
                    _read_file(cfg, options, raw_dir, manifest_path, name, spec, counts, chain, output)
            output.flush()

        total = _new_counts(repetition)
        for counts in per_source.values():
            _add(total, counts)
        for name, counts in per_source.items():
            _log_source(name, counts)
        if total["documents_out"] == 0:
            raise PreprocessError(f"no documents left from sources {list(per_source)}: {_summary(total)}")
        stats = {
            "config": cfg.model_dump(mode="json"),
            "sources": per_source,
            "total": total,
            "metrics": flat_metrics(total),
        }
        write_json(tmp / STATS, stats)
        plot_filters(tmp / FILTERS_PLOT, total)
    # Timings stay out of the folder: the same input gives byte-identical outputs.
    log.info("preprocess: %d documents out in %.1f s", total["documents_out"], time.perf_counter() - started)
    return stats


def _read_file(cfg, options, raw_dir, manifest_path, name, spec: FileSpec, counts: dict, chain: _Chain, output: _Output) -> None:
    path = raw_dir / PurePosixPath(spec.file)
    display = f"{raw_dir.name}/{spec.file}"
    if not path.is_file():
        raise PreprocessError(f"source {name!r}: {display} is listed in {manifest_path} but missing; re-run collect")
    steps = counts["steps"]
    gutenberg = GutenbergReport()
    is_text = spec.format in TEXT_FORMATS
    clean = dict(normalize=cfg.normalize, whitespace=cfg.whitespace, lowercase=cfg.lowercase)

    def prepare_lines(lines: Iterator[str]) -> Iterator[str]:
        lines = clean_lines(lines, **clean)
        return strip_gutenberg(lines, gutenberg) if cfg.strip_gutenberg else lines

    report = FileReport()
    for text in read_documents(path, spec, options, report, display=display, prepare_lines=prepare_lines):
        if not is_text:
            text = clean_text(text, **clean)
            if cfg.strip_gutenberg:
                text = strip_gutenberg_text(text, gutenberg)
            text = text.strip()
        nbytes = _nbytes(text)
        counts["documents_split"] += 1
        counts["bytes_split"] += nbytes
        text, nbytes = chain(text, nbytes, steps)
        if text is not None:
            output.add(name, text, nbytes)

    counts["files"] += 1
    counts["empty_files"] += report.empty
    if report.empty:
        log.info("%s: empty file", display)
    for key in ("bytes_in", "records", "bad_records", "replaced_chars", "skipped_non_utf8"):
        counts[key] += getattr(report, key)
    steps["read"]["documents_removed"] += report.bad_records + report.skipped_non_utf8
    steps["read"]["bytes_removed"] += report.bad_bytes + report.skipped_bytes
    steps["gutenberg"]["files_stripped"] += gutenberg.files_stripped
    steps["gutenberg"]["bytes_removed"] += gutenberg.bytes_removed


def _summary(counts: dict) -> str:
    """"3 files (1 empty), 12 documents split; removed: length 9 (min_chars 9), gopher 3 (min_words 3)"."""
    parts = []
    for step, d in counts["steps"].items():
        if d["documents_removed"]:
            reasons = ", ".join(f"{k} {v}" for k, v in d.get("reasons", {}).items() if v)
            parts.append(f"{step} {d['documents_removed']}" + (f" ({reasons})" if reasons else ""))
    return (
        f"{counts['files']} files ({counts['empty_files']} empty), {counts['records']} records "
        f"({counts['bad_records']} bad, {counts['skipped_non_utf8']} skipped as non-UTF-8), "
        f"{counts['documents_split']} documents split; removed: {', '.join(parts) or 'none'}"
    )


def _log_source(name: str, counts: dict) -> None:
    log.info("%s: %d documents (%d bytes) out of %d split; %s", name, counts["documents_out"], counts["bytes_out"],
             counts["documents_split"], _summary(counts))


# -------------------------------------------------------------------------------------------------- plot


def plot_filters(path: Path, counts: dict) -> None:
    """Documents and bytes removed per step, as a PNG at `path` (inside an atomic_dir)."""
    # Figure without pyplot: no global backend switch, renders with Agg.
    from matplotlib.figure import Figure

    steps = list(counts["steps"])
    docs = [counts["steps"][s]["documents_removed"] for s in steps]
    nbytes = [counts["steps"][s]["bytes_removed"] for s in steps]
    fig = Figure(figsize=(9, 4), dpi=100)
    ax_docs, ax_bytes = fig.subplots(1, 2, sharey=True)
    for ax, values, label in ((ax_docs, docs, "documents removed"), (ax_bytes, nbytes, "bytes removed")):
        bars = ax.barh(steps, values, color="tab:red" if label.startswith("doc") else "tab:blue", alpha=0.8)
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=7, padding=2)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.25)
    ax_docs.invert_yaxis()  # chain order, top to bottom
    fig.suptitle(
        f"preprocess: {counts['documents_out']:,} of {counts['documents_split']:,} documents kept, "
        f"{counts['bytes_out']:,} of {counts['bytes_split']:,} bytes",
        fontsize=10,
    )
    fig.tight_layout()
    with open(path, "wb") as f:  # inside an atomic_dir; fsynced with the folder
        fig.savefig(f, format="png")
