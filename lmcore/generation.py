"""Autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p, stop ids and stop strings, streaming.

    out = generate(model, idx, 40, temperature=0.8, top_k=40, top_p=0.95, generator=torch.Generator().manual_seed(0))
    text = generate_text(model, enc, "Every effort moves you", 40, temperature=0.8, top_k=40, seed=0, stop=["\\n\\n"])
    stream = stream_text(model, enc, "Every effort moves you", 40, temperature=0)
    for piece in stream:                  # text as it is produced, whole characters only
        print(piece, end="", flush=True)
    stream.finish_reason, stream.token_ids  # "stop" or "length"; every generated id (a final end-of-text included)

The cache: the prompt is run once (prefill) into the model's preallocated key/value cache (GPT.set_kv_cache),
then each step runs the model on the one new token at its position. `use_cache=False` runs the model over the
whole (cropped) context at every step instead; both give the same tokens up to floating-point rounding.

Past the context: a prompt longer than context_length is cropped to its last context_length tokens. Once prompt
and generated tokens fill the context, positions cannot go further, so decoding falls back to the uncached
sliding window: each further step runs the model over the last context_length tokens (as use_cache=False does
throughout; learned position embeddings make the cached keys of a shifted window stale). Generation never
stops early because of the context; it only becomes slower.

The model holds one cache, so one generation runs on a model at a time; the cache is dropped when the
generation ends (exhausted, closed, or garbage-collected), and the model's train/eval mode is restored.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    """Yield the next token of every row, one step at a time, as it is produced.

    Args:
        model: the GPT; run in eval mode here and put back in its previous mode afterwards.
        idx: (B, T) prompt token ids on the model's device, T >= 1; only the last context_length are seen.
        max_new_tokens: the most steps.
        temperature, top_k, top_p, generator: see `sample_next`.
        eos_token: one end id or several (token-level stop ids): a row that produced one is finished and is
            padded with the first one from then on; the iterator ends once every row has finished.
        use_cache: False runs the model over the whole cropped context at every step (no KV cache).

    Yields: (B,) token ids, at most max_new_tokens times.
    """
    _check(temperature, top_k, top_p)
    B, T = idx.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. the end-of-text token)")
    eos = [int(t) for t in eos_token] if isinstance(eos_token, Sequence) else [] if eos_token is None else [int(eos_token)]
    eos_ids = torch.tensor(eos, dtype=torch.long, device=idx.device)  # (E,)
    ctx = model.config.context_length
    max_new_tokens = max(0, max_new_tokens)
    buf = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # prompt, then new tokens
    buf[:, :T] = idx
    n = T  # tokens in buf
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)  # (B,)
    was_training = model.training
    model.eval()
    lm_head = _lm_head(model)
    # With the cache, positions count from `start`, the first token of the cropped prompt.
    start = max(0, T - ctx)
    cached = 0  # tokens in the cache
    try:
        if use_cache and max_new_tokens > 0:
            model.set_kv_cache(B, max_len=min(ctx, T - start + max_new_tokens))
            positions = torch.arange(ctx, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache and cached == 0:  # prefill: the whole cropped prompt at once
                h = model.hidden(buf[:, start:n], positions=positions[: n - start])
                cached = n - start
            elif use_cache and cached < ctx:  # one new token, at the next position
                h = model.hidden(buf[:, n - 1 : n], positions=positions[cached : cached + 1])
                cached += 1
            else:
                if use_cache:  # the context is full: slide the window without the cache from here on
                    model.clear_kv_cache()
                    use_cache = False
                h = model.hidden(buf[:, max(0, n - ctx) : n])
            logits = lm_head(h[:, -1])  # (B, V): the last position only
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            if eos:
                token = token.masked_fill(done, eos[0])
                done |= torch.isin(token, eos_ids)
            buf[:, n] = token
            n += 1
            yield token
            if eos and bool(done.all()):
                break
    finally:
        model.clear_kv_cache()
        model.train(was_training)


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


class TextStream:
    """The completion of one prompt as an iterator of text pieces (see `stream_text`).

    Attributes, final once iteration ends: token_ids (every generated id, a final end-of-text or stop id
    included), text (what was yielded, joined), finish_reason ("stop": an end id or a stop string; "length":
    max_new_tokens), prompt_tokens (the number of prompt ids).
    """

    def __init__(self, tokens: Iterator[torch.Tensor], enc, prompt_tokens: int, stop_ids: set[int], stop: Sequence[str]):
        self._tokens, self._enc, self._stop_ids, self._stop = tokens, enc, stop_ids, list(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds back incomplete characters
        self._decoded = ""  # every complete character so far
        self._emitted = 0  # characters of _decoded already yielded
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self.finish_reason is None:
            piece = self._step()
            if piece:
                self.text += piece
                return piece
        raise StopIteration

    def close(self) -> None:
        """End early: frees the model's cache now rather than when the stream is garbage-collected."""
        self._tokens.close()
        if self.finish_reason is None:
            self.finish_reason = "length"

    def _step(self) -> str:
        """Consume one token; return the text that became safe to show (maybe empty)."""
        token = next(self._tokens, None)
        if token is None:  # max_new_tokens reached
            return self._finish("length", self._decoder.decode(b"", final=True))
        t = int(token[0])
        self.token_ids.append(t)
        if t in self._stop_ids:
            return self._finish("stop", self._decoder.decode(b"", final=True))
        new = self._decoder.decode(_token_bytes(self._enc, t))
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
        return piece

    def _finish(self, reason: FinishReason, rest: str) -> str:
        self.finish_reason = reason
        self._tokens.close()  # frees the cache
        self._decoded += rest
        piece, self._emitted = self._decoded[self._emitted :], len(self._decoded)
        return piece


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
    if any(not s for s in stop):
        raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
    device = next(model.parameters()).device
    if isinstance(prompt, str):
        ids = encode_prompt(enc, prompt) or [enc.eot_token]
    else:
        ids = list(prompt) or [enc.eot_token]
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    ends = list(dict.fromkeys([*getattr(enc, "stop_tokens", [enc.eot_token]), *stop_ids]))
    tokens = stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token=ends,
                    generator=generator, use_cache=use_cache)
    return TextStream(tokens, enc, len(ids), set(ends), stop)


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
    """Complete many prompts (token ids), `batch_size` at a time, each exactly as `stream_text` completes it alone.

    STUB: one prompt at a time through `stream_text`; the batched engine replaces the body, not the contract.
    progress: called with the number of prompts just finished.
    """
    out = []
    for i, ids in enumerate(prompts):
        s = stream_text(model, enc, list(ids), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        stop=stop, stop_ids=stop_ids, seed=seed + i)
        text = "".join(s)
        out.append(Completion(text, s.token_ids, s.finish_reason, s.prompt_tokens))
        if progress is not None:
            progress(1)
    return out
