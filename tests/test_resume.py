"""Exact resume of pretraining from training checkpoints (lmcore.pretrain, lmcore.training, lmcore.checkpoint).

The kill test runs this file as a child process: `python -m tests.test_resume <json args>`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcore.checkpoint import (
    CKPT_COMPLETE,
    CKPT_MODEL,
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    restore_rng,
)
from lmcore.config import ModelConfig, PretrainConfig
from lmcore.paths import SUMMARY, TRAIN_LOSS, VAL_LOSS, WEIGHTS
from lmcore.pretrain import pretrain
from tests.conftest import ROOT
from tests.test_training import VOCAB, micro_cfg, write_pattern_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
# summary keys that measure the machine, or say where the run started
TIMING = ("train_time_s", "tokens_per_s", "mfu", "peak_flops", "resumed_from_step")


@pytest.fixture
def tokens(tmp_path) -> Path:
    return write_pattern_tokens(tmp_path / "tokens")


def resume_cfg(**overrides) -> PretrainConfig:
    # dropout on: the resumed run must also continue torch's RNG stream where the checkpoint left it
    model = ModelConfig(vocab_size=VOCAB, context_length=16, n_embd=32, n_layer=2, n_head=2, dropout=0.1)
    return micro_cfg(**{"model": model, "max_steps": 40, "eval_interval": 8, "checkpoint_interval": 5, **overrides})


def train(cfg: PretrainConfig, tokens: Path, out: Path, ckpt: Path | None = None, resume: bool = False, tracker=None) -> dict:
    kwargs = {"tracker": tracker} if tracker is not None else {}
    return pretrain(cfg, tokens, out / "model", out / "reports", seed=3, checkpoint_dir=ckpt, resume=resume, **kwargs)


def assert_same_run(a: Path, b: Path, summary_a: dict, summary_b: dict) -> None:
    assert (a / "model" / WEIGHTS).read_bytes() == (b / "model" / WEIGHTS).read_bytes()  # bit for bit
    for name in (TRAIN_LOSS, VAL_LOSS):
        assert (a / "reports" / name).read_text() == (b / "reports" / name).read_text()
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING}  # noqa: E731
    assert strip(summary_a) == strip(summary_b)
    assert strip(json.loads((b / "reports" / SUMMARY).read_text())) == strip(summary_b)


def kill_after_checkpoint(module: str, args: dict, ckpt: Path, *, at_least: int, timeout_s: float = 120) -> int:
    """Run `python -m <module> <json args>` (a training run in a child process), SIGKILL it as soon as a
    checkpoint of step >= `at_least` is complete in `ckpt`; returns the step of the last complete checkpoint."""
    child = subprocess.Popen([sys.executable, "-m", module, json.dumps(args)], cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout_s
        while (latest := latest_checkpoint(ckpt)) is None or int(latest.name.split("-")[1]) < at_least:
            assert child.poll() is None, "the child finished before it could be killed"
            assert time.monotonic() < deadline, f"no checkpoint at step >= {at_least} within {timeout_s:.0f} s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return list_checkpoints(ckpt)[-1][0]


class _SlowTracker:
    """Sleeps after each step so that the parent can kill the child mid-run."""

    def log_metrics(self, metrics, step=None):
        if "train_loss" in metrics:
            time.sleep(0.05)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path, tokens):
    cfg = resume_cfg()
    reference = train(cfg, tokens, tmp_path / "reference")

    out, ckpt = tmp_path / "killed", tmp_path / "ckpt"
    args = {"cfg": cfg.model_dump(mode="json"), "tokens": str(tokens), "out": str(out), "ckpt": str(ckpt)}
    killed_at = kill_after_checkpoint("tests.test_resume", args, ckpt, at_least=10)
    assert 10 <= killed_at < 40 and not (out / "model").exists()

    resumed = train(cfg, tokens, out, ckpt, resume=True)
    assert resumed["resumed_from_step"] == killed_at and reference["resumed_from_step"] is None
    assert_same_run(tmp_path / "reference", out, reference, resumed)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"grad_accum_steps": 2, "batch_size": 4},
        {"precision": "bf16"},
        {"precision": "fp16"},  # the gradient scaler's state travels too
        {"early_stopping_patience": 2, "early_stopping_min_delta": 0.5},  # stops at step 32
    ],
    ids=["fp32", "accum", "bf16", "fp16", "early-stop"],
)
def test_resume_from_an_earlier_checkpoint_is_exact(tmp_path, tokens, options):
    cfg = resume_cfg(keep_checkpoints=10, peak_flops=1e12, **options)
    ckpt = tmp_path / "ckpt"
    full = train(cfg, tokens, tmp_path / "full", ckpt)
    assert full["stopped_early"] == ("early_stopping_patience" in options)
    steps = [s for s, _ in list_checkpoints(ckpt)]
    assert steps == list(range(5, full["steps"] + 1, 5))
    # go back to the middle checkpoint, as if the run had been killed just after writing it
    middle = steps[len(steps) // 2]
    for s, path in list_checkpoints(ckpt):
        if s > middle:
            shutil.rmtree(path)
    resumed = train(cfg, tokens, tmp_path / "resumed", ckpt, resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "resumed", full, resumed)


def test_resume_refuses_other_settings_and_names_them(tmp_path, tokens):
    ckpt = tmp_path / "ckpt"
    train(resume_cfg(max_steps=10), tokens, tmp_path / "a", ckpt)
    with pytest.raises(CheckpointError, match=r"pretrain\.lr: 0\.01 in the checkpoint, 0\.02 now; pretrain\.max_steps: 10 in the checkpoint, 20 now"):
        train(resume_cfg(max_steps=20, lr=2e-2), tokens, tmp_path / "b", ckpt, resume=True)
    with pytest.raises(CheckpointError, match=r"seed: 3 in the checkpoint, 4 now"):
        pretrain(resume_cfg(max_steps=10), tokens, tmp_path / "c" / "m", tmp_path / "c" / "r", seed=4, checkpoint_dir=ckpt, resume=True)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # how it runs and saves may change: threads, checkpoint cadence, the peak for MFU
    train(resume_cfg(max_steps=10, threads=1, checkpoint_interval=3, keep_checkpoints=4, peak_flops=1e12), tokens, tmp_path / "d", ckpt, resume=True)


def test_incomplete_checkpoints_are_never_read(tmp_path, tokens):
    ckpt = tmp_path / "ckpt"
    train(resume_cfg(max_steps=10, keep_checkpoints=3), tokens, tmp_path / "a", ckpt)
    assert [s for s, _ in list_checkpoints(ckpt)] == [5, 10]
    # a copy of step 10 as step 15 without its marker, one as step 20 with a truncated file, a temp folder
    no_marker, truncated = ckpt / "step-00000015", ckpt / "step-00000020"
    shutil.copytree(ckpt / "step-00000010", no_marker)
    (no_marker / CKPT_COMPLETE).unlink()
    shutil.copytree(ckpt / "step-00000010", truncated)
    with open(truncated / CKPT_MODEL, "r+b") as f:
        f.truncate(100)
    shutil.copytree(ckpt / "step-00000010", ckpt / ".step-00000025.tmp-1")
    assert latest_checkpoint(ckpt).name == "step-00000010"
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        load_training_checkpoint(truncated)


def test_keeps_the_last_k_and_a_fresh_start_clears_the_folder(tmp_path, tokens):
    ckpt = tmp_path / "ckpt"
    train(resume_cfg(max_steps=20, keep_checkpoints=2), tokens, tmp_path / "a", ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000015", "step-00000020"]
    (ckpt / ".step-00000099.tmp-1").mkdir()  # left by a killed writer
    train(resume_cfg(max_steps=3, checkpoint_interval=None), tokens, tmp_path / "b", ckpt)  # resume off
    assert list(ckpt.iterdir()) == []


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, tokens):
    cfg = resume_cfg(max_steps=10)
    a = train(cfg, tokens, tmp_path / "a")
    b = train(cfg, tokens, tmp_path / "b", tmp_path / "empty", resume=True)
    assert_same_run(tmp_path / "a", tmp_path / "b", a, b)


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state, tensors = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(json.loads(json.dumps(state)), tensors)  # the JSON part goes through a file
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


if __name__ == "__main__":  # the child of the kill test
    torch.set_num_threads(1)  # as the parent's one_thread fixture: the same float sums, bit for bit
    args = json.loads(sys.argv[1])
    cfg = PretrainConfig.model_validate(args["cfg"])
    train(cfg, Path(args["tokens"]), Path(args["out"]), Path(args["ckpt"]), tracker=_SlowTracker())
