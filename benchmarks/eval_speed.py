"""Benchmark evaluation speed: lmcore against lm-evaluation-harness on the same items and the same weights, in one run.

    .venv/bin/python -m benchmarks.eval_speed                                   # the default profile's model shape
    .venv/bin/python -m benchmarks.eval_speed --model models/base --tasks hellaswag,mmlu --limit 50 --repeats 3
    .venv/bin/python -m benchmarks.eval_speed --gguf ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tasks gsm8k,ifeval --limit 32 --repeats 1 --threads 1 --clock process

The model: an lmcore model folder (`--model`, GPT-2 or Llama style, with the tokenizer it carries), a GGUF file
imported with lmcore.gguf.import_gguf into a temporary folder (`--gguf`), or by default a random GPT-2-style model
of the default profile's shape with the GPT-2 tokenizer. lm-eval gets the same weights as a transformers
GPT2LMHeadModel or LlamaForCausalLM (lmcore.hf.to_hf, with the tokenizer's bos/eos ids) and the same tokenizer:
the model folder's own as transformers' AutoTokenizer loads it (lmcore.hf.write_hf_tokenizer: its chat template
included), or GPT-2's built from the tiktoken ranks (benchmarks.peers.gpt2_tokenizer) for the GPT-2 encoding.
Benchmark data: `--data`, or collected from the offline mirror into the temporary folder.

Multiple-choice tasks (hellaswag, arc_*, truthfulqa_*, mmlu...): the same sampled items are scored twice,
alternating, `--repeats` times:
- lmcore: `lmcore.harness.scoring.score_items` (one packed row per item, its context computed once for all its
  choices, rows batched across items sorted by length, the LM head only at the scored positions);
- lm-eval: its own Hugging Face backend (`HFLM.loglikelihood`, with its one-token-continuation cache and length
  sorting) given the same (context, continuation) requests lm-eval's tasks would build. Its batch holds
  `--batch-size` requests; ours `--batch-size` items (each 2-10 requests), so lm-eval is also timed at 4x the
  batch size and the faster of its two settings is the reference.
"same picks": both pick the same choice for every item.
A group (mmlu) takes `--group-limit` items per subject (lm-eval's --limit is per subject too).

Generative tasks (ifeval, gsm8k; lmcore.harness.generative): the same sampled documents, prompted as lm-eval
prompts them (under the tokenizer's chat template when it has one, as `--apply_chat_template` does: gsm8k's five
examples as turns), completed greedily up to `--max-gen-toks` tokens (at most the task's own budget) with the task's
stop strings, alternating, `--repeats` times:
- lmcore: `generate_items` (the template rendered by lmcore.chat, the prompts encoded, cut to the context, and
  completed by lmcore.generation.generate_batch: at most `--batch-size` rows at a time, continuous batching, each
  prompt prefilled without padding);
- lm-eval: `HFLM.apply_chat_template` on the same messages, then `HFLM.generate_until` on generate_until Instances
  with the task's generation kwargs (until, greedy, max_gen_toks), `--batch-size` prompts at a time (HFLM pads a
  batch to its longest prompt and runs it until every row has stopped); timed at `--batch-size` only, lmcore's batch.
Both completions are scored by lm-eval's own scorers (IFEval's process_results; gsm8k's regex filters and
exact_match). "same texts" counts the items whose texts are equal; "same verdicts": every verdict of every item
(IFEval: prompt- and instruction-level, strict and loose; gsm8k: strict and flexible exact match) is equal.
Timing covers prompting, generation and decoding, not scoring (the same code on both sides).

Prints items/s of each side (median over repeats) and the ratio (lmcore / lm-eval). Wall-clock time by default;
on a machine other processes share, `--clock process --threads 1` times this process's CPU time instead (time
spent waiting for a core, or stopped, is not counted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.peers import gpt2_tokenizer, hf_causal_lm, hf_token_ids, hf_tokenizer, hflm
from lmcore.checkpoint import load_model
from lmcore.config import BENCHMARK_SOURCES, GENERATIVE_SOURCES, CollectConfig, ModelConfig
from lmcore.data.collect import collect, mirror_from_env
from lmcore.gguf import import_gguf
from lmcore.harness.benchmarks import Item, expand, sample, task_items
from lmcore.harness.generative import (
    EM_FLEXIBLE,
    EM_STRICT,
    GENERATIVE_TASKS,
    TASKS,
    GenItem,
    generate_items,
    generative_items,
    resolve_chat,
    score_gsm8k,
    score_ifeval,
)
from lmcore.harness.scoring import score_items
from lmcore.model import GPT
from lmcore.tokenizer import TIKTOKEN, Tokenizer, get_tokenizer, load_tokenizer

# --clock: elapsed time, or the CPU time of this process (all its threads), which other processes do not inflate.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def load(args: argparse.Namespace, work: Path) -> tuple[GPT, Tokenizer, str]:
    """(the lmcore model in eval mode, its tokenizer, what to call it): --gguf, --model or a random model."""
    folder = Path(args.model) if args.model else None
    if args.gguf:
        folder = work / "model"
        import_gguf(args.gguf, folder)
    if folder is not None:
        return load_model(folder).eval(), load_tokenizer(folder), str(args.gguf or args.model)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=128, n_embd=128, n_layer=4, n_head=4)).eval()
    return model, get_tokenizer("gpt2", os.environ.get("LMCORE_TIKTOKEN_FILE")), "random"


def peer_tokenizer(enc: Tokenizer, folder: Path):
    """The transformers tokenizer equal to `enc`: GPT-2's from its tiktoken ranks, else the files lmcore exports."""
    if enc.kind == TIKTOKEN and enc.name == "gpt2" and enc.ranks_file is not None:
        return gpt2_tokenizer(enc.ranks_file)
    folder.mkdir()
    return hf_tokenizer(enc, folder)


def benchmark_data(work: Path, generative: bool) -> Path:
    """The multiple-choice benchmarks (and the generative ones) collected from the offline mirror into `work`."""
    sources = [*BENCHMARK_SOURCES, *GENERATIVE_SOURCES] if generative else BENCHMARK_SOURCES
    collect(CollectConfig(sources=sources), work / "data", mirror=mirror_from_env(), cache_dir=work / "downloads")
    return work / "data"


def _timed(fn: Callable, clock: str):
    """(fn's result, the seconds it took on `clock`: a key of CLOCKS)."""
    tick = CLOCKS[clock]
    start = tick()
    result = fn()
    return result, tick() - start


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice


def lmeval_scores(lm, items: Sequence[Item]) -> list[list[float]]:
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


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def multiple_choice_row(task: str, model: GPT, enc: Tokenizer, peers: dict, data: Path, args: argparse.Namespace) -> float:
    """Time one multiple-choice task on both sides; print its row; return lmcore's items/s over lm-eval's best."""
    leaves = expand([task])
    limit = args.group_limit if len(leaves) > 1 else args.limit
    items = [it for leaf in leaves for it in sample(task_items(leaf, data), limit, args.seed)]
    times: dict = {"ours": [], **{bs: [] for bs in peers}}
    for _ in range(args.repeats):
        ours, t = _timed(lambda: score_items(model, enc, items, batch_size=args.batch_size, progress=False), args.clock)
        times["ours"].append(t)
        for bs, peer in peers.items():
            theirs, t = _timed(lambda peer=peer: lmeval_scores(peer, items), args.clock)
            times[bs].append(t)
    same = all(_argmax(t) == _argmax(o.loglikelihoods) for o, t in zip(ours, theirs))
    rate = {k: len(items) / statistics.median(v) for k, v in times.items()}
    ratio = rate["ours"] / max(rate[bs] for bs in peers)
    small, large = peers
    print(f"{task:<16}{len(items):>6}{rate['ours']:>13.2f}{rate[small]:>14.2f}{rate[large]:>12.2f}{ratio:>7.2f}x  {same}",
          flush=True)
    return ratio


# ---------------------------------------------------------------------------------------------------------------
# Generative


def lmeval_generate(lm, items: Sequence[GenItem], *, chat: bool, max_gen_toks: int) -> tuple[list[str], list[str]]:
    """lm-eval's completions of `items` through HFLM.generate_until, prompted as its task builds the requests.

    Returns: (the prompts handed to HFLM, its completions), in the items' order.
    """
    from lm_eval.api.instance import Instance

    task = TASKS[items[0].task]
    gen_kwargs = {"until": list(task.until), "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks}
    contexts = [lm.apply_chat_template(it.messages(), add_generation_prompt=True) if chat else it.text for it in items]
    requests = [Instance(request_type="generate_until", doc=it.doc, arguments=(ctx, dict(gen_kwargs)), idx=0,
                         metadata=(it.task, it.doc_id, 1)) for it, ctx in zip(items, contexts)]
    return contexts, lm.generate_until(requests, disable_tqdm=True)


def verdicts(item: GenItem, response: str) -> dict:
    """lm-eval's verdicts of one response: IFEval's four (prompt and instruction level, strict and loose), or
    gsm8k's exact match after each filter."""
    if item.task == "ifeval":
        return score_ifeval(item.doc, response)
    scores = score_gsm8k(item.doc, response)
    return {EM_STRICT: scores[EM_STRICT], EM_FLEXIBLE: scores[EM_FLEXIBLE]}


def generative_row(task: str, model: GPT, enc: Tokenizer, peer, data: Path, args: argparse.Namespace) -> float:
    """Time one generative task on both sides; print its row; return lmcore's items/s over lm-eval's."""
    items = generative_items(task, data, limit=args.limit, sample_seed=args.seed)
    chat = resolve_chat(enc, "auto")
    budget = min(args.max_gen_toks, TASKS[task].max_gen_toks)
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(args.repeats):
        ours, t = _timed(lambda: generate_items(model, enc, items, chat=chat, max_gen_toks=budget,
                                                batch_size=args.batch_size), args.clock)
        times["ours"].append(t)
        (prompts, theirs), t = _timed(lambda: lmeval_generate(peer, items, chat=chat, max_gen_toks=budget), args.clock)
        times["theirs"].append(t)
    if any(g.prompt != p for g, p in zip(ours, prompts)):
        print(f"  {task}: the prompts differ (lmcore.chat.render against HFLM.apply_chat_template)")
    texts = sum(g.response == r for g, r in zip(ours, theirs))
    same = all(verdicts(it, g.response) == verdicts(it, r) for it, g, r in zip(items, ours, theirs))
    rate = {k: len(items) / statistics.median(v) for k, v in times.items()}
    ratio = rate["ours"] / rate["theirs"]
    tokens = sum(len(g.ids) for g in ours)
    print(f"{task:<16}{len(items):>6}{rate['ours']:>13.2f}{rate['theirs']:>14.2f}{ratio:>7.2f}x"
          f"{f'{texts}/{len(items)}':>12}{budget:>9}{tokens / len(items):>10.1f}  {same}", flush=True)
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an lmcore model folder (default: a random model of the default profile's shape)")
    parser.add_argument("--gguf", help="a GGUF file, imported into a temporary lmcore model folder (instead of --model)")
    parser.add_argument("--tasks", default="hellaswag,arc_challenge,truthfulqa_mc2,mmlu",
                        help=f"multiple-choice tasks and groups, and the generative {', '.join(GENERATIVE_TASKS)}")
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    parser.add_argument("--group-limit", type=int, default=5, help="items per subject of a group (mmlu: 57 subjects)")
    parser.add_argument("--max-gen-toks", type=int, default=1280,
                        help="tokens generated per item at most (each task's own budget caps it: ifeval 1280, gsm8k 256)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--data", help="a collected benchmark folder (default: collected from the mirror into a temp folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time; process: this process's CPU time (a shared machine, --threads 1)")
    args = parser.parse_args(argv)
    if args.model and args.gguf:
        parser.error("give --model or --gguf, not both")
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    generative = [t for t in tasks if t in GENERATIVE_TASKS]
    choice = [t for t in tasks if t not in GENERATIVE_TASKS]

    with tempfile.TemporaryDirectory(prefix="lmcore-bench-") as tmp:
        work = Path(tmp)
        model, enc, name = load(args, work)
        data = Path(args.data) if args.data else benchmark_data(work, bool(generative))
        hf = hf_causal_lm(model, hf_token_ids(enc))
        tokenizer = peer_tokenizer(enc, work / "hf-tokenizer")
        ctx = model.config.context_length
        peers = {bs: hflm(hf, tokenizer, batch_size=bs, max_length=ctx) for bs in (args.batch_size, 4 * args.batch_size)}
        print(f"model: {name} ({model.num_params():,} params, context {ctx}); tokenizer {enc.name}; "
              f"threads {torch.get_num_threads()}; batch {args.batch_size}; {args.clock} clock, median of {args.repeats}")
        ratios = []
        if choice:
            print(f"{'task':<16}{'items':>6}{'lmcore it/s':>13}{'lm-eval it/s':>14}{'(4x batch)':>12}{'ratio':>8}  same picks")
            ratios += [multiple_choice_row(t, model, enc, peers, data, args) for t in choice]
        if generative:
            print(f"{'task':<16}{'items':>6}{'lmcore it/s':>13}{'lm-eval it/s':>14}{'ratio':>8}{'same texts':>12}"
                  f"{'max toks':>9}{'toks/item':>10}  same verdicts")
            ratios += [generative_row(t, model, enc, peers[args.batch_size], data, args) for t in generative]
        print(f"median ratio over tasks: {statistics.median(ratios):.2f}x (lmcore items/s / lm-eval's best items/s)")


if __name__ == "__main__":
    main()
