"""The serving engine: requests for one model decoded together on a thread of their own (continuous batching).

    engine = Engine(model, enc, max_batch=16, max_queue=64, stop_ids=chat.stop_tokens(enc))
    engine.start()
    ticket = engine.submit(prompt_ids, max_tokens=64, temperature=0.0, emit=events.put)  # any thread
    # events: ("start",) when it joins the batch, ("piece", text) as text is produced (stream=True only), then
    # ("done", finish_reason) (the whole text: ticket.decoder.text), or ("error", status, message): 503 it waited
    # too long in the queue or the engine stopped, 500 a failure.
    engine.cancel(ticket)   # a client that went away: its row leaves the batch at the next step
    engine.stop(grace=3.0)  # running requests get `grace` seconds to finish, then are cancelled

One thread owns the model and one `DecodeBatch` (lmcore.generation): each step it admits waiting requests into free
rows (prefilled at that step), drops cancelled ones, runs one decode step for every row, and hands each request its
new text (`TextDecoder`: whole characters, stop ids, stop strings). A request joins at the next step and a finished
one leaves at once; nobody else touches the model, so no lock is held while a client reads. Each request decodes as
it would alone: its own sampling options, and when sampling, its own generator seeded from the request, so a
seeded reply does not depend on what else is in the batch (greedy replies equal up to the floating-point rounding
of batched matmuls).

Back-pressure: at most `max_batch` requests decode and `max_queue` wait; `submit` past that raises `EngineBusy`
(an HTTP server answers 503 with Retry-After), and a request that waits longer than `queue_timeout` seconds for a
row gets ("error", 503, ...). The engine never blocks the caller of `submit`, `cancel` or `stop`.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmcore.generation import DecodeBatch, TextDecoder, end_ids
from lmcore.model import GPT

log = logging.getLogger(__name__)

Event = tuple  # ("start",) | ("piece", str) | ("done", finish_reason) | ("error", status, message)
INITIAL_CACHE_LEN = 256  # tokens a row of the KV cache holds at first; it doubles when a row needs more


class EngineBusy(RuntimeError):
    """The queue is full, or the engine is stopping: try again later (HTTP 503)."""


@dataclass(eq=False)
class Ticket:
    """One request in the engine: what to generate, its text decoder, and where its events go."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    emit: Callable[[Event], None]
    decoder: TextDecoder
    stream: bool = True  # send ("piece", text) events; otherwise only ("done", ...): one wake-up per request
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when it joined the batch
    rid: int | None = None  # its row in the batch, once admitted

    @property
    def generated(self) -> int:
        return len(self.decoder.token_ids)


class Engine:
    """A model's requests, decoded together on one thread (see the module docstring)."""

    def __init__(
        self,
        model: GPT,
        enc,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        queue_timeout: float = 30.0,
        stop_ids: Sequence[int] = (),
    ):
        """Args:
            model: the model, in eval mode; the engine's thread is its only user while the engine runs.
            enc: its tokenizer.
            max_batch: the most requests decoded together (rows of the KV cache).
            max_queue: the most requests waiting for a row; more are refused (EngineBusy).
            queue_timeout: seconds a request may wait for a row before it is answered 503.
            stop_ids: ids that end a reply besides the tokenizer's own (a chat template's end of turn).
        """
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.enc = model, enc
        self.max_batch, self.max_queue, self.queue_timeout = max_batch, max_queue, queue_timeout
        self.ends = end_ids(enc, stop_ids)
        self.device = next(model.parameters()).device
        self._cond = threading.Condition()
        self._pending: deque[Ticket] = deque()  # submitted, waiting for a row
        self._cancelled: list[Ticket] = []  # running tickets to drop at the next step
        self._running: dict[int, Ticket] = {}  # row id -> ticket (engine thread only)
        self._active = 0  # tickets taken from the queue and not finished: _running's, and those being admitted
        self._stopping = False
        self._deadline: float | None = None  # running requests are cancelled after this (stop)
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (a step: every running row gets one token)

    # -- any thread ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine's thread (once; `submit` starts it too)."""
        with self._cond:
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmcore-engine", daemon=True)
            self._thread.start()
            # A daemon thread still inside torch when the interpreter exits aborts the process: stop it first.
            atexit.register(_stop_at_exit, weakref.ref(self))

    @property
    def healthy(self) -> bool:
        """Taking requests: not stopping, and its thread (once started) still running."""
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    def stats(self) -> dict[str, int]:
        """Requests decoding and waiting now."""
        with self._cond:
            return {"running": self._active, "waiting": len(self._pending), "max_batch": self.max_batch,
                    "max_queue": self.max_queue}

    def submit(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        emit: Callable[[Event], None],
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: Sequence[str] = (),
        stream: bool = True,
    ) -> Ticket:
        """Queue a request; its events go to `emit` (called on the engine's thread: it must not block).
        stream: False sends no ("piece", ...) events; the text is `ticket.decoder.text` once it is done.

        Raises: EngineBusy when max_queue requests already wait, or the engine is stopping.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token (e.g. the end-of-text token)")
        ticket = Ticket(list(prompt_ids), max_tokens, temperature, top_k, top_p, seed, emit,
                        TextDecoder(self.enc, set(self.ends), stop), stream)
        with self._cond:
            if self._stopping:
                raise EngineBusy("the server is shutting down")
            self._start()
            if self._active + len(self._pending) >= self.max_batch + self.max_queue:
                raise EngineBusy(f"the server is busy: {self._active} requests decoding and {len(self._pending)} waiting")
            self._pending.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a request (its client went away): waiting, it leaves the queue; running, its row is freed at the
        next step. No more events are sent to it. Safe to call twice or after it finished."""
        with self._cond:
            ticket.emit = _ignore
            if ticket in self._pending:
                self._pending.remove(ticket)
            elif ticket.rid is not None:
                self._cancelled.append(ticket)
                self._cond.notify()

    def stop(self, grace: float = 3.0, *, wait: bool = True) -> None:
        """Refuse new requests and answer the waiting ones 503; running ones may finish for `grace` seconds, then
        are ended with ("error", 503, ...). wait: join the thread (at most grace + 10 s)."""
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self._deadline = time.monotonic() + grace
                for ticket in self._pending:
                    ticket.emit(("error", 503, "the server is shutting down"))
                self._pending.clear()
            self._cond.notify()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=grace + 10)

    # -- the engine's thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        batch = None
        try:
            with torch.inference_mode():
                while True:
                    admitted, cancelled = self._wait_for_work()
                    if admitted is None:
                        return
                    if batch is None:
                        batch = self._new_batch()
                    for ticket in cancelled:
                        if self._running.pop(ticket.rid, None) is not None:
                            batch.finish(ticket.rid)
                            self._left(1)
                    for ticket in admitted:
                        generator = None
                        if ticket.temperature > 0:
                            generator = torch.Generator(device=self.device).manual_seed(ticket.seed)
                        ticket.rid = batch.add(ticket.prompt_ids, ticket.max_tokens, generator,
                                               temperature=ticket.temperature, top_k=ticket.top_k, top_p=ticket.top_p)
                        ticket.started = time.monotonic()
                        self._running[ticket.rid] = ticket
                        ticket.emit(("start",))
                    if self._deadline is not None and time.monotonic() > self._deadline:
                        self._end_all("error", 503, "the server is shutting down: the reply was cut off")
                        batch.close()
                        batch = None
                        continue
                    if not self._running:
                        continue
                    try:
                        self._step(batch)
                    except Exception as exc:  # a bug or out of memory: fail the requests in flight, start afresh
                        log.exception("decoding step failed")
                        self._end_all("error", 500, f"internal error: {type(exc).__name__}: {exc}")
                        batch.close()
                        batch = None
        finally:
            if batch is not None:
                batch.close()
            with self._cond:
                self._end_all("error", 503, "the server is shutting down")
                for ticket in self._pending:
                    ticket.emit(("error", 503, "the server is shutting down"))
                self._pending.clear()

    def _wait_for_work(self) -> tuple[list[Ticket] | None, list[Ticket]]:
        """Block until there is something to do; return the tickets to admit now and those to drop (None: exit)."""
        with self._cond:
            while not (self._pending or self._running or self._cancelled or self._stopping):
                self._cond.wait()
            if self._stopping and not self._running:
                return None, []
            now = time.monotonic()
            while self._pending and now - self._pending[0].submitted > self.queue_timeout:
                ticket = self._pending.popleft()
                ticket.emit(("error", 503, f"no capacity: the request waited {self.queue_timeout:g} s for a slot"))
            free = self.max_batch - self._active + len(self._cancelled)
            admitted = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
            self._active += len(admitted)
            cancelled, self._cancelled = self._cancelled, []
            return admitted, cancelled

    def _new_batch(self) -> DecodeBatch:
        # Sampling options come with each row; the batch's are a placeholder.
        return DecodeBatch(self.model, self.max_batch, INITIAL_CACHE_LEN, temperature=0.0, top_k=None, top_p=None,
                           ends=self.ends)

    def _step(self, batch: DecodeBatch) -> None:
        rows, tokens = batch.step()
        self.steps += 1
        for rid, token in zip(rows, tokens.tolist()):
            ticket = self._running[rid]
            piece = ticket.decoder.push(token)
            if ticket.decoder.finish_reason is None and rid not in batch.rows:  # max_tokens reached
                piece += ticket.decoder.end()
            if piece and ticket.stream:
                ticket.emit(("piece", piece))
            if ticket.decoder.finish_reason is not None:
                batch.finish(rid)  # a stop string ends the row here; an end id or the budget already did
                del self._running[rid]
                self._left(1)
                ticket.emit(("done", ticket.decoder.finish_reason))

    def _left(self, n: int) -> None:
        """n tickets left the batch."""
        with self._cond:
            self._active -= n

    def _end_all(self, *event) -> None:
        for ticket in self._running.values():
            ticket.emit(event)
        self._left(len(self._running))
        self._running.clear()


def _ignore(event: Event) -> None:
    pass


def _stop_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.stop(0.0)
