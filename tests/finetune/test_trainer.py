"""The shared fine-tuning loop (lmcore.finetune.trainer): precision, gradient accumulation over a stream of
shuffled batches, training checkpoints and exact resume, on a micro model and tiny data made here.

The kill test runs this file as a child process: `python -m tests.finetune.test_trainer <json args>`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import CheckpointError, list_checkpoints, load_model, save_model
from lmcore.config import ClassifierConfig, DpoConfig, InstructConfig, LoraConfig, ModelConfig
from lmcore.finetune.classifier import finetune_classifier
from lmcore.finetune.dpo import train_dpo
from lmcore.finetune.instruct import finetune_instruct
from lmcore.finetune.trainer import EpochBatches, batches, total_steps
from lmcore.model import GPT
from lmcore.paths import ADAPTER, METRICS, TEST_RESPONSES, TRAIN_LOSS, VAL_LOSS, WEIGHTS
from lmcore.tracking import ListTracker
from tests.test_resume import kill_after_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
TINY = dict(max_length=64, batch_size=3, epochs=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=4, eval_batches=1,
            device="cpu", max_new_tokens=4, max_test_generations=1)


def write_jsonl_splits(out: Path, rows: list[dict], n_val: int = 4, n_test: int = 2) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    parts = {"val": rows[:n_val], "test": rows[n_val : n_val + n_test], "train": rows[n_val + n_test :]}
    for name, part in parts.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return out


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, Path]:
    """20 train, 4 val, 2 test examples per stage: instructions to repeat a colour, preferences, labelled texts."""
    root = tmp_path_factory.mktemp("tiny-splits")
    colors = [COLORS[i % len(COLORS)] for i in range(26)]
    instruct = [{"instruction": f"Say the colour {c} twice.", "input": "", "output": f"{c} {c}"} for c in colors]
    dpo = [{"instruction": f"Say the colour {c}.", "input": "", "chosen": c, "rejected": COLORS[(COLORS.index(c) + 1) % 8]} for c in colors]
    texts = [{"text": f"a {c} thing" if i % 2 else f"win cash now {c}!!!", "label": i % 2} for i, c in enumerate(colors)]
    return {name: write_jsonl_splits(root / name, rows) for name, rows in (("instruct", instruct), ("dpo", dpo), ("classifier", texts))}


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory) -> Path:
    """A random micro GPT with the GPT-2 vocabulary and dropout on: resume must continue the dropout masks."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=64, n_embd=32, n_layer=2, n_head=2, dropout=0.1))
    out = tmp_path_factory.mktemp("dropout-base")
    save_model(model, out, extra={"tokenizer": "gpt2"})
    return out


def instruct_cfg(**overrides) -> InstructConfig:
    return InstructConfig(**{**TINY, **overrides})


def run_instruct(cfg, base: Path, splits_dir: Path, out: Path, enc, ckpt: Path | None = None, tracker=None) -> dict:
    kwargs = {"tracker": tracker} if tracker is not None else {}
    return finetune_instruct(cfg, base, splits_dir, out / "model", out / "reports", seed=5, enc=enc, checkpoint_dir=ckpt, **kwargs)


def assert_same_run(a: Path, b: Path, summary_a: dict, summary_b: dict) -> None:
    assert (a / "model" / WEIGHTS).read_bytes() == (b / "model" / WEIGHTS).read_bytes()  # bit for bit
    if (a / "model" / ADAPTER).exists():
        assert (a / "model" / ADAPTER).read_bytes() == (b / "model" / ADAPTER).read_bytes()
    for name in (TRAIN_LOSS, VAL_LOSS, METRICS):
        assert (a / "reports" / name).read_text() == (b / "reports" / name).read_text(), name
    strip = lambda s: {k: v for k, v in s.items() if k != "train_time_s"}  # noqa: E731
    assert strip(summary_a) == strip(summary_b)


def test_epoch_stream_continues_the_old_epoch_loop_and_resumes_anywhere():
    items = list(range(10))  # 4 batches per epoch at batch_size 3, the last of 1
    generator = torch.Generator().manual_seed(7)
    expected = [b for _ in range(3) for b in batches(items, 3, generator)]  # the loop fit used to run, epoch by epoch
    stream = EpochBatches(items, 3, seed=7)
    assert [stream.next_batch() for _ in range(12)] == expected
    for k in (0, 3, 4, 5, 9):  # mid-epoch, last batch of an epoch, epoch boundaries
        stream = EpochBatches(items, 3, seed=7)
        for _ in range(k):
            stream.next_batch()
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = EpochBatches(items, 3, seed=7)
        resumed.load_state_dict(state)
        assert [resumed.next_batch() for _ in range(12 - k)] == expected[k:], k
    with pytest.raises(ValueError, match=r"fingerprint=.*\(saved\) vs"):
        EpochBatches(list(range(1, 11)), 3, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed=7 \(saved\) vs 8 \(now\)"):
        EpochBatches(items, 3, seed=8).load_state_dict(state)


def test_total_steps_count_accumulated_batches():
    cfg = InstructConfig(batch_size=3, epochs=4)  # 10 items: 4 batches per epoch, 16 in all
    assert total_steps(cfg, 10) == 16
    assert total_steps(cfg.model_copy(update={"grad_accum_steps": 3}), 10) == 6  # ceil(16 / 3)
    assert total_steps(cfg.model_copy(update={"grad_accum_steps": 3, "max_steps": 4}), 10) == 4


@pytest.mark.parametrize("options", [{"precision": "bf16"}, {"grad_accum_steps": 2}], ids=["bf16", "accum"])
def test_precision_and_grad_accumulation_train(splits, base_model_dir, enc, tmp_path, options):
    tracker = ListTracker()
    cfg = instruct_cfg(epochs=6, max_test_generations=0, **options)  # 20 items: 7 batches per epoch
    summary = run_instruct(cfg, base_model_dir, splits["instruct"], tmp_path, enc, tracker=tracker)
    steps = -(-6 * 7 // options.get("grad_accum_steps", 1))
    assert summary["steps"] == steps
    assert summary["final_val_loss"] < summary["first_val_loss"] - 2.0, summary  # from ~log(50257) = 10.8
    train = [(s, m) for s, m in tracker.records if "train_loss" in m]
    assert [s for s, _ in train] == list(range(1, steps + 1))
    assert all(m.keys() == {"train_loss", "lr", "grad_norm", "step_time_s"} and m["step_time_s"] > 0 for _, m in train)
    evals = [(s, m) for s, m in tracker.records if "val_loss" in m]
    assert [s for s, _ in evals] == sorted({*range(0, steps, 4), steps}) and all(m["val_time_s"] > 0 for _, m in evals)
    assert (tmp_path / "reports" / TRAIN_LOSS).read_text().startswith("step,train_loss,lr,grad_norm\n")


class _SlowTracker:
    """Sleeps after each step so that the parent can kill the child mid-run."""

    def log_metrics(self, metrics, step=None):
        if "train_loss" in metrics:
            time.sleep(0.2)


def kill_cfg() -> InstructConfig:
    # LoRA with dropout on a model with dropout, 2 batches per step across epoch ends (7 batches per epoch)
    lora = LoraConfig(enabled=True, rank=2, alpha=4, dropout=0.1)
    return instruct_cfg(lora=lora, grad_accum_steps=2, checkpoint_interval=3, keep_checkpoints=3)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(splits, dropout_model_dir, enc, tmp_path):
    cfg = kill_cfg()
    reference = run_instruct(cfg, dropout_model_dir, splits["instruct"], tmp_path / "reference", enc)
    assert reference["steps"] == 14  # ceil(4 epochs x 7 batches / 2)

    out, ckpt = tmp_path / "killed", tmp_path / "ckpt"
    args = {"cfg": cfg.model_dump(mode="json"), "base": str(dropout_model_dir), "splits": str(splits["instruct"]), "out": str(out), "ckpt": str(ckpt)}
    killed_at = kill_after_checkpoint("tests.finetune.test_trainer", args, ckpt, at_least=6)
    assert 6 <= killed_at < 14 and not (out / "model").exists()

    resumed = run_instruct(cfg.model_copy(update={"resume": True}), dropout_model_dir, splits["instruct"], out, enc, ckpt)
    assert_same_run(tmp_path / "reference", out, reference, resumed)
    assert (tmp_path / "reference" / "reports" / TEST_RESPONSES).read_text() == (out / "reports" / TEST_RESPONSES).read_text()


def classifier_run(cfg: ClassifierConfig, base: Path, splits_dir: Path, out: Path, enc, ckpt: Path) -> dict:
    return finetune_classifier(cfg, base, splits_dir, out / "model", out / "reports", seed=5, enc=enc, checkpoint_dir=ckpt)


def dpo_run(cfg: DpoConfig, base: Path, splits_dir: Path, out: Path, enc, ckpt: Path) -> dict:
    return train_dpo(cfg, base, splits_dir, out / "model", out / "reports", seed=5, enc=enc, checkpoint_dir=ckpt)


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param(("classifier", ClassifierConfig, classifier_run, {"precision": "fp16", "trainable_blocks": 1}), id="classifier-fp16"),
        pytest.param(("dpo", DpoConfig, dpo_run, {"lora": LoraConfig(enabled=True, rank=2, alpha=4, dropout=0.1), "beta": 0.5}), id="dpo-lora"),
    ],
)
def test_resume_from_an_earlier_checkpoint_is_exact(splits, dropout_model_dir, enc, tmp_path, stage):
    name, config, run, options = stage
    fields = {k: v for k, v in TINY.items() if k in config.model_fields}
    cfg = config(**{**fields, "epochs": 2, "checkpoint_interval": 2, "keep_checkpoints": 10, **options})  # 14 steps
    ckpt = tmp_path / "ckpt"
    full = run(cfg, dropout_model_dir, splits[name], tmp_path / "full", enc, ckpt)
    steps = [s for s, _ in list_checkpoints(ckpt)]
    assert steps == list(range(2, full["steps"] + 1, 2))
    middle = steps[len(steps) // 2]  # as if the run had been killed just after writing it
    for s, path in list_checkpoints(ckpt):
        if s > middle:
            shutil.rmtree(path)
    resumed = run(cfg.model_copy(update={"resume": True}), dropout_model_dir, splits[name], tmp_path / "resumed", enc, ckpt)
    assert_same_run(tmp_path / "full", tmp_path / "resumed", full, resumed)


def test_resume_refuses_other_settings_and_a_fresh_start_clears_the_folder(splits, base_model_dir, enc, tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = instruct_cfg(max_steps=4, checkpoint_interval=2, max_test_generations=0)
    run_instruct(cfg, base_model_dir, splits["instruct"], tmp_path / "a", enc, ckpt)
    assert [s for s, _ in list_checkpoints(ckpt)] == [2, 4]
    with pytest.raises(CheckpointError, match=r"finetune_instruct\.lr: 0\.003 in the checkpoint, 0\.001 now"):
        run_instruct(cfg.model_copy(update={"resume": True, "lr": 1e-3}), base_model_dir, splits["instruct"], tmp_path / "b", enc, ckpt)
    # another start model (the same shape, other weights): its checkpoints are not this run's
    other = load_model(base_model_dir)
    torch.nn.init.normal_(other.blocks[0].attn.proj.weight)
    save_model(other, tmp_path / "other-base", extra={"tokenizer": "gpt2"})
    with pytest.raises(CheckpointError, match=r"start_weights_sha256: '[0-9a-f]{64}' in the checkpoint, '[0-9a-f]{64}' now"):
        run_instruct(cfg.model_copy(update={"resume": True}), tmp_path / "other-base", splits["instruct"], tmp_path / "b", enc, ckpt)
    with pytest.raises(ValueError, match="finetune_instruct: resume needs a checkpoint_dir"):
        run_instruct(cfg.model_copy(update={"resume": True}), base_model_dir, splits["instruct"], tmp_path / "c", enc)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    run_instruct(cfg.model_copy(update={"checkpoint_interval": None}), base_model_dir, splits["instruct"], tmp_path / "d", enc, ckpt)
    assert list(ckpt.iterdir()) == []  # resume off: the old run's checkpoints are gone


if __name__ == "__main__":  # the child of the kill test
    from lmcore.tokenizer import get_tokenizer

    torch.set_num_threads(1)  # as the parent's one_thread fixture: the same float sums, bit for bit
    args = json.loads(sys.argv[1])
    cfg = InstructConfig.model_validate(args["cfg"])
    run_instruct(cfg, Path(args["base"]), Path(args["splits"]), Path(args["out"]), get_tokenizer("gpt2"), Path(args["ckpt"]), tracker=_SlowTracker())
