"""One thread that runs a model service's work, awaited from asyncio.

A model and its caches are used from one thread only: a forward pass already uses every
core through the runtime's own threads, and one thread serialises the sessions' calls
without locks. The event loop stays free for health checks and new calls meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Worker:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
