"""lmcore.generation.generate_batch: ragged prompts decoded together equal each prompt decoded alone (`stream_text`),
for GPT-2 (learned positions) and Llama-style (RoPE, grouped-query attention) models; GPT.hidden with cache slots;
the benchmarks.generate_speed smoke run."""

from __future__ import annotations

import random

import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.generation import Completion, generate_batch, stream_text
from lmcore.model import GPT, KVCache
from lmcore.tokenizer import get_tokenizer

CTX = 16  # context of the micro models
N = 10  # new tokens: prompts of 7 tokens and more run past the context
LENGTHS = [1, 4, 2, 9, 3, 12, 6, 5, 7, 1, 10, 40]  # 40: cropped to its last 16

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2_micro() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, context_length=CTX, n_embd=16, n_layer=2, n_head=2)).eval()


def llama_micro() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(preset="llama-micro", vocab_size=64, context_length=CTX, n_head=4, n_kv_head=2)).eval()


BUILDS = pytest.mark.parametrize("build", [gpt2_micro, llama_micro], ids=["gpt2", "llama"])


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")  # ids below 64 are single printable characters


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in LENGTHS]


def alone(model: GPT, enc, prompts: list[list[int]], n: int = N, seed: int = 0, **options) -> list[tuple]:
    """Each prompt through stream_text on its own, prompt i with seed + i (generate_batch's seeds)."""
    out = []
    for i, ids in enumerate(prompts):
        s = stream_text(model, enc, ids, n, seed=seed + i, **{"temperature": 0.0, **options})
        "".join(s)
        out.append((s.text, s.token_ids, s.finish_reason, s.prompt_tokens))
    return out


def fields(completions: list[Completion]) -> list[tuple]:
    return [(c.text, c.token_ids, c.finish_reason, c.prompt_tokens) for c in completions]


@BUILDS
def test_greedy_batches_equal_one_at_a_time(build, enc, prompts):
    model = build()
    expected = alone(model, enc, prompts)
    assert len({tuple(e[1]) for e in expected}) > 4  # the prompts do lead to different completions
    for batch_size in (1, 3, 8):
        assert fields(generate_batch(model, enc, prompts, N, batch_size=batch_size)) == expected, batch_size
    # other neighbours in the batch: the same completions, in the order asked
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    shuffled = generate_batch(model, enc, [prompts[i] for i in order], N, batch_size=5)
    assert fields(shuffled) == [expected[i] for i in order]
    assert model.blocks[0].attn.kv_cache is None and not model.training


@BUILDS
def test_stop_ids_end_rows_at_different_steps(build, enc, prompts):
    model = build()
    full = alone(model, enc, prompts)
    firsts: dict[int, set[int]] = {}  # token -> the steps at which it first comes in the rows that have it
    for _, ids, _, _ in full:
        for t in set(ids):
            firsts.setdefault(t, set()).add(ids.index(t))
    stop_id = max(firsts, key=lambda t: len(firsts[t]))
    expected = alone(model, enc, prompts, stop_ids=[stop_id])
    ends = {len(e[1]) for e in expected if e[2] == "stop"}
    assert len(ends) > 1 and any(e[2] == "length" for e in expected)
    for batch_size in (3, 8):
        got = generate_batch(model, enc, prompts, N, stop_ids=[stop_id], batch_size=batch_size)
        assert fields(got) == expected
    assert all(c.token_ids[-1] == stop_id and stop_id not in c.token_ids[:-1] for c in got if c.finish_reason == "stop")


def test_stop_strings_cut_the_text_as_stream_text(enc, prompts):
    model = llama_micro()
    full = alone(model, enc, prompts)
    text = full[3][0]
    stop = text[4:6]  # two characters from the middle of one completion
    expected = alone(model, enc, prompts, stop=["never there", stop])
    got = generate_batch(model, enc, prompts, N, stop=["never there", stop], batch_size=8)
    assert fields(got) == expected
    assert got[3].text == text[: text.index(stop)] and got[3].finish_reason == "stop" and len(got[3].token_ids) < N
    assert all(c.text == f[0] for c, f in zip(got, full) if c.finish_reason == "length")  # the others are not cut


def test_max_new_tokens_and_edge_cases(enc, prompts):
    model = gpt2_micro()
    got = generate_batch(model, enc, prompts, 3, batch_size=4)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 3 for c in got)
    assert [c.prompt_tokens for c in got] == LENGTHS
    none = generate_batch(model, enc, prompts[:2], 0)
    assert fields(none) == [("", [], "length", 1), ("", [], "length", 4)]
    assert generate_batch(model, enc, [], 5) == []
    finished = []
    generate_batch(model, enc, prompts, 4, batch_size=5, progress=finished.append)
    assert sum(finished) == len(prompts)
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(model, enc, prompts, 4, batch_size=0)
    with pytest.raises(ValueError, match="stop strings"):
        generate_batch(model, enc, prompts, 4, stop=[""])


@BUILDS
def test_a_prompt_longer_than_the_context_is_cropped(build, enc, prompts):
    model = build()
    long = prompts[-1]
    assert len(long) > CTX
    cropped, whole = generate_batch(model, enc, [long[-CTX:], long], N, batch_size=2)
    assert whole.prompt_tokens == len(long) and cropped.token_ids == whole.token_ids and cropped.text == whole.text


@BUILDS
def test_sampling_is_reproducible_per_seed_and_independent_of_the_batch(build, enc, prompts):
    model = build()
    options = dict(temperature=1.0, top_k=20, top_p=0.95)
    expected = alone(model, enc, prompts, seed=7, **options)
    for batch_size in (1, 4, 8):
        assert fields(generate_batch(model, enc, prompts, N, seed=7, batch_size=batch_size, **options)) == expected
    other = fields(generate_batch(model, enc, prompts, N, seed=8, batch_size=8, **options))
    assert other != expected


@BUILDS
def test_hidden_with_per_row_slots_equals_each_row_alone(build):
    """Rows of different lengths in one cache, each from slot 0 (prefilled alone into its row), then one step with
    (B, 1) positions: each row gets its own states (the mask that hides longer rows' slots is built from them)."""
    model = build()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 64, (n,), generator=g) for n in (5, 2, 7)]
    extra = torch.tensor([[3], [4], [5]])  # then one more token each
    with torch.no_grad():
        model.set_kv_cache(3, max_len=8)
        caches = [block.attn.kv_cache for block in model.blocks]
        prefill = []
        for i, r in enumerate(rows):
            for block, cache in zip(model.blocks, caches):
                block.attn.kv_cache = cache.rows(i, 1)
            prefill.append(model.hidden(r[None])[0])  # (len, C)
        for block, cache in zip(model.blocks, caches):
            block.attn.kv_cache = cache
        step = model.hidden(extra, positions=torch.tensor([[len(r)] for r in rows]))  # (3, 1, C)
        model.clear_kv_cache()
        for b, r in enumerate(rows):
            own = model.hidden(torch.cat([r, extra[b]])[None])[0]  # (len + 1, C)
            torch.testing.assert_close(prefill[b], own[:-1], rtol=0, atol=1e-5)
            torch.testing.assert_close(step[b, 0], own[-1], rtol=0, atol=1e-5)


@BUILDS
def test_prompts_are_prefilled_without_padding_and_wait_for_a_free_row(build, enc, prompts, monkeypatch):
    """Continuous batching: no padded position is computed (each prompt is prefilled at its own length), at most
    batch_size rows run at once, a waiting prompt joins while the others are decoding, and a finished row's cache
    place goes to the last row (one row copied)."""
    model = build()
    calls, moves = [], []
    hidden, move = GPT.hidden, KVCache.move
    monkeypatch.setattr(GPT, "hidden", lambda self, idx, **kw: calls.append(tuple(idx.shape)) or hidden(self, idx, **kw))
    monkeypatch.setattr(KVCache, "move", lambda self, *a: moves.append(a) or move(self, *a))
    short = [p for p in prompts if 2 <= len(p) <= 6]  # nothing reaches the context: every row stays in the cache
    counts = {}
    for _, ids, _, _ in alone(model, enc, short):
        for t in set(ids[:-2]):
            counts[t] = counts.get(t, 0) + 1
    stop = [max(counts, key=counts.get)]  # a token most rows produce before their last steps: rows end early
    expected = alone(model, enc, short, stop_ids=stop)
    assert len({len(e[1]) for e in expected}) > 1
    calls.clear()
    got = generate_batch(model, enc, short, N, batch_size=3, stop_ids=stop)
    assert fields(got) == expected
    prefill = [c for c in calls if c[1] > 1]
    assert sum(b * t for b, t in prefill) == sum(map(len, short))  # every prompt token once, no padding
    assert all(b <= 3 for b, _ in calls)
    first_decode = next(i for i, c in enumerate(calls) if c[1] == 1)
    assert any(c[1] > 1 for c in calls[first_decode:])  # a prompt joined while others were decoding
    assert moves  # a row that ended before the last one: the last one took its place


def test_kv_cache_rows_moves_and_per_row_slots():
    cache = KVCache(4, 2, 8, 3)
    view = cache.rows(1, 2)  # rows 1-2 as a cache of their own, writing into the batch's memory
    view.update(torch.arange(3), torch.ones(2, 2, 3, 3), torch.full((2, 2, 3, 3), 2.0))
    assert bool((cache.k[1:3, :, :3] == 1).all()) and bool((cache.v[1:3, :, :3] == 2).all())
    assert not cache.k[0].any() and not cache.k[3].any() and not cache.k[1:3, :, 3:].any()
    cache.move(2, 0, 3)
    torch.testing.assert_close(cache.k[0], cache.k[2], rtol=0, atol=0)
    k, v = torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3)
    keys, values = cache.update(torch.tensor([[3], [5]]), k, v)  # each row at its own slot; the first two rows
    assert keys.shape == (2, 2, 6, 3)
    torch.testing.assert_close(cache.k[0, :, 3], k[0, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(cache.v[1, :, 5], v[1, :, 0], rtol=0, atol=0)


def test_generate_speed_smoke(capsys):
    pytest.importorskip("transformers")
    from benchmarks.generate_speed import main

    main(["--tiny", "--batch-sizes", "1,3", "--max-new-tokens", "4", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2 and all(line.rstrip().endswith(f"{b}/{b} rows |") for b, line in zip((1, 3), rows))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_instruct_test_responses_are_the_one_at_a_time_ones(enc, temperature):
    """finetune_instruct's test responses: batched, each still the response `stream_text` gives with seed + i."""
    from lmcore.finetune.data import instruction_prompt
    from lmcore.finetune.instruct import generate_responses

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=64, n_embd=16, n_layer=2, n_head=2)).eval()
    entries = [{"instruction": q, "input": x, "output": "ok"} for q, x in
               [("Name a color.", ""), ("Add the numbers.", "2 and 3"), ("Say hi to the reader, politely.", "")]]
    rows = generate_responses(model, enc, entries, "alpaca", max_new_tokens=6, temperature=temperature, top_k=20, seed=5)
    expected = []
    for i, entry in enumerate(entries):
        prompt, stop_ids = instruction_prompt(entry, enc, "alpaca")
        expected.append("".join(stream_text(model, enc, prompt, 6, temperature=temperature, top_k=20, seed=5 + i,
                                            stop_ids=stop_ids)).strip())
    assert [r["response"] for r in rows] == expected and [r["output"] for r in rows] == ["ok"] * 3
