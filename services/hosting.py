"""What the drafter and verifier services share: a model host driven from one worker
thread, and the request checks every model call makes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from services.config import ModelServiceConfig
from services.models import resolve
from services.pb import specd_pb2 as pb
from services.runtime import ModelHost, load_host
from services.wire import BadRequest, info_to_pb

log = logging.getLogger(__name__)
T = TypeVar("T")


class HostRunner:
    """Runs model work for a servicer on one dedicated thread.

    One thread serialises access to the model and its caches (a forward pass already uses
    every core through torch's intra-op threads) and keeps the event loop free for health
    checks and new calls.
    """

    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def info(self) -> pb.ModelInfo:
        return info_to_pb(self.host.info)

    async def release(self, session_id: str) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=await self.run(self.host.release, session_id))


class ModelServicer:
    """What the Drafter and Verifier servicers share: their state, Info and Release."""

    def __init__(self, runner: HostRunner, config: ModelServiceConfig) -> None:
        self.runner = runner
        self.config = config

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return await self.runner.info()

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        return await self.runner.release(request.session_id)


async def abort_bad_request(context: grpc.aio.ServicerContext, err: BadRequest) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


def load_configured_host(config: ModelServiceConfig) -> ModelHost:
    path = resolve(config.model, config.home)
    return load_host(
        path,
        dtype=config.dtype,
        device=config.device,
        max_sessions=config.max_sessions,
        threads=config.threads,
        onednn=config.onednn,
    )


def run_model_service(
    *,
    name: str,
    default_listen: str,
    make_servicer: Callable[[HostRunner, ModelServiceConfig], object],
    add_to_server: Callable[[object, grpc.aio.Server], None],
    load: Callable[[ModelServiceConfig], object] = load_configured_host,
) -> int:
    """The `main` of a model service: read the config, load the model, serve until stopped.

    `load` builds the host from the config (a drafter may serve a statistical model instead).
    """
    import os

    from services.config import ConfigError
    from services.models import ModelNotFound
    from services.server import serve, setup_logging

    setup_logging(os.environ.get("SPECD_LOG_LEVEL", "INFO"))
    try:
        config = ModelServiceConfig.from_env(os.environ, default_listen)
        host = load(config)
    except (ConfigError, ModelNotFound, OSError) as err:
        log.error("%s: %s", name, err)
        return 2
    servicer = make_servicer(HostRunner(host), config)
    service_name = pb.DESCRIPTOR.services_by_name[name.capitalize()].full_name

    def register(server: grpc.aio.Server) -> list[str]:
        add_to_server(servicer, server)
        return [service_name]

    asyncio.run(serve(name=name, listen=config.listen, register=register, grace_seconds=config.grace_seconds))
    return 0
