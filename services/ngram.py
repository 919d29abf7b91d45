"""The max-gram drafter: a statistical model of the context itself, with no neural cost.

From Cascade Speculative Drafting (Chen et al. 2024, the "MaG" model at the bottom of the
cascade): the longest suffix of the current context that occurred earlier in the context,
prompt included, proposes the tokens that followed that earlier occurrence. When no suffix
of length >= 2 occurred before, a bigram table of the context (the follower seen most often
after the last token) proposes the next token. Proposals are deterministic, so their q is a
point mass: a reviewer accepts a max-gram token with probability p(token).

Deviation from the paper: its bigram fallback is a table estimated once from Wikipedia; ours
is counted from the session's own context, so the drafter needs no data file and a round
replays identically on any replica (a table shared across sessions would not).

Worked example, max_n = 4, context (token ids)

    position   0  1  2  3  4  5  6  7  8
    token      5  6  7  8  9  5  6  7  ?

The suffix (5, 6, 7) occurred at positions 0-2, followed by 8, 9, 5, 6, 7: propose(4) copies
that continuation, (8, 9, 5, 6). With context (3, 4, 9, 3, 4, 1, 3): no suffix of length >= 2
recurs; after 3 came 4 twice and 1 never (1 follows 4), so the bigram table proposes 4, then
continues from the suffix (3, 4), which occurred at positions 0-1 and 3-4; the latest is
followed by 1, and so on.

Pure: standard library only. Not thread-safe.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from services.context import common_prefix_len


class NgramIndex:
    """An incrementally maintained index of one token sequence's n-grams (1 <= n <= max_n).

    For every n-gram it keeps the positions of the tokens that followed its occurrences
    (so the sequence's own final n-grams, which no token follows yet, are not indexed), and
    for every token a count of its followers: the bigram table. `sync` moves the index to a
    new sequence by undoing the positions past the common prefix and indexing the rest, so a
    speculative round that is partly rejected costs only its own tokens.
    """

    def __init__(self, max_n: int = 4) -> None:
        assert max_n >= 2, f"max_n must be >= 2 (the bigram table is n = 1), got {max_n}"
        self.max_n = max_n
        self.tokens: list[int] = []
        self._followers: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions that followed it
        self._bigram: dict[int, Counter[int]] = {}  # token -> counts of the tokens that followed it

    def sync(self, tokens: Sequence[int]) -> None:
        """Makes the index describe exactly `tokens`."""
        tokens = list(tokens)
        keep = common_prefix_len(self.tokens, tokens)
        for position in range(len(self.tokens) - 1, keep - 1, -1):
            self._unindex(position)
        del self.tokens[keep:]
        for token in tokens[keep:]:
            self.tokens.append(token)
            self._index(len(self.tokens) - 1)

    def _grams_before(self, position: int) -> list[tuple[int, ...]]:
        """The n-grams that end just before `position`, shortest first."""
        return [tuple(self.tokens[position - n : position]) for n in range(1, min(self.max_n, position) + 1)]

    def _index(self, position: int) -> None:
        for gram in self._grams_before(position):
            self._followers.setdefault(gram, []).append(position)
        if position > 0:
            self._bigram.setdefault(self.tokens[position - 1], Counter())[self.tokens[position]] += 1

    def _unindex(self, position: int) -> None:
        for gram in self._grams_before(position):
            followers = self._followers[gram]
            followers.pop()  # positions are appended in order, so `position` is the last one
            if not followers:
                del self._followers[gram]
        if position > 0:
            previous, token = self.tokens[position - 1], self.tokens[position]
            counts = self._bigram[previous]
            counts[token] -= 1
            if not counts[token]:
                # Deleting keeps a Counter's order that of first occurrences, as in a fresh index.
                del counts[token]
                if not counts:
                    del self._bigram[previous]

    def _next(self, seq: Sequence[int], matched_only: bool = False) -> tuple[int, int | None] | None:
        """(next token, the position it was copied from or None for the bigram table) after seq;
        matched_only: None where only the bigram table has a follower."""
        for n in range(min(self.max_n, len(seq)), 1, -1):
            followers = self._followers.get(tuple(seq[-n:]))
            if followers:
                position = followers[-1]  # the latest occurrence: the most local context
                return self.tokens[position], position
        counts = self._bigram.get(seq[-1]) if seq and not matched_only else None
        if not counts:
            return None
        # The most frequent follower; ties go to the one first seen latest (a Counter keeps
        # insertion order, and max keeps the first maximum it meets, so scan from the end).
        best = max(reversed(counts), key=counts.__getitem__)
        return best, None

    def propose(self, k: int, matched_only: bool = False) -> list[int]:
        """Up to k tokens after the indexed sequence; fewer (maybe none) when nothing matches.

        Copies the continuation of the longest match while it lasts (which is what matching
        again after every token would find, up to ties, until the copy reaches the end of
        the sequence), then matches again on the sequence extended by the proposal so far.
        matched_only: stop where no suffix of length >= 2 recurs, instead of guessing from the
        bigram table (prompt lookup: no draft where the text does not repeat itself).
        """
        out: list[int] = []
        copy_from: int | None = None  # position in self.tokens of the next token to copy
        while len(out) < k:
            if copy_from is not None and copy_from < len(self.tokens):
                out.append(self.tokens[copy_from])
                copy_from += 1
                continue
            found = self._next([*self.tokens[-self.max_n :], *out][-self.max_n :], matched_only)
            if found is None:
                break
            token, position = found
            out.append(token)
            copy_from = None if position is None else position + 1
        return out


def maxgram_propose(context: Sequence[int], k: int, max_n: int = 4) -> list[int]:
    """Up to k max-gram tokens after `context`, from a fresh index (see NgramIndex.propose)."""
    index = NgramIndex(max_n)
    index.sync(context)
    return index.propose(k)
