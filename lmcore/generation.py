"""Autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p, stop ids and stop strings, streaming.

    out = generate(model, idx, 40, temperature=0.8, top_k=40, top_p=0.95, generator=torch.Generator().manual_seed(0))
    text = generate_text(model, enc, "Every effort moves you", 40, temperature=0.8, top_k=40, seed=0, stop=["\\n\\n"])
    stream = stream_text(model, enc, "Every effort moves you", 40, temperature=0)
    for piece in stream:                  # text as it is produced, whole characters only
        print(piece, end="", flush=True)
    stream.finish_reason, stream.token_ids  # "stop" or "length"; every generated id (a final end-of-text included)
    done = generate_batch(model, enc, [ids_1, ids_2, ...], 64, batch_size=16)  # Completions, in order

One engine: `DecodeBatch` decodes a batch of prompts step by step; `stream` (under `generate`, `stream_text`,
`generate_text`, `lmcore serve` and `chat`) runs it on rows of one length, `generate_batch` on prompts of different
lengths, left-padded, each row at its own positions (its first real token at 0) with a mask that hides the
padding, so that each prompt gets the completion it gets alone (up to floating-point rounding). A row that ends
leaves the batch. `TextDecoder` turns one row's ids into text (whole characters, stop ids, stop strings) for both.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lmcore.model import GPT

FinishReason = Literal["stop", "length"]

# LM head weight -> ((data_ptr, version), its transpose as a contiguous (C, V) copy); see `_lm_head`.
_TRANSPOSED_HEADS = WeakIdKeyDictionary()


def _lm_head(model: GPT) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head as a function of (B, C) hidden states, for decoding.

    On CPU it multiplies by a contiguous (C, V) copy of the (V, C) weight: with a few rows, MKL reads that
    layout about twice as fast (a 384 x 50257 head: 6.0 ms -> 3.0 ms per token, out of cache), and the head is
    most of a small model's decode step. The copy is made once per weight version (training or loading
    weights makes a new one) and kept while the weight lives: one more V x C matrix in memory. Other devices
    use the nn.Linear as it is.
    """
    head = model.lm_head
    w = head.weight
    if w.device.type != "cpu":
        return head
    key = (w.data_ptr(), w._version)
    hit = _TRANSPOSED_HEADS.get(w)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, w.detach().t().contiguous())  # (C, V)
        _TRANSPOSED_HEADS[w] = hit
    wt = hit[1]
    if head.bias is None:
        return lambda h: h @ wt  # (B, V)
    return lambda h: torch.addmm(head.bias, h, wt)  # (B, V)


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


class DecodeBatch:
    """The one decoding engine: a batch of prompts of any lengths, decoded together on the model's KV cache.

    `stream` (and through it `stream_text`, `lmcore serve`, `chat`) runs it on rows of one length, `generate_batch`
    on ragged prompts. Each row is decoded as it would be alone (its first real token at position 0), up to the
    floating-point rounding of batched matmuls and of attention over masked padding.

    Layout: a token buffer (B, T + max_new_tokens), each (cropped) prompt left-padded to T, every new token of a
    step in the same column; row r's tokens start at column start[r]. The cache holds columns base.. in slots 0..
    (slot = column - base, base = the smallest start of the rows in it): one write index for all rows, while a
    row's position is column - start[r] and a mask hides the columns before its start. Without padding (one row, or
    rows of one length) the calls are exactly the unpadded ones: positions are the slots, the mask is causal.

    Past the context: a row whose next position would be context_length leaves the cache and from then on is run
    uncached over its last context_length tokens at every step (a shifted window makes learned-position keys
    stale), as `stream` always did; the other rows keep their cache. A finished row (an end id, or `finish` from the
    caller: a stop string) stops running: it is dropped from the batch and the cache (KVCache.keep), so rows that
    end early cost nothing more. The model holds the cache: one DecodeBatch per model at a time; `close` drops it.
    """

    def __init__(
        self,
        model: GPT,
        idx: torch.Tensor,
        lengths: Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        ends: Sequence[int] = (),
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        use_cache: bool = True,
    ):
        """Args:
            idx: (B, T) prompts left-padded to T on the model's device; only each row's last context_length real
                tokens are seen.
            lengths: the real (unpadded) tokens of each row, each >= 1.
            ends: end ids: a row that produced one is finished.
            generator: one shared by all rows (sampled together, as `sample_next`), or one per row (each row
                sampled alone with its own: the draws of a row do not depend on the others).
            temperature, top_k, top_p: see `stream`.
            use_cache: False runs every row over its whole (cropped) context at every step; prompts of one length only.
        """
        if not use_cache and len(set(lengths)) > 1:
            raise ValueError("decoding without the cache takes prompts of one length")
        self.model, self.ctx = model, model.config.context_length
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = generator
        self.ends = torch.tensor(list(ends), dtype=torch.long, device=idx.device)  # (E,)
        T = min(idx.shape[1], self.ctx)
        self.steps_left = max(0, max_new_tokens)
        self.buf = torch.zeros(idx.shape[0], T + self.steps_left, dtype=torch.long, device=idx.device)
        self.buf[:, :T] = idx[:, idx.shape[1] - T :]  # the last context_length columns: prompts cropped
        self.start = [T - min(n, T) for n in lengths]  # first real column of each row
        self.start_t = torch.tensor(self.start, device=idx.device)  # (B,)
        self.n = T  # columns filled
        self.active = list(range(idx.shape[0]))  # rows still generating
        self.all_rows = self.active[:]
        self.cached = self.active[:] if use_cache and self.steps_left else []  # rows in the cache, in its order
        self.window = [r for r in self.active if r not in self.cached]  # rows run uncached
        self.base = self.cache_end = min(self.start, default=0)  # columns base..cache_end-1 are cached
        self.was_training = model.training
        model.eval()
        self.lm_head = _lm_head(model)
        if self.cached:
            max_len = min(self.ctx, T - self.base + self.steps_left - 1)
            model.set_kv_cache(len(self.cached), max_len=max_len)
            self.slots = torch.arange(max_len, device=idx.device)  # (max_len,)

    @property
    def done(self) -> bool:
        """Every row finished, or max_new_tokens steps taken."""
        return not self.active or self.steps_left == 0

    def step(self) -> tuple[list[int], torch.Tensor]:
        """Run the model once over every active row and pick its next token.

        Returns: the rows and their new token ids (A,), in that order. Rows that produced an end id are finished.
        """
        self._regroup()
        rows = self.cached + self.window
        hidden = []
        if self.cached:
            hidden.append(self._cached_step())
        if self.window:
            hidden.append(self._window_step())
        logits = self.lm_head(hidden[0] if len(hidden) == 1 else torch.cat(hidden))  # (A, V)
        tokens = self._sample(rows, logits)  # (A,)
        self.buf[self._index(rows), self.n] = tokens
        self.n += 1
        self.steps_left -= 1
        if len(self.ends):
            for r, end in zip(rows, torch.isin(tokens, self.ends).tolist()):
                if end:
                    self.finish(r)
        return rows, tokens

    def finish(self, row: int) -> None:
        """End a row: it is left out of the next steps (and of the cache)."""
        if row in self.active:
            self.active.remove(row)

    def close(self) -> None:
        """Drop the model's cache and restore its train/eval mode."""
        self.model.clear_kv_cache()
        self.model.train(self.was_training)

    def _regroup(self) -> None:
        """Drop finished rows, move rows whose next position would pass the context from the cache to the window."""
        keep = [r for r in self.cached if r in self.active and self.n - 1 - self.start[r] < self.ctx]
        self.window = [r for r in self.window + self.cached if r in self.active and r not in keep]
        if keep == self.cached:
            return
        if keep:
            base = min(self.start[r] for r in keep)
            rows = torch.tensor([self.cached.index(r) for r in keep], device=self.buf.device)
            for block in self.model.blocks:
                block.attn.kv_cache.keep(rows, base - self.base, self.cache_end - self.base)
            self.base = base
        else:
            self.model.clear_kv_cache()
        self.cached = keep

    def _cached_step(self) -> torch.Tensor:
        """The cached rows' last hidden states (Bc, C): the columns not yet cached (the prompt, then one token)."""
        rows, base, first = self.cached, self.base, self.cache_end
        x = self.buf[self._index(rows), first : self.n]  # (Bc, Tn)
        slots = self.slots[first - base : self.n - base]  # (Tn,)
        self.cache_end = self.n
        if all(self.start[r] == base for r in rows):  # no padding: positions are the slots, the mask is causal
            return self.model.hidden(x, positions=slots)[:, -1]
        start = self.start_t[rows][:, None]  # (Bc, 1)
        positions = (slots[None, :] + base - start).clamp(min=0)  # (Bc, Tn); padding at 0, hidden by the mask
        mask = _padding_mask(slots, self.slots[: self.n - base], start - base)  # (Bc, 1, Tn, S)
        return self.model.hidden(x, positions=positions, slots=slots, mask=mask)[:, -1]

    def _window_step(self) -> torch.Tensor:
        """The uncached rows' last hidden states (Bw, C): the model over each row's last context_length tokens.

        These rows all see the same columns, without padding: rows past the context its last context_length
        columns, and rows of one length decoded without the cache their whole prompt and what followed.
        """
        rows = self.window
        x = self.buf[self._index(rows), max(self.start[rows[0]], self.n - self.ctx) : self.n]  # (Bw, W)
        with _cache_set_aside(self.model):
            return self.model.hidden(x)[:, -1]

    def _index(self, rows: list[int]) -> slice | list[int]:
        """Index rows of the buffer: a view when they are all the rows in order (one row, or rows of one length)."""
        return slice(None) if rows == self.all_rows else rows

    def _sample(self, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """(A,) next tokens of `rows` from their logits (A, V)."""
        if isinstance(self.generator, Sequence) and self.sampling["temperature"] > 0:
            return torch.cat(
                [sample_next(logits[i : i + 1], **self.sampling, generator=self.generator[r]) for i, r in enumerate(rows)]
            )
        return sample_next(logits, **self.sampling, generator=self.generator)


def _padding_mask(queries: torch.Tensor, keys: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(B, 1, Tq, S) attention mask: a query sees the keys from its row's start up to itself (causal, no padding).

    queries (Tq,), keys (S,): cache slots; start (B, 1): each row's first real slot. A padding query sees itself
    only, so that no softmax row is empty (an all-masked row gives NaN, which a zero weight would not cancel).
    """
    k, q = keys[None, None, :], queries[None, :, None]  # (1, 1, S), (1, Tq, 1)
    return (((k >= start[:, :, None]) & (k <= q)) | (k == q))[:, None]  # (B, 1, Tq, S)


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
    batch = DecodeBatch(model, idx, [T] * B, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        ends=eos, generator=generator, use_cache=use_cache)
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
    ends = _end_ids(enc, stop_ids)
    tokens = stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token=ends,
                    generator=generator, use_cache=use_cache)
    return TextStream(tokens, enc, len(ids), set(ends), stop)


def _check_stop(stop: Sequence[str]) -> None:
    if any(not s for s in stop):
        raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")


def _end_ids(enc, stop_ids: Sequence[int]) -> list[int]:
    """The ids that end a completion: the tokenizer's own (end-of-text, end of turn), then `stop_ids`."""
    return list(dict.fromkeys([*getattr(enc, "stop_tokens", [enc.eot_token]), *stop_ids]))


def encode_prompt(enc, text: str) -> list[int]:
    """A prompt's ids, special tokens spelled in it included (a lmcore Tokenizer, or a bare tiktoken Encoding)."""
    if hasattr(enc, "stop_tokens"):  # lmcore.tokenizer.Tokenizer
        return enc.encode(text)
    return enc.encode(text, allowed_special=enc.special_tokens_set)


def strip_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Stream `"".join(pieces).strip()`: leading whitespace dropped, trailing whitespace held until text follows it."""
    pending, started = "", False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        body = pending + piece
        kept = body.rstrip()
        pending = body[len(kept) :]
        if kept:
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
    """Complete many prompts (token ids), `batch_size` at a time, each as `stream_text` completes it alone.

    The prompts are sorted by length (less padding), cut into batches and decoded together (DecodeBatch: left
    padding, each row at its own positions, a row leaves its batch when it ends); the completions come back in the
    order of `prompts`. Greedy (temperature 0) gives `stream_text`'s tokens whatever else shares the batch, up to
    floating-point rounding of the batched matmuls (which can flip an argmax between near-equal logits). Sampling:
    prompt i draws from its own generator seeded `seed + i`, as `stream_text(..., seed=seed + i)` does.

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
    ctx = model.config.context_length
    ids = [list(p) or [enc.eot_token] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: min(len(ids[i]), ctx))
    out: list[Completion | None] = [None] * len(ids)
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        done = _complete_batch(model, enc, [ids[i] for i in chunk], [seed + i for i in chunk], max_new_tokens,
                               stop=stop, ends=_end_ids(enc, stop_ids), temperature=temperature, top_k=top_k,
                               top_p=top_p, progress=progress)
        for i, completion in zip(chunk, done):
            out[i] = completion
    return out


def _complete_batch(
    model: GPT,
    enc,
    prompts: list[list[int]],
    seeds: list[int],
    max_new_tokens: int,
    *,
    stop: Sequence[str],
    ends: list[int],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    progress: Callable[[int], None] | None,
) -> list[Completion]:
    """One DecodeBatch over `prompts`, each row's ids through its own TextDecoder."""
    device = next(model.parameters()).device
    ctx = model.config.context_length
    width = max(min(len(p), ctx) for p in prompts)
    padded = [[0] * (width - len(p[-width:])) + p[-width:] for p in prompts]  # left-padded with id 0
    idx = torch.tensor(padded, dtype=torch.long, device=device)  # (B, T)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    texts = [TextDecoder(enc, set(ends), stop) for _ in prompts]
    batch = DecodeBatch(model, idx, [len(p) for p in prompts], max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, ends=ends, generator=generators)
    try:
        while not batch.done:
            rows, tokens = batch.step()
            finished = 0
            for r, t in zip(rows, tokens.tolist()):
                texts[r].push(t)
                if texts[r].finish_reason is not None:  # an end id, or a stop string: the row leaves the batch
                    batch.finish(r)
                    finished += 1
            if progress is not None and finished:
                progress(finished)
    finally:
        batch.close()
    rest = [t for t in texts if t.finish_reason is None]  # max_new_tokens reached
    for t in rest:
        t.end()
    if progress is not None and rest:
        progress(len(rest))
    return [Completion(t.text, t.token_ids, t.finish_reason, len(p)) for t, p in zip(texts, prompts)]
