"""gRPC plumbing shared by every service: logging, server bootstrap, health, reflection,
graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a full-context resend of a long prompt must fit


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


async def serve(
    *,
    name: str,
    listen: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    grace_seconds: float,
) -> None:
    """Runs a gRPC server until SIGTERM or SIGINT, then stops gracefully.

    `register` adds the servicers and returns their full service names; the standard
    health service reports them SERVING, and reflection lists them for grpcurl.
    On a stop signal health turns NOT_SERVING first, so load balancers drain the
    process, then in-flight calls get `grace_seconds` to finish.
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
    log.info("%s stopping (grace %.0fs)", name, grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_seconds)
    log.info("%s stopped", name)
