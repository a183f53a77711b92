"""Batched generation speed: lmcore's `generate_batch` against transformers' `generate`, same weights, same prompts.

    .venv/bin/python -m benchmarks.generate_speed            # SmolLM2-135M-Instruct (GGUF), batch 1, 8 and 32
    .venv/bin/python -m benchmarks.generate_speed --model models/instruct --batch-sizes 1,16 --max-new-tokens 128
    .venv/bin/python -m benchmarks.generate_speed --tiny --batch-sizes 1,3 --max-new-tokens 4 --repeats 1   # smoke run

The model: an lmcore model folder, or a GGUF file imported with lmcore.gguf.import_gguf into a temporary folder
(default: ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to float32); `--tiny` builds a tiny
random Llama-style model (GPT-2 tokenizer) instead. transformers gets the same float32 weights through lmcore.hf.to_hf
(benchmarks.decode_speed.hf_peer). The prompts (`--prompts`: a text file, one prompt per line; default: PROMPTS, of
different lengths) go through the model's chat template as one user message when its tokenizer has one.

At batch size B the first B prompts (cycled when fewer) are completed greedily, up to `--max-new-tokens` each, and
both sides stop a row at the same end ids (the tokenizer's stop tokens and the template's end of turn):
- lmcore: `generate_batch(temperature=0, batch_size=B)`: each prompt prefilled alone (no padding), then decoded
  together, each row at its own positions; a finished row leaves the batch;
- transformers: `generate(do_sample=False)` on the left-padded batch with its attention mask; a finished row is
  padded until every row has finished.
tokens/s counts the generated tokens of every row (an end id included, padding not), over the wall time of the whole
call (prefill and decode), median of `--repeats` runs after one warm-up of each side; the runs alternate.
"identical" counts the rows whose greedy ids are the same on both sides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.decode_speed import hf_peer
from lmcore import chat
from lmcore.checkpoint import load_model
from lmcore.config import ModelConfig
from lmcore.generation import encode_prompt, generate_batch
from lmcore.gguf import import_gguf
from lmcore.model import GPT
from lmcore.tokenizer import get_tokenizer, load_tokenizer

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(preset="llama-micro", context_length=128)  # RoPE, grouped-query attention; the GPT-2 vocabulary
PROMPTS = [
    "Explain in two sentences why the sky is blue.",  # first: batch 1 times a reply of some length
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three primary colors.",
    "Translate 'good morning' into Spanish, French and German.",
    "What is 12 times 13?",
    "Give me a short tip for learning to play the guitar as an adult with little free time.",
    "Name a famous painting by Leonardo da Vinci.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "Why do cats purr?",
    "Suggest a name for a small bakery that sells bread made with old grains and sourdough.",
    "What does a compiler do?",
    "Write a one-line Python function that reverses a string.",
    "How many legs does a spider have?",
    "Describe the smell of rain.",
    "What are the benefits of regular exercise for people who work at a desk all day?",
    "Hi!",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "What is photosynthesis?",
    "Give two reasons to learn a second language.",
    "Who wrote 'Pride and Prejudice'?",
    "Write a short, polite email declining a meeting invitation because of a scheduling conflict next Tuesday.",
    "What is the largest planet in the solar system?",
    "Tell me a fun fact about octopuses.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Recommend a book for someone who liked 'The Hobbit'.",
    "Explain what a prime number is to a ten-year-old.",
    "What is the boiling point of water at sea level?",
    "Write a limerick about a cat who loves to sleep in the sun all afternoon.",
    "Why is the ocean salty?",
    "Name three renewable sources of energy.",
]


def load(model: str | None, tiny: bool, work: Path) -> tuple[GPT, object, str]:
    """(the lmcore model in eval mode, its tokenizer, a name for the table)."""
    if tiny:
        torch.manual_seed(0)
        return GPT(ModelConfig(**TINY)).eval(), get_tokenizer("gpt2"), "tiny random Llama-style"
    path = Path(model) if model else SMOLLM2
    if path.suffix == ".gguf":
        folder = work / "model"
        import_gguf(path, folder)
    else:
        folder = path
    return load_model(folder), load_tokenizer(folder), path.name


def prompt_ids(enc, texts: list[str]) -> tuple[list[list[int]], list[int]]:
    """The prompts' ids (in the chat template when the tokenizer has one) and the ids that end a reply."""
    if getattr(enc, "chat_template", None):
        return [chat.prompt_ids(enc, [{"role": "user", "content": t}]) for t in texts], chat.stop_tokens(enc)
    return [encode_prompt(enc, t) for t in texts], list(enc.stop_tokens)


def hf_generate(hf, prompts: list[list[int]], max_new_tokens: int, ends: list[int]) -> list[list[int]]:
    """transformers' greedy completions of `prompts` in one left-padded batch, each cut after its first end id."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), ends[0], dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(idx)
    for r, p in enumerate(prompts):
        idx[r, T - len(p) :] = torch.tensor(p)
        mask[r, T - len(p) :] = 1
    out = hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=ends,
                      pad_token_id=ends[0])
    rows = []
    for new in out[:, T:].tolist():
        end = next((i + 1 for i, t in enumerate(new) if t in ends), len(new))
        rows.append(new[:end])
    return rows


def bench(model: GPT, hf, enc, prompts: list[list[int]], ends: list[int], *, max_new_tokens: int, repeats: int) -> dict:
    """Time both sides on one batch of prompts; returns tokens/s (median) and the rows with identical ids."""
    def lmcore() -> list[list[int]]:
        done = generate_batch(model, enc, prompts, max_new_tokens, stop_ids=ends, batch_size=len(prompts))
        return [c.token_ids for c in done]

    runs = {
        "lmcore": lmcore,
        "transformers": lambda: hf_generate(hf, prompts, max_new_tokens, ends),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs: dict[str, list[list[int]]] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for key, fn in runs.items():
                start = time.perf_counter()
                outs[key] = fn()
                times[key].append(time.perf_counter() - start)
    tps = {k: sum(len(r) for r in outs[k]) / statistics.median(v) for k, v in times.items()}
    same = sum(a == b for a, b in zip(outs["lmcore"], outs["transformers"]))
    return {"tps": tps, "identical": same, "prompt_tokens": sum(len(p) for p in prompts),
            "new_tokens": sum(len(r) for r in outs["lmcore"])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help=f"an lmcore model folder or a .gguf file (default: {SMOLLM2.name})")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama-style model instead of --model (smoke run)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=Path, default=None, help="a text file, one prompt per line (default: built in)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads (default: every core this process may use)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    texts = [line for line in args.prompts.read_text().splitlines() if line.strip()] if args.prompts else PROMPTS
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    import transformers

    with tempfile.TemporaryDirectory(prefix="generate-speed-") as work:
        model, enc, name = load(args.model, args.tiny, Path(work))
        hf = hf_peer(model)
        ids, ends = prompt_ids(enc, texts)
        c = model.config
        print(f"{name} ({c.n_layer}x{c.n_embd}, vocab {c.vocab_size}), torch {torch.__version__}, transformers "
              f"{transformers.__version__}, {torch.get_num_threads()} threads; greedy, up to {args.max_new_tokens} new "
              f"tokens a prompt, ends {ends}, median of {args.repeats}")
        print()
        print("| batch | prompt tokens | new tokens | lmcore tok/s | transformers tok/s | lmcore / transformers | identical greedy |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        bench(model, hf, enc, ids[:1], ends, max_new_tokens=2, repeats=1)  # warm-up
        for B in sizes:
            batch = [ids[i % len(ids)] for i in range(B)]
            r = bench(model, hf, enc, batch, ends, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
            t = r["tps"]
            print(f"| {B} | {r['prompt_tokens']} | {r['new_tokens']} | {t['lmcore']:.0f} | {t['transformers']:.0f} | "
                  f"{t['lmcore'] / t['transformers']:.2f}x | {r['identical']}/{B} rows |", flush=True)


if __name__ == "__main__":
    main()
