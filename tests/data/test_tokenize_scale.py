"""Tokenize at scale: resume after SIGKILL, bounded memory as the input grows, fsspec URLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest

from lmcore.config import TokenizeConfig
from lmcore.data.loader import TokenDataset
from lmcore.data.tokenize import PROGRESS, tokenize
from lmcore.io import read_json
from lmcore.paths import DOCUMENTS, MANIFEST
from lmcore.tokenizer import RANKS_ENV

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "corpus" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def ranks_file() -> str:
    return os.environ.get(RANKS_ENV) or str(ROOT.parent / "shared" / "tokenizers" / "gpt2.tiktoken")


def write_corpus(clean: Path, megabytes: float) -> Path:
    """Shakespeare paragraphs, each copy marked, as documents.jsonl of about `megabytes` MB."""
    paragraphs = [p.strip() for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    clean.mkdir(parents=True, exist_ok=True)
    size, i = 0, 0
    with open(clean / DOCUMENTS, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            text = f"{paragraphs[i % len(paragraphs)]} [{i // len(paragraphs)}]"
            line = json.dumps({"id": f"s/{i}", "source": "s", "text": text}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    return clean


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


SCRIPT = """
import sys
from lmcore.config import TokenizeConfig
from lmcore.data.tokenize import tokenize

if __name__ == "__main__":
    clean, out, ranks, shard_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    manifest = tokenize(TokenizeConfig(ranks_file=ranks, shard_bytes=shard_bytes), clean, out, seed=5, workers=2)
    import resource
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run_script(tmp_path: Path, *args: str, **popen) -> subprocess.Popen:
    script = tmp_path / "run_tokenize.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, **popen)


@pytest.mark.slow  # a killed process and a second run (make test-all)
def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, ranks_file):
    clean = write_corpus(tmp_path / "clean", 12)
    shard_bytes = 192 * 1024  # ~64 slices
    out = tmp_path / "tokens"
    work = tmp_path / ".tokens.partial"
    proc = run_script(tmp_path, clean, out, ranks_file, shard_bytes, start_new_session=True,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = list((work / PROGRESS).glob("*.json")) if (work / PROGRESS).is_dir() else []
            if len(done) >= 6 or proc.poll() is not None:
                break
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its pool workers, mid-flight
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()  # nothing half-written where readers look
    records = sorted((work / PROGRESS).glob("*.json"))
    n_slices = len({json.loads(r.read_text())["index"] for r in records})
    assert 6 <= n_slices < 60

    # Damage one finished shard: the checksum must catch it and the slice be encoded again.
    victim = json.loads(records[0].read_text())["shards"][0]["file"]
    with open(work / victim, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))

    cfg = TokenizeConfig(ranks_file=ranks_file, shard_bytes=shard_bytes)
    resumed = tokenize(cfg, clean, out, seed=5, workers=2)
    assert resumed["run"]["reused_slices"] == n_slices - 1
    assert resumed["run"]["encoded_slices"] == resumed["slices"] - n_slices + 1
    assert not work.exists() and not (out / PROGRESS).exists()

    fresh = tokenize(cfg, clean, tmp_path / "fresh", seed=5, workers=2)
    assert fresh["run"]["reused_slices"] == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "fresh")


@pytest.mark.slow  # tokenizes ten times the input (make test-all)
def test_peak_memory_stays_flat_when_the_input_grows_tenfold(tmp_path, ranks_file):
    peaks = {}
    for mb in (3, 30):
        clean = write_corpus(tmp_path / f"clean-{mb}", mb)
        proc = run_script(tmp_path, clean, tmp_path / f"tokens-{mb}", ranks_file, 1 << 20,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        self_kb, children_kb = map(int, stdout.split()[-2:])
        peaks[mb] = (self_kb, children_kb)
        manifest = read_json(tmp_path / f"tokens-{mb}" / MANIFEST)
        assert manifest["slices"] >= 0.9 * mb  # 1 MiB slices
    (small_self, small_child), (big_self, big_child) = peaks[3], peaks[30]
    print("peak RSS kB (self, worker):", peaks)
    # Ten times the input (30 MB: holding its text or its tokens would add 60+ MB): the coordinator and
    # each worker peak within 5% + 8 MB of the small run.
    assert big_self <= small_self * 1.05 + 8_000, peaks
    assert big_child <= small_child * 1.05 + 8_000, peaks


def test_fsspec_urls_in_and_out(tmp_path, ranks_file):
    clean = write_corpus(tmp_path / "clean", 0.3)
    cfg = TokenizeConfig(ranks_file=ranks_file, shard_bytes=64 * 1024)
    plain = tokenize(cfg, clean, tmp_path / "plain", seed=3, workers=1)
    # file:// URLs, in a pool of workers.
    by_url = tokenize(cfg, f"file://{clean}", f"file://{tmp_path / 'url'}", seed=3, workers=2)
    assert folder_bytes(tmp_path / "url") == folder_bytes(tmp_path / "plain")
    # A filesystem that is not local at all: written in place, manifest last, read back by the loader.
    fs = fsspec.filesystem("memory")
    fs.pipe("/lmcore-test/clean/" + DOCUMENTS, (clean / DOCUMENTS).read_bytes())
    in_memory = tokenize(cfg, "memory://lmcore-test/clean", "memory://lmcore-test/tokens", seed=3, workers=1)
    for s in plain["shards"]:
        assert fs.cat_file(f"/lmcore-test/tokens/{s['file']}") == (tmp_path / "plain" / s["file"]).read_bytes()
    assert json.loads(fs.cat_file(f"/lmcore-test/tokens/{MANIFEST}")) == {k: v for k, v in plain.items() if k != "run"}
    assert not fs.exists(f"/lmcore-test/tokens/{PROGRESS}") or not fs.ls(f"/lmcore-test/tokens/{PROGRESS}")
    data = TokenDataset("memory://lmcore-test/tokens", "train")
    assert data.n_tokens == plain["splits"]["train"]["tokens"] == by_url["splits"]["train"]["tokens"] == in_memory["splits"]["train"]["tokens"]
    fs.rm("/lmcore-test", recursive=True)
