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

    .venv/bin/python -m benchmarks.decode_speed --gguf --threads 2    # SmolLM2-135M: llama.cpp, lmcore, transformers
    .venv/bin/python -m benchmarks.decode_speed --gguf --threads 2 --new-tokens 8 --batch 4 --repeats 1   # a smoke run

`--gguf [PATH]` (default ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf): the file imported into lmcore
(lmcore.gguf.import_gguf, float32), exported again with `export_gguf(dtype="f32")` for llama.cpp (llama-cpp-python,
`n_threads` = `--threads`) and handed to transformers (LlamaForCausalLM, lmcore.hf.to_hf): one set of float32
weights for all. From one prompt (`--prompt-len` tokens of a text) each greedily decodes `--new-tokens` tokens:
- llama.cpp batch 1: `Llama.generate(temp=0, top_k=1)`;
- lmcore batch 1: `lmcore.generation.stream(temperature=0)` on the KV cache;
- lmcore batch `--batch` (32): the same on `--batch` rows (the prompt's tokens rotated by the row, one length), every
  row decoding at every step: aggregate tokens/s = rows x tokens / time;
- transformers batch 1: `generate(do_sample=False, use_cache=True)`, no end-of-text stop.
Decode tokens/s counts the steps after the first token (prefill and first token left out): (n - 1) / (time of the
n-th token - time of the first), each token's time taken as the engine hands it over (transformers: a streamer).
Medians of `--repeats` runs after one warm-up each, the runs alternating; the ratios are lmcore's against llama.cpp's
batch 1, and the ids of lmcore and transformers are compared with llama.cpp's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.peers import hf_model
from lmcore.checkpoint import load_model
from lmcore.config import ModelConfig
from lmcore.generation import generate, stream
from lmcore.model import GPT

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
        "metal type, oil-based ink and a wooden press adapted from those used to make wine. Within fifty years")

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


def _stamps(tokens, n: int) -> list[float]:
    """perf_counter() as each of the first n items of the generator `tokens` arrives; then the generator is closed
    (lmcore's stream drops its KV cache, llama.cpp's generate would go on forever)."""
    out = []
    try:
        for _ in tokens:
            out.append(time.perf_counter())
            if len(out) == n:
                break
    finally:
        tokens.close()
    return out


class _Stamps:
    """A transformers streamer that notes when each new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _first(tokens, n: int) -> list[int]:
    """The first n items of the generator `tokens`, which is then closed."""
    out = []
    try:
        for t in tokens:
            out.append(int(t))
            if len(out) == n:
                break
    finally:
        tokens.close()
    return out


def _decode_tps(times: list[float], rows: int) -> float:
    """Tokens/s of the steps after the first token: rows x (n - 1) / (t_n - t_1)."""
    return rows * (len(times) - 1) / (times[-1] - times[0])


def bench_gguf(path: Path, *, prompt_len: int, new_tokens: int, batch: int, repeats: int, threads: int) -> dict:
    """llama.cpp, lmcore (batch 1 and `batch`) and transformers decoding the same float32 weights; see the docstring."""
    from llama_cpp import Llama

    from lmcore.gguf import export_gguf, import_gguf
    from lmcore.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="decode-speed-") as tmp:
        folder, f32 = Path(tmp) / "model", Path(tmp) / "model.f32.gguf"
        import_gguf(path, folder)
        export_gguf(folder, f32, dtype="f32")
        model, tok = load_model(folder).eval(), load_tokenizer(folder)
        llm = Llama(model_path=str(f32), n_ctx=prompt_len + new_tokens + 8, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
    hf = hf_peer(model)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = (tok.encode(TEXT) * prompt_len)[:prompt_len]
    idx = torch.tensor([ids])  # (1, T)
    rows = torch.stack([idx[0].roll(r) for r in range(batch)])  # (batch, T): one length, different prompts
    n = new_tokens
    kv = dict(temperature=0)

    def hf_run() -> list[float]:
        streamer = _Stamps()
        hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                    use_cache=True, streamer=streamer)
        return streamer.times[1:]

    runs = {
        "llama.cpp b1": (1, lambda: _stamps(llm.generate(ids, temp=0.0, top_k=1, reset=True), n)),
        "lmcore b1": (1, lambda: _stamps(stream(model, idx, n, **kv), n)),
        f"lmcore b{batch}": (batch, lambda: _stamps(stream(model, rows, n, **kv), n)),
        "transformers b1": (1, hf_run),
    }
    tokens = {
        "llama.cpp b1": _first(llm.generate(ids, temp=0.0, top_k=1, reset=True), n),
        "lmcore b1": generate(model, idx, n, **kv)[0, prompt_len:].tolist(),
        "transformers b1": hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, use_cache=True)[0, prompt_len:].tolist(),
    }
    tps: dict[str, list[float]] = {k: [] for k in runs}
    matmul_s = []
    with torch.inference_mode():
        for _, fn in runs.values():  # warm-up
            fn()
        matmul_step(model)
        for _ in range(repeats):
            for key, (b, fn) in runs.items():
                tps[key].append(_decode_tps(fn(), b))
            matmul_s.append(statistics.median(matmul_step(model) for _ in range(n)))  # as many as the steps timed
    ref = tokens["llama.cpp b1"]
    agree = {k: next((f"no (first at token {i})" for i, (a, b) in enumerate(zip(v, ref)) if a != b), "yes")
             for k, v in tokens.items() if k != "llama.cpp b1"}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"tps": {k: statistics.median(v) for k, v in tps.items()}, "agree": agree, "matmul_s": statistics.median(matmul_s),
            "weight_bytes": weight_bytes}


def matmul_step(model: GPT) -> float:
    """Seconds for one batch-1 decode step's matrix products alone, each as lmcore's decode runs it
    (`lmcore.model.linear`, SwiGLU's gate and up together, the decode LM head) on one row: every weight read once,
    nothing else. No decode step of lmcore's can take less."""
    from lmcore.generation import decode_head
    from lmcore.model import gate_up, split_blocks, linear

    head = decode_head(model)
    x = torch.randn(1, 1, model.config.n_embd)
    h = torch.randn(1, 1, model.config.mlp_size)
    start = time.perf_counter()
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        linear(attn.qkv, x)
        linear(attn.proj, x)
        k = split_blocks(x, mlp.fc_1, mlp.fc_2)
        gate_up(mlp, k, x) if k else (mlp.fc_1(x), mlp.fc_2(x))
        linear(mlp.proj, h)
    head(x[:, -1])
    return time.perf_counter() - start


def main_gguf(args) -> None:
    import llama_cpp
    import transformers

    path = Path(args.gguf)
    print(f"{path.name}: torch {torch.__version__} ({torch.get_num_threads()} threads), llama-cpp-python "
          f"{llama_cpp.__version__} ({args.threads} threads), transformers {transformers.__version__}; "
          f"float32 weights, prompt {args.prompt_len} tokens, {args.new_tokens} greedy tokens, decode tokens/s "
          f"(after the first token), median of {args.repeats}")
    r = bench_gguf(path, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch, repeats=args.repeats,
                   threads=args.threads)
    t, base = r["tps"], r["tps"]["llama.cpp b1"]
    print()
    print("| engine | batch | decode tok/s | / llama.cpp b1 | ids = llama.cpp's |")
    print("|---|---:|---:|---:|---|")
    for key, value in t.items():
        name, b = key.rsplit(" b", 1)
        print(f"| {name} | {b} | {value:.1f} | {value / base:.2f}x | {r['agree'].get(key, '-')} |", flush=True)
    ceiling = 1 / r["matmul_s"]
    print(f"\nlmcore's matrix products alone (every weight read once, as its decode step multiplies them): "
          f"{r['matmul_s'] * 1e3:.1f} ms a token, {r['weight_bytes'] / r['matmul_s'] / 1e9:.1f} GB/s; a step with "
          f"nothing else would decode {ceiling:.1f} tok/s = {ceiling / base:.2f}x llama.cpp's batch 1, whose whole step "
          f"takes {1e3 / base:.1f} ms ({r['weight_bytes'] * base / 1e9:.1f} GB/s)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="6x384,tiny,llama-6x384", help=f"comma-separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--gguf", nargs="?", const=str(SMOLLM2), default=None,
                    help="a GGUF model (default: SmolLM2-135M-Instruct) against llama.cpp instead of --shapes")
    ap.add_argument("--batch", type=int, default=32, help="--gguf: the rows of lmcore's batched run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 256, with --gguf 128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); with --gguf llama.cpp's too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gguf:
        args.new_tokens = args.new_tokens or 128
        args.threads = args.threads or torch.get_num_threads()
        return main_gguf(args)
    args.new_tokens = args.new_tokens or 256

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
