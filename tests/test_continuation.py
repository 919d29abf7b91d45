"""A drafter that goes on drafting after it answers (drafter_svc/continuation.py): the call it
drafted for gets exactly the draft it would get afresh - greedy and sampled, whether the
continuation is done, still drafting, cut short by another session's call, or shorter than
the call's k - and any other call cancels it. Then pipelined `sd` asking for continuations
on the drafter's own cores, greedy and sampled (chi-square); the Propose RPC's continue_k
over gRPC is in tests/test_strategies_services.py."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter

import pytest
import torch
from tables import TableRuntime
from test_acceptance import PASS, chi_square_pvalue, random_dist

from drafter_svc.continuation import Continuation
from drafter_svc.core import DrafterCore
from orchestrator.strategies import Backends, Lookahead, RoundInput, pipelined_sd_round
from services.context import ContextDelta, fingerprint
from services.errors import ContextMiss
from services.sampling import SamplingParams
from verifier_svc.core import VerifierCore

V = 7
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0)
CONTEXT = [1, 2, 3, 4, 5]


def table(seed: int, length: int = 60) -> torch.Tensor:
    return torch.stack([random_dist(seed * 100 + t, V).log() for t in range(length)])  # (L, V)


class Paced(TableRuntime):
    """A table runtime whose batched passes take `seconds` each."""

    def __init__(self, table: torch.Tensor, seconds: float) -> None:
        super().__init__(table)
        self.seconds = seconds

    def logits_batch(self, calls):
        time.sleep(self.seconds)
        return super().logits_batch(calls)


# ---------------------------------------------------------------- which call it serves


def test_a_continuation_serves_only_the_call_it_drafts_for() -> None:
    c = Continuation([1, 2, 3, 4], seed=9, params=GREEDY, cap=3, others_waiting=lambda: 0)

    def claim(base: list[int], new: list[int]) -> ContextDelta:
        return ContextDelta("s", len(base), fingerprint(base), tuple(new))

    cases = [
        ("the whole context", [1, 2, 3, 4], GREEDY, 9, True),
        ("a delta over a prefix", claim([1, 2], [3, 4]), GREEDY, 9, True),
        ("a delta adding nothing", claim([1, 2, 3, 4], []), GREEDY, 9, True),
        ("a delta of everything", ContextDelta("s", 0, 0, (1, 2, 3, 4)), GREEDY, 9, True),
        ("another seed", [1, 2, 3, 4], GREEDY, 8, False),
        ("other sampling", [1, 2, 3, 4], SAMPLED, 9, False),
        ("a shorter context", [1, 2, 3], GREEDY, 9, False),
        ("a longer context", [1, 2, 3, 4, 5], GREEDY, 9, False),
        ("other tokens after the base", claim([1, 2], [3, 5]), GREEDY, 9, False),
        ("a base of other tokens", claim([1, 7], [3, 4]), GREEDY, 9, False),
    ]
    for name, context, params, seed, serves in cases:
        assert c.serves(context, params, seed) is serves, name


def test_it_stops_at_its_cap_when_cancelled_and_for_other_calls() -> None:
    waiting = [0]
    c = Continuation([1], seed=0, params=GREEDY, cap=3, others_waiting=lambda: waiting[0])
    assert not c.stop(2) and not c.cut
    assert c.stop(3) and c.cut
    c.cut, c.cap = False, 5
    waiting[0] = 1
    assert c.stop(0) and c.cut
    c.cut, waiting[0] = False, 0
    c.cancel()
    assert c.stop(0) and c.cut


# ---------------------------------------------------------------- the draft it gives


def fresh(context: list[int], k: int, params: SamplingParams, seed: int, min_confidence: float = 0.0):
    """The draft a drafter that never continued gives for this call."""
    core = DrafterCore(TableRuntime(DRAFTER), q_top=V, min_confidence=min_confidence)
    return asyncio.run(core.propose("fresh", context, k, params, seed))


DRAFTER = table(3)


def same(got, want) -> None:
    assert got.tokens == want.tokens
    assert len(got.q) == len(want.q)
    for a, b in zip(got.q, want.q):
        assert torch.equal(a.ids, b.ids) and torch.allclose(a.probs, b.probs)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("when", ["done", "drafting", "cut short"])
@pytest.mark.parametrize("k", [2, 4, 7])
def test_the_call_it_drafted_for_gets_the_draft_it_would_get_afresh(params, when, k) -> None:
    """The first call (k 3) asks for a continuation of 4 tokens with seed 77; the next call
    names that context and seed and asks for k: fewer, as many, or more than the
    continuation has (then it is extended with its own generator). The continuation is done
    when the call comes, still drafting, or cut short by another session's call."""
    core = DrafterCore(Paced(DRAFTER, 0.01), q_top=V)

    async def run():
        first = await core.propose_and_continue("s", CONTEXT, 3, params, 5, 4, 77)
        c = core.continuations._by_session["s"]
        if when == "done":
            await asyncio.shield(c.task)
        elif when == "cut short":  # after its first pass (a call waiting before it would share its passes)
            await asyncio.sleep(0.015)
            other = asyncio.ensure_future(core.propose("other", [6, 6], 2, params, 1))
            await asyncio.shield(c.task)
            await other
            assert c.cut and len(c.task.result().tokens) < 4
        after = [*CONTEXT, *first.tokens]
        claim = ContextDelta("s", len(CONTEXT), fingerprint(CONTEXT), tuple(first.tokens))
        got = await core.propose("s", claim, k, params, 77)
        return first, after, got, len(c.task.result().tokens)

    first, after, got, drafted = asyncio.run(run())
    same(first, fresh(CONTEXT, 3, params, 5))
    same(got, fresh(after, k, params, 77))
    assert got.continued and not first.continued
    assert core.continuations.used == 1 and core.continuations.cancelled == 0
    assert core.continuations.extended == (drafted < k)  # its tokens, then the ones it lacked


def test_a_continuation_that_ends_at_low_confidence_answers_as_a_fresh_draft_does() -> None:
    """With a confidence floor, a draft can end before its k; the continuation ends there too
    (not cut short), and the call for more gets that shorter draft, as afresh."""
    floor = 0.4
    core = DrafterCore(TableRuntime(DRAFTER), q_top=V, min_confidence=floor)

    async def run():
        first = await core.propose_and_continue("s", CONTEXT, 1, SAMPLED, 5, 20, 77)
        c = core.continuations._by_session["s"]
        await asyncio.shield(c.task)
        return first, c, await core.propose("s", [*CONTEXT, *first.tokens], 20, SAMPLED, 77)

    first, c, got = asyncio.run(run())
    want = fresh([*CONTEXT, *first.tokens], 20, SAMPLED, 77, floor)
    assert len(want.tokens) < 20, "the table never fell below the floor: pick another"
    assert not c.cut
    same(got, want)
    assert core.continuations.used == 1 and core.continuations.extended == 0


def test_any_other_call_of_the_session_cancels_it() -> None:
    """A call with another seed is drafted afresh; the continuation stops before its next
    token, and a later call with its seed does not find it."""
    core = DrafterCore(Paced(DRAFTER, 0.01), q_top=V)

    async def run():
        first = await core.propose_and_continue("s", CONTEXT, 2, SAMPLED, 5, 30, 77)
        c = core.continuations._by_session["s"]
        after = [*CONTEXT, *first.tokens]
        got = await core.propose("s", after, 3, SAMPLED, 78)
        drafted = await asyncio.shield(c.task)
        again = await core.propose("s", after, 3, SAMPLED, 77)
        return after, got, c, drafted, again

    after, got, c, drafted, again = asyncio.run(run())
    same(got, fresh(after, 3, SAMPLED, 78))
    same(again, fresh(after, 3, SAMPLED, 77))
    assert c.cut and len(drafted.tokens) < 30
    assert core.continuations.cancelled == 1 and core.continuations.used == 0


def test_a_released_session_cancels_its_continuation() -> None:
    """Released before or while it drafts: it stops (or misses the context it claimed, which
    the release forgot), and nothing of it is kept."""
    core = DrafterCore(Paced(DRAFTER, 0.01), q_top=V)

    async def run():
        await core.propose_and_continue("s", CONTEXT, 2, GREEDY, 5, 30, 77)
        c = core.continuations._by_session["s"]
        await core.release("s")
        try:
            return c, len((await asyncio.shield(c.task)).tokens)
        except ContextMiss:
            return c, 0

    c, drafted = asyncio.run(run())
    assert drafted < 30 and "s" not in core.continuations._by_session
    assert core.continuations.cancelled == 1


# ---------------------------------------------------------------- pipelined sd asks for it


def pipelined(backends: Backends, rounds: int, k: int, params: SamplingParams, seed: int = 0, own_cores: bool = True):
    """Rounds of `sd-pipe` asking for k tokens, as the Engine runs them (`own_cores`: with the
    drafter on cores of its own): the tokens and the turn's Lookahead."""

    async def run():
        ahead, out = Lookahead(), []
        try:
            for step in range(rounds):
                r = RoundInput("s", CONTEXT + out, params, seed, step, k, max_draft=40 - len(out),
                               lookahead=ahead, plain_ahead=own_cores)  # fmt: skip
                out += (await pipelined_sd_round(backends, r)).tokens
        finally:
            await ahead.close()
        return out, ahead

    return asyncio.run(run())


@pytest.mark.parametrize(
    "own_cores, drafter_pass, verifier_pass, continues",
    [(True, 0.03, 0.005, True), (False, 0.03, 0.005, False), (True, 0.001, 0.03, False)],
    ids=["drafter slower", "shared cores", "verifier slower"],
)
def test_pipelined_sd_has_a_slower_drafter_on_cores_of_its_own_go_on_after_its_drafts(
    own_cores, drafter_pass, verifier_pass, continues
) -> None:
    """Greedy, with a drafter that is the target (every draft accepted, every guess right):
    where the drafter is the slower service and has cores of its own, drafts ahead ask it to
    go on, and the next round's draft comes from that continuation; on shared cores (it would
    take the verifier's), or where the verifier is the slower, they do not. The output is
    the target's argmax either way."""
    target = table(5)
    drafter = DrafterCore(Paced(target, drafter_pass), q_top=V)
    backends = Backends(VerifierCore(Paced(target, verifier_pass)), drafter)
    out, ahead = pipelined(backends, 6, 3, GREEDY, own_cores=own_cores)
    assert out == target.argmax(-1).tolist()[len(CONTEXT) - 1 : len(CONTEXT) - 1 + len(out)]
    assert ahead.drafter_slower is (drafter_pass > verifier_pass)
    if continues:
        assert drafter.continuations.used >= 3, vars(drafter.continuations)
        assert ahead.continued == drafter.continuations.used  # each used as the next round's draft
    else:
        assert drafter.continuations.started == 0 and ahead.continued == 0


@pytest.mark.parametrize(
    "continued, verify_trip, arrived_ready, overlapped",
    [(True, True, False, 1), (False, True, False, 0), (True, False, False, 0), (True, True, True, 0)],
    ids=["overlapped", "not a continuation", "no trip", "draft was ready"],
)
def test_a_verify_trip_counts_as_overlapped_only_where_a_continuation_drafted_through_it(
    continued, verify_trip, arrived_ready, overlapped
) -> None:
    """The last round waited for its verify's round trip and then for this draft, which the
    drafter had drafted going on since its previous answer: that trip delayed nothing."""
    from services.roles import CallCost, Draft

    async def run() -> Lookahead:
        ahead = Lookahead(verify_ahead=False)

        async def draft() -> Draft:
            return Draft((4, 5, 6), (), CallCost(0.1, 0.1), continued=continued)

        ahead.start([1, 2, 3], draft())
        ahead.verify_trip, ahead.arrived_ready = verify_trip, arrived_ready
        assert await ahead.take([1, 2, 3, 4], 2, 8) is not None
        return ahead

    ahead = asyncio.run(run())
    assert (ahead.continued, ahead.overlapped) == (int(continued), overlapped)


def test_pipelined_sd_with_continuations_samples_the_targets_distribution() -> None:
    """Sampled, drafts of one token with the drafter going on after each draft ahead:
    the first three tokens of 3,000 runs follow p_1 x p_2 x p_3 (chi-square), and drafts
    came from continuations."""
    target = table(1)
    drafter = DrafterCore(TableRuntime(0.3 * table(2) + 0.7 * target), q_top=V)
    backends = Backends(VerifierCore(TableRuntime(target)), drafter)
    n_out, runs = 3, 3000

    async def decode(seed: int) -> tuple[int, ...]:
        ahead, out, step = Lookahead(), [], 0
        try:
            while len(out) < n_out:
                r = RoundInput("s", CONTEXT + out, SAMPLED, seed, step, 1, lookahead=ahead, plain_ahead=True)
                ahead.drafter_slower = True  # whatever the table's passes cost
                out += (await pipelined_sd_round(backends, r)).tokens
                step += 1
        finally:
            await ahead.close()
        return tuple(out[:n_out])

    async def all_runs() -> Counter:
        return Counter([await decode(s) for s in range(runs)])

    counts = asyncio.run(all_runs())
    p = target[len(CONTEXT) - 1 :].softmax(-1)  # (.., V): p of output token i is row i
    expected = {
        cell: math.prod(float(p[i, t]) for i, t in enumerate(cell)) for cell in itertools.product(range(V), repeat=n_out)
    }
    assert chi_square_pvalue(counts, expected, runs) > PASS
    assert drafter.continuations.used > 0, vars(drafter.continuations)
