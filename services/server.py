"""gRPC plumbing shared by every service: logging, server bootstrap, health, reflection,
graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a full-context resend of a long prompt must fit
# How long a stopping model service keeps answering after it reports NOT_SERVING: callers
# check health every second (SPECD_HEALTH_INTERVAL) and move their sessions on meanwhile.
DRAIN_SECONDS = 2.0
# Trailing metadata the orchestrator puts on every status it sends: a client resumes a turn
# only after a status without it (the transport cut the stream: specd/client.py).
FINAL_KEY = "specd-final"
# Trailing metadata of a RESOURCE_EXHAUSTED status: milliseconds after which to try again.
RETRY_AFTER_KEY = "retry-after-ms"
# The health entry a liveness probe asks: SERVING from start to stop, whatever the backends do.
LIVENESS = "liveness"


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


class Undecodable:
    """A request body that is not the message its method takes (see add_servicer)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def add_servicer(server: grpc.aio.Server, servicer: object, service: str) -> str:
    """Serves `servicer`'s methods as specd.v1.<service> (what the generated add_*_to_server
    does), except that a body which does not decode as the method's message is answered
    INVALID_ARGUMENT, naming the message, instead of gRPC's UNKNOWN. Returns the full name."""
    from google.protobuf.message import DecodeError
    from google.protobuf.message_factory import GetMessageClass

    from services.pb import specd_pb2

    descriptor = specd_pb2.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_class, reply_class = GetMessageClass(method.input_type), GetMessageClass(method.output_type)

        def parse(data: bytes, parse_message=request_class.FromString) -> object:
            try:
                return parse_message(data)
            except DecodeError as err:
                return Undecodable(err)

        impl = getattr(servicer, method.name)
        refusal = f"the request is not a valid {method.input_type.full_name} message"
        if method.server_streaming:

            async def streaming(request, context, impl=impl, refusal=refusal):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{refusal}: {request.error}")
                async for reply in impl(request, context):
                    yield reply

            handler = grpc.unary_stream_rpc_method_handler(streaming, parse, reply_class.SerializeToString)
        else:

            async def unary(request, context, impl=impl, refusal=refusal):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{refusal}: {request.error}")
                return await impl(request, context)

            handler = grpc.unary_unary_rpc_method_handler(unary, parse, reply_class.SerializeToString)
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    return descriptor.full_name


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Server reflection under both its names: v1alpha (grpcio-reflection's) and v1 (what
    grpcurl and current clients ask first). The two protocols' messages are the same fields
    under another package name, so one servicer answers both."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),))


async def serve(
    *,
    name: str,
    listen: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    grace_seconds: float,
    in_flight: Callable[[], int] | None = None,
    readiness: Callable[[], Awaitable[str | None]] | None = None,
    readiness_interval: float = 1.0,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
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

    `readiness` (the orchestrator's) says every `readiness_interval` seconds why the server
    cannot serve (None: it can); while it cannot, health reports NOT_SERVING, so probes and
    load balancers see a server whose backends are gone. The `liveness` entry stays SERVING
    until the stop: a probe of it restarts a process that is stuck, not one that waits for a
    backend.
    """
    server = grpc.aio.server(options=channel_options(), interceptors=list(interceptors) or None)
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"{name}: cannot listen on {listen} (address in use?)")
    await server.start()
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)

    async def set_health(why: str | None) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if why is None else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ["", *names]:
            await health_servicer.set(service, status)

    watcher = None
    if readiness is None:
        await set_health(None)
    else:
        watcher = asyncio.create_task(_watch_readiness(name, readiness, readiness_interval, set_health))
    log.info("%s serving on %s", name, listen)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    deadline = loop.time() + grace_seconds
    if watcher is not None:
        watcher.cancel()
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


async def _watch_readiness(
    name: str, readiness: Callable[[], Awaitable[str | None]], interval: float, set_health: Callable
) -> None:
    serving: bool | None = None
    while True:
        try:
            why = await readiness()
        except Exception as err:  # noqa: BLE001 - a failing check means not ready, never a dead watcher
            why = f"{type(err).__name__}: {err}"
        if (why is None) != serving:
            await set_health(why)
            if why is None:
                log.info("%s is ready%s", name, " again" if serving is False else "")
            else:
                log.warning("%s reports NOT_SERVING: %s", name, why)
            serving = why is None
        await asyncio.sleep(interval)
