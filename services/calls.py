"""How a model service's core runs one call: resolve the context once, run the model work on
the core's worker thread with a seeded generator, and put the measured time into the
result's cost. Shared by the drafter's and the verifier's cores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

from services.roles import CallCost, Stopwatch
from services.sampling import seeded_generator
from services.sessions import Context, SessionContexts
from services.worker import Worker

R = TypeVar("R")

PENDING = CallCost(0.0, 0.0)  # the cost a result is built with, replaced by the measured one in `run_call`


async def run_call(
    worker: Worker,
    contexts: SessionContexts,
    vocab_size: int,
    session_id: str,
    context: Context,
    seed: int,
    work: Callable[[list[int], torch.Generator], R],
) -> R:
    """work(full context, generator seeded by `seed`) on the worker thread; its result, whose
    `cost` is the time the call took there. Raises ContextMiss when a delta misses."""

    def run() -> R:
        watch = Stopwatch()
        full = contexts.resolve(session_id, context, vocab_size)
        result = work(full, seeded_generator(seed))
        return dataclasses.replace(result, cost=watch.local_cost())

    return await worker.run(run)
