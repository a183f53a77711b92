"""Autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p, stop ids and stop strings, streaming.

    out = generate(model, idx, 40, temperature=0.8, top_k=40, top_p=0.95, generator=torch.Generator().manual_seed(0))
    text = generate_text(model, enc, "Every effort moves you", 40, temperature=0.8, top_k=40, seed=0, stop=["\\n\\n"])
    stream = stream_text(model, enc, "Every effort moves you", 40, temperature=0)
    for piece in stream:                  # text as it is produced, whole characters only
        print(piece, end="", flush=True)
    stream.finish_reason, stream.token_ids  # "stop" or "length"; every generated id (a final end-of-text included)
    done = generate_batch(model, enc, [ids_1, ids_2, ...], 64, batch_size=16)  # Completions, in order

One engine: `DecodeBatch` decodes sequences step by step, each in its own row of the KV cache at its own positions
(its first token at 0), rows joining and leaving at any step (continuous batching); `stream` (under `generate`,
`stream_text`, `generate_text`, `lmcore serve` and `chat`) runs it on rows of one length, `generate_batch` on many
prompts of any lengths, a waiting prompt taking the place of a row that ended. Each prompt gets the completion it
gets alone (up to floating-point rounding). `TextDecoder` turns one row's ids into text (whole characters, stop ids,
stop strings) for both.

The cache: the prompt is run once (prefill) into the model's preallocated key/value cache (GPT.set_kv_cache),
then each step runs the model on the one new token at its position. `use_cache=False` runs the model over the
whole (cropped) context at every step instead; both give the same tokens up to floating-point rounding.

Past the context: a prompt longer than context_length is cropped to its last context_length tokens. Once prompt
and generated tokens fill the context, positions cannot go further, so decoding falls back to the uncached
sliding window: each further step runs the model over the last context_length tokens (as use_cache=False does
throughout; learned position embeddings make the cached keys of a shifted window stale). Generation never
stops early because of the context; it only becomes slower. In a batch this holds row by row: a row that reaches
the context leaves the cache and slides alone, the others keep their cache.

The model holds one cache, so one generation runs on a model at a time; the cache is dropped when the
generation ends (exhausted, closed, or garbage-collected), and the model's train/eval mode is restored.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lmcore.model import GPT

FinishReason = Literal["stop", "length"]

# LM head weight -> ((data_ptr, version, blocks), its transpose cut into column blocks); see `decode_head`.
_TRANSPOSED_HEADS = WeakIdKeyDictionary()


def decode_head(model: GPT) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head as a function of (B, C) hidden states, for decoding.

    On CPU it multiplies by a copy of the (V, C) weight transposed and cut into one (C, V/k) block per thread
    (k of them, contiguous), in one bmm: with a few rows MKL reads the (C, V) layout about twice as fast as the
    weight's own (a 384 x 50257 head: 6.0 ms -> 3.0 ms per token, out of cache), but on one thread; the blocks run
    side by side (SmolLM2's 576 x 49152 head on 2 threads: 5.9 ms -> about 3 ms). The head is most of a small
    model's decode step. The copy is made once per weight version and thread count (training or loading weights
    makes a new one) and kept while the weight lives: one more V x C matrix in memory. Other devices use the
    nn.Linear as it is.
    """
    head = model.lm_head
    w = head.weight
    if w.device.type != "cpu":
        return head
    V, C = w.shape
    k = torch.get_num_threads()
    k = k if k > 1 and V % k == 0 else 1
    key = (w.data_ptr(), w._version, k)
    hit = _TRANSPOSED_HEADS.get(w)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, w.detach().t().reshape(C, k, V // k).transpose(0, 1).contiguous())  # (k, C, V/k)
        _TRANSPOSED_HEADS[w] = hit
    blocks = hit[1]

    def head_fn(h: torch.Tensor) -> torch.Tensor:
        B = h.shape[0]
        logits = torch.bmm(h.expand(k, B, C), blocks).transpose(0, 1).reshape(B, V)  # (k, B, V/k) -> (B, V)
        return logits if head.bias is None else logits + head.bias

    return head_fn


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one next token per row.

    Args:
        logits: (B, V) next-token logits.
        temperature: divides the logits; 0 picks the argmax (greedy: top_k, top_p and generator are unused).
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling: only among the most likely tokens whose probabilities (after temperature and
            top_k) first add up to at least top_p; the most likely token is always kept. None or 1: no cut.
        generator: the random source (on the logits' device), for reproducible samples.

    Returns: (B,) token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # stable: equal logits keep their id order, so the first kept token is the argmax's
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # (B, V): the mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # position 0 has before = 0
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]  # (B,)


def _check(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class _Row:
    """One sequence in a DecodeBatch: its (cropped) prompt then every token generated, its budget, generator and
    sampling options (None: the batch's)."""

    __slots__ = ("tokens", "steps_left", "generator", "sampling", "slot", "cached")

    def __init__(self, tokens: list[int], steps_left: int, generator: torch.Generator | None, sampling: dict | None,
                 slot: int | None):
        self.tokens, self.steps_left, self.generator, self.sampling = tokens, steps_left, generator, sampling
        self.slot = slot  # its row of the cache; None: not cached (no cache, or past the context)
        self.cached = 0  # tokens in its cache row (0: not prefilled yet)


class DecodeBatch:
    """The one decoding engine: sequences decoded together on the model's KV cache, joining and leaving at any step
    (continuous batching).

    `stream` (and through it `stream_text`, `lmcore serve`, `chat`) runs it on rows of one length, `generate_batch`
    on many prompts of any lengths, refilling the batch as rows finish. Each row is decoded as it would be alone
    (its first token at position 0), up to the floating-point rounding of batched matmuls.

    The cache: `capacity` rows of `max_len` slots, each sequence in its own row from slot 0 (its slots are its
    positions; no padding). A row joins (`add`) and is prefilled at the next step: its prompt alone (causal
    attention, no padded positions computed), or with the rows added beside it when they are of one length. Then
    each step runs every cached row's last token at its own position, a mask hiding the slots past each row's
    length. The rows in use are always the cache's first ones: a row that finishes (an end id, its budget, or
    `finish` from the caller: a stop string) gives its place to the last row (one row copied), and a new row takes
    the next free one. Rows that end early cost nothing more, and a waiting prompt takes their place at once.

    Past the context: a row whose next position would be context_length leaves the cache and from then on is run
    uncached over its last context_length tokens at every step (a shifted window makes learned-position keys
    stale), as `stream` always did; the other rows keep their cache. `use_cache=False` runs every row that way from
    the start. The model holds the cache: one DecodeBatch per model at a time; `close` drops it.

    The cache's length grows on demand (doubling, up to the context) when a row would pass `max_len`, so a
    long-lived batch (`lmcore serve`'s engine) holds only what its rows have used. Each row may bring its own
    sampling options and generator (`add`); rows without take the batch's.
    """

    def __init__(
        self,
        model: GPT,
        capacity: int,
        max_len: int,
        *,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        ends: Sequence[int] = (),
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ):
        """Args:
            capacity: the most rows in the cache at once (more can be added: they wait).
            max_len: the most tokens a cached row holds (a prompt and all but its last new token); capped at the
                context.
            ends: end ids: a row that produced one is finished.
            generator: one shared by the rows that have none of their own (sampled together, as `sample_next`).
            temperature, top_k, top_p: see `stream`.
            use_cache: False runs every row over its whole (cropped) context at every step.
        """
        self.model, self.ctx = model, model.config.context_length
        self.device = next(model.parameters()).device
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = generator
        self.ends = set(int(e) for e in ends)
        self.capacity = capacity if use_cache else 0
        self.max_len = max(1, min(self.ctx, max_len))
        self.rows: dict[int, _Row] = {}  # the rows still generating, by id, in the order they came
        self.waiting: deque[int] = deque()  # added rows with no cache row yet (the cache is full)
        self.cache: list[int] = []  # cache row i holds row id cache[i]
        self.next_id = 0
        self.was_training = model.training
        model.eval()
        self.lm_head = decode_head(model)
        if self.capacity:
            model.set_kv_cache(self.capacity, max_len=self.max_len)

    @property
    def done(self) -> bool:
        """Every row finished."""
        return not self.rows

    def add(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        generator: torch.Generator | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> int:
        """Queue a prompt (>= 1 id; only its last context_length are seen) for up to max_new_tokens tokens; it is
        prefilled at the next step when the cache has room. Returns its row id (ids count up from 0).

        generator: this row's own random source (its draws then do not depend on the other rows).
        temperature, top_k, top_p: this row's sampling (see `sample_next`) when temperature is given; otherwise
            the batch's.
        """
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token (e.g. the end-of-text token)")
        sampling = None
        if temperature is not None:
            _check(temperature, top_k, top_p)
            sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        rid, self.next_id = self.next_id, self.next_id + 1
        if max_new_tokens <= 0:
            return rid  # nothing to generate: finished at once
        self.rows[rid] = _Row(list(prompt)[-self.ctx :], max_new_tokens, generator, sampling, None)
        if self.capacity:
            self.waiting.append(rid)
        return rid

    def step(self) -> tuple[list[int], torch.Tensor]:
        """Run the model once over every row (prefilling the new ones) and pick each row's next token.

        Returns: the row ids that got a token and their new token ids (A,), in the order of the ids. Rows that
        produced an end id or used up their budget are finished.
        """
        self._admit()
        decode = [rid for rid in self.cache if self.rows[rid].cached]  # cache rows 0..len(decode)-1
        fresh = [rid for rid in self.cache if not self.rows[rid].cached]
        need = max([self.rows[rid].cached + 1 for rid in decode] + [len(self.rows[rid].tokens) for rid in fresh], default=0)
        if need > self.max_len:
            self._grow(need)
        window = [rid for rid in self.rows if self.rows[rid].slot is None and rid not in self.waiting]
        got, hidden = [], []
        if decode:
            got += decode
            hidden.append(self._decode_step(decode))
        if fresh:
            got += fresh
            hidden.append(self._prefill(fresh))
        if window:
            got += window
            hidden.append(self._window_step(window))
        if not got:
            return [], torch.empty(0, dtype=torch.long, device=self.device)
        logits = self.lm_head(hidden[0] if len(hidden) == 1 else torch.cat(hidden))  # (A, V), rows in `got` order
        order = sorted(range(len(got)), key=got.__getitem__)
        rids = [got[i] for i in order]
        tokens = self._sample(got, logits)[torch.tensor(order, device=logits.device)]  # (A,), in id order
        for rid, t in zip(rids, tokens.tolist()):
            row = self.rows[rid]
            row.tokens.append(t)
            row.steps_left -= 1
            if t in self.ends or row.steps_left == 0:
                self.finish(rid)
        return rids, tokens

    def finish(self, rid: int) -> None:
        """End a row: it leaves the batch and its cache row goes to the last cached row."""
        row = self.rows.pop(rid, None)
        if row is None:
            return
        if rid in self.waiting:
            self.waiting.remove(rid)
        if row.slot is not None:
            self._release(row.slot)

    def close(self) -> None:
        """Drop the model's cache and restore its train/eval mode."""
        self.model.clear_kv_cache()
        self.model.train(self.was_training)

    def _grow(self, need: int) -> None:
        """Lengthen every layer's cache to hold `need` slots a row (doubling, up to the context)."""
        self.max_len = min(self.ctx, max(need, 2 * self.max_len))
        for block in self.model.blocks:
            block.attn.kv_cache.grow(self.max_len)

    def _release(self, slot: int) -> None:
        """Free cache row `slot`: the last cache row moves into it, so the rows in use stay the first ones."""
        last = len(self.cache) - 1
        if slot != last:
            moved = self.rows[self.cache[last]]
            if moved.cached:
                for block in self.model.blocks:
                    block.attn.kv_cache.move(last, slot, moved.cached)
            moved.slot = slot
            self.cache[slot] = self.cache[last]
        self.cache.pop()

    def _admit(self) -> None:
        """Rows whose next position would pass the context leave the cache; waiting rows take the free rows."""
        for rid in list(self.cache):
            row = self.rows[rid]
            if row.cached and len(row.tokens) > self.ctx:
                self._release(row.slot)
                row.slot = None
        while self.waiting and len(self.cache) < self.capacity:
            rid = self.waiting.popleft()
            self.rows[rid].slot = len(self.cache)
            self.cache.append(rid)

    def _decode_step(self, rids: list[int]) -> torch.Tensor:
        """The last hidden states (Bd, C) of the cached rows 0..Bd-1: each row's last token at its own position."""
        rows = [self.rows[rid] for rid in rids]
        x = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)  # (Bd, 1)
        positions = torch.tensor([[r.cached] for r in rows], device=self.device)  # (Bd, 1): also their slots
        for r in rows:
            r.cached += 1
        if len({r.cached for r in rows}) == 1:  # rows of one length: the same slot for all, no mask
            return self.model.hidden(x, positions=positions[0])[:, -1]
        return self.model.hidden(x, positions=positions)[:, -1]

    def _prefill(self, rids: list[int]) -> torch.Tensor:
        """The new rows' prompts into their cache rows: each run of neighbouring rows of one length in one call,
        causal, no padding. Returns their last hidden states (Bn, C).

        A padded batch would compute every row at the longest prompt's length; on a CPU one prompt of a few hundred
        tokens already runs the matmuls at full speed, so prompts of different lengths run one by one.
        """
        caches = [block.attn.kv_cache for block in self.model.blocks]
        last = []
        try:
            i = 0
            while i < len(rids):
                first, n = self.rows[rids[i]].slot, len(self.rows[rids[i]].tokens)
                j = i + 1
                while j < len(rids) and len(self.rows[rids[j]].tokens) == n and self.rows[rids[j]].slot == first + j - i:
                    j += 1
                for block, cache in zip(self.model.blocks, caches):
                    block.attn.kv_cache = cache.rows(first, j - i)
                x = torch.tensor([self.rows[rid].tokens for rid in rids[i:j]], device=self.device)  # (j - i, n)
                last.append(self.model.hidden(x)[:, -1])  # positions and slots 0..n-1
                for rid in rids[i:j]:
                    self.rows[rid].cached = n
                i = j
        finally:
            for block, cache in zip(self.model.blocks, caches):
                block.attn.kv_cache = cache
        return torch.cat(last)  # (Bn, C)

    def _window_step(self, rids: list[int]) -> torch.Tensor:
        """The uncached rows' last hidden states (Bw, C): the model over each row's last context_length tokens
        (rows of one length together)."""
        out: dict[int, torch.Tensor] = {}
        by_length: dict[int, list[int]] = {}
        for rid in rids:
            by_length.setdefault(min(len(self.rows[rid].tokens), self.ctx), []).append(rid)
        with _cache_set_aside(self.model):
            for n, group in by_length.items():
                x = torch.tensor([self.rows[rid].tokens[-n:] for rid in group], device=self.device)  # (Bg, n)
                for rid, h in zip(group, self.model.hidden(x)[:, -1]):
                    out[rid] = h
        return torch.stack([out[rid] for rid in rids])

    def _sample(self, rids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """(A,) next tokens of rows `rids` from their logits (A, V), in that order: greedy rows together, a row with
        its own generator or sampling alone, the others together from the shared generator, in id order (so their
        draws do not depend on where the rows sit in the cache)."""
        rows = [self.rows[rid] for rid in rids]
        greedy, shared, alone = [], [], []
        for i, r in enumerate(rows):
            if (r.sampling or self.sampling)["temperature"] == 0:
                greedy.append(i)
            elif r.sampling is None and r.generator is None:
                shared.append(i)
            else:
                alone.append(i)
        if len(greedy) == len(rows):
            return logits.argmax(dim=-1)
        tokens = torch.empty(len(rids), dtype=torch.long, device=logits.device)
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        if shared:
            shared.sort(key=rids.__getitem__)
            tokens[shared] = sample_next(logits[shared], **self.sampling, generator=self.generator)
        for i in alone:
            r = rows[i]
            tokens[i] = sample_next(logits[i : i + 1], **(r.sampling or self.sampling), generator=r.generator or self.generator)[0]
        return tokens


@contextmanager
def _cache_set_aside(model: GPT) -> Iterator[None]:
    """Run the model without its KV cache for a while (rows past the context, beside rows still using the cache)."""
    caches = [block.attn.kv_cache for block in model.blocks]
    model.clear_kv_cache()
    try:
        yield
    finally:
        for block, cache in zip(model.blocks, caches):
            block.attn.kv_cache = cache


def _end_list(eos_token: int | Sequence[int] | None) -> list[int]:
    if eos_token is None:
        return []
    return [int(t) for t in eos_token] if isinstance(eos_token, Sequence) else [int(eos_token)]


@torch.inference_mode()
def stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, one step at a time, as it is produced (DecodeBatch on equal-length rows).

    Args:
        model: the GPT; run in eval mode here and put back in its previous mode afterwards.
        idx: (B, T) prompt token ids on the model's device, T >= 1; only the last context_length are seen.
        max_new_tokens: the most steps.
        temperature, top_k, top_p, generator: see `sample_next`; the rows are sampled together from `generator`.
        eos_token: one end id or several (token-level stop ids): a row that produced one is finished (it no longer
            runs nor draws random numbers) and is padded with the first one from then on; the iterator ends once
            every row has finished.
        use_cache: False runs the model over the whole cropped context at every step (no KV cache).

    Yields: (B,) token ids, at most max_new_tokens times.
    """
    _check(temperature, top_k, top_p)
    B, T = idx.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. the end-of-text token)")
    eos = _end_list(eos_token)
    batch = DecodeBatch(model, B, min(T, model.config.context_length) + max_new_tokens - 1, temperature=temperature,
                        top_k=top_k, top_p=top_p, ends=eos, generator=generator, use_cache=use_cache)
    for prompt in idx.tolist():
        batch.add(prompt, max_new_tokens)
    try:
        while not batch.done:
            rows, tokens = batch.step()
            if len(rows) < B:  # some rows finished: pad them with the first end id
                tokens = torch.full((B,), eos[0], dtype=tokens.dtype, device=tokens.device).index_copy_(
                    0, torch.tensor(rows, device=tokens.device), tokens)
            yield tokens
    finally:
        batch.close()


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend each row of idx by up to max_new_tokens tokens (see `stream` for the arguments).

    Returns: (B, T + n) with n <= max_new_tokens: n is smaller only when every row reached an eos_token.
    """
    tokens = list(
        stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token=eos_token,
               generator=generator, use_cache=use_cache)
    )
    if not tokens:
        return idx
    return torch.cat([idx, torch.stack(tokens, dim=1)], dim=1)  # (B, T + n)


def _token_bytes(enc, token: int) -> bytes:
    # A model vocabulary padded beyond the tokenizer's has ids that decode to nothing: show them as U+FFFD.
    return enc.decode_single_token_bytes(token) if token < enc.n_vocab else "\ufffd".encode()


def _held_back(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextDecoder:
    """Generated ids in, text out, for one completion: whole characters only, ended by a stop id or cut right before
    a stop string (the one stop-string algorithm: `stream_text` and `generate_batch` both run it).

    Attributes: token_ids (every id taken, a final stop id included), text (the pieces returned, joined),
    finish_reason (None while open; "stop": a stop id or a stop string; "length": `end` was called).
    """

    def __init__(self, enc, stop_ids: set[int], stop: Sequence[str]):
        self._enc, self._stop_ids, self._stop = enc, stop_ids, list(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds back incomplete characters
        self._decoded = ""  # every complete character so far
        self._emitted = 0  # characters of _decoded already returned
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None

    def push(self, token: int) -> str:
        """Take the next generated id; return the text that became safe to show (maybe empty).

        A stop id or a completed stop string sets finish_reason to "stop" (and returns what was held back before it).
        """
        self.token_ids.append(token)
        if token in self._stop_ids:
            return self._finish("stop", self._decoder.decode(b"", final=True))
        new = self._decoder.decode(_token_bytes(self._enc, token))
        if not new:
            return ""
        before = len(self._decoded)
        self._decoded += new
        if self._stop:
            # Only a stop string that ends in the new text can be new: search the tail that could hold one.
            tail_from = max(0, before - self._max_stop + 1)
            found = [i for i in (self._decoded.find(s, tail_from) for s in self._stop) if i >= 0]
            if found:
                self._decoded = self._decoded[: min(found)]
                return self._finish("stop", "")
            safe = len(self._decoded) - _held_back(self._decoded[self._emitted :], self._stop)
        else:
            safe = len(self._decoded)
        piece, self._emitted = self._decoded[self._emitted : safe], safe
        self.text += piece
        return piece

    def end(self) -> str:
        """No more ids (max_new_tokens reached): finish with "length"; return the text held back until now."""
        return self._finish("length", self._decoder.decode(b"", final=True))

    def _finish(self, reason: FinishReason, rest: str) -> str:
        self.finish_reason = reason
        self._decoded += rest
        piece, self._emitted = self._decoded[self._emitted :], len(self._decoded)
        self.text += piece
        return piece


class TextStream(TextDecoder):
    """The completion of one prompt as an iterator of text pieces (see `stream_text`): a TextDecoder fed by a token
    iterator (`stream`'s (1,) steps), which it closes as soon as the text ends.

    Attributes, final once iteration ends: those of TextDecoder (token_ids, text, finish_reason) and prompt_tokens
    (the number of prompt ids).
    """

    def __init__(self, tokens: Iterator[torch.Tensor], enc, prompt_tokens: int, stop_ids: set[int], stop: Sequence[str]):
        super().__init__(enc, stop_ids, stop)
        self._tokens = tokens
        self.prompt_tokens = prompt_tokens

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self.finish_reason is None:
            token = next(self._tokens, None)
            piece = self.end() if token is None else self.push(int(token[0]))
            if self.finish_reason is not None:
                self._tokens.close()  # frees the cache
            if piece:
                return piece
        raise StopIteration

    def close(self) -> None:
        """End early: frees the model's cache now rather than when the stream is garbage-collected."""
        self._tokens.close()
        if self.finish_reason is None:
            self.finish_reason = "length"


def stream_text(
    model: GPT,
    enc,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    use_cache: bool = True,
) -> TextStream:
    """Stream the completion of one prompt as text pieces, stopping at end-of-text, a stop id or a stop string.

    Args:
        enc: the model's tokenizer (lmcore.tokenizer.load_tokenizer(model_dir)), or a tiktoken Encoding.
        prompt: text (a special token spelled in it, "<|endoftext|>" or a chat template's "<|im_end|>", is that
            token; empty: the start of a document) or token ids.
        stop: text-level stops, checked on the decoded text as it grows; the text ends right before the first
            one found, and text that might be the start of one is held back until it is not.
        stop_ids: token-level stops besides the tokenizer's own (end-of-text, end of turn); like those, they end
            the text and are not in it.
        seed: seeds a torch.Generator, so the same model, prompt and seed give the same text.
        temperature, top_k, top_p, use_cache: see `stream`.

    Returns: a TextStream; iterate it for the pieces. Pieces are whole characters: a character whose UTF-8
    bytes span several tokens comes out once its last byte has. Joined, they equal `generate_text`'s result.
    """
    _check_stop(stop)
    device = next(model.parameters()).device
    if isinstance(prompt, str):
        ids = encode_prompt(enc, prompt) or [enc.eot_token]
    else:
        ids = list(prompt) or [enc.eot_token]
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    ends = end_ids(enc, stop_ids)
    tokens = stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token=ends,
                    generator=generator, use_cache=use_cache)
    return TextStream(tokens, enc, len(ids), set(ends), stop)


def _check_stop(stop: Sequence[str]) -> None:
    if any(not s for s in stop):
        raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")


def end_ids(enc, stop_ids: Sequence[int]) -> list[int]:
    """The ids that end a completion: the tokenizer's own (end-of-text, end of turn), then `stop_ids`."""
    return list(dict.fromkeys([*getattr(enc, "stop_tokens", [enc.eot_token]), *stop_ids]))


def encode_prompt(enc, text: str) -> list[int]:
    """A prompt's ids, special tokens spelled in it included (a lmcore Tokenizer, or a bare tiktoken Encoding)."""
    if hasattr(enc, "stop_tokens"):  # lmcore.tokenizer.Tokenizer
        return enc.encode(text)
    return enc.encode(text, allowed_special=enc.special_tokens_set)


class Stripper:
    """`"".join(pieces).strip()`, a piece at a time: leading whitespace dropped, trailing whitespace held until text
    follows it (`push` returns what may be shown now)."""

    def __init__(self):
        self._pending, self._started = "", False

    def push(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        body = self._pending + piece
        kept = body.rstrip()
        self._pending = body[len(kept) :]
        return kept


def strip_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Stream `"".join(pieces).strip()` (see `Stripper`)."""
    stripper = Stripper()
    for piece in pieces:
        if kept := stripper.push(piece):
            yield kept


def generate_text(
    model: GPT,
    enc,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    *,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    use_cache: bool = True,
) -> str:
    """Sample a completion of `prompt`, stopping at <|endoftext|> or a stop string (see `stream_text`).

    Returns: only the completion (without the prompt, the end-of-text token or the stop string).
    """
    return "".join(
        stream_text(model, enc, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
                    seed=seed, use_cache=use_cache)
    )


class Completion:
    """One prompt's completion from `generate_batch`: text (without the prompt, the end id or the stop string),
    token_ids (every generated id, a final end or stop id included), finish_reason ("stop" | "length"),
    prompt_tokens."""

    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens")

    def __init__(self, text: str, token_ids: list[int], finish_reason: FinishReason, prompt_tokens: int):
        self.text, self.token_ids, self.finish_reason, self.prompt_tokens = text, token_ids, finish_reason, prompt_tokens

    def __repr__(self) -> str:
        return f"Completion({self.text!r}, finish_reason={self.finish_reason!r}, {len(self.token_ids)} tokens)"


@torch.inference_mode()
def generate_batch(
    model: GPT,
    enc,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] = (),
    batch_size: int = 16,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[Completion]:
    """Complete many prompts (token ids), up to `batch_size` at a time, each as `stream_text` completes it alone.

    Continuous batching (DecodeBatch): `batch_size` prompts start together; when one ends, the next waiting prompt
    takes its place at the next step, so the batch stays full until the prompts run out (a batch does not wait for
    its longest answer). Prompts start shortest first. The completions come back in the order of `prompts`.
    Greedy (temperature 0) gives `stream_text`'s tokens whatever else shares the batch, up to floating-point
    rounding of the batched matmuls (which can flip an argmax between near-equal logits). Sampling: prompt i draws
    from its own generator seeded `seed + i`, as `stream_text(..., seed=seed + i)` does.

    Args:
        prompts: token ids; an empty one is the end-of-text token (the start of a document); only the last
            context_length ids of a longer one are seen (and past the context a row slides as `stream` does).
        stop, stop_ids, temperature, top_k, top_p: see `stream_text`.
        batch_size: the most rows decoded together.
        progress: called with the number of prompts just finished.

    Returns: one Completion per prompt, in order.
    """
    _check(temperature, top_k, top_p)
    _check_stop(stop)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [list(p) or [enc.eot_token] for p in prompts]
    if max_new_tokens <= 0 or not ids:
        if progress is not None and ids:
            progress(len(ids))
        return [Completion("", [], "length", len(p)) for p in ids]
    ctx = model.config.context_length
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: min(len(ids[i]), ctx))
    ends = end_ids(enc, stop_ids)
    texts = [TextDecoder(enc, set(ends), stop) for _ in ids]
    longest = min(len(ids[order[-1]]), ctx)
    batch = DecodeBatch(model, min(batch_size, len(ids)), longest + max_new_tokens - 1, temperature=temperature,
                        top_k=top_k, top_p=top_p, ends=ends)
    queue = iter(order)
    running: dict[int, int] = {}  # row id -> prompt index

    def fill() -> None:
        while len(running) < batch_size:
            i = next(queue, None)
            if i is None:
                return
            generator = torch.Generator(device=device).manual_seed(seed + i) if temperature > 0 else None
            running[batch.add(ids[i], max_new_tokens, generator)] = i

    try:
        fill()
        while running:
            rows, tokens = batch.step()
            finished = 0
            for rid, t in zip(rows, tokens.tolist()):
                text = texts[running[rid]]
                text.push(t)
                if text.finish_reason is None and rid not in batch.rows:  # max_new_tokens reached
                    text.end()
                if text.finish_reason is not None:  # an end id, a stop string or the budget: the row leaves
                    batch.finish(rid)
                    del running[rid]
                    finished += 1
            if progress is not None and finished:
                progress(finished)
            fill()
    finally:
        batch.close()
    return [Completion(t.text, t.token_ids, t.finish_reason, len(p)) for t, p in zip(texts, ids)]
