"""Exact and near-duplicate removal: near copies with a few words changed go, distinct documents stay, and the
result is the same on every run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmcore.config import NearDedupConfig, PreprocessConfig
from lmcore.data.dedup import ExactDuplicates, NearDuplicates, shingles
from lmcore.data.preprocess import preprocess
from lmcore.paths import DOCUMENTS
from tests.conftest import ROOT, SHARED

GUTENBERG = SHARED / "data" / "corpus" / "gutenberg"


def documents(name: str, n: int, min_words: int = 400) -> list[str]:
    """n documents of at least min_words words: consecutive paragraphs of a mirror book, joined."""
    text = (GUTENBERG / name).read_bytes().decode("utf-8").replace("\r\n", "\n")
    docs, current = [], []
    for paragraph in text.split("\n\n")[300:]:  # past the header, contents and list of illustrations
        current += paragraph.split()
        if len(current) >= min_words:
            docs.append(" ".join(current))
            current = []
            if len(docs) == n:
                return docs
    raise AssertionError(f"{name}: fewer than {n} documents")


def change_words(text: str, positions: list[int]) -> str:
    words = text.split()
    for i in positions:
        words[i] = f"changed{i}"
    return " ".join(words)


def test_exact_duplicates():
    exact = ExactDuplicates()
    assert [exact.seen_before(t) for t in ["a", "b", "a", "a ", "b"]] == [False, False, True, False, True]
    assert len(exact) == 3


def test_shingles():
    assert shingles("The cat, the HAT.", 2) == {b"the cat", b"cat the", b"the hat"}
    assert shingles("Two words", 5) == {b"two words"}
    assert shingles("...", 5) == set()


def test_near_duplicates_with_a_few_words_changed_are_removed():
    originals = documents("pg1342_pride_and_prejudice.txt", 30)
    # Three words changed in a document of >= 400 words: at most 15 of its ~400 5-word shingles differ, a
    # Jaccard similarity of about 0.93. LSH finds a pair at 0.93 with probability 0.99 (0.4 at the 0.8 threshold).
    near = [change_words(p, [10, 50, 90]) for p in originals[:10]]
    dedup = NearDuplicates(NearDedupConfig())
    assert dedup.seen_before_batch(originals) == [False] * 30  # distinct paragraphs are all kept
    assert dedup.seen_before_batch(near) == [True] * 10
    assert len(dedup) == 30


def test_distinct_documents_sharing_phrases_are_kept():
    base = documents("pg98_a_tale_of_two_cities.txt", 1)[0]
    words = base.split()
    # Half of the words replaced: Jaccard similarity of shingles far below 0.8.
    half = change_words(base, list(range(0, len(words), 2)))
    dedup = NearDuplicates(NearDedupConfig())
    assert dedup.seen_before_batch([base, half]) == [False, False]


def test_result_does_not_depend_on_batching():
    docs = documents("pg1342_pride_and_prejudice.txt", 12)
    docs = docs + [change_words(d, [3, 40]) for d in docs[:6]] + docs[6:]
    whole = NearDuplicates(NearDedupConfig()).seen_before_batch(docs)
    chunked = NearDuplicates(NearDedupConfig())
    parts = [chunked.seen_before_batch(docs[i : i + 5]) for i in range(0, len(docs), 5)]
    assert whole == [flag for part in parts for flag in part]
    assert whole == [False] * 12 + [True] * 12


_HASHES = """
import json, sys
from lmcore.config import NearDedupConfig
from lmcore.data.dedup import NearDuplicates
docs = json.loads(sys.stdin.read())
hashes = NearDuplicates(NearDedupConfig()).minhashes(docs)
print(json.dumps([h.hashvalues.tolist() for h in hashes]))
"""


def test_minhashes_are_the_same_in_every_process():
    # Python salts str/bytes hashing per process; the MinHashes must not depend on it.
    docs = documents("pg11_alices_adventures_in_wonderland.txt", 3, min_words=60)
    runs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", _HASHES], input=json.dumps(docs), capture_output=True, text=True,
                             env=env, check=True, timeout=120)
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1]
    here = [h.hashvalues.tolist() for h in NearDuplicates(NearDedupConfig()).minhashes(docs)]
    assert here == runs[0]


@pytest.mark.parametrize("near_enabled", [True, False])
def test_preprocess_near_dedup_keeps_the_first_of_a_group(tmp_path, near_enabled):
    from tests.data.test_preprocess import make_raw

    originals = documents("pg1342_pride_and_prejudice.txt", 8)
    copies = [change_words(p, [7, 70]) for p in originals[:3]]
    exact = originals[3]
    raw = make_raw(tmp_path / "raw", {
        "a": "\n\n".join(originals).encode(),
        "b": "\n\n".join([*copies, exact, "A distinct closing paragraph of this small source."]).encode(),
    })
    cfg = PreprocessConfig(gopher={"enabled": False}, repetition={"enabled": False}, near_dedup={"enabled": near_enabled})
    stats = preprocess(cfg, raw, tmp_path / "clean")
    docs = [json.loads(line) for line in (tmp_path / "clean" / DOCUMENTS).read_text().splitlines()]
    b = stats["sources"]["b"]
    assert b["steps"]["dedup"]["documents_removed"] == 1
    if near_enabled:
        assert [d["id"] for d in docs] == [f"a/{i}" for i in range(8)] + ["b/0"]
        assert b["steps"]["near_dedup"]["documents_removed"] == 3
        assert b["steps"]["near_dedup"]["bytes_removed"] == sum(len(c.encode()) for c in copies)
    else:
        assert len(docs) == 8 + 3 + 1
        assert b["steps"]["near_dedup"] == {"documents_removed": 0, "bytes_removed": 0}
    assert stats["sources"]["a"]["documents_out"] == 8
