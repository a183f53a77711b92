"""The evaluation cache: hits skip the work, every key field counts, partial or corrupt entries are misses, and two
processes storing the same key leave one whole entry."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmcore.harness.cache import CONTENT, ENV, KEY_FIELDS, KEY_FILE, MARKER, EvalCache, cache_root, cached
from lmcore.harness.run import RESULTS, SAMPLES_DIR

REPO = Path(__file__).resolve().parents[2]
FIELDS = {
    "weights_sha256": "a" * 64,
    "task": "gsm8k",
    "task_version": "3",
    "sample_sha256": "b" * 64,
    "prompt_template": "chat:" + "c" * 64,
    "generation": {"max_gen_toks": 256, "until": ["Question:", "\n\n"], "do_sample": False, "temperature": 0.0},
    "scorer_version": "lm_eval 0.4.13 + lmcore 1",
}


def write_results(folder: Path, acc: float) -> None:
    """A results folder shaped as lmcore.harness.run writes it: results.json and samples/<task>.jsonl."""
    (folder / SAMPLES_DIR).mkdir(parents=True)
    (folder / RESULTS).write_text(json.dumps({"tasks": {"gsm8k": {"acc": acc}}}))
    (folder / SAMPLES_DIR / "gsm8k.jsonl").write_text("".join(json.dumps({"doc_id": i, "acc": acc}) + "\n" for i in range(3)))


def test_hit_runs_no_compute(tmp_path):
    cache, calls = EvalCache(tmp_path / "cache"), []

    def compute(out: Path) -> None:
        calls.append(out)
        write_results(out, 0.25)

    assert not cached(cache, FIELDS, compute, tmp_path / "run1")
    assert cached(cache, FIELDS, compute, tmp_path / "run2")
    assert len(calls) == 1
    assert json.loads((tmp_path / "run2" / RESULTS).read_text()) == {"tasks": {"gsm8k": {"acc": 0.25}}}
    samples = [(tmp_path / run / SAMPLES_DIR / "gsm8k.jsonl").read_text() for run in ("run1", "run2")]
    assert samples[0] == samples[1]
    key = cache.key(**FIELDS)
    described = json.loads((cache.root / key / KEY_FILE).read_text())
    assert described["key"] == key and described["fields"]["task"] == "gsm8k"


@pytest.mark.parametrize("field", KEY_FIELDS)
def test_every_field_changes_the_key(field):
    cache = EvalCache(Path("unused"))
    changed = dict(FIELDS)
    changed[field] = {**FIELDS["generation"], "max_gen_toks": 512} if field == "generation" else FIELDS[field] + "x"
    assert cache.key(**changed) != cache.key(**FIELDS)


def test_key_is_canonical_and_strict():
    cache = EvalCache(Path("unused"))
    reordered = {k: FIELDS[k] for k in reversed(KEY_FIELDS)}
    reordered["generation"] = {**dict(reversed(list(FIELDS["generation"].items()))), "temperature": 0}
    assert cache.key(**reordered) == cache.key(**FIELDS)  # field order, dict order and 0 vs 0.0 do not matter
    stops = {**FIELDS, "generation": {**FIELDS["generation"], "until": ["Question:"]}}
    assert cache.key(**stops) != cache.key(**FIELDS)
    with pytest.raises(ValueError, match="missing fields \\['task'\\]"):
        cache.key(**{k: v for k, v in FIELDS.items() if k != "task"})
    with pytest.raises(ValueError, match="unknown fields \\['limit'\\]"):
        cache.key(**FIELDS, limit=10)
    with pytest.raises(ValueError, match="batch_size"):
        cache.key(**{**FIELDS, "generation": {"batch_size": 8}})


def test_partial_and_corrupt_entries_are_misses(tmp_path, caplog):
    cache = EvalCache(tmp_path)
    key = cache.key(**FIELDS)
    src = tmp_path / "src"
    write_results(src, 0.5)
    stored = cache.put(key, src, FIELDS)
    assert cache.get(key) == stored

    (stored / SAMPLES_DIR / "gsm8k.jsonl").write_text("cut")  # a changed file
    with caplog.at_level(logging.WARNING, "lmcore.harness.cache"):
        assert cache.get(key) is None
    assert "does not match its sha256" in caplog.text

    (cache.root / key / MARKER).unlink()  # a writer that stopped before its marker
    caplog.clear()
    with caplog.at_level(logging.WARNING, "lmcore.harness.cache"):
        assert cache.get(key) is None
    assert "partial entry" in caplog.text

    # the next put replaces the broken entry
    assert cache.put(key, src, FIELDS) == stored and cache.get(key) == stored
    assert (stored / SAMPLES_DIR / "gsm8k.jsonl").read_text() == (src / SAMPLES_DIR / "gsm8k.jsonl").read_text()


def test_json_values_and_prune(tmp_path):
    cache = EvalCache(tmp_path)
    keys = [cache.key(**{**FIELDS, "task_version": str(v)}) for v in range(3)]
    assert cache.get_json(keys[0]) is None
    for i, key in enumerate(keys):
        cache.put_json(key, {"acc": i / 4}, FIELDS)
    assert cache.get_json(keys[0]) == {"acc": 0.0}  # used last: kept by prune
    (tmp_path / ("0" * 64)).mkdir()  # a partial entry, old enough to be stale
    assert cache.prune(2, stale_after_s=-1) == 2
    assert [cache.get_json(k) for k in keys] == [{"acc": 0.0}, None, {"acc": 0.5}]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([keys[0], keys[2]])


def test_cache_root(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert cache_root(tmp_path) == tmp_path / ".cache" / "eval"
    monkeypatch.setenv(ENV, str(tmp_path / "elsewhere"))
    assert cache_root(tmp_path) == tmp_path / "elsewhere"


WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from lmcore.harness.cache import EvalCache
    root, keys, src = Path(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
    cache = EvalCache(root / "cache")
    (root / f"ready-{src.name}").touch()
    while not (root / "go").exists():  # both start putting at once
        time.sleep(0.001)
    for key in keys:
        cache.put(key, src, {"writer": src.name})
    """
)


def test_concurrent_puts_leave_one_whole_entry(tmp_path):
    cache = EvalCache(tmp_path / "cache")
    keys = [cache.key(**{**FIELDS, "task_version": str(v)}) for v in range(20)]  # 20 races, one per key
    sources = []
    for name, acc in (("a", 0.1), ("b", 0.9)):
        write_results(tmp_path / name, acc)
        sources.append(tmp_path / name)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), json.dumps(keys), str(src)], cwd=REPO) for src in sources]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready-{src.name}").exists() for src in sources) and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    written = {json.loads((src / RESULTS).read_text())["tasks"]["gsm8k"]["acc"]: src for src in sources}
    for key in keys:
        stored = cache.get(key)
        assert stored is not None
        acc = json.loads((stored / RESULTS).read_text())["tasks"]["gsm8k"]["acc"]
        assert (stored / SAMPLES_DIR / "gsm8k.jsonl").read_text() == (written[acc] / SAMPLES_DIR / "gsm8k.jsonl").read_text()
        assert sorted(p.name for p in (cache.root / key).iterdir()) == sorted([CONTENT, KEY_FILE, MARKER])
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(keys)  # no temporary folder left behind
