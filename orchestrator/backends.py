"""The Drafter and Verifier seen by strategies: Protocols, and two implementations of each.

Strategies are written against the Protocols, so the same round function runs on models
in this process (tests, `specd bench --in-process`) and on remote services over gRPC.
Callers pass the whole context; the remote implementations turn it into a delta (see
services/context.py) and resend in full after a miss.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from drafter_svc.draft import propose
from services.context import ContextDelta, ContextTracker
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.runtime import ModelHost, ModelInfo
from services.sampling import SamplingParams, SparseDist, seeded_generator
from services.wire import delta_to_pb, dists_from_pb, dists_to_pb, info_from_pb, sampling_to_pb
from verifier_svc.verify import verify

Reply = TypeVar("Reply")


@dataclass(frozen=True)
class CallCost:
    """Where one call's time went, for the per-round time split."""

    compute_seconds: float  # inside the model service
    wall_seconds: float  # as seen by the caller
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def network_seconds(self) -> float:
        """Transport, serialisation and queueing: what the caller waited beyond the compute."""
        return max(0.0, self.wall_seconds - self.compute_seconds)


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]  # d_1..d_k
    q: tuple[SparseDist, ...]  # empty = point masses
    cost: CallCost


@dataclass(frozen=True)
class Verified:
    accepted: int  # n
    tokens: tuple[int, ...]  # d_1..d_n + recovered or bonus token
    cost: CallCost


class Drafter(Protocol):
    async def propose(
        self, session_id: str, context: Sequence[int], k: int, params: SamplingParams, seed: int
    ) -> Draft: ...

    async def info(self) -> ModelInfo: ...


class Verifier(Protocol):
    async def verify(
        self,
        session_id: str,
        context: Sequence[int],
        draft: Sequence[int],
        q: Sequence[SparseDist],
        params: SamplingParams,
        seed: int,
    ) -> Verified: ...

    async def info(self) -> ModelInfo: ...


class ServiceUnavailable(RuntimeError):
    """A model service could not be reached (down, or past its deadline)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class ServiceError(RuntimeError):
    """A model service refused a call; carries its status code."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


# -- in process ---------------------------------------------------------------------------


class LocalDrafter:
    """A Drafter on a model in this process (no gRPC, no deltas: the cache finds the prefix)."""

    def __init__(self, host: ModelHost, q_top: int = 32) -> None:
        self.host = host
        self.q_top = q_top

    async def propose(self, session_id, context, k, params, seed) -> Draft:
        started = time.perf_counter()
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        proposal = propose(self.host, delta, k, params, self.q_top, seeded_generator(seed))
        elapsed = time.perf_counter() - started
        return Draft(proposal.tokens, proposal.q, CallCost(elapsed, elapsed))

    async def info(self) -> ModelInfo:
        return self.host.info


class LocalVerifier:
    """A Verifier on a model in this process."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host

    async def verify(self, session_id, context, draft, q, params, seed) -> Verified:
        started = time.perf_counter()
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        verdict = verify(self.host, delta, list(draft), list(q), params, seeded_generator(seed))
        elapsed = time.perf_counter() - started
        return Verified(verdict.accepted, verdict.tokens, CallCost(elapsed, elapsed))

    async def info(self) -> ModelInfo:
        return self.host.info


# -- over gRPC ----------------------------------------------------------------------------


class _Remote:
    """Calls to one model service: deadlines, error mapping, context deltas with resend."""

    def __init__(self, role: str, address: str, channel: grpc.aio.Channel, timeout_seconds: float) -> None:
        self.role = role
        self.address = address
        self.channel = channel
        self.timeout_seconds = timeout_seconds
        self.tracker = ContextTracker()

    async def call(self, method: Callable[..., Awaitable[Reply]], request: object) -> Reply:
        try:
            return await method(request, timeout=self.timeout_seconds)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                what = "did not answer in time" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "is unavailable"
                raise ServiceUnavailable(
                    f"{self.role} at {self.address} {what}: {err.details()}", code
                ) from None
            raise ServiceError(f"{self.role} at {self.address} refused the call: {err.details()}", code) from None

    async def with_context(
        self,
        session_id: str,
        context: Sequence[int],
        send: Callable[[pb.Context], Awaitable[tuple[Reply, int]]],
    ) -> tuple[Reply, int, int, float]:
        """Sends with a delta; after a miss resends the whole context once.

        `send` makes the call for one pb.Context and returns the reply and the request size.
        Returns the reply, bytes sent and received, and the wall time of all attempts.
        """
        started = time.perf_counter()
        sent = received = 0
        delta = self.tracker.delta(session_id, list(context))
        while True:
            ctx = delta_to_pb(delta)
            reply, request_bytes = await send(ctx)
            sent += request_bytes
            received += reply.ByteSize()
            if not reply.context_miss:
                return reply, sent, received, time.perf_counter() - started
            if delta.base_len == 0:
                raise ServiceError(f"{self.role} at {self.address} missed a full context", grpc.StatusCode.INTERNAL)
            delta = self.tracker.full(session_id, context)

    async def model_info(self, stub_info: Callable[..., Awaitable[pb.ModelInfo]]) -> ModelInfo:
        return info_from_pb(await self.call(stub_info, pb.InfoRequest()))


class RemoteDrafter(_Remote):
    def __init__(self, address: str, channel: grpc.aio.Channel, timeout_seconds: float) -> None:
        super().__init__("drafter", address, channel, timeout_seconds)
        self.stub = pb_grpc.DrafterStub(channel)

    async def propose(self, session_id, context, k, params, seed) -> Draft:
        async def send(ctx: pb.Context) -> tuple[pb.ProposeResponse, int]:
            request = pb.ProposeRequest(context=ctx, k=k, sampling=sampling_to_pb(params), seed=seed)
            return await self.call(self.stub.Propose, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        self.tracker.acknowledge(session_id, context)
        q = dists_from_pb(reply.q)
        return Draft(tuple(reply.tokens), q, CallCost(reply.compute_seconds, wall, sent, received))

    async def info(self) -> ModelInfo:
        return await self.model_info(self.stub.Info)


class RemoteVerifier(_Remote):
    def __init__(self, address: str, channel: grpc.aio.Channel, timeout_seconds: float) -> None:
        super().__init__("verifier", address, channel, timeout_seconds)
        self.stub = pb_grpc.VerifierStub(channel)

    async def verify(self, session_id, context, draft, q, params, seed) -> Verified:
        async def send(ctx: pb.Context) -> tuple[pb.VerifyResponse, int]:
            request = pb.VerifyRequest(
                context=ctx, draft=draft, q=dists_to_pb(q), sampling=sampling_to_pb(params), seed=seed
            )
            return await self.call(self.stub.Verify, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        tokens = tuple(reply.tokens)
        self.tracker.acknowledge(session_id, [*context, *tokens])
        return Verified(reply.accepted, tokens, CallCost(reply.compute_seconds, wall, sent, received))

    async def info(self) -> ModelInfo:
        return await self.model_info(self.stub.Info)
