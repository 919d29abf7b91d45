"""The Drafter and Verifier seen by strategies: Protocols, and their gRPC clients.

Strategies are written against the Protocols, so the same round function runs on the model
services' cores in this process (drafter_svc/core.py, verifier_svc/core.py: tests and
`specd bench`'s in-process path) and on remote services over gRPC. Callers pass the whole
context; the remote clients turn it into a delta (services/context.py) and resend in full
after a miss. Results are the dataclasses of services/roles.py either way.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import grpc
import torch

from services.context import ContextTracker, whole_claim
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.roles import CallCost, Draft, Reviewed, StringsDraft, TreeDraft, Verified
from services.runtime import ModelInfo
from services.sampling import SamplingParams, SparseDist
from services.server import RETRY_AFTER_KEY
from services.slrs import StringProposal
from services.tree import Tree, TreeShape
from services.wire import (
    delta_to_pb,
    dists_from_pb,
    dists_to_pb,
    hidden_from_bytes,
    hidden_to_bytes,
    info_from_pb,
    sampling_to_pb,
    shape_to_pb,
    strings_from_pb,
    strings_to_pb,
    tree_from_pb,
    tree_to_pb,
    vocab_to_pb,
)

Reply = TypeVar("Reply")


class Drafter(Protocol):
    async def propose(
        self, session_id: str, context: Sequence[int], k: int, params: SamplingParams, seed: int, vocab: str = "native"
    ) -> Draft:
        """k tokens in target ids; `vocab` (slem | tli) says how a drafter with another
        vocabulary than the target's translates (drafter_svc/foreign.py); others ignore it."""
        ...

    async def info(self) -> ModelInfo: ...


class ContinuingDrafter(Drafter, Protocol):
    async def propose_and_continue(
        self,
        session_id: str,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        seed: int,
        continue_k: int,
        continue_seed: int,
        vocab: str = "native",
    ) -> Draft:
        """`propose`, after which the drafter goes on drafting continue_k tokens after the
        context and this draft with continue_seed: the call that then asks for them is
        answered sooner, with the same draft (drafter_svc/continuation.py)."""
        ...


class StringDrafter(Drafter, Protocol):
    """A drafter that drafts text for string-level rejection sampling (slrs)."""

    async def propose_strings(
        self, session_id: str, context: Sequence[int], k: int, params: SamplingParams, seed: int
    ) -> StringsDraft: ...


class StringVerifier(Protocol):
    async def verify_strings(
        self,
        session_id: str,
        context: Sequence[int],
        proposals: Sequence[StringProposal],
        params: SamplingParams,
        seed: int,
    ) -> Verified: ...


class Reviewer(Drafter, Protocol):
    """A drafter that can also be a middle level of a cascade."""

    async def review(
        self,
        session_id: str,
        context: Sequence[int],
        draft: Sequence[int],
        q: Sequence[SparseDist],
        params: SamplingParams,
        seed: int,
    ) -> Reviewed: ...


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


class AheadVerifier(Verifier, Protocol):
    async def verify_ahead(
        self,
        session_id: str,
        context: Sequence[int],
        draft: Sequence[int],
        q: Sequence[SparseDist],
        params: SamplingParams,
        seed: int,
        or_plain: bool = False,
    ) -> Verified | None:
        """`verify`, run only where the service's committed context for the session then
        starts with all of `context` (a pipelined round's next verify, sent before the answer
        that commits that context); None where it does not: nothing was computed. With
        `or_plain`, where it does not, a plain step after the context the service holds,
        named by Verified.plain_after."""
        ...


class TreeDrafter(Drafter, Protocol):
    """A drafter that can also grow a draft tree (staged)."""

    async def propose_tree(
        self, session_id: str, context: Sequence[int], shape: TreeShape, params: SamplingParams, seed: int
    ) -> TreeDraft: ...


class TreeVerifier(Verifier, Protocol):
    async def verify_tree(
        self,
        session_id: str,
        context: Sequence[int],
        tree: Tree,
        q: Sequence[SparseDist | None],
        params: SamplingParams,
        seed: int,
        want_hidden: bool = False,
    ) -> Verified:
        """want_hidden: the result carries the target's hidden state behind its last token (redrafter, parallel)."""
        ...


class BeamDrafter(Protocol):
    """A trained draft head (redrafter, parallel): drafts from the target's hidden state alone."""

    async def propose_beams(
        self, session_id: str, hidden: torch.Tensor, last_token: int, width: int, depth: int
    ) -> TreeDraft:
        """The session's id only routes the call (a pool spreads sessions over its replicas):
        a head holds no session."""
        ...

    async def info(self) -> ModelInfo: ...


class ServiceUnavailable(RuntimeError):
    """A model service could not be reached (down, or past its deadline)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class ServiceBusy(RuntimeError):
    """A model service's queue is full (RESOURCE_EXHAUSTED); retry_after_seconds is its hint."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ServiceError(RuntimeError):
    """A model service refused a call; carries its status code."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


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
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                hint = dict(err.trailing_metadata() or ()).get(RETRY_AFTER_KEY, "100")
                seconds = int(hint) / 1000 if str(hint).isdigit() else 0.1
                raise ServiceBusy(f"{self.role} at {self.address} is busy: {err.details()}", seconds) from None
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

    async def propose(self, session_id, context, k, params, seed, vocab="native") -> Draft:
        return await self.propose_and_continue(session_id, context, k, params, seed, 0, 0, vocab)

    async def propose_and_continue(
        self, session_id, context, k, params, seed, continue_k, continue_seed, vocab="native"
    ) -> Draft:
        async def send(ctx: pb.Context) -> tuple[pb.ProposeResponse, int]:
            request = pb.ProposeRequest(
                context=ctx, k=k, sampling=sampling_to_pb(params), seed=seed, vocab=vocab_to_pb(vocab),
                continue_k=continue_k, continue_seed=continue_seed,
            )  # fmt: skip
            return await self.call(self.stub.Propose, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        self.tracker.acknowledge(session_id, context)
        q = dists_from_pb(reply.q)
        return Draft(tuple(reply.tokens), q, CallCost(reply.compute_seconds, wall, sent, received), reply.continued)

    async def propose_strings(self, session_id, context, k, params, seed) -> StringsDraft:
        async def send(ctx: pb.Context) -> tuple[pb.ProposeStringsResponse, int]:
            request = pb.ProposeStringsRequest(context=ctx, k=k, sampling=sampling_to_pb(params), seed=seed)
            return await self.call(self.stub.ProposeStrings, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        self.tracker.acknowledge(session_id, context)
        return StringsDraft(strings_from_pb(reply.draft), CallCost(reply.compute_seconds, wall, sent, received))

    async def review(self, session_id, context, draft, q, params, seed) -> Reviewed:
        async def send(ctx: pb.Context) -> tuple[pb.ReviewResponse, int]:
            request = pb.ReviewRequest(
                context=ctx, draft=draft, q=dists_to_pb(q), sampling=sampling_to_pb(params), seed=seed
            )
            return await self.call(self.stub.Review, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        tokens = tuple(reply.tokens)
        self.tracker.acknowledge(session_id, [*context, *tokens])
        cost = CallCost(reply.compute_seconds, wall, sent, received)
        return Reviewed(reply.accepted, tokens, dists_from_pb(reply.q), cost)

    async def propose_tree(self, session_id, context, shape, params, seed) -> TreeDraft:
        async def send(ctx: pb.Context) -> tuple[pb.ProposeTreeResponse, int]:
            request = pb.ProposeTreeRequest(
                context=ctx, shape=shape_to_pb(shape), sampling=sampling_to_pb(params), seed=seed
            )
            return await self.call(self.stub.ProposeTree, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        self.tracker.acknowledge(session_id, context)
        tree, q = tree_from_pb(reply.tree)
        return TreeDraft(tree, q, reply.drafter_forwards, CallCost(reply.compute_seconds, wall, sent, received))

    async def propose_beams(self, session_id, hidden, last_token, width, depth) -> TreeDraft:
        request = pb.ProposeBeamsRequest(hidden=hidden_to_bytes(hidden), last_token=last_token, width=width, depth=depth)
        started = time.perf_counter()
        reply = await self.call(self.stub.ProposeBeams, request)
        tree, _ = tree_from_pb(reply.tree)
        cost = CallCost(reply.compute_seconds, time.perf_counter() - started, request.ByteSize(), reply.ByteSize())
        return TreeDraft(tree, (), depth, cost)

    async def info(self) -> ModelInfo:
        return await self.model_info(self.stub.Info)


class RemoteVerifier(_Remote):
    def __init__(self, address: str, channel: grpc.aio.Channel, timeout_seconds: float) -> None:
        super().__init__("verifier", address, channel, timeout_seconds)
        self.stub = pb_grpc.VerifierStub(channel)

    async def verify(self, session_id, context, draft, q, params, seed) -> Verified:
        async def send(ctx: pb.Context) -> tuple[pb.VerifyResponse, int]:
            request = _verify_request(ctx, draft, q, params, seed)
            return await self.call(self.stub.Verify, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        return self._verified(session_id, context, reply, sent, received, wall)

    async def verify_ahead(self, session_id, context, draft, q, params, seed, or_plain=False) -> Verified | None:
        request = _verify_request(delta_to_pb(whole_claim(session_id, context)), draft, q, params, seed)
        request.or_plain = or_plain
        started = time.perf_counter()
        reply = await self.call(self.stub.Verify, request)
        if reply.context_miss:  # the guess was wrong: no resend, the round verifies afresh
            return None
        wall = time.perf_counter() - started
        return self._verified(session_id, context, reply, request.ByteSize(), reply.ByteSize(), wall)

    def _verified(self, session_id, context, reply: pb.VerifyResponse, sent, received, wall) -> Verified:
        """The answer; what the service now holds is recorded, unless the answer is a plain step
        after another context than `context` (or_plain), which the caller checks."""
        tokens = tuple(reply.tokens)
        plain_after = (reply.plain_after_len, reply.plain_after_fingerprint) if reply.plain_after_len else None
        if plain_after is None:
            self.tracker.acknowledge(session_id, [*context, *tokens])
        cost = CallCost(reply.compute_seconds, wall, sent, received, batch_sessions=max(1, reply.batch_sessions),
                        batch_tokens=reply.batch_tokens)  # fmt: skip
        return Verified(reply.accepted, tokens, cost, plain_after=plain_after)

    async def verify_strings(self, session_id, context, proposals, params, seed) -> Verified:
        async def send(ctx: pb.Context) -> tuple[pb.VerifyStringsResponse, int]:
            request = pb.VerifyStringsRequest(
                context=ctx, draft=strings_to_pb(proposals), sampling=sampling_to_pb(params), seed=seed
            )
            return await self.call(self.stub.VerifyStrings, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        tokens = tuple(reply.tokens)
        self.tracker.acknowledge(session_id, [*context, *tokens])
        cost = CallCost(reply.compute_seconds, wall, sent, received)
        return Verified(reply.accepted, tokens, cost, reply.verified, reply.tree_nodes)

    async def verify_tree(self, session_id, context, tree, q, params, seed, want_hidden=False) -> Verified:
        async def send(ctx: pb.Context) -> tuple[pb.VerifyTreeResponse, int]:
            request = pb.VerifyTreeRequest(
                context=ctx, tree=tree_to_pb(tree, q), sampling=sampling_to_pb(params), seed=seed,
                want_hidden=want_hidden,
            )  # fmt: skip
            return await self.call(self.stub.VerifyTree, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        tokens = tuple(reply.tokens)
        self.tracker.acknowledge(session_id, [*context, *tokens])
        hidden = hidden_from_bytes(reply.hidden) if reply.hidden else None
        return Verified(reply.accepted, tokens, CallCost(reply.compute_seconds, wall, sent, received), hidden=hidden)

    async def info(self) -> ModelInfo:
        return await self.model_info(self.stub.Info)


def _verify_request(ctx: pb.Context, draft, q, params, seed) -> pb.VerifyRequest:
    return pb.VerifyRequest(context=ctx, draft=draft, q=dists_to_pb(q), sampling=sampling_to_pb(params), seed=seed)


class Translated:
    """A drafter of another vocabulary as a cascade level: it proposes through `vocab`
    (tli or slem, drafter_svc/foreign.py) whatever the caller asks, and cannot review."""

    def __init__(self, drafter: Drafter, vocab: str) -> None:
        if vocab not in ("tli", "slem"):
            raise ValueError(f"vocab must be tli or slem, got {vocab!r}")
        self.drafter = drafter
        self.vocab = vocab

    async def propose(self, session_id, context, k, params, seed, vocab="native") -> Draft:
        return await self.drafter.propose(session_id, context, k, params, seed, self.vocab)

    async def info(self) -> ModelInfo:
        return await self.drafter.info()
