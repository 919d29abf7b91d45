"""Strategies: how one round of decoding turns a context into committed tokens.

Each strategy is one async function over the Drafter/Verifier Protocols: draft, verify,
accept. Every one is lossless: greedy output is the target's own greedy output, sampled
output follows the target's distribution (the acceptance rule in services/acceptance.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from orchestrator.backends import CallCost, Drafter, Verifier
from services.sampling import SamplingParams, round_seed


@dataclass(frozen=True)
class Backends:
    verifier: Verifier
    drafter: Drafter | None = None


@dataclass(frozen=True)
class RoundInput:
    session_id: str
    context: Sequence[int]  # committed tokens, prompt included
    params: SamplingParams
    seed: int  # the session's seed
    step: int  # rounds run so far in this session: with seed, it fixes the round's draws
    k: int  # draft length


@dataclass(frozen=True)
class RoundResult:
    tokens: tuple[int, ...]  # to commit: n accepted + one recovered or bonus token
    drafted: int  # k actually drafted
    accepted: int  # n
    draft_cost: CallCost | None
    verify_cost: CallCost


async def ar_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Plain autoregressive decoding: a verify with an empty draft yields one token from p."""
    v = await backends.verifier.verify(r.session_id, r.context, (), (), r.params, round_seed(r.seed, r.step, "verify"))
    return RoundResult(v.tokens, 0, 0, None, v.cost)


async def sd_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
    Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative
    Sampling"): the drafter proposes k tokens, the target verifies them in one pass.
    """
    if r.k == 0:
        return await ar_round(backends, r)
    assert backends.drafter is not None, "sd needs a drafter"
    d = await backends.drafter.propose(r.session_id, r.context, r.k, r.params, round_seed(r.seed, r.step, "draft"))
    v = await backends.verifier.verify(
        r.session_id, r.context, d.tokens, d.q, r.params, round_seed(r.seed, r.step, "verify")
    )
    return RoundResult(v.tokens, len(d.tokens), v.accepted, d.cost, v.cost)


Strategy = Callable[[Backends, RoundInput], Awaitable[RoundResult]]

# name -> (round function, needs a drafter)
STRATEGIES: dict[str, tuple[Strategy, bool]] = {
    "ar": (ar_round, False),
    "sd": (sd_round, True),
}
