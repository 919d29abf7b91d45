"""Tests for services/acceptance.py.

Token cases a reviewer can check by eye, then statistical tests that what speculative
sampling emits is distributed exactly as p, with controls proving the statistic has the
power to catch a wrong scheme.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from services.acceptance import Verdict, accept, verify_greedy, verify_sampled
from services.sampling import SamplingParams, SparseDist, sample, target_probs, truncated

V = 6  # vocabulary of the hand-written cases


def one_hot(*tokens: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()  # (len(tokens), V)


def sparse(pairs: dict[int, float]) -> SparseDist:
    return SparseDist(torch.tensor(list(pairs), dtype=torch.int64), torch.tensor(list(pairs.values())))


# ---------------------------------------------------------------- token cases


@pytest.mark.parametrize(
    "draft, target_argmax, accepted, tokens",
    [
        ([1, 2, 3], [1, 2, 3, 4], 3, (1, 2, 3, 4)),  # perfect match: all accepted + bonus
        ([1, 2, 3], [1, 5, 3, 4], 1, (1, 5)),  # early mismatch: recovered at position 2
        ([7, 2], [1, 2, 3], 0, (1,)),  # first token rejected; a later match does not count
        ([], [9], 0, (9,)),  # empty draft: just the target's token
    ],
)
def test_verify_greedy(draft: list[int], target_argmax: list[int], accepted: int, tokens: tuple[int, ...]) -> None:
    assert verify_greedy(draft, target_argmax) == Verdict(accepted, tokens, len(draft))


def test_verify_greedy_needs_k_plus_one_argmax() -> None:
    with pytest.raises(AssertionError, match="k\\+1 = 3"):
        verify_greedy([1, 2], [1, 2])


# With one-hot p every outcome is certain, whatever the generator draws.
SAMPLED_CASES = {
    "perfect match, point-mass q": ([1, 2], [], one_hot(1, 2, 3), Verdict(2, (1, 2, 3), 2)),
    "early mismatch: recovered at position 2": ([1, 2, 4], [], one_hot(1, 5, 4, 0), Verdict(1, (1, 5), 3)),
    "first token rejected": ([3], [None], one_hot(0, 0), Verdict(0, (0,), 1)),
    "empty draft: one token from p_1": ([], [], one_hot(4), Verdict(0, (4,), 0)),
    "sparse q, p one-hot on the draft: ratio 2 accepts": (
        [1], [sparse({1: 0.5, 4: 0.5})], one_hot(1, 3), Verdict(1, (1, 3), 1)
    ),
    "p(d) = 0 rejects; residual = p outside q": ([0], [sparse({0: 0.5, 3: 0.5})], one_hot(2, 1), Verdict(0, (2,), 1)),
    "mixed sparse and point-mass q": ([1, 3], [sparse({1: 1.0}), None], one_hot(1, 3, 5), Verdict(2, (1, 3, 5), 2)),
}


@pytest.mark.parametrize("draft, q, p, expected", SAMPLED_CASES.values(), ids=SAMPLED_CASES.keys())
def test_verify_sampled_certain_outcomes(draft: list[int], q: list, p: torch.Tensor, expected: Verdict) -> None:
    for seed in range(50):
        assert verify_sampled(draft, q, p, torch.Generator().manual_seed(seed)) == expected


def verdicts(draft: list[int], q: list, p: torch.Tensor, seeds: int = 300) -> list[Verdict]:
    return [verify_sampled(draft, q, p, torch.Generator().manual_seed(s)) for s in range(seeds)]


def test_draft_token_with_p_zero_is_always_rejected() -> None:
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0, 0.0]] * 2)  # (k+1, V)
    outcomes = verdicts([0], [sparse({0: 0.5, 3: 0.5})], p)
    assert {v.accepted for v in outcomes} == {0}
    assert {v.tokens for v in outcomes} == {(1,), (2,)}


def test_recovered_token_comes_from_the_residual_never_the_rejected_draft() -> None:
    # q is a point mass at 0, p = (0.5, 0.5): accept half the time, and on rejection the
    # residual max(0, p - q) = (0, 0.5) can only give 1.
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # (k+1, V)
    outcomes = Counter(v.tokens for v in verdicts([0], [], p))
    assert set(outcomes) == {(1,), (0, 5)}
    assert 100 < outcomes[(1,)] < 200


def test_bonus_token_comes_from_p_after_the_last_draft() -> None:
    p = torch.cat([one_hot(1, 2), torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5, 0.0]])])  # (k+1, V)
    outcomes = verdicts([1, 2], [], p)
    assert all(v.bonus and v.accepted == 2 for v in outcomes)
    assert {v.tokens[-1] for v in outcomes} == {3, 4}


@pytest.mark.parametrize(
    "draft, q, p, message",
    [
        ([1, 2], [], one_hot(1, 2), "p must be \\(k\\+1, V\\) with k\\+1 = 3"),
        ([1, 2], [None], one_hot(1, 2, 3), "q must have 0 or k = 2 entries, got 1"),
        ([1, 9], [], one_hot(1, 2, 3), "outside \\[0, 6\\)"),
        ([1], [sparse({2: 1.0})], one_hot(1, 2), "d_1 = 1 has q = 0"),
    ],
)
def test_verify_sampled_asserts_its_inputs(draft: list[int], q: list, p: torch.Tensor, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        verify_sampled(draft, q, p, torch.Generator().manual_seed(0))


def test_verdict_invariants() -> None:
    assert Verdict(2, (1, 2, 3), 2).bonus and not Verdict(1, (1, 5), 2).bonus
    with pytest.raises(AssertionError, match="needs 2 tokens"):
        Verdict(1, (1,), 2)
    with pytest.raises(AssertionError, match="outside"):
        Verdict(3, (1, 2, 3, 4), 2)


# ---------------------------------------------------------------- accept


def test_accept_greedy_uses_argmax_and_consumes_no_randomness() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 2.0], [0.0, 0.0, 9.0]])  # (k+1, V); row 2 ties
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert accept([1, 2], [], logits, SamplingParams(), generator) == Verdict(1, (1, 0), 2)
    assert torch.equal(generator.get_state(), state)


def test_greedy_rule_is_the_sampled_rule_on_greedy_p() -> None:
    """verify_sampled on one-hot p with point-mass q reproduces greedy decoding exactly."""
    rng = torch.Generator().manual_seed(4)
    for _ in range(200):
        k = int(torch.randint(0, 5, (), generator=rng))
        logits = torch.randint(0, 3, (k + 1, 4), generator=rng).float()  # (k+1, V), many ties
        draft = torch.randint(0, 4, (k,), generator=rng).tolist()
        greedy = accept(draft, [], logits, SamplingParams(), rng)
        assert verify_sampled(draft, [], target_probs(logits, SamplingParams()), rng) == greedy


def test_accept_sampled_is_verify_sampled_on_target_probs_and_replays() -> None:
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))  # (k+1, V)
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9)
    draft, q = [2, 7, 1], [truncated(torch.full((10,), 0.1), top=10)] * 3
    for seed in range(30):
        expected = verify_sampled(draft, q, target_probs(logits, params), torch.Generator().manual_seed(seed))
        assert accept(draft, q, logits, params, torch.Generator().manual_seed(seed)) == expected


def test_accept_refuses_invalid_params() -> None:
    with pytest.raises(AssertionError, match="top_k must be >= 0"):
        accept([], [], torch.zeros(1, 4), SamplingParams(top_k=-1), torch.Generator())


# ---------------------------------------------------------------- statistics


def chi_square_tail(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, x/2)."""
    half_df, half_x = torch.tensor([df / 2, statistic / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(half_df, half_x))


@pytest.mark.parametrize(
    "statistic, df, tail", [(3.841, 1, 0.05), (6.635, 1, 0.01), (18.307, 10, 0.05), (9.342, 10, 0.5)]
)
def test_chi_square_tail_matches_the_printed_table(statistic: float, df: int, tail: float) -> None:
    assert abs(chi_square_tail(statistic, df) - tail) < 0.01 * tail


def chi_square_pvalue(counts: Counter, expected: dict[tuple[int, ...], float], n: int) -> float:
    """Pearson's goodness-of-fit p-value of n outcomes' counts against expected probabilities.

    An outcome that expected says is impossible is an outright failure (p-value 0). Outcomes
    expecting fewer than 5 counts are pooled, where the chi-square approximation would break.
    """
    if any(cell not in expected for cell in counts):
        return 0.0
    big = [cell for cell, prob in expected.items() if n * prob >= 5]
    observed = [counts[cell] for cell in big] + [n - sum(counts[cell] for cell in big)]
    means = [n * expected[cell] for cell in big] + [n * (1 - sum(expected[cell] for cell in big))]
    if means[-1] < 5:  # the pooled rest is too small to stand alone: fold it into the last cell
        observed = observed[:-2] + [observed[-2] + observed[-1]]
        means = means[:-2] + [means[-2] + means[-1]]
    statistic = sum((o - m) ** 2 / m for o, m in zip(observed, means))
    return chi_square_tail(statistic, len(means) - 1)


PASS = 1e-3  # a correct scheme must not look this unlikely (fixed seeds, so no flakiness)
FAIL = 1e-6  # a wrong scheme must look at least this unlikely


@dataclass
class FakeDrafter:
    """Proposes d_i at absolute position i from a fixed per-position source.

    A SparseDist source is a sampling drafter: it draws from that q and sends it. An int
    source is a greedy or statistical drafter: it always proposes that token and sends no q.
    Draws are made in batches only because one multinomial per token would dominate run time.
    """

    sources: list[SparseDist | int]
    generator: torch.Generator
    pools: dict[int, list[int]] = field(default_factory=dict)

    def propose(self, position: int) -> tuple[int, SparseDist | None]:
        source = self.sources[position]
        if isinstance(source, int):
            return source, None
        if not self.pools.get(position):
            draws = torch.multinomial(source.probs, 4096, replacement=True, generator=self.generator)
            self.pools[position] = source.ids[draws].tolist()
        return self.pools[position].pop(), source


Verify = Callable[[Sequence[int], Sequence, torch.Tensor, torch.Generator], Verdict]


def generate(
    verify: Verify, p: torch.Tensor, drafter: FakeDrafter, k: int, n_out: int, generator: torch.Generator
) -> tuple[int, ...]:
    """Rounds of draft -> verify until n_out tokens are out. p (L, V) is per absolute position,
    the same whatever came before, so the output should be distributed as p_1 x p_2 x ..."""
    out: list[int] = []
    while len(out) < n_out:
        j = len(out)
        proposals = [drafter.propose(j + i) for i in range(k)]
        verdict = verify([d for d, _ in proposals], [q for _, q in proposals], p[j : j + k + 1], generator)
        out.extend(verdict.tokens)
    return tuple(out[:n_out])


def output_pvalue(
    verify: Verify, p: torch.Tensor, sources: list, k: int, n_out: int, n: int, seed: int = 0
) -> float:
    """How likely the first n_out tokens of n runs are under p_1 x ... x p_{n_out}."""
    drafter = FakeDrafter(sources, torch.Generator().manual_seed(seed + 1))
    generator = torch.Generator().manual_seed(seed)
    counts = Counter(generate(verify, p, drafter, k, n_out, generator) for _ in range(n))
    expected = {}
    for cell in itertools.product(range(p.shape[1]), repeat=n_out):
        prob = math.prod(float(p[i, token]) for i, token in enumerate(cell))
        if prob > 0:
            expected[cell] = prob
    return chi_square_pvalue(counts, expected, n)


def random_dist(seed: int, size: int, sharpness: float = 1.5) -> torch.Tensor:
    logits = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * sharpness  # (size,)
    return logits.softmax(dim=-1)


def drafter_q(position: int, vocab: int) -> torch.Tensor:
    """The drafter's full distribution at a position (V,): fixed, and unlike p."""
    return random_dist(100 + position, vocab)


def drafter_sources(kind: str, positions: int, vocab: int) -> list:
    """Per position: the drafter's q sent whole ('dense'), truncated to its top 3 ('sparse'),
    or replaced by its argmax as a point mass ('point')."""
    q_full = [drafter_q(i, vocab) for i in range(positions)]
    if kind == "dense":
        return [truncated(q, top=vocab) for q in q_full]
    if kind == "sparse":
        return [truncated(q, top=3) for q in q_full]
    return [int(q.argmax()) for q in q_full]


def scenario_pvalue(verify: Verify, kind: str, k: int, vocab: int, n_out: int, n: int = 20_000) -> float:
    """p rows are random_dist(position), the drafter is drafter_sources(kind): see output_pvalue."""
    p = torch.stack([random_dist(i, vocab) for i in range(k + n_out)])  # (k + n_out, V)
    return output_pvalue(verify, p, drafter_sources(kind, k + n_out - 1, vocab), k, n_out, n)


# The two scenarios the power tests reuse, so each wrong scheme fails where the right one passes.
FIRST_TOKEN = {"k": 3, "vocab": 8, "n_out": 1}
FIRST_TWO = {"k": 1, "vocab": 6, "n_out": 2}


@pytest.mark.parametrize("kind", ["dense", "sparse", "point"])
def test_first_token_is_distributed_as_p(kind: str) -> None:
    assert scenario_pvalue(verify_sampled, kind, **FIRST_TOKEN) > PASS


def test_first_token_is_distributed_as_warped_p() -> None:
    """p cut by temperature, top-k and top-p (accept() builds exactly this p, tested above):
    tokens the filters removed never appear, and q's mass on them only lowers acceptance."""
    k, vocab = 3, 12
    logits = torch.randn(k + 1, vocab, generator=torch.Generator().manual_seed(7)) * 2  # (k+1, V)
    p = target_probs(logits, SamplingParams(temperature=0.7, top_k=6, top_p=0.9))
    assert 1 < int((p[0] > 0).sum()) < 6  # the filters really cut p_1
    sources = [truncated(random_dist(200 + i, vocab), top=3) for i in range(k)]
    assert output_pvalue(verify_sampled, p, sources, k, n_out=1, n=20_000) > PASS


@pytest.mark.parametrize("kind, k", [("sparse", 1), ("sparse", 2), ("point", 2)])
def test_first_two_tokens_are_distributed_as_p1_times_p2(kind: str, k: int) -> None:
    assert scenario_pvalue(verify_sampled, kind, k=k, vocab=6, n_out=2) > PASS


# ---------------------------------------------------------------- the statistic has power


def speculative_variant(
    ratio: Callable[[float, float], float] = lambda p_d, q_d: min(1.0, p_d / q_d),
    recover: Callable[[torch.Tensor, SparseDist], torch.Tensor] = (
        lambda p_i, q_i: (p_i - q_i.dense(p_i.numel())).clamp(min=0)
    ),
    bonus_row: Callable[[int], int] = lambda k: k,
) -> Verify:
    """The textbook rule with replaceable parts, to build wrong schemes; the defaults are right."""

    def verify(draft, q, p, generator):
        k = len(draft)
        for i, d in enumerate(draft):
            q_i = q[i] if q and q[i] is not None else SparseDist.point(d)
            r = torch.rand((), generator=generator, dtype=torch.float64).item()
            if r >= ratio(float(p[i, d]), q_i.prob(d)):
                return Verdict(i, (*draft[:i], sample(recover(p[i], q_i), generator)), k)
        return Verdict(k, (*draft, sample(p[bonus_row(k)], generator)), k)

    return verify


def sends_untruncated_q(k: int, vocab: int, n_out: int) -> Verify:
    """A drafter bug: it samples from its top-3 q but sends its full q. Every round starts at
    position 0 when n_out = 1, so draft index i is position i."""
    assert n_out == 1
    full = [truncated(drafter_q(i, vocab), top=vocab) for i in range(k)]
    return lambda draft, q, p, generator: verify_sampled(draft, full[: len(draft)], p, generator)


@pytest.mark.parametrize("scenario", [FIRST_TOKEN, FIRST_TWO], ids=["first token", "first two"])
def test_textbook_variant_passes(scenario: dict) -> None:
    """The control for the tests below: with its defaults, speculative_variant is right."""
    assert scenario_pvalue(speculative_variant(), "sparse", **scenario) > PASS


WRONG_SCHEMES = {
    "inverted ratio q/p": (
        speculative_variant(ratio=lambda p_d, q_d: min(1.0, q_d / p_d) if p_d else 1.0),
        FIRST_TOKEN,
    ),
    "recovered from p, not the residual": (speculative_variant(recover=lambda p_i, q_i: p_i), FIRST_TOKEN),
    "bonus from p_k, not p_{k+1}": (speculative_variant(bonus_row=lambda k: k - 1), FIRST_TWO),
    "q sent is not the q sampled from": (sends_untruncated_q(**FIRST_TOKEN), FIRST_TOKEN),
}


@pytest.mark.parametrize("verify, scenario", WRONG_SCHEMES.values(), ids=WRONG_SCHEMES.keys())
def test_statistic_rejects_a_wrong_scheme(verify: Verify, scenario: dict) -> None:
    """Same scenario, seeds and sample size under which verify_sampled and the control pass."""
    assert scenario_pvalue(verify, "sparse", **scenario) < FAIL
