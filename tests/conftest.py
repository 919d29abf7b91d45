"""Shared fixtures: tiny real models, and a real Redis server per test session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

# pytest's default "prepend" import mode puts tests/ on sys.path (no __init__.py here),
# which is how conftest and the test modules import these helpers.
from procs import RedisServer, free_port, start_redis, stop_process  # noqa: F401 (free_port: for tests)

if TYPE_CHECKING:
    from tiny import TinyPair


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    """A tiny target/drafter pair, built once per session (well under a second)."""
    from tiny import build_pair  # here, so runs of pure-core tests never import transformers

    return build_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny drafter whose vocabulary differs from tiny_pair's (tests/tiny.py)."""
    from tiny import build_foreign_drafter

    return build_foreign_drafter(tmp_path_factory.mktemp("tiny-foreign"))


@pytest.fixture
def single_thread_torch() -> Iterator[None]:
    """Run torch on one thread for a test, then restore the thread count.

    Tiny models are all per-op overhead: on the shared 2-core machine, intra-op threads
    contending with other processes made tests/test_tiny.py ~10x slower (22 s vs 2 s).
    """
    import torch  # here, like tiny above: conftest stays cheap to import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real, empty, non-persistent redis-server on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found on PATH; install it: apt-get install redis-server")
    server = start_redis(binary, tmp_path_factory.mktemp("redis"))
    yield server
    stop_process(server.process)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's url, emptied (FLUSHALL) so each test starts from nothing."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url
