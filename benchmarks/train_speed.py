"""Benchmark training throughput: lmcore's trainer against a minimal nanoGPT-style fp32 loop, same model, same data.

    .venv/bin/python -m benchmarks.train_speed
    .venv/bin/python -m benchmarks.train_speed --steps 200 --repeats 2 --threads 1 --ablation

Both loops train `GPT(params.pretrain.model)` (profiles/scratch.yaml's tiny model: 4 layers, width 128, context
128, the trained tokenizer's 8,192-token vocabulary) from the same seeded initial weights on the very same batches
(TokenLoader windows of `--tokens`, default data/tokens; a random stream when that folder is missing), with the
same lr schedule, clipping and betas:
- nanoGPT: its train.py on CPU: fp32 (nanoGPT's autocast context is a nullcontext on CPU), AdamW with
  torch's default foreach implementation (nanoGPT fuses only on CUDA), decay on every 2-D+ tensor, one
  batch per step, no compile (nanoGPT's --compile=False, its CPU recipe);
- lmcore: `lmcore.pretrain.pretrain` with its best settings here: precision auto (bf16 autocast on a CPU
  with avx512_bf16 or AMX), torch.compile, fused AdamW; more `--set key=value` overrides change them.
`--ablation` adds lmcore rows with fewer of those settings (fp32 eager; bf16 eager). The loops alternate
`--repeats` times. Per loop: tokens/s from the median step time (steady state; robust to
other processes stealing the cores for a while) and from the whole run's wall time (compile included), the
mean train loss of the last 20 steps and the validation loss on the same 8 fixed batches after the last
step. Prints a Markdown table and the lmcore/nanoGPT ratios.

The in-training benchmark probe (`pretrain.eval_benchmarks_every`, on in profiles/scratch.yaml) is turned off for every
lmcore row: it scores benchmark items between steps, which nanoGPT's loop does not do, so it would time
evaluation rather than training (and it needs a collected benchmark sample). This is a throughput benchmark;
the probe's own cost is in the pretrain stage's report.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmcore.config import PretrainConfig, load_params
from lmcore.data.loader import RANDOM, TokenDataset, TokenLoader
from lmcore.data.shards import write_shard
from lmcore.model import GPT
from lmcore.paths import MANIFEST
from lmcore.pretrain import pretrain
from lmcore.tracking import ListTracker
from lmcore.training import lr_at

ROOT = Path(__file__).resolve().parents[1]
BEST = ["pretrain.precision=auto", "pretrain.compile=true", "pretrain.optimizer_impl=fused"]
EVAL_BATCHES = 8
LAST = 20  # train loss: mean of the last LAST steps


def random_tokens(root: Path, vocab: int, n: int = 2_000_000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab - 1, size=n // 10, dtype=np.uint16) for _ in range(10)]
    shards = []
    for split, part in (("train", docs[:9]), ("val", docs[9:])):
        write_shard(root / f"{split}.arrow", part, np.dtype(np.uint16))
        shards.append({"file": f"{split}.arrow", "split": split, "n_tokens": sum(len(d) for d in part)})
    (root / MANIFEST).write_text(f'{{"vocab_size": {vocab}, "shards": {str(shards).replace(chr(39), chr(34))}}}')
    return root


@torch.no_grad()
def val_loss(model: GPT, windows) -> float:
    model.eval()
    loss = sum(model(x, y)[1].item() for x, y in windows) / len(windows)
    model.train()
    return loss


def nanogpt_loop(cfg: PretrainConfig, tokens: Path, seed: int) -> dict:
    """nanoGPT's train.py inner loop on CPU, fp32, on lmcore's model and batches."""
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))  # foreach on CPU
    loader = TokenLoader(TokenDataset(tokens, "train"), cfg.batch_size, cfg.model.context_length, mode=RANDOM, seed=seed)
    val = TokenLoader(TokenDataset(tokens, "val"), cfg.batch_size, cfg.model.context_length, mode=RANDOM, seed=seed)
    windows = [val.next_batch() for _ in range(EVAL_BATCHES)]
    times, losses = [], []
    start = time.perf_counter()
    for it in range(cfg.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = loader.next_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {"times": times, "wall": wall, "losses": losses, "val_loss": val_loss(model, windows)}


def lmcore_loop(cfg: PretrainConfig, tokens: Path, seed: int) -> dict:
    tracker = ListTracker()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = pretrain(cfg, tokens, Path(tmp) / "model", Path(tmp) / "reports", seed=seed, tracker=tracker)
        wall = time.perf_counter() - start
    steps = [m for _, m in tracker.records if "train_loss" in m]
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.model.context_length
    return {
        "times": [tokens_per_step / m["tokens_per_s"] for m in steps],
        "wall": wall,
        "losses": [m["train_loss"] for m in steps],
        "val_loss": summary["final_val_loss"],
        "mfu": statistics.median(m["mfu"] for m in steps),
        "precision": summary["precision"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "profiles" / "scratch.yaml"))
    ap.add_argument("--tokens", default=str(ROOT / "data" / "tokens"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--set", action="append", default=[], help="extra overrides for the lmcore run (key=value)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both loops; 0 keeps torch's default")
    ap.add_argument("--ablation", action="store_true", help="also lmcore in fp32 eager and bf16 eager")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    common = [f"pretrain.max_steps={args.steps}", f"pretrain.eval_interval={args.steps}", f"pretrain.eval_batches={EVAL_BATCHES}"]
    common += [f"pretrain.threads={args.threads}", "pretrain.eval_benchmarks_every=null"]  # times training alone
    base = load_params(args.params, overrides=common).pretrain
    best = load_params(args.params, overrides=common + BEST + args.set).pretrain
    loops = [("nanoGPT", nanogpt_loop, base), ("lmcore", lmcore_loop, best)]
    if args.ablation:
        for name, extra in (("lmcore fp32 eager", ["pretrain.precision=fp32"]), ("lmcore bf16 eager", ["pretrain.precision=auto"])):
            cfg = load_params(args.params, overrides=common + ["pretrain.optimizer_impl=fused", *extra]).pretrain
            loops.append((name, lmcore_loop, cfg))
    with contextlib.ExitStack() as stack:
        # the loops' warnings (a random stream carries no tokenizer) are not the benchmark's; logging is process-wide,
        # so it comes back on when they are done (tests call main in their own process)
        logging.disable(logging.WARNING)
        stack.callback(logging.disable, logging.NOTSET)
        tokens = Path(args.tokens)
        if not (tokens / MANIFEST).is_file():
            tokens = random_tokens(Path(stack.enter_context(tempfile.TemporaryDirectory())), base.model.vocab_size)
            print(f"{args.tokens}: no tokens; a random stream instead")
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in loops}
        configs = {name: cfg for name, _, cfg in loops}
        for r in range(args.repeats):
            for name, loop, cfg in loops:
                result = loop(cfg, tokens, args.seed)
                runs[name].append(result)
                med = statistics.median(result["times"])
                print(f"repeat {r + 1} {name}: {med * 1000:.0f} ms/step median, {result['wall']:.1f} s wall, val loss {result['val_loss']:.4f}", flush=True)

    tokens_per_step = base.batch_size * base.model.context_length
    m = base.model
    print(
        f"\nModel: {m.n_layer} layers, n_embd {m.n_embd}, {m.n_head} heads, context {m.context_length}, vocab {m.vocab_size}; "
        f"batch {base.batch_size} x {m.context_length} tokens; {args.steps} steps; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| loop | settings | tokens/s (median step) | tokens/s (wall, incl. compile) | train loss (last 20) | val loss |")
    print("|---|---|---:|---:|---:|---:|")
    stats = {}
    for name, results in runs.items():
        med = statistics.median(t for res in results for t in res["times"])
        wall = statistics.median(res["wall"] for res in results)
        train_loss = statistics.mean(statistics.mean(res["losses"][-LAST:]) for res in results)
        val = statistics.mean(res["val_loss"] for res in results)
        stats[name] = (tokens_per_step / med, tokens_per_step * args.steps / wall)
        cfg = configs[name]
        if name == "nanoGPT":
            settings = "fp32, AdamW foreach, eager"
        else:
            mfu = statistics.median(res["mfu"] for res in results)
            settings = f"{results[0]['precision']}, AdamW {cfg.optimizer_impl}, {'compiled' if cfg.compile else 'eager'}; MFU {mfu:.3f}"
        print(f"| {name} | {settings} | {stats[name][0]:,.0f} | {stats[name][1]:,.0f} | {train_loss:.4f} | {val:.4f} |")
    for name in list(stats)[2:]:
        print(f"{name} / nanoGPT: {stats[name][0] / stats['nanoGPT'][0]:.2f}x tokens/s per step (median)")
    ratio_step = stats["lmcore"][0] / stats["nanoGPT"][0]
    ratio_wall = stats["lmcore"][1] / stats["nanoGPT"][1]
    print(f"\nlmcore / nanoGPT: {ratio_step:.2f}x tokens/s per step (median), {ratio_wall:.2f}x over the whole run")
    if not math.isfinite(ratio_step):
        raise SystemExit("no timing")


if __name__ == "__main__":
    main()
