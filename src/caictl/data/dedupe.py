"""Duplicate prompts: the text a prompt is compared by, exact keys, and near-duplicates by MinHash LSH.

A prompt's text is its user turns joined (a multi-turn prompt is one text), compared as a set of word
shingles. Exact duplicates share their normalised text (case folded, punctuation and spacing dropped). Near
duplicates are found by datasketch's MinHash with locality-sensitive hashing, which proposes candidates without
comparing every pair; each candidate is then confirmed by the exact Jaccard similarity of the two shingle sets,
so a reported similarity is the true one and no pair below the threshold is ever dropped. LSH may miss a pair:
one at the threshold is a candidate 98% of the time, one further above it more often.

The defaults were chosen on labelled pairs (tests/test_prompts_dedupe.py builds them from hh-rlhf's first human
turns: paraphrases made by changing word order, punctuation or one word, against distinct prompts that open with
the same two words): single words as shingles (any longer shingle loses the reordered paraphrases), and the
threshold halfway between the most similar distinct pair (0.56) and the least similar paraphrase (0.67), rounded
down to 0.05.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_THRESHOLD = 0.6
DEFAULT_SHINGLE_SIZE = 1
# MinHash permutations: the estimate's standard error is about sqrt(J(1 - J) / 128) = 0.04 near the threshold.
NUM_PERM = 128
# A pair at the threshold must become a candidate this often: a false candidate costs one exact Jaccard, a
# missed one is a duplicate kept. datasketch's own band choice (weights 0.5/0.5) finds 40% of them at 0.6;
# 0.995 made 20,000 generated rows 5 times slower (benchmarks/bench_prompts_dedupe.py).
CANDIDATE_RECALL = 0.98

# A word keeps its inner apostrophes ("neighbour's", "don't"), so a contraction is one word, not two.
_WORD = re.compile(r"\w+(?:'\w+)*")


def prompt_text(messages: list[dict]) -> str:
    """What a prompt is compared by: its user turns, joined."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def normalised(text: str) -> str:
    """The exact-duplicate key: words only, case folded. A text without a word keeps its stripped self."""
    return " ".join(words(text)) or text.strip().casefold()


def shingles(text: str, size: int) -> frozenset[str]:
    """The text's runs of `size` words; a text shorter than that is one shingle."""
    tokens = words(text)
    if len(tokens) <= size:
        return frozenset([" ".join(tokens)]) if tokens else frozenset()
    return frozenset(" ".join(tokens[i:i + size]) for i in range(len(tokens) - size + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) for LSH: the longest bands (fewest false candidates) that still make a pair at the
    threshold a candidate with probability CANDIDATE_RECALL, 1 - (1 - J^rows)^bands."""
    for rows in range(NUM_PERM // 2, 0, -1):  # datasketch wants at least two bands
        count = NUM_PERM // rows
        if 1 - (1 - threshold ** rows) ** count >= CANDIDATE_RECALL:
            return count, rows
    return NUM_PERM, 1


@dataclass
class Match:
    """The kept (or evaluation) prompt a row duplicates, and how close they are."""

    id: str
    similarity: float


class NearIndex:
    """Prompts seen so far, found again by MinHash LSH and confirmed by exact Jaccard on their shingles."""

    def __init__(self, threshold: float, shingle_size: int):
        from datasketch import MinHashLSH  # numpy and scipy: loaded only by the stage that needs them

        self.threshold = threshold
        self.shingle_size = shingle_size
        self._lsh = MinHashLSH(num_perm=NUM_PERM, params=bands(threshold))
        self._shingles: dict[str, frozenset] = {}

    def signatures(self, texts: list[str]) -> list[tuple[frozenset, object]]:
        """(shingles, MinHash) for each text, hashed in one batch (datasketch's bulk path)."""
        from datasketch import LeanMinHash, MinHash

        sets = [shingles(text, self.shingle_size) for text in texts]
        hashes = MinHash.bulk([[s.encode("utf-8") for s in shingle_set] for shingle_set in sets], num_perm=NUM_PERM)
        # LeanMinHash keeps the hash values only: a third of MinHash's memory, what 100,000 rows need.
        return [(shingle_set, LeanMinHash(h)) for shingle_set, h in zip(sets, hashes)]

    def match(self, signature: tuple[frozenset, object]) -> Match | None:
        """The most similar prompt in the index at or above the threshold, or None. A text without words is
        never near anything: only its exact key can match it."""
        shingle_set, minhash = signature
        if not shingle_set:
            return None
        best = None
        for key in self._lsh.query(minhash):
            similarity = jaccard(shingle_set, self._shingles[key])
            if similarity >= self.threshold and (best is None or similarity > best.similarity):
                best = Match(key, similarity)
        return best

    def add(self, key: str, signature: tuple[frozenset, object]) -> None:
        shingle_set, minhash = signature
        if shingle_set and key not in self._shingles:
            self._lsh.insert(key, minhash, check_duplication=False)
            self._shingles[key] = shingle_set
