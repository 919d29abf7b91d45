"""Replica pools (orchestrator/pool.py): rendezvous routing, bounded load, failover order,
target parsing. Routing is pure; the calls here run on in-process clients, and the pools
over real service processes are in tests/test_failover.py."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from orchestrator.backends import ServiceUnavailable
from orchestrator.pool import NoReplica, ReplicaPool, rendezvous
from services.config import ConfigError, OrchestratorConfig, cascade_level, parse_targets
from services.roles import CallCost, Draft

SESSIONS = [f"session-{i}" for i in range(2000)]


def homes(addresses: list[str]) -> dict[str, str]:
    return {s: rendezvous(s, addresses)[0] for s in SESSIONS}


def test_rendezvous_spreads_sessions_and_moves_only_the_share_of_a_changed_replica():
    three = [f"10.0.0.{i}:50052" for i in (1, 2, 3)]
    before = homes(three)
    shares = Counter(before.values())
    assert min(shares.values()) > 0.25 * len(SESSIONS), shares
    after_add = homes([*three, "10.0.0.4:50052"])
    moved = [s for s in SESSIONS if before[s] != after_add[s]]
    assert all(after_add[s] == "10.0.0.4:50052" for s in moved)  # only to the new replica
    assert 0.15 * len(SESSIONS) < len(moved) < 0.35 * len(SESSIONS)
    after_remove = homes(three[1:])
    assert all(after_remove[s] == before[s] for s in SESSIONS if before[s] != three[0])


class Client:
    """An in-process stand-in for a replica's gRPC client: answers, or is down."""

    def __init__(self, address: str, channel) -> None:
        self.address = address
        self.channel = channel
        self.down = False
        self.calls = 0

    async def propose(self, session_id: str) -> Draft:
        self.calls += 1
        if self.down:
            raise ServiceUnavailable(f"drafter at {self.address} is unavailable", grpc.StatusCode.UNAVAILABLE)
        return Draft((1,), (), CallCost(0.0, 0.0))


def pool(n: int, **options) -> ReplicaPool[Client]:
    return ReplicaPool("drafter", [f"127.0.0.1:{9000 + i}" for i in range(n)], Client, **options)


def test_bounded_load_caps_how_many_active_sessions_one_replica_takes():
    async def run() -> Counter:
        p = pool(3, load_factor=1.25)
        for s in SESSIONS[:300]:
            await p.call(s, lambda c, s=s: c.propose(s))
        return Counter({a: len(r.active) for a, r in p.replicas.items()})

    loads = asyncio.run(run())
    assert sum(loads.values()) == 300
    assert max(loads.values()) <= 1.25 * 300 / 3 + 1, loads


def test_a_session_stays_on_its_replica_and_fails_over_down_its_order():
    async def run() -> None:
        p = pool(3)
        session = SESSIONS[7]
        first = await p.call(session, lambda c: c.propose(session))
        assert [await p.call(session, lambda c: c.propose(session)) for _ in range(5)][-1].cost.replicas == first.cost.replicas
        home = p.replicas[first.cost.replicas[0]]
        home.client.down = True
        moved = await p.call(session, lambda c: c.propose(session))
        assert moved.cost.failovers == 1 and moved.cost.replicas[0] != home.address
        assert not home.healthy
        assert moved.cost.replicas[0] == rendezvous(session, [a for a in p.replicas if a != home.address])[0]
        for r in p.replicas.values():
            r.client.down = True
        with pytest.raises(NoReplica) as err:
            await p.call(session, lambda c: c.propose(session))
        assert err.value.role == "drafter" and "is reachable" in str(err.value)

    asyncio.run(run())


def test_targets_and_cascade_levels_parse_and_bad_ones_are_named():
    assert parse_targets("a:1, dns:///drafter:50052 ,b:2") == ("a:1", "dns:///drafter:50052", "b:2")
    assert cascade_level("tli:d1:1+d2:1") == ("tli", ("d1:1", "d2:1"))
    assert cascade_level("d1:1+dns:///d:2") == ("native", ("d1:1", "dns:///d:2"))
    assert cascade_level("maxgram") == ("maxgram", ())
    base = {"SPECD_VERIFIER": "v:1,v2:1", "SPECD_TOKENIZER": "t"}
    assert OrchestratorConfig.from_env(base | {"SPECD_DRAFTER": "d:1,dns:///d:2,fr=f:1,fr=f:2"}, "").pools()[:2] == (
        ("v:1", "v2:1"), {"": ("d:1", "dns:///d:2"), "fr": ("f:1", "f:2")},
    )  # fmt: skip
    assert OrchestratorConfig.from_env(base | {"SPECD_HEAD": "h:1,fr=hf:1"}, "").head_pools() == {
        "": ("h:1",), "fr": ("hf:1",),
    }  # fmt: skip
    assert OrchestratorConfig.from_env(base, "").head_pools() == {}
    for bad, words in (("drafter", "not host:port"), ("d:port", "not host:port"), ("dns:///:5", "not host:port"),
                       ("d:1,FR=f:1", "language code"), ("fr=f:1", "default pool")):  # fmt: skip
        for variable in ("SPECD_DRAFTER", "SPECD_HEAD"):
            with pytest.raises(ConfigError, match=words) as err:
                OrchestratorConfig.from_env(base | {variable: bad}, "")
            assert variable in str(err.value) or "host:port" in words


def test_dns_targets_resolve_to_one_replica_per_address():
    async def run() -> set[str]:
        p = ReplicaPool("drafter", ["dns:///localhost:9"], Client, health_interval=0.1)
        await p.resolve()
        found = set(p.replicas)
        await p.close()
        return found

    found = asyncio.run(run())
    assert "127.0.0.1:9" in found and all(a.endswith(":9") for a in found)
