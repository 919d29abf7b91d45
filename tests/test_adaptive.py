"""Adaptive draft length (orchestrator/adaptive.py) and pipelined `sd` (orchestrator/strategies.py)
in this process: the choice of k from measured acceptance and cost, and statistical tests that
sampled output stays distributed exactly as the target's p when k changes with what earlier
rounds measured and when drafts are begun speculatively during a verify.

Greedy equality with `ar` over real processes is in tests/test_strategies_services.py.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from dataclasses import replace

import pytest
import torch
from tables import TableRuntime
from test_acceptance import PASS, chi_square_pvalue, random_dist

from drafter_svc.core import DrafterCore
from orchestrator.adaptive import (
    EXPLORE_EVERY,
    PROBE_EVERY,
    START,
    TIMING_CLAIM_S,
    Acceptance,
    Choice,
    DraftLength,
    PassLoad,
    PooledAcceptance,
    RoundCosts,
    TreeWidth,
    expected_tokens,
    load_level,
)
from orchestrator.strategies import (
    DEFAULT_TREE,
    STRATEGIES,
    Backends,
    Lookahead,
    RoundInput,
    pipelined_sd_round,
    sized,
)
from services.context import fingerprint
from services.roles import CallCost, Verified
from services.sampling import SamplingParams
from services.tree import TreeShape
from verifier_svc.core import VerifierCore

# ---------------------------------------------------------------- the estimates


def test_expected_tokens_is_leviathans_formula_for_a_constant_rate() -> None:
    alpha, k = 0.7, 5
    assert expected_tokens([alpha] * k, k) == pytest.approx((1 - alpha ** (k + 1)) / (1 - alpha))
    assert expected_tokens([0.9, 0.5], 0) == 1.0
    assert expected_tokens([0.9, 0.5], 2) == pytest.approx(1 + 0.9 + 0.45)


def test_acceptance_counts_only_the_positions_a_round_reached() -> None:
    a = Acceptance()
    a.observe(drafted=4, accepted=1, decay=1.0)  # position 1 accepted, 2 rejected, 3 and 4 never judged
    a.observe(drafted=2, accepted=2, decay=1.0)
    assert a.reached == [2.0, 2.0] and a.accepted == [2.0, 1.0]
    assert Acceptance.from_json(a.to_json()) == a
    assert Acceptance.from_json(None) == Acceptance()


def test_a_sessions_rates_move_from_the_prior_to_what_it_measured() -> None:
    prior = PooledAcceptance()
    session = Acceptance()
    assert session.rates(2, prior)[0] == pytest.approx(prior.rates(1)[0])
    for _ in range(30):
        session.observe(drafted=1, accepted=1)
    assert session.rates(1, prior)[0] > 0.85  # about ten rounds of memory against the prior's three


def test_pooled_rates_fall_off_past_the_last_measured_position() -> None:
    pooled = PooledAcceptance()
    for _ in range(20):
        pooled.observe(drafted=2, accepted=2)
    rates = pooled.rates(5)
    assert rates[0] > 0.9 and rates[1] > 0.9
    assert rates[2] < rates[1] and rates[3] < rates[2]


def test_round_costs_interpolate_and_extrapolate_by_the_measured_slope() -> None:
    costs = RoundCosts()
    costs.observe(2, 1.2)
    costs.observe(4, 1.4)
    assert costs.seconds(3) == pytest.approx(1.3)
    assert costs.seconds(8) == pytest.approx(1.8)
    assert costs.seconds(0) == pytest.approx(1.0)


# ---------------------------------------------------------------- the choice


def measured(per_token: float, verify: float = 1.0, alpha: float | None = None, k_max: int = 12) -> DraftLength:
    """A DraftLength that has timed every length (a round costs verify + per_token * k) and,
    given alpha, seen drafts accepted at that rate."""
    lengths = DraftLength(k_max)
    for _ in range(3):
        for k in range(k_max + 1):
            lengths.costs.observe(k, verify + per_token * k)
    if alpha is not None:
        lengths.pooled = PooledAcceptance([100.0] * k_max, [100.0 * alpha] * k_max)
    return lengths


def test_the_first_rounds_time_each_start_length_plain_decoding_included() -> None:
    lengths = DraftLength()
    chosen = []
    for step in range(len(START)):
        k = lengths.choose(Acceptance(), step=step, limit=20).k
        chosen.append(k)
        lengths.observe(Acceptance(), k, k, k, 1.0 + 0.1 * k)
    assert chosen == list(START) and 0 in chosen
    assert lengths.choose(Acceptance(), step=0, limit=1).k == 1  # never past the room left
    # A round with room for one token does not time 4 or 2 as a capped 1: it times 0, and
    # then decodes plainly until rounds with room have timed a second length.
    short = DraftLength()
    assert [short.choose(Acceptance(), step=0, limit=1).k for _ in range(2)] == [0, 0]
    short.observe(Acceptance(), 0, 0, 0, 1.0)
    assert short.costs.measured == [0] and short.choose(Acceptance(), step=1, limit=1).k == 0


def test_sessions_starting_together_time_each_start_length_once(monkeypatch) -> None:
    """One round at a time times a START length; the rounds that start meanwhile decode
    plainly, instead of all drafting the first length before any was timed. A length whose
    round never reported back (it failed) is free again after TIMING_CLAIM_S."""
    lengths = DraftLength()
    together = [lengths.choose(Acceptance(), step=0, limit=20).k for _ in range(2 * len(START))]
    assert together == [*START] + [0] * len(START)
    lengths.observe(Acceptance(), 2, 2, 1, 1.2)
    lengths.observe(Acceptance(), 0, 0, 0, 1.0)
    assert lengths.costs.measured == [0, 2]
    assert lengths.choose(Acceptance(), step=1, limit=20).k != 4  # still claimed by its round
    later = time.monotonic() + TIMING_CLAIM_S + 1.0
    monkeypatch.setattr("orchestrator.adaptive.time.monotonic", lambda: later)
    assert lengths.choose(Acceptance(), step=1, limit=20).k == 4


def test_a_turn_with_a_first_round_untimed_times_it_again() -> None:
    lengths = DraftLength()
    lengths.observe(Acceptance(), START[0], START[0], 1, None)  # a first round: it prefilled
    assert lengths.costs.measured == []
    assert lengths.choose(Acceptance(), step=1, limit=20).k == START[0]
    # A turn's first round cannot time a length: it drafts the first one untimed and claims nothing.
    fresh = DraftLength()
    assert fresh.choose(Acceptance(), step=0, limit=20, timed=False).k == START[0] and not fresh.timing
    assert fresh.choose(Acceptance(), step=0, limit=2, timed=False).k == 2


def test_plain_decoding_when_no_draft_pays_for_itself() -> None:
    lengths = measured(per_token=0.5, alpha=0.2)
    assert lengths.choose(Acceptance(), step=0, limit=20).k == 0


def test_long_drafts_when_the_drafter_is_cheap_and_right() -> None:
    lengths = measured(per_token=0.02, alpha=0.95)
    assert lengths.choose(Acceptance(), step=0, limit=20).k >= 8
    assert lengths.choose(Acceptance(), step=0, limit=3).k == 3


def test_the_choice_follows_the_sessions_own_acceptance() -> None:
    lengths = measured(per_token=0.2, alpha=0.6)
    predictable, hard = Acceptance(), Acceptance()
    for _ in range(30):
        predictable.observe(drafted=8, accepted=8)
        hard.observe(drafted=2, accepted=0)
    assert lengths.choose(predictable, step=0, limit=20).k > lengths.choose(hard, step=0, limit=20).k == 0


def loaded(lengths: DraftLength, sessions: int, per_token: float, keep_costs: bool = True) -> DraftLength:
    """Rounds whose verify passes were shared by `sessions` sessions, each fed token adding
    per_token seconds to a pass (fixed part 0.1 s), fed 16 to 80 tokens; the round costs
    `lengths` had are taken as measured at that load too, unless not `keep_costs`."""
    alone = lengths.costs
    for i in range(40):
        tokens = 16 + 8 * (i % 9)
        cost = CallCost(0.1 + per_token * tokens, 0.2 + per_token * tokens, batch_sessions=sessions, batch_tokens=tokens)
        lengths.observe(Acceptance(), 0, 0, 0, None, cost)
    if keep_costs:  # the rounds timed alone cost the same here
        lengths.costs_at[load_level(lengths.load.batch)] = alone
    return lengths


def test_the_pass_load_is_the_sessions_per_pass_and_the_cost_of_a_token() -> None:
    load = loaded(DraftLength(), sessions=16, per_token=0.03).load
    assert load.per_token == pytest.approx(0.03, rel=1e-6)
    assert load.others_cost(4) == pytest.approx(15 * 0.03 * 4, rel=1e-6)
    same = PassLoad()
    for _ in range(5):  # passes of one size: no slope, the mean cost of a token
        same.observe(4, 20, 0.5)
    assert same.per_token == pytest.approx(0.025) and PassLoad().others_cost(4) == 0.0


def test_drafts_shrink_as_the_verifiers_batch_fills_and_stop_when_they_no_longer_pay() -> None:
    """The same session, drafting 0.6 s + 0.05 s a token at acceptance 0.8: alone it drafts;
    with 4 sessions a pass it drafts less; with 16 sessions on a compute-bound pass, nothing."""

    def choice(sessions: int, per_token: float) -> Choice:
        lengths = loaded(measured(per_token=0.05, verify=0.6, alpha=0.8), sessions, per_token)
        return lengths.choose(Acceptance(), step=0, limit=20)

    alone, four, sixteen = choice(1, 0.01), choice(4, 0.01), choice(16, 0.03)
    assert alone.k > four.k > sixteen.k == 0, (alone, four, sixteen)
    # Under that load no draft at all: not even the tokens a strategy drafts for free besides k.
    assert sixteen.plain and not four.plain and not alone.plain


def test_under_load_a_plainly_decoding_session_probes_less_often() -> None:
    """A probe's draft costs the other sessions too: with 4 sessions a pass, a session probes
    after 4 x PROBE_EVERY plain rounds, not PROBE_EVERY."""
    lengths = loaded(measured(per_token=0.5, alpha=0.2), sessions=4, per_token=0.01)
    assert lengths.choose(Acceptance(), step=0, limit=20, ar_streak=PROBE_EVERY).k == 0
    assert lengths.choose(Acceptance(), step=0, limit=20, ar_streak=4 * PROBE_EVERY).k > 0


def test_a_load_that_just_rose_counts_before_the_passes_show_it() -> None:
    """Sixteen turns streaming at once, the passes measured still those of one session: the
    round is priced at sixteen sessions a pass (on shared cores: no draft at all)."""
    lengths = measured(per_token=0.02, alpha=0.95)
    assert lengths.choose(Acceptance(), step=0, limit=20, streams=1).k >= 8
    assert load_level(lengths.load.batch) == 0
    lengths.choose(Acceptance(), step=0, limit=20, streams=16)
    assert load_level(lengths.load.batch) == 4
    shared = measured(per_token=0.02, alpha=0.95)
    shared.own_cores = False
    assert shared.choose(Acceptance(), step=0, limit=20, streams=16).plain


def test_round_costs_are_timed_apart_at_each_load() -> None:
    """Timed alone, long drafts pay. At sixteen sessions a pass what rounds cost alone does
    not count: the START lengths are timed again (one round at a time), and what they cost
    there - a drafter busy with the others - decides; alone again, the alone costs hold."""
    lengths = measured(per_token=0.02, alpha=0.95)
    assert lengths.choose(Acceptance(), step=0, limit=20).k >= 8
    busy = loaded(lengths, sessions=16, per_token=0.001, keep_costs=False)
    assert load_level(busy.load.batch) == 4 and busy.costs.measured == []
    for k, seconds in ((4, 5.0), (2, 4.0), (0, 0.5)):
        assert busy.choose(Acceptance(), step=0, limit=20).k == k
        busy.observe(Acceptance(), k, k, k, seconds)
    assert busy.choose(Acceptance(), step=0, limit=20).k == 0
    busy.load = PassLoad()  # alone again
    assert busy.choose(Acceptance(), step=0, limit=20).k >= 8


def test_no_probe_while_even_a_draft_accepted_whole_would_not_pay() -> None:
    """16 sessions a pass, each fed token adding 0.06 s to it: a round drafting k costs the
    others 0.9 s a token, more than what any k accepted tokens give back, so however long a
    session has decoded plainly it does not probe; alone the same session does."""
    busy = loaded(measured(per_token=0.05, verify=0.6, alpha=0.8), sessions=16, per_token=0.06)
    assert busy.choose(Acceptance(), step=0, limit=20, ar_streak=10_000).k == 0
    alone = loaded(measured(per_token=0.5, alpha=0.2), sessions=1, per_token=0.06)
    assert alone.choose(Acceptance(), step=0, limit=20, ar_streak=PROBE_EVERY).k >= 1
    # Alone a probe also re-times a length whose first timing may have been a one-off (the
    # drafter prefilling the prompt): even where a whole draft would not pay by that timing.
    dear = measured(per_token=2.0, alpha=0.2)
    assert not dear._whole_pays(dear.costs, 20, 1.0)
    assert dear.choose(Acceptance(), step=0, limit=20, ar_streak=PROBE_EVERY).k >= 1


def test_on_cores_shared_with_the_drafter_no_round_drafts_once_passes_are_shared() -> None:
    """The same drafts that pay under a light load on cores of their own: on shared cores
    alone they still draft (drafter and verifier take turns), at two sessions a pass no round
    drafts - not a START length, not a probe."""

    def lengths(sessions: int, own_cores: bool) -> DraftLength:
        fresh = DraftLength(own_cores=own_cores)
        return loaded(fresh, sessions, per_token=0.001) if sessions > 1 else fresh

    assert lengths(1, own_cores=False).choose(Acceptance(), step=0, limit=20).k == START[0]
    assert lengths(2, own_cores=True).choose(Acceptance(), step=0, limit=20).k == START[0]
    shared = lengths(2, own_cores=False)
    choice = shared.choose(Acceptance(), step=0, limit=20, ar_streak=10_000)
    assert choice.k == 0 and choice.plain
    timed = measured(per_token=0.02, alpha=0.95)
    timed.own_cores = False
    assert timed.choose(Acceptance(), step=0, limit=20).k >= 8  # alone: as on cores of its own
    assert loaded(timed, 2, per_token=0.001).choose(Acceptance(), step=0, limit=20).plain


def test_a_session_decoding_plainly_probes_again() -> None:
    lengths = measured(per_token=0.5, alpha=0.2)
    assert lengths.choose(Acceptance(), step=0, limit=20, ar_streak=PROBE_EVERY - 1).k == 0
    assert lengths.choose(Acceptance(), step=0, limit=20, ar_streak=PROBE_EVERY).k >= 1


def test_every_tenth_round_explores_a_neighbour_longer_then_shorter() -> None:
    lengths = measured(per_token=0.1, alpha=0.6)
    best = lengths.choose(Acceptance(), step=0, limit=20).k
    assert best >= 1
    assert lengths.choose(Acceptance(), step=EXPLORE_EVERY - 1, limit=20).k == best + 1
    assert lengths.choose(Acceptance(), step=2 * EXPLORE_EVERY - 1, limit=20).k == best - 1


def test_observe_keys_the_cost_by_the_length_the_round_had() -> None:
    lengths = DraftLength()
    session = Acceptance()
    lengths.observe(session, k=6, drafted=3, accepted=3, seconds=2.0)  # the drafter stopped early
    assert lengths.costs.measured == [3]
    assert session.reached == [1.0, 1.0, 1.0]
    lengths.observe(session, k=5, drafted=0, accepted=0, seconds=1.0)  # lookup found no repeat: a plain round
    lengths.observe(session, k=4, drafted=6, accepted=2, seconds=1.5)  # cascade: 4 of the drafter's, 2 max-gram
    assert lengths.costs.measured == [0, 3, 4]


def widths(tree: tuple[float, float], chain: tuple[float, float], k_max: int = 12) -> TreeWidth:
    """A TreeWidth whose shapes have timed every length and seen drafts accepted: each
    (seconds per draft token, acceptance rate)."""
    w = TreeWidth(k_max)
    for lengths, (per_token, alpha) in ((w.tree, tree), (w.chain, chain)):
        for _ in range(3):
            for k in range(k_max + 1):
                lengths.costs.observe(k, 1.0 + per_token * k)
        lengths.pooled = PooledAcceptance([100.0] * k_max, [100.0 * alpha] * k_max)
    return w


def test_a_tree_where_its_extra_candidates_pay_and_a_chain_where_they_do_not() -> None:
    # Nodes cost a tree three times what a chain's cost; acceptance decides
    much_better = widths(tree=(0.3, 0.9), chain=(0.1, 0.5)).choose(Acceptance(), step=0, limit=20)
    assert not much_better.chain and much_better.k >= 1
    little_better = widths(tree=(0.3, 0.6), chain=(0.1, 0.55)).choose(Acceptance(), step=0, limit=20)
    assert little_better.chain and little_better.k >= 1
    # Neither pays: plain decoding, whichever shape
    assert widths(tree=(0.5, 0.2), chain=(0.5, 0.2)).choose(Acceptance(), step=0, limit=20).k == 0


def test_every_tenth_round_drafts_the_shape_not_chosen() -> None:
    w = widths(tree=(0.3, 0.6), chain=(0.1, 0.55))
    assert [w.choose(Acceptance(), step=s, limit=20).chain for s in range(EXPLORE_EVERY)] == [
        s != EXPLORE_EVERY // 2 for s in range(EXPLORE_EVERY)
    ]
    # A tree that would not draft at all is explored at the chain's length
    w = widths(tree=(2.0, 0.3), chain=(0.1, 0.6))
    assert w.tree.choose(Acceptance(), step=0, limit=20).k == 0
    chain = w.choose(Acceptance(), step=0, limit=20)
    explored = w.choose(Acceptance(), step=EXPLORE_EVERY // 2, limit=20)
    assert chain.chain and not explored.chain and explored.k == chain.k >= 1


def test_the_first_rounds_time_the_trees_lengths_then_the_chains() -> None:
    w, session, chosen = TreeWidth(), Acceptance(), []
    for step in range(2 * len(START) - 1):
        choice = w.choose(session, step=step, limit=20)
        chosen.append((choice.k, choice.chain))
        first_path = None if choice.chain or not choice.k else (choice.k, 0)
        w.observe(session, choice.k, choice.k, 0, 1.0 + 0.1 * choice.k, first_path=first_path)
    # A plain round times T(0) for both shapes
    assert chosen == [(4, False), (2, False), (0, False), (4, True), (2, True)]
    assert w.tree.costs.measured == w.chain.costs.measured == [0, 2, 4]


def test_a_tree_round_measures_the_chain_of_its_first_candidates_too() -> None:
    w, session = TreeWidth(), Acceptance()
    w.observe(session, k=3, drafted=3, accepted=2, seconds=1.3, first_path=(3, 1))  # a tree
    assert (session.reached, session.accepted) == ([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    assert session.chain == Acceptance([1.0, 1.0], [1.0, 0.0])  # its first path: one accepted
    assert w.chain.pooled.reached == [1.0, 1.0]
    assert w.tree.costs.measured == [3] and w.chain.costs.measured == []
    w.observe(session, k=2, drafted=2, accepted=2, seconds=1.1)  # a chain
    assert session.chain.reached == [0.9 + 1.0, 0.9 + 1.0] and session.reached == [1.0, 1.0, 1.0]
    assert w.tree.costs.measured == [3] and w.chain.costs.measured == [2]
    assert Acceptance.from_json(session.to_json()) == session  # kept in Redis with the session's
    assert Acceptance.from_json([[1.0], [0.0]]) == Acceptance([1.0], [0.0])  # stored before chains were


def test_sized_sets_each_strategys_own_draft_length() -> None:
    r = RoundInput("s", [1, 2], SamplingParams(), 0, 0, 4, k_matrix=((4, 2), (0, 3)))
    assert sized("sd", r, 7).k == 7
    assert sized("cascade", r, 6).k_matrix == ((6, 2), (0, 3))
    assert sized("cascade", r, 0).k_matrix == ((0, 2), (0, 3))  # max-gram's tokens, nearly free alone
    assert sized("cascade", r, 0, plain=True).k_matrix == ((0, 0), (0, 3))  # none under load
    assert sized("staged", r, 2).tree == TreeShape(DEFAULT_TREE.branching[:2], DEFAULT_TREE.budget)
    deep = sized("staged", r, 7).tree
    assert deep.branching == (*DEFAULT_TREE.branching, 1, 1) and deep.budget == DEFAULT_TREE.budget + 2
    assert sized("staged", r, 3, chain=True).tree == TreeShape((1, 1, 1), 3)
    assert sized("staged", r, 0, chain=True).tree.branching == ()  # plain decoding
    assert sized("sd", RoundInput("s", [1], SamplingParams(), 0, 0, 4, max_draft=3), 9).k == 3


# ---------------------------------------------------------------- statistics

V = 5
CONTEXT = [0, 1, 2, 3, 0, 1]
PARAMS = SamplingParams(temperature=1.0)
N_RUNS = 3000


def table(seed: int, length: int = 40) -> torch.Tensor:
    return torch.stack([random_dist(seed * 100 + t, V).log() for t in range(length)])  # (L, V)


async def decode(backends: Backends, strategy: str, n: int, seed: int, lengths: DraftLength | TreeWidth | None,
                 lookahead: Lookahead, chosen: set, per_token: float = 0.4, plain_ahead: bool = False) -> list[int]:  # fmt: skip
    """Rounds as the Engine runs them: with `lengths`, each round's k (and a tree's width)
    chosen from earlier rounds (a round's cost made up as 1 + per_token k seconds, so the
    choice moves with acceptance; a tree's 0.6 s more for fifty runs, then a chain's, and so
    on), and a pipelined strategy's plain round drafting ahead as the Engine's on cores of
    the drafter's own (`plain_ahead`: and each round's speculation, where it fails, answered
    by the plain step sent ahead, as there)."""
    round_fn = STRATEGIES[strategy].run
    session = Acceptance()
    out: list[int] = []
    step = streak = 0
    try:
        while len(out) < n:
            # Short drafts, so that the first tokens often come from a round after a speculative draft.
            r = RoundInput("s", CONTEXT + out, PARAMS, seed, step, 1, lookahead=lookahead, plain_ahead=plain_ahead)
            chain = False
            if lengths is not None:
                choice = lengths.choose(session, step, lengths.k_max, streak)
                r, chain = sized(strategy, r, choice.k, chain=choice.chain), choice.chain and choice.k > 0
                if STRATEGIES[strategy].pipelined and r.k == 0:
                    r = replace(r, ahead_k=choice.ahead)
            chosen.add((r.k, chain) if isinstance(lengths, TreeWidth) else r.k)
            result = await round_fn(backends, r)
            if lengths is not None:
                dearer = 0.6 if isinstance(lengths, TreeWidth) and r.k and chain == bool(seed // 50 % 2) else 0.0
                lengths.observe(session, r.k, result.drafted, result.accepted, 1.0 + per_token * r.k + dearer,
                                first_path=result.first_path)  # fmt: skip
            streak = 0 if r.k or result.drafted else streak + 1
            out += result.tokens
            step += 1
    finally:
        await lookahead.close()
    return out[:n]


def pvalue(
    strategy: str, n_out: int, k_max: int | None, per_token: float = 0.4, plain_ahead: bool = False
) -> tuple[float, set[int], Lookahead]:
    """How likely the first n_out tokens of N_RUNS runs are under p_1 x ... x p_n_out (adaptive
    up to k_max, else k = 1; a draft token costing per_token of a round; `plain_ahead` as
    `decode`); the draft lengths the runs chose; what the pipelined runs' speculation did."""
    target = table(1)
    drafter = table(2)
    drafter = 0.3 * drafter + 0.7 * target  # a drafter that is often right: long drafts pay
    backends = Backends(VerifierCore(TableRuntime(target)), DrafterCore(TableRuntime(drafter), q_top=V))
    lengths = (TreeWidth if strategy == "staged" else DraftLength)(k_max) if k_max else None
    seen: set = set()
    spec = Lookahead()

    async def runs() -> Counter:
        counts = Counter()
        for s in range(N_RUNS):
            ahead = Lookahead()
            out = await decode(backends, strategy, n_out, s, lengths, ahead, seen, per_token, plain_ahead)
            counts[tuple(out)] += 1
            spec.started, spec.hits = spec.started + ahead.started, spec.hits + ahead.hits
            spec.verified += ahead.verified
            spec.plain_steps += ahead.plain_steps
        return counts

    counts = asyncio.run(runs())
    p = target[len(CONTEXT) - 1 :].softmax(-1)  # (.., V): p of output token i is row i
    expected = {
        cell: math.prod(float(p[i, t]) for i, t in enumerate(cell)) for cell in itertools.product(range(V), repeat=n_out)
    }
    return chi_square_pvalue(counts, expected, N_RUNS), seen, spec


def test_adaptive_sd_samples_the_targets_distribution() -> None:
    value, seen, _ = pvalue("sd", n_out=3, k_max=2)
    assert value > PASS
    assert len(seen) > 1  # the draft length did change from run to run


def test_adaptive_staged_samples_the_targets_distribution_as_a_tree_and_as_a_chain() -> None:
    value, seen, _ = pvalue("staged", n_out=3, k_max=2)
    assert value > PASS
    assert {chain for k, chain in seen if k} == {False, True}  # rounds drafted trees and chains


def test_adaptive_lookup_samples_the_targets_distribution() -> None:
    # The context repeats (0, 1, ...): max-gram drafts, and its point masses are accepted with probability p.
    value, seen, _ = pvalue("lookup", n_out=3, k_max=2)
    assert value > PASS
    assert len(seen) > 1


@pytest.mark.parametrize("k_max", [None, 1], ids=["k 1", "adaptive"])
def test_pipelined_sd_samples_the_targets_distribution(k_max: int | None) -> None:
    # Drafts of one token: the third token is often drafted speculatively, during round 1's verify.
    value, _, spec = pvalue("sd-pipe", n_out=3, k_max=k_max)
    assert value > PASS
    assert spec.hits > 0  # speculative drafts were used, so the test covers them
    assert spec.verified > 0  # and verifies sent ahead of their round


def test_pipelined_sd_whose_failed_speculation_steps_plainly_samples_the_targets_distribution() -> None:
    # Drafting rounds whose draft or guess failed: the next round is the plain step sent ahead.
    value, _, spec = pvalue("sd-pipe", n_out=3, k_max=None, plain_ahead=True)
    assert value > PASS
    assert spec.hits > 0 and spec.verified > 0
    assert spec.plain_steps > 0


def test_pipelined_sd_drafting_ahead_of_plain_rounds_samples_the_targets_distribution() -> None:
    # Drafting dearer than its tokens: adaptive decodes plainly, and its plain rounds draft ahead.
    value, seen, spec = pvalue("sd-pipe", n_out=3, k_max=2, per_token=1.5)
    assert value > PASS
    assert 0 in seen
    assert spec.hits > 0 and spec.verified > 0
    assert spec.plain_steps > 0  # rounds after a failed guess took the plain step sent ahead


def test_pipelined_sd_uses_a_speculative_draft_only_after_its_assumed_context() -> None:
    """A round whose context is not the one the speculative draft assumed drafts afresh."""
    target = table(1)
    backends = Backends(VerifierCore(TableRuntime(target)), DrafterCore(TableRuntime(target), q_top=V))
    ahead = Lookahead()

    async def run() -> tuple[object, object]:
        drafter = backends.drafter
        ahead.start([*CONTEXT, 4], drafter.propose("s", [*CONTEXT, 4], 3, PARAMS, 7))
        miss = await ahead.take([*CONTEXT, 3, 2], 2, 8)  # not assumed + one token
        ahead.start([*CONTEXT, 4], drafter.propose("s", [*CONTEXT, 4], 3, PARAMS, 7))
        draft = await ahead.task
        hit = await ahead.take([*CONTEXT, 4, draft.tokens[0]], 2, 8)
        return miss, (draft, hit)

    miss, (draft, hit) = asyncio.run(run())
    assert miss is None
    assert hit.verify is None  # none was sent: the round's k applies
    assert hit.draft.tokens == draft.tokens[1:3] and hit.draft.q == draft.q[1:3]
    assert ahead.hits == 1


class CountingTable(TableRuntime):
    """A table runtime that counts the rows its passes compute."""

    rows = 0

    def logits(self, session_id, seq, n_last):
        self.rows += n_last
        return super().logits(session_id, seq, n_last)


def test_a_verify_sent_ahead_runs_after_the_verify_before_it_and_only_on_its_context() -> None:
    """The verifier takes a verify sent ahead after the same session's verify sent before it:
    on the context that verify committed it answers as a verify would; on any other it
    computes nothing and says so (None)."""
    greedy = SamplingParams()
    runtime = CountingTable(table(1))
    core = VerifierCore(runtime)
    argmax = table(1).argmax(-1).tolist()

    async def run():
        current = asyncio.ensure_future(core.verify("s", CONTEXT, [argmax[5]], (), greedy, 0))
        right = [*CONTEXT, argmax[5], argmax[6]]  # what `current` commits: its draft and the bonus
        ahead = asyncio.ensure_future(core.verify_ahead("s", right, [argmax[7]], (), greedy, 1))
        first, second = await current, await ahead
        rows = runtime.rows
        wrong = await core.verify_ahead("s", [*right, argmax[7], 0], [1], (), greedy, 2)
        return first, second, rows, wrong

    first, second, rows, wrong = asyncio.run(run())
    assert first.tokens == (argmax[5], argmax[6])
    assert second is not None and second.tokens == (argmax[7], argmax[8])
    assert wrong is None and runtime.rows == rows  # refused before any pass


@pytest.mark.parametrize("verify_ahead", [True, False])
def test_a_pipelined_round_whose_guess_held_uses_the_verify_sent_ahead(verify_ahead: bool) -> None:
    """Greedy, with a drafter that is the target: every guess holds, so from the second round
    on each round's verify was sent before the round began (with verify_ahead), and the
    output is the target's argmax either way."""
    target = table(1)
    backends = Backends(VerifierCore(TableRuntime(target)), DrafterCore(TableRuntime(target), q_top=V))
    greedy = SamplingParams()

    async def run() -> tuple[list[int], Lookahead]:
        ahead = Lookahead(verify_ahead=verify_ahead)
        out: list[int] = []
        try:
            for step in range(5):
                r = RoundInput("s", CONTEXT + out, greedy, 0, step, 2, max_draft=30 - len(out), lookahead=ahead)
                out += (await pipelined_sd_round(backends, r)).tokens
        finally:
            await ahead.close()
        return out, ahead

    out, ahead = asyncio.run(run())
    assert out == target.argmax(-1).tolist()[len(CONTEXT) - 1 : len(CONTEXT) - 1 + len(out)]
    assert ahead.hits == 4
    assert ahead.verified == (4 if verify_ahead else 0)


def pipelined_rounds(
    backends: Backends, rounds: int, ahead_k: int = 0, room: int = 30, k: int = 0, plain_ahead: bool = False
) -> tuple[list[int], list[int], Lookahead]:
    """Greedy rounds of `sd-pipe` asking for k tokens - plain rounds (k = 0) drafting up to
    ahead_k tokens ahead - as the Engine runs them on the drafter's own cores (`plain_ahead`
    too): the tokens, what each round drafted, and the turn's Lookahead."""

    async def run() -> tuple[list[int], list[int], Lookahead]:
        ahead = Lookahead()
        out: list[int] = []
        drafted = []
        try:
            for step in range(rounds):
                r = RoundInput("s", CONTEXT + out, SamplingParams(), 0, step, k, max_draft=room - len(out),
                               lookahead=ahead, ahead_k=ahead_k, plain_ahead=plain_ahead)  # fmt: skip
                result = await pipelined_sd_round(backends, r)
                drafted.append(result.drafted)
                out += result.tokens
        finally:
            await ahead.close()
        return out, drafted, ahead

    return asyncio.run(run())


def test_a_plain_pipelined_round_drafts_the_next_round_ahead() -> None:
    """Greedy, with a drafter that is the target: a plain round given ahead_k drafts g and
    ahead_k tokens during its verify and sends their verify ahead; the next plain round takes
    that draft whole - awaited where not yet done - and its answer. Without ahead_k a plain
    round drafts nothing ahead."""
    target = table(1)
    backends = Backends(VerifierCore(TableRuntime(target)), DrafterCore(TableRuntime(target), q_top=V))
    out, drafted, ahead = pipelined_rounds(backends, 4, ahead_k=2)
    assert out == target.argmax(-1).tolist()[len(CONTEXT) - 1 : len(CONTEXT) - 1 + len(out)]
    assert drafted[0] == 0 and all(1 <= n <= 2 for n in drafted[1:]), drafted  # after g, at most ahead_k
    assert ahead.started == 4 and ahead.hits == 3 and ahead.verified == 3
    plain, drafted, idle = pipelined_rounds(backends, 4, ahead_k=0)
    assert drafted == [0, 0, 0, 0] and idle.started == 0 and plain == out[:4]


def test_a_verify_sent_ahead_with_or_plain_steps_plainly_where_its_claim_misses() -> None:
    """or_plain: where the claimed context is not what the verifier holds when the call's turn
    comes, it takes a plain step after what it holds - the token a plain verify of that
    context with the same seed gives - and names that context; without or_plain it refuses."""
    greedy = SamplingParams()
    core = VerifierCore(TableRuntime(table(1)))
    argmax = table(1).argmax(-1).tolist()
    from services.context import fingerprint

    async def run():
        await core.verify("s", CONTEXT, [], (), greedy, 0)
        held = [*CONTEXT, argmax[5]]
        wrong = [*held, (argmax[6] + 1) % V]
        refused = await core.verify_ahead("s", wrong, [1], (), greedy, 1)
        step = await core.verify_ahead("s", wrong, [1], (), greedy, 1, or_plain=True)
        return held, refused, step

    held, refused, step = asyncio.run(run())
    assert refused is None
    assert step.plain_after == (len(held), fingerprint(held)) and step.accepted == 0
    assert step.tokens == (argmax[6],)


def test_a_plain_round_whose_guess_failed_takes_the_plain_step_sent_ahead() -> None:
    """Plain rounds drafting ahead with a drafter that is often wrong: each round after the
    first either takes the draft ahead (its guess held) or the plain step its verify took
    instead (or_plain) - never a verify of its own - and the output is the target's argmax.
    The verifier's passes take 20 ms, so each draft ahead and its verify leave before the
    answer they race (with both instant, the threads' scheduling decided that)."""
    target = table(1)
    backends = Backends(VerifierCore(Paced(target, 0.02)), DrafterCore(TableRuntime(table(2)), q_top=V))
    out, _, ahead = pipelined_rounds(backends, 8, ahead_k=2)
    assert out == target.argmax(-1).tolist()[len(CONTEXT) - 1 : len(CONTEXT) - 1 + len(out)]
    assert ahead.plain_steps > 0
    assert ahead.hits + ahead.plain_steps == 7, (ahead.hits, ahead.plain_steps)


@pytest.mark.parametrize("plain_ahead", [True, False], ids=["plain step ahead", "drafts afresh"])
def test_a_drafting_round_whose_speculation_failed_takes_the_plain_step_sent_ahead(plain_ahead: bool) -> None:
    """Rounds drafting 3 tokens with a drafter that is often wrong, the verifier the slower (so
    each draft ahead and its verify left before the answer): with plain_ahead, each round after
    the first takes the draft ahead (its draft all accepted and its guess right) or the plain
    step its verify took instead - after a draft partly rejected as after a wrong guess -
    never a call of its own; without, a failed speculation is discarded and the round drafts
    afresh. The output is the target's argmax either way."""
    target = table(1)
    backends = Backends(VerifierCore(Paced(target, 0.1)), DrafterCore(TableRuntime(table(2)), q_top=V))
    out, drafted, ahead = pipelined_rounds(backends, 8, room=60, k=3, plain_ahead=plain_ahead)
    assert out == target.argmax(-1).tolist()[len(CONTEXT) - 1 : len(CONTEXT) - 1 + len(out)]
    if plain_ahead:
        assert ahead.plain_steps > 0 and ahead.hits + ahead.plain_steps == 7, (ahead.hits, ahead.plain_steps)
        assert ahead.started == 8  # a round that took a plain step drafted ahead during it
        assert all(n == 0 for n in drafted if n < 3), drafted  # a round drafts nothing, or the draft ahead
    else:
        assert ahead.plain_steps == 0 and ahead.hits < 7


COST = CallCost(0.1, 0.1)


@pytest.mark.parametrize("answer, used", [
    (None, False),  # refused, or failed
    (Verified(0, (7,), COST), False),  # a verify's answer, not a plain step's
    (Verified(0, (7,), COST, plain_after=(3, fingerprint([1, 2, 4]))), False),  # after another context
    (Verified(0, (7,), COST, plain_after=(2, fingerprint([1, 2]))), False),  # after a shorter one
    (Verified(0, (7,), COST, plain_after=(3, fingerprint([1, 2, 3]))), True),
], ids=["none", "a verify", "other context", "shorter context", "this context"])  # fmt: skip
def test_a_plain_step_sent_ahead_answers_only_the_context_it_ran_after(answer, used) -> None:
    ahead = Lookahead()
    assert ahead.plain_step(answer, [1, 2, 3]) == (answer if used else None)
    assert ahead.plain_steps == used


class Paced(TableRuntime):
    """A table runtime whose passes take `seconds` each."""

    def __init__(self, table: torch.Tensor, seconds: float) -> None:
        super().__init__(table)
        self.seconds = seconds

    def logits(self, session_id, seq, n_last):
        time.sleep(self.seconds)
        return super().logits(session_id, seq, n_last)


@pytest.mark.parametrize("drafter_pass, verifier_pass, after_g", [(0.02, 0.01, 1), (0.005, 0.15, 4)],
                         ids=["drafter slower", "verifier slower"])  # fmt: skip
def test_a_plain_round_drafts_ahead_what_fits_beside_its_verify(drafter_pass, verifier_pass, after_g) -> None:
    """The draft a plain round drafts ahead is as long as the drafter can finish while the
    verify runs, at most ahead_k after g: one token after g where the drafter is the slower,
    ahead_k where the verifier is."""
    target = table(1)
    backends = Backends(VerifierCore(Paced(target, verifier_pass)),
                        DrafterCore(Paced(target, drafter_pass), q_top=V))  # fmt: skip
    _, drafted, _ = pipelined_rounds(backends, 8, ahead_k=4, room=39 - len(CONTEXT))
    assert drafted[-3:] == [after_g] * 3, drafted


def test_a_draft_ahead_that_came_too_late_is_not_tried_again_for_a_while() -> None:
    """Lookahead.timed: one token more after a draft ahead that was done in time, one fewer
    after one that was not; and a length that came too late is not tried again (not even as
    a drafting round's extra token) until PROBE_AFTER rounds later."""
    from orchestrator.strategies import PROBE_AFTER

    ahead = Lookahead()
    ahead.arrived_ready = True
    ahead.timed(3)  # g and 2 tokens, done in time: 3 after g may be tried
    assert ahead.fits == 3 and ahead.may_grow(4)
    ahead.arrived_ready = False
    ahead.timed(4)  # late: back to 2 after g, and 4 drafted ahead is too long for a while
    assert ahead.fits == 2 and not ahead.may_grow(4) and ahead.may_grow(3)
    ahead.arrived_ready = True
    for _ in range(PROBE_AFTER - 1):
        ahead.timed(3)  # in time, but growing to 4 would be the late length again
        assert ahead.fits == 2 and not ahead.may_grow(4)
    ahead.timed(3)
    assert ahead.may_grow(4)
    ahead.timed(3)
    assert ahead.fits == 3


def test_a_pipelined_strategys_plain_rounds_yield_what_they_commit() -> None:
    """For a pipelined strategy (plain rounds drafting ahead) k = 0 is worth more than one
    token: at first what the session's rates promise (α 0.5, one token ahead: a draft in 40%
    of rounds, 1.2 tokens a round), then what its k = 0 rounds measure. For any other
    strategy one token a round."""
    plain, pipelined = measured(per_token=0.3, alpha=0.5), measured(per_token=0.3, alpha=0.5)
    pipelined.pipelined = True
    assert plain.choose(Acceptance(), step=0, limit=20).k == 1  # 1.5 tokens in 1.3 s beat 1 in 1 s
    choice = pipelined.choose(Acceptance(), step=0, limit=20)
    assert choice.k == 0 and choice.expected_tokens == pytest.approx(1.2, abs=0.01) and choice.ahead == 1
    for _ in range(20):  # k = 0 rounds that never found a draft ahead
        pipelined.observe(Acceptance(), 0, 0, 0, 1.0)
        plain.observe(Acceptance(), 0, 0, 0, 1.0)
    assert pipelined.plain_yield == pytest.approx(1.0) and plain.plain_yield == 1.0
    assert pipelined.choose(Acceptance(), step=0, limit=20).k == 1
    for _ in range(20):  # k = 0 rounds that took a draft ahead: 2 tokens each
        pipelined.observe(Acceptance(), 0, 2, 1, 1.0)
    choice = pipelined.choose(Acceptance(), step=0, limit=20)
    assert choice.k == 0 and choice.expected_tokens == pytest.approx(2.0, abs=0.2)
    # Drafts always accepted: a plain round's draft ahead is taken in every round after it, as
    # long as the drafter can draft it beside the verify (what the pipelined rounds measured).
    whole = measured(per_token=0.3, alpha=1.0)
    whole.pipelined = True
    assert whole._plain_tokens([1.0] * 12, 8) == pytest.approx(9.0)
    whole.fits = 3
    assert whole._plain_tokens([1.0] * 12, 8) == pytest.approx(4.0)


def test_the_draft_length_a_plain_round_would_draft_ahead() -> None:
    """Where no draft pays, the choice still names the length that would pay best (for a
    pipelined plain round to draft ahead); a round that drafts, or a plain round under shared
    passes, names none."""
    dear = measured(per_token=0.5, alpha=0.2).choose(Acceptance(), step=0, limit=20)
    assert dear.k == 0 and dear.ahead == 1
    # A drafter call's fixed cost (0.8 s) makes every draft dearer than plain decoding, and its
    # third token the best of them
    fixed = DraftLength()
    fixed.pooled = PooledAcceptance([100.0] * 12, [50.0] * 12)
    for k in range(13):
        fixed.costs.observe(k, 1.0 + (0.8 + 0.1 * k if k else 0.0))
    chosen = fixed.choose(Acceptance(), step=0, limit=12)
    assert chosen.k == 0 and chosen.ahead == 3
    assert measured(per_token=0.02, alpha=0.95).choose(Acceptance(), step=0, limit=20).ahead == 0
    busy = loaded(measured(per_token=0.05, verify=0.6, alpha=0.8), sessions=16, per_token=0.06)
    assert busy.choose(Acceptance(), step=0, limit=20).ahead == 0


@pytest.mark.parametrize("slack", [True, False])
def test_a_pipelined_round_drafts_a_token_more_ahead_where_the_drafter_had_time_to_spare(slack: bool) -> None:
    """Where the last speculative draft was done before its verify answered, the next one
    drafts one token more than its round's k, so the round after may draft longer (adaptive
    k growing, or exploring); where it was not, exactly k (a drafter with no time to spare
    would only delay the hit)."""
    target = table(1)
    backends = Backends(VerifierCore(TableRuntime(target)), DrafterCore(TableRuntime(target), q_top=V))
    greedy = SamplingParams()

    async def run() -> int:
        ahead = Lookahead()
        ahead.arrived_ready = slack  # what the round before this one saw
        try:
            first = await pipelined_sd_round(backends, RoundInput("s", CONTEXT, greedy, 0, 0, 2, lookahead=ahead))
            assert first.accepted == 2  # the drafter is the target: the speculation holds
            after = [*CONTEXT, *first.tokens]
            second = await pipelined_sd_round(backends, RoundInput("s", after, greedy, 0, 1, 3, lookahead=ahead))
            assert ahead.hits == 1
            return second.drafted
        finally:
            await ahead.close()

    assert asyncio.run(run()) == (3 if slack else 2)


class SlowTable(TableRuntime):
    """A table runtime whose passes take 20 ms each, counted."""

    passes = 0

    def logits(self, session_id, seq, n_last):
        import time

        self.passes += 1
        time.sleep(0.02)
        return super().logits(session_id, seq, n_last)


def test_a_cancelled_propose_frees_the_drafter_after_the_pass_under_way() -> None:
    """A discarded speculative draft does not make the next call wait for all of its k passes."""
    runtime = SlowTable(table(3))
    drafter = DrafterCore(runtime, q_top=V, max_draft=64)

    async def run() -> tuple[int, object]:
        speculative = asyncio.ensure_future(drafter.propose("s", CONTEXT, 40, PARAMS, 1))
        await asyncio.sleep(0.07)
        speculative.cancel()
        with pytest.raises(asyncio.CancelledError):
            await speculative
        after = await drafter.propose("s", [*CONTEXT, 2], 3, PARAMS, 2)
        return runtime.passes, after

    passes, after = asyncio.run(run())
    assert len(after.tokens) == 3
    assert passes <= 3 + 6  # the next call's 3, and the few of the cancelled one before it stopped


def test_an_adaptive_cascade_round_that_drafts_nothing_is_plain_decoding() -> None:
    """k = 0 on a cascade whose only level below the target is its top one leaves row 0 empty."""
    from services.maxgram import MaxGramDrafter

    target = table(1)
    maxgram = MaxGramDrafter()
    backends = Backends(VerifierCore(TableRuntime(target)), None, cascade=(maxgram,), maxgram=maxgram)
    r = sized("cascade", RoundInput("s", CONTEXT, SamplingParams(), 0, 0, 4, k_matrix=((4,),)), 0)
    result = asyncio.run(STRATEGIES["cascade"].run(backends, r))
    assert r.k_matrix == ((0,),) and result.drafted == 0 and len(result.tokens) == 1


class SlowPrefill(DrafterCore):
    """A drafter whose first call (the turn's prefill, begun beside the first round) answers
    after `delay` seconds, as a drafter with a long queue does."""

    delay = 3.0

    async def propose(self, session_id, context, k, params, seed):
        if not getattr(self, "_slowed", False):
            self._slowed = True
            await asyncio.sleep(self.delay)
        return await super().propose(session_id, context, k, params, seed)


class Plain(DraftLength):
    """Adaptive draft length that finds no draft worth its cost (a loaded verifier)."""

    def choose(self, session, step, limit, ar_streak=0, timed=True, streams=0):
        return Choice(0, 1.0, 0.0)


def tiny_engine(
    tiny_pair, drafter_class: type[DrafterCore], lengths: DraftLength, own_cores: bool,
    verifier_class: type[VerifierCore] = VerifierCore,
):  # fmt: skip
    """An Engine over the tiny pair in this process (float64), `sd` choosing by `lengths`."""
    from transformers import AutoTokenizer

    from orchestrator.generate import Engine, Limits
    from services.torch_runtime import load_torch
    from specd.bench.runner import MemoryStore

    def runtime(folder):
        return load_torch(folder, dtype="float64", device="cpu", max_sessions=4, threads=1)

    engine = Engine(
        tokenizer=AutoTokenizer.from_pretrained(tiny_pair.target_dir), store=MemoryStore(),
        backends=Backends(verifier_class(runtime(tiny_pair.target_dir)),
                          drafter_class(runtime(tiny_pair.drafter_dir), q_top=V)),
        limits=Limits(default_strategy="sd", default_k=0, default_max_new_tokens=10, max_new_tokens_limit=64,
                      own_cores=own_cores),
    )  # fmt: skip
    engine.draft_lengths["sd"] = lengths
    return engine


async def timed_turn(engine, strategy: str, max_new_tokens: int) -> tuple[list[int], float]:
    """A turn's tokens, and the seconds it took."""
    from orchestrator.generate import GenerationRequest, TextChunk
    from orchestrator.store import ChatMessage

    request = GenerationRequest(
        messages=(ChatMessage("user", "hello there"),), max_new_tokens=max_new_tokens, strategy=strategy
    )
    started, ids = asyncio.get_running_loop().time(), []
    async for event in engine.generate(request):
        if isinstance(event, TextChunk):
            ids += event.token_ids
    return ids, asyncio.get_running_loop().time() - started


class Scripted(DraftLength):
    """Draft lengths from a script, round by round; records the seconds each round reported."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.script, self.reported = list(script), []

    def choose(self, session, step, limit, ar_streak=0, timed=True, streams=0):
        return Choice(min(self.script[step] if step < len(self.script) else 0, limit), 1.0, 0.0)

    def observe(self, session, k, drafted, accepted, seconds, verify=None, first_path=None):
        self.reported.append((k, seconds))


@pytest.mark.parametrize("own_cores", [False, True], ids=["shared cores", "own cores"])
def test_a_round_drafting_after_plain_ones_is_no_sample_of_its_cost(tiny_pair, own_cores: bool) -> None:
    """A round that drafts right after plain rounds also fed the drafter what they committed:
    it reports no cost (None), as a turn's first round does; every other round reports its own."""
    script = [2, 2, 0, 0, 2, 2, 0, 2, 2, 2]
    lengths = Scripted(script)
    engine = tiny_engine(tiny_pair, DrafterCore, lengths, own_cores=own_cores)
    ids, _ = asyncio.run(timed_turn(engine, "sd", 40))  # at most 3 tokens a round: more rounds than the script
    plain, _ = asyncio.run(timed_turn(engine, "ar", 40))
    assert ids == plain and len(lengths.reported) >= len(script)
    asked = [k for k, _ in lengths.reported]
    # own cores: the turn's first round drafts nothing (the drafter prefills beside it)
    assert asked[: len(script)] == ([0] if own_cores else [2]) + script[1:]
    untimed = [i for i, (_, seconds) in enumerate(lengths.reported[: len(script)]) if seconds is None]
    after_plain = [i for i in range(1, len(script)) if asked[i] and not asked[i - 1]]
    assert untimed == [0, *after_plain]  # the turn's first round, and each round after a plain one


def test_a_round_that_drafts_nothing_does_not_wait_for_the_drafters_prefill(tiny_pair) -> None:
    """The drafter prefills a turn beside its first round; the rounds after it that draft
    nothing go on without waiting for that prefill, and the output is ar's."""
    engine = tiny_engine(tiny_pair, SlowPrefill, Plain(), own_cores=True)
    (plain, _), (ids, seconds) = asyncio.run(timed_turn(engine, "ar", 6)), asyncio.run(timed_turn(engine, "sd", 6))
    assert ids == plain
    assert seconds < SlowPrefill.delay, f"the turn took {seconds:.1f} s: a plain round waited for the prefill"


class Recording(DrafterCore):
    """A drafter that records the context length of every `propose`."""

    async def propose(self, session_id, context, k, params, seed, vocab="native"):
        self.calls = [*getattr(self, "calls", []), (len(context), k)]
        return await super().propose(session_id, context, k, params, seed, vocab)


class SlowVerify(VerifierCore):
    """A verifier whose calls answer 50 ms late, as a real target's pass takes time: what a
    drafter does beside a round then finishes within it."""

    async def verify(self, *args, **kwargs):
        await asyncio.sleep(0.05)
        return await super().verify(*args, **kwargs)


class LateDraft(DraftLength):
    """Plain decoding for the first `plain` rounds of a turn, then drafts of 2."""

    plain = 5

    def choose(self, session, step, limit, ar_streak=0, timed=True, streams=0):
        return Choice(0 if step < self.plain else min(2, limit), 1.0, 0.0)


@pytest.mark.parametrize("own_cores", [True, False])
def test_on_cores_of_its_own_the_drafter_keeps_up_beside_plain_rounds(tiny_pair, own_cores: bool) -> None:
    """Drafter and verifier on cores of their own: plain rounds have the drafter feed the
    context meanwhile, once it is KEEP_UP_TOKENS behind, so the first drafting round after
    five plain ones finds it at most that far behind, not the whole turn. On shared cores
    nothing is sent beside a round (it would take the verifier's cores). Either way the
    output is ar's."""
    from orchestrator.generate import KEEP_UP_TOKENS

    engine = tiny_engine(tiny_pair, Recording, LateDraft(), own_cores=own_cores, verifier_class=SlowVerify)
    (plain, _), (ids, _) = asyncio.run(timed_turn(engine, "ar", 10)), asyncio.run(timed_turn(engine, "sd", 10))
    assert ids == plain
    drafter = engine.backends.drafter
    drafting = [n for n, k in drafter.calls if k == 2]
    before = [n for n, k in drafter.calls if k == 1 and n < drafting[0]]
    if own_cores:
        assert drafting[0] - max(before) <= KEEP_UP_TOKENS, drafter.calls
    else:
        assert before == [], drafter.calls


class PlainAhead(Scripted):
    """Plain decoding every round, naming 2 as the draft length to draft ahead."""

    def choose(self, session, step, limit, ar_streak=0, timed=True, streams=0):
        return Choice(0, 1.0, 0.0, ahead=2)


@pytest.mark.parametrize("own_cores", [True, False])
def test_on_cores_of_its_own_a_pipelined_plain_round_drafts_ahead(tiny_pair, own_cores: bool) -> None:
    """`sd-pipe` where adaptive decodes plainly: on the drafter's own cores each plain round
    drafts the next one ahead, so rounds verify drafts no round asked for; every round after
    the first reports its time, a sample of what k = 0 costs. On shared cores plain rounds
    stay plain. Either way the output is ar's."""
    from orchestrator.generate import Stats

    lengths = PlainAhead([])
    engine = tiny_engine(tiny_pair, DrafterCore, lengths, own_cores=own_cores, verifier_class=SlowVerify)
    engine.draft_lengths["sd-pipe"] = lengths

    async def turn(strategy: str) -> tuple[list[int], Stats]:
        from orchestrator.generate import GenerationRequest, TextChunk
        from orchestrator.store import ChatMessage

        request = GenerationRequest(messages=(ChatMessage("user", "hello there"),), max_new_tokens=16,
                                    strategy=strategy)  # fmt: skip
        ids, stats = [], None
        async for event in engine.generate(request):
            if isinstance(event, TextChunk):
                ids += event.token_ids
            elif isinstance(event, Stats):
                stats = event
        return ids, stats

    (plain, _), (ids, stats) = asyncio.run(turn("ar")), asyncio.run(turn("sd-pipe"))
    assert ids == plain
    assert stats.draft_asked == 0
    if own_cores:
        assert stats.speculative_hits > 0 and stats.drafted > 0
        assert stats.speculative_verified == stats.speculative_hits
        assert [seconds is None for _, seconds in lengths.reported] == [True] + [False] * (stats.target_forwards - 1)
    else:
        assert stats.speculative_drafts == 0 and stats.drafted == 0


def test_a_head_alone_and_a_head_beside_lookup_adapt_apart(tiny_pair) -> None:
    """They draft different trees, so each keeps its own acceptance and round costs."""
    from types import SimpleNamespace

    from orchestrator.generate import GenerationRequest

    engine = tiny_engine(tiny_pair, DrafterCore, DraftLength(), own_cores=True)
    session = SimpleNamespace(sampling=SamplingParams())

    def lengths(head_only: bool) -> DraftLength:
        return engine._draft_length(GenerationRequest(strategy="redrafter", head_only=head_only), session, "redrafter", 0)

    beside, alone = lengths(False), lengths(True)
    assert beside is not alone and lengths(False) is beside and lengths(True) is alone
