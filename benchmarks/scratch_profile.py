"""Benchmark the from-scratch profile's tokenizer and training settings: GPT-2's vocabulary against a trained one.

    .venv/bin/python -m benchmarks.scratch_profile                       # GPT-2's vocabulary against the trained one
    .venv/bin/python -m benchmarks.scratch_profile --ablation            # + bf16 forced, + torch.compile
    .venv/bin/python -m benchmarks.scratch_profile --no-before --vocab 2048 4096 8192 --set pretrain.batch_size=16

On the same cleaned corpus (the profile's sources, collected from LMCORE_MIRROR and preprocessed as the pipeline
does, into a temporary folder) and the same step budget (`pretrain.max_steps`, or --steps), each row tokenizes the
corpus and pretrains from random weights with the same seed (profiles/scratch.yaml, the book's chapter-5 path,
unless --params names another):
- `before`: the profile before issue 17: GPT-2's 50,257-token vocabulary, fp32, eager, the model and schedule
  it had (BEFORE below);
- `scratch`: the tokenizer train_tokenizer trains (`train_tokenizer` params, on the train split) and the
  `pretrain` section as the profile has it (precision auto: bf16 where the CPU has it natively, else fp32);
- `bpe-N`, one per --vocab: the same with an N-token vocabulary; --ablation: the profile's with bf16 forced
  (emulated where the CPU lacks it) and with torch.compile. --set overrides apply to every row but `before`.
Per row: seconds to train the tokenizer, to tokenize, to pretrain (compile included) and in all; the validation
loss per token and in bits per byte over the whole val split (the same documents for every tokenizer: the split
is a hash of the text); and the wall-time ratio to the first row. Bits per byte is the comparable number: a
smaller vocabulary has more tokens per text and so a lower loss per token for the same model quality.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from lmcore.bpe import save_trained, train_bpe
from lmcore.checkpoint import load_model
from lmcore.config import load_params
from lmcore.data.loader import TokenDataset
from lmcore.data.tokenize import tokenize
from lmcore.evaluation import perplexity
from lmcore.paths import DOCUMENTS
from lmcore.pretrain import pretrain
from lmcore.stages import StageContext
from lmcore.stages.collect import run as collect_run
from lmcore.stages.preprocess import run as preprocess_run
from lmcore.stages.train_tokenizer import read_documents
from lmcore.tokenizer import configured_ranks_file, get_tokenizer
from lmcore.training import cpu_has_native_bf16, token_bytes

ROOT = Path(__file__).resolve().parents[1]
# the from-scratch default's pretrain settings before issue 17 (params.yaml at commit 3e29066), where they differ
BEFORE = ["pretrain.model.vocab_size=50257", "pretrain.precision=fp32", "pretrain.compile=false"]


def corpus(root: Path, params_path: Path) -> StageContext:
    """The profile's sources collected (mirror first) and preprocessed into `root`, as the pipeline does."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(params_path.read_text())
    ctx = StageContext(root=root, params=load_params(params_path))
    collect_run(ctx)
    preprocess_run(ctx)
    return ctx


def one_row(ctx: StageContext, label: str, params, gpt2: bool, work: Path) -> dict:
    """Train the tokenizer (or take GPT-2's), tokenize, pretrain, score the whole val split."""
    tok_dir, tokens, model_dir, reports = (work / label / p for p in ("tokenizer", "tokens", "model", "reports"))
    started = time.perf_counter()
    if gpt2:
        tok = get_tokenizer("gpt2", configured_ranks_file(params.tokenize.ranks_file, ctx.root))
    else:
        cfg = params.train_tokenizer
        docs = [text for split, text in read_documents(ctx.layout.clean / DOCUMENTS, ctx.seed, params.tokenize.val_fraction)
                if split == "train"]
        text = train_bpe(docs, vocab_size=cfg.vocab_size, special_tokens=cfg.special_tokens, pattern=cfg.pattern,
                         min_frequency=cfg.min_frequency)
        tok = save_trained(text, tok_dir, name=f"bpe-{cfg.vocab_size}", eot=cfg.special_tokens[0])
    t_tok = time.perf_counter()
    tokenize(params.tokenize, ctx.layout.clean, tokens, ctx.seed, tokenizer=tok)
    t_shards = time.perf_counter()
    cfg = params.pretrain.model_copy(update={"init": "scratch", "eval_benchmarks_every": None,
                                             "eval_interval": params.pretrain.max_steps})
    pretrain(cfg, tokens, model_dir, reports, seed=ctx.seed)
    t_train = time.perf_counter()
    net = load_model(model_dir)
    score = perplexity(net, TokenDataset(tokens, "val"), 32, net.config.context_length, None, "cpu",
                       token_bytes(tok, net.config.vocab_size))
    return {"row": label, "vocab": tok.n_vocab, "params": sum(p.numel() for p in net.parameters()),
            "precision": params.pretrain.precision, "compile": params.pretrain.compile,
            "tokenizer_s": t_tok - started, "tokenize_s": t_shards - t_tok, "pretrain_s": t_train - t_shards,
            "total_s": t_train - started, "val_loss": score.loss, "val_bpb": score.bpb, "val_tokens": score.tokens}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "profiles" / "scratch.yaml")
    ap.add_argument("--steps", type=int, default=None, help="pretrain steps per row (default: pretrain.max_steps)")
    ap.add_argument("--vocab", type=int, nargs="*", default=[], help="more trained vocabulary sizes, one row each")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every row but `before`")
    ap.add_argument("--ablation", action="store_true", help="the profile's row with bf16 forced and with torch.compile")
    ap.add_argument("--no-before", action="store_true", help="leave out the `before` row (slow: GPT-2's vocabulary)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    steps = [f"pretrain.max_steps={args.steps}"] if args.steps else []
    new = [*args.sets, *steps]
    rows = [] if args.no_before else [("before (gpt2, fp32)", [*BEFORE, *steps], True)]
    rows.append(("scratch", new, False))
    rows += [(f"bpe-{v}", [*new, f"train_tokenizer.vocab_size={v}", f"pretrain.model.vocab_size={v}"], False) for v in args.vocab]
    if args.ablation:
        rows += [("scratch + bf16", [*new, "pretrain.precision=bf16"], False),
                 ("scratch + compile", [*new, "pretrain.compile=true"], False)]
    with tempfile.TemporaryDirectory(prefix="lmcore-scratch-profile-") as tmp:
        ctx = corpus(Path(tmp) / "project", args.params)
        results = []
        for label, overrides, gpt2 in rows:
            params = load_params(args.params, overrides)
            results.append(one_row(ctx, label.replace(" ", "_"), params, gpt2, Path(tmp)))
            results[-1]["row"] = label
            print(f"done {label}: {results[-1]['total_s']:.1f} s, val bpb {results[-1]['val_bpb']:.4f}", flush=True)
    base = results[0]
    print(f"\n{params.pretrain.max_steps} pretrain steps each; {torch.get_num_threads()} threads; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}\n")
    print("| row | vocab | params | precision | compile | tokenizer s | tokenize s | pretrain s | total s | speed-up | val loss (nats/token) | val bits/byte |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['vocab']:,} | {r['params']:,} | {r['precision']} | {r['compile']} | {r['tokenizer_s']:.1f} | "
              f"{r['tokenize_s']:.1f} | {r['pretrain_s']:.1f} | {r['total_s']:.1f} | {base['total_s'] / r['total_s']:.2f}x | "
              f"{r['val_loss']:.4f} | {r['val_bpb']:.4f} |")


if __name__ == "__main__":
    main()
