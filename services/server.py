"""gRPC plumbing shared by every service: logging, server bootstrap, health, reflection,
graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a full-context resend of a long prompt must fit
# How long a stopping model service keeps answering after it reports NOT_SERVING: callers
# check health every second (SPECD_HEALTH_INTERVAL) and move their sessions on meanwhile.
DRAIN_SECONDS = 2.0
# Trailing metadata the orchestrator puts on every status it sends: a client resumes a turn
# only after a status without it (the transport cut the stream: specd/client.py).
FINAL_KEY = "specd-final"


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident memory (Linux; 0 where /proc has no such process)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def channel_options() -> list[tuple[str, int]]:
    """Large messages, and reconnects within a second of a peer coming back (gRPC's default
    backoff grows to two minutes, which kept a restarted service unused for tens of seconds)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


async def serve(
    *,
    name: str,
    listen: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    grace_seconds: float,
    in_flight: Callable[[], int] | None = None,
) -> None:
    """Runs a gRPC server until SIGTERM or SIGINT, then drains and stops.

    `register` adds the servicers and returns their full service names; the standard
    health service reports them SERVING, and reflection lists them for grpcurl.
    On a stop signal health turns NOT_SERVING first, so callers and load balancers send
    no new work. A server with streams (`in_flight` counts them: the orchestrator) lets
    them finish for up to `grace_seconds`; a model service keeps answering for a health
    interval or two, until its callers have seen it leave, then gives in-flight calls the
    rest of the grace. What is still running then is cancelled (a stream's caller resumes
    it elsewhere by its request id).
    """
    server = grpc.aio.server(options=channel_options())
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"{name}: cannot listen on {listen} (address in use?)")
    await server.start()
    for service in ["", *names]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving on %s", name, listen)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    deadline = loop.time() + grace_seconds
    await health_servicer.enter_graceful_shutdown()
    if in_flight is None:
        log.info("%s draining: not serving, still answering for %.1fs", name, min(DRAIN_SECONDS, grace_seconds))
        await asyncio.sleep(min(DRAIN_SECONDS, grace_seconds))
    else:
        log.info("%s draining: %d streams in flight, waiting up to %.0fs", name, in_flight(), grace_seconds)
        while in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if in_flight():
            log.warning("%s: %d streams still in flight after %.0fs; cancelling them", name, in_flight(), grace_seconds)
    await server.stop(max(0.1, deadline - loop.time()))
    log.info("%s stopped", name)
