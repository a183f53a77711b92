"""lmcore.generation: KV-cache decoding, sampling options, stop ids and strings, text streaming; `lmcore generate`/`chat`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app as cli_app
from lmcore.checkpoint import load_model, save_model
from lmcore.config import ModelConfig
from lmcore.finetune.data import format_prompt
from lmcore.generation import TextStream, generate, generate_text, sample_next, stream, stream_text, strip_pieces
from lmcore.model import GPT
from lmcore.tokenizer import get_tokenizer

T = 16  # context of the micro models

pytestmark = pytest.mark.usefixtures("one_thread")


def micro(vocab_size: int = 64, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": vocab_size, "context_length": T, "n_embd": 16, "n_layer": 2, "n_head": 2, **overrides})
    return GPT(cfg).eval()


def llama_micro(vocab_size: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(preset="llama-micro", vocab_size=vocab_size, context_length=T)).eval()


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")


def forced(ids: list[int]) -> Iterator[torch.Tensor]:
    """A token stream that yields the given ids, as `stream` yields them for one row."""
    for t in ids:
        yield torch.tensor([t])


def text_stream(enc, ids: list[int], stop: list[str] = (), stop_ids: set[int] | None = None) -> TextStream:
    return TextStream(forced(ids), enc, 1, {enc.eot_token} if stop_ids is None else stop_ids, stop)


# --- tokens: cache, sampling, eos ---------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_is_argmax_step_by_step(use_cache):
    model = micro()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, idx, 6, temperature=0, use_cache=use_cache)
    assert out.shape == (2, 9) and torch.equal(out[:, :3], idx)

    expected = idx
    for _ in range(6):
        logits, _ = model(expected)
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    assert not out.is_inference()  # usable as input to a later training step


@pytest.mark.parametrize("build", [micro, llama_micro], ids=["gpt2", "llama"])
def test_cached_greedy_equals_uncached_also_past_the_context(build):
    model = build()
    idx = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    # 5 + 30 tokens: the cache fills at 16, then the window slides without it
    cached = generate(model, idx, 30, temperature=0)
    uncached = generate(model, idx, 30, temperature=0, use_cache=False)
    assert cached.shape == (3, 35) and torch.equal(cached, uncached)
    assert all(block.attn.kv_cache is None for block in model.blocks)  # the cache is dropped afterwards


def test_prompt_longer_than_context_is_cropped():
    model = micro()
    idx = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    out = generate(model, idx, 5, temperature=0)
    cropped = generate(model, idx[:, -T:], 5, temperature=0, use_cache=False)
    assert out.shape == (1, 45) and torch.equal(out[:, -5:], cropped[:, -5:])


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = llama_micro()
    idx = torch.tensor([[1, 2]])
    options = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, idx, 12, **options, generator=torch.Generator().manual_seed(0))
    b = generate(model, idx, 12, **options, generator=torch.Generator().manual_seed(0))
    c = generate(model, idx, 12, **options, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("option", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_1_and_a_tiny_top_p_equal_greedy(option):
    model = micro()
    idx = torch.tensor([[7, 8, 9], [1, 1, 1]])
    greedy = generate(model, idx, 8, temperature=0)
    sampled = generate(model, idx, 8, temperature=1.5, **option, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, greedy)


def test_top_k_restricts_the_candidates():
    model = micro()
    idx = torch.tensor([[5, 6, 7]])
    top3 = set(torch.topk(model(idx)[0][0, -1], 3).indices.tolist())
    firsts = {
        generate(model, idx, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(s))[0, -1].item()
        for s in range(40)
    }
    assert firsts <= top3 and len(firsts) > 1


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.4, {2}), (0.75, {2, 0}), (0.85, {2, 0, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_samples_the_smallest_set_reaching_p(top_p, nucleus):
    # probabilities 0.3, 0.05, 0.5, 0.15: by rank ids 2, 0, 3, 1 with cumulative mass 0.5, 0.8, 0.95, 1.0
    logits = torch.tensor([[0.3, 0.05, 0.5, 0.15]]).log().repeat(2000, 1)  # (2000, 4)
    drawn = sample_next(logits, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == nucleus
    # within the nucleus, the renormalised probabilities
    p = torch.tensor([0.3, 0.05, 0.5, 0.15])
    keep = torch.tensor([i in nucleus for i in range(4)])
    expected = torch.where(keep, p, 0) / p[keep].sum()
    assert torch.allclose(torch.bincount(drawn, minlength=4) / 2000, expected, atol=0.04)


def test_invalid_options_are_errors():
    model = micro()
    for bad, match in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k")):
        with pytest.raises(ValueError, match=match):
            generate(model, torch.tensor([[1]]), 2, **bad)


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_ends_each_row_in_a_batch(use_cache):
    model = micro()
    idx = torch.tensor([[1, 2, 3]])
    first = generate(model, idx, 1, temperature=0)[0, -1].item()
    out = generate(model, idx, 10, temperature=0, eos_token=first, use_cache=use_cache)
    assert out.shape == (1, 4)  # stopped right after the end-of-text token

    # Rows finish at different steps: a finished row is padded with eos while the others continue, and each
    # row's tokens are those it gets alone.
    idx2 = torch.tensor([[1, 2, 3], [9, 9, 9], [4, 4, 2]])
    greedy = generate(model, idx2, 10, temperature=0)
    eos = greedy[0, 3].item()
    out2 = generate(model, idx2, 10, temperature=0, eos_token=eos, use_cache=use_cache)
    ends = [row.index(eos) + 1 if eos in row else 10 for row in greedy[:, 3:].tolist()]
    assert ends[0] == 1 and len(set(ends)) > 1  # the rows do finish at different steps
    assert out2.shape[1] == 3 + max(ends)
    for r, n in enumerate(ends):
        assert torch.equal(out2[r, : 3 + n], greedy[r, : 3 + n])
        assert torch.all(out2[r, 3 + n :] == eos)


def test_several_stop_ids_pad_with_the_first():
    model = micro()
    idx = torch.tensor([[1, 2, 3], [9, 9, 9]])
    greedy = generate(model, idx, 6, temperature=0)
    stop_a, stop_b = greedy[1, 4].item(), greedy[0, 3].item()
    out = generate(model, idx, 6, temperature=0, eos_token=[stop_a, stop_b])
    assert out[0, 3].item() == stop_b and torch.all(out[0, 4:] == stop_a)


def test_the_lm_head_follows_weight_updates():
    # generation multiplies by a cached transposed copy of the head on CPU: a new weight version replaces it
    model = micro(seed=3)
    idx = torch.tensor([[1, 2, 3]])
    before = generate(model, idx, 4, temperature=0)
    other = micro(seed=4)
    model.load_state_dict(other.state_dict())  # in place: the same tensors, new versions
    assert torch.equal(generate(model, idx, 4, temperature=0), generate(other, idx, 4, temperature=0, use_cache=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    expected = model(idx)[0][0, -1].argmax().item()
    assert generate(model, idx, 1, temperature=0)[0, -1].item() == expected
    assert not torch.equal(generate(model, idx, 4, temperature=0), before)


def test_generate_restores_the_training_mode():
    model = micro(dropout=0.5).train()
    generate(model, torch.tensor([[1]]), 2)
    assert model.training


def test_stream_yields_the_tokens_of_generate_and_drops_the_cache_when_closed():
    model = micro()
    idx = torch.tensor([[3, 4]])
    steps = stream(model, idx, 5, temperature=0)
    first = next(steps)
    assert model.blocks[0].attn.kv_cache is not None
    steps.close()  # an early end, as a client that hangs up
    assert model.blocks[0].attn.kv_cache is None
    assert first.item() == generate(model, idx, 5, temperature=0)[0, 2].item()
    assert torch.cat([idx[0], torch.cat(list(stream(model, idx, 5, temperature=0)))]).tolist() == generate(model, idx, 5, temperature=0)[0].tolist()


# --- text: stop strings, whole characters, streaming ---------------------------------------------


def test_generate_text_returns_the_completion_only(enc):
    model = micro(50257)
    a = generate_text(model, enc, "Every effort moves you", 10, temperature=1.0, top_k=50, seed=0)
    b = generate_text(model, enc, "Every effort moves you", 10, temperature=1.0, top_k=50, seed=0)
    assert isinstance(a, str) and a == b
    assert not a.startswith("Every effort")

    ids = enc.encode("Every effort moves you")
    greedy = generate(model, torch.tensor([ids]), 10, temperature=0)[0, len(ids) :].tolist()
    expected = greedy[: greedy.index(enc.eot_token)] if enc.eot_token in greedy else greedy
    assert generate_text(model, enc, "Every effort moves you", 10, temperature=0, seed=5) == enc.decode(expected)
    assert generate_text(model, enc, "Every effort moves you", 10, temperature=0, use_cache=False) == enc.decode(expected)


def test_stream_text_pieces_join_to_generate_text(enc):
    model = micro(50257, seed=2)
    options = dict(temperature=1.0, top_p=0.9, seed=4)
    s = stream_text(model, enc, "Hello", 12, **options)
    pieces = list(s)
    assert len(pieces) > 1 and "".join(pieces) == s.text == generate_text(model, enc, "Hello", 12, **options)
    assert s.finish_reason == "length" and len(s.token_ids) == 12 and s.prompt_tokens == 1
    assert enc.decode(s.token_ids) == s.text


def test_stop_string_cuts_the_text_and_ends_generation(enc):
    model = micro(50257, seed=2)
    ids = stream_text(model, enc, "Hello", 12, temperature=1.0, seed=4)
    list(ids)
    full = enc.decode(ids.token_ids)
    # a stop string across a token boundary, from the middle of the text
    bounds = [len(enc.decode(ids.token_ids[:j])) for j in range(1, 12)]
    mid = bounds[5]
    stop = full[mid - 2 : mid + 2]
    cut = full.index(stop)
    s = stream_text(model, enc, "Hello", 12, temperature=1.0, seed=4, stop=["never there", stop])
    pieces = list(s)
    assert "".join(pieces) == full[:cut] and s.finish_reason == "stop"
    assert len(s.token_ids) == next(m for m in range(1, 13) if stop in enc.decode(ids.token_ids[:m])) < 12
    assert generate_text(model, enc, "Hello", 12, temperature=1.0, seed=4, stop=[stop]) == full[:cut]


def test_stop_strings_hold_back_what_might_become_one(enc):
    ids = enc.encode("Hello world. Hello world!")
    s = text_stream(enc, ids, stop=["world!"])
    pieces = list(s)
    # "world" is held back until the next character shows whether it is the stop string: "." (no), "!" (yes)
    assert pieces == ["Hello", " ", "world.", " Hello", " "] and s.finish_reason == "stop"
    # the earliest stop string wins; one at the very start gives empty text
    assert "".join(text_stream(enc, ids, stop=["world!", "lo"])) == "Hel"
    assert "".join(text_stream(enc, ids, stop=["Hello"])) == ""
    # a stop id ends the text without appearing in it
    s = text_stream(enc, ids + [enc.eot_token] + enc.encode(" more"))
    assert "".join(s) == "Hello world. Hello world!" and s.finish_reason == "stop" and s.token_ids[-1] == enc.eot_token


@pytest.mark.parametrize("text", ["東京", "Tokyo 東京 🙂!", "é🙂🙂e"])
def test_streaming_yields_whole_characters_only(enc, text):
    ids = enc.encode(text)
    s = text_stream(enc, ids)
    pieces = list(s)
    assert "".join(pieces) == text and s.finish_reason == "length"
    assert all(pieces) and not any("\ufffd" in p for p in pieces)
    if text == "東京":  # four tokens, two bytes-fragments each character: one piece per character
        assert pieces == ["東", "京"]


def test_a_character_cut_by_the_end_is_a_replacement_character(enc):
    ids = enc.encode("東京")[:3]  # the second character's last byte never comes
    assert "".join(text_stream(enc, ids)) == b"".join(enc.decode_single_token_bytes(t) for t in ids).decode(errors="replace")
    assert "".join(text_stream(enc, [50300, *enc.encode("a")])) == "\ufffda"  # an id beyond the tokenizer's


def test_a_stop_string_with_multibyte_characters(enc):
    ids = enc.encode("Tokyo 東京 🙂!")
    assert "".join(text_stream(enc, ids, stop=["京"])) == "Tokyo 東"
    assert "".join(text_stream(enc, ids, stop=["🙂"])) == "Tokyo 東京 "


def test_strip_pieces():
    for pieces in (["  ", "\n Hi", " there", " ", "\n"], ["Hi there"], [" ", "Hi", " ", "there", "  "], [" ", " "], []):
        assert "".join(strip_pieces(pieces)) == "".join(pieces).strip()
    assert list(strip_pieces([" ", "a", " ", "b", " "])) == ["a", " b"]


# --- the CLI -----------------------------------------------------------------------------------


MICRO = dict(vocab_size=50257, context_length=64, n_embd=32, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "base"
    save_model(GPT(ModelConfig(**MICRO)), out, extra={"tokenizer": "gpt2"})
    return out


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory):
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("models") / "instruct"
    save_model(GPT(ModelConfig(**MICRO)), out, extra={"template": "alpaca", "tokenizer": "gpt2"})
    return out


def test_cli_generate_streams_the_completion(base_dir, enc):
    model = load_model(base_dir)
    options = dict(temperature=0.9, top_k=40, top_p=0.95, seed=3)
    expected = generate_text(model, enc, "Every effort", 12, **options)
    result = CliRunner().invoke(
        cli_app, ["generate", "Every effort", "--model", str(base_dir), "--max-new-tokens", "12", "--temperature", "0.9",
                  "--top-k", "40", "--top-p", "0.95", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "Every effort" + expected + "\n"
    no_stream = CliRunner().invoke(
        cli_app, ["generate", "Every effort", "--model", str(base_dir), "--max-new-tokens", "12", "--temperature", "0.9",
                  "--top-k", "40", "--top-p", "0.95", "--seed", "3", "--no-stream"],
    )
    assert no_stream.stdout == result.stdout

    stop = expected[len(expected) // 2 : len(expected) // 2 + 2]
    assert stop.strip()
    cut = CliRunner().invoke(
        cli_app, ["generate", "Every effort", "--model", str(base_dir), "--max-new-tokens", "12", "--temperature", "0.9",
                  "--top-k", "40", "--top-p", "0.95", "--seed", "3", "--stop", "zzz", "--stop", stop],
    )
    assert cut.exit_code == 0 and cut.stdout == "Every effort" + expected[: expected.index(stop)] + "\n"


def test_cli_chat_streams_responses_in_the_template(instruct_dir, enc):
    model = load_model(instruct_dir)
    lines = ["Name three primary colors.", "Say hi."]
    expected = [generate_text(model, enc, format_prompt({"instruction": q, "input": ""}, "alpaca"), 8, temperature=0).strip() for q in lines]
    result = CliRunner().invoke(cli_app, ["chat", "--model", str(instruct_dir), "--max-new-tokens", "8"], input="\n".join(lines) + "\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(f"> {e}\n" for e in expected) + "> "
    assert "alpaca template" in result.stderr

