"""Replica pools: a drafter or verifier address is a pool of replicas, found, health-checked
and routed to by session.

A pool is given as targets (SPECD_DRAFTER, SPECD_VERIFIER, each SPECD_CASCADE level):
`host:port` entries and `dns:///name:port` names that are re-resolved every few seconds, each
A/AAAA record one replica (a Kubernetes headless Service, docker compose's DNS).

Routing is session-affine: a session's calls go to the first replica of its rendezvous
(highest-random-weight) order over the healthy replicas, where its KV cache lives, so adding or
removing a replica moves only that replica's share of sessions. With bounded load (Mirrokni
et al. 2018, "Consistent Hashing with Bounded Loads") a replica already holding more than
`load_factor` times its share of the active sessions is skipped for the next in the order.

A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED marks its replica unhealthy and is
redone on the next replica in the session's order. The new replica misses the context and
gets the whole of it (services/context.py); every draw is fixed by the seed and the round, so
the tokens are the same whichever replica answers. A replica whose queue is full answers
RESOURCE_EXHAUSTED with a retry hint (SPECD_MAX_QUEUE): it stays healthy, the call goes to the
next replica, and when every one is full the call waits for the soonest hint while the pool's
wait lasts (the verifier's), or gives up at once (a drafter's: the round drafts with max-gram,
so speculation steps back under load instead of queueing). The standard gRPC health service, checked
every `health_interval` seconds, marks replicas healthy again (and takes draining ones out).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.backends import RemoteDrafter, RemoteVerifier, ServiceBusy, ServiceUnavailable
from services.auth import SendToken
from services.config import DNS, split_target
from services.runtime import ModelInfo
from services.server import channel_options

log = logging.getLogger(__name__)

Reply = TypeVar("Reply")
CHECK_FAILURES = 2  # health checks in a row without an answer that take a replica out


class Remote(Protocol):
    address: str
    channel: grpc.aio.Channel


Client = TypeVar("Client", bound=Remote)


class NoReplica(ServiceUnavailable):
    """No replica of a pool could answer; names the role and every address tried."""

    def __init__(self, role: str, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(message, code)
        self.role = role


def rendezvous(session_id: str, addresses: Sequence[str]) -> list[str]:
    """Addresses in the session's highest-random-weight order (the same in every process)."""

    def weight(address: str) -> bytes:
        return hashlib.blake2b(f"{session_id}\0{address}".encode(), digest_size=8).digest()

    return sorted(addresses, key=weight, reverse=True)


@dataclass
class Replica(Generic[Client]):
    address: str
    client: Client
    healthy: bool = True  # until a check or a call says otherwise
    active: dict[str, float] = field(default_factory=dict)  # session id -> last call (monotonic)
    placed: dict[str, float] = field(default_factory=dict)  # session id -> when it came here
    joined: float = 0.0  # when it last turned healthy (monotonic; 0 = from the start)
    check_failures: int = 0  # health checks in a row that got no answer

    def load(self, now: float, window: float) -> int:
        """Sessions that called it in the last `window` seconds (older ones are forgotten)."""
        for session_id in [s for s, at in self.active.items() if now - at > window]:
            del self.active[session_id]
            self.placed.pop(session_id, None)
        return len(self.active)

    def forget(self, session_id: str) -> None:
        self.active.pop(session_id, None)
        self.placed.pop(session_id, None)


class ReplicaPool(Generic[Client]):
    """The replicas behind one pool of targets; `call` routes and fails over (see above)."""

    def __init__(
        self,
        role: str,
        targets: Sequence[str],
        make_client: Callable[[str, grpc.aio.Channel], Client],
        *,
        health_interval: float = 1.0,
        resolve_interval: float = 5.0,
        load_factor: float = 1.25,
        active_seconds: float = 60.0,
        wait_seconds: float = 0.0,
        token: str = "",
    ) -> None:
        if not targets:
            raise ValueError(f"a {role} pool needs at least one target")
        self.role = role
        self.targets = tuple(targets)
        self.make_client = make_client
        self.health_interval = health_interval
        self.resolve_interval = resolve_interval
        self.load_factor = load_factor
        self.active_seconds = active_seconds
        self.wait_seconds = wait_seconds  # how long a call waits for a replica to come back
        self.token = token  # the internal token every call carries (services/auth.py); "" = none
        self.replicas: dict[str, Replica[Client]] = {}
        self._resolved: dict[str, set[str]] = {}  # dns:/// target -> the addresses it resolved to
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()  # set when a replica turns healthy
        for target in self.targets:  # static entries are replicas from the start
            if not target.startswith(DNS):
                self._add(target)

    def __repr__(self) -> str:
        return f"{self.role} pool {','.join(self.targets)}"

    @property
    def name(self) -> str:
        return ",".join(self.targets)

    # -- membership and health ------------------------------------------------------------

    def _add(self, address: str) -> None:
        interceptors = [SendToken(self.token)] if self.token else None
        channel = grpc.aio.insecure_channel(address, options=channel_options(), interceptors=interceptors)
        self.replicas[address] = Replica(address, self.make_client(address, channel))

    async def _remove(self, address: str) -> None:
        replica = self.replicas.pop(address)
        await replica.client.channel.close()

    async def resolve(self) -> None:
        """Re-resolves the dns:/// targets: every address found is a replica, one no longer
        found is removed. A name that does not resolve keeps its last replicas."""
        found: set[str] = set()
        for target in self.targets:
            if not target.startswith(DNS):
                found.add(target)
                continue
            host, port = split_target(target)
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as err:
                log.warning("%s: cannot resolve %s: %s", self, host, err)
                found.update(a for a in self.replicas if a in self._resolved.get(target, ()))
                continue
            addresses = {f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos}
            self._resolved[target] = addresses
            found |= addresses
        for address in sorted(found - set(self.replicas)):
            log.info("%s: replica %s added", self, address)
            self._add(address)
            await self._check(self.replicas[address])
        for address in sorted(set(self.replicas) - found):
            log.info("%s: replica %s removed", self, address)
            await self._remove(address)

    async def _check(self, replica: Replica[Client]) -> None:
        """One health check. A replica that says NOT_SERVING (draining) is out at once; one
        that does not answer, after CHECK_FAILURES checks in a row (a loaded machine can be
        slow to answer a check; a failed call takes a replica out at once anyway)."""
        stub = health_pb2_grpc.HealthStub(replica.client.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=max(2.0, 2 * self.health_interval))
            healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
            replica.check_failures = 0
            why = "" if healthy else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as err:
            replica.check_failures += 1
            healthy = replica.healthy and replica.check_failures < CHECK_FAILURES
            why = f"{err.code().name}: {err.details()}"
        if healthy != replica.healthy:
            log.info("%s: replica %s is %s", self, replica.address, "healthy" if healthy else f"out ({why})")
            replica.healthy = healthy
            if healthy:
                replica.joined = time.monotonic()
                self._changed.set()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(r) for r in list(self.replicas.values())))

    async def start(self) -> None:
        """Resolves the targets, checks every replica once, and keeps doing both."""
        await self.resolve()
        await self.check_all()
        self._task = asyncio.create_task(self._watch(), name=f"{self.role}-pool")

    async def _watch(self) -> None:
        last_resolve = time.monotonic()
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                if time.monotonic() - last_resolve >= self.resolve_interval:
                    last_resolve = time.monotonic()
                    await self.resolve()
                await self.check_all()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("%s: health check failed", self)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for address in list(self.replicas):
            await self._remove(address)

    # -- routing --------------------------------------------------------------------------

    def order(self, session_id: str) -> list[Replica[Client]]:
        """The healthy replicas in the order this session tries them. A session stays where
        it is (its KV cache is there) unless its rendezvous home has room again (a replica
        that came back gets its sessions back); a new session goes to the first replica of
        its order with room under the bounded load."""
        healthy = [self.replicas[a] for a in rendezvous(session_id, list(self.replicas)) if self.replicas[a].healthy]
        if len(healthy) < 2:
            return healthy
        now = time.monotonic()
        loads = [r.load(now, self.active_seconds) - (session_id in r.active) for r in healthy]
        capacity = math.ceil(self.load_factor * (sum(loads) + 1) / len(healthy))
        current = next((i for i, r in enumerate(healthy) if session_id in r.active), None)
        returned = current is not None and healthy[0].joined > healthy[current].placed.get(session_id, 0.0)
        if current is not None and not (returned and loads[0] + 1 <= capacity):
            home = current
        else:
            home = next((i for i, load in enumerate(loads) if load + 1 <= capacity), 0)
        return [healthy[home], *healthy[:home], *healthy[home + 1 :]]

    async def _wait_for_replica(self, deadline: float) -> None:
        """Returns once a replica is healthy (checking often) or the deadline has passed."""
        while not any(r.healthy for r in self.replicas.values()) and time.monotonic() < deadline:
            self._changed.clear()
            await self.check_all()
            if not any(r.healthy for r in self.replicas.values()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=min(0.2, max(0.0, deadline - time.monotonic())))

    async def attempt(
        self, session_id: str, fn: Callable[[Client], Awaitable[Reply]], *, place: bool = True
    ) -> tuple[Reply, str, int]:
        """fn on the session's replica, failing over down its order (and, for up to
        wait_seconds, waiting for one to come back); the reply, the replica that gave it and
        how many failed first (`place`: the session now lives there). Raises NoReplica when
        none could answer."""
        deadline = time.monotonic() + self.wait_seconds
        errors: list[str] = []
        busy: list[float] = []  # retry hints of the replicas that refused for want of room
        if not self.order(session_id):  # all were down at the last check: one may be back since
            await self.check_all()
        while True:
            busy.clear()
            for replica in self.order(session_id):
                try:
                    reply = await fn(replica.client)
                except ServiceUnavailable as err:
                    replica.healthy = False
                    replica.forget(session_id)
                    errors.append(str(err))
                    log.warning("%s: %s; failing over", self, err)
                    continue
                except ServiceBusy as err:  # alive, but full: the next replica, or later
                    busy.append(err.retry_after_seconds)
                    errors.append(str(err))
                    continue
                if not place:
                    return reply, replica.address, len(errors)
                now = time.monotonic()
                if session_id not in replica.active:
                    for other in self.replicas.values():
                        other.forget(session_id)
                    replica.placed[session_id] = now
                replica.active[session_id] = now
                return reply, replica.address, len(errors)
            if time.monotonic() >= deadline:
                break
            if busy:  # every healthy replica was full: try again when the soonest said
                await asyncio.sleep(min(min(busy), max(0.0, deadline - time.monotonic())))
                continue
            await asyncio.sleep(0.05)  # a replica that checks healthy but fails calls is not retried in a hot loop
            await self._wait_for_replica(deadline)
        tried = "; ".join(dict.fromkeys(errors)) or f"no replica of {self.name} is healthy"
        waited = f" after waiting {self.wait_seconds:.0f}s" if self.wait_seconds else ""
        if busy and len(busy) == len(self.order(session_id)):
            raise NoReplica(self.role, f"every {self.role} is busy{waited} ({tried})", grpc.StatusCode.RESOURCE_EXHAUSTED)
        raise NoReplica(self.role, f"no {self.role} is reachable{waited} ({tried})")

    async def call(self, session_id: str, fn: Callable[[Client], Awaitable[Reply]]) -> Reply:
        """`attempt`, with the replica and the failovers put into the result's cost."""
        reply, address, failovers = await self.attempt(session_id, fn)
        return served_by(reply, address, failovers)


def served_by(reply: Reply, address: str, failovers: int = 0) -> Reply:
    """A result with the replica that gave it, and the failovers before it, in its cost."""
    return dataclasses.replace(reply, cost=dataclasses.replace(reply.cost, replicas=(address,), failovers=failovers))


def drafter_pool(targets: Sequence[str], timeout_seconds: float, **options) -> DrafterPool:
    return DrafterPool(ReplicaPool("drafter", targets, lambda a, c: RemoteDrafter(a, c, timeout_seconds), **options))


def verifier_pool(targets: Sequence[str], timeout_seconds: float, **options) -> VerifierPool:
    return VerifierPool(ReplicaPool("verifier", targets, lambda a, c: RemoteVerifier(a, c, timeout_seconds), **options))


class _Pooled(Generic[Client]):
    def __init__(self, pool: ReplicaPool[Client]) -> None:
        self.pool = pool

    async def info(self) -> ModelInfo:
        """The model of the pool (its replicas serve the same one), from any replica; the
        Engine asks once and keeps it."""
        info, _, _ = await self.pool.attempt("", lambda client: client.info(), place=False)
        return info


class DrafterPool(_Pooled[RemoteDrafter]):
    """The Drafter (and Reviewer, TreeDrafter, StringDrafter) Protocols over a replica pool."""

    async def propose(self, session_id, context, k, params, seed, vocab="native"):
        return await self.pool.call(session_id, lambda d: d.propose(session_id, context, k, params, seed, vocab))

    async def propose_and_continue(
        self, session_id, context, k, params, seed, continue_k, continue_seed, vocab="native"
    ):  # fmt: skip
        return await self.pool.call(
            session_id,
            lambda d: d.propose_and_continue(session_id, context, k, params, seed, continue_k, continue_seed, vocab),
        )

    async def propose_strings(self, session_id, context, k, params, seed):
        return await self.pool.call(session_id, lambda d: d.propose_strings(session_id, context, k, params, seed))

    async def review(self, session_id, context, draft, q, params, seed):
        return await self.pool.call(session_id, lambda d: d.review(session_id, context, draft, q, params, seed))

    async def propose_tree(self, session_id, context, shape, params, seed):
        return await self.pool.call(session_id, lambda d: d.propose_tree(session_id, context, shape, params, seed))

    async def propose_beams(self, session_id, hidden, last_token, width, depth):
        return await self.pool.call(session_id, lambda d: d.propose_beams(session_id, hidden, last_token, width, depth))


class VerifierPool(_Pooled[RemoteVerifier]):
    """The Verifier (and TreeVerifier, StringVerifier) Protocols over a replica pool."""

    async def verify(self, session_id, context, draft, q, params, seed):
        return await self.pool.call(session_id, lambda v: v.verify(session_id, context, draft, q, params, seed))

    async def verify_ahead(self, session_id, context, draft, q, params, seed, or_plain=False):
        """On the session's replica only, without failing over: a replica that does not hold
        the session's context could not run it anyway, and the round verifies afresh."""
        order = self.pool.order(session_id)
        if not order or session_id not in order[0].active:
            return None
        try:
            v = await order[0].client.verify_ahead(session_id, context, draft, q, params, seed, or_plain)
        except (ServiceUnavailable, ServiceBusy):
            return None  # the round's own verify fails over as every call does
        return None if v is None else served_by(v, order[0].address)

    async def verify_strings(self, session_id, context, proposals, params, seed):
        return await self.pool.call(
            session_id, lambda v: v.verify_strings(session_id, context, proposals, params, seed)
        )

    async def verify_tree(self, session_id, context, tree, q, params, seed, want_hidden=False):
        return await self.pool.call(
            session_id, lambda v: v.verify_tree(session_id, context, tree, q, params, seed, want_hidden)
        )
