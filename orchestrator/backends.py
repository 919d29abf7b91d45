"""The Drafter and Verifier seen by strategies: Protocols, and two implementations of each.

Strategies are written against the Protocols, so the same round function runs on models
in this process (tests, `specd bench --in-process`) and on remote services over gRPC.
Callers pass the whole context; the remote implementations turn it into a delta (see
services/context.py) and resend in full after a miss.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from drafter_svc.draft import propose, propose_tree, review
from drafter_svc.foreign import Translation, propose_slem, propose_strings, propose_tli
from services.context import ContextDelta, ContextTracker
from services.ngram import NgramIndex
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.runtime import ModelHost, ModelInfo
from services.sampling import SamplingParams, SparseDist, seeded_generator
from services.slrs import PrefixIndex, StringProposal
from services.tree import Tree, TreeShape
from services.vocab import token_bytes
from services.wire import (
    delta_to_pb,
    dists_from_pb,
    dists_to_pb,
    info_from_pb,
    sampling_to_pb,
    shape_to_pb,
    strings_from_pb,
    strings_to_pb,
    tree_from_pb,
    tree_to_pb,
    vocab_to_pb,
)
from verifier_svc.verify import string_index, verify, verify_strings, verify_tree

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


def total_cost(costs: Iterable[CallCost]) -> CallCost | None:
    """The sum of several calls' costs (a cascade's drafting); None for no calls.

    network_seconds of the sum is computed from the summed times; calls run one after the
    other, so the sum of each call's own network time is never more than that.
    """
    costs = list(costs)
    if not costs:
        return None
    return CallCost(
        compute_seconds=sum(c.compute_seconds for c in costs),
        wall_seconds=sum(c.wall_seconds for c in costs),
        bytes_sent=sum(c.bytes_sent for c in costs),
        bytes_received=sum(c.bytes_received for c in costs),
    )


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]  # d_1..d_k
    q: tuple[SparseDist, ...]  # empty = point masses
    cost: CallCost


@dataclass(frozen=True)
class Reviewed:
    """A middle level's review of a smaller level's draft (see drafter_svc.draft.review)."""

    accepted: int  # n
    tokens: tuple[int, ...]  # d_1..d_n + recovered or bonus token
    q: tuple[SparseDist, ...]  # one per token when sampling: the reviewer's own distribution; empty = point masses
    cost: CallCost


@dataclass(frozen=True)
class TreeDraft:
    tree: Tree
    q: tuple[SparseDist | None, ...]  # N+1 entries (root first) when sampling; empty = deterministic children
    forwards: int  # drafter passes it cost
    cost: CallCost


@dataclass(frozen=True)
class Verified:
    accepted: int  # n
    tokens: tuple[int, ...]  # d_1..d_n + recovered or bonus token
    cost: CallCost
    verified: int = -1  # verify_strings: drafted strings checked (-1: the whole draft)


@dataclass(frozen=True)
class StringsDraft:
    proposals: tuple[StringProposal, ...]
    cost: CallCost


class Drafter(Protocol):
    async def propose(
        self, session_id: str, context: Sequence[int], k: int, params: SamplingParams, seed: int, vocab: str = "native"
    ) -> Draft:
        """k tokens in target ids; `vocab` (slem | tli) says how a drafter with another
        vocabulary than the target's translates (drafter_svc/foreign.py); others ignore it."""
        ...

    async def info(self) -> ModelInfo: ...


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
    ) -> Verified: ...


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
    """A Drafter on a model in this process (no gRPC, no deltas: the cache finds the prefix).

    translation: set for a drafter whose vocabulary differs from the target's (slem, tli, slrs).
    """

    def __init__(
        self, host: ModelHost, q_top: int = 32, second_stage: int = 4, translation: Translation | None = None
    ) -> None:
        self.host = host
        self.q_top = q_top
        self.second_stage = second_stage  # max-gram lookahead while growing trees (0 = off)
        self.translation = translation
        self._own_bytes: list[bytes | None] | None = None

    async def propose(self, session_id, context, k, params, seed, vocab="native") -> Draft:
        started = time.perf_counter()
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        generator = seeded_generator(seed)
        if self.translation is None:
            proposal = propose(self.host, delta, k, params, self.q_top, generator)
        else:
            if vocab not in ("slem", "tli"):
                raise ValueError(f"this drafter has another vocabulary than the target's; vocab {vocab!r} needs slem or tli")
            translate = propose_slem if vocab == "slem" else propose_tli
            proposal = translate(self.host, self.translation, delta, k, params, self.q_top, generator)
        elapsed = time.perf_counter() - started
        return Draft(proposal.tokens, proposal.q, CallCost(elapsed, elapsed))

    async def propose_strings(self, session_id, context, k, params, seed) -> StringsDraft:
        started = time.perf_counter()
        if self._own_bytes is None:
            self._own_bytes = (
                self.translation.drafter_bytes
                if self.translation is not None
                else token_bytes(self.host.tokenizer, size=self.host.info.vocab_size)
            )
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        proposals = propose_strings(
            self.host, self.translation, self._own_bytes, delta, k, params, self.q_top, seeded_generator(seed)
        )
        elapsed = time.perf_counter() - started
        return StringsDraft(tuple(proposals), CallCost(elapsed, elapsed))

    async def review(self, session_id, context, draft, q, params, seed) -> Reviewed:
        started = time.perf_counter()
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        result = review(self.host, delta, list(draft), list(q), params, self.q_top, seeded_generator(seed))
        elapsed = time.perf_counter() - started
        v = result.verdict
        return Reviewed(v.accepted, v.tokens, result.q, CallCost(elapsed, elapsed))

    async def propose_tree(self, session_id, context, shape, params, seed) -> TreeDraft:
        started = time.perf_counter()
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        p = propose_tree(self.host, delta, shape, params, self.q_top, self.second_stage, seeded_generator(seed))
        elapsed = time.perf_counter() - started
        return TreeDraft(p.tree, p.q, p.forwards, CallCost(elapsed, elapsed))

    async def info(self) -> ModelInfo:
        return self.host.info if self.translation is None else self.translation.wire_info(self.host.info)


MAXGRAM_INFO = ModelInfo(
    model="maxgram", vocab_size=0, max_context=0, eos_token_ids=(), dtype="", device="", tokenizer_fingerprint=""
)  # vocab 0 and no fingerprint: a statistical drafter works on the ids of any vocabulary


class LocalMaxGram:
    """The max-gram drafter (services/ngram.py) in this process: no model, no network.

    Owns one NgramIndex per session (least recently used evicted), moved to each call's
    context with `sync`, which costs only the tokens that changed since the last call.
    Proposals are deterministic: q is empty (point masses), whatever the sampling params.
    """

    def __init__(self, max_n: int = 4, max_sessions: int = 1024) -> None:
        self.max_n = max_n
        self.max_sessions = max_sessions
        self._indexes: OrderedDict[str, NgramIndex] = OrderedDict()

    def index(self, session_id: str, context: Sequence[int]) -> NgramIndex:
        index = self._indexes.pop(session_id, None) or NgramIndex(self.max_n)
        self._indexes[session_id] = index
        while len(self._indexes) > self.max_sessions:
            self._indexes.popitem(last=False)
        index.sync(context)
        return index

    async def propose(self, session_id, context, k, params, seed, vocab="native") -> Draft:
        started = time.perf_counter()
        tokens = tuple(self.index(session_id, context).propose(k))
        elapsed = time.perf_counter() - started
        return Draft(tokens, (), CallCost(elapsed, elapsed))

    async def info(self) -> ModelInfo:
        return MAXGRAM_INFO


class LocalVerifier:
    """A Verifier on a model in this process."""

    def __init__(self, host: ModelHost, max_string_nodes: int = 64) -> None:
        self.host = host
        self.max_string_nodes = max_string_nodes  # the slrs tree budget (SPECD_MAX_DRAFT in the service)
        self._strings: PrefixIndex | None = None

    async def verify_strings(self, session_id, context, proposals, params, seed) -> Verified:
        started = time.perf_counter()
        if self._strings is None:
            self._strings = string_index(self.host.tokenizer, self.host.info.vocab_size)
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        result = verify_strings(
            self.host, self._strings, delta, list(proposals), params, seeded_generator(seed), self.max_string_nodes
        )
        elapsed = time.perf_counter() - started
        v = result.verdict
        return Verified(v.accepted, v.tokens, CallCost(elapsed, elapsed), result.verified)

    async def verify(self, session_id, context, draft, q, params, seed) -> Verified:
        started = time.perf_counter()
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        verdict = verify(self.host, delta, list(draft), list(q), params, seeded_generator(seed))
        elapsed = time.perf_counter() - started
        return Verified(verdict.accepted, verdict.tokens, CallCost(elapsed, elapsed))

    async def verify_tree(self, session_id, context, tree, q, params, seed) -> Verified:
        started = time.perf_counter()
        delta = ContextDelta(session_id, 0, 0, tuple(context))
        verdict = verify_tree(self.host, delta, tree, list(q), params, seeded_generator(seed))
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

    async def propose(self, session_id, context, k, params, seed, vocab="native") -> Draft:
        async def send(ctx: pb.Context) -> tuple[pb.ProposeResponse, int]:
            request = pb.ProposeRequest(
                context=ctx, k=k, sampling=sampling_to_pb(params), seed=seed, vocab=vocab_to_pb(vocab)
            )
            return await self.call(self.stub.Propose, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        self.tracker.acknowledge(session_id, context)
        q = dists_from_pb(reply.q)
        return Draft(tuple(reply.tokens), q, CallCost(reply.compute_seconds, wall, sent, received))

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
        return Verified(reply.accepted, tokens, cost, reply.verified)

    async def verify_tree(self, session_id, context, tree, q, params, seed) -> Verified:
        async def send(ctx: pb.Context) -> tuple[pb.VerifyTreeResponse, int]:
            request = pb.VerifyTreeRequest(
                context=ctx, tree=tree_to_pb(tree, q), sampling=sampling_to_pb(params), seed=seed
            )
            return await self.call(self.stub.VerifyTree, request), request.ByteSize()

        reply, sent, received, wall = await self.with_context(session_id, context, send)
        tokens = tuple(reply.tokens)
        self.tracker.acknowledge(session_id, [*context, *tokens])
        return Verified(reply.accepted, tokens, CallCost(reply.compute_seconds, wall, sent, received))

    async def info(self) -> ModelInfo:
        return await self.model_info(self.stub.Info)


class Translated:
    """A drafter of another vocabulary as a cascade level: it proposes through `vocab`
    (tli or slem, drafter_svc/foreign.py) whatever the caller asks, and cannot review."""

    def __init__(self, drafter: Drafter, vocab: str) -> None:
        assert vocab in ("tli", "slem"), f"vocab must be tli or slem, got {vocab!r}"
        self.drafter = drafter
        self.vocab = vocab

    async def propose(self, session_id, context, k, params, seed, vocab="native") -> Draft:
        return await self.drafter.propose(session_id, context, k, params, seed, self.vocab)

    async def info(self) -> ModelInfo:
        return await self.drafter.info()
