"""Load test of `lmcore serve`: many concurrent clients, streaming and not, against a real server on 127.0.0.1.

    .venv/bin/python -m benchmarks.serve_load                      # a small random model, then SmolLM2-135M
    .venv/bin/python -m benchmarks.serve_load --models small --duration 20 --clients 32
    .venv/bin/python -m benchmarks.serve_load --model models/instruct      # any lmcore model folder

For each model, `lmcore serve` starts as a subprocess (its own process: the clients here do not share its
interpreter), with `--max-batch` set to the number of clients. Then, with greedy requests (temperature 0) over a
fixed set of prompts, each request's max_tokens drawn from 16..max-tokens:
1. batch 1: one client, one request after another, for `--solo-duration` s: every distinct request's reply alone,
   and the batch-1 rate (completion tokens / wall time);
2. the load: `--clients` clients (default 64) for `--duration` s (default 60), every other request streamed
   (`stream_options.include_usage`), each client sending its next request as soon as its last one ends;
3. 32 concurrent clients for `--duration` / 3 s: aggregate completion tokens/s, against the batch-1 rate.

It prints p50 / p99 latency (request sent to last byte) and time to first token of the streams, aggregate tokens/s,
failed (any status but 200, an error event, a timeout) and hung requests (no answer within `--request-timeout`), and
how many replies under load equal the same request's reply alone. Bounded: every request has a timeout, and
the run ends after the phases' durations plus the last requests' time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT.parent / "shared" / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL = dict(vocab_size=50257, context_length=1024, n_embd=384, n_layer=6, n_head=6)  # GPT-2 vocabulary, 30M parameters
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three primary colors.",
    "Give me a short tip for learning to play the guitar as an adult with little free time.",
    "What does a compiler do?",
    "How many legs does a spider have?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
]


@dataclass
class Result:
    key: tuple[int, int]  # (prompt index, max_tokens)
    stream: bool
    ok: bool
    latency: float
    text: str = ""
    tokens: int = 0
    first_token: float | None = None  # streams: seconds to the first content chunk
    error: str = ""


@dataclass
class Phase:
    name: str
    clients: int
    wall: float
    results: list[Result] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.results if r.ok) / self.wall

    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.ok]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model_dir: Path | str, log: Path, *args: str, threads: int = 2, name: str | None = "m") -> Iterator[str]:
    """`lmcore serve --model model_dir *args` (a folder or a models:/ URI; as `name`, None: lmcore's default) on a free port of 127.0.0.1, with
    `threads` torch threads; yields the base URL (ending in /v1). Its output goes to `log`, shown if it fails to start."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--model", str(model_dir), "--port", str(port), *args]
    cmd += ["--name", name] if name else []
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def request(client: httpx.AsyncClient, base: str, key: tuple[int, int], stream: bool, timeout: float) -> Result:
    """One greedy chat completion; never raises: a failure is a Result with ok False."""
    prompt, max_tokens = key
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[prompt]}], "temperature": 0, "max_tokens": max_tokens}
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            if not stream:
                r = await client.post(f"{base}/chat/completions", json=body)
                if r.status_code != 200:
                    return Result(key, stream, False, time.monotonic() - t0, error=f"{r.status_code}: {r.text[:200]}")
                out = r.json()
                return Result(key, stream, True, time.monotonic() - t0, out["choices"][0]["message"]["content"],
                              out["usage"]["completion_tokens"])
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            pieces, tokens, first = [], 0, None
            async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return Result(key, stream, False, time.monotonic() - t0, error=f"{r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return Result(key, stream, False, time.monotonic() - t0, error=event["error"]["message"])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    for choice in event["choices"]:
                        if choice["delta"].get("content"):
                            first = first if first is not None else time.monotonic() - t0
                            pieces.append(choice["delta"]["content"])
            return Result(key, stream, True, time.monotonic() - t0, "".join(pieces), tokens, first)
    except TimeoutError:
        return Result(key, stream, False, time.monotonic() - t0, error=f"hung: no answer within {timeout:g} s")
    except httpx.HTTPError as err:
        return Result(key, stream, False, time.monotonic() - t0, error=f"{type(err).__name__}: {err}")


def keys(max_tokens: int) -> list[tuple[int, int]]:
    """The distinct requests: every prompt at three budgets."""
    budgets = sorted({16, max(16, max_tokens // 2), max_tokens})
    return [(p, b) for p in range(len(PROMPTS)) for b in budgets]


async def phase(base: str, name: str, clients: int, duration: float, requests: list[tuple[int, int]], timeout: float,
                mixed: bool = True) -> Phase:
    """`clients` clients sending requests back to back for `duration` s (a request started before the end finishes)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    out = Phase(name, clients, 0.0)
    async with httpx.AsyncClient(limits=limits, timeout=None) as client:
        t0 = time.monotonic()

        async def one(c: int) -> None:
            rng, i = random.Random(c), 0
            while time.monotonic() - t0 < duration:
                out.results.append(await request(client, base, rng.choice(requests), mixed and (c + i) % 2 == 1, timeout))
                i += 1

        await asyncio.gather(*(one(c) for c in range(clients)))
        out.wall = time.monotonic() - t0
    return out


async def solo(base: str, requests: list[tuple[int, int]], timeout: float) -> tuple[dict, Phase]:
    """Every request alone, one after another: the replies to compare with, and the batch-1 rate."""
    out = Phase("batch 1", 1, 0.0)
    async with httpx.AsyncClient(timeout=None) as client:
        t0 = time.monotonic()
        for key in requests:
            out.results.append(await request(client, base, key, False, timeout))
        out.wall = time.monotonic() - t0
    return {r.key: r.text for r in out.results if r.ok}, out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def report(name: str, phases: list[Phase], alone: dict) -> dict:
    """Print one model's table; return its numbers."""
    batch1 = phases[0].tokens_per_s
    print(f"\n{name}")
    print(f"  {'phase':<22} {'clients':>7} {'requests':>8} {'failed':>6} {'p50 s':>7} {'p99 s':>7} {'ttft p50':>8} {'tok/s':>8} {'x b1':>6} {'= alone':>9}")
    numbers = {}
    for p in phases:
        ok = [r for r in p.results if r.ok]
        lat = [r.latency for r in ok]
        ttft = [r.first_token for r in ok if r.first_token is not None]
        same = sum(alone.get(r.key) == r.text for r in ok)
        numbers[p.name] = dict(requests=len(p.results), failed=len(p.failed()), hung=sum("hung" in r.error for r in p.failed()),
                               p50=pct(lat, 0.5), p99=pct(lat, 0.99), tokens_per_s=p.tokens_per_s,
                               vs_batch1=p.tokens_per_s / batch1, identical=same, compared=len(ok))
        print(f"  {p.name:<22} {p.clients:>7} {len(p.results):>8} {len(p.failed()):>6} {pct(lat, 0.5):>7.2f} {pct(lat, 0.99):>7.2f} "
              f"{pct(ttft, 0.5):>8.2f} {p.tokens_per_s:>8.1f} {p.tokens_per_s / batch1:>6.2f} {same:>4}/{len(ok):<4}")
        for r in p.failed()[:3]:
            print(f"    failed: {r.error}")
    return numbers


def run_model(name: str, model_dir: Path, *, clients: int, duration: float, solo_duration: float, max_tokens: int,
              timeout: float, threads: int, log_dir: Path) -> dict:
    requests = keys(max_tokens)
    with server(model_dir, log_dir / f"serve-{name}.log", "--max-batch", str(max(clients, 32)), "--max-queue", str(clients),
                threads=threads) as base:
        alone, batch1 = asyncio.run(solo(base, requests, timeout))
        extra = asyncio.run(phase(base, "batch 1 (more)", 1, solo_duration, requests, timeout, mixed=False))
        batch1.results += extra.results
        batch1.wall += extra.wall
        load = asyncio.run(phase(base, "load, mixed", clients, duration, requests, timeout))
        at32 = asyncio.run(phase(base, "32 concurrent", 32, max(duration / 3, 10), requests, timeout, mixed=False))
    return report(name, [batch1, load, at32], alone)


def small_model(folder: Path) -> Path:
    import torch

    from lmcore.checkpoint import save_model
    from lmcore.config import ModelConfig
    from lmcore.model import GPT

    torch.manual_seed(0)
    save_model(GPT(ModelConfig(**SMALL)), folder, extra={"tokenizer": "gpt2"})
    return folder


def smollm2_model(folder: Path) -> Path:
    from lmcore.gguf import import_gguf

    import_gguf(SMOLLM2, folder)
    return folder


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,smollm2", help="small, smollm2 (comma-separated)")
    ap.add_argument("--model", type=Path, help="an lmcore model folder instead")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the mixed load")
    ap.add_argument("--solo-duration", type=float, default=10.0, help="more seconds of batch 1 after the distinct requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds after which a request counts as hung")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        models = {"model": args.model} if args.model else {}
        for name in [] if args.model else args.models.split(","):
            models[name] = {"small": small_model, "smollm2": smollm2_model}[name](tmp / name)
        for name, folder in models.items():
            results[name] = run_model(name, folder, clients=args.clients, duration=args.duration, solo_duration=args.solo_duration,
                                      max_tokens=args.max_tokens, timeout=args.request_timeout, threads=args.threads, log_dir=tmp)
    return results


if __name__ == "__main__":
    main()
