"""Exact and near-duplicate removal: the first document of a duplicate group is kept, later ones dropped.

    exact = ExactDuplicates()
    exact.seen_before(text)                 # False the first time, True for the same text again

    near = NearDuplicates(cfg.near_dedup)
    near.seen_before_batch(texts)           # [False, True, ...] in order, each against all kept before it

Exact duplicates are found by the sha256 of the text, keeping 16 bytes of each digest in memory. Near
duplicates are found with datasketch's MinHash over word shingles (`shingle_words` consecutive words,
lowercased, punctuation dropped) and a MinHashLSH index of the kept documents: a document is a near
duplicate when the index returns any candidate for it, i.e. when its estimated Jaccard similarity to a
kept document is about `threshold` or more (LSH banding, chosen by datasketch for that threshold). Only kept
documents enter the index, so no two kept documents are near duplicates of each other. Hashing is seeded
(`seed`) and SHA-1 based, so results are the same on every run and machine.
"""

from __future__ import annotations

import hashlib
import re

from datasketch import MinHash, MinHashLSH

from lmcore.config import NearDedupConfig

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# MinHash's permutation parameters depend on the scheme: named, so a datasketch default change cannot move them.
MINHASH_SCHEME = "affine32"


class ExactDuplicates:
    """Texts seen before, by sha256 (first 16 bytes: a collision needs ~2**64 documents)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def seen_before(self, text: str) -> bool:
        """True when the same text was seen before; otherwise remember it and return False."""
        key = hashlib.sha256(text.encode("utf-8")).digest()[:16]
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


def shingles(text: str, n: int) -> set[bytes]:
    """The set of n-word shingles of `text` (lowercased words, punctuation dropped), UTF-8 encoded.

    A text of fewer than n words is one shingle of all its words; a text with no words has none.
    """
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


class NearDuplicates:
    """A MinHash LSH index of the kept documents."""

    def __init__(self, cfg: NearDedupConfig):
        self.cfg = cfg
        self._lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self._kept = 0

    def __len__(self) -> int:
        return self._kept

    def minhashes(self, texts: list[str]) -> list[MinHash | None]:
        """One MinHash per text (None for a text without words, which is never a near duplicate)."""
        sets = [shingles(t, self.cfg.shingle_words) for t in texts]
        # bulk shares the permutations between the MinHashes; update_batch hashes a shingle set at once.
        hashes = MinHash.bulk(sets, num_perm=self.cfg.num_perm, seed=self.cfg.seed, scheme=MINHASH_SCHEME)
        return [h if s else None for h, s in zip(hashes, sets)]

    def seen_before(self, minhash: MinHash | None) -> bool:
        """True when a kept document is a near duplicate; otherwise keep this one (index it) and return False."""
        if minhash is None:
            return False
        if self._lsh.query(minhash):
            return True
        self._lsh.insert(self._kept, minhash, check_duplication=False)
        self._kept += 1
        return False

    def seen_before_batch(self, texts: list[str]) -> list[bool]:
        """`seen_before` for each text in order: the result does not depend on how texts are batched."""
        return [self.seen_before(h) for h in self.minhashes(texts)]
