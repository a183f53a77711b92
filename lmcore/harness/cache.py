"""The evaluation cache: a scored result is computed once per (weights, task, sample, prompt, generation, scorer).

    cache = EvalCache(cache_root(project_root))            # $LMCORE_EVAL_CACHE, else <project root>/.cache/eval
    fields = {"weights_sha256": sha, "task": "gsm8k", "task_version": "3", "sample_sha256": results["sample_sha256"],
              "prompt_template": "chat:" + template_sha, "generation": {"max_gen_toks": 256, "until": ["\\n\\n"],
              "do_sample": False}, "scorer_version": "lm_eval 0.4.13 + lmcore 1"}
    hit = cached(cache, fields, lambda out: run_benchmarks(model, enc, data, out, tasks=["gsm8k"]), out_dir)

    key = cache.key(**fields)        # sha256 of the canonical JSON of the fields
    folder = cache.get(key)          # the stored folder (results.json, samples/*.jsonl), or None
    cache.put(key, out_dir, fields)  # copy a finished folder in
    cache.put_json(key, {"acc": 0.5}, fields); cache.get_json(key)

The key is a sha256 of the canonical JSON (sorted keys, no spaces, integral floats as integers) of KEY_FIELDS and
CACHE_FORMAT. Every field is required and no other is accepted, so a typo cannot silently drop a field from the key.
The batch size is not a field and is refused inside `generation`: a score does not depend on it.

Layout under the root, one folder per key:

    <key>/key.json           the key and the fields that made it, in clear text, and when it was stored
    <key>/content/...        the stored folder (a results folder as lmcore.harness.run writes it, or value.json)
    <key>/complete.json      written last: the sha256 of every file above; an entry without it is partial
    .<key>.<random>.tmp/     an entry being built (`put`), renamed to <key>/ when whole

Writes are atomic: an entry is built in a temporary folder beside its final place, fsynced and renamed. A folder
cannot be renamed over a non-empty one, so of two writers of the same key the first rename wins and the second
discards its copy (a corrupt entry in the way is moved aside and replaced). A reader never sees half an entry: a
missing marker, a file that does not match its sha256 or an unreadable key.json is a miss, logged, never an error.

Size: an entry is what it stores, a results.json and per-item samples/*.jsonl (tens of kB for hundreds of items,
a few MB for all of MMLU), so thousands of entries fit in a few GB. `prune(max_entries)` keeps the most recently
used (each hit refreshes its marker's mtime) and removes stale temporary and partial folders.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lmcore.io import atomic_dir, fsync_dir, fsync_tree, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

ENV = "LMCORE_EVAL_CACHE"  # overrides the cache root
DEFAULT_DIR = ".cache/eval"  # relative to the project root
CACHE_FORMAT = 1  # part of every key: a layout change invalidates every entry
KEY_FIELDS = (
    "weights_sha256",  # sha256 of the weights file
    "task",  # gsm8k, ifeval, mmlu_anatomy, ...
    "task_version",  # the task config's version (lm-eval's task `version`)
    "sample_sha256",  # exactly which items (lmcore.harness.run.sample_sha256)
    "prompt_template",  # "plain", or "chat:<sha256 of the chat template text>"
    "generation",  # dict: max_gen_toks, stop strings, temperature / do_sample, ...; never the batch size
    "scorer_version",  # e.g. "lm_eval 0.4.13 + lmcore 1"
)
KEY_FILE = "key.json"
CONTENT = "content"
MARKER = "complete.json"
JSON_VALUE = "value.json"
STALE_AFTER_S = 3600.0  # prune removes temporary and partial folders older than this


def cache_root(project_root: Path) -> Path:
    """The cache root: $LMCORE_EVAL_CACHE when set, else <project_root>/.cache/eval."""
    return Path(os.environ.get(ENV) or Path(project_root) / DEFAULT_DIR)


def _canonical(value: Any, where: str) -> Any:
    """`value` with integral floats as ints (temperature 0 and 0.0 are one setting); ValueError for what JSON can't hold."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"eval cache key: {where} is {value}, which has no canonical JSON form")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"eval cache key: {where} has a key that is not a string")
        return {k: _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"eval cache key: {where} is a {type(value).__name__}, not a JSON value")


def check_key_fields(**fields: Any) -> dict[str, Any]:
    """The fields of a key checked and in canonical form: every KEY_FIELDS entry, nothing else.

    Raises ValueError naming a missing, unknown or empty field, or a batch size inside `generation`.
    """
    missing = [f for f in KEY_FIELDS if f not in fields]
    unknown = sorted(set(fields) - set(KEY_FIELDS))
    if missing or unknown:
        raise ValueError(f"eval cache key: missing fields {missing}, unknown fields {unknown} (expected {list(KEY_FIELDS)})")
    out = {f: _canonical(fields[f], f) for f in KEY_FIELDS}
    for f in KEY_FIELDS:
        if f == "generation":
            if not isinstance(out[f], dict):
                raise ValueError(f"eval cache key: generation must be a dict of settings, got {type(fields[f]).__name__}")
            if "batch_size" in out[f]:
                raise ValueError("eval cache key: generation.batch_size: leave the batch size out, scores do not depend on it")
        elif not isinstance(out[f], str) or not out[f]:
            raise ValueError(f"eval cache key: {f} must be a non-empty string, got {fields[f]!r}")
    return out


def key_of(fields: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of checked key fields and CACHE_FORMAT."""
    text = json.dumps({"cache_format": CACHE_FORMAT, **fields}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


class EvalCache:
    """Scored results on disk, one folder per key (see the module docstring for the layout and guarantees)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def key(self, **fields: Any) -> str:
        """The key of a scored result: every KEY_FIELDS entry is required (ValueError otherwise)."""
        return key_of(check_key_fields(**fields))

    def entry(self, key: str) -> Path:
        """The folder of `key`'s entry (which may not exist)."""
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"eval cache: {key!r} is not a key (64 lowercase hex digits; see EvalCache.key)")
        return self.root / key

    def get(self, key: str) -> Path | None:
        """The stored folder of `key`, or None on a miss (absent, partial or corrupt: the last two are logged).

        A hit refreshes the entry's mtime, which `prune` keeps the most recent by.
        """
        entry = self.entry(key)
        if not entry.is_dir():
            return None
        problem = self._problem(entry, key)
        if problem is not None:
            log.warning("eval cache: %s: %s; treated as a miss", entry, problem)
            return None
        try:
            os.utime(entry / MARKER)
        except OSError:  # a read-only cache still answers
            pass
        return entry / CONTENT

    def _problem(self, entry: Path, key: str) -> str | None:
        """What makes an entry unusable, or None when it is whole."""
        try:
            marker = read_json(entry / MARKER)
        except FileNotFoundError:
            return f"no {MARKER}: a partial entry (its writer stopped before finishing)"
        except (OSError, ValueError) as err:
            return f"unreadable {MARKER} ({type(err).__name__}: {err})"
        if not isinstance(marker, dict) or marker.get("key") != key or not isinstance(marker.get("files"), dict):
            return f"{MARKER} does not describe key {key}"
        for name, digest in marker["files"].items():
            path = entry / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256_file(path) != digest:
                return f"{name} does not match its sha256 (changed or corrupt)"
        if not (entry / CONTENT).is_dir():
            return f"no {CONTENT}/ folder"
        return None

    def put(self, key: str, folder: Path, describe: Mapping[str, Any]) -> Path:
        """Store a copy of `folder` under `key`; returns the stored folder.

        Args:
            key: from `key`.
            folder: a finished results folder (or any folder of files).
            describe: written to key.json in clear text (the key fields; more may be added).

        If another writer stored the key first, its entry is kept and this copy dropped.
        """
        entry = self.entry(key)
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"eval cache: {folder} is not a folder to store")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=self.root))
        try:
            shutil.copytree(folder, tmp / CONTENT)
            write_json(tmp / KEY_FILE, {"key": key, "fields": dict(describe), "stored": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            files = {name: sha256_file(tmp / name) for name in _files(tmp)}
            write_json(tmp / MARKER, {"key": key, "files": files})
            fsync_tree(tmp)
            self._install(tmp, entry, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; else the copy that lost or failed
        return entry / CONTENT

    def _install(self, tmp: Path, entry: Path, key: str) -> None:
        """Rename the finished `tmp` to `entry`, unless a whole entry is there already."""
        for _ in range(2):
            try:
                os.rename(tmp, entry)  # fails when entry is a non-empty folder: first writer wins
                fsync_dir(self.root)
                return
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            problem = self._problem(entry, key)
            if problem is None:
                return
            log.warning("eval cache: %s: %s; replaced", entry, problem)
            aside = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".old", dir=self.root))
            try:
                os.rename(entry, aside / "entry")
            except FileNotFoundError:  # another writer moved it first
                pass
            shutil.rmtree(aside, ignore_errors=True)
        log.warning("eval cache: %s: could not store (other writers kept replacing it)", entry)

    def put_json(self, key: str, value: Any, describe: Mapping[str, Any]) -> None:
        """Store a JSON value (content/value.json) under `key`."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".json.", suffix=".tmp", dir=self.root))
        try:
            write_json(tmp / JSON_VALUE, value)
            self.put(key, tmp, describe)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_json(self, key: str) -> Any | None:
        """The JSON value stored by `put_json`, or None on a miss."""
        folder = self.get(key)
        if folder is None or not (folder / JSON_VALUE).is_file():
            return None
        return read_json(folder / JSON_VALUE)

    def prune(self, max_entries: int, stale_after_s: float = STALE_AFTER_S) -> int:
        """Keep the `max_entries` most recently used entries; remove the others, and temporary or partial folders
        older than `stale_after_s` (younger ones may belong to a writer still at work). Returns how many went."""
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        if not self.root.is_dir():
            return 0
        now, whole, doomed = time.time(), [], []
        for path in self.root.iterdir():
            marker = path / MARKER
            if not path.name.startswith(".") and marker.is_file():
                whole.append((marker.stat().st_mtime, path))
            elif path.is_dir() and now - path.stat().st_mtime > stale_after_s:
                doomed.append(path)
        whole.sort(reverse=True)
        doomed += [path for _, path in whole[max_entries:]]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return len(doomed)


def cached(cache: EvalCache, key_fields: Mapping[str, Any], compute: Callable[[Path], None], out_dir: Path) -> bool:
    """Fill `out_dir` from the cache, or by `compute(out_dir)` and store the result. Returns True on a hit.

    On a hit `out_dir` is replaced whole (atomically) by the stored folder and `compute` is not called. On a miss
    (or a hit that cannot be copied, logged) `compute` writes `out_dir`; a failure to store it is logged, not raised.
    """
    fields = check_key_fields(**key_fields)
    key = key_of(fields)
    stored = cache.get(key)
    if stored is not None:
        try:
            with atomic_dir(out_dir) as tmp:
                shutil.copytree(stored, tmp, dirs_exist_ok=True)
            log.info("eval cache: hit %s for %s", key[:12], fields["task"])
            return True
        except OSError as err:  # the entry went (prune) or broke while it was copied: computed as a miss
            log.warning("eval cache: could not copy %s (%s: %s); computing it", stored, type(err).__name__, err)
    compute(Path(out_dir))
    try:
        cache.put(key, Path(out_dir), fields)
    except OSError as err:
        log.warning("eval cache: could not store %s (%s: %s); the result is in %s", key[:12], type(err).__name__, err, out_dir)
    return False
