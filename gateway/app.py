"""The OpenAI-compatible HTTP API (FastAPI), in front of the orchestrator's gRPC Generator.

The gateway is a process of its own and holds no state: each request becomes one Generate
stream through specd.client.AsyncClient, which resumes a stream at the next orchestrator
replica if one dies, so an HTTP stream survives an orchestrator restart; sessions stay in
Redis behind the orchestrators. The OpenAI API is stateless (every request carries the
whole conversation), so a request's session is deleted when it ends unless the caller keeps
it (`specd.session_id` / `specd.keep_session`) to continue it by id.

| route                     | answers                                                    |
|---------------------------|------------------------------------------------------------|
| POST /v1/chat/completions | chat.completion, or chat.completion.chunk server-sent events |
| POST /v1/completions      | text_completion, or its chunks                             |
| GET  /v1/models           | the served model, and one id per strategy (`name:cascade`) |
| GET  /health              | 200 when an orchestrator answers SERVING, else 503         |
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Histogram

from gateway import api
from gateway.api import Answer, ApiError, Parsed
from services.auth import ApiKeys, Unauthenticated, bearer_key
from services.config import GatewayConfig
from services.pb import specd_pb2 as pb
from specd.client import AsyncClient

log = logging.getLogger("gateway")

HTTP_REQUESTS = Counter("specd:http_requests", "HTTP requests answered, by route and status code", ["route", "status"])
HTTP_SECONDS = Histogram(
    "specd:http_request_duration_seconds",
    "Time to the response's headers (a stream's first token comes later), by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

# gRPC status -> HTTP status of the answer
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def from_grpc(err: grpc.RpcError) -> ApiError:
    code = err.code()
    return ApiError(HTTP_STATUS.get(code, 500), f"{err.details()} ({code.name})", None, code.name.lower())


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def create_app(config: GatewayConfig, client: AsyncClient | None = None, keys: ApiKeys | None = None) -> FastAPI:
    """`keys`: the API keys the gateway checks itself (an open gateway when empty); either
    way a caller's key is passed on to the orchestrator, which checks it again and keeps
    each session to the key that created it."""
    client = client or AsyncClient(config.orchestrator, timeout=config.rpc_timeout_seconds)
    keys = keys or ApiKeys(())
    started = int(time.time())
    cleanups: set[asyncio.Task] = set()  # session deletions still running

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if cleanups:
            await asyncio.wait(cleanups, timeout=5)
        await client.close()

    app = FastAPI(title="specd", summary="OpenAI-compatible API of specd", lifespan=lifespan)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = route.path if route is not None else "other"
        HTTP_REQUESTS.labels(path, str(response.status_code)).inc()
        HTTP_SECONDS.labels(path).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def authenticate(request: Request) -> str | None:
        """The caller's key, checked when the gateway has keys; raises ApiError 401."""
        authorization = request.headers.get("authorization")
        try:
            keys.identify(authorization)
        except Unauthenticated as err:
            raise ApiError(401, str(err), None, "invalid_api_key") from None
        return bearer_key(authorization)

    def forget(parsed: Parsed, session_id: str, key: str | None) -> None:
        """Deletes a finished request's session unless the caller keeps it, in the background."""
        if parsed.keep_session or not session_id:
            return

        async def delete() -> None:
            try:
                await client.delete_session(session_id, api_key=key)
            except grpc.RpcError as err:  # it expires from Redis anyway (SPECD_SESSION_TTL)
                log.warning("could not delete session %s: %s", session_id, err.details())

        task = asyncio.create_task(delete())
        cleanups.add(task)
        task.add_done_callback(cleanups.discard)

    async def body_of(request: Request) -> object:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None

    async def complete(request: Request, kind: str):
        key = authenticate(request)
        parsed = api.parse(await body_of(request), kind, config.model_name)
        parsed.request.request_id = uuid.uuid4().hex
        answer = Answer(parsed, parsed.request.request_id)
        replies = aiter(client.stream(parsed.request, api_key=key))
        try:
            first = await anext(replies)  # TurnStarted: the request was accepted
        except grpc.RpcError as err:
            raise from_grpc(err) from None
        except StopAsyncIteration:
            raise ApiError(502, "the orchestrator ended the stream without an answer") from None
        session_id = first.started.session_id
        if parsed.stream:
            return StreamingResponse(stream(parsed, answer, replies, session_id, key), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        chunks: list[str] = []
        stats = None
        try:
            async for reply in replies:
                if reply.HasField("delta"):
                    chunks.append(reply.delta.text)
                elif reply.HasField("stats"):
                    stats = reply.stats
        except grpc.RpcError as err:
            raise from_grpc(err) from None
        finally:
            forget(parsed, session_id, key)
        if stats is None:
            raise ApiError(502, "the orchestrator ended the stream without statistics")
        return answer.complete("".join(chunks), stats)

    async def stream(
        parsed: Parsed, answer: Answer, replies: AsyncIterator[pb.GenerateResponse], session_id: str, key: str | None
    ):
        try:
            if parsed.kind == "chat":
                yield sse(answer.chunk(first=True))
            async for reply in replies:
                if reply.HasField("delta") and reply.delta.text:
                    yield sse(answer.chunk(reply.delta.text))
                elif reply.HasField("stats"):
                    yield sse(answer.last(reply.stats))
                    if parsed.include_usage:
                        yield sse(answer.usage_chunk(reply.stats))
        except grpc.RpcError as err:
            yield sse(from_grpc(err).body())
        finally:
            forget(parsed, session_id, key)
        yield sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authenticate(request)
        ids = [config.model_name, *(f"{config.model_name}:{s}" for s in api.STRATEGY_NAMES)]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": started, "owned_by": "specd"} for i in ids]}

    @app.get("/health")
    async def health() -> JSONResponse:
        states = {}
        for address in (a.strip() for a in config.orchestrator.split(",")):
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                states[address] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                states[address] = err.code().name
        ok = "SERVING" in states.values()
        return JSONResponse({"status": "ok" if ok else "unavailable", "orchestrators": states}, status_code=200 if ok else 503)

    return app
