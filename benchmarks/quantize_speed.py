"""Quantized serving: float32 against int8 (lmcore.quantize) on the same model in one process, decode speed and
benchmark accuracy.

    flock /tmp/lmcore-bench.lock .venv/bin/python -m benchmarks.quantize_speed    # SmolLM2-135M from the mirror's GGUF
    .venv/bin/python -m benchmarks.quantize_speed --model models/instruct --tasks hellaswag,arc_easy --limit 100
    .venv/bin/python -m benchmarks.quantize_speed --random --new-tokens 4 --repeats 1 --tasks ""   # a smoke run

The model: `--gguf` (default: SmolLM2-135M-Instruct.Q4_1.gguf of $LMCORE_MIRROR/models, else ../shared/data/models)
imported into a temporary folder, an lmcore model folder (`--model`), or `--random`: a tiny random Llama-style model
with the GPT-2 tokenizer (no accuracy). It is loaded twice: as it is (float32) and through
`quantize(model, "int8")` (timed: calibration included).

Speed: greedy decoding (`lmcore.generation.generate`, temperature 0, no end id) of `--new-tokens` tokens after a
prompt of `--prompt-len` tokens of English text (PROMPT_TEXT, row i from its i-th word on), batch 1 and batch
`--batch` (rows decoded together: aggregate tokens/s). A run's time covers prefill and decode. The two models
alternate, `--repeats` times after one warm-up each; prints tokens/s (median), the speed-up, and how many of the
first generated tokens int8 picks as float32 does, on average over the rows (greedy paths part for good at the
first token where the two models' top choices differ). The load average before and after says
whether other processes shared the cores (timings then mean little; `--threads` 1 suffers least).

Accuracy: lmcore's benchmark harness (`lmcore.harness.run.run_benchmarks`, as `lmcore eval` runs it) scores both
models on the same fixed sample (`--tasks`, `--limit` items each, `--seed`): each task's headline metric (acc_norm
for hellaswag and arc) ± its standard error, the paired change int8 - float32 over the same items ± its standard
error (lmcore.promotion.paired_difference), and over all items together. The check: |change| is at most one
standard error of the float32 score; the script exits with status 1 when it is not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmcore.checkpoint import load_model
from lmcore.config import BENCHMARK_SOURCES, CollectConfig, ModelConfig
from lmcore.data.collect import collect, mirror_from_env
from lmcore.generation import generate
from lmcore.gguf import import_gguf
from lmcore.harness.benchmarks import headline_metric
from lmcore.harness.metrics import mean_stderr
from lmcore.harness.run import SAMPLES_DIR, family, run_benchmarks
from lmcore.model import GPT
from lmcore.promotion import paired_difference
from lmcore.quantize import INT8, quantize
from lmcore.tokenizer import get_tokenizer, load_tokenizer

SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf"  # under the mirror
FLOAT, QUANT = "float32", INT8
PROMPT_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern and a thermos of "
    "tea. From the gallery he could see the whole bay: the fishing boats coming home, the gulls circling the harbour, "
    "and the long grey line of the breakwater. He had kept the light for thirty years, and in all that time the lamp "
    "had failed only once, on the night of the great storm, when the wind tore the shutters from their hinges and "
)


def default_gguf() -> Path:
    mirror = mirror_from_env()
    if mirror is not None and (mirror / SMOLLM2).is_file():
        return mirror / SMOLLM2
    return Path(__file__).resolve().parents[2] / "shared" / "data" / SMOLLM2


def load_models(args: argparse.Namespace, work: Path) -> tuple[dict[str, GPT], object, str, float]:
    """({"float32": model, "int8": the same weights quantized}, tokenizer, name, seconds `quantize` took)."""
    if args.random:
        def build() -> GPT:
            torch.manual_seed(0)
            return GPT(ModelConfig(preset="llama-micro", vocab_size=50257, context_length=128)).eval()
        enc, name = get_tokenizer("gpt2", os.environ.get("LMCORE_TIKTOKEN_FILE")), "random llama-micro"
    else:
        folder = Path(args.model) if args.model else work / "model"
        if not args.model:
            import_gguf(args.gguf or default_gguf(), folder)
        build = lambda: load_model(folder).eval()  # noqa: E731
        enc, name = load_tokenizer(folder), str(args.model or args.gguf or default_gguf().name)
    quantized = build()
    start = time.perf_counter()
    quantize(quantized, INT8)
    return {FLOAT: build(), QUANT: quantized}, enc, name, time.perf_counter() - start


def prompts(enc, rows: int, length: int) -> torch.Tensor:
    """(rows, length) token ids: PROMPT_TEXT from its i-th word on for row i, repeated as needed."""
    words = PROMPT_TEXT.split(" ")
    out = []
    for i in range(rows):
        ids: list[int] = []
        while len(ids) < length:
            ids += enc.encode(" ".join(words[i % len(words) :] + words[: i % len(words)]) + " ")
        out.append(ids[:length])
    return torch.tensor(out)


def decode_speed(models: dict[str, GPT], enc, rows: int, args: argparse.Namespace) -> dict[str, dict]:
    """{name: {"tok_s": median tokens/s over all rows, "runs": [...], "tokens": the last run's ids}}, alternating."""
    prompt = prompts(enc, rows, args.prompt_len)
    out = {name: {"runs": []} for name in models}
    with torch.no_grad():
        for name, model in models.items():  # warm-up: first-call allocations, oneDNN's kernel choice
            generate(model, prompt, min(4, args.new_tokens), temperature=0)
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                ids = generate(model, prompt, args.new_tokens, temperature=0)
                out[name]["runs"].append(rows * args.new_tokens / (time.perf_counter() - start))
                out[name]["tokens"] = ids[:, args.prompt_len :]
    for r in out.values():
        r["tok_s"] = statistics.median(r["runs"])
    return out


def same_first(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(rows,) how many leading tokens two (rows, n) id tensors share."""
    differs = torch.cat([a != b, torch.ones(len(a), 1, dtype=torch.bool)], dim=1)  # a last column that always differs
    return differs.int().argmax(dim=1)  # the first True


def print_speed(label: str, speed: dict[str, dict]) -> float:
    ratio = speed[QUANT]["tok_s"] / speed[FLOAT]["tok_s"]
    same = same_first(speed[QUANT]["tokens"], speed[FLOAT]["tokens"]).float().mean().item()
    runs = lambda name: ", ".join(f"{x:.1f}" for x in speed[name]["runs"])  # noqa: E731
    print(f"{label:<10}{speed[FLOAT]['tok_s']:>12.1f}{speed[QUANT]['tok_s']:>12.1f}{ratio:>10.2f}x{same:>12.1f}"
          f"   runs: float32 [{runs(FLOAT)}]  int8 [{runs(QUANT)}]", flush=True)
    return ratio


def verdicts(out_dir: Path, tasks: list[str]) -> dict[str, dict[int, float]]:
    """{task: {doc_id: its headline metric (1.0 right, 0.0 wrong)}} from a run_benchmarks out folder."""
    got: dict[str, dict[int, float]] = {}
    for name in dict.fromkeys(family(t) for t in tasks):
        for line in (out_dir / SAMPLES_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            got.setdefault(r["task"], {})[r["doc_id"]] = r[headline_metric(r["task"]).rpartition(".")[2]]
    return got


def accuracy(models: dict[str, GPT], enc, args: argparse.Namespace, work: Path) -> bool:
    """Score both models on the same sample; print the table; True when every change is within one standard error."""
    tasks = [t for t in args.tasks.split(",") if t]
    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        collect(CollectConfig(sources=BENCHMARK_SOURCES), data, mirror=mirror_from_env(), cache_dir=work / "downloads")
    per_model, elapsed = {}, {}
    for name, model in models.items():
        results = run_benchmarks(model, enc, data, work / name, tasks=tasks, limit=args.limit, sample_seed=args.seed,
                                 batch_size=args.eval_batch_size, model_ref=name, progress=False)
        per_model[name], elapsed[name] = verdicts(work / name, tasks), results["elapsed_s"]
    print(f"\n{'task':<14}{'metric':<10}{'n':>4}{'float32':>18}{'int8':>18}{'change ± paired se':>22}  within one se")
    ok = True
    pooled: dict[str, list[float]] = {FLOAT: [], QUANT: []}
    rows = [(t, headline_metric(t).rpartition(".")[2], sorted(per_model[FLOAT][t])) for t in per_model[FLOAT]]
    for task, metric, docs in rows + [("all", "mixed", None)]:
        if docs is None:
            a, b = pooled[FLOAT], pooled[QUANT]
        else:
            a, b = [per_model[FLOAT][task][d] for d in docs], [per_model[QUANT][task][d] for d in docs]
            pooled[FLOAT] += a
            pooled[QUANT] += b
        se_a, se_b = mean_stderr(a), mean_stderr(b)
        change, se_change = paired_difference(b, a)
        within = abs(change) <= se_a
        ok &= within
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        print(f"{task:<14}{metric:<10}{len(a):>4}{mean(a):>10.3f} ± {se_a:.3f}{mean(b):>10.3f} ± {se_b:.3f}"
              f"{change:>+13.3f} ± {se_change:.3f}  {'yes' if within else 'NO'} "
              f"(|change| {abs(change):.3f}, float se {se_a:.3f})")
    n = len(pooled[FLOAT])
    print(f"scoring {n} items: float32 {elapsed[FLOAT]:.1f} s, int8 {elapsed[QUANT]:.1f} s "
          f"({elapsed[FLOAT] / elapsed[QUANT]:.2f}x); sample seed {args.seed}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="a GGUF file (default: the mirror's SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--model", help="an lmcore model folder instead of the GGUF")
    parser.add_argument("--random", action="store_true", help="a tiny random model (a smoke run; no accuracy)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="rows of the batched run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", default="hellaswag,arc_easy", help="multiple-choice tasks scored ('' for none)")
    parser.add_argument("--limit", type=int, default=50, help="items per task")
    parser.add_argument("--seed", type=int, default=1234, help="the benchmark sample's seed (and the prompts')")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--data", help="a collected benchmark folder (default: collected from the mirror)")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.gguf, args.model, args.random))) > 1:
        parser.error("give one of --gguf, --model, --random")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lmcore-quantize-") as tmp:
        work = Path(tmp)
        models, enc, name, quantize_s = load_models(args, work)
        cfg = models[FLOAT].config
        print(f"model: {name} ({models[FLOAT].num_params():,} params, {cfg.n_layer} layers x {cfg.n_embd}); "
              f"threads {torch.get_num_threads()}; quantize int8: {quantize_s:.1f} s; prompt {args.prompt_len} tokens, "
              f"{args.new_tokens} new, greedy, median of {args.repeats}; load average {load_before:.1f}")
        print(f"{'decode':<10}{'float32':>12}{'int8':>12}{'speed-up':>11}{'same first':>12}"
              "   (tokens/s; same first: tokens)")
        print_speed("batch 1", decode_speed(models, enc, 1, args))
        if args.batch > 1:
            print_speed(f"batch {args.batch}", decode_speed(models, enc, args.batch, args))
        print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
        ok = True
        if args.tasks and not args.random:
            ok = accuracy(models, enc, args, work)
            print(f"accuracy change within one standard error on every row: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
