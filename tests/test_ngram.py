"""The max-gram drafter (services/ngram.py): hand-checked proposals, and an index that follows
a sequence that grows and rolls back exactly as one built from scratch."""

from __future__ import annotations

import random

import pytest

from services.ngram import NgramIndex, maxgram_propose

CASES = {
    # The docstring's examples.
    "longest suffix copies what followed it": ([5, 6, 7, 8, 9, 5, 6, 7], 4, [8, 9, 5, 6]),
    "bigram table, then the suffix it creates": ([3, 4, 9, 3, 4, 1, 3], 3, [4, 1, 3]),
    # (1, 2) occurred twice: the latest occurrence wins.
    "latest occurrence of the longest match": ([1, 2, 7, 1, 2, 8, 1, 2], 1, [8]),
    # The 3-gram (6, 1, 2) beats the more recent 2-gram (1, 2).
    "longer match beats a more recent shorter one": ([6, 1, 2, 7, 5, 1, 2, 8, 6, 1, 2], 1, [7]),
    # The copy reaches the end of the context and matching goes on over the proposal.
    "copy runs past the end of the context": ([1, 2, 3, 1, 2], 5, [3, 1, 2, 3, 1]),
    "bigram: most frequent follower": ([4, 1, 4, 1, 4, 2, 9, 4], 1, [1]),
    "bigram: a tie goes to the follower first seen latest": ([4, 1, 4, 2, 9, 4], 1, [2]),
    "nothing ever followed the last token": ([1, 2, 3], 4, []),
    "empty context": ([], 3, []),
    "k = 0": ([1, 2, 1], 0, []),
}


@pytest.mark.parametrize("context, k, expected", CASES.values(), ids=CASES.keys())
def test_proposals(context: list[int], k: int, expected: list[int]) -> None:
    assert maxgram_propose(context, k) == expected


MATCHED_ONLY = {
    # lookup's drafts: a match of two or more tokens, and nothing from the bigram table.
    "a match is copied as before": ([5, 6, 7, 8, 9, 5, 6, 7], 4, [8, 9, 5, 6]),
    "no draft where only the bigram table knows a follower": ([3, 4, 9, 3, 4, 1, 3], 3, []),
    "the last token recurs, but no pair": ([4, 8, 4, 6, 9, 4], 2, []),
    "a match's copy running past the context goes on matching": ([1, 2, 3, 1, 2], 5, [3, 1, 2, 3, 1]),
}


@pytest.mark.parametrize("context, k, expected", MATCHED_ONLY.values(), ids=MATCHED_ONLY.keys())
def test_matched_only_proposals(context: list[int], k: int, expected: list[int]) -> None:
    index = NgramIndex(4)
    index.sync(context)
    assert index.propose(k, matched_only=True) == expected


def test_max_n_caps_the_match_length() -> None:
    # With max_n = 2 only (1, 2) is matched, and its latest occurrence is followed by 9.
    context = [0, 1, 2, 7, 3, 1, 2, 9, 0, 1, 2]
    assert maxgram_propose(context, 1, max_n=4) == [7]
    assert maxgram_propose(context, 1, max_n=2) == [9]


def test_sync_follows_growth_and_rollback_exactly() -> None:
    """An index moved through random edits proposes exactly what a fresh one does."""
    rng = random.Random(0)
    index = NgramIndex(max_n=4)
    seq: list[int] = []
    for _ in range(300):
        if seq and rng.random() < 0.3:
            del seq[rng.randrange(len(seq) + 1) :]  # a rejected speculation rolls back
        seq += [rng.randrange(6) for _ in range(rng.randrange(1, 5))]
        index.sync(seq)
        fresh = NgramIndex(max_n=4)
        fresh.sync(seq)
        assert index.tokens == seq
        assert index.propose(6) == fresh.propose(6)
        assert index._followers == fresh._followers and index._bigram == fresh._bigram
