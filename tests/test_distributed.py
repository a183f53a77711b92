"""Data-parallel pretraining under torchrun on 2 CPU processes (gloo): DDP against one process, FSDP smoke test.

Tolerance: the 2-process run and the 1-process reference see the same windows at every step (rank r's
micro-batch j of step s is the loader's global batch (s * A + j) * W + r, so W=2 ranks with A=1 cover what
W=1 with A=2 covers) from the same initial weights; they differ only in the order of float additions (an
all-reduce averages the ranks' gradients where one process sums its two micro-batches). That is float32
rounding, ~1e-7 relative per step; over 30 AdamW steps we allow 1e-5 on each logged loss (6 decimals in
the CSVs), 100x below the gap to a run on other windows (the negative control, > 1e-3).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmcore.checkpoint import list_checkpoints, load_model
from lmcore.paths import TRAIN_LOSS, VAL_LOSS, WEIGHTS, Layout
from lmcore.pretrain import PRETRAIN_CHECKPOINTS, pretrain
from tests.conftest import MICRO, ROOT
from tests.test_training import micro_cfg, write_pattern_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5
SETTINGS = dict(batch_size=4, max_steps=30, peak_flops=1e12)  # on top of test_training's micro_cfg


@pytest.fixture
def project(tmp_path) -> Path:
    """A project root with data/tokens (a learnable token cycle) and a params file with a micro pretrain section."""
    write_pattern_tokens(Layout(tmp_path).tokens)
    params = yaml.safe_load(MICRO.read_text())
    params["pretrain"] = micro_cfg(**SETTINGS).model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def torchrun(root: Path, *overrides: str, nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lmcore.pretrain",
           "--params", str(root / "params.yaml"), "--root", str(root)]
    for ov in overrides:
        cmd += ["--set", ov]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(reports: Path, name: str) -> list[tuple[int, float]]:
    with open(reports / name, newline="") as f:
        return [(int(r["step"]), float(next(v for k, v in r.items() if k.endswith("loss")))) for r in csv.DictReader(f)]


def max_gap(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    assert [s for s, _ in a] == [s for s, _ in b]
    return max(abs(x - y) for (_, x), (_, y) in zip(a, b))


def single_process(root: Path, name: str, **overrides) -> Path:
    cfg = micro_cfg(**{**SETTINGS, **overrides})
    out = root / name
    pretrain(cfg, Layout(root).tokens, out / "model", out / "reports", seed=1337)  # the micro profile's seed
    return out


@pytest.mark.slow  # two torchrun processes, as the other tests here (make test-all)
def test_ddp_on_two_processes_matches_one_process_at_equal_global_batch(project):
    torchrun(project)  # 2 ranks x batch 4: global batch 8
    layout = Layout(project)
    reference = single_process(project, "single", grad_accum_steps=2)  # 1 rank x 2 micro-batches of 4

    for name in (TRAIN_LOSS, VAL_LOSS):
        assert max_gap(losses(layout.pretrain_reports, name), losses(reference / "reports", name)) <= TOL
    ddp, single = load_model(layout.pretrained), load_model(reference / "model")
    for (n, a), (_, b) in zip(ddp.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)
    # rank 0 alone wrote: one model folder, no temporary folders left beside it
    assert sorted(p.name for p in layout.pretrained.parent.iterdir()) == ["base"]

    # negative control: batches of 8 other windows give another trajectory, far outside the tolerance
    other = single_process(project, "other", batch_size=8)
    assert max_gap(losses(layout.pretrain_reports, TRAIN_LOSS), losses(other / "reports", TRAIN_LOSS)) > 100 * TOL


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_checkpoints_and_resumes(project):
    layout = Layout(project)
    torchrun(project, "pretrain.distributed=fsdp", "pretrain.checkpoint_interval=10", "pretrain.keep_checkpoints=3")
    full = layout.pretrained.joinpath(WEIGHTS).read_bytes()
    reference = single_process(project, "single", grad_accum_steps=2)
    assert max_gap(losses(layout.pretrain_reports, TRAIN_LOSS), losses(reference / "reports", TRAIN_LOSS)) <= TOL
    ckpts = project / PRETRAIN_CHECKPOINTS
    assert [s for s, _ in list_checkpoints(ckpts)] == [10, 20, 30]

    # as if killed after step 10: resume on 2 FSDP ranks from the gathered (full) checkpoint
    for _, path in list_checkpoints(ckpts)[1:]:
        shutil.rmtree(path)
    torchrun(project, "pretrain.distributed=fsdp", "pretrain.checkpoint_interval=10", "pretrain.resume=true")
    assert layout.pretrained.joinpath(WEIGHTS).read_bytes() == full


def test_entry_runs_alone_without_torchrun(project):
    from lmcore.launch import main

    summary = main(["--params", str(project / "params.yaml"), "--root", str(project), "--set", "pretrain.max_steps=5"])
    assert summary["world_size"] == 1 and summary["steps"] == 5
    assert load_model(Layout(project).pretrained).config.n_embd == 32


@pytest.mark.slow
def test_tracked_entry_under_torchrun_logs_to_mlflow_and_registers(project):
    import os

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flows.torchrun",
           "--params", str(project / "params.yaml"), "--root", str(project)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri, registry_uri=uri)
    (version,) = client.search_model_versions("name = 'lmcore-base'")
    run = client.get_run(version.run_id)
    assert run.data.tags["lmcore.launcher"] == "torchrun" and run.data.metrics["world_size"] == 2
    for key in ("train_loss", "tokens_per_s", "mfu"):  # per step (the task also logs the run's mean at step 0)
        assert [m.step for m in client.get_metric_history(run.info.run_id, key) if m.step > 0] == list(range(1, 31))
