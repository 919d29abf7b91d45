"""What a drafter or verifier call returns, wherever it ran: the typed results that the
model services' cores produce and the orchestrator's strategies consume.

The same dataclasses come back from a core called in this process (tests, the bench's
in-process path) and from the gRPC clients (orchestrator/backends.py), so a strategy never
knows which one it talks to.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from services.sampling import SparseDist
from services.slrs import StringProposal
from services.tree import Tree


@dataclass(frozen=True)
class CallCost:
    """Where one call's time went, for the per-round time split."""

    compute_seconds: float  # inside the model service
    wall_seconds: float  # as seen by the caller
    bytes_sent: int = 0
    bytes_received: int = 0
    replicas: tuple[str, ...] = ()  # the service replica(s) that answered (orchestrator/pool.py)
    failovers: int = 0  # replicas that failed before one answered
    # The batched pass the call ran in (services/calls.py): sessions, and tokens fed in all
    # (0: not known, or not a batched call)
    batch_sessions: int = 1
    batch_tokens: int = 0
    # Network round trips the round using this result sent and then waited for: 1 for a call
    # to a model service, 0 for one made in this process or sent before its round began (a
    # pipelined round's draft and verify sent ahead: their trips overlapped earlier work)
    round_trips: int = 1

    @property
    def network_seconds(self) -> float:
        """Transport, serialisation and queueing: what the caller waited beyond the compute."""
        return max(0.0, self.wall_seconds - self.compute_seconds)

    def sent_before_its_round(self) -> CallCost:
        """This call, used by a round that began after it was sent: no round trip of the round's own."""
        return replace(self, round_trips=0)


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
        replicas=tuple(dict.fromkeys(r for c in costs for r in c.replicas)),
        failovers=sum(c.failovers for c in costs),
        round_trips=sum(c.round_trips for c in costs),
    )


class Stopwatch:
    """Seconds since it was made: the one timer of a call (`Stopwatch().seconds`)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def local_cost(self) -> CallCost:
        """The cost of a call that ran in this process: its wall time is its compute time."""
        elapsed = self.seconds
        return CallCost(elapsed, elapsed, round_trips=0)


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]  # d_1..d_k
    q: tuple[SparseDist, ...]  # empty = point masses
    cost: CallCost
    continued: bool = False  # drafted by the drafter going on after its last answer (drafter_svc/continuation.py)


@dataclass(frozen=True)
class Reviewed:
    """A middle level's review of a smaller level's draft (drafter_svc/draft.review)."""

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
class StringsDraft:
    proposals: tuple[StringProposal, ...]
    cost: CallCost


@dataclass(frozen=True)
class Verified:
    accepted: int  # n
    tokens: tuple[int, ...]  # d_1..d_n + recovered or bonus token
    cost: CallCost
    verified: int = -1  # verify_strings: drafted strings checked (-1: the whole draft)
    tree_nodes: int = 0  # verify_strings: nodes of the tree pass
    # verify_tree(want_hidden=True): (H,) the target's hidden state whose output is tokens[-1]
    hidden: torch.Tensor | None = field(default=None, compare=False)
    # verify_ahead(or_plain=True) whose claim missed: (length, fingerprint) of the context its
    # plain step ran after instead
    plain_after: tuple[int, int] | None = None
