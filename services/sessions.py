"""What a model service's core holds for each session beside its runtime's KV cache: the
committed context that context deltas (services/context.py) are resolved against, and a
drafter's max-gram index of it.

Pure: standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.context import ContextDelta, resolve_delta
from services.errors import BadRequest, ContextMiss, check_token_ids
from services.lru import Lru
from services.ngram import NgramIndex
from services.second_stage import GuessLedger

# What a call to a model service's core names its context by: the whole sequence (in this
# process, or after a miss), or a delta against what the service holds (over gRPC).
Context = Sequence[int] | ContextDelta


@dataclass
class SessionState:
    """What a model service's core holds for one session, beside its runtime's KV cache."""

    context: list[int] = field(default_factory=list)  # committed tokens, as the caller sent them
    ngram: NgramIndex | None = None  # a drafter's max-gram index of the context (its second stage)
    guesses: GuessLedger | None = None  # whether that second stage pays for this session


@dataclass
class ContextCounts:
    """How the calls a service resolved named their context (`specd status`): session
    affinity shows as hits, a caller that switched replicas as misses and full contexts."""

    calls: int = 0
    hits: int = 0  # a delta that matched the prefix held
    misses: int = 0  # a delta that did not: the caller resends the whole context
    full: int = 0  # the whole context: a session's first call here, or a resend
    evictions: int = 0  # sessions dropped because more than max_sessions were held


class SessionContexts:
    """The committed context of every session a model service serves (least recently used
    evicted): what context deltas are resolved against, in exactly one place."""

    def __init__(self, max_sessions: int) -> None:
        self.counts = ContextCounts()
        self._states: Lru[str, SessionState] = Lru(max_sessions, on_evict=self._evicted, what="context of session")

    def _evicted(self, session_id: str, state: SessionState) -> None:
        self.counts.evictions += 1

    def __len__(self) -> int:
        return len(self._states)

    def state(self, session_id: str) -> SessionState:
        return self._states.get_or_create(session_id, SessionState)

    def resolve(self, session_id: str, context: Context, vocab_size: int) -> list[int]:
        """The full context a call is about; raises ContextMiss when a delta does not match
        what this service holds, BadRequest for ids outside the vocabulary or no context."""
        self.counts.calls += 1
        if isinstance(context, ContextDelta):
            check_token_ids(context.tokens, vocab_size, "context.tokens")
            held = self._states.get(session_id)
            full = resolve_delta(None if held is None else held.context, context)
            if full is None:
                self.counts.misses += 1
                raise ContextMiss(f"session {session_id}: no cached prefix of {context.base_len} tokens matches")
            if context.base_len:
                self.counts.hits += 1
            else:
                self.counts.full += 1
        else:
            full = list(context)
            check_token_ids(full, vocab_size, "context")
        if not full:
            raise BadRequest("the context is empty: at least one token must come before a draft or a verification")
        return full

    def held(self, session_id: str) -> list[int] | None:
        """The session's committed context here; None for a session not held."""
        state = self._states.peek(session_id)
        return None if state is None else list(state.context)

    def commit(self, session_id: str, context: Sequence[int]) -> None:
        """Records what the caller now believes this service holds for the session."""
        self.state(session_id).context = list(context)

    def release(self, session_id: str) -> bool:
        return self._states.pop(session_id) is not None
