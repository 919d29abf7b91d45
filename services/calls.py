"""How a model service's core runs one call: resolve the context once, run the model work on
the core's worker thread with a seeded generator, and put the measured time into the
result's cost. Shared by the drafter's and the verifier's cores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

from services.errors import BadRequest, Busy
from services.roles import CallCost, Stopwatch
from services.runtime import Runtime
from services.sampling import seeded_generator
from services.sessions import Context, SessionContexts
from services.worker import Worker

R = TypeVar("R")

PENDING = CallCost(0.0, 0.0)  # the cost a result is built with, replaced by the measured one in ModelCalls.run


class ModelCalls:
    """What a model service's core runs its calls through: its runtime, the committed context
    of each session, and the one worker thread that touches both."""

    def __init__(
        self, runtime: Runtime, max_sessions: int, vocab_size: int, worker: Worker, max_queue: int = 0
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

    async def run(
        self, session_id: str, context: Context, seed: int, work: Callable[[list[int], torch.Generator], R]
    ) -> R:
        """work(full context, generator seeded by `seed`) on the worker thread; its result, whose
        `cost` is the time the call took there. Raises ContextMiss when a delta misses, Busy
        when max_queue calls are waiting already."""
        if self.max_queue and self.queued >= self.max_queue:
            wait = self.queued * self._seconds_per_call
            raise Busy(f"{self.queued} calls are queued here (SPECD_MAX_QUEUE); try again in {wait:.2f}s", wait)
        self.queued += 1
        try:
            result = await self.worker.run(self._timed(session_id, context, seed, work))
        finally:
            self.queued -= 1
        self._seconds_per_call += 0.1 * (result.cost.compute_seconds - self._seconds_per_call)
        return result

    def _timed(self, session_id: str, context: Context, seed: int, work: Callable[[list[int], torch.Generator], R]):
        def run() -> R:
            watch = Stopwatch()
            full = self.contexts.resolve(session_id, context, self.vocab_size)
            if len(full) >= self.runtime.info.max_context:
                raise BadRequest(
                    f"the context is {len(full)} tokens; this model's context is {self.runtime.info.max_context}"
                )
            result = work(full, seeded_generator(seed))
            return dataclasses.replace(result, cost=watch.local_cost())

        return run

    async def release(self, session_id: str) -> bool:
        """Forgets a session's context and frees its KV cache; whether either was held."""

        def release() -> bool:
            had = self.contexts.release(session_id)
            return self.runtime.release(session_id) or had

        return await self.worker.run(release)
