"""Generator gRPC servicer and process entry point (`python -m orchestrator`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis
import redis.exceptions

from orchestrator.backends import (
    RemoteDrafter,
    RemoteVerifier,
    ServiceError,
    ServiceUnavailable,
    Translated,
)
from orchestrator.generate import (
    Engine,
    GenerationRequest,
    InvalidInput,
    Limits,
    NotServable,
    SessionNotFound,
    Stats,
    TextChunk,
)
from orchestrator.store import ChatMessage, SessionStore
from orchestrator.strategies import Backends, k_matrix_problems
from services.config import ConfigError, OrchestratorConfig
from services.errors import BadRequest, Unsupported
from services.maxgram import MaxGramDrafter
from services.models import ModelNotFound, resolve
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.server import channel_options, serve, setup_logging
from services.tree import TreeShape

log = logging.getLogger("orchestrator")
DEFAULT_LISTEN = "127.0.0.1:50050"


def request_from_pb(msg: pb.GenerateRequest) -> GenerationRequest:
    which = msg.WhichOneof("input")
    return GenerationRequest(
        prompt=msg.prompt if which == "prompt" else None,
        messages=tuple(ChatMessage(m.role, m.content) for m in msg.chat.messages) if which == "chat" else None,
        session_id=msg.session_id,
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else None,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        strategy=msg.strategy,
        k=msg.options.k,
        k_matrix=tuple(tuple(row.k) for row in msg.options.k_matrix),
        tree=TreeShape(tuple(msg.options.tree.branching), msg.options.tree.budget)
        if msg.options.HasField("tree")
        else None,
    )


def stats_to_pb(s: Stats) -> pb.GenerationStats:
    return pb.GenerationStats(
        session_id=s.session_id,
        strategy=s.strategy,
        finish_reason=s.finish_reason,
        prompt_tokens=s.prompt_tokens,
        new_tokens=s.new_tokens,
        target_forwards=s.target_forwards,
        drafted=s.drafted,
        accepted=s.accepted,
        mean_accepted_length=s.mean_accepted_length,
        acceptance_rate=s.acceptance_rate,
        acceptance_by_position=s.acceptance_by_position,
        wall_seconds=s.wall_seconds,
        tokens_per_second=s.tokens_per_second,
        draft_seconds=s.draft_seconds,
        verify_seconds=s.verify_seconds,
        network_seconds=s.network_seconds,
        redis_seconds=s.redis_seconds,
        bytes_sent=s.bytes_sent,
        bytes_received=s.bytes_received,
    )


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, engine: Engine, redis_url: str) -> None:
        self.engine = engine
        self.redis_url = redis_url

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for event in self.engine.generate(request_from_pb(request)):
                if isinstance(event, TextChunk):
                    yield pb.GenerateResponse(delta=pb.TextDelta(text=event.text, token_ids=event.token_ids))
                else:
                    yield pb.GenerateResponse(stats=stats_to_pb(event))
        except Exception as err:  # noqa: BLE001 - every failure becomes a status; see _status
            code, message = self._status(err)
            await context.abort(code, message)

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        try:
            return pb.DeleteSessionResponse(deleted=await self.engine.delete_session(request.session_id))
        except Exception as err:  # noqa: BLE001
            code, message = self._status(err)
            await context.abort(code, message)

    def _status(self, err: Exception) -> tuple[grpc.StatusCode, str]:
        if isinstance(err, InvalidInput):
            return grpc.StatusCode.INVALID_ARGUMENT, str(err)
        if isinstance(err, SessionNotFound):
            return grpc.StatusCode.NOT_FOUND, err.args[0]
        if isinstance(err, (NotServable, Unsupported)):  # Unsupported: the in-process max-gram level
            return grpc.StatusCode.FAILED_PRECONDITION, str(err)
        if isinstance(err, BadRequest):
            return grpc.StatusCode.INVALID_ARGUMENT, str(err)
        if isinstance(err, (ServiceUnavailable, ServiceError)):
            return err.code, str(err)
        if isinstance(err, redis.exceptions.ConnectionError):
            return grpc.StatusCode.UNAVAILABLE, f"redis at {self.redis_url} is unavailable: {err}"
        log.exception("generation failed")
        return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


def main() -> int:
    setup_logging(os.environ.get("SPECD_LOG_LEVEL", "INFO"))
    try:
        config = OrchestratorConfig.from_env(os.environ, DEFAULT_LISTEN)
        tokenizer_path = resolve(config.tokenizer, config.home)
    except (ConfigError, ModelNotFound) as err:
        log.error("orchestrator: %s", err)
        return 2
    levels = len(config.cascade) or (2 if config.drafter else 1)  # Backends.cascade_levels()
    problems = k_matrix_problems(config.k_matrix, levels) if config.k_matrix else []
    if problems:
        log.error("orchestrator: SPECD_K_MATRIX does not fit a cascade of %d drafters: %s", levels, "; ".join(problems))
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    asyncio.run(_serve(config, tokenizer))
    return 0


async def _serve(config: OrchestratorConfig, tokenizer) -> None:
    verifier_channel = grpc.aio.insecure_channel(config.verifier, options=channel_options())
    verifier = RemoteVerifier(config.verifier, verifier_channel, config.rpc_timeout_seconds)
    drafters: dict[str, RemoteDrafter] = {}  # address -> client: one channel per drafter service

    def remote_drafter(address: str) -> RemoteDrafter:
        if address not in drafters:
            channel = grpc.aio.insecure_channel(address, options=channel_options())
            drafters[address] = RemoteDrafter(address, channel, config.rpc_timeout_seconds)
        return drafters[address]

    drafter = remote_drafter(config.drafter) if config.drafter else None
    maxgram = MaxGramDrafter()
    cascade = tuple(_cascade_level(level, maxgram, remote_drafter) for level in config.cascade)
    backends = Backends(verifier=verifier, drafter=drafter, cascade=cascade, maxgram=maxgram)
    redis_client = aioredis.from_url(config.redis_url, socket_timeout=config.rpc_timeout_seconds)
    engine = Engine(
        tokenizer=tokenizer,
        store=SessionStore(redis_client, config.session_ttl_seconds),
        backends=backends,
        limits=Limits(
            default_strategy=config.default_strategy,
            default_k=config.default_k,
            default_max_new_tokens=config.default_max_new_tokens,
            max_new_tokens_limit=config.max_new_tokens_limit,
            default_k_matrix=config.k_matrix,
            default_tree=config.tree,
        ),
    )
    servicer = GeneratorServicer(engine, config.redis_url)
    log.info(
        "verifier %s, drafter %s, cascade %s, redis %s", config.verifier, config.drafter or "(none)",
        " <- ".join(config.cascade) or "(drafter <- maxgram)", config.redis_url,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_GeneratorServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["Generator"].full_name]

    await serve(name="orchestrator", listen=config.listen, register=register, grace_seconds=config.grace_seconds)
    await redis_client.aclose()


def _cascade_level(level: str, maxgram: MaxGramDrafter, remote_drafter) -> object:
    """One SPECD_CASCADE entry: `maxgram`, HOST:PORT, or tli:HOST:PORT / slem:HOST:PORT for a
    drafter of another vocabulary (it proposes through that translation, never reviews)."""
    if level == "maxgram":
        return maxgram
    mode, _, address = level.partition(":")
    if mode in ("tli", "slem") and address:
        return Translated(remote_drafter(address), mode)
    return remote_drafter(level)


if __name__ == "__main__":
    sys.exit(main())
