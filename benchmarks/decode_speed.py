"""Decode speed: lmcore with and without the KV cache against transformers `generate` on the same weights.

    .venv/bin/python -m benchmarks.decode_speed --threads 1           # GPT-2 6x384 (context 512), tiny, Llama 6x384
    .venv/bin/python -m benchmarks.decode_speed --shapes 6x384 --repeats 7 --new-tokens 256 --device cuda
    .venv/bin/python -m benchmarks.decode_speed --shapes tiny,llama-tiny --new-tokens 8 --repeats 1   # a smoke run

For each shape a model is built with random weights (seed 0) and exported to transformers: GPT-2 shapes to a
GPT2LMHeadModel (lmcore.hf.to_hf_gpt2, as benchmarks.peers), the Llama-style shape to a LlamaForCausalLM
(lmcore.hf.to_hf). From one random prompt (batch 1, `--prompt-len` tokens) each side produces `--new-tokens`
greedy tokens (fewer when the context is shorter: prompt plus new tokens fit the context):
- lmcore cache: `lmcore.generation.generate(temperature=0)` (prefill, then one token per step on the KV cache);
- lmcore no cache: the same with `use_cache=False` (the whole context at every step);
- transformers: `generate(do_sample=False, max_new_tokens=..., use_cache=True)`, no end-of-text stop.
The three runs alternate, `--repeats` times after one warm-up each; a run's time covers prefill and decode, all
tokens generated. Prints tokens/s (median), the ratios, and whether the token ids agree with transformers'.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.peers import hf_model
from lmcore.config import ModelConfig
from lmcore.generation import generate
from lmcore.model import GPT

SHAPES = {
    "6x384": dict(n_layer=6, n_embd=384, n_head=6, context_length=512),
    "tiny": {},  # ModelConfig's defaults: 2 layers x 128, 4 heads, context 128
    "llama-6x384": dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_weights=False,
                        n_layer=6, n_embd=384, n_head=6, n_kv_head=2, context_length=512),
    "llama-tiny": dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_weights=False, n_kv_head=2),
}


def hf_peer(model: GPT):
    """The same weights in transformers: GPT2LMHeadModel (benchmarks.peers.hf_model) or LlamaForCausalLM."""
    if model.config.positions == "learned":
        return hf_model(model)
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmcore.hf import to_hf

    config, state = to_hf(model)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not match transformers' model: missing {missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[torch.Tensor, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def bench_shape(name: str, *, prompt_len: int, new_tokens: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SHAPES[name])).to(device).eval()
    hf = hf_peer(model)
    hf.generation_config.eos_token_id = None  # no early stop: lmcore runs with no eos either
    hf.generation_config.pad_token_id = 0
    n = min(new_tokens, model.config.context_length - prompt_len)
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(idx)

    runs = {
        "lmcore cache": lambda: generate(model, idx, n, temperature=0),
        "lmcore no cache": lambda: generate(model, idx, n, temperature=0, use_cache=False),
        "transformers": lambda: hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs = {}
    with torch.inference_mode():
        for key, fn in runs.items():  # warm-up
            outs[key] = fn()[0, prompt_len:].tolist()
        for _ in range(repeats):
            for key, fn in runs.items():
                times[key].append(_timed(fn, device)[1])
    ref = outs["transformers"]
    agree = {}
    for key in ("lmcore cache", "lmcore no cache"):
        mismatch = next((i for i, (a, b) in enumerate(zip(outs[key], ref)) if a != b), None)
        agree[key] = "yes" if mismatch is None and len(outs[key]) == len(ref) else f"no (first at token {mismatch})"
    tps = {k: n / statistics.median(v) for k, v in times.items()}
    return {"shape": name, "config": model.config, "new_tokens": n, "tps": tps, "agree": agree}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="6x384,tiny,llama-6x384", help=f"comma-separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} threads; batch 1, prompt {args.prompt_len} tokens, greedy, median of {args.repeats}")
    print()
    print("| shape | new tokens | lmcore cache tok/s | lmcore no cache tok/s | transformers tok/s | cache / transformers | cache / no cache | ids agree (cache, no cache) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in args.shapes.split(","):
        r = bench_shape(name.strip(), prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, device=args.device)
        c = r["config"]
        t = r["tps"]
        print(
            f"| {r['shape']} ({'Llama' if c.positions == 'rope' else 'GPT-2'} {c.n_layer}x{c.n_embd}, ctx {c.context_length}) | {r['new_tokens']} | {t['lmcore cache']:.0f} | "
            f"{t['lmcore no cache']:.0f} | {t['transformers']:.0f} | {t['lmcore cache'] / t['transformers']:.2f}x | "
            f"{t['lmcore cache'] / t['lmcore no cache']:.2f}x | {r['agree']['lmcore cache']}, {r['agree']['lmcore no cache']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
