"""Bits per byte (lmcore.training.token_bytes / bpb_sums / bits_per_byte): numbers checked by hand, special tokens
and padded ids left out, the same text under two tokenizers, and val_bpb in pretraining and the lifecycle summary."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F
from safetensors.torch import load_file

from lmcore import pipeline
from lmcore.config import ModelConfig, PretrainConfig, TokenizeConfig
from lmcore.data.tokenize import tokenize
from lmcore.model import GPT
from lmcore.paths import DOCUMENTS, SUMMARY, VAL_LOSS, WEIGHTS, Layout
from lmcore.pretrain import pretrain, validation_loss
from lmcore.tokenizer import HF_TOKENIZER_FILE, TOKENIZER_CONFIG, HFTokenizer, get_tokenizer
from lmcore.tracking import ListTracker
from lmcore.training import Precision, bits_per_byte, bpb_change, bpb_sums, token_bytes
from tests.conftest import MICRO
from tests.test_distributed import torchrun
from tests.test_tokenizer import SHARED, tiny_hf_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"
PADDED = 50304  # GPT-2's 50,257 tokens padded up to a multiple of 64, as a model may pad them
DOCS = ["Hello world, this is a test.", "naïve café, Straße, 東京都 and 🤖🚀", "def f(x):\n    return x ** 2\n"]
VERDICT = (SHARED / "data" / "corpus" / "the-verdict.txt").read_text(encoding="utf-8")[:3000]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2", RANKS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 300-token byte-level BPE with <|endoftext|>, <|im_start|> and <|im_end|> as special tokens."""
    return HFTokenizer(tiny_hf_tokenizer(tmp_path_factory.mktemp("tiny") / "tokenizer.json"), name="tiny-bpe")


def uniform(vocab_size: int, context_length: int = 64) -> GPT:
    """A model whose logits are all 0: every next token has probability 1/vocab_size, a loss of ln(vocab_size)."""
    model = GPT(ModelConfig(vocab_size=vocab_size, context_length=context_length, n_embd=8, n_layer=1, n_head=1))
    torch.nn.init.zeros_(model.lm_head.weight)
    return model.eval()


def test_token_bytes_count_text_bytes_and_not_special_or_padded_ids(gpt2, tiny):
    table = token_bytes(gpt2, PADDED)
    assert table.shape == (PADDED,) and table.dtype == torch.long
    assert table[gpt2.encode_ordinary("Hello")[0]] == 5 and table[gpt2.eot_token] == 0
    assert int(table[gpt2.n_vocab:].sum()) == 0  # padding ids stand for no text
    assert token_bytes(gpt2, PADDED) is table  # cached per tokenizer and size

    small = token_bytes(tiny, tiny.n_vocab)
    assert tiny.special_ids == {tiny.encode_single_token(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert all(small[i] == 0 for i in tiny.special_ids)
    assert len(tiny.decode_single_token_bytes(tiny.eot_token)) == 13  # "<|endoftext|>" spelled out, yet 0 bytes of text
    # every byte of a text is counted once, whatever the tokenizer: the tokens' bytes are the text's UTF-8 bytes
    for tok, t in ((gpt2, table), (tiny, small)):
        for text in DOCS + [VERDICT]:
            assert int(t[tok.encode_ordinary(text)].sum()) == len(text.encode("utf-8"))


def test_uniform_model_gives_log2_vocab_times_tokens_per_byte(gpt2):
    """Documents separated by <|endoftext|>: its targets count neither loss nor bytes; the rest cost log2(V) bits each."""
    stream = [gpt2.eot_token]
    for doc in DOCS:
        stream += gpt2.encode_ordinary(doc) + [gpt2.eot_token]
    ids = torch.tensor([stream])
    x, y = ids[:, :-1], ids[:, 1:]  # (1, T)
    text_tokens = sum(len(gpt2.encode_ordinary(d)) for d in DOCS)
    text_bytes = sum(len(d.encode("utf-8")) for d in DOCS)

    table = token_bytes(gpt2, PADDED)
    loss, bpb, _ = validation_loss(uniform(PADDED), [(x, y)], Precision("fp32", "cpu"), table)
    assert loss == pytest.approx(math.log(PADDED), rel=1e-6)  # every target, <|endoftext|> too
    assert bpb == pytest.approx(math.log2(PADDED) * text_tokens / text_bytes, rel=1e-6)
    assert validation_loss(uniform(PADDED), [(x, y)], Precision("fp32", "cpu"))[1] is None  # no tokenizer: no bpb

    # the sums themselves, and ignore_index targets (a fine-tune's masked prompt) counting nothing
    losses = torch.full((y.numel(),), 2.0)
    masked = torch.where(torch.arange(y.numel()) < 3, -100, y.flatten())
    nats, n_bytes = bpb_sums(losses, masked, table)
    first_three = int(table[y.flatten()[:3]].sum())
    assert n_bytes.item() == text_bytes - first_three
    assert nats.item() == 2.0 * int(((masked >= 0) & (table[masked.clamp(min=0)] > 0)).sum())
    assert bits_per_byte(0.0, 0.0) is None


def test_the_same_text_under_two_tokenizers(gpt2, tiny):
    """Per-token losses depend on what a token is; bits per byte does not. A model that pays 0.9 nats per byte of
    text has a per-token loss of 0.9 x bytes/token under each tokenizer, and 0.9/ln 2 bits per byte under both."""
    text_bytes = len(VERDICT.encode("utf-8"))
    per_token, bpb = {}, {}
    for tok in (gpt2, tiny):
        ids = torch.tensor(tok.encode_ordinary(VERDICT))
        table = token_bytes(tok, tok.n_vocab)
        losses = 0.9 * table[ids].double()
        per_token[tok.name] = losses.mean().item()
        nats, n_bytes = bpb_sums(losses, ids, table)
        assert n_bytes.item() == text_bytes
        bpb[tok.name] = bits_per_byte(nats.item(), n_bytes.item())

        # a uniform model over each vocabulary: log2(V) bits per token, spread over the text's bytes
        uniform_losses = F.cross_entropy(torch.zeros(len(ids), tok.n_vocab), ids, reduction="none")
        uniform_bpb = bits_per_byte(*(t.item() for t in bpb_sums(uniform_losses, ids, table)))
        assert uniform_bpb == pytest.approx(math.log2(tok.n_vocab) * len(ids) / text_bytes, rel=1e-6)

    assert per_token["gpt2"] > 1.5 * per_token["tiny-bpe"]  # GPT-2 tokens hold more bytes each
    assert bpb["gpt2"] == pytest.approx(0.9 / math.log(2), rel=1e-12)
    assert bpb["tiny-bpe"] == pytest.approx(0.9 / math.log(2), rel=1e-12)


def verdict_tokens(root: Path, tok, tokens: Path | None = None) -> Path:
    """The Verdict's paragraphs tokenized with `tok` into `tokens` (default root/tokens), 20% of them val."""
    clean, tokens = root / "clean", tokens or root / "tokens"
    clean.mkdir(parents=True)
    text = (SHARED / "data" / "corpus" / "the-verdict.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    (clean / DOCUMENTS).write_text("".join(json.dumps({"id": str(i), "source": "verdict", "text": p}) + "\n" for i, p in enumerate(paragraphs)))
    tokenize(TokenizeConfig(val_fraction=0.2), clean, tokens, seed=1, tokenizer=tok)
    return tokens


def bpb_column(reports: Path) -> list[tuple[int, float]]:
    with open(reports / VAL_LOSS, newline="") as f:
        return [(int(r["step"]), float(r["val_bpb"])) for r in csv.DictReader(f)]


def test_the_change_in_bpb_and_its_paired_stderr_by_hand():
    # three windows of 10, 20 and 30 bytes; the model after saves 1, 4 and 3 nats on them
    before = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]], dtype=torch.float64)
    after = torch.tensor([[9.0, 10.0], [16.0, 20.0], [27.0, 30.0]], dtype=torch.float64)
    change, stderr = bpb_change(before, after)
    bits = [-1 / math.log(2), -4 / math.log(2), -3 / math.log(2)]
    assert change == pytest.approx(sum(bits) / 60)  # (-8 nats) / 60 bytes, in bits
    residual = [b - change * n for b, n in zip(bits, (10, 20, 30))]
    assert stderr == pytest.approx(math.sqrt(3 / 2 * sum(r * r for r in residual)) / 60)
    assert bpb_change(before[:1], after[:1]) == (None, None)  # one window: no standard error
    with pytest.raises(ValueError, match="other windows"):
        bpb_change(before, after.flip(0))


def test_pretraining_reports_val_bpb_without_changing_the_weights(tiny, tmp_path):
    tokens = verdict_tokens(tmp_path, tiny)
    bare = tmp_path / "bare"  # the same shards without their tokenizer: no bpb
    shutil.copytree(tokens, bare)
    for name in (TOKENIZER_CONFIG, HF_TOKENIZER_FILE):
        (bare / name).unlink()
    cfg = PretrainConfig(model=ModelConfig(vocab_size=320, context_length=16, n_embd=16, n_layer=2, n_head=2, dropout=0.1),
                         batch_size=4, max_steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_interval=4, eval_batches=2, device="cpu")

    tracker = ListTracker()
    summary = pretrain(cfg, tokens, tmp_path / "m", tmp_path / "r", seed=3, tracker=tracker)
    plain = pretrain(cfg, bare, tmp_path / "m2", tmp_path / "r2", seed=3)

    # the bpb eval draws no random numbers: dropout masks, batches and weights are those of a run without it
    assert load_file(tmp_path / "m" / WEIGHTS).keys() == load_file(tmp_path / "m2" / WEIGHTS).keys()
    assert all(torch.equal(w, load_file(tmp_path / "m2" / WEIGHTS)[k]) for k, w in load_file(tmp_path / "m" / WEIGHTS).items())
    assert (summary["first_val_loss"], summary["final_val_loss"]) == (plain["first_val_loss"], plain["final_val_loss"])
    assert plain["first_val_bpb"] is None and plain["final_val_bpb"] is None and plain["val_bpb_change_stderr"] is None
    # the change over the run on the same 8 windows, with its paired standard error
    assert summary["val_bpb_change"] == pytest.approx(summary["final_val_bpb"] - summary["first_val_bpb"], abs=1e-9)
    assert 0 < summary["val_bpb_change_stderr"] < abs(summary["val_bpb_change"])
    assert (tmp_path / "r2" / VAL_LOSS).read_text().splitlines()[0] == "step,val_loss"

    with open(tmp_path / "r" / VAL_LOSS, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "val_loss", "val_bpb"] and [int(r["step"]) for r in rows] == [0, 4, 8]
    assert float(rows[0]["val_bpb"]) == pytest.approx(summary["first_val_bpb"], abs=1e-6)
    assert float(rows[-1]["val_bpb"]) == pytest.approx(summary["final_val_bpb"], abs=1e-6)
    assert json.loads((tmp_path / "r" / SUMMARY).read_text())["final_val_bpb"] == summary["final_val_bpb"]
    logged = {s: m["val_bpb"] for s, m in tracker.records if "val_bpb" in m}
    assert logged == {int(r["step"]): pytest.approx(float(r["val_bpb"]), abs=1e-6) for r in rows}
    # a random start pays about log2(320) bits per token, over the ~2-3 bytes of a tiny-BPE token
    assert 1.5 < summary["first_val_bpb"] < math.log2(320) and summary["final_val_bpb"] < summary["first_val_bpb"]


@pytest.mark.slow  # two torchrun processes (make test-all)
def test_val_bpb_under_ddp_is_the_one_process_value(tiny, tmp_path):
    """2 ranks share 3 validation batches (rank 1 scores a weight-0 copy to keep the forwards collective) and sum
    (loss, nats, bytes) across ranks: the same bits per byte as one process scoring all 3."""
    cfg = PretrainConfig(model=ModelConfig(vocab_size=320, context_length=16, n_embd=16, n_layer=2, n_head=2),
                         batch_size=4, max_steps=4, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_interval=2, eval_batches=3,
                         device="cpu", peak_flops=1e12)
    layout = Layout(tmp_path)
    verdict_tokens(tmp_path, tiny, layout.tokens)
    params = yaml.safe_load(MICRO.read_text())
    params["pretrain"] = cfg.model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torchrun(tmp_path)  # 2 ranks x batch 4
    single = pretrain(cfg.model_copy(update={"grad_accum_steps": 2}), layout.tokens, tmp_path / "m", tmp_path / "r", seed=params["seed"])

    ddp, one = bpb_column(layout.pretrain_reports), bpb_column(tmp_path / "r")
    assert [s for s, _ in ddp] == [s for s, _ in one] == [0, 2, 4]
    assert ddp[0][1] == one[0][1] == round(single["first_val_bpb"], 6)  # the same initial model, the same windows
    assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(ddp, one))  # float rounding of the gradient all-reduce
    # each window's (nats, bytes) meet across ranks: the same paired standard error of the change
    ddp_summary = json.loads((layout.pretrain_reports / SUMMARY).read_text())
    assert ddp_summary["val_bpb_change_stderr"] == pytest.approx(single["val_bpb_change_stderr"], rel=1e-3)


def test_summary_rows_and_parent_metrics_show_bpb_and_tolerate_older_summaries():
    pretrain_summary = {"n_params": 10, "steps": 5, "first_val_loss": 5.0, "final_val_loss": 3.0, "first_val_bpb": 2.5,
                        "final_val_bpb": 1.5, "tokens_per_s": 100.0, "registered_model": "m", "model_version": 2}
    evaluate_summary = {"val_loss": 3.1, "perplexity": 22.2, "val_bpb": 1.55}
    rows = dict(pipeline.summary_rows({"pretrain": pretrain_summary, "evaluate": evaluate_summary}))
    assert rows["val loss (first → final)"] == "5.0000 → 3.0000"
    assert rows["val bits per byte (first → final)"] == "2.5000 → 1.5000"
    assert rows["evaluation val bits per byte"] == "1.5500"
    assert pipeline.parent_metrics({"pretrain": pretrain_summary, "evaluate": evaluate_summary}) == {
        "first_val_loss": 5.0, "final_val_loss": 3.0, "first_val_bpb": 2.5, "final_val_bpb": 1.5,
        "val_loss": 3.1, "perplexity": 22.2, "val_bpb": 1.55}

    # the summary of a run from before bits per byte, shown for an unchanged stage: the other rows stay
    old = {k: v for k, v in pretrain_summary.items() if "bpb" not in k}
    rows = dict(pipeline.summary_rows({"pretrain": {**old, pipeline.UNCHANGED: True}}))
    assert rows["val loss (first → final)"] == "5.0000 → 3.0000 (unchanged)"
    assert rows["val bits per byte (first → final)"].startswith("none")
    assert pipeline.parent_metrics({"pretrain": old}) == {"first_val_loss": 5.0, "final_val_loss": 3.0}
