"""Packed, batched scoring: independent of batch size and order, and equal to lm-eval's HFLM where rows get cut."""

from __future__ import annotations

import os
import random

import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.harness.benchmarks import Item, sample, task_items
from lmcore.harness.metrics import item_result
from lmcore.harness.scoring import score_items
from lmcore.model import GPT


@pytest.fixture(scope="module")
def mixed_items(bench_dir):
    items = []
    for task, n in (("hellaswag", 12), ("arc_challenge", 12), ("truthfulqa_mc2", 8), ("mmlu_college_physics", 12)):
        items += sample(task_items(task, bench_dir, num_fewshot=2), n, 3)
    return items


def test_scores_do_not_depend_on_batch_size_or_order(micro_lm, enc, mixed_items, one_thread):
    reference = score_items(micro_lm, enc, mixed_items, batch_size=1, progress=False)
    for batch_size in (4, 64):
        scores = score_items(micro_lm, enc, mixed_items, batch_size=batch_size, progress=False)
        for ref, got in zip(reference, scores):
            # float32 rounding varies with the batch's shape (about 1e-7 relative); picks and scores must not
            assert got.loglikelihoods == pytest.approx(ref.loglikelihoods, abs=1e-5, rel=1e-6)
            assert got.is_greedy == ref.is_greedy and got.n_tokens == ref.n_tokens
        got, ref = list(map(item_result, mixed_items, scores)), list(map(item_result, mixed_items, reference))
        assert [(r["pick"], r["pick_norm"]) for r in got] == [(r["pick"], r["pick_norm"]) for r in ref]
        assert [r["acc"] for r in got] == pytest.approx([r["acc"] for r in ref], abs=1e-5)  # mc2: a probability mass
    shuffled = list(range(len(mixed_items)))
    random.Random(0).shuffle(shuffled)
    again = score_items(micro_lm, enc, [mixed_items[i] for i in shuffled], batch_size=8, progress=False)
    for k, i in enumerate(shuffled):
        assert again[k].loglikelihoods == pytest.approx(reference[i].loglikelihoods, abs=1e-5, rel=1e-6)


def test_long_rows_run_alone_and_short_rows_share_a_batch(micro_lm, enc, mixed_items, one_thread, monkeypatch):
    """Batches hold at most TOKENS_PER_BATCH padded tokens (a longer row alone); rows of contexts alone run causal."""
    from lmcore.harness import scoring

    calls = []
    hidden = GPT.hidden
    monkeypatch.setattr(GPT, "hidden", lambda self, idx, **kw: calls.append((tuple(idx.shape), kw["mask"] is None))
                        or hidden(self, idx, **kw))
    monkeypatch.setattr(scoring, "TOKENS_PER_BATCH", 96)
    reference = score_items(micro_lm, enc, mixed_items, batch_size=1, progress=False)
    calls.clear()
    scores = score_items(micro_lm, enc, mixed_items, batch_size=64, progress=False)
    assert all(b * t <= 96 or b == 1 for (b, t), _ in calls) and any(b > 1 for (b, _), _ in calls)
    assert any(t > 96 for (_, t), _ in calls)  # long rows do come, alone
    for ref, got in zip(reference, scores):
        assert got.loglikelihoods == pytest.approx(ref.loglikelihoods, abs=1e-5, rel=1e-6)
    mmlu = [it for it in mixed_items if it.task.startswith("mmlu")]  # " A".." D": the context alone, causal
    calls.clear()
    score_items(micro_lm, enc, mmlu, batch_size=64, progress=False)
    assert calls and all(causal for _, causal in calls)


def test_cut_rows_and_empty_contexts_equal_lm_evals_hflm(enc, one_thread):
    """A 24-token context: choices of different lengths are cut differently from the left (several rows per item)."""
    from lm_eval.api.instance import Instance

    from benchmarks.peers import gpt2_tokenizer, lmeval_hflm

    torch.manual_seed(3)
    model = GPT(ModelConfig(vocab_size=50257, context_length=24, n_embd=32, n_layer=2, n_head=2)).eval()
    long = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the door. Then"
    items = [
        Item("t", 0, long, ("ran.", "sat down quietly in the corner of the room.", "a very long answer that itself runs on and on and on"), 0),
        Item("t", 1, "Question: 2 + 2 =\nAnswer:", ("4", "five", "22"), 0),
        Item("t", 2, "", ("Hello world", "Once upon a time"), 0),  # no context: <|endoftext|> stands in
        Item("t", 3, long + "  ", ("trailing spaces move to the continuation",), 0),
    ]
    ours = score_items(model, enc, items, batch_size=2, progress=False)
    assert ours[0].truncated and not ours[1].truncated
    peer = lmeval_hflm(model, gpt2_tokenizer(os.environ["LMCORE_TIKTOKEN_FILE"]), batch_size=3)
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(it.context, cont), idx=j)
        for it in items
        for j, cont in enumerate(it.continuations)
    ]
    theirs = iter(peer.loglikelihood(requests, disable_tqdm=True))
    for it, got in zip(items, ours):
        expected = [next(theirs) for _ in it.choices]
        assert got.loglikelihoods == pytest.approx([ll for ll, _ in expected], abs=1e-4, rel=0), it.doc_id
        assert got.is_greedy == tuple(g for _, g in expected)


def test_what_cannot_be_scored_is_an_error(micro_lm, enc):
    model = GPT(ModelConfig(vocab_size=50257, context_length=8, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="choice 0 has 10 tokens, more than the context length 8"):
        score_items(model, enc, [Item("t", 0, "x", (" ".join(["word"] * 10),), 0)], progress=False)
    model.replace_head(2)
    with pytest.raises(ValueError, match="classifier head"):
        score_items(model, enc, [Item("t", 0, "x", ("y",), 0)], progress=False)


def test_an_empty_context_is_lm_evals_prefix_token(tmp_path):
    """lm-eval scores a continuation of nothing after its prefix token: the tokenizer's BOS, else end-of-text."""
    from lmcore.harness.scoring import encode_choices
    from lmcore.tokenizer import HFTokenizer, get_tokenizer
    from tests.test_tokenizer import SHARED, tiny_hf_tokenizer

    gpt2 = get_tokenizer("gpt2", SHARED / "tokenizers" / "gpt2.tiktoken")
    assert encode_choices(gpt2, "", [" a"])[0] == [50256]
    chat = HFTokenizer(tiny_hf_tokenizer(tmp_path / "tokenizer.json"), bos_token="<|im_start|>")
    assert encode_choices(chat, "", [" a"])[0] == [chat.encode_single_token("<|im_start|>")] != [chat.eot_token]
