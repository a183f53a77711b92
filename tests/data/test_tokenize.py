"""lmcore.data.tokenize: documents -> deterministic, document-split Arrow shards and a manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lmcore.config import TokenizeConfig
from lmcore.data.loader import TokenDataset
from lmcore.data.shards import TOKENS, Shard
from lmcore.data.tokenize import TokenizeError, decode_shard, in_val_split, tokenize
from lmcore.io import read_json, sha256_file
from lmcore.paths import DOCUMENTS, MANIFEST
from lmcore.tokenizer import GPT2_RANKS_SHA256, RANKS_ENV, TIKTOKEN_FILE, TOKENIZER_CONFIG, get_tokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SHAKESPEARE = SHARED / "data" / "corpus" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def ranks_file() -> str:
    return os.environ.get(RANKS_ENV) or str(SHARED / "tokenizers" / "gpt2.tiktoken")


@pytest.fixture(scope="module")
def enc(ranks_file):
    return get_tokenizer("gpt2", ranks_file)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """~400 Shakespeare paragraphs (about 20k tokens), one long document and some odd ones."""
    paras = [p.strip() for p in SHAKESPEARE.read_text(encoding="utf-8")[:100_000].split("\n\n") if p.strip()]
    odd = ["", "  spaces  \n\ttab\n", "naïve 東京 🤖 e\u0301", "<|endoftext|> literal stays text", "x" * 10]
    long_doc = "\n\n".join(paras[:60])  # over 1024 tokens: must get a shard of its own
    return paras[:400] + odd + [long_doc]


def write_docs(clean_dir: Path, texts: list[str]) -> Path:
    clean_dir.mkdir(parents=True, exist_ok=True)
    with open(clean_dir / DOCUMENTS, "w", encoding="utf-8", newline="\n") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"t/{i}", "source": "t", "text": text}, ensure_ascii=False) + "\n")
    return clean_dir


def cfg(ranks_file: str, **kw) -> TokenizeConfig:
    return TokenizeConfig(ranks_file=ranks_file, **{"val_fraction": 0.1, "shard_bytes": 8192, **kw})


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, ranks_file, texts) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tok")
    clean = write_docs(root / "clean", texts)
    manifest = tokenize(cfg(ranks_file), clean, root / "tokens", seed=7)
    return root / "tokens", manifest


def written(manifest: dict) -> dict:
    """The manifest as written to disk: without the run's own counts and timings."""
    return {k: v for k, v in manifest.items() if k != "run"}


def val_indices(texts: list[str], seed: int, fraction: float = 0.1) -> list[int]:
    return [i for i, t in enumerate(texts) if in_val_split(t, seed, fraction)]


def test_round_trip_every_document_once(tokenized, texts, enc):
    out, manifest = tokenized
    got = {
        split: [t for s in manifest["shards"] if s["split"] == split for t in decode_shard(out / s["file"], enc)]
        for split in ("train", "val")
    }
    val_idx = val_indices(texts, seed=7)
    assert got["val"] == [texts[i] for i in val_idx]
    assert got["train"] == [t for i, t in enumerate(texts) if i not in set(val_idx)]
    assert 0.05 < len(got["val"]) / len(texts) < 0.15  # a hash split: close to val_fraction


def test_eot_between_documents(tokenized, texts, enc):
    out, manifest = tokenized
    val_docs = [texts[i] for i in val_indices(texts, seed=7)]
    stream = np.concatenate([Shard(out / s["file"]).tokens for s in manifest["shards"] if s["split"] == "val"])
    expected = [t for text in val_docs for t in enc.encode_ordinary(text) + [50256]]
    assert stream.tolist() == expected
    for s in manifest["shards"]:
        shard = Shard(out / s["file"])
        # EOT exactly at each document's end: a literal "<|endoftext|>" in a text is encoded as text.
        np.testing.assert_array_equal(np.flatnonzero(shard.tokens == 50256), shard.offsets[1:] - 1)


def test_manifest_counts_and_hashes(tokenized, texts):
    out, manifest = tokenized
    assert read_json(out / MANIFEST) == written(manifest)
    assert manifest["run"]["encoded_slices"] == manifest["slices"] and manifest["run"]["reused_slices"] == 0
    head = (manifest["encoding"], manifest["vocab_size"], manifest["eot_token"], manifest["dtype"])
    assert head == ("gpt2", 50257, 50256, "uint16")
    assert (manifest["seed"], manifest["val_fraction"]) == (7, 0.1)
    tokenizer_files = [TOKENIZER_CONFIG, TIKTOKEN_FILE]  # the shards carry the tokenizer that made them
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *tokenizer_files] + [s["file"] for s in manifest["shards"]])
    assert manifest["tokenizer"] == {"kind": "tiktoken", "name": "gpt2", "sha256": GPT2_RANKS_SHA256, "n_vocab": 50257}
    assert load_tokenizer(out).same_as(manifest["tokenizer"])
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        docs = tokens = 0
        for s in shards:
            shard = Shard(out / s["file"])
            assert (s["documents"], s["tokens"]) == (len(shard), len(shard.tokens))
            assert s["sha256"] == sha256_file(out / s["file"])
            docs, tokens = docs + len(shard), tokens + len(shard.tokens)
        assert manifest["splits"][split] == {"documents": docs, "tokens": tokens}
    assert sum(v["documents"] for v in manifest["splits"].values()) == len(texts)


def test_slices_follow_input_bytes(tokenized):
    out, manifest = tokenized
    slices = sorted({tuple(s["input_bytes"]) for s in manifest["shards"]})
    assert len(slices) == manifest["slices"] > 5
    assert slices[0][0] == 0 and slices[-1][1] == manifest["documents_bytes"]
    data = (out.parent / "clean" / DOCUMENTS).read_bytes()
    for (a, b), (c, _) in zip(slices, slices[1:]):
        assert b == c  # contiguous
        assert b - a >= 8192 and data[b - 1 : b] == b"\n"  # at least shard_bytes, cut after a line
    for s in manifest["shards"]:
        assert s["file"] == f"{s['split']}-{s['slice']:05d}.arrow"
    # The long document (the last text) sits whole in one shard.
    assert manifest["longest_document_tokens"] > 1024


def test_uint16_arrow_schema(tokenized):
    out, manifest = tokenized
    with pa.memory_map(str(out / manifest["shards"][0]["file"])) as src:
        schema = pa.ipc.open_file(src).schema
    assert schema.field(TOKENS).type in (pa.list_(pa.uint16()), pa.large_list(pa.uint16()))


def test_loader_reads_the_output(tokenized):
    out, manifest = tokenized
    for split in ("train", "val"):
        data = TokenDataset(out, split)
        assert data.n_tokens == manifest["splits"][split]["tokens"]
        assert data.vocab_size == 50257


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_identical_bytes_for_any_worker_count_and_seeded_split(tmp_path, ranks_file, texts):
    clean = write_docs(tmp_path / "clean", texts[:200])
    a = tokenize(cfg(ranks_file), clean, tmp_path / "a", seed=1, workers=1)
    b = tokenize(cfg(ranks_file), clean, tmp_path / "b", seed=1, workers=2)
    c = tokenize(cfg(ranks_file), clean, tmp_path / "c", seed=2, workers=3)
    assert a["slices"] >= 3 and (a["run"]["workers"], b["run"]["workers"]) == (1, 2)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert written(a) == written(b)
    assert a["shards"] != c["shards"]
    # Rerunning into an existing folder replaces it whole; nothing is left beside it.
    again = tokenize(cfg(ranks_file), clean, tmp_path / "a", seed=2)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "c") and written(again) == written(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "clean"]


def test_split_is_by_document_seeded_and_stable():
    texts = [f"document number {i}" for i in range(2000)]
    a, b, c = val_indices(texts, 3, 0.2), val_indices(texts, 3, 0.2), val_indices(texts, 4, 0.2)
    assert a == b and a != c
    assert abs(len(a) - 400) < 60
    # A document's split depends on its text alone: adding documents moves no one.
    assert val_indices(["new one", *texts], 3, 0.2) == [i + 1 for i in a] or in_val_split("new one", 3, 0.2)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"id": "x", "source": "s"}', "key 'text' missing"),
        ('{"id": "x", "source": "s", "text": 3}', "key 'text' missing or not a string"),
        ("", "not valid JSON"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, ranks_file, line, why):
    clean = write_docs(tmp_path / "clean", ["first", "second"])
    with open(clean / DOCUMENTS, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=rf"{DOCUMENTS}:3: {why}"):
        tokenize(cfg(ranks_file), clean, tmp_path / "tokens", seed=0)
    assert not (tmp_path / "tokens").exists()


def test_invalid_utf8_names_line(tmp_path, ranks_file):
    clean = write_docs(tmp_path / "clean", ["first"])
    with open(clean / DOCUMENTS, "ab") as f:
        f.write(b'{"id": "x", "source": "s", "text": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"{DOCUMENTS}:2: not valid UTF-8"):
        tokenize(cfg(ranks_file), clean, tmp_path / "tokens", seed=0)


def test_empty_or_missing_input_leaves_no_output(tmp_path, ranks_file):
    clean = write_docs(tmp_path / "clean", [])
    with pytest.raises(ValueError, match="no documents"):
        tokenize(cfg(ranks_file), clean, tmp_path / "tokens", seed=0)
    with pytest.raises(FileNotFoundError, match=DOCUMENTS):
        tokenize(cfg(ranks_file), tmp_path / "nowhere", tmp_path / "tokens", seed=0)
    write_docs(clean, ["only one"])
    with pytest.raises(TokenizeError, match="no document fell in the (val|train) split"):
        tokenize(cfg(ranks_file), clean, tmp_path / "tokens", seed=0)
    assert not (tmp_path / "tokens").exists()


def test_failure_keeps_previous_output(tmp_path, ranks_file):
    clean = write_docs(tmp_path / "clean", [f"document {i}" for i in range(40)])
    first = tokenize(cfg(ranks_file), clean, tmp_path / "tokens", seed=0)
    with open(clean / DOCUMENTS, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    with pytest.raises(TokenizeError, match=rf"{DOCUMENTS}:41: not valid JSON"):
        tokenize(cfg(ranks_file), clean, tmp_path / "tokens", seed=1)
    assert read_json(tmp_path / "tokens" / MANIFEST) == written(first)
