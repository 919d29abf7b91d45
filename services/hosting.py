"""What the drafter and verifier services share: building the runtime a config asks for, the
one decorator that maps a core's errors to gRPC status codes, Info and Release, and `main`.

A servicer method decorated with `rpc` only converts the request into the core's typed
arguments and the core's dataclass back into a reply; the decorator does the rest once:

| the core raises          | the caller gets                                         |
|--------------------------|---------------------------------------------------------|
| ContextMiss              | a reply with context_miss set (it resends the context)  |
| BadRequest               | INVALID_ARGUMENT, with the message                      |
| Unsupported              | FAILED_PRECONDITION, with the message                   |
| Busy                     | RESOURCE_EXHAUSTED, with a retry-after-ms hint          |
| anything else            | INTERNAL, logged with its traceback                     |

and times the call (`specd:rpc_duration_seconds` by method and status code, services/metrics.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import grpc

from services.auth import RequireToken, internal_token
from services.config import ModelServiceConfig
from services.flags import MODEL_SERVICE, environment
from services.errors import BadRequest, Busy, ContextMiss, Unsupported
from services.metrics import RPC_SECONDS, register_model_service, serve_metrics
from services.pb import specd_pb2 as pb
from services.runtime import ModelInfo
from services.server import RETRY_AFTER_KEY, rss_bytes
from services.sessions import SessionContexts
from services.wire import info_to_pb
from services.worker import Worker

log = logging.getLogger(__name__)
Reply = TypeVar("Reply")


class Core(Protocol):
    contexts: SessionContexts  # the committed context of each session it serves

    @property
    def queued(self) -> int: ...  # calls waiting for the model or running

    async def info(self) -> ModelInfo: ...

    async def release(self, session_id: str) -> bool: ...


def rpc(miss_reply: Callable[..., Reply]):
    """Decorates `async def Method(self, request) -> reply` into a gRPC handler (see above);
    miss_reply(context_miss=True) is the reply of a context miss."""

    def wrap(method: Callable[[object, object], Awaitable[Reply]]):
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext) -> Reply:
            start = time.perf_counter()
            code = grpc.StatusCode.OK  # a context miss is an answer too
            try:
                return await method(self, request)
            except ContextMiss:
                return miss_reply(context_miss=True)
            except BadRequest as err:
                code = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(code, str(err))
            except Unsupported as err:
                code = grpc.StatusCode.FAILED_PRECONDITION
                await context.abort(code, str(err))
            except Busy as err:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                hint = ((RETRY_AFTER_KEY, str(max(1, round(1000 * err.retry_after_seconds)))),)
                await context.abort(code, str(err), trailing_metadata=hint)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:  # a bug: say so, with the traceback in the log
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method.__name__)
                await context.abort(code, f"{method.__name__} failed: {type(err).__name__}: {err}")
            finally:
                RPC_SECONDS.labels(method.__name__, code.name).observe(time.perf_counter() - start)

        return handler

    return wrap


class ModelServicer:
    """What the Drafter and Verifier servicers share: their core, Info and Release."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.started = time.monotonic()

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return info_to_pb(await self.core.info())

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=await self.core.release(request.session_id))

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.ServiceStatus:
        info = await self.core.info()
        counts = self.core.contexts.counts
        return pb.ServiceStatus(
            model=info.model, runtime=info.runtime, pid=os.getpid(), uptime_seconds=time.monotonic() - self.started,
            rss_bytes=rss_bytes(), sessions=len(self.core.contexts), calls=counts.calls, context_hits=counts.hits,
            context_misses=counts.misses, full_contexts=counts.full,
        )  # fmt: skip


def run_model_service(
    *,
    name: str,
    default_listen: str,
    build_core: Callable[[ModelServiceConfig, Worker], Core],
    make_servicer: Callable[[Core], object],
) -> int:
    """The `main` of a model service: read the config, build the core (its model loaded on
    the worker thread that will serve it), serve until stopped."""
    from services.config import ConfigError
    from services.models import ModelNotFound
    from services.server import add_servicer, serve, setup_logging

    env = environment(
        f"python -m {name}_svc", f"The {name} service of specd (gRPC specd.v1.{name.capitalize()}).",
        MODEL_SERVICE, sys.argv[1:], os.environ,
    )  # fmt: skip
    setup_logging(env.get("SPECD_LOG_LEVEL", "INFO"))
    try:
        config = ModelServiceConfig.from_env(env, default_listen)
        token = internal_token(env)
        worker = Worker(name)
        core = worker.call(build_core, config, worker)
    except (ConfigError, ModelNotFound, OSError, ValueError) as err:
        log.error("%s: %s", name, err)
        return 2
    servicer = make_servicer(core)
    register_model_service(name, core.contexts, rss_bytes, lambda: core.queued)
    if config.metrics_listen:
        try:
            serve_metrics(config.metrics_listen, name)
        except OSError as err:
            log.error("%s: cannot serve metrics on %s: %s", name, config.metrics_listen, err)
            return 2
    def register(server: grpc.aio.Server) -> list[str]:
        return [add_servicer(server, servicer, name.capitalize())]

    interceptors = [RequireToken(token, [pb.DESCRIPTOR.services_by_name[name.capitalize()].full_name])] if token else []
    if not token:
        log.warning("%s: no internal token (SPECD_INTERNAL_TOKEN_FILE): any caller that reaches %s is served", name,
                    config.listen)  # fmt: skip
    asyncio.run(serve(name=name, listen=config.listen, register=register, grace_seconds=config.grace_seconds,
                      interceptors=interceptors))  # fmt: skip
    return 0
