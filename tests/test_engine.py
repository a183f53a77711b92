"""lmcore.engine: requests decoded together on one thread, each as it would be alone."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.engine import INITIAL_CACHE_LEN, Engine, EngineBusy
from lmcore.generation import stream_text
from lmcore.model import GPT
from lmcore.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(preset="llama-micro", vocab_size=50257, context_length=512)).eval()


class Inbox:
    """One request's events, gathered from the engine's thread."""

    def __init__(self):
        self.events = queue.Queue()

    def emit(self, event) -> None:
        self.events.put(event)

    def result(self, timeout: float = 60) -> tuple[str, list]:
        pieces, seen = [], []
        while True:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if event[0] == "piece":
                pieces.append(event[1])
            elif event[0] in ("done", "error"):
                return "".join(pieces), seen


REQUESTS = [  # prompt, max_tokens, sampling: greedy, temperature, top-k, top-p, a stop string; one past the first cache
    ("Every effort moves you", 12, dict(temperature=0.0)),
    ("The capital of France is", 20, dict(temperature=1.0, seed=3)),
    ("Once upon a time", 16, dict(temperature=0.8, top_k=5, seed=4)),
    ("Hello", 24, dict(temperature=1.0, top_p=0.9, seed=5)),
    ("A much longer prompt, which is prefilled on its own " * 3, INITIAL_CACHE_LEN + 40, dict(temperature=1.0, seed=6)),
    ("Stop here", 30, dict(temperature=1.0, seed=7, stop=["e"])),
]


def test_requests_decoded_together_get_what_they_get_alone(model, enc):
    alone = []
    for prompt, n, options in REQUESTS:
        stream = stream_text(model, enc, enc.encode_ordinary(prompt), n, **{k: v for k, v in options.items()})
        alone.append(("".join(stream), stream.finish_reason, len(stream.token_ids)))
    engine = Engine(model, enc, max_batch=4, max_queue=8)  # 6 requests: two wait for a row
    inboxes = []
    for prompt, n, options in REQUESTS:
        inboxes.append(Inbox())
        engine.submit(enc.encode_ordinary(prompt), max_tokens=n, emit=inboxes[-1].emit, **options)
    try:
        for (text, reason, tokens), inbox in zip(alone, inboxes):
            got, events = inbox.result()
            assert events[0] == ("start",) and events[-1] == ("done", reason)
            assert got == text
        assert engine.stats() == {"running": 0, "waiting": 0, "max_batch": 4, "max_queue": 8}
    finally:
        engine.stop(0)
    assert not engine.healthy


def test_a_full_queue_refuses_and_stop_ends_every_request(model, enc):
    engine = Engine(model, enc, max_batch=1, max_queue=1)
    running, waiting = Inbox(), Inbox()
    engine.submit([1, 2, 3], max_tokens=400, temperature=1.0, emit=running.emit)
    assert running.events.get(timeout=30) == ("start",)
    engine.submit([1, 2, 3], max_tokens=5, emit=waiting.emit)
    with pytest.raises(EngineBusy, match="1 requests decoding and 1 waiting"):
        engine.submit([1], max_tokens=1, emit=print)
    t0 = time.monotonic()
    engine.stop(grace=0.2)
    assert time.monotonic() - t0 < 5
    assert waiting.result()[1] == [("error", 503, "the server is shutting down")]
    text, events = running.result()
    assert events[-1][:2] == ("error", 503) and "cut off" in events[-1][2]
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit([1], max_tokens=1, emit=print)
    assert model.blocks[0].attn.kv_cache is None  # the cache is dropped
