"""The Python client of the Generator service: one turn, resumed when its stream breaks.

Every turn carries a request id (the caller's, or one chosen here). The stream's first
message names the session; if the stream then breaks because the orchestrator died, restarted
or is draining (UNAVAILABLE, or a stream cut off without a status), the client calls again,
at any orchestrator replica, with the same session id and request id and `resume_from` set to
the tokens it already holds: the turn continues where it was, and no token is repeated or lost.
Any gRPC client does the same with those three fields.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.server import FINAL_KEY, channel_options

RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)


@dataclass
class Result:
    token_ids: list[int]
    text: str
    stats: pb.GenerationStats
    session_id: str = ""
    request_id: str = ""
    resumes: int = 0  # times the stream broke and the turn was resumed
    chunks: list[str] = field(default_factory=list)  # the text deltas as they arrived


def answered_by_orchestrator(err: grpc.RpcError) -> bool:
    """The orchestrator itself failed the turn (it marks every status it sends); a status
    without the mark comes from the transport: the orchestrator is gone or going."""
    metadata = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return any(key == FINAL_KEY for key, _ in metadata or ())


class _Turn:
    """One turn across the calls it takes: what the caller holds so far, and the next call
    (the same session id and request id, `resume_from` the tokens already held)."""

    def __init__(self, request: pb.GenerateRequest, address: str, resumes: int) -> None:
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError("no orchestrator address given")
        self.base = pb.GenerateRequest()
        self.base.CopyFrom(request)
        if not self.base.request_id:
            self.base.request_id = uuid.uuid4().hex
        self.result = Result([], "", pb.GenerationStats(), self.base.session_id, self.base.request_id)
        self.max_resumes = resumes
        self.stats: pb.GenerationStats | None = None

    def next_call(self) -> tuple[str, pb.GenerateRequest]:
        """The orchestrator to call (replicas in turn) and the request to send it."""
        call = pb.GenerateRequest()
        call.CopyFrom(self.base)
        call.session_id = self.result.session_id
        call.resume_from = self.base.resume_from + len(self.result.token_ids) if self.result.session_id else 0
        return self.addresses[self.result.resumes % len(self.addresses)], call

    def take(self, reply: pb.GenerateResponse) -> bool:
        """Records a message; whether the caller should see it (a resumed stream's second
        TurnStarted is not news)."""
        event = reply.WhichOneof("event")
        if event == "started":
            new = not self.result.session_id
            self.result.session_id = reply.started.session_id
            return new
        if event == "delta":
            self.result.token_ids.extend(reply.delta.token_ids)
            self.result.chunks.append(reply.delta.text)
        elif event == "stats":
            self.stats = reply.stats
        return True

    def call_ended(self) -> None:
        """Raises _Broken for a stream that ended without its statistics."""
        if self.stats is None:
            raise _Broken()

    def resume_after(self, err: Exception) -> float:
        """The seconds to wait before resuming after `err`; re-raises what a retry cannot fix."""
        broken = isinstance(err, _Broken) or (err.code() in RESUMABLE and not answered_by_orchestrator(err))
        if not broken or self.result.resumes >= self.max_resumes:
            if isinstance(err, _Broken):
                raise RuntimeError("the stream ended without statistics") from None
            raise err
        self.result.resumes += 1
        return self.result.resumes

    def done(self) -> Result:
        self.result.stats = self.stats
        self.result.text = "".join(self.result.chunks)
        return self.result


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries an API key (None: $SPECD_API_KEY, if set)."""
    key = os.environ.get("SPECD_API_KEY", "") if api_key is None else api_key
    return (("authorization", f"Bearer {key}"),) if key else ()


def generate(
    address: str,
    request: pb.GenerateRequest,
    *,
    timeout: float = 300.0,
    resumes: int = 5,
    backoff_seconds: float = 0.25,
    on_delta: Callable[[pb.TextDelta], None] | None = None,
    api_key: str | None = None,
) -> Result:
    """Runs one turn to its end at `address` (one host:port, or several comma-separated: the
    orchestrator replicas, tried in turn); resumes a broken stream up to `resumes` times,
    waiting a little longer each time. Raises grpc.RpcError on a status a retry cannot fix.
    `api_key`: sent as `authorization: Bearer KEY` (None: $SPECD_API_KEY, if set)."""
    turn = _Turn(request, address, resumes)
    metadata = auth_metadata(api_key)
    while True:
        at, call = turn.next_call()
        try:
            with grpc.insecure_channel(at, options=channel_options()) as channel:
                for reply in pb_grpc.GeneratorStub(channel).Generate(call, timeout=timeout, metadata=metadata):
                    turn.take(reply)
                    if on_delta is not None and reply.WhichOneof("event") == "delta":
                        on_delta(reply.delta)
            turn.call_ended()
        except (grpc.RpcError, _Broken) as err:
            time.sleep(backoff_seconds * turn.resume_after(err))
            continue
        return turn.done()


class AsyncClient:
    """The asyncio client: one channel per orchestrator replica, kept open across turns.

        async with AsyncClient("127.0.0.1:50050") as client:
            async for reply in client.stream(pb.GenerateRequest(prompt="def add(a, b):")):
                ...  # started, then deltas, then stats

    A stream that breaks is resumed as `generate` does, at the next replica; the caller sees
    every token once and one TurnStarted."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 300.0,
        resumes: int = 5,
        backoff_seconds: float = 0.25,
        api_key: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.resumes = resumes
        self.backoff_seconds = backoff_seconds
        self.metadata = auth_metadata(api_key)  # None: $SPECD_API_KEY, if set
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, at: str) -> grpc.aio.Channel:
        if at not in self._channels:
            self._channels[at] = grpc.aio.insecure_channel(at, options=channel_options())
        return self._channels[at]

    def stream(self, request: pb.GenerateRequest, api_key: str | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """The turn's messages as they come: TurnStarted, TextDeltas, GenerationStats last.
        Raises grpc.RpcError (grpc.aio.AioRpcError) on a status a retry cannot fix.
        `api_key` overrides the client's for this turn (a gateway passing on its caller's)."""
        return self._run(_Turn(request, self.address, self.resumes), self._metadata(api_key))

    async def generate(self, request: pb.GenerateRequest, api_key: str | None = None) -> Result:
        """One turn to its end, as the sync `generate`."""
        turn = _Turn(request, self.address, self.resumes)
        async for _ in self._run(turn, self._metadata(api_key)):
            pass
        return turn.done()

    def _metadata(self, api_key: str | None) -> tuple[tuple[str, str], ...]:
        return self.metadata if api_key is None else auth_metadata(api_key)

    async def _run(self, turn: _Turn, metadata) -> AsyncIterator[pb.GenerateResponse]:
        while True:
            at, call = turn.next_call()
            try:
                stub = pb_grpc.GeneratorStub(self._channel(at))
                async for reply in stub.Generate(call, timeout=self.timeout, metadata=metadata):
                    if turn.take(reply):
                        yield reply
                turn.call_ended()
            except (grpc.RpcError, _Broken) as err:
                await asyncio.sleep(self.backoff_seconds * turn.resume_after(err))
                continue
            return

    async def delete_session(self, session_id: str, api_key: str | None = None) -> bool:
        at = self.address.split(",")[0].strip()
        reply = await pb_grpc.GeneratorStub(self._channel(at)).DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id), timeout=self.timeout, metadata=self._metadata(api_key)
        )
        return reply.deleted

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _Broken(Exception):
    """A stream that ended without its statistics."""
