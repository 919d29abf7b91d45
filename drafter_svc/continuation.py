"""A drafter that goes on drafting after it answers (a Propose call's `continue_k`).

A pipelined round (orchestrator/strategies.pipelined_sd_round) asks for the next round's
draft when its own draft has reached it. Where the drafter is the slower of the two
services, it then idles for one network round trip between drafts: its answer travels to
the orchestrator, and the next request back. A call that names `continue_k` and
`continue_seed` - the request the caller will send next if this draft is all accepted - has
the drafter go on at once: right after answering, it drafts after the call's context and
its answer, with that seed. When that request comes (the same context, seed and sampling),
it is answered from the continuation: at once where it is done, when it is where not, and
extended by the tokens it lacks, with the same generator, where it was cut short. Any other
call of the session cancels it before its next token, and it stops for any other call
waiting for the model: it only ever fills time the drafter would have idled.

The answer is the draft the call would have got drafted afresh: after the same context, the
same generator (seeded by the same seed) drawing the tokens in the same order, the same
stop rule (draft.propose_many's confidence floor). So a continuation changes no output,
greedy or sampled; a caller tells it from a fresh draft only by its time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.context import ContextDelta, resolve_delta
from services.metrics import DRAFTER_CONTINUATIONS
from services.sampling import SamplingParams
from services.sessions import Context


@dataclass(eq=False)
class ProposeItem:
    """What one propose call brings to a batch (DrafterCore._propose_many), and what the batch
    leaves on it: the context it drafted after and the generator it drew with."""

    k: int  # the most tokens to draft
    params: SamplingParams
    stop: Callable[[int], bool]  # given the tokens drafted so far: end the draft here
    generator: torch.Generator | None = None  # draw with this one, not the call's own seed's (an extension)
    full: list[int] | None = None


@dataclass(eq=False)
class Continuation:
    """One session's draft after its last answer (see the module's docstring)."""

    context: list[int]  # what it drafts after: the answered call's context, then its answer
    seed: int
    params: SamplingParams
    cap: int  # it stops at this many tokens; the request that comes sets it to its own k
    others_waiting: Callable[[], int]  # calls of other sessions waiting for the model
    cut: bool = False  # it stopped before a draft's natural end: at its cap, cancelled, or yielding
    item: ProposeItem | None = None
    task: asyncio.Future | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def stop(self, drafted: int) -> bool:
        """ProposeItem.stop, on the worker thread."""
        if self._cancelled.is_set() or drafted >= self.cap or self.others_waiting():
            self.cut = True
            return True
        return False

    def serves(self, context: Context, params: SamplingParams, seed: int) -> bool:
        """Whether a call with this context, sampling and seed is the one it drafts for."""
        if seed != self.seed or params != self.params:
            return False
        # A delta names this context where it resolves against it, to exactly it.
        full = resolve_delta(self.context, context) if isinstance(context, ContextDelta) else list(context)
        return full == self.context

    def cancel(self) -> None:
        self._cancelled.set()


class Continuations:
    """Each session's continuation, at most one; at most `limit` sessions' (the oldest
    cancelled); and what became of them (also exported as specd:drafter_continuations)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._by_session: dict[str, Continuation] = {}
        self.started = self.used = self.extended = self.cancelled = 0

    def count(self, outcome: str) -> None:
        """One more continuation started, used, extended or cancelled."""
        setattr(self, outcome, getattr(self, outcome) + 1)
        DRAFTER_CONTINUATIONS.labels(outcome).inc()

    def add(self, session_id: str, c: Continuation) -> None:
        self.discard(session_id)
        self._by_session[session_id] = c
        self.count("started")
        while len(self._by_session) > self.limit:
            self.discard(next(iter(self._by_session)))

    def take(self, session_id: str, context: Context, params: SamplingParams, seed: int) -> Continuation | None:
        """The session's continuation if it serves this call; None otherwise (any other one
        is cancelled: the session moved elsewhere)."""
        c = self._by_session.get(session_id)
        if c is None or not c.serves(context, params, seed):
            self.discard(session_id)
            return None
        return self._by_session.pop(session_id)

    def discard(self, session_id: str) -> None:
        c = self._by_session.pop(session_id, None)
        if c is not None:
            c.cancel()
            self.count("cancelled")
