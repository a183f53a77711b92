"""A stage reads only what it declares: the micro lifecycle's stage functions run with every file they open under
the project root recorded (tests/stage_reads.py, an audit hook), and each read must lie in the stage's declared deps,
its own outs or the local paths its params name. The failure names the stage and the path. Each summary has the
keys its stage types (`Summary`)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest

from lmcore import pipeline
from lmcore.config import load_params
from tests.conftest import MICRO, ROOT
from tests.test_pipeline import summary_keys

pytestmark = pytest.mark.slow  # the micro lifecycle's stages, in a process of their own (about 30 s)

# atomic_dir's and atomic writes' temporary names beside the final one: `.raw.k2j4x9q1.tmp` is data/raw in the making
TEMP = re.compile(r"(^|/)\.([^/]+?)\.(?:[a-z0-9_]{8}|partial|\d+)\.tmp(?=/|$)|(^|/)\.([^/]+?)\.partial(?=/|$)")
# content-addressed caches: a hit gives what a miss would compute from the declared inputs (lmcore.harness.cache,
# collect's resumable downloads)
CACHE = re.compile(r"(^|/)\.cache/")


def declared(path: str, places) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") or p.startswith(path.rstrip("/") + "/") for p in places)


def test_every_stage_reads_only_its_declared_deps_and_its_own_outs(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(MICRO.read_text())
    out = tmp_path / "opened.json"
    proc = subprocess.run([sys.executable, "-m", "tests.stage_reads", str(root), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    params = load_params(root / "params.yaml")
    recorded = json.loads(out.read_text())
    opened = recorded["opened"]
    assert {stage for stage, _, _ in opened} == set(pipeline.NAMES)
    stray = []
    for stage, path, mode in opened:
        spec = pipeline.get(stage)
        path = TEMP.sub(lambda m: (m[1] or m[3] or "") + (m[2] or m[4]), path)
        allowed = [*spec.outs, *(spec.deps if mode == "r" else ()), *spec.local_deps(params, root)]
        if not declared(path, allowed) and not CACHE.search(path):
            stray.append(f"{stage} {'reads' if mode == 'r' else 'writes'} {path}")
    assert not stray, "undeclared: " + "; ".join(sorted(set(stray)))
    # the check sees reads: pretrain read the tokens, and the raw manifest it declares
    assert ["pretrain", "data/raw/manifest.json", "r"] in opened

    # each summary has the keys its stage's `Summary` types (tests/test_pipeline.py runs the rows on those types)
    for stage, keys in recorded["summary_keys"].items():
        typed = importlib.import_module(pipeline.get(stage).module).Summary
        required, optional = summary_keys(typed)
        assert required <= set(keys), (stage, sorted(required - set(keys)))
        if getattr(typed, "__extra_items__", None) is None:  # train_tokenizer's also has a number per text measured
            assert set(keys) <= required | optional, (stage, sorted(set(keys) - required - optional))
