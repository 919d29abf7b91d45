"""The cascade strategy (orchestrator/strategies.cascade_round) in this process: k-matrix
checks, greedy output equal to plain decoding on tiny models, and statistical tests that
sampled output is distributed exactly as the target's p, with wrong schemes that must fail.

The real-process tests (gRPC Review on drafter_svc, Redis) are in tests/test_strategies_services.py.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter

import pytest
import torch
from tables import TableRuntime
from test_acceptance import FAIL, PASS, chi_square_pvalue, random_dist

from drafter_svc.core import DrafterCore
from orchestrator.strategies import STRATEGIES, Backends, Carry, RoundInput, default_k_matrix, k_matrix_problems
from services.maxgram import MaxGramDrafter
from services.roles import CallCost, Reviewed
from services.sampling import SamplingParams, SparseDist, truncated
from services.torch_runtime import load_torch
from verifier_svc.core import VerifierCore

pytestmark = pytest.mark.usefixtures("single_thread_torch")


# ---------------------------------------------------------------- k-matrix


@pytest.mark.parametrize(
    "k_matrix, levels, problem",
    [
        (((4, 2), (0, 3)), 2, None),
        (((4,),), 1, None),
        (((1, 2, 3), (0, 2, 0), (0, 0, 5)), 3, None),
        (((4, 2),), 2, "must be 2 x 2"),
        (((4, 2), (1, 3)), 2, "left of the diagonal"),
        (((0, 0), (0, 3)), 2, "all zeros"),
        (((4, -1), (0, 3)), 2, ">= 0"),
    ],
)
def test_k_matrix_problems(k_matrix, levels: int, problem: str | None) -> None:
    found = k_matrix_problems(k_matrix, levels)
    assert (found == []) if problem is None else any(problem in f for f in found), found


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_default_k_matrices_are_valid(levels: int) -> None:
    assert k_matrix_problems(default_k_matrix(levels), levels) == []


# ---------------------------------------------------------------- greedy on tiny models


async def decode(backends: Backends, strategy: str, context: list[int], n: int, params: SamplingParams,
                 seed: int = 0, k_matrix=(), session: str = "s") -> tuple[list[int], list]:  # fmt: skip
    """Rounds of one strategy until n tokens are out, as the Engine runs them (minus Redis)."""
    round_fn = STRATEGIES[strategy].run
    out: list[int] = []
    results = []
    carry = Carry()  # what redrafter's rounds pass on to the next
    while len(out) < n:
        # No cap on the draft from the tokens still wanted (the Engine's max_draft): the
        # statistical tests look at the first tokens of full-length rounds.
        r = RoundInput(session, context + out, params, seed, len(results), 4, k_matrix=k_matrix, carry=carry)
        results.append(await round_fn(backends, r))
        out += results[-1].tokens
    return out[:n], results


@pytest.fixture(scope="module")
def tiny_backends(tiny_pair):
    target = load_torch(tiny_pair.target_dir, dtype="float64", device="cpu", max_sessions=8)
    drafter = load_torch(tiny_pair.drafter_dir, dtype="float64", device="cpu", max_sessions=8)
    return target, drafter


K_MATRICES = {
    "default (drafter <- max-gram)": (2, ()),
    "horizontal only": (2, ((3, 3), (0, 0))),
    "max-gram first, then the drafter": (2, ((0, 2), (0, 0))),
    "three levels": (3, ((3, 0, 2), (0, 2, 1), (0, 0, 2))),
    "max-gram alone": (1, ((5,),)),
}


@pytest.mark.parametrize("levels, k_matrix", K_MATRICES.values(), ids=K_MATRICES.keys())
def test_greedy_cascade_equals_plain_decoding(tiny_backends, tiny_pair, levels: int, k_matrix) -> None:
    from transformers import AutoTokenizer

    target, drafter = tiny_backends
    maxgram = MaxGramDrafter()
    cascade = {1: (maxgram,), 2: (DrafterCore(drafter), maxgram), 3: (DrafterCore(drafter), DrafterCore(drafter), maxgram)}
    backends = Backends(VerifierCore(target), DrafterCore(drafter), cascade=cascade[levels], maxgram=maxgram)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.tokenizer_dir)
    # A prompt that repeats itself, so the max-gram model has something to match.
    context = tokenizer("def add(a, b):\n    return a + b\n\ndef add(a, b):\n").input_ids
    params = SamplingParams()
    expected, _ = asyncio.run(decode(backends, "ar", context, 40, params, session="ar"))
    got, results = asyncio.run(decode(backends, "cascade", context, 40, params, k_matrix=k_matrix, session="cs"))
    assert got == expected
    assert sum(r.drafted for r in results) > 0


# ---------------------------------------------------------------- statistics


V = 5
CONTEXT = [0, 1, 2, 3, 0, 1]  # max-gram proposes 2, 3, 0, 1, ... after it
Q_TOP = 3  # the middle level's q keeps 3 of 5 entries, so truncation matters
PARAMS = SamplingParams(temperature=1.0)


def table(seed: int) -> torch.Tensor:
    return torch.stack([random_dist(seed * 100 + t, V).log() for t in range(len(CONTEXT) + 12)])  # (L, V)


class UntruncatedQ:
    """A wrong middle level: samples from its truncated distribution, as it should, but sends
    its full distribution upward as the tokens' q."""

    def __init__(self, inner: DrafterCore, table: torch.Tensor) -> None:
        self.inner = inner
        self.table = table

    async def review(self, session_id, context, draft, q, params, seed) -> Reviewed:
        v = await self.inner.review(session_id, context, draft, q, params, seed)
        start = len(context) - 1
        full = tuple(truncated(self.table[start + i].softmax(-1), V) for i in range(len(v.tokens)))
        return Reviewed(v.accepted, v.tokens, full, v.cost)


class Lenient(UntruncatedQ):
    """A wrong middle level: the reference code's "leniency" - it accepts every draft token its
    own truncated distribution allows, and on a rejection draws from that distribution - and
    sends that distribution as q, which its tokens no longer follow.

    (Sending no q at all would not be wrong: a point mass is a valid q for a token drawn any
    way independent of the reviewer's coins - acceptance with probability p(d), else the
    residual p without d, emits exactly p - it is only accepted less often.)"""

    async def review(self, session_id, context, draft, q, params, seed) -> Reviewed:
        start = len(context) - 1
        own = [truncated(self.table[start + i].softmax(-1), Q_TOP) for i in range(len(draft) + 1)]
        generator = torch.Generator().manual_seed(seed)
        n = 0
        while n < len(draft) and own[n].prob(draft[n]) > 0:
            n += 1
        tokens = (*draft[:n], own[n].sample(generator))
        return Reviewed(n, tokens, tuple(own[: n + 1]), CallCost(0.0, 0.0))


def cascade_pvalue(k_matrix, n_out: int, n: int, wrong=None, seed: int = 0) -> float:
    """How likely the first n_out tokens of n cascade runs (target <- table drafter <- max-gram)
    are under the target's p_1 x ... x p_{n_out}."""
    target, middle = table(1), table(2)
    drafter = DrafterCore(TableRuntime(middle), q_top=Q_TOP)
    level = drafter if wrong is None else wrong(drafter, middle)
    maxgram = MaxGramDrafter()
    backends = Backends(VerifierCore(TableRuntime(target)), drafter, cascade=(level, maxgram), maxgram=maxgram)

    async def runs() -> Counter:
        counts = Counter()
        for s in range(n):
            out, _ = await decode(backends, "cascade", CONTEXT, n_out, PARAMS, seed=seed * n + s, k_matrix=k_matrix)
            counts[tuple(out)] += 1
        return counts

    counts = asyncio.run(runs())
    p = target[len(CONTEXT) - 1 :].softmax(-1)  # (.., V): p of output token i is row i
    expected = {}
    for cell in itertools.product(range(V), repeat=n_out):
        expected[cell] = math.prod(float(p[i, t]) for i, t in enumerate(cell))
    return chi_square_pvalue(counts, expected, n)


N_FIRST = 3000
VERTICAL = ((2, 0), (0, 2))  # the target's draft comes from the middle level reviewing max-gram drafts
BOTH = ((1, 2), (0, 1))  # ... then max-gram adds two more (horizontal)


@pytest.mark.parametrize("k_matrix", [VERTICAL, BOTH], ids=["vertical", "vertical and horizontal"])
def test_first_token_is_distributed_as_p(k_matrix) -> None:
    assert cascade_pvalue(k_matrix, n_out=1, n=N_FIRST) > PASS


def test_first_two_tokens_are_distributed_as_p1_times_p2() -> None:
    assert cascade_pvalue(BOTH, n_out=2, n=3000) > PASS


@pytest.mark.parametrize("wrong", [UntruncatedQ, Lenient], ids=["sends untruncated q", "lenient review"])
def test_statistic_rejects_a_wrong_middle_level(wrong) -> None:
    """Same scenario, seeds and sample size under which the right cascade passes."""
    assert cascade_pvalue(VERTICAL, n_out=1, n=N_FIRST, wrong=wrong) < FAIL


def test_wrong_middle_levels_differ_from_the_right_one_only_in_q() -> None:
    """The controls above fail for their q alone: the tokens they emit are the right ones."""
    middle = table(2)
    drafter = DrafterCore(TableRuntime(middle), q_top=Q_TOP)
    right = asyncio.run(drafter.review("s", CONTEXT, [2, 3], [], PARAMS, 5))
    for wrong in (UntruncatedQ,):
        v = asyncio.run(wrong(DrafterCore(TableRuntime(middle), q_top=Q_TOP), middle).review("s", CONTEXT, [2, 3], [], PARAMS, 5))
        assert v.tokens == right.tokens and v.q != right.q
    assert all(isinstance(q, SparseDist) and q.ids.numel() <= Q_TOP for q in right.q)


# ---------------------------------------------------------------- configuration


def test_orchestrator_config_reads_cascade_k_matrix_and_tree() -> None:
    from services.config import OrchestratorConfig
    from services.tree import TreeShape

    base = {"SPECD_VERIFIER": "v:1", "SPECD_TOKENIZER": "t"}
    config = OrchestratorConfig.from_env(
        base | {"SPECD_CASCADE": "d1:2, d2:3,maxgram", "SPECD_K_MATRIX": "3,0,2;0,2,1;0,0,2", "SPECD_TREE": "3,2,1:6"}, ""
    )
    assert config.cascade == ("d1:2", "d2:3", "maxgram")
    assert config.k_matrix == ((3, 0, 2), (0, 2, 1), (0, 0, 2))
    assert config.tree == TreeShape((3, 2, 1), 6)
    defaults = OrchestratorConfig.from_env(base, "")
    assert (defaults.cascade, defaults.k_matrix, defaults.tree) == ((), (), None)


@pytest.mark.parametrize(
    "name, value, words",
    [("SPECD_K_MATRIX", "4,x", "comma-separated"), ("SPECD_TREE", "3,0:4", ">= 1"), ("SPECD_TREE", "3,2", "budget")],
)
def test_orchestrator_config_refuses_bad_values(name: str, value: str, words: str) -> None:
    from services.config import ConfigError, OrchestratorConfig

    with pytest.raises(ConfigError, match=words):
        OrchestratorConfig.from_env({"SPECD_VERIFIER": "v:1", "SPECD_TOKENIZER": "t", name: value}, "")
