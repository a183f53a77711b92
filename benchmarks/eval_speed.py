"""Benchmark scoring speed: lmcore against lm-evaluation-harness on the same items and the same weights, in one run.

    .venv/bin/python -m benchmarks.eval_speed                                   # the default profile's model shape
    .venv/bin/python -m benchmarks.eval_speed --model models/base --tasks hellaswag,mmlu --limit 50 --repeats 3

For each task the same sampled items are scored twice, alternating, `--repeats` times:
- lmcore: `lmcore.harness.scoring.score_items` (one packed row per item, its context computed once for all its
  choices, rows batched across items sorted by length, the LM head only at the scored positions);
- lm-eval: its own Hugging Face backend (`HFLM.loglikelihood`, with its one-token-continuation cache and length
  sorting) on the same weights exported to a transformers GPT2LMHeadModel, given the same (context, continuation)
  requests lm-eval's tasks would build. Its batch holds `--batch-size` requests; ours `--batch-size` items
  (each 2-10 requests), so lm-eval is also timed at 4x the batch size and the faster of its two settings is the
  reference.
Prints items/s of each (median over repeats), the ratio, and whether both pick the same choice for every item.
A group (mmlu) takes `--group-limit` items per subject (lm-eval's --limit is per subject too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.peers import gpt2_tokenizer, lmeval_hflm
from lmcore.checkpoint import load_model
from lmcore.config import BENCHMARK_SOURCES, CollectConfig, ModelConfig
from lmcore.data.collect import collect, mirror_from_env
from lmcore.harness.benchmarks import expand, sample, task_items
from lmcore.harness.scoring import score_items
from lmcore.model import GPT
from lmcore.tokenizer import get_encoding


def lmeval_scores(lm, items) -> list[list[float]]:
    """lm-eval's log-likelihood of every choice of every item, through its LM.loglikelihood API."""
    from lm_eval.api.instance import Instance

    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(item.context, cont), idx=j, metadata=(item.task, i, 1))
        for i, item in enumerate(items)
        for j, cont in enumerate(item.continuations)
    ]
    flat = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    out, k = [], 0
    for item in items:
        out.append(flat[k : k + len(item.choices)])
        k += len(item.choices)
    return out


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an lmcore model folder (default: a random model of the default profile's shape)")
    parser.add_argument("--tasks", default="hellaswag,arc_challenge,truthfulqa_mc2,mmlu")
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    parser.add_argument("--group-limit", type=int, default=5, help="items per subject of a group (mmlu: 57 subjects)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--data", help="a collected benchmark folder (default: collected from the mirror into a temp folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ranks = os.environ.get("LMCORE_TIKTOKEN_FILE", "../shared/tokenizers/gpt2.tiktoken")
    enc = get_encoding("gpt2", ranks_file=ranks)
    if args.model:
        model = load_model(args.model).eval()
    else:
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=50257, context_length=128, n_embd=128, n_layer=4, n_head=4)).eval()
    tmp = tempfile.TemporaryDirectory(prefix="lmcore-bench-")
    data = Path(args.data) if args.data else Path(tmp.name)
    if not args.data:
        collect(CollectConfig(sources=BENCHMARK_SOURCES), data, mirror=mirror_from_env())
    tokenizer = gpt2_tokenizer(ranks)
    peers = {bs: lmeval_hflm(model, tokenizer, batch_size=bs) for bs in (args.batch_size, 4 * args.batch_size)}

    print(f"model: {args.model or 'random'} ({model.num_params():,} params, context {model.config.context_length}); "
          f"threads {torch.get_num_threads()}; batch {args.batch_size}; median of {args.repeats}")
    print(f"{'task':<16}{'items':>6}{'lmcore it/s':>13}{'lm-eval it/s':>14}{'(4x batch)':>12}{'ratio':>8}  same picks")
    ratios = []
    for task in args.tasks.split(","):
        leaves = expand([task])
        limit = args.group_limit if len(leaves) > 1 else args.limit
        items = [it for leaf in leaves for it in sample(task_items(leaf, data), limit, args.seed)]
        times = {"ours": [], **{bs: [] for bs in peers}}
        for _ in range(args.repeats):
            ours, t = _timed(lambda: score_items(model, enc, items, batch_size=args.batch_size, progress=False))
            times["ours"].append(t)
            for bs, peer in peers.items():
                theirs, t = _timed(lambda peer=peer: lmeval_scores(peer, items))
                times[bs].append(t)
        same = all(
            max(range(len(t)), key=t.__getitem__) == max(range(len(o.loglikelihoods)), key=o.loglikelihoods.__getitem__)
            for o, t in zip(ours, theirs)
        )
        rate = {k: len(items) / statistics.median(v) for k, v in times.items()}
        peer_rate = max(rate[bs] for bs in peers)
        ratios.append(rate["ours"] / peer_rate)
        print(f"{task:<16}{len(items):>6}{rate['ours']:>13.1f}{rate[args.batch_size]:>14.1f}{rate[4 * args.batch_size]:>12.1f}"
              f"{ratios[-1]:>7.2f}x  {same}")
    print(f"median ratio over tasks: {statistics.median(ratios):.2f}x (lmcore items/s / lm-eval's best items/s)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
