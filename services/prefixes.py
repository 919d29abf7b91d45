"""Prefix caching across sessions: the KV entries of contexts prefilled recently, kept so that
a new session whose context begins with the same tokens - the chat template and system
prompt every chat turn starts with, a shared instruction or document - copies them instead
of computing them again.

A runtime (services/torch_runtime.py, services/llama_runtime.py) offers what a session
prefilled from an empty cache to `Prefixes.keep`, and a session about to prefill from an
empty cache asks `Prefixes.best` for the kept context with the longest common prefix. What
an entry holds is the runtime's own (a copy of a transformers cache; a llama.cpp sequence's
state in host memory); this module only chooses.

Exact: a KV entry depends only on the tokens at and before its position, so the entries
copied are the ones the session's own prefill would have computed (bitwise on int8 torch,
whose rows do not depend on their batch; within the runtime's float tolerance otherwise),
and the session feeds everything past the common prefix as before.

Measured on an AMD EPYC (AVX2, 2 cores): the Qwen2.5 chat template with its default system
prompt is 24 tokens, every chat turn's first; prefilling them costs the int8 1.5B target
~16 ms and the llama.cpp 0.5B drafter ~10 ms a token, ~0.6 s of an `sd` turn's first token
(docs/runtimes.md).

Pure: standard library only. Not thread-safe: each runtime calls it from its one thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, TypeVar

from services.context import common_prefix_len

V = TypeVar("V")

# Kept contexts (SPECD_PREFIX_CACHE): a few system prompts in use at once
DEFAULT_ENTRIES = 4
# The fewest tokens worth a copy: below, the prefill is about as cheap as finding and copying
MIN_TOKENS = 16
# The most tokens of one context kept: a longer prompt keeps its first this many
MAX_TOKENS = 1024


class Prefixes(Generic[V]):
    """At most `entries` contexts and what a runtime kept of each, least recently used
    dropped first. `entries` 0: nothing is kept.

        >>> kept = Prefixes(2)
        >>> kept.keep([1, 2, 3] * 8, "a")
        >>> kept.best([1, 2, 3] * 6 + [9, 9])
        ('a', 18)
        >>> kept.best([5] * 30) is None  # nothing in common
        True
    """

    def __init__(self, entries: int = DEFAULT_ENTRIES, min_tokens: int = MIN_TOKENS) -> None:
        if entries < 0:
            raise ValueError(f"a prefix cache keeps >= 0 contexts, got {entries}")
        self.entries = entries
        self.min_tokens = min_tokens
        self._kept: OrderedDict[tuple[int, ...], V] = OrderedDict()
        self.hits = 0  # sessions that started from a kept context
        self.reused_tokens = 0  # tokens those sessions did not prefill

    def __len__(self) -> int:
        return len(self._kept)

    def wanted(self, tokens: Sequence[int]) -> bool:
        """Whether a context just prefilled from an empty cache is worth keeping: long enough,
        and not already covered by a kept one (that context, or a longer one it begins)."""
        if self.entries == 0 or len(tokens) < self.min_tokens:
            return False
        head = tuple(tokens[:MAX_TOKENS])
        return not any(len(kept) >= len(head) and kept[: len(head)] == head for kept in self._kept)

    def keep(self, tokens: Sequence[int], value: V) -> None:
        """Keeps `value`, what the runtime saved of the context `tokens` (at most MAX_TOKENS,
        the caller's to cut), as the most recently used; drops the oldest past `entries`
        and any kept context this one extends."""
        key = tuple(tokens[:MAX_TOKENS])
        for old in [old for old in self._kept if key[: len(old)] == old]:
            del self._kept[old]
        self._kept[key] = value
        while len(self._kept) > self.entries:
            self._kept.popitem(last=False)

    def best(self, seq: Sequence[int], most: int | None = None) -> tuple[V, int] | None:
        """The kept value with the longest common prefix with seq, and that length (at most
        `most`), when it is at least min_tokens; marked most recently used."""
        seq = list(seq)
        found, length = None, 0
        for tokens in self._kept:
            n = common_prefix_len(list(tokens), seq)
            if n > length:
                found, length = tokens, n
        length = min(length, len(seq) if most is None else most)
        if found is None or length < self.min_tokens:
            return None
        self._kept.move_to_end(found)
        self.hits += 1
        self.reused_tokens += length
        return self._kept[found], length
