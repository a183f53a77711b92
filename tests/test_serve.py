"""lmcore.serve: the OpenAI-compatible API, started as `lmcore serve` in a real subprocess and called over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from typer.testing import CliRunner

from benchmarks import serve_load
from flows.cli import app as cli_app
from lmcore.checkpoint import load_model, save_model
from lmcore.config import ModelConfig
from lmcore.finetune.data import format_prompt
from lmcore.generation import generate
from lmcore.model import GPT
from lmcore.serve import APIError, ChatMessage, ServerOptions, build_prompt, create_app
from lmcore.tokenizer import get_tokenizer
from tests.conftest import ROOT

STARTUP_TIMEOUT_S = 60
INSTRUCTION = "Name three primary colors."
MICRO = dict(vocab_size=50257, context_length=128, n_embd=32, n_layer=2, n_head=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, alive, log: Path | None = None) -> None:
    """Poll GET /health until it answers 200; fail with the server's log if it dies or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive():
            break
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"server at {base} did not come up within {STARTUP_TIMEOUT_S}s:\n{tail}")


@contextlib.contextmanager
def running_server(model: Path | str, log_dir: Path, *args: str) -> Iterator[str]:
    """`python -m flows.cli serve --model model *args` (a folder or a models:/ URI) on a free port, one thread (steady
    on shared cores, and the same numbers as one_thread here); yields the base URL (ending in /v1)."""
    log = log_dir / f"serve-{Path(str(model)).name}.log"
    with serve_load.server(model, log, *args, threads=1, name=None) as base:
        yield base


@contextlib.contextmanager
def in_thread_server(app) -> Iterator[str]:
    """A real uvicorn server for `app` on 127.0.0.1 in a thread of this process; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", thread.is_alive)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory) -> Path:
    """A random-initialised micro instruction model (alpaca template) with the GPT-2 vocabulary."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "instruct"
    save_model(GPT(ModelConfig(**MICRO)), out, extra={"template": "alpaca", "tokenizer": "gpt2"})
    return out


@pytest.fixture(scope="module")
def server(instruct_dir, tmp_path_factory) -> Iterator[str]:
    # No --name: the served name is the folder's.
    with running_server(instruct_dir, tmp_path_factory.mktemp("logs")) as base:
        yield base


@pytest.fixture(scope="module")
def prompt_ids(enc) -> list[int]:
    return enc.encode_ordinary(format_prompt({"instruction": INSTRUCTION, "input": ""}, "alpaca"))


def local_generate(model_dir: Path, ids: list[int], n: int, *, temperature: float = 0.0, seed: int = 0, top_p: float | None = None) -> list[int]:
    """The library's own sampling of n tokens after `ids` (in this process, one thread)."""
    model = load_model(model_dir)
    out = generate(
        model, torch.tensor([ids]), n, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(seed)
    )
    return out[0, len(ids) :].tolist()


def chat(base: str, content: str = INSTRUCTION, **options) -> httpx.Response:
    body = {"model": "instruct", "messages": [{"role": "user", "content": content}], **options}
    return httpx.post(f"{base}/chat/completions", json=body, timeout=30)


def test_build_prompt():
    msgs = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="first question"),
        ChatMessage(role="assistant", content="first answer"),
        ChatMessage(role="user", content=INSTRUCTION),
    ]
    # Instruction model: system text, a blank line, the last user message, in the template.
    assert build_prompt(msgs, "alpaca") == format_prompt({"instruction": f"Be brief.\n\n{INSTRUCTION}"}, "alpaca")
    assert build_prompt(msgs[3:], "phi3") == f"<|user|>\n{INSTRUCTION}\n<|assistant|>\n"
    # Plain LM: every message's content, one per line.
    assert build_prompt(msgs, None) == f"Be brief.\nfirst question\nfirst answer\n{INSTRUCTION}"
    with pytest.raises(APIError, match="no message with role 'user'") as err:
        build_prompt(msgs[:1], "alpaca")
    assert err.value.status == 400 and err.value.param == "messages"


def test_completion_shape_usage_and_greedy_parity(server, instruct_dir, prompt_ids, enc, one_thread):
    expected = local_generate(instruct_dir, prompt_ids, 6)
    assert enc.eot_token not in expected  # so the reply runs to max_tokens

    t0 = time.time()
    first, second = chat(server, temperature=0, max_tokens=6), chat(server, temperature=0, max_tokens=6)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) == len("chatcmpl-") + 32
    assert body["object"] == "chat.completion" and body["model"] == "instruct"
    assert abs(body["created"] - t0) < 60
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 6, "total_tokens": len(prompt_ids) + 6}
    # Greedy: the library's argmax tokens, stripped as `lmcore chat` strips a response.
    assert choice["message"]["content"] == enc.decode(expected).strip()
    assert second.json()["choices"][0]["message"]["content"] == choice["message"]["content"]
    assert second.json()["id"] != body["id"]


def test_seeded_sampling_is_reproducible(server, instruct_dir, prompt_ids, enc, one_thread):
    replies = [chat(server, temperature=1.0, seed=seed, max_tokens=8).json() for seed in (7, 7, 8)]
    texts = [r["choices"][0]["message"]["content"] for r in replies]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    # The same draw as one lmcore.generation.generate call with a generator seeded the same.
    assert texts[0] == enc.decode(local_generate(instruct_dir, prompt_ids, 8, temperature=1.0, seed=7)).strip()
    # No seed given: seed 0, so still reproducible.
    unseeded = [chat(server, temperature=1.0, max_tokens=8).json()["choices"][0]["message"]["content"] for _ in range(2)]
    assert unseeded[0] == unseeded[1] == enc.decode(local_generate(instruct_dir, prompt_ids, 8, temperature=1.0, seed=0)).strip()


def test_stop_strings(server, instruct_dir, prompt_ids, enc, one_thread):
    # Sampled, not greedy: a random model's greedy reply repeats one token, which makes a poor stop test.
    sampling = dict(temperature=1.0, seed=3)
    ids = local_generate(instruct_dir, prompt_ids, 12, **sampling)
    text = enc.decode(ids)
    # A stop string from the middle of the reply: a later token's text.
    stop = next(enc.decode(ids[j : j + 1]).strip() for j in range(5, 12) if enc.decode(ids[j : j + 1]).strip())
    cut = text.index(stop)
    assert text[:cut].strip()  # something comes before it
    needed = next(m for m in range(1, len(ids) + 1) if stop in enc.decode(ids[:m]))  # tokens until it appears

    for stop_param in (stop, ["no-such-stop", stop]):
        body = chat(server, max_tokens=12, stop=stop_param, **sampling).json()
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["message"]["content"] == text[:cut].strip()
        assert body["usage"]["completion_tokens"] == needed < 12
    # A stop string that never appears changes nothing.
    body = chat(server, max_tokens=12, stop="no-such-stop", **sampling).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["message"]["content"] == text.strip()


def test_top_p(server, instruct_dir, prompt_ids, enc, one_thread):
    greedy = chat(server, temperature=0, max_tokens=6).json()["choices"][0]["message"]["content"]
    # a nucleus of one token is greedy, whatever the temperature and seed
    assert chat(server, temperature=1.5, top_p=1e-6, seed=5, max_tokens=6).json()["choices"][0]["message"]["content"] == greedy
    sampled = chat(server, temperature=1.0, top_p=0.9, seed=5, max_tokens=8).json()["choices"][0]["message"]["content"]
    expected = enc.decode(local_generate(instruct_dir, prompt_ids, 8, temperature=1.0, seed=5, top_p=0.9)).strip()
    assert sampled == expected


def sse(base: str, **options) -> list:
    """The events of a streamed chat completion: parsed JSON bodies, and the final "[DONE]"."""
    body = {"model": "instruct", "messages": [{"role": "user", "content": INSTRUCTION}], "stream": True, **options}
    events = []
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_sends_the_reply_in_chunks(server, enc, one_thread):
    for options in (dict(temperature=1.0, seed=3, max_tokens=12), dict(temperature=0, max_tokens=12, stop="zzz")):
        whole = chat(server, **options).json()
        events = sse(server, **options)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] and c["model"] == "instruct" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
        assert len(pieces) > 1 and "".join(pieces) == whole["choices"][0]["message"]["content"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": whole["choices"][0]["finish_reason"]}

    # a stop string; usage at the end when asked for
    full = chat(server, temperature=1.0, seed=3, max_tokens=12).json()["choices"][0]["message"]["content"]
    stop = full.split()[2]
    expected = chat(server, temperature=1.0, seed=3, max_tokens=12, stop=stop).json()
    events = sse(server, temperature=1.0, seed=3, max_tokens=12, stop=stop, stream_options={"include_usage": True})
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == expected["usage"]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[1:-3]) == expected["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory) -> Path:
    """A micro model with a 4,096-token context (the issue's deadlock report), GPT-2 vocabulary, plain LM."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "long"
    save_model(GPT(ModelConfig(**{**MICRO, "context_length": 4096})), out, extra={"tokenizer": "gpt2"})
    return out


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decoding step takes at least 20 ms: a long reply takes seconds (the engine runs in this process)."""
    from lmcore.generation import DecodeBatch

    real = DecodeBatch.step

    def step(self):
        time.sleep(0.02)
        return real(self)

    monkeypatch.setattr(DecodeBatch, "step", step)


def body_for(model: str, content: str = "hi", **options) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **options}


def health(base: str) -> dict:
    return httpx.get(base.removesuffix("/v1") + "/health", timeout=5).json()


def wait_until(predicate, timeout: float = 5.0) -> float:
    """Seconds until predicate() held; fails past timeout."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_one_long_stream_and_45_requests_at_once_are_all_answered_as_alone(long_dir, tmp_path, one_thread):
    # The issue's report: one streamed request for 4,000 tokens and 45 others at once locked the server up for
    # good (a lock held across the stream's yields while the waiting requests took every worker thread).
    import asyncio

    async def load(base: str) -> tuple[dict, list[httpx.Response], list[float]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            async def stream() -> dict:
                events = []
                async with client.stream("POST", f"{base}/chat/completions", json=body_for(
                        "long", stream=True, max_tokens=4000, stream_options={"include_usage": True})) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            events.append(json.loads(line[6:]))
                return {"text": "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]),
                        "usage": events[-1]["usage"]}

            async def probe() -> list[float]:  # /health answers while the load runs
                times = []
                for _ in range(5):
                    t0 = time.monotonic()
                    assert (await client.get(base.removesuffix("/v1") + "/health")).status_code == 200
                    times.append(time.monotonic() - t0)
                    await asyncio.sleep(0.1)
                return times

            others = [client.post(f"{base}/chat/completions", json=body_for("long", f"question {i}", max_tokens=8 + i % 24))
                      for i in range(45)]
            streamed, probes, *replies = await asyncio.gather(stream(), probe(), *others)
            return streamed, replies, probes

    with running_server(long_dir, tmp_path, "--max-batch", "16") as base:
        streamed, replies, probes = asyncio.run(load(base))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200][:2]
        assert streamed["usage"]["completion_tokens"] == 4000 or streamed["usage"]["completion_tokens"] < 4000
        assert max(probes) < 2.0
        # each reply equals the same request sent alone, afterwards
        for i in (0, 7, 23, 44):
            alone = httpx.post(f"{base}/chat/completions", json=body_for("long", f"question {i}", max_tokens=8 + i % 24), timeout=30)
            assert replies[i].json()["choices"][0]["message"] == alone.json()["choices"][0]["message"]
        alone = chat_stream_text(base, body_for("long", stream=True, max_tokens=4000))
        assert streamed["text"] == alone
        assert health(base)["running"] == 0


def chat_stream_text(base: str, body: dict) -> str:
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])


def test_a_client_that_hangs_up_frees_its_place_at_once(long_dir, slow_steps, one_thread):
    # one place in the batch: the next request is served only once the first one's place is free
    app = create_app(long_dir, model_name="long", options=ServerOptions(max_batch=1, max_queue=4))
    with in_thread_server(app) as base:
        with httpx.stream("POST", f"{base}/chat/completions", json=body_for("long", stream=True, max_tokens=1000, temperature=1.0), timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the first chunk; then hang up (1,000 tokens would take 20 s)
        assert wait_until(lambda: health(base)["running"] == 0) < 2
        t0 = time.monotonic()
        after = httpx.post(f"{base}/chat/completions", json=body_for("long", max_tokens=2), timeout=30)
        assert after.status_code == 200 and time.monotonic() - t0 < 3
        # a non-streamed request whose client gives up is dropped too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/chat/completions", json=body_for("long", max_tokens=1000, temperature=1.0), timeout=0.5)
        assert wait_until(lambda: health(base)["running"] == 0) < 3
        assert app.state.engine.steps < 400


def test_a_full_queue_answers_503_and_a_long_wait_503_or_504(long_dir, slow_steps, one_thread):
    app = create_app(long_dir, model_name="long", options=ServerOptions(max_batch=1, max_queue=1, queue_timeout=0.5, request_timeout=1.5))
    with in_thread_server(app) as base:
        with httpx.stream("POST", f"{base}/chat/completions", json=body_for("long", stream=True, max_tokens=1000, temperature=1.0), timeout=30) as r:
            lines = r.iter_lines()
            next(lines)  # decoding: the one place is taken (the iterator kept: closing it hangs up)
            # the next request waits in the queue, and is answered 503 after queue_timeout
            t0 = time.monotonic()
            waited = httpx.post(f"{base}/chat/completions", json=body_for("long", max_tokens=2), timeout=10)
            assert waited.status_code == 503 and waited.headers["retry-after"] == "1"
            assert 0.4 < time.monotonic() - t0 < 3
            assert waited.json()["error"]["code"] == "server_busy" and "waited 0.5 s" in waited.json()["error"]["message"]

            async def two():  # one waits in the queue; the other finds the queue full at once
                import asyncio

                async with httpx.AsyncClient(timeout=10) as client:
                    first = asyncio.create_task(client.post(f"{base}/chat/completions", json=body_for("long", max_tokens=2)))
                    await asyncio.sleep(0.2)
                    t0 = time.monotonic()
                    full = await client.post(f"{base}/chat/completions", json=body_for("long", max_tokens=2))
                    return await first, full, time.monotonic() - t0

            import asyncio

            queued, full, took = asyncio.run(two())
            assert full.status_code == 503 and full.headers["retry-after"] == "1" and took < 0.5
            assert "busy: 1 requests decoding and 1 waiting" in full.json()["error"]["message"]
            assert set(full.json()["error"]) == {"message", "type", "param", "code"}
            assert queued.status_code == 503
        # a request that runs past request_timeout: 504, and its place is freed
        wait_until(lambda: health(base)["running"] == 0)
        slow = httpx.post(f"{base}/chat/completions", json=body_for("long", max_tokens=1000, temperature=1.0), timeout=10)
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
        assert wait_until(lambda: health(base)["running"] == 0) < 2


def test_api_key_body_limit_max_tokens_and_host(instruct_dir, one_thread):
    options = ServerOptions(api_key="s3cret", max_body_bytes=4000, max_tokens=8)
    with in_thread_server(create_app(instruct_dir, model_name="instruct", options=options)) as base:
        key = {"Authorization": "Bearer s3cret"}
        ok = httpx.post(f"{base}/chat/completions", json=body_for("instruct", max_tokens=2), headers=key, timeout=10)
        assert ok.status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{base}/chat/completions", json=body_for("instruct", max_tokens=2), headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{base}/models", timeout=10).status_code == 401
        assert httpx.get(base.removesuffix("/v1") + "/health", timeout=10).status_code == 200  # probes need no key

        big = body_for("instruct", "word " * 1000, max_tokens=2)  # 5 kB
        r = httpx.post(f"{base}/chat/completions", json=big, headers=key, timeout=10)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large" and "4000 bytes" in r.json()["error"]["message"]
        chunked = httpx.post(f"{base}/chat/completions", content=iter([json.dumps(big).encode()[i : i + 1000] for i in range(0, 6000, 1000)]),
                             headers={**key, "content-type": "application/json"}, timeout=10)
        assert "content-length" not in chunked.request.headers and chunked.status_code == 413

        too_many = httpx.post(f"{base}/chat/completions", json=body_for("instruct", max_tokens=9), headers=key, timeout=10)
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
        assert "at most 8 tokens a request" in too_many.json()["error"]["message"]
        default = httpx.post(f"{base}/chat/completions", json=body_for("instruct"), headers=key, timeout=10).json()
        assert default["usage"]["completion_tokens"] <= 8  # no max_tokens: the server's limit

        rebound = httpx.post(f"{base}/chat/completions", json=body_for("instruct", max_tokens=2), headers={**key, "Host": "evil.example"}, timeout=10)
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        assert httpx.get(base.replace("127.0.0.1", "localhost") + "/models", headers=key, timeout=10).status_code == 200


def test_sigterm_ends_in_flight_requests_and_exits_within_seconds(long_dir, tmp_path):
    # The CLI (docs/models.md's options) takes its key from LMCORE_API_KEY; SIGTERM while a long stream runs: the stream ends (its last
    # event an error: cut off), the process exits within a few seconds.
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMCORE_API_KEY": "k3y"}
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--model", str(long_dir), "--port", str(port), "--host", "0.0.0.0",
           "--allowed-host", "llm.internal", "--allowed-host", "127.0.0.1", "--max-batch", "32", "--max-queue", "128",
           "--max-tokens", "4000", "--quantize", "int8"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, lambda: proc.poll() is None, log)
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401
        headers = {"Authorization": "Bearer k3y"}
        assert httpx.get(f"{base}/v1/models", headers={**headers, "Host": "llm.internal:8000"}, timeout=5).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers={**headers, "Host": "localhost"}, timeout=5).status_code == 400
        assert httpx.get(f"{base}/health", timeout=5).json()["max_batch"] == 32
        events = []
        with httpx.stream("POST", f"{base}/v1/chat/completions", headers=headers, timeout=30,
                          json=body_for("long", stream=True, max_tokens=4000, temperature=1.0)) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 20:
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        took = time.monotonic() - t0
        assert took < 8, log.read_text()
        assert len(events) < 4000 and ('"error"' in events[-1] or events[-1] == "[DONE]")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_default_max_tokens_fill_the_context(server, instruct_dir, prompt_ids, enc, one_thread):
    room = MICRO["context_length"] - len(prompt_ids)
    expected = local_generate(instruct_dir, prompt_ids, room)
    assert enc.eot_token not in expected
    body = chat(server, temperature=0).json()
    assert body["usage"]["completion_tokens"] == room and body["usage"]["total_tokens"] == MICRO["context_length"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == enc.decode(expected).strip()

    too_long = chat(server, max_tokens=room + 1)
    assert too_long.status_code == 400
    err = too_long.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert f"maximum context length is {MICRO['context_length']} tokens" in err["message"]
    assert f"{len(prompt_ids)} in the messages, {room + 1} for the completion" in err["message"]
    assert chat(server, content="word " * 200).json()["error"]["param"] == "messages"


def test_models_and_health(server):
    models = httpx.get(f"{server}/models", timeout=10).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [("instruct", "model", "lmcore")]
    health = httpx.get(server.removesuffix("/v1") + "/health", timeout=10).json()
    assert health == {"status": "ok", "model": "instruct", "running": 0, "waiting": 0, "max_batch": 16, "max_queue": 64}


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "message"),
    [
        ({"model": "gpt-4o"}, 404, "model", "model_not_found", "The model `gpt-4o` does not exist; this server serves `instruct`"),
        ({"n": 2}, 400, "n", None, "only n=1 is supported"),
        ({"top_p": 0}, 400, "top_p", None, "top_p: Input should be greater than 0"),
        ({"logprobs": True}, 400, "logprobs", None, "logprobs is not supported"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None, "at most 4 non-empty strings"),
        ({"messages": None}, 400, "messages", None, "messages: field required"),
        ({"messages": []}, 400, "messages", None, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, 400, "messages.0.content", None, "valid string"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", None, "messages.0.role: Input should be"),
        ({"messages": [{"role": "system", "content": "x"}]}, 400, "messages", None, "no message with role 'user'"),
        ({"temperature": -1}, 400, "temperature", None, "temperature: Input should be greater than or equal to 0"),
        ({"max_tokens": 0}, 400, "max_tokens", None, "max_tokens: Input should be greater than or equal to 1"),
    ],
)
def test_errors_in_openai_shape(server, body, status, param, code, message):
    request = {"model": "instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    request = {k: v for k, v in request.items() if v is not None}
    r = httpx.post(f"{server}/chat/completions", json=request, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert message in err["message"]


def test_malformed_requests(server):
    bad_json = httpx.post(f"{server}/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}, timeout=10)
    assert bad_json.status_code == 400 and "malformed JSON body" in bad_json.json()["error"]["message"]
    not_json = httpx.post(f"{server}/chat/completions", content=b"hello", timeout=10)
    assert not_json.status_code == 400 and "must be a JSON object" in not_json.json()["error"]["message"]
    missing = httpx.post(f"{server}/chat/completions", json={"model": "instruct"}, timeout=10).json()["error"]
    assert missing["param"] == "messages" and missing["message"] == "messages: field required"
    unknown = httpx.get(f"{server}/completions", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_plain_lm_continues_the_joined_messages(tmp_path, enc, one_thread):
    torch.manual_seed(1)
    save_model(GPT(ModelConfig(**{**MICRO, "context_length": 64})), tmp_path / "base", extra={"tokenizer": "gpt2"})
    messages = [{"role": "system", "content": "Every effort"}, {"role": "user", "content": "moves you"}]
    ids = enc.encode_ordinary("Every effort\nmoves you")
    expected = local_generate(tmp_path / "base", ids, 5)
    with in_thread_server(create_app(tmp_path / "base", model_name="base")) as base:
        body = httpx.post(
            f"{base}/chat/completions", json={"model": "base", "messages": messages, "temperature": 0, "max_tokens": 5}, timeout=30
        ).json()
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["message"]["content"] == enc.decode(expected)  # a continuation: not stripped


def test_create_app_refuses_a_classifier(tmp_path):
    model = GPT(ModelConfig(**{**MICRO, "context_length": 16}))
    model.replace_head(2)
    save_model(model, tmp_path / "clf", extra={"head": {"type": "classifier", "labels": ["ham", "spam"]}})
    with pytest.raises(ValueError, match=r"clf/config.json: a classifier .* cannot generate text"):
        create_app(tmp_path / "clf", model_name="clf")


def test_cli_warns_when_not_loopback(tmp_path):
    # The model folder does not exist, so the command fails before anything binds.
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path / "missing"), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "warning: binding 0.0.0.0" in result.stderr and "no such model folder" in result.stderr
    quiet = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path / "missing")])
    assert quiet.exit_code == 2 and "warning" not in quiet.stderr
