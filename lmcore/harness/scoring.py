"""Log-likelihood scoring of multiple-choice items, batched and packed, equal to lm-evaluation-harness's numbers.

    scores = score_items(model, enc, items, batch_size=16)
    scores[0].loglikelihoods   # log P(continuation | context) for each choice, summed over its tokens

What is computed is exactly what lm-eval's HFLM computes for each (context, continuation) request:
- `encode_choices` (lm-eval's `_encode_pair`): trailing whitespace of the context moves to the continuation;
  context + continuation is tokenized whole and the continuation is what follows the context's tokens (an empty
  context is <|endoftext|>);
- a sequence longer than the model's context is cut from the left: the input is (ctx + cont)[-(L + 1):][:-1];
- the log-likelihood is the sum of log-softmax at the continuation's tokens; `is_greedy` says whether every
  one of them is the argmax.

How it is computed is faster:
- **One row per item, context computed once.** The context is followed by every choice's continuation in one
  row; positions restart after the context and a block-causal mask lets each continuation see the context and
  itself only, so each choice sees exactly the tokens it would see alone (tests/test_model.py checks it).
  A continuation's last token is never an input, so one-token choices (MMLU's " A".." D") add nothing to the
  row: all four are read off the context's last position.
- **Rows sorted by length, longest first, and batched only while a batch stays small**: a row longer than 256
  tokens runs alone, shorter ones share a batch of up to TOKENS_PER_BATCH padded tokens. On a CPU a single
  row of a few hundred tokens already runs the matmuls at full speed, so batching long rows buys nothing and
  their padding is pure waste (SmolLM2-135M, 1 thread: 16 rows of 100-700 tokens take 36 s padded into one
  batch, 17 s one by one). A batch that does not fit in memory fails at once, not at the end.
- **Causal attention where nothing is packed**: a batch whose rows are contexts alone (one-token choices)
  runs with `is_causal` (right padding is never seen by a real token), without a (B, T, T) mask.
- **The LM head only where it is needed.** The (T, V) logits of a row are mostly thrown away; here the head
  runs on the hidden states of the scored positions alone, which for a small model with a 50k vocabulary is
  most of the work saved.

Scores do not depend on the batch size beyond float rounding (tests check it): every row is masked to itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmcore.errors import InputError
from lmcore.harness.benchmarks import BenchmarkDataError, Item
from lmcore.model import GPT

HEAD_CHUNK = 256  # scored positions per LM-head matmul: a (256, V) block stays in cache (1.5x faster than 2048 here)
# Padded tokens per forward pass at most (a longer row runs alone). SmolLM2-135M, 1 thread, tokens/s of a forward:
# (1, 32) 273, (8, 32) 400, (1, 128) 363, (4, 128) 369, (1, 256) 373, (1, 1024) 301: past ~256 tokens a row
# alone is as fast as a batch, and short rows gain ~1.5x from sharing one.
TOKENS_PER_BATCH = 512


@dataclass(frozen=True)
class ChoiceScores:
    """One item's choices, scored."""

    loglikelihoods: tuple[float, ...]  # log P(continuation | context), summed over the continuation's tokens
    is_greedy: tuple[bool, ...]  # every continuation token was the argmax
    n_tokens: tuple[int, ...]  # continuation tokens per choice
    truncated: bool  # some choice's input was cut from the left to fit the model's context


def encode_choices(enc, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The context's ids and each continuation's, as lm-eval's `_encode_pair` makes them for every pair.

    The context's trailing whitespace moves to the front of each continuation; context + continuation is
    encoded whole and the continuation is what follows the context's token count. An empty context is lm-eval's
    prefix token: the tokenizer's BOS when it has one (SmolLM2's <|im_start|>), else <|endoftext|> (GPT-2's BOS
    too). The context is encoded once for all continuations.
    """
    if context == "":
        prefix = getattr(enc, "bos_token", None)
        return [enc.eot_token if prefix is None else prefix], [enc.encode_ordinary(cont) for cont in continuations]
    stripped = context.rstrip()
    ctx = enc.encode_ordinary(stripped)
    wholes = [enc.encode_ordinary(context + cont) for cont in continuations]  # = stripped + (spaces + cont)
    return ctx, [whole[len(ctx) :] for whole in wholes]


def encode_pair(enc, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request, as lm-eval's `_encode_pair` makes them."""
    ctx, (cont,) = encode_choices(enc, context, [continuation])
    return ctx, cont


@dataclass
class _Row:
    """A shared prefix followed by continuations (their last token dropped: it is never an input)."""

    item: int  # index into the items
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0 for the prefix, j + 1 for choice j's tokens
    # per choice in this row: (choice index, row indices whose outputs predict its tokens, its token ids)
    targets: list[tuple[int, list[int], list[int]]]


class TooLongError(InputError):
    """A choice longer than the model's context: it cannot be scored (lm-eval stops on an assertion here)."""


def _rows(item_idx: int, ctx: list[int], conts: list[list[int]], max_length: int) -> tuple[list[_Row], bool]:
    """Pack one item into as few rows as the left truncation allows (one, unless choices truncate differently)."""
    by_start: dict[int, list[int]] = {}  # left-truncation offset -> choices
    for j, cont in enumerate(conts):
        if not cont:
            raise BenchmarkDataError(f"item {item_idx}: choice {j} has no tokens after its context")
        if len(cont) > max_length:
            raise TooLongError(f"item {item_idx}: choice {j} has {len(cont)} tokens, more than the context length {max_length}")
        by_start.setdefault(max(0, len(ctx) + len(cont) - (max_length + 1)), []).append(j)
    rows = []
    for start, choices in by_start.items():
        prefix = ctx[start:]
        row = _Row(item_idx, list(prefix), list(range(len(prefix))), [0] * len(prefix), [])
        for j in choices:
            cont = conts[j]
            first = len(row.tokens)
            body = cont[:-1]  # inputs; their outputs predict cont[1:]
            row.tokens += body
            row.positions += range(len(prefix), len(prefix) + len(body))
            row.segments += [j + 1] * len(body)
            row.targets.append((j, [len(prefix) - 1] + list(range(first, first + len(body))), cont))
        rows.append(row)
    return rows, any(by_start)


def _batches(rows: list[_Row], order: list[int], batch_size: int) -> Iterator[list[_Row]]:
    """`rows` in `order` (longest first), cut into batches of at most `batch_size` rows and TOKENS_PER_BATCH padded
    tokens (a row longer than that alone)."""
    batch: list[_Row] = []
    for r in order:
        row = rows[r]
        if batch and (len(batch) == batch_size or (len(batch) + 1) * len(batch[0].tokens) > TOKENS_PER_BATCH):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _batch(rows: list[_Row], device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Right-padded (B, T) ids and positions, and the (B, 1, T, T) block-causal mask (padding sees itself); positions
    and mask None when no row packs a continuation (contexts alone: causal attention, and right padding is never
    attended by a real token)."""
    T = max(len(r.tokens) for r in rows)
    B = len(rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    for b, r in enumerate(rows):
        n = len(r.tokens)
        idx[b, :n] = torch.tensor(r.tokens)
        pos[b, :n] = torch.tensor(r.positions)
        seg[b, :n] = torch.tensor(r.segments)
    if all(max(r.segments) == 0 for r in rows):  # positions 0..n-1 in every row: the default ones
        return idx.to(device), None, None
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    q, k = seg[:, :, None], seg[:, None, :]  # (B, T, 1), (B, 1, T)
    mask = causal & (((k == 0) & (q >= 0)) | (q == k))  # the prefix, or the query's own segment (padding: itself)
    return idx.to(device), pos.to(device), mask[:, None].to(device)


@torch.no_grad()
def score_items(
    model: GPT,
    enc,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    skip_too_long: bool = False,
    progress: bool = True,
) -> list[ChoiceScores | None]:
    """Score every choice of every item. Returns one ChoiceScores per item, in the items' order.

    Args:
        model: a language model (not a classifier head); run in eval mode, put back in its mode afterwards.
        enc: the tiktoken Encoding the model was trained with.
        batch_size: rows per forward pass at most (a row is an item, context and all its choices); a batch also
            holds at most TOKENS_PER_BATCH padded tokens (a longer row runs alone).
        skip_too_long: an item with a choice longer than the model's context gets None instead of raising
            TooLongError (the caller counts them).
        progress: show a tqdm bar.
    """
    if model.lm_head.out_features != model.config.vocab_size:
        raise InputError("score_items needs a language model; this one has a classifier head")
    device = next(model.parameters()).device
    max_length = model.config.context_length
    encoded = [encode_choices(enc, it.context, it.continuations) for it in items]
    rows: list[_Row] = []
    truncated = []
    skipped = set()
    for i, (ctx, conts) in enumerate(encoded):
        try:
            item_rows, cut = _rows(i, ctx, conts, max_length)
        except BenchmarkDataError as err:
            raise BenchmarkDataError(f"{items[i].task} doc {items[i].doc_id}: {err}") from None
        except TooLongError as err:
            if not skip_too_long:
                raise TooLongError(f"{items[i].task} doc {items[i].doc_id}: {err}") from None
            skipped.add(i)
            item_rows, cut = [], False
        rows += item_rows
        truncated.append(cut)
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].tokens), rows[r].item))  # longest first

    ll = [[0.0] * len(c) for _, c in encoded]
    greedy = [[False] * len(c) for _, c in encoded]
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(rows), desc="scoring", unit="row", disable=not progress, dynamic_ncols=True) as bar:
            for batch in _batches(rows, order, batch_size):
                idx, pos, mask = _batch(batch, device)
                hidden = model.hidden(idx, positions=pos, mask=mask)  # (B, T, C)
                # Gather the scored positions of the whole batch, run the head on those alone.
                where_b, where_t, targets, owners = [], [], [], []
                for b, row in enumerate(batch):
                    for j, at, toks in row.targets:
                        where_b += [b] * len(at)
                        where_t += at
                        targets += toks
                        owners.append((row.item, j, len(toks)))
                h = hidden[torch.tensor(where_b, device=device), torch.tensor(where_t, device=device)]  # (N, C)
                tgt = torch.tensor(targets, device=device)  # (N,)
                logp, hit = [], []
                for c in range(0, len(tgt), HEAD_CHUNK):
                    logits = model.lm_head(h[c : c + HEAD_CHUNK]).float()  # (n, V)
                    lp = F.log_softmax(logits, dim=-1)
                    t = tgt[c : c + HEAD_CHUNK]
                    logp.append(lp.gather(1, t[:, None])[:, 0])
                    hit.append(lp.argmax(dim=-1) == t)
                logp_all, hit_all = torch.cat(logp).cpu(), torch.cat(hit).cpu()
                k = 0
                for item, j, n in owners:
                    ll[item][j] = float(logp_all[k : k + n].sum())
                    greedy[item][j] = bool(hit_all[k : k + n].all())
                    k += n
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return [
        None if i in skipped else ChoiceScores(tuple(ll[i]), tuple(greedy[i]), tuple(len(c) for c in encoded[i][1]), truncated[i])
        for i in range(len(items))
    ]
