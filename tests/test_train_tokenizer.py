"""The trained tokenizer: deterministic BPE training, tiktoken encoding identical to the tokenizer.json's, the
train_tokenizer stage and its report, the tokenize and pretrain stages carrying it, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmcore.bpe import TokenizerTrainingError, bytes_per_token, save_trained, train_bpe
from lmcore.config import ParamsError, load_params
from lmcore.paths import DOCUMENTS, MANIFEST, TOK_EVAL, TOKENIZER_RECORD
from lmcore.stages import StageContext
from lmcore.tokenizer import (
    EOT,
    HF_TOKENIZER_FILE,
    TokenizerError,
    get_tokenizer,
    load_tokenizer,
)
from tests.conftest import MICRO, ROOT, SHARED

SHAKESPEARE = SHARED / "data" / "corpus" / "tinyshakespeare.txt"
MICRO_BPE = ["tokenize.tokenizer=trained", "train_tokenizer.vocab_size=512", "pretrain.model.vocab_size=512",
             "train_tokenizer.eval_benchmarks_limit=20"]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def trained(docs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    return save_trained(train_bpe(docs[:3000], vocab_size=1024, special_tokens=[EOT]), folder, name="bpe-1024", eot=EOT)


def test_training_is_deterministic_whatever_the_threads(docs, tmp_path):
    first = train_bpe(docs[:2000], vocab_size=700, special_tokens=[EOT, "<|pad|>"])
    assert train_bpe(docs[:2000], vocab_size=700, special_tokens=[EOT, "<|pad|>"]) == first
    # the same in another process on one thread (the trainer counts pairs in parallel)
    (tmp_path / "docs.json").write_text(json.dumps(docs[:2000]))
    code = ("import json,sys; from lmcore.bpe import train_bpe; "
            f"sys.stdout.write(train_bpe(json.load(open({str(tmp_path / 'docs.json')!r})), vocab_size=700, "
            "special_tokens=['<|endoftext|>', '<|pad|>']))")
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out == first
    config = json.loads(first)
    vocab = config["model"]["vocab"]
    assert len(vocab) == 698 and [t["content"] for t in config["added_tokens"]] == [EOT, "<|pad|>"]
    assert [t["id"] for t in config["added_tokens"]] == [698, 699]  # special tokens last, as GPT-2's <|endoftext|>
    assert sorted(vocab.values()) == list(range(698))
    assert another_corpus_differs(docs, first)


def another_corpus_differs(docs, first) -> bool:
    return train_bpe(docs[2000:4000], vocab_size=700, special_tokens=[EOT, "<|pad|>"]) != first


def test_encodes_through_tiktoken_exactly_as_its_tokenizer_json(trained, docs):
    assert trained.fast is not None  # tiktoken
    held_out = docs[3000:]
    fast = trained.encode_ordinary_batch(held_out)
    slow = [e.ids for e in trained._plain.encode_batch(held_out, add_special_tokens=False)]
    assert fast == slow and sum(map(len, fast)) > 50_000
    odd = "naïve café — 日本語 🙂 \t\r\n  spaces   and 12345 numbers, it's"
    assert trained.encode_ordinary(odd) == trained._plain.encode(odd, add_special_tokens=False).ids
    assert trained.decode(trained.encode_ordinary(odd)) == odd  # every byte is a token
    assert trained.encode(f"the end{EOT}") == trained.encode_ordinary("the end") + [trained.eot_token]
    assert trained.eot_token == 1023 and trained.special_ids == {1023} and trained.n_vocab == 1024
    assert b"".join(trained.decode_single_token_bytes(i) for i in trained.encode_ordinary(odd)) == odd.encode()


def test_transformers_loads_it_and_encodes_alike(trained, docs):
    from transformers import AutoTokenizer

    folder = trained.path.parent
    hf = AutoTokenizer.from_pretrained(str(folder))
    for text in docs[3000:3200]:
        assert hf.encode(text, add_special_tokens=False) == trained.encode_ordinary(text)
    assert hf.eos_token == EOT and hf.convert_tokens_to_ids(EOT) == trained.eot_token


def test_a_smaller_vocabulary_has_fewer_bytes_per_token(trained, docs):
    gpt2 = get_tokenizer("gpt2")
    ours, theirs = bytes_per_token(trained, docs[3000:]), bytes_per_token(gpt2, docs[3000:])
    assert ours["bytes"] == theirs["bytes"]
    assert 2.0 < ours["bytes_per_token"] < theirs["bytes_per_token"] < 4.0


def test_bad_vocabulary_sizes_and_tokens_name_the_key(tmp_path):
    with pytest.raises(ParamsError, match=r"train_tokenizer\.vocab_size 200 is smaller than the byte alphabet plus the special tokens \(256 \+ 1 = 257\)"):
        load_params(MICRO, ["train_tokenizer.vocab_size=200"])
    with pytest.raises(ParamsError, match=r"train_tokenizer\.special_tokens"):
        load_params(MICRO, ["train_tokenizer.special_tokens=[]"])
    with pytest.raises(ParamsError, match=r"pretrain\.model\.vocab_size 256 is smaller than train_tokenizer\.vocab_size 512"):
        load_params(MICRO, ["tokenize.tokenizer=trained", "train_tokenizer.vocab_size=512", "pretrain.model.vocab_size=256"])
    with pytest.raises(TokenizerTrainingError, match=r"train_tokenizer\.vocab_size 100"):
        train_bpe(["some text"], vocab_size=100, special_tokens=[EOT])


def test_cli_reports_a_bad_vocabulary_size_in_one_line(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent / "lmcore"), "run", "train_tokenizer", "--params", str(MICRO),
                          "--root", str(tmp_path), "--set", "train_tokenizer.vocab_size=10"],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() + out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "train_tokenizer.vocab_size 10" in lines[0], lines


def _ctx(root: Path, overrides=()) -> StageContext:
    return StageContext(root=root, params=load_params(MICRO, [*MICRO_BPE, *overrides]))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A micro project collected, preprocessed and with its tokenizer trained (no MLflow: the stage functions)."""
    from lmcore.stages import collect, preprocess, train_tokenizer

    root = tmp_path_factory.mktemp("project")
    ctx = _ctx(root)
    collect.run(ctx)
    preprocess.run(ctx)
    return root, train_tokenizer.run(ctx)


def test_stage_trains_on_the_train_split_and_reports_bytes_per_token(project):
    root, result = project
    folder = root / "models" / "tokenizer"
    tok = load_tokenizer(folder)
    record = json.loads((folder / TOKENIZER_RECORD).read_text())
    assert tok.name == "bpe-512" and tok.n_vocab == 512 and tok.fast is not None
    assert record["sha256"] == tok.sha256 and record["encoder"] == "tiktoken"
    # the val split of tokenize (micro: val_fraction 0.2) is held out from the tokenizer too
    assert record["train_documents"] > 0 and record["held_out_documents"] > 0
    assert record["train_documents"] + record["held_out_documents"] == len((root / "data/clean" / DOCUMENTS).read_text().splitlines())
    report = json.loads((root / "reports" / "tokenizer" / TOK_EVAL).read_text())
    assert report["vocab"] == {"bpe-512": 512, "gpt2": 50257}
    sets = report["bytes_per_token"]
    assert set(sets["bpe-512"]) == set(sets["gpt2"]) == {"train", "held-out", "hellaswag", "arc_easy"}
    for what in sets["gpt2"]:  # 512 tokens hold less text than 50,257: fewer bytes per token everywhere
        assert sets["bpe-512"][what]["bytes"] == sets["gpt2"][what]["bytes"] > 0
        assert 1.0 < sets["bpe-512"][what]["bytes_per_token"] < sets["gpt2"][what]["bytes_per_token"]
    assert result.metrics["bytes_per_token.held-out"] == sets["bpe-512"]["held-out"]["bytes_per_token"]
    assert result.metrics["gpt2.bytes_per_token.held-out"] == sets["gpt2"]["held-out"]["bytes_per_token"]
    assert (root / "reports" / "tokenizer" / "tok_eval.md").read_text().startswith("| text | bytes | bpe-512")


def test_tokenize_and_pretrain_carry_the_trained_tokenizer(project):
    from lmcore.stages import pretrain, tokenize

    root, _ = project
    ctx = _ctx(root, ["pretrain.init=scratch", "pretrain.max_steps=2"])
    tokenize.run(ctx)
    trained = load_tokenizer(root / "models" / "tokenizer")
    manifest = json.loads((root / "data" / "tokens" / MANIFEST).read_text())
    assert manifest["tokenizer"]["sha256"] == trained.sha256 and manifest["tokenizer"]["name"] == "bpe-512"
    pretrain.run(ctx)
    carried = load_tokenizer(root / "models" / "base")
    assert carried.sha256 == trained.sha256 and carried.fast is not None


def test_empty_corpus_and_tampered_file_are_named(project, tmp_path):
    from lmcore.stages import train_tokenizer

    (tmp_path / "data" / "clean").mkdir(parents=True)
    (tmp_path / "data" / "clean" / DOCUMENTS).write_text("")
    with pytest.raises(TokenizerTrainingError, match=r"documents\.jsonl: no documents in the train split"):
        train_tokenizer.run(_ctx(tmp_path))
    assert not (tmp_path / "models" / "tokenizer").exists()  # nothing half-written
    root, _ = project
    copy = tmp_path / "tok"
    copy.mkdir()
    for f in (root / "models" / "tokenizer").iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    (copy / HF_TOKENIZER_FILE).write_text((copy / HF_TOKENIZER_FILE).read_text().replace('"ignore_merges": true', '"ignore_merges": false'))
    with pytest.raises(TokenizerError, match=r"tok/tokenizer\.json: sha256 [0-9a-f]{64} differs from [0-9a-f]{64} recorded in .*tokenizer_config\.json"):
        load_tokenizer(copy)
