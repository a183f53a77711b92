"""Pretraining (lmcore.pretrain) on a tiny learnable token stream, and what every trainer shares (lmcore.training):
the optimizer step, the training state, precision, the schedule."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import lmcore.pretrain as pretraining
import lmcore.training as training
from lmcore.checkpoint import load_model
from lmcore.config import ModelConfig, PretrainConfig
from lmcore.data.loader import RANDOM, TokenDataset, TokenLoader
from lmcore.data.shards import token_dtype, write_shard
from lmcore.model import GPT
from lmcore.paths import LOSS_PLOT, MANIFEST, MODEL_CONFIG, RESOLVED_PARAMS, SUMMARY, TRAIN_LOSS, VAL_LOSS, WEIGHTS
from lmcore.pretrain import pretrain
from lmcore.tracking import ListTracker
from lmcore.training import lr_at

VOCAB = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def write_tokens(tokens_dir: Path, splits: dict[str, list[np.ndarray]], vocab_size: int = VOCAB) -> Path:
    """A tokenize-like output: one shard per split and a manifest."""
    shards = []
    for split, docs in splits.items():
        name = f"{split}_000.arrow"
        write_shard(tokens_dir / name, docs, token_dtype(vocab_size))
        shards.append({"file": name, "split": split, "n_tokens": int(sum(len(d) for d in docs))})
    (tokens_dir / MANIFEST).write_text(json.dumps({"vocab_size": vocab_size, "shards": shards}))
    return tokens_dir


def write_pattern_tokens(out: Path) -> Path:
    """A fixed permutation of the vocabulary repeated, as train (two shards) and val: every token has one
    successor (a bigram a micro model learns in a few dozen steps)."""
    cycle = np.random.default_rng(0).permutation(VOCAB)
    stream = np.tile(cycle, 64)  # 1024 tokens
    return write_tokens(out, {"train": [stream[:700], stream[700:900]], "val": [stream[900:]]})


@pytest.fixture
def pattern_tokens(tmp_path) -> Path:
    return write_pattern_tokens(tmp_path / "tokens")


def micro_cfg(**overrides) -> PretrainConfig:
    base = dict(
        model=ModelConfig(vocab_size=VOCAB, context_length=16, n_embd=32, n_layer=2, n_head=2),
        batch_size=8,
        max_steps=50,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=5,
        eval_interval=10,
        eval_batches=2,
        device="cpu",
    )
    return PretrainConfig(**{**base, **overrides})


def run(tmp_path: Path, tokens_dir: Path, name: str = "run", seed: int = 0, **kwargs) -> tuple[dict, Path, Path]:
    model_dir, reports_dir = tmp_path / name / "model", tmp_path / name / "reports"
    cfg = kwargs.pop("cfg", None) or micro_cfg()
    summary = pretrain(cfg, tokens_dir, model_dir, reports_dir, seed=seed, **kwargs)
    return summary, model_dir, reports_dir


def test_val_loss_falls_on_a_learnable_stream(tmp_path, pattern_tokens):
    tracker = ListTracker()
    summary, model_dir, _ = run(tmp_path, pattern_tokens, tracker=tracker)
    assert summary["first_val_loss"] == pytest.approx(math.log(VOCAB), abs=0.3)  # about uniform at init
    assert summary["final_val_loss"] < 0.5 * summary["first_val_loss"]
    assert summary["final_train_loss"] < 0.5 * math.log(VOCAB)

    # the saved model is the trained one: greedy next tokens follow the cycle
    model = load_model(model_dir)
    cycle = np.random.default_rng(0).permutation(VOCAB)
    idx = torch.tensor(np.tile(cycle, 2)[None, :16])
    pred = model(idx)[0].argmax(-1)[0, 4:].numpy()
    expected = np.tile(cycle, 2)[5:17]
    assert (pred == expected).mean() > 0.9

    train_steps = [s for s, m in tracker.records if "train_loss" in m]
    assert train_steps == list(range(1, 51))
    assert all(m.keys() == {"train_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} for _, m in tracker.records if "train_loss" in m)
    assert [s for s, m in tracker.records if "val_loss" in m] == [0, 10, 20, 30, 40, 50]


def test_outputs(tmp_path, pattern_tokens):
    params = {"seed": 0, "pretrain": {"max_steps": 50}}
    summary, model_dir, reports_dir = run(tmp_path, pattern_tokens, cfg=micro_cfg(max_steps=23), params=params)

    assert sorted(p.name for p in model_dir.iterdir()) == sorted([WEIGHTS, MODEL_CONFIG, RESOLVED_PARAMS])
    assert yaml.safe_load((model_dir / RESOLVED_PARAMS).read_text()) == params
    assert sorted(p.name for p in reports_dir.iterdir()) == sorted([TRAIN_LOSS, VAL_LOSS, LOSS_PLOT, SUMMARY])
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp folders left

    with open(reports_dir / TRAIN_LOSS, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "train_loss", "lr"]
    assert [int(r["step"]) for r in rows] == list(range(1, 24))
    assert float(rows[0]["lr"]) == pytest.approx(1e-2 / 6, rel=1e-4)  # first warmup step
    with open(reports_dir / VAL_LOSS, newline="") as f:
        val_rows = list(csv.DictReader(f))
    assert list(val_rows[0]) == ["step", "val_loss"]
    assert [int(r["step"]) for r in val_rows] == [0, 10, 20, 23]  # every eval_interval, plus the final model
    assert float(val_rows[-1]["val_loss"]) == pytest.approx(summary["final_val_loss"], abs=1e-6)

    assert (reports_dir / LOSS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((reports_dir / SUMMARY).read_text()) == summary
    assert summary.keys() == {
        "n_params", "steps", "resumed_from_step", "tokens_seen", "train_time_s", "tokens_per_s", "mfu", "peak_flops", "precision", "world_size",
        "first_val_loss", "final_val_loss", "first_val_bpb", "final_val_bpb", "val_bpb_change", "val_bpb_change_stderr",
        "best_val_loss", "best_step", "stopped_early",
        "final_train_loss", "train_tokens", "val_tokens", "documents_longer_than_context", "loader_state", "init", "start",
        "tokenizer", "start_step", "pretrain_steps",
    }
    assert summary["first_val_bpb"] is None and summary["final_val_bpb"] is None  # shards without a tokenizer: no bpb
    assert (summary["start_step"], summary["pretrain_steps"]) == (0, 23)
    assert (summary["train_tokens"], summary["val_tokens"], summary["documents_longer_than_context"]) == (900, 124, 2)
    assert summary["loader_state"]["mode"] == "random" and summary["loader_state"]["step"] == 23
    assert summary["steps"] == 23 and summary["tokens_seen"] == 23 * 8 * 16 and summary["resumed_from_step"] is None
    assert summary["n_params"] == load_model(model_dir).num_params()


def test_same_seed_gives_identical_weights(tmp_path, pattern_tokens):
    # dropout on, so the test also covers the dropout masks drawn from torch's seeded RNG
    cfg = micro_cfg(max_steps=12, model=ModelConfig(vocab_size=VOCAB, context_length=16, n_embd=32, n_layer=2, n_head=2, dropout=0.1))
    a, dir_a, _ = run(tmp_path, pattern_tokens, "a", seed=7, cfg=cfg)
    b, dir_b, _ = run(tmp_path, pattern_tokens, "b", seed=7, cfg=cfg)
    c, dir_c, _ = run(tmp_path, pattern_tokens, "c", seed=8, cfg=cfg)
    assert (dir_a / WEIGHTS).read_bytes() == (dir_b / WEIGHTS).read_bytes()
    assert a["final_val_loss"] == b["final_val_loss"] and a["final_train_loss"] == b["final_train_loss"]
    assert (dir_a / WEIGHTS).read_bytes() != (dir_c / WEIGHTS).read_bytes()


def test_model_vocab_smaller_than_data_is_an_error(tmp_path, pattern_tokens):
    cfg = micro_cfg(model=ModelConfig(vocab_size=VOCAB - 1, context_length=16, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match=r"vocab_size \(15\) is smaller than the tokenizer's vocab_size \(16\)"):
        run(tmp_path, pattern_tokens, cfg=cfg)
    assert not (tmp_path / "run").exists()


def test_divergence_is_an_error_and_keeps_previous_outputs(tmp_path, pattern_tokens, monkeypatch):
    _, model_dir, reports_dir = run(tmp_path, pattern_tokens, cfg=micro_cfg(max_steps=3))
    before = {p: p.read_bytes() for d in (model_dir, reports_dir) for p in d.iterdir()}

    real_lr_at = training.lr_at
    monkeypatch.setattr(pretraining, "lr_at", lambda step, cfg: math.nan if step >= 4 else real_lr_at(step, cfg))
    with pytest.raises(FloatingPointError, match="train loss is nan at step 6"):
        run(tmp_path, pattern_tokens)

    after = {p: p.read_bytes() for d in (model_dir, reports_dir) for p in d.iterdir()}
    assert after == before  # the earlier run's folders, untouched
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_lr_schedule():
    cfg = micro_cfg(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=24)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, cfg) == pytest.approx(1.0)  # peak after warmup
    assert lr_at(14, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(24, cfg) == pytest.approx(0.1)  # min_lr at max_steps
    lrs = [lr_at(s, cfg) for s in range(4, 25)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, micro_cfg(warmup_steps=0, max_steps=1)) == pytest.approx(1e-2)


@pytest.mark.parametrize("preset", ["gpt2-micro", "llama-micro"])
def test_weight_decay_groups(preset):
    model = GPT(ModelConfig(preset=preset, vocab_size=VOCAB))
    opt = training.make_optimizer(model, micro_cfg(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    # matmul weights only: never embeddings (the tied head is wte), norms or biases
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2 and n not in ("wte.weight", "wpe.weight")}
    assert all(".norm" not in n and not n.endswith(".bias") for n in decayed)
    assert ("lm_head.weight" in decayed) == (preset == "llama-micro")  # untied in Llama: a matmul weight
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()  # tied tensor once


def lm_loss(model: GPT, grad_hook=None):
    """train_step's loss_fn for a GPT: its mean next-token loss, logged as "loss"; `grad_hook` may alter the
    gradient that flows back from the loss."""

    def loss_fn(batch):
        loss = model(*batch)[1]
        if grad_hook is not None:
            loss.register_hook(grad_hook)
        return loss, {"loss": loss.item()}

    return loss_fn


def sgd_step(model: GPT, micro_batches: list, loss_fn=None, **options) -> training.StepResult:
    """One train_step with plain SGD (lr 1, no clipping, fp32 by default): the weights move by minus the gradient."""
    options = {"step": 1, "lr": 1.0, "precision": training.resolve_precision("fp32", torch.device("cpu")), "grad_clip": 0.0, **options}
    optimizer = torch.optim.SGD(model.parameters(), lr=options["lr"])
    return training.train_step(model, optimizer, loss_fn or lm_loss(model), micro_batches, **options)


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_one_batch_of_the_same_windows(k):
    torch.manual_seed(0)
    x, y = torch.randint(0, VOCAB, (8, 16)), torch.randint(0, VOCAB, (8, 16))
    whole_model, parts_model = GPT(micro_cfg().model), GPT(micro_cfg().model)
    parts_model.load_state_dict(whole_model.state_dict())
    whole = sgd_step(whole_model, [(x, y)])
    size = 8 // k
    parts = sgd_step(parts_model, [(x[i : i + size], y[i : i + size]) for i in range(0, 8, size)])
    assert parts.loss == pytest.approx(whole.loss, abs=1e-6)
    assert parts.metrics["loss"] == pytest.approx(whole.metrics["loss"], abs=1e-6)  # averaged over the micro-batches
    assert parts.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    for (n, a), (_, b) in zip(whole_model.named_parameters(), parts_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=n)  # w - grad: the same gradient
    assert all(p.grad is None for p in parts_model.parameters())  # zero_grad after the update


def test_train_step_fp16_scaler_skips_an_overflow_and_lowers_the_scale():
    torch.manual_seed(0)
    model = GPT(micro_cfg().model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp16 = training.resolve_precision("fp16", torch.device("cpu"))
    scaler = fp16.grad_scaler()
    assert scaler is not None and training.resolve_precision("bf16", torch.device("cpu")).grad_scaler() is None
    batch = (torch.randint(0, VOCAB, (4, 16)), torch.randint(0, VOCAB, (4, 16)))

    scale = scaler.get_scale()
    overflow = sgd_step(model, [batch], lm_loss(model, lambda g: g * math.inf), precision=fp16, scaler=scaler, grad_clip=1.0)
    assert math.isfinite(overflow.loss) and not math.isfinite(overflow.grad_norm)  # no error: the scaler's business
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the update was skipped

    applied = sgd_step(model, [batch], precision=fp16, scaler=scaler, grad_clip=1.0, lr=0.1, step=2)
    assert math.isfinite(applied.grad_norm) and scaler.get_scale() == scale / 2
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_train_step_nan_guard_names_the_step():
    torch.manual_seed(0)
    model = GPT(micro_cfg().model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = (torch.randint(0, VOCAB, (4, 16)), torch.randint(0, VOCAB, (4, 16)))
    nan_loss = lambda b: (model(*b)[1] * math.nan, {})  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"^finetune_x: train loss is nan at step 7 \(lr 0\.01\).*No checkpoint was written"):
        sgd_step(model, [batch], nan_loss, step=7, lr=0.01, what="finetune_x")
    # a NaN gradient with a finite loss (no fp16 scaler to skip it) is divergence too
    with pytest.raises(FloatingPointError, match=r"^train: gradient norm is nan at step 3"):
        sgd_step(model, [batch], lm_loss(model, lambda g: g * math.nan), step=3, grad_clip=1.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no update in either case


def test_train_state_round_trips_through_json(tmp_path, pattern_tokens):
    loader = TokenLoader(TokenDataset(pattern_tokens, "train"), 4, 16, mode=RANDOM, seed=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    state = training.TrainState(loader=loader, scaler=scaler, early_stopping=training.EarlyStopping(patience=3, min_delta=0.1))
    for _ in range(5):
        loader.next_batch()
    state.step, state.train_time_s = 5, 1.25
    state.train_rows = [(s, 2.5 / s, 1e-3 * s) for s in range(1, 6)]
    state.val_rows = [(0, 2.77), (4, 1.5)]
    state.early_stopping.update(0, 2.77), state.early_stopping.update(4, 2.70)  # one bad eval
    saved = json.loads(json.dumps(state.state_dict()))  # what trainer_state.json holds
    assert saved.keys() == {"step", "loader", "train_rows", "val_rows", "bench_rows", "train_time_s", "grad_scaler", "early_stopping"}

    fresh_loader = TokenLoader(TokenDataset(pattern_tokens, "train"), 4, 16, mode=RANDOM, seed=3)
    fresh = training.TrainState(loader=fresh_loader, scaler=torch.amp.GradScaler("cpu"),
                                early_stopping=training.EarlyStopping(patience=3, min_delta=0.1))
    fresh.load_state_dict(saved)
    assert (fresh.step, fresh.train_time_s, fresh.train_rows, fresh.val_rows) == (5, 1.25, state.train_rows, state.val_rows)
    assert fresh.early_stopping == state.early_stopping and fresh.early_stopping.bad_evals == 1
    assert fresh.scaler.get_scale() == 2.0**10
    assert fresh.state_dict() == state.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(fresh_loader.next_batch(), loader.next_batch()))  # the same next batch
    assert training.TrainState().state_dict()["loader"] is None


def test_grad_accumulation_in_pretrain(tmp_path, pattern_tokens):
    tracker = ListTracker()
    summary, _, _ = run(tmp_path, pattern_tokens, cfg=micro_cfg(batch_size=4, grad_accum_steps=2, max_steps=20), tracker=tracker)
    assert summary["tokens_seen"] == 20 * 4 * 2 * 16
    assert summary["loader_state"]["step"] == 40  # two micro-batches per update
    assert summary["final_val_loss"] < 0.6 * summary["first_val_loss"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_fp32(tmp_path, pattern_tokens, precision):
    ref, _, _ = run(tmp_path, pattern_tokens, "fp32", cfg=micro_cfg(max_steps=30))
    mixed, _, _ = run(tmp_path, pattern_tokens, precision, cfg=micro_cfg(max_steps=30, precision=precision, peak_flops=1e12))
    assert mixed["precision"] == precision and ref["precision"] == "fp32"
    assert mixed["final_val_loss"] != ref["final_val_loss"]  # it did compute in another dtype
    # 30 updates on the bigram stream take the loss from log(16) = 2.77 to about 0.1; rounding in bf16/fp16
    # matmuls moves that by a few hundredths
    assert mixed["final_val_loss"] == pytest.approx(ref["final_val_loss"], abs=0.1)


def test_auto_precision(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert training.resolve_precision("auto", cpu).name == "bf16"
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    assert training.resolve_precision("auto", cpu).name == "fp32"
    assert training.resolve_precision("fp16", cpu).scaled and not training.resolve_precision("bf16", cpu).scaled


def test_early_stopping(tmp_path, pattern_tokens):
    # min_delta larger than any possible gain: the first eval after step 0 is "no improvement"
    cfg = micro_cfg(early_stopping_patience=1, early_stopping_min_delta=100.0)
    tracker = ListTracker()
    summary, model_dir, reports_dir = run(tmp_path, pattern_tokens, cfg=cfg, tracker=tracker)
    assert summary["stopped_early"] and summary["steps"] == 10 and summary["best_step"] == 0
    assert summary["best_val_loss"] == summary["first_val_loss"]
    assert [s for s, m in tracker.records if "val_loss" in m] == [0, 10]
    assert (reports_dir / TRAIN_LOSS).read_text().count("\n") == 11  # header + 10 updates
    assert load_model(model_dir).num_params() == summary["n_params"]

    patient, _, _ = run(tmp_path, pattern_tokens, "patient", cfg=micro_cfg(early_stopping_patience=2))
    assert not patient["stopped_early"] and patient["steps"] == 50  # the loss falls at every eval


def test_mfu_and_tokens_per_s(tmp_path, pattern_tokens):
    tracker = ListTracker()
    cfg = micro_cfg(max_steps=5, peak_flops=1e12)
    summary, _, _ = run(tmp_path, pattern_tokens, cfg=cfg, tracker=tracker)
    model = GPT(cfg.model)
    n = model.num_params(non_embedding=True)
    fpt = 6 * n + 12 * 2 * 2 * 16 * 16  # 6N + 12 L H Q T
    assert training.flops_per_token(cfg.model, n) == fpt
    for _, m in (r for r in tracker.records if "train_loss" in r[1]):
        assert m["mfu"] == pytest.approx(fpt * m["tokens_per_s"] / 1e12, rel=1e-9)
    assert summary["peak_flops"] == 1e12 and 0 < summary["mfu"] < 1


def test_flops_per_token_gpt2_124m():
    # nanoGPT's estimate_mfu for GPT-2 124M: N = 124,337,664 params less the 786,432 of wpe
    cfg = ModelConfig(preset="gpt2-124m")
    n = 124_337_664 - 1024 * 768
    assert training.flops_per_token(cfg, n) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_measured_peak_is_positive_and_cached():
    cpu = torch.device("cpu")
    first = training.measure_peak_flops(cpu, torch.float32)
    assert first > 1e8 and training.measure_peak_flops(cpu, torch.float32) == first


def test_invalid_options_name_the_key():
    from lmcore.config import ParamsError, params_from_dict
    from tests.conftest import MICRO

    data = yaml.safe_load(MICRO.read_text())
    with pytest.raises(ParamsError, match=r"pretrain\.precision"):
        params_from_dict(data, overrides=["pretrain.precision=fp8"])
    with pytest.raises(ParamsError, match=r"pretrain\.grad_accum_steps"):
        params_from_dict(data, overrides=["pretrain.grad_accum_steps=0"])
    with pytest.raises(ParamsError, match=r"min_lr \(0\.1\) must not exceed lr"):
        params_from_dict(data, overrides=["pretrain.min_lr=0.1"])
    with pytest.raises(ParamsError, match=r"pretrain\.early_stopping_patience"):
        params_from_dict(data, overrides=["pretrain.early_stopping_patience=0"])
    with pytest.raises(ValueError, match="resume needs a checkpoint_dir"):
        pretrain(micro_cfg(resume=True), Path("unused"), Path("m"), Path("r"), seed=0)


def test_compile_needs_a_compiler(monkeypatch):
    monkeypatch.setattr(training.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"pretrain\.compile=true: .* C\+\+ compiler"):
        training.check_compile(torch.device("cpu"))


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path, pattern_tokens):
    eager, _, _ = run(tmp_path, pattern_tokens, "eager", cfg=micro_cfg(max_steps=10))
    compiled, _, _ = run(tmp_path, pattern_tokens, "compiled", cfg=micro_cfg(max_steps=10, compile=True))
    # the same math; inductor fuses and reorders float sums
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=1e-3)


def test_nan_guard_keeps_the_last_good_checkpoint(tmp_path, pattern_tokens, monkeypatch):
    from lmcore.checkpoint import latest_checkpoint, load_training_checkpoint

    real_lr_at = training.lr_at
    monkeypatch.setattr(pretraining, "lr_at", lambda step, cfg: math.nan if step >= 4 else real_lr_at(step, cfg))
    ckpts = tmp_path / "ckpt"
    with pytest.raises(FloatingPointError, match=r"train loss is nan at step 6 .* last good checkpoint is .*step-00000004 \(step 4\)"):
        run(tmp_path, pattern_tokens, cfg=micro_cfg(checkpoint_interval=2), checkpoint_dir=ckpts)
    assert latest_checkpoint(ckpts).name == "step-00000004"
    # with a checkpoint due after the NaN update, the guard refuses to write it
    with pytest.raises(FloatingPointError, match=r"weights are not finite after step 5; no checkpoint written"):
        run(tmp_path, pattern_tokens, cfg=micro_cfg(checkpoint_interval=1, keep_checkpoints=3), checkpoint_dir=ckpts)
    assert latest_checkpoint(ckpts).name == "step-00000004"
    good = load_training_checkpoint(latest_checkpoint(ckpts))
    assert all(torch.isfinite(t).all() for t in good.model.values())
    assert not (tmp_path / "run").exists()


def test_pretraining_and_fine_tuning_run_the_one_loop(tmp_path, pattern_tokens, monkeypatch):
    import lmcore.finetune.trainer as trainer
    from lmcore.config import FinetuneConfig

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["what"])
        return training.train_loop(*args, **kwargs)

    monkeypatch.setattr(pretraining, "train_loop", counted)
    monkeypatch.setattr(trainer, "train_loop", counted)
    run(tmp_path, pattern_tokens, cfg=micro_cfg(max_steps=2))

    torch.manual_seed(0)
    model = GPT(micro_cfg().model)
    items = [[(i + j) % VOCAB for j in range(17)] for i in range(6)]

    def loss_fn(m, batch):
        loss = m(batch[:, :-1], batch[:, 1:])[1]
        return loss, {"loss": loss.item()}

    history = trainer.fit(model, FinetuneConfig(batch_size=2, max_steps=2, device="cpu"), items, torch.tensor, loss_fn,
                          lambda m, n: loss_fn(m, torch.tensor(items))[1], seed=0, desc="finetune_x")
    assert calls == ["pretrain", "finetune_x"] and history.steps == 2
