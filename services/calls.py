"""How a model service's core runs one call: resolve the context once, run the model work on
the core's worker thread with a seeded generator, and put the measured time into the
result's cost. Shared by the drafter's and the verifier's cores.

Chain passes (a verify over a draft, an `ar` step) of different sessions are batched
(`ModelCalls.run_chain`): the calls that arrive while the worker is busy wait in a queue, and
the next pass takes them together, oldest first, up to a token budget and one call per
session, through Runtime.logits_batch. Nothing waits on purpose: an idle worker starts a pass
with whatever is queued, one call or many, so a lone session pays no window. Each call then
applies its own acceptance rule with its own generator, seeded by the seed it brought, never
by its place in the batch: its output is what it would have been alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from services.errors import BadRequest, Busy
from services.metrics import BATCH_CALLS
from services.roles import CallCost, Stopwatch
from services.runtime import ChainCall, Runtime
from services.sampling import seeded_generator
from services.sessions import Context, ContextDelta, SessionContexts
from services.worker import Worker

R = TypeVar("R")
log = logging.getLogger(__name__)

PENDING = CallCost(0.0, 0.0)  # the cost a result is built with, replaced by the measured one in ModelCalls.run


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
        # chain passes waiting for the worker, and the token budget of one batched pass
        # (0: one call per pass)
        self.max_batch_tokens = max_batch_tokens
        self._chains: deque[_Chain] = deque()
        self._lock = threading.Lock()  # guards _chains and _drain_queued (loop and worker threads)
        self._drain_queued = False
        self.passes = 0  # batched passes run, and the calls they served (metrics: specd:batch_calls)
        self.batched_calls = 0

    async def run(
        self, session_id: str, context: Context, seed: int, work: Callable[[list[int], torch.Generator], R]
    ) -> R:
        """work(full context, generator seeded by `seed`) on the worker thread; its result, whose
        `cost` is the time the call took there. Raises ContextMiss when a delta misses, Busy
        when max_queue calls are waiting already."""
        self._admit()
        self.queued += 1
        try:
            result = await self.worker.run(self._timed(session_id, context, seed, work))
        finally:
            self.queued -= 1
        self._seconds_per_call += 0.1 * (result.cost.compute_seconds - self._seconds_per_call)
        return result

    async def run_chain(
        self,
        session_id: str,
        context: Context,
        seed: int,
        draft: list[int],
        finish: Callable[[list[int], torch.Tensor, torch.Generator], R],
    ) -> R:
        """A pass over the context and then `draft`, batched with other sessions' (see the
        module's docstring): finish(full context, logits (k+1, V) after the context's last
        token and each draft token, generator seeded by `seed`) on the worker thread; its
        result, whose `cost` is the time from the batch's start to this call's finish."""
        self._admit()
        self.queued += 1
        size = (len(context.tokens) if isinstance(context, ContextDelta) else len(context)) + len(draft)
        chain = _Chain(session_id, context, seed, draft, finish, size)
        with self._lock:
            self._chains.append(chain)
            start = not self._drain_queued
            self._drain_queued = True
        if start:
            self.worker.submit(self._drain)
        try:
            result = await asyncio.wrap_future(chain.future)
        finally:
            self.queued -= 1
        self._seconds_per_call += 0.1 * (result.cost.compute_seconds - self._seconds_per_call)
        return result

    def _admit(self) -> None:
        if self.max_queue and self.queued >= self.max_queue:
            wait = self.queued * self._seconds_per_call
            raise Busy(f"{self.queued} calls are queued here (SPECD_MAX_QUEUE); try again in {wait:.2f}s", wait)

    def _take_batch(self) -> list[_Chain]:
        """The next pass's calls, on the worker: the oldest waiting call, then later ones of
        other sessions while they fit the token budget; the rest wait for the pass after, which
        is queued behind whatever the worker was given meanwhile."""
        with self._lock:
            batch: list[_Chain] = []
            left: deque[_Chain] = deque()
            sessions: set[str] = set()
            tokens = 0
            for chain in self._chains:
                if chain.future.cancelled():  # its caller gave up while it waited
                    continue
                if (not batch or tokens + chain.size <= self.max_batch_tokens) and chain.session_id not in sessions:
                    if not chain.future.set_running_or_notify_cancel():
                        continue
                    batch.append(chain)
                    sessions.add(chain.session_id)
                    tokens += chain.size
                else:
                    left.append(chain)
            self._chains = left
            self._drain_queued = bool(left)
        if left:
            self.worker.submit(self._drain)
        return batch

    def _drain(self) -> None:
        batch = self._take_batch()
        watch = Stopwatch()
        ready: list[tuple[_Chain, list[int]]] = []
        for chain in batch:
            try:
                full = self._resolve(chain.session_id, chain.context)
            except Exception as err:  # this call's own error (a context miss, bad ids)
                chain.future.set_exception(err)
                continue
            ready.append((chain, full))
        if not ready:
            return
        self.passes += 1
        self.batched_calls += len(ready)
        BATCH_CALLS.observe(len(ready))
        calls = [ChainCall(chain.session_id, [*full, *chain.draft], len(chain.draft) + 1) for chain, full in ready]
        try:
            rows = self.runtime.logits_batch(calls)
        except Exception as err:
            for chain, _ in ready:
                chain.future.set_exception(err)
            return
        for (chain, full), logits in zip(ready, rows):
            try:
                result = chain.finish(full, logits, seeded_generator(chain.seed))
                chain.future.set_result(dataclasses.replace(result, cost=watch.local_cost()))
            except Exception as err:
                chain.future.set_exception(err)

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


@dataclass(eq=False)
class _Chain(Generic[R]):
    """A chain pass waiting for a batch."""

    session_id: str
    context: Context
    seed: int
    draft: list[int]
    finish: Callable[[list[int], torch.Tensor, torch.Generator], R]
    size: int  # tokens it may feed: its context delta and draft
    future: Future[R] = dataclasses.field(default_factory=Future)
