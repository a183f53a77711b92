"""The tokenize stage under prefect-dask's DaskTaskRunner, on a real local Dask cluster of two worker
processes, writes the same bytes as the default (process pool) runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmcore.config import TokenizeConfig
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


def test_dask_runner_matches_the_default_runner(tmp_path, clean_dir, prefect_harness):
    from tasks.tokenize import dask_task_runner, run_tokenize

    ranks = os.environ[RANKS_ENV]
    cfg = TokenizeConfig(ranks_file=ranks, shard_bytes=128 * 1024, workers=2)
    local = run_tokenize(cfg, clean_dir, tmp_path / "local", seed=9)

    dask_cfg = cfg.model_copy(update={"runner": "dask"})
    assert dask_task_runner(dask_cfg).cluster_kwargs == {
        "n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
    }
    on_dask = run_tokenize(dask_cfg, clean_dir, tmp_path / "dask", seed=9)  # a Prefect task per slice on Dask

    assert on_dask["run"] == {"encoded_slices": local["slices"], "reused_slices": 0, "runner": "dask"}
    assert local["slices"] >= 8
    assert folder_bytes(tmp_path / "dask") == folder_bytes(tmp_path / "local")
    assert json.loads((tmp_path / "dask" / MANIFEST).read_text())["shards"] == local["shards"]
