"""Context deltas: how a caller tells a model service which tokens it is talking about.

A call to a model service carries the session id, a claim about the prefix the service
already holds (its length and a fingerprint) and the tokens that follow. The bytes of a
round therefore do not grow with the length of the context. When the claim is wrong
(the service restarted, evicted the session, or another replica answers), the service
reports a miss and the caller resends the whole context: a miss costs a re-prefill,
never a wrong token.

Worked example (caller side, then service side):

    held by the service        caller's full context      delta sent
    []                         [5, 6, 7]                   base 0, tokens [5, 6, 7]
    [5, 6, 7, 9]               [5, 6, 7, 9, 2, 4]          base 4 (fp of [5,6,7,9]), tokens [2, 4]
    [5, 6, 7, 9, 8] (stale)    [5, 6, 7, 9, 2, 4]          base 4, tokens [2, 4]   (prefix still matches)
    evicted                    [5, 6, 7, 9, 2, 4]          base 4 -> miss -> base 0, all 6 tokens
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from services.lru import Lru


def fingerprint(tokens: Sequence[int]) -> int:
    """A 64-bit fingerprint of a token sequence (blake2b of its int32 encoding)."""
    digest = hashlib.blake2b(array("i", tokens).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two lists (lists: a tuple never equals a list)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared at C speed
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class ContextDelta:
    """What a call carries instead of the whole context."""

    session_id: str
    base_len: int
    base_fingerprint: int
    tokens: tuple[int, ...]


def resolve_delta(held: Sequence[int] | None, delta: ContextDelta) -> list[int] | None:
    """The full context a delta describes, given what the service holds; None on a miss."""
    if delta.base_len == 0:
        return list(delta.tokens)
    if held is None or len(held) < delta.base_len:
        return None
    base = held[: delta.base_len]
    if fingerprint(base) != delta.base_fingerprint:
        return None
    return list(base) + list(delta.tokens)


def whole_claim(session_id: str, context: Sequence[int]) -> ContextDelta:
    """A delta that claims the service already holds all of `context` and adds nothing. It
    resolves only where the session's committed context there starts with all of it: how a
    pipelined round sends its next verify before the answer that would commit that context
    arrives (orchestrator/strategies.py), and the service computes nothing where the guess was
    wrong."""
    return ContextDelta(session_id, len(context), fingerprint(context), ())


class ContextTracker:
    """Caller-side memory of what each remote service holds for each session.

    Bounded (LRU) so that an orchestrator serving many sessions keeps constant memory;
    forgetting a session only costs one full resend.
    """

    def __init__(self, max_sessions: int = 4096) -> None:
        self._held: Lru[str, list[int]] = Lru(max_sessions, what="tracked context of session")

    def delta(self, session_id: str, context: list[int]) -> ContextDelta:
        held = self._held.peek(session_id) or []
        base_len = common_prefix_len(held, context)
        return ContextDelta(
            session_id=session_id,
            base_len=base_len,
            base_fingerprint=fingerprint(context[:base_len]) if base_len else 0,
            tokens=tuple(context[base_len:]),
        )

    def full(self, session_id: str, context: Sequence[int]) -> ContextDelta:
        """The delta to send after a miss: the whole context."""
        self.forget(session_id)
        return ContextDelta(session_id, 0, 0, tuple(context))

    def acknowledge(self, session_id: str, held: Sequence[int]) -> None:
        """Records that the service now holds `held` for this session."""
        self._held[session_id] = list(held)  # a copy: callers extend their lists in place

    def forget(self, session_id: str) -> None:
        self._held.pop(session_id)
