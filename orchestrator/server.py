"""Generator gRPC servicer and process entry point (`python -m orchestrator`)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from orchestrator.backends import ServiceError, ServiceUnavailable, Translated
from orchestrator.generate import (
    Engine,
    GenerationRequest,
    InvalidInput,
    Limits,
    NotServable,
    SessionNotFound,
    Stats,
    TextChunk,
    TurnStarted,
)
from orchestrator import metrics
from orchestrator.languages import LanguagePools
from orchestrator.metrics import TurnTimer
from orchestrator.pool import DrafterPool, drafter_pool, verifier_pool
from orchestrator.store import ChatMessage, SessionStore, TurnInProgress, TurnLost
from orchestrator.strategies import Backends, k_matrix_problems
from services.auth import OPEN_WARNING, ApiKeys, Unauthenticated, internal_token
from services.config import ConfigError, OrchestratorConfig
from services.errors import BadRequest, Unsupported
from services.flags import ORCHESTRATOR, environment
from services.maxgram import MaxGramDrafter
from services.metrics import serve_metrics
from services.models import ModelNotFound, resolve
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.server import FINAL_KEY, add_servicer, serve, setup_logging
from services.tree import TreeShape

log = logging.getLogger("orchestrator")
# Every status the orchestrator sends is marked, so a client can tell it from a stream the
# transport cut (which it resumes: specd/client.py).
FINAL = ((FINAL_KEY, "1"),)
DEFAULT_LISTEN = "127.0.0.1:50050"


def request_from_pb(msg: pb.GenerateRequest, client: str = "") -> GenerationRequest:
    which = msg.WhichOneof("input")
    return GenerationRequest(
        client=client,
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
        head_only=msg.options.head_only,
        request_id=msg.request_id,
        resume_from=msg.resume_from,
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
        round_trips=s.round_trips,
        redis_seconds=s.redis_seconds,
        bytes_sent=s.bytes_sent,
        bytes_received=s.bytes_received,
        failovers=s.failovers,
        fallback_rounds=s.fallback_rounds,
        replicas=s.replicas,
        language=s.language,
        drafter_pool=s.drafter_pool,
        adaptive=s.adaptive,
        ar_rounds=s.ar_rounds,
        mean_draft_length=s.mean_draft_length,
        speculative_drafts=s.speculative_drafts,
        speculative_hits=s.speculative_hits,
        speculative_ready=s.speculative_ready,
        speculative_verified=s.speculative_verified,
        chain_rounds=s.chain_rounds,
        speculative_plain=s.speculative_plain,
        speculative_continued=s.speculative_continued,
        overlapped_round_trips=s.overlapped_round_trips,
    )


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, engine: Engine, redis_url: str, keys: ApiKeys | None = None) -> None:
        self.engine = engine
        self.redis_url = redis_url
        self.keys = keys or ApiKeys(())

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's API key id; raises Unauthenticated."""
        metadata = dict(context.invocation_metadata() or ())
        return self.keys.identify(metadata.get("authorization"))

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        timer = TurnTimer()
        try:
            async for event in self.engine.generate(request_from_pb(request, self._client(context))):
                if isinstance(event, TurnStarted):
                    yield pb.GenerateResponse(started=pb.TurnStarted(
                        session_id=event.session_id, request_id=event.request_id, resumed_from=event.resumed_from
                    ))  # fmt: skip
                elif isinstance(event, TextChunk):
                    yield pb.GenerateResponse(delta=pb.TextDelta(text=event.text, token_ids=event.token_ids))
                    timer.tokens_sent(len(event.token_ids))
                else:
                    timer.finished(event)
                    yield pb.GenerateResponse(stats=stats_to_pb(event))
        except asyncio.CancelledError:
            timer.failed(grpc.StatusCode.CANCELLED.name)  # the caller went away
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes a status; see _status
            code, message = self._status(err)
            timer.failed(code.name)
            await context.abort(code, message, trailing_metadata=FINAL)

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        try:
            deleted = await self.engine.delete_session(request.session_id, self._client(context))
            return pb.DeleteSessionResponse(deleted=deleted)
        except Exception as err:  # noqa: BLE001
            code, message = self._status(err)
            await context.abort(code, message, trailing_metadata=FINAL)

    def _status(self, err: Exception) -> tuple[grpc.StatusCode, str]:
        if isinstance(err, Unauthenticated):
            return grpc.StatusCode.UNAUTHENTICATED, str(err)
        if isinstance(err, InvalidInput):
            return grpc.StatusCode.INVALID_ARGUMENT, str(err)
        if isinstance(err, SessionNotFound):
            return grpc.StatusCode.NOT_FOUND, err.args[0]
        if isinstance(err, (NotServable, Unsupported)):  # Unsupported: the in-process max-gram level
            return grpc.StatusCode.FAILED_PRECONDITION, str(err)
        if isinstance(err, BadRequest):
            return grpc.StatusCode.INVALID_ARGUMENT, str(err)
        if isinstance(err, (ServiceUnavailable, ServiceError)):
            log.warning("turn failed: %s", err)  # with the addresses, for the operator
            return err.code, without_addresses(str(err))
        if isinstance(err, TurnLost):
            return grpc.StatusCode.ABORTED, f"{err}: the turn continues in the call that resumed it"
        if isinstance(err, TurnInProgress):
            return grpc.StatusCode.ABORTED, str(err)
        if isinstance(err, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            return grpc.StatusCode.UNAVAILABLE, f"redis at {redacted(self.redis_url)} is unavailable: {err}"
        log.exception("generation failed")
        return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


def main() -> int:
    env = environment("python -m orchestrator", "The orchestrator of specd (gRPC specd.v1.Generator).", ORCHESTRATOR,
                      sys.argv[1:], os.environ)  # fmt: skip
    setup_logging(env.get("SPECD_LOG_LEVEL", "INFO"))
    try:
        config = OrchestratorConfig.from_env(env, DEFAULT_LISTEN)
        keys = ApiKeys.from_env(env)
        token = internal_token(env)
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
    try:
        asyncio.run(_serve(config, tokenizer, keys, token))
    except OSError as err:  # a port to listen on is taken
        log.error("orchestrator: %s", err)
        return 2
    return 0


async def _serve(config: OrchestratorConfig, tokenizer, keys: ApiKeys, token: str = "") -> None:
    verifier_targets, drafter_targets, cascade_levels = config.pools()
    options = dict(health_interval=config.health_interval_seconds, load_factor=config.load_factor, token=token)
    verifier = verifier_pool(
        verifier_targets, config.rpc_timeout_seconds, wait_seconds=config.verifier_wait_seconds, **options
    )
    drafters: dict[tuple[str, ...], DrafterPool] = {}  # one pool per set of targets, shared by levels

    def drafters_at(targets: tuple[str, ...]) -> DrafterPool:
        if targets not in drafters:
            drafters[targets] = drafter_pool(targets, config.rpc_timeout_seconds, **options)
        return drafters[targets]

    def level(mode: str, targets: tuple[str, ...]):
        if mode == "maxgram":
            return maxgram
        return drafters_at(targets) if mode == "native" else Translated(drafters_at(targets), mode)

    def by_language(targets: dict[str, tuple[str, ...]]):
        if not targets:
            return None
        default = drafters_at(targets[""])
        languages = {label: drafters_at(t) for label, t in targets.items() if label}
        return LanguagePools(default, languages) if languages else default

    drafter = by_language(drafter_targets)
    head = by_language(config.head_pools())
    maxgram = MaxGramDrafter()
    cascade = tuple(level(mode, targets) for mode, targets in cascade_levels)
    pools = [verifier.pool, *(d.pool for d in drafters.values())]
    for pool in pools:
        await pool.start()
    backends = Backends(verifier=verifier, drafter=drafter, cascade=cascade, maxgram=maxgram, head=head)
    redis_client = redis_from_url(config.redis_url, config.redis_timeout_seconds, config.redis_password)
    engine = Engine(
        tokenizer=tokenizer,
        store=SessionStore(redis_client, config.session_ttl_seconds, config.turn_lease_seconds),
        backends=backends,
        limits=Limits(
            default_strategy=config.default_strategy,
            default_k=config.default_k,
            default_max_new_tokens=config.default_max_new_tokens,
            max_new_tokens_limit=config.max_new_tokens_limit,
            default_k_matrix=config.k_matrix,
            default_tree=config.tree,
            own_cores=config.own_cores,
            verify_ahead=config.verify_ahead,
        ),
    )
    engine.on_round = metrics.observe_round
    metrics.RUNNING.set_function(lambda: engine.in_flight)
    if config.metrics_listen:
        serve_metrics(config.metrics_listen, "orchestrator")
    servicer = GeneratorServicer(engine, config.redis_url, keys)
    if keys.open:
        log.warning(OPEN_WARNING, config.listen)
    else:
        log.info("%d API key(s): every Generate and DeleteSession call needs one", len(keys))
    log.info(
        "verifier %s, drafter %s, cascade %s, redis %s", config.verifier, config.drafter or "(none)",
        " <- ".join(config.cascade) or "(drafter <- maxgram)", redacted(config.redis_url),
    )

    def register(server: grpc.aio.Server) -> list[str]:
        return [add_servicer(server, servicer, "Generator")]

    async def readiness() -> str | None:
        """Why a turn could not be served now (None: it could)."""
        if not any(r.healthy for r in verifier.pool.replicas.values()):
            return f"no verifier replica of {verifier.pool.name} is healthy"
        try:
            await redis_client.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            return f"redis at {redacted(config.redis_url)} does not answer: {err}"
        return None

    await serve(
        name="orchestrator", listen=config.listen, register=register, grace_seconds=config.grace_seconds,
        in_flight=lambda: engine.in_flight, readiness=readiness, readiness_interval=config.health_interval_seconds,
    )  # fmt: skip
    for pool in pools:
        await pool.close()
    await redis_client.aclose()


# host:port of an internal service, as errors name them: IPv4 or IPv6 with any port, a DNS
# name (dns:/// or ipv4: prefixed or not) with a port of two digits or more.
ADDRESS = re.compile(
    r"(?:dns:///|ipv4:|ipv6:)?(?:\d{1,3}(?:\.\d{1,3}){3}:\d+|\[[0-9A-Fa-f:]+\]:\d+|[A-Za-z][\w\-]*(?:\.[\w\-]+)*:\d{2,5})\b"
)


def without_addresses(message: str) -> str:
    """An internal error as a public client sees it: which service, never where it runs."""
    return ADDRESS.sub("(internal)", re.sub(r" at " + ADDRESS.pattern, "", message))


def redacted(url: str) -> str:
    """A Redis URL without its password, to show in logs and errors."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def redis_from_url(url: str, timeout_seconds: float, password: str = "") -> aioredis.Redis:
    """A client that retries a call on a stale or dropped connection (a Redis restart) a few
    times with backoff, and gives up after `timeout_seconds` on a Redis that does not answer.
    `password` applies when the URL carries none."""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)
    extra = {"password": password} if password else {}
    return aioredis.from_url(
        url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds, retry=retry,
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError], health_check_interval=30,
        **extra,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
