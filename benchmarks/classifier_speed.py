"""Benchmark classifier fine-tuning: lmcore's `finetune_classifier` against a plain PyTorch loop, same model and batches.

    .venv/bin/python -m benchmarks.classifier_speed --gguf ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf
    .venv/bin/python -m benchmarks.classifier_speed --tiny --steps 6        # a random micro model: a smoke run

The model: the base (a GGUF file imported with lmcore.gguf.import_gguf, an lmcore model folder with `--model`, or
`--tiny`: a random GPT-2-style micro model) with a fresh 2-class head, its last `--trainable-blocks` blocks, final
norm and head trainable. The data: the SMS Spam Collection from the offline mirror, prepared as the stage prepares
it (balanced, 70/10/20 split), `--batch-size` messages of at most `--max-length` tokens a step, the same batches
in the same order on both sides (lmcore.finetune.trainer.EpochBatches, seed 0). Both run `--steps` AdamW steps:
- plain: each step the forward of the whole model, the backward of the trained part, the optimizer step (a
  nanoGPT-style loop: the reference the issue names);
- lmcore: `finetune_classifier` itself (validation every `--steps` steps only), with its frozen-prefix cache: the
  frozen blocks' output computed once for every example (timed apart: "prefix"), then each step runs the trained
  blocks alone. `--no-cache` runs it without the cache.
Per side: the seconds of the first 3 steps (where a slow start would show), the steady tokens/s (real tokens of a
step over its seconds, median over the steps after the third) and, for lmcore, the one-off prefix time. The ratio is
lmcore's steady tokens/s over the plain loop's. Wall-clock time; run it alone (on 2 cores any other busy process
slows torch several times).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmcore.checkpoint import load_model, save_model
from lmcore.config import SMS_SPAM, ClassifierConfig, CollectConfig, ModelConfig
from lmcore.data.collect import collect, mirror_from_env
from lmcore.finetune import classifier as clf
from lmcore.finetune.common import read_split
from lmcore.finetune.data import collate_classify
from lmcore.finetune.trainer import EpochBatches
from lmcore.gguf import import_gguf
from lmcore.model import GPT
from lmcore.tokenizer import get_tokenizer, load_tokenizer


class StepClock:
    """A tracker that notes when each training step's metrics arrive: the steps' durations (the clock restarts when
    the frozen-prefix cache is done, so step 1 does not include it)."""

    def __init__(self) -> None:
        self.times: list[float] = [time.perf_counter()]

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "cached_prefix_s" in metrics:
            self.times[-1] = time.perf_counter()
        if "train_loss" in metrics:
            self.times.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def base_model(args: argparse.Namespace, work: Path) -> tuple[Path, object]:
    """(the base model folder, its tokenizer)."""
    if args.tiny:
        torch.manual_seed(0)
        folder = work / "tiny"
        save_model(GPT(ModelConfig(vocab_size=50257, context_length=64, n_embd=32, n_layer=4, n_head=2)), folder,
                   extra={"tokenizer": "gpt2"})
        return folder, get_tokenizer("gpt2")
    folder = Path(args.model) if args.model else work / "base"
    if not args.model:
        import_gguf(args.gguf, folder)
    return folder, load_tokenizer(folder)


def plain_loop(folder: Path, enc, train: list, cfg: ClassifierConfig) -> list[tuple[float, int]]:
    """(seconds, real tokens) of each step of the plain loop: whole forward, backward of the trained part."""
    torch.manual_seed(0)
    model = load_model(folder)
    model.replace_head(len(cfg.labels))
    clf._make_trainable(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = EpochBatches(train, cfg.batch_size, seed=0)
    out = []
    for _ in range(cfg.max_steps):
        t0 = time.perf_counter()
        inputs, lengths, y = collate_classify(stream.next_batch(), pad_id=enc.eot_token, max_length=cfg.max_length)
        logits, _ = model(inputs)  # (B, T, 2): the whole model
        loss = F.cross_entropy(logits[torch.arange(len(y)), lengths - 1].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append((time.perf_counter() - t0, int(lengths.sum())))
    return out


def lmcore_run(folder: Path, enc, splits: Path, cfg: ClassifierConfig, work: Path) -> tuple[list[float], dict]:
    """lmcore's step durations and the run's summary (its cached_prefix_s: the frozen-prefix time)."""
    clock = StepClock()
    summary = clf.finetune_classifier(cfg, folder, splits, work / "model", work / "reports", seed=0, enc=enc, tracker=clock)
    return clock.durations(), summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "models"
                                              / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--model", help="an lmcore model folder (instead of --gguf)")
    parser.add_argument("--tiny", action="store_true", help="a random micro model (a smoke run)")
    parser.add_argument("--trainable-blocks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-cache", action="store_true", help="lmcore without its frozen-prefix cache")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ClassifierConfig(trainable_blocks=args.trainable_blocks, batch_size=args.batch_size, max_length=args.max_length,
                           max_steps=args.steps, eval_interval=args.steps, eval_batches=1, lr=2e-4, min_lr=2e-5,
                           warmup_steps=1, weight_decay=0.0, device="cpu", cache_frozen=not args.no_cache)
    with tempfile.TemporaryDirectory(prefix="lmcore-clf-") as tmp:
        work = Path(tmp)
        folder, enc = base_model(args, work)
        collect(CollectConfig(sources=[SMS_SPAM]), work / "raw", mirror=mirror_from_env(), cache_dir=work / "downloads")
        clf.prepare_classification(cfg, work / "raw", work / "splits", seed=0)
        train = [(enc.encode_ordinary(r["text"]) or [enc.eot_token], r["label"]) for r in read_split(work / "splits", "train")]
        plain = plain_loop(folder, enc, train, cfg)
        steps, summary = lmcore_run(folder, enc, work / "splits", cfg, work)
        # lmcore's steps see the same batches (EpochBatches, seed 0): the same real tokens per step
        tokens = [n for _, n in plain]
        model = load_model(folder)
        print(f"model: {folder.name} ({model.num_params():,} params, {len(model.blocks)} blocks, "
              f"{args.trainable_blocks} trained); batch {args.batch_size} x <= {args.max_length} tokens; "
              f"{args.steps} steps; threads {torch.get_num_threads()}")
        print(f"{'side':<10}{'step 1':>9}{'step 2':>9}{'step 3':>9}{'steady tok/s':>14}{'one-off':>10}")
        rate = {}
        for name, secs in (("plain", [s for s, _ in plain]), ("lmcore", steps)):
            rate[name] = statistics.median(n / s for n, s in zip(tokens[3:], secs[3:]))
            one_off = f"{summary['cached_prefix_s']:.1f} s" if name == "lmcore" and summary["cached_frozen_blocks"] else ""
            print(f"{name:<10}" + "".join(f"{s:>8.2f}s" for s in secs[:3]) + f"{rate[name]:>14.0f}{one_off:>10}")
        print(f"ratio (lmcore / plain, steady tokens/s): {rate['lmcore'] / rate['plain']:.2f}x; "
              f"lmcore test accuracy {summary['metrics']['test']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
