"""The staged strategy (orchestrator/strategies.staged_round) in this process: the drafter's
tree growth (shape, budget, second stage), greedy output equal to plain decoding on tiny
models, and statistical tests that sampled output is distributed exactly as the target's p,
with wrong multi-candidate schemes that must fail.

The real-process tests (gRPC ProposeTree/VerifyTree, Redis) are in tests/test_strategies_services.py.
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
from test_cascade import decode

from drafter_svc.core import DrafterCore
from drafter_svc.draft import propose_tree
from orchestrator.strategies import Backends
from services.multidraft import TreeVerdict, recursive_rejection, verify_tree_sampled
from services.ngram import NgramIndex
from services.sampling import SamplingParams, sample, target_probs
from services.second_stage import PROBE_TREES, PassTimes
from services.torch_runtime import load_torch
from services.tree import ROOT, Tree, TreeShape
from verifier_svc.core import VerifierCore

pytestmark = pytest.mark.usefixtures("single_thread_torch")


# ---------------------------------------------------------------- tree growth

V = 6
CONTEXT = [0, 1, 2, 3, 0, 1]  # the max-gram model guesses 2, 3, 0, 1, ... after it
PARAMS = SamplingParams(temperature=1.0)
GREEDY = SamplingParams()


def table(seed: int, sharpness: float = 1.5) -> torch.Tensor:
    return torch.stack([random_dist(seed * 100 + t, V, sharpness).log() for t in range(len(CONTEXT) + 12)])  # (L, V)


def grow(shape: TreeShape, params: SamplingParams = GREEDY, lookahead: int = 0, host=None, seed: int = 0):
    host = host or TableRuntime(table(2))
    ngram = NgramIndex() if lookahead else None
    return propose_tree(host, "s", CONTEXT, shape, params, 4, ngram, lookahead, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "shape, per_depth",
    [
        (TreeShape((3, 2, 1, 1, 1), 8), [3, 2, 1, 1, 1]),  # the best node of each depth is expanded
        (TreeShape((3, 2, 1), 12), [3, 6, 3]),  # budget to spare: every node is expanded
        (TreeShape((2, 2, 2, 2), 3), [1, 1, 1]),  # budget below the depth: a chain as deep as it allows
        (TreeShape((1, 1, 1, 1), 4), [1, 1, 1, 1]),  # a chain: sd's draft
        (TreeShape((4, 4), 5), [4, 1]),  # one node kept for the last depth
    ],
)
def test_shape_and_budget(shape: TreeShape, per_depth: list[int]) -> None:
    tree = grow(shape).tree
    depths = tree.depths()
    assert [depths.count(d) for d in range(1, tree.depth + 1)] == per_depth
    assert len(tree) <= shape.budget


def test_greedy_children_are_the_drafters_best_tokens_best_first() -> None:
    drafter = table(2)
    tree = grow(TreeShape((3, 2), 5)).tree
    root_children = [tree.tokens[c] for c in tree.children(ROOT)]
    assert root_children == torch.topk(drafter[len(CONTEXT) - 1], 3).indices.tolist()
    # Depth 2 expands the most likely depth-1 node: the first child.
    assert [tree.parents[c] for c in range(3, 5)] == [0, 0]


def test_sampled_tree_sends_the_q_its_children_were_drawn_from() -> None:
    proposal = grow(TreeShape((3, 2, 1), 8), params=PARAMS, seed=3)
    tree, q = proposal.tree, proposal.q
    assert len(q) == len(tree) + 1
    for entry, node in enumerate([ROOT, *range(len(tree))]):
        children = tree.children(node)
        assert (q[entry] is None) == (not children)
        for c in children:
            assert q[entry].prob(tree.tokens[c]) > 0


class CountingHost(TableRuntime):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(table)
        self.fed: list[int] = []

    def tree_logits(self, session_id, context, tree, n_last):
        self.fed.append(n_last)
        return super().tree_logits(session_id, context, tree, n_last)


def test_second_stage_saves_passes_and_changes_nothing() -> None:
    """A drafter that follows the max-gram guess (2, 3, 0, 1 after CONTEXT) grows a chain in
    one pass instead of four, and the same tree with the same q."""
    follows = torch.full((len(CONTEXT) + 12, V), -4.0, dtype=torch.float64)  # (L, V)
    for t, token in enumerate([2, 3, 0, 1, 2, 3], start=len(CONTEXT) - 1):
        follows[t, token] = 4.0
    shape = TreeShape((2, 1, 1, 1), 5)
    for params in (SamplingParams(), PARAMS):
        plain = grow(shape, params, lookahead=0, host=CountingHost(follows), seed=1)
        host = CountingHost(follows)
        staged = grow(shape, params, lookahead=4, host=host, seed=1)
        assert staged.tree == plain.tree and plain.forwards == 4
        assert [None if d is None else d.ids.tolist() for d in staged.q] == [
            None if d is None else d.ids.tolist() for d in plain.q
        ]
        if params.greedy:  # sampling may stray from the guess; greedy follows it for sure
            assert staged.forwards == 1 and host.fed == [1 + 3]  # the root row and 3 guesses
            assert (staged.guessed, staged.saved) == (3, 3)
        assert (plain.guessed, plain.saved) == (0, 0) and len(plain.timed) == plain.forwards - 1


class KnownPasses(PassTimes):
    """Passes that cost 15 ms plus 18 ms a node (llama.cpp's 0.5B on two AVX2 cores)."""

    def line(self) -> tuple[float, float]:
        return 0.015, 0.018


def test_a_session_whose_guesses_miss_stops_guessing_and_probes_again() -> None:
    """The drafter's top token is always 5, which the max-gram model (2, 3, 0, 1 after
    CONTEXT) does not guess at first: each tree feeds three guesses below the root that miss
    (deeper, after 5 5, it guesses 5 and saves a pass or two: not enough). Once the ledger has
    seen MIN_GUESSES guesses, the session's trees stop guessing, but for one in PROBE_TREES."""
    avoid = torch.full((len(CONTEXT) + 12, V), -4.0, dtype=torch.float64)  # (L, V)
    avoid[:, 5] = 4.0
    host = CountingHost(avoid)
    core = DrafterCore(host, second_stage=4)
    core.pass_times = KnownPasses()
    guessed = []
    for step in range(4 + PROBE_TREES):
        host.fed.clear()
        asyncio.run(core.propose_tree("s", CONTEXT, TreeShape((1, 1, 1, 1), 4), GREEDY, step))
        guessed.append(host.fed[0] > 1)  # the first pass fed guesses beside the root row
    assert guessed == [True] * 3 + [False] * (PROBE_TREES - 1) + [True] + [False]
    assert not core.contexts.state("s").guesses.pays(core.pass_times)


# ---------------------------------------------------------------- greedy on tiny models


@pytest.mark.parametrize(
    "shape", [None, TreeShape((4, 2, 1), 12), TreeShape((2, 2, 2, 2), 30), TreeShape((1, 1, 1), 3)],
    ids=["default", "wide", "bushy", "chain"],
)
def test_greedy_staged_equals_plain_decoding(tiny_pair, shape) -> None:
    from transformers import AutoTokenizer

    from orchestrator.strategies import RoundInput, staged_round

    target = load_torch(tiny_pair.target_dir, dtype="float64", device="cpu", max_sessions=4)
    drafter = load_torch(tiny_pair.drafter_dir, dtype="float64", device="cpu", max_sessions=4)
    backends = Backends(VerifierCore(target), DrafterCore(drafter))
    context = AutoTokenizer.from_pretrained(tiny_pair.tokenizer_dir)("def add(a, b):\n    return a + b\n\ndef add(").input_ids
    expected, _ = asyncio.run(decode(backends, "ar", context, 40, SamplingParams(), session="ar"))
    out: list[int] = []
    step = 0
    while len(out) < 40:  # as the Engine runs it: the tree's depth capped by the room left
        r = RoundInput("st", context + out, GREEDY, 0, step, 4, max_draft=40 - len(out) - 1, tree=shape)
        result = asyncio.run(staged_round(backends, r))
        assert result.accepted <= result.drafted and len(result.tokens) == result.accepted + 1
        out += result.tokens
        step += 1
    assert out == expected


# ---------------------------------------------------------------- statistics

SHAPE = TreeShape((3, 2, 1), 8)  # three candidates at the root, two below the best, then one


def tree_p(target: torch.Tensor, tree: Tree) -> torch.Tensor:
    """p (N+1, V) after the context and after every node, for a position-only target table."""
    rows = [len(CONTEXT) - 1] + [len(CONTEXT) - 1 + d for d in tree.depths()]
    return target_probs(target[rows], PARAMS)


def rrs_variant(update_q: bool = True, update_p: bool = True):
    """Recursive rejection with parts switched off, to build wrong schemes; the defaults are
    services/multidraft.recursive_rejection."""

    def step(candidates, q, p, generator):
        p_i, q_i = p.double(), q.dense(p.numel()).double()
        for index, c in enumerate(candidates):
            r = torch.rand((), generator=generator, dtype=torch.float64).item()
            if r < min(1.0, float(p_i[c]) / float(q_i[c])):
                return index, c
            if update_p:
                p_i = (p_i - q_i).clamp(min=0)
                p_i = p_i / p_i.sum()
            if update_q:
                q_i = q_i.clone()
                q_i[c] = 0
                q_i = q_i / q_i.sum()
        return None, sample(p_i, generator)

    return step


def walk(tree: Tree, q, p: torch.Tensor, generator: torch.Generator, step) -> TreeVerdict:
    """verify_tree_sampled with a replaceable node rule."""
    path: list[int] = []
    node = ROOT
    while children := tree.children(node):
        chosen, token = step([tree.tokens[c] for c in children], q[node + 1], p[node + 1], generator)
        if chosen is None:
            return TreeVerdict(tuple(path), (*(tree.tokens[i] for i in path), token))
        node = children[chosen]
        path.append(node)
    return TreeVerdict(tuple(path), (*(tree.tokens[i] for i in path), sample(p[node + 1], generator)))


def staged_pvalue(verify, n_out: int, n: int, seed: int = 0) -> float:
    """How likely the first n_out tokens of n rounds of (the real drafter's sampled tree ->
    verify) are under the target's p_1 x ... x p_{n_out}; rounds repeat until n_out are out."""
    target, drafter = table(1), TableRuntime(table(2, sharpness=1.0))
    generator = torch.Generator().manual_seed(seed)
    counts = Counter()
    for s in range(n):
        out: list[int] = []
        while len(out) < n_out:
            # A fresh seed per round, as round_seed gives: drafts correlated across rounds
            # (one seed reused) make the output measurably wrong.
            draft_seed = (seed * n + s) * 8 + len(out)
            drafts = torch.Generator().manual_seed(draft_seed)
            proposal = propose_tree(drafter, "s", CONTEXT + out, SHAPE, PARAMS, 4, None, 0, drafts)
            p = tree_p(target[len(out) :], proposal.tree)  # shift the target table with the output
            out += verify(proposal.tree, proposal.q, p, generator).tokens
        counts[tuple(out[:n_out])] += 1
    p = target_probs(target[len(CONTEXT) - 1 :], PARAMS)  # (.., V)
    expected = {cell: math.prod(float(p[i, t]) for i, t in enumerate(cell)) for cell in itertools.product(range(V), repeat=n_out)}
    return chi_square_pvalue(counts, expected, n)


N = 1500  # the wrong schemes below fail with p < 1e-25 at this size


@pytest.mark.parametrize("n_out", [1, 2])
def test_tokens_are_distributed_as_p(n_out: int) -> None:
    assert staged_pvalue(verify_tree_sampled, n_out, N) > PASS


def test_rrs_variant_control_passes() -> None:
    """The control for the wrong schemes below: with its defaults, rrs_variant is right."""
    assert staged_pvalue(lambda t, q, p, g: walk(t, q, p, g, rrs_variant()), 1, N) > PASS


WRONG = {
    # SpecInfer's rule for candidates drawn WITH replacement, applied to draws without it.
    "q not updated after a rejection": rrs_variant(update_q=False),
    "p not updated after a rejection": rrs_variant(update_p=False),
}


@pytest.mark.parametrize("step", WRONG.values(), ids=WRONG.keys())
def test_statistic_rejects_a_wrong_scheme(step) -> None:
    assert staged_pvalue(lambda t, q, p, g: walk(t, q, p, g, step), 1, N) < FAIL


def test_staged_round_end_to_end_on_tables() -> None:
    """The first token of staged_round itself (drafter, verifier, tree pass, q on the way)."""
    target, drafter = table(1), table(2, sharpness=1.0)
    backends = Backends(VerifierCore(TableRuntime(target)), DrafterCore(TableRuntime(drafter), q_top=4))

    async def runs(n: int) -> Counter:
        counts = Counter()
        for s in range(n):
            out, _ = await decode(backends, "staged", CONTEXT, 1, PARAMS, seed=s)
            counts[tuple(out)] += 1
        return counts

    n = N
    p = target_probs(target[len(CONTEXT) - 1], PARAMS)
    assert chi_square_pvalue(asyncio.run(runs(n)), {(t,): float(p[t]) for t in range(V)}, n) > PASS


def test_recursive_rejection_accepts_more_than_one_candidate() -> None:
    """Why a tree pays: with q = p, the first candidate is always accepted; with a q far from
    p, later candidates are accepted often."""
    p = torch.tensor([0.1, 0.6, 0.3, 0.0])
    q = target_probs(torch.tensor([2.0, 0.0, 0.0, -9.0]), SamplingParams(temperature=1.0))
    from services.sampling import truncated

    q = truncated(q, 4)
    chosen = Counter()
    for s in range(400):
        g = torch.Generator().manual_seed(s)
        picks = q.ids[torch.multinomial(q.probs, 3, replacement=False, generator=g)].tolist()
        index, _ = recursive_rejection(picks, q, p, g)
        chosen[index] += 1
    assert chosen[1] + chosen[2] > 100
