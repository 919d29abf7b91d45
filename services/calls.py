"""How a model service's core runs one call: resolve the context once, run the model work on
the core's worker thread with a seeded generator, and put the measured time into the
result's cost. Shared by the drafter's and the verifier's cores.

Calls of different sessions are batched (`ModelCalls.run_batched`): a verifier's verify, tree
and `ar` calls (`run_pass`, one Runtime.logits_batch), a drafter's proposals (grown in lockstep,
drafter_svc/draft.propose_many). The calls that arrive while the worker is busy wait in a
queue, and the next pass takes them together, oldest first, calls of one kind, up to a token
budget and one call per session. Sessions served together drift apart if nothing holds
them: the first to come back would start a pass alone while the others' calls are on their
way. So a pass waits for the sessions of the pass before it, at most `batch_wait` seconds
(SPECD_BATCH_WAIT_MS), and not at all when none is missing: a lone session, or a pass whose
sessions are all back, starts at once. Each call then applies its own acceptance rule (or
draws its draft) with its own generator, seeded by the seed it brought, never by its place in
the batch: its output is what it would have been alone.

A call that brings a long uncached context (a new turn's prompt) would stall every session
sharing its pass for the whole prefill. So when other sessions' calls share the pass or wait,
a pass feeds its chain calls at most `prefill_chunk` uncached context tokens in all
(SPECD_PREFILL_CHUNK, given to the oldest calls first, beside every call's draft); a call it
fed only part of goes back to the front of the queue for the next pass (chunked prefill).
Alone, a call feeds everything at once: a lone session pays nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from services.context import common_prefix_len
from services.errors import BadRequest, Busy
from services.metrics import BATCH_CALLS
from services.roles import CallCost, Stopwatch
from services.runtime import ChainCall, PassCall, Runtime, TreeCall
from services.sampling import seeded_generator
from services.sessions import Context, ContextDelta, SessionContexts
from services.tree import Tree
from services.worker import Worker

R = TypeVar("R")

PENDING = CallCost(0.0, 0.0)  # the cost a result is built with, replaced by the measured one in ModelCalls
FED_IN_PART = object()  # a batch's result for a call whose pass fed only a chunk of its context


class ModelCalls:
    """What a model service's core runs its calls through: its runtime, the committed context
    of each session, and the one worker thread that touches both."""

    def __init__(
        self,
        runtime: Runtime,
        max_sessions: int,
        vocab_size: int,
        worker: Worker,
        max_queue: int = 0,
        max_batch_tokens: int = 0,
        batch_wait: float = 0.0,
        prefill_chunk: int = 0,
    ) -> None:
        self.runtime = runtime
        self.contexts = SessionContexts(max_sessions)
        self.vocab_size = vocab_size  # the ids calls carry are checked against it
        self.worker = worker
        # Calls waiting or running, and the most that may (0: no bound). The worker takes them
        # in arrival order, so no session waits behind later ones.
        self.max_queue = max_queue
        self.queued = 0
        self._seconds_per_call = 0.05  # a running mean, for the retry hint of a refused call
        # the token budget of one batched pass (0: one call per pass), and the seconds a pass
        # may wait for the sessions of the pass before
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait = batch_wait
        self.prefill_chunk = prefill_chunk  # uncached context tokens a shared pass feeds in all (0: no limit)
        self._lock = threading.Lock()  # guards what follows (the event loop's and the worker's threads)
        self._waiting: deque[_Waiting] = deque()  # calls waiting for a batched pass
        self._arrived = threading.Condition(self._lock)  # a call was added to _waiting
        self._drain_queued = False
        self._last_sessions: set[str] = set()
        self.passes = 0  # batched passes run
        self.chunks = 0  # calls a pass fed only part of (chunked prefill)

    @property
    def waiting(self) -> int:
        """Calls waiting for a pass, not counting those running (what a continuation yields to)."""
        return len(self._waiting)

    async def run(
        self, session_id: str, context: Context, seed: int, work: Callable[[list[int], torch.Generator], R]
    ) -> R:
        """work(full context, generator seeded by `seed`) on the worker thread; its result, whose
        `cost` is the time the call took there. Raises ContextMiss when a delta misses, Busy
        when max_queue calls are waiting already."""
        return await self._admitted(lambda: self.worker.run(self._timed(session_id, context, seed, work)))

    async def run_pass(
        self,
        session_id: str,
        context: Context,
        seed: int,
        draft: list[int] | Tree,
        finish: Callable[[list[int], torch.Tensor, torch.Generator], R],
    ) -> R:
        """A pass over the context and then `draft` (a chain, or a tree with a tree attention
        mask), batched with other sessions' (see the module's docstring): finish(full context,
        logits (N+1, V) after the context's last token and each draft token or node, generator
        seeded by `seed`) on the worker thread; its result, whose `cost` is the time from its
        last pass's start to its finish. Only a chain's context is fed in chunks."""
        most = self.prefill_chunk + len(draft) + 1 if self.prefill_chunk and not isinstance(draft, Tree) else 0
        return await self.run_batched(session_id, context, seed, (draft, finish), len(draft), self._passes, most)

    def _passes(self, calls: list[Batched]) -> list[object]:
        """The batch of run_pass: one Runtime.logits_batch, then each call's finish; a call
        whose pass fed only part of its context (or none of it) gets FED_IN_PART instead."""
        with self._lock:
            shared = len(calls) > 1 or bool(self._waiting)
        budget = self.prefill_chunk if shared and self.prefill_chunk else None
        passes: dict[int, PassCall] = {}
        for i, c in enumerate(calls):  # oldest first: the oldest prefill gets the budget first
            draft = c.item[0]
            if isinstance(draft, Tree):
                passes[i] = TreeCall(c.session_id, c.full, draft, len(draft) + 1)
                continue
            seq, n_last = [*c.full, *draft], len(draft) + 1
            if budget is None:
                passes[i] = ChainCall(c.session_id, seq, n_last)
                continue
            held = min(common_prefix_len(self.runtime.cached(c.session_id)[0], seq), len(seq) - n_last)
            uncached = len(seq) - n_last - held  # context to feed before the rows asked for
            if uncached <= budget:
                passes[i] = ChainCall(c.session_id, seq, n_last)
            elif budget:
                passes[i] = ChainCall(c.session_id, seq[: held + budget], 1)
            budget -= min(uncached, budget)
        rows = dict(zip(passes, self.runtime.logits_batch(list(passes.values()))))
        out: list[object] = []
        for i, c in enumerate(calls):
            call = passes.get(i)
            if call is None or (isinstance(call, ChainCall) and len(call.seq) < len(c.full) + len(c.item[0])):
                out.append(FED_IN_PART)
                continue
            try:
                out.append(c.item[1](c.full, rows[i], c.generator))
            except Exception as err:  # this call's own failure
                out.append(err)
        return out

    async def run_batched(
        self, session_id: str, context: Context, seed: int, item: object, size: int, many: Many, most: int = 0
    ) -> R:
        """A call that runs batched with other sessions' calls of the same `many` (see the
        module's docstring): many(calls) on the worker thread, each call's context resolved,
        returns one result or exception per call (FED_IN_PART: run it again in the next
        pass); this call's result, whose `cost` is the time from its last pass's start to its
        end. size: tokens it adds to a pass beyond its context delta, for the token budget;
        most: the most one pass feeds for it (0: no limit)."""
        size += len(context.tokens) if isinstance(context, ContextDelta) else len(context)
        size = min(size, most) if most else size

        def enqueue() -> asyncio.Future:
            waiting = _Waiting(session_id, context, seed, item, many, size)
            with self._lock:
                self._waiting.append(waiting)
                self._arrived.notify_all()
                start = not self._drain_queued
                self._drain_queued = True
            if start:
                self.worker.submit(self._drain)
            return asyncio.wrap_future(waiting.future)

        return await self._admitted(enqueue)

    async def _admitted(self, start: Callable[[], Awaitable[R]]) -> R:
        """start()'s result, counted among the queued calls while it waits or runs; Busy,
        without starting it, when max_queue calls are queued already."""
        if self.max_queue and self.queued >= self.max_queue:
            wait = self.queued * self._seconds_per_call
            raise Busy(f"{self.queued} calls are queued here (SPECD_MAX_QUEUE); try again in {wait:.2f}s", wait)
        self.queued += 1
        try:
            result = await start()
        finally:
            self.queued -= 1
        self._seconds_per_call += 0.1 * (result.cost.compute_seconds - self._seconds_per_call)
        return result

    def _take_batch(self) -> list[_Waiting]:
        """The next pass's calls, on the worker: the oldest waiting call, then later ones of
        the same kind and of other sessions while they fit the token budget; the rest wait for
        the pass after, which is queued behind whatever the worker was given meanwhile."""
        with self._lock:
            deadline = time.monotonic() + self.batch_wait
            while (self._last_sessions - {w.session_id for w in self._waiting}) and deadline > time.monotonic():
                self._arrived.wait(deadline - time.monotonic())
            batch: list[_Waiting] = []
            left: deque[_Waiting] = deque()
            sessions: set[str] = set()
            tokens = 0
            for waiting in self._waiting:
                if waiting.future.cancelled():  # its caller gave up while it waited
                    continue
                fits = not batch or (tokens + waiting.size <= self.max_batch_tokens and waiting.many == batch[0].many)
                if fits and waiting.session_id not in sessions:
                    if not waiting.future.running() and not waiting.future.set_running_or_notify_cancel():
                        continue
                    batch.append(waiting)
                    sessions.add(waiting.session_id)
                    tokens += waiting.size
                else:
                    left.append(waiting)
            self._waiting = left
            self._drain_queued = bool(left)
            self._last_sessions = sessions
        if left:
            self.worker.submit(self._drain)
        return batch

    def _drain(self) -> None:
        batch = self._take_batch()
        watch = Stopwatch()
        served: list[_Waiting] = []
        ready: list[Batched] = []
        for waiting in batch:
            try:
                full = waiting.full if waiting.full is not None else self._resolve(waiting.session_id, waiting.context)
            except Exception as err:  # this call's own error (a context miss, bad ids)
                waiting.future.set_exception(err)
                continue
            waiting.full = full
            served.append(waiting)
            ready.append(Batched(waiting.session_id, full, waiting.item, seeded_generator(waiting.seed)))
        if not ready:
            return
        tokens = sum(waiting.size for waiting in served)
        self.passes += 1
        BATCH_CALLS.observe(len(ready))
        try:
            results = batch[0].many(ready)
        except Exception as err:
            results = [err] * len(ready)
        self._again([waiting for waiting, result in zip(served, results) if result is FED_IN_PART])
        for waiting, result in zip(served, results):
            if result is FED_IN_PART:
                continue
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                cost = dataclasses.replace(watch.local_cost(), batch_sessions=len(ready), batch_tokens=tokens)
                waiting.future.set_result(dataclasses.replace(result, cost=cost))

    def _again(self, calls: list[_Waiting]) -> None:
        """Puts calls a pass fed only in part back at the front of the queue, oldest first."""
        if not calls:
            return
        with self._lock:
            self._waiting.extendleft(reversed(calls))
            self.chunks += len(calls)
            start = not self._drain_queued
            self._drain_queued = True
        if start:
            self.worker.submit(self._drain)

    def _resolve(self, session_id: str, context: Context) -> list[int]:
        full = self.contexts.resolve(session_id, context, self.vocab_size)
        if len(full) >= self.runtime.info.max_context:
            raise BadRequest(f"the context is {len(full)} tokens; this model's context is {self.runtime.info.max_context}")
        return full

    def _timed(self, session_id: str, context: Context, seed: int, work: Callable[[list[int], torch.Generator], R]):
        def run() -> R:
            watch = Stopwatch()
            full = self._resolve(session_id, context)
            result = work(full, seeded_generator(seed))
            return dataclasses.replace(result, cost=watch.local_cost())

        return run

    async def release(self, session_id: str) -> bool:
        """Forgets a session's context and frees its KV cache; whether either was held."""

        def release() -> bool:
            had = self.contexts.release(session_id)
            return self.runtime.release(session_id) or had

        return await self.worker.run(release)


@dataclass(frozen=True)
class Batched:
    """One call as a batch runs it: its session, its full context, what the call brought,
    and its generator (seeded by the call's seed)."""

    session_id: str
    full: list[int]
    item: Any
    generator: torch.Generator


Many = Callable[[list[Batched]], list[Any]]  # a batch's work: one result or exception per call


@dataclass(eq=False)
class _Waiting:
    """A call waiting for a batch."""

    session_id: str
    context: Context
    seed: int
    item: Any
    many: Many
    size: int  # tokens it may feed: its context delta and what it adds
    future: Future = dataclasses.field(default_factory=Future)
    full: list[int] | None = None  # its context, once resolved (a call fed in chunks keeps it)
