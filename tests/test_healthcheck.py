"""services.healthcheck against a real grpc.aio server carrying the standard health servicer."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from procs import REPO_ROOT, free_port

from services import healthcheck

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def with_health_server(statuses: dict[str, int], body: Callable[[str], Awaitable[None]]) -> None:
    """Serves `statuses` on a free loopback port and runs `body(address)` against it.

    The check itself is blocking, so `body` runs it in a thread (asyncio.to_thread)
    while this loop keeps serving.
    """

    async def run() -> None:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        for service, status in statuses.items():
            await servicer.set(service, status)
        try:
            await body(f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    asyncio.run(run())


def run_main(argv: list[str]) -> Awaitable[int]:
    return asyncio.to_thread(healthcheck.main, argv)


def test_serving_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    async def body(address: str) -> None:
        assert await run_main([address]) == 0

    with_health_server({"": SERVING}, body)
    assert capsys.readouterr().out.strip().endswith("(overall): SERVING")


def test_named_service_is_checked_not_the_overall_status(capsys: pytest.CaptureFixture[str]) -> None:
    async def body(address: str) -> None:
        assert await run_main([address, "specd.Verifier"]) == 0
        assert await run_main([address, "specd.Drafter"]) == 1

    with_health_server({"": SERVING, "specd.Verifier": SERVING, "specd.Drafter": NOT_SERVING}, body)
    assert "(specd.Drafter): NOT_SERVING" in capsys.readouterr().err


def test_draining_server_exits_1() -> None:
    """What a stopping service looks like: health turned NOT_SERVING before the grace period."""

    async def body(address: str) -> None:
        assert await run_main([address]) == 1

    with_health_server({"": NOT_SERVING}, body)


def test_unknown_service_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    async def body(address: str) -> None:
        assert await run_main([address, "no.Such"]) == 1

    with_health_server({"": SERVING}, body)
    assert capsys.readouterr().err.strip().endswith("(no.Such): NOT_FOUND")


def test_dead_port_exits_1_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert healthcheck.main([address]) == 1
    # A refused connection fails fast; it must not wait out the timeout.
    assert time.monotonic() - started < healthcheck.TIMEOUT_SECONDS
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_silent_server_times_out(capsys: pytest.CaptureFixture[str]) -> None:
    """A port that accepts TCP but never speaks HTTP/2 (a hung process) fails within the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        assert healthcheck.main([address, "--timeout", "0.5"]) == 1
        elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3.0
    assert capsys.readouterr().err.strip()


def test_module_entry_point_exit_codes() -> None:
    """`python -m services.healthcheck` as docker-compose runs it: the exit status is the verdict."""

    def run(address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.healthcheck", address],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    async def body(address: str) -> None:
        done = await asyncio.to_thread(run, address)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{address} (overall): SERVING"

    with_health_server({"": SERVING}, body)
    dead = run(f"127.0.0.1:{free_port()}")
    assert dead.returncode == 1
    assert dead.stderr.strip().startswith("127.0.0.1:")


def test_health_follows_readiness_and_reflection_answers_v1_and_v1alpha() -> None:
    """services.server.serve: NOT_SERVING while readiness names a missing backend (the
    orchestrator's verifier or Redis), SERVING once it is back, `liveness` SERVING
    throughout; reflection answers under grpc.reflection.v1 as well as v1alpha."""
    import os
    import signal

    from grpc_reflection.v1alpha import reflection_pb2

    from services.server import LIVENESS, serve

    missing = {"why": "no verifier replica is healthy"}

    async def readiness() -> str | None:
        return missing["why"]

    async def status(stub, service: str = "") -> int:
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status

    async def until(stub, wanted: int) -> None:
        deadline = time.monotonic() + 10
        while await status(stub) != wanted:
            assert time.monotonic() < deadline, f"health never became {wanted}"
            await asyncio.sleep(0.05)

    async def services(channel, method: str) -> set[str]:
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = [r async for r in call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)]
        return {s.name for s in replies[0].list_services_response.service}

    async def run() -> None:
        port = free_port()
        server = asyncio.create_task(serve(
            name="test", listen=f"127.0.0.1:{port}", register=lambda _: [], grace_seconds=0.1,
            readiness=readiness, readiness_interval=0.05,
        ))  # fmt: skip
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await channel.channel_ready()
                stub = health_pb2_grpc.HealthStub(channel)
                await until(stub, NOT_SERVING)
                assert await status(stub, LIVENESS) == SERVING
                missing["why"] = None
                await until(stub, SERVING)
                missing["why"] = "redis does not answer"
                await until(stub, NOT_SERVING)
                for version in ("v1", "v1alpha"):
                    names = await services(channel, f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo")
                    assert "grpc.health.v1.Health" in names, version
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # serve's own stop: drain and return
            await asyncio.wait_for(server, 10)

    asyncio.run(run())
