"""Pretraining: next-token prediction on the tokenized corpus with AdamW and a warmup-cosine schedule.

    torchrun --standalone --nproc_per_node 2 -m lmcore.pretrain --params params.yaml
    torchrun --standalone --nproc_per_node 2 -m lmcore.pretrain --params params.yaml --set pretrain.distributed=fsdp
    python -m lmcore.pretrain --params profiles/micro.yaml --set pretrain.max_steps=50

    summary = pretrain(params.pretrain, Path("data/tokens"), Path("models/base"), Path("reports/pretrain"),
                       seed=params.seed, params=params.to_dict(), checkpoint_dir=Path("models/checkpoints/pretrain"))

From the command line (without the orchestration layer, `lmcore.launch`): the pretrain stage on the params file
(with dotted `--set` overrides), on <root>/data/tokens: rank 0 writes <root>/models/base, <root>/reports/pretrain
and the training checkpoints in <root>/models/checkpoints/pretrain; the other ranks write nothing. Under torchrun the process group is gloo on CPU and NCCL on CUDA; every rank must see the same tokens
and checkpoint folder. No MLflow here: `torchrun ... -m flows.torchrun` is the tracked, registered variant.

The loop is lmcore.training.train_loop, the one the fine-tunes run (its docstring lays it out: evaluation at step 0,
every `eval_interval` steps and at the last step, the benchmark probe, checkpoints, early stopping, the updates);
pretraining gives it what is its own:
- the batches: `grad_accum_steps` micro-batches of `batch_size` windows per update (lmcore.training.train_step).
  Under torchrun every rank does the same on its own batches and gradients are averaged (lmcore.distributed);
  rank r's micro-batch j of step s is the loader's global batch (s * grad_accum_steps + j) * world_size + r, so one
  process with grad_accum_steps = A * W sees the very windows that W processes with A micro-batches each see;
- the loss: the mean next-token cross-entropy, its schedule lr_at over max_steps;
- evaluation: `val_loss` on the same validation windows at every eval, and `val_bpb`, bits per byte
  (lmcore.training.bpb_sums; shards without a tokenizer have none), which compares across tokenizers; rows
  (step, val_loss, val_bpb); early stopping (`early_stopping_patience`) on val_loss;
- per step: train_loss, lr, grad_norm, `tokens_per_s` (all ranks) and `mfu` (lmcore.training.flops_per_token),
  rows (step, train_loss, lr); the train metrics of the k-th update are logged at step k = 1 .. max_steps, as
  litgpt and the HF Trainer count, moved on by `start_step` for a continued champion.

Checkpoints and resume: every `checkpoint_interval` steps (lmcore.training.save_checkpoint). With `resume` the
run continues from the latest complete one and ends with the weights an uninterrupted run ends with, bit for bit
on CPU. A NaN/inf loss or gradient norm stops the run with FloatingPointError.

Benchmark probe (`eval_benchmarks_every`, off by default): a fixed sample of benchmark items (lmcore.harness.probe)
scored at step 0, every N steps and at the last step, after val_loss, logged as train_bench.<task>.<metric> and
written to bench_curve.csv; every rank scores it (the same forwards), rank 0 logs. From the command line the
sample's benchmark sources are collected (mirror first) into a temporary folder, as the pretrain stage does.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from lmcore import distributed
from lmcore.checkpoint import load_model, save_model
from lmcore.config import ModelConfig, PretrainConfig
from lmcore.data.loader import RANDOM, TokenDataset, TokenLoader
from lmcore.harness.benchmarks import Item
from lmcore.harness.probe import section_probe
from lmcore.io import atomic_dir, sha256_file, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import BENCH_CURVE, CHECKPOINTS, LOSS_PLOT, MANIFEST, SUMMARY, TRAIN_LOSS, VAL_LOSS, WEIGHTS
from lmcore.tokenizer import Tokenizer, TokenizerError, has_tokenizer, load_tokenizer
from lmcore.tracking import NullTracker, Tracker
from lmcore.training import (
    EarlyStopping,
    Precision,
    StepResult,
    TrainState,
    bits_per_byte,
    bpb_change,
    bpb_sums,
    check_compile,
    flops_per_token,
    full_state,
    lr_at,
    make_optimizer,
    measure_peak_flops,
    metrics_csv,
    plot_losses,
    resolve_device,
    resolve_precision,
    seed_everything,
    start_or_resume,
    tied_aliases,
    token_bytes,
    train_loop,
)

log = logging.getLogger(__name__)

# config.json key of a pretrained model folder: the optimizer steps behind its weights, over every run it continued.
PRETRAIN_STEPS = "pretrain_steps"

# The pretrain stage's training checkpoints, relative to the project root (Layout.checkpoints("pretrain")).
PRETRAIN_CHECKPOINTS = Path(CHECKPOINTS) / "pretrain"


def pretrain(
    cfg: PretrainConfig,
    tokens_dir: Path,
    model_dir: Path,
    reports_dir: Path,
    *,
    seed: int,
    params: dict | None = None,
    tracker: Tracker = NullTracker(),
    checkpoint_dir: Path | None = None,
    resume: bool | None = None,
    init_dir: Path | None = None,
    bench_items: list[Item] | None = None,
    start_step: int = 0,
) -> dict:
    """Train a GPT on tokens_dir, from random weights or from a base model, and write the model and the loss reports.

    Args:
        cfg: the pretrain section of params (model architecture and optimisation).
        tokens_dir: a tokenize output folder (manifest.json with train and val shards).
        model_dir: replaced whole by model.safetensors, config.json and params.yaml.
        reports_dir: replaced whole by train_loss.csv, val_loss.csv, loss.png and summary.json.
        seed: seeds python, numpy, torch and the batch sampling (train batch k is a pure function of
            (seed, k); summary["loader_state"] is the train loader's state_dict after the last step).
        params: the resolved params dict, saved beside the weights.
        tracker: receives train_loss, lr, grad_norm, tokens_per_s and mfu each step and val_loss (and val_bpb when
            the shards carry their tokenizer) at each eval (rank 0 only under torchrun).
        checkpoint_dir: where training checkpoints go every `cfg.checkpoint_interval` steps; None writes none.
        resume: continue from the latest complete checkpoint in checkpoint_dir (a fresh start when there is
            none); None takes `cfg.resume`. Without resume, old checkpoints in checkpoint_dir are removed.
        init_dir: the model folder to continue from (the base, or the champion), whose architecture replaces
            `cfg.model` and whose tokenizer must be the one the shards were made with; None: random weights
            (refused with `cfg.init: base`).
        bench_items: with `cfg.eval_benchmarks_every`, the benchmark probe's sample (lmcore.harness.probe.probe_items),
            scored with the shards' tokenizer at step 0, every N steps and at the last step: tracker metrics
            train_bench.<task>.<metric>, reports_dir/bench_curve.csv, summary eval_benchmarks_time_s.
        start_step: the optimizer steps the model had before this run (a continued champion's): the tracker's
            steps are numbered on from it, and the model folder records start_step + steps as `pretrain_steps`.

    The model folder carries the shards' tokenizer (tokens_dir's tokenizer files).

    Returns: the summary (also written to summary.json).
    Raises: ValueError if the model's vocabulary is smaller than the data's or an option cannot run here;
        lmcore.harness.scoring.TooLongError, before training, when no sampled item of a probe task fits the context;
        TokenizerError when the base model's tokenizer is not the shards';
        lmcore.checkpoint.CheckpointError if the checkpoint to resume was written under other settings;
        FloatingPointError on a NaN/inf loss or gradient norm. On any error model_dir and reports_dir are
        left as they were; checkpoints already written stay.
    """
    resume = cfg.resume if resume is None else resume
    if resume and checkpoint_dir is None:
        raise ValueError("pretrain: resume needs a checkpoint_dir")
    info = distributed.current()
    device, precision = setup(cfg, seed, info)
    train, val = TokenDataset(tokens_dir, "train"), TokenDataset(tokens_dir, "val")
    tokenizer = shards_tokenizer(Path(tokens_dir))  # what made the shards; the model carries it
    model, start = initial_model(cfg, init_dir, tokenizer, Path(tokens_dir))
    check_vocab(model.config.vocab_size, train, Path(tokens_dir))
    B, T, A, W = cfg.batch_size, window(cfg, model.config), cfg.grad_accum_steps, info.world_size
    run_config = {"pretrain": cfg.resume_key(), "seed": seed, "world_size": W, "start": start}
    train_loader = TokenLoader(train, B, T, mode=RANDOM, seed=seed, rank=info.rank, world_size=W)
    # The same validation windows at every eval, so the val curve measures the model and not the sample.
    val_windows = next_batches(TokenLoader(val, B, T, mode=RANDOM, seed=seed), cfg.eval_batches, device)
    val_bytes = token_bytes(tokenizer, model.config.vocab_size).to(device) if tokenizer is not None else None
    probe = section_probe(cfg, bench_items, tokenizer, model.config.context_length, key="pretrain")  # checked before training

    model.to(device).train()
    wrapped = distributed.wrap(model, cfg.distributed, info, device)
    optimizer = make_optimizer(model, cfg, device, impl=cfg.optimizer_impl)
    early = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    state = TrainState(loader=train_loader, scaler=precision.grad_scaler(), early_stopping=early)
    resumed_at = start_or_resume(checkpoint_dir, resume, model, optimizer, state, run_config, what="pretrain")
    if any(len(row) < 3 for row in state.val_rows):
        log.info("pretrain: the checkpoint's val rows predate val_bpb; their val_bpb cells stay empty")
    loss_fn = functools.partial(next_token_loss, torch.compile(wrapped) if cfg.compile else wrapped)
    fpt = flops_per_token(model.config, model.num_params(non_embedding=True), T)
    peak = cfg.peak_flops or measure_peak_flops(device, precision.dtype)

    row_bytes: dict[int, torch.Tensor | None] = {}  # step -> each val window's (nats, bytes), for the paired stderr

    def evaluate(step: int) -> tuple[tuple, dict[str, float]]:
        val_loss, val_bpb, row_bytes[step] = validation_loss(model, val_windows, precision, val_bytes)
        return (step, val_loss, val_bpb), {"val_loss": val_loss, **({"val_bpb": val_bpb} if val_bpb is not None else {})}

    def record(step: int, out: StepResult, lr: float, dt: float) -> tuple[tuple, dict[str, float]]:
        throughput = {"tokens_per_s": B * T * A * W / dt, "mfu": fpt * B * T * A / dt / peak}
        return (step, out.loss, lr), {"train_loss": out.loss, "lr": lr, "grad_norm": out.grad_norm, **throughput}

    stopped_early = train_loop(
        model, optimizer, state, cfg, total=cfg.max_steps, next_batch=functools.partial(next_batch, train_loader, device),
        loss_fn=loss_fn, schedule=lambda step: lr_at(step, cfg), evaluate=evaluate, record=record, precision=precision,
        run_config=run_config, checkpoint_dir=checkpoint_dir, resumed_at=resumed_at, wrapped=wrapped,
        early_stopping=True, probe=probe, tracker=tracker, step_offset=start_step, what="pretrain",
    )

    summary = make_summary(cfg, model, state, train_loader, val, precision, peak=peak, resumed_at=resumed_at,
                           stopped_early=stopped_early, seq_len=T)
    first, last = (row_bytes.get(state.val_rows[i][0]) for i in (0, -1))
    # the change in val bits per byte over the run (final - first, on the same windows) and its paired standard
    # error; None where a run resumed past step 0 or the shards have no tokenizer
    change = bpb_change(first, last) if first is not None and last is not None else (None, None)
    summary.update(val_bpb_change=change[0], val_bpb_change_stderr=change[1])
    summary.update(init=cfg.init, start=start, tokenizer=tokenizer.name if tokenizer else None, start_step=start_step,
                   pretrain_steps=start_step + state.step)
    summary.update(probe.summary() if probe is not None else {})
    write_outputs(cfg, model, state, summary, Path(model_dir), Path(reports_dir), params, tokenizer=tokenizer)
    return summary


def setup(cfg: PretrainConfig, seed: int, info: distributed.DistInfo) -> tuple[torch.device, Precision]:
    """Seed everything (the same on every rank: identical initial weights), set the thread count, pick the device
    (this rank's GPU under torchrun) and the precision."""
    seed_everything(seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    if cfg.compile:
        check_compile(device)
    return device, resolve_precision(cfg.precision, device)


def shards_tokenizer(tokens_dir: Path) -> Tokenizer | None:
    """The tokenizer the token shards carry; None for shards made without one (synthetic data in tests)."""
    if has_tokenizer(tokens_dir):
        return load_tokenizer(tokens_dir)
    log.warning("%s carries no tokenizer: the model folder will carry none either", tokens_dir)
    return None


def initial_model(cfg: PretrainConfig, init_dir: Path | None, tokenizer: Tokenizer | None, tokens_dir: Path) -> tuple[GPT, str]:
    """The model training starts from, and what it is: "scratch", or "<folder>@<weights sha256>" of the model
    folder it continues (the base, or the champion)."""
    if init_dir is None:
        if cfg.init == "base":
            raise ValueError("pretrain.init: base needs the base model folder (the base_model stage's output)")
        return GPT(cfg.model), "scratch"
    base_tok = load_tokenizer(init_dir)
    if tokenizer is None or not base_tok.same_as(tokenizer):
        raise TokenizerError(
            f"{tokens_dir}: the shards were made with tokenizer {shards_name(tokens_dir)}, but the base "
            f"model {init_dir} uses {base_tok.name} ({base_tok.sha256[:12]}); tokenize with tokenize.tokenizer: base (or auto)"
        )
    return load_model(init_dir), f"{Path(init_dir).name}@{sha256_file(Path(init_dir) / WEIGHTS)}"


def shards_name(tokens_dir: Path) -> str:
    """How the shards name their tokenizer in error messages: "name (sha256 prefix)", or that they carry none."""
    if not has_tokenizer(tokens_dir):
        return "none recorded"
    tok = load_tokenizer(tokens_dir)
    return f"{tok.name} ({tok.sha256[:12]})"


def window(cfg: PretrainConfig, model: ModelConfig) -> int:
    """Tokens per training window: `seq_len`, else the model's context length."""
    if cfg.seq_len is not None and cfg.seq_len > model.context_length:
        raise ValueError(f"pretrain.seq_len ({cfg.seq_len}) exceeds the model's context_length ({model.context_length})")
    return cfg.seq_len or model.context_length


def check_vocab(vocab_size: int, train: TokenDataset, tokens_dir: Path) -> None:
    if vocab_size < train.vocab_size:
        raise ValueError(
            f"pretrain.model.vocab_size ({vocab_size}) is smaller than the tokenizer's vocab_size "
            f"({train.vocab_size}) in {tokens_dir / MANIFEST}"
        )


def next_batch(loader: TokenLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's next (x, y) batch, on `device`."""
    return tuple(t.to(device, non_blocking=True) for t in loader.next_batch())


def next_batches(loader: TokenLoader, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next_batch(loader, device) for _ in range(n)]


def next_token_loss(forward: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The loss_fn of train_step: the model's mean next-token cross-entropy over the batch."""
    x, y = batch
    return forward(x, y)[1], {}


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]], precision: Precision,
    bytes_per_token: torch.Tensor | None = None,
) -> tuple[float, float | None, torch.Tensor | None]:
    """Mean loss over the validation batches, their bits per byte and each window's (nats, bytes); under torchrun
    each rank scores its share and the sums meet.

    Every rank runs the same number of forwards (FSDP gathers parameters collectively): a rank short of one
    scores its last batch again with weight 0.

    Args: bytes_per_token: lmcore.training.token_bytes of the shards' tokenizer, on the device; None: no bpb.
    Returns: (mean loss, bits per byte or None, (windows, 2) float64 nats and bytes per window or None).
    """
    info = distributed.current()
    mine = windows[info.rank :: info.world_size]
    share = -(-len(windows) // info.world_size)
    weights = [1.0] * len(mine) + [0.0] * (share - len(mine))
    mine = mine + [windows[-1]] * (share - len(mine))
    model.eval()
    sums = torch.zeros(3, device=windows[0][0].device, dtype=torch.float64)  # loss, nats, bytes
    B = windows[0][0].shape[0]
    rows = torch.zeros(len(windows), B, 2, device=sums.device, dtype=torch.float64)  # each window's nats, bytes
    for i, ((x, y), w) in enumerate(zip(mine, weights)):
        with precision.autocast():
            logits, loss = model(x, y)  # (B, T, V), the batch's mean loss
            sums[0] += w * loss.double()
            if bytes_per_token is not None and w:  # a repeated last batch (weight 0) has no window of its own
                losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")  # (B*T,)
                rows[info.rank + i * info.world_size] = torch.stack(bpb_sums(losses, y, bytes_per_token, dim=1), dim=-1)
    model.train()
    loss = distributed.all_reduce_sum(sums)[0].item()
    if bytes_per_token is None:
        return loss / len(windows), None, None
    rows = distributed.all_reduce_sum(rows).flatten(0, 1)
    nats, n_bytes = rows.sum(0).tolist()
    return loss / len(windows), bits_per_byte(nats, n_bytes), rows.cpu()


def make_summary(
    cfg: PretrainConfig, model: GPT, state: TrainState, train_loader: TokenLoader, val: TokenDataset, precision: Precision,
    *, peak: float, resumed_at: int | None, stopped_early: bool, seq_len: int,
) -> dict:
    """What the run did, for summary.json and the tracker."""
    B, T, A, W = cfg.batch_size, seq_len, cfg.grad_accum_steps, train_loader.world_size
    fpt = flops_per_token(model.config, model.num_params(non_embedding=True), T)
    tokens_seen, train_time = state.step * B * T * A * W, state.train_time_s
    return {
        "n_params": model.num_params(),
        "steps": state.step,
        "resumed_from_step": resumed_at,  # None for a fresh start
        "tokens_seen": tokens_seen,
        "train_time_s": round(train_time, 3),
        "tokens_per_s": round(tokens_seen / train_time, 1) if train_time > 0 else None,
        "mfu": round(fpt * tokens_seen / W / train_time / peak, 4) if train_time > 0 else None,
        "peak_flops": peak,
        "precision": precision.name,
        "world_size": W,
        "first_val_loss": state.val_rows[0][1],
        "final_val_loss": state.val_rows[-1][1],
        "first_val_bpb": val_bpb(state.val_rows[0]),  # None: shards without a tokenizer
        "final_val_bpb": val_bpb(state.val_rows[-1]),
        "best_val_loss": state.early_stopping.best_loss,
        "best_step": state.early_stopping.best_step,
        "stopped_early": stopped_early,
        "final_train_loss": state.train_rows[-1][1] if state.train_rows else None,  # None: no update (max_steps 0)
        "train_tokens": train_loader.dataset.n_tokens,
        "val_tokens": val.n_tokens,
        # Train documents cut across windows (longer than context_length + 1 tokens).
        "documents_longer_than_context": train_loader.documents_longer_than_context,
        "loader_state": train_loader.state_dict(),  # resume: TokenLoader.from_state_dict(train, loader_state)
    }


def val_bpb(row: tuple) -> float | None:
    """The bits per byte of a (step, val_loss, val_bpb) row; None for one from a checkpoint that predates it."""
    return row[2] if len(row) > 2 else None


def write_outputs(
    cfg: PretrainConfig, model: GPT, state: TrainState, summary: dict, model_dir: Path, reports_dir: Path,
    params: dict | None, *, tokenizer: Tokenizer | None,
) -> None:
    """Rank 0 writes the model folder and the reports folder; both are built aside and renamed into place only
    when everything was written. Every rank calls it (under fsdp the weights are gathered collectively)."""
    info = distributed.current()
    final_sd = full_state(model)[0] if info.enabled and cfg.distributed == distributed.FSDP else None
    if info.is_main:
        out = model
        if final_sd is not None:  # fsdp: a plain CPU copy of the gathered weights
            out = GPT(model.config)
            out.load_state_dict({**final_sd, **{a: final_sd[f] for a, f in tied_aliases(out).items()}})
        with atomic_dir(model_dir) as model_tmp, atomic_dir(reports_dir) as reports_tmp:
            train_csv = "".join(f"{s},{loss:.6f},{lr:.6g}\n" for s, loss, lr in state.train_rows)
            write_text(reports_tmp / TRAIN_LOSS, "step,train_loss,lr\n" + train_csv)
            val_rows = [(row[0], {"val_loss": row[1], **({"val_bpb": val_bpb(row)} if val_bpb(row) is not None else {})})
                        for row in state.val_rows]
            write_text(reports_tmp / VAL_LOSS, metrics_csv(val_rows, fmt=".6f"))
            if state.bench_rows:
                write_text(reports_tmp / BENCH_CURVE, metrics_csv(state.bench_rows))
            plot_losses(reports_tmp / LOSS_PLOT, state.train_rows, state.val_rows)
            write_json(reports_tmp / SUMMARY, summary)
            extra = {PRETRAIN_STEPS: summary["pretrain_steps"], **({"tokenizer": tokenizer.name} if tokenizer else {})}
            save_model(out, model_tmp, params=params, extra=extra)
            if tokenizer is not None:
                tokenizer.save(model_tmp)
    distributed.barrier()


__all__ = ["PRETRAIN_CHECKPOINTS", "pretrain"]


if __name__ == "__main__":  # `python -m lmcore.pretrain`, `torchrun ... -m lmcore.pretrain`: the pretrain stage's entry
    import runpy

    runpy.run_module("lmcore.launch", run_name="__main__", alter_sys=True)  # by name: no stage's code dep
