"""The tokenize stage's slices as Prefect tasks on a real local Dask cluster of two worker processes (tasks.dask,
what `tokenize.runner: dask` gives the stage as its `ctx.map`) write the same bytes as its own process pool."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmcore.config import TokenizeConfig
from lmcore.data.tokenize import tokenize
from lmcore.paths import DOCUMENTS, MANIFEST
from lmcore.tokenizer import RANKS_ENV

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "corpus" / "tinyshakespeare.txt"


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def clean_dir(tmp_path) -> Path:
    clean = tmp_path / "clean"
    clean.mkdir()
    paragraphs = [p.strip() for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    with open(clean / DOCUMENTS, "w", encoding="utf-8") as f:
        for i, text in enumerate(paragraphs):
            f.write(json.dumps({"id": f"s/{i}", "source": "s", "text": text}) + "\n")
    return clean


@pytest.mark.slow  # a local Dask cluster (make test-all)
def test_dask_runner_matches_the_default_runner(tmp_path, clean_dir, prefect_harness):
    from tasks.dask import dask_map, dask_task_runner
    from tasks.runner import stage_context

    ranks = os.environ[RANKS_ENV]
    cfg = TokenizeConfig(ranks_file=ranks, shard_bytes=128 * 1024, workers=2)
    local = tokenize(cfg, clean_dir, tmp_path / "local", seed=9)

    assert dask_task_runner(None, 2).cluster_kwargs == {
        "n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
    }
    on_dask = tokenize(cfg, clean_dir, tmp_path / "dask", seed=9, map_jobs=dask_map(None, 2, "tokenize-item"))  # a task per slice

    assert on_dask["run"]["encoded_slices"] == local["slices"] and on_dask["run"]["reused_slices"] == 0
    assert local["slices"] >= 8
    assert folder_bytes(tmp_path / "dask") == folder_bytes(tmp_path / "local")
    assert json.loads((tmp_path / "dask" / MANIFEST).read_text())["shards"] == local["shards"]

    # the stage gets the Dask map exactly when its params say runner: dask
    from lmcore import pipeline
    from lmcore.config import load_params
    from tasks.context import RunContext

    stage = pipeline.get("tokenize")
    params = load_params(ROOT / "params.yaml")
    assert stage_context(RunContext(tmp_path, params, tracking=None), stage, None).map is None
    dask_params = load_params(ROOT / "params.yaml", overrides=["tokenize.runner=dask", "tokenize.workers=2"])
    assert callable(stage_context(RunContext(tmp_path, dask_params, tracking=None), stage, None).map)
