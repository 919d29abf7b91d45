"""One thread that runs a model service's work, awaited from asyncio.

A model and its caches are used from one thread only: a forward pass already uses every
core through the runtime's own threads, and one thread serialises the sessions' calls
without locks. The event loop stays free for health checks and new calls meanwhile.

A service also loads its model on that thread (`call`): torch and llama.cpp keep an OpenMP
thread team per calling thread, and a second team, left over from a load on the main
thread, competes for the cores with the one that serves (measured: one-token passes of the
int8 target ~25% slower).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Worker:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Queues fn(*args) behind the work already queued, from any thread, without waiting."""
        return self._executor.submit(fn, *args)

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the worker's thread, waited for (outside an event loop: a service's start)."""
        return self._executor.submit(fn, *args).result()
