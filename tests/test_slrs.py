"""Tests for services/slrs.py, on a synthetic target and drafter with different vocabularies.

The target is a fixed random Markov model over overlapping byte strings (its distribution
depends on the last token only, so the same text is likelier under one tokenization than
another); the drafter has its own vocabulary and Markov model. Hand-written cases a reviewer
can check by eye, brute-force checks of the tree and of F, greedy against the target's own
greedy decoding, then statistical tests that sampled rounds commit tokens distributed exactly
as the target's, with wrong schemes that must fail the same test.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch
from test_acceptance import FAIL, PASS, chi_square_pvalue

from services.slrs import (
    PrefixIndex,
    StringProposal,
    StringVerdict,
    TreeTarget,
    build_tree,
    candidate_strings,
    verify_strings,
)
from services.tree import Tree

pytestmark = pytest.mark.usefixtures("single_thread_torch")

# ---------------------------------------------------------------- the synthetic pair

VOCAB = (b"a", b"b", b"ab", b"ba", b"aba", b"bb", None, b"ab")  # 6: END; 7 repeats 2's bytes
END = 6
V = len(VOCAB)
INDEX = PrefixIndex(VOCAB)


def markov_table(seed: int, rows: int, size: int, sharpness: float = 1.5) -> torch.Tensor:
    logits = torch.randn(rows, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sharpness
    return logits.softmax(dim=-1)  # (rows, size)


TARGET = markov_table(0, V + 1, V)  # (V+1, V): row t after token t, row V at the start
TARGET[:, END] *= 0.3  # texts a few tokens long, so rounds see END both early and not at all
TARGET /= TARGET.sum(dim=-1, keepdim=True)


def target_p(path: Sequence[int]) -> torch.Tensor:
    """(V,) the target's distribution after a token path (the context included)."""
    return TARGET[path[-1] if path else V]


def tree_probs(context: Sequence[int], tree: Tree) -> torch.Tensor:
    """(N+1, V): row 0 after the context, row 1 + i after node i (the target is Markov)."""
    return torch.stack([target_p(context), *(TARGET[t] for t in tree.tokens)])


DRAFT_VOCAB = (b"a", b"b", b"ab", b"ba", b"bab")
DRAFTER = markov_table(1, len(DRAFT_VOCAB) + 1, len(DRAFT_VOCAB))  # row d after d, the last at the start
START = len(DRAFT_VOCAB)


def same_length_q(dist: torch.Tensor, length: int, scale: float = 1.0) -> dict[bytes, float]:
    """The drafter's dist (its vocabulary) as q over strings of one byte length: restricted,
    summed over equal bytes, renormalised (times scale; 1 / P(length) undoes the renormalising)."""
    q: dict[bytes, float] = {}
    for d, piece in enumerate(DRAFT_VOCAB):
        if len(piece) == length:
            q[piece] = q.get(piece, 0.0) + float(dist[d])
    total = sum(q.values())
    return {x: scale * v / total for x, v in q.items()}


@dataclass
class FakeDrafter:
    """Drafts k tokens from its Markov model: 'sampled' draws and sends q, 'point' sends its argmax
    and no q (a greedy drafter). Draws are made in batches per state only because one
    multinomial per token would dominate run time."""

    kind: str
    generator: torch.Generator
    pools: dict[int, list[int]] = field(default_factory=dict)

    def propose(self, k: int) -> list[StringProposal]:
        proposals, state = [], START
        for _ in range(k):
            dist = DRAFTER[state]
            if self.kind == "point":
                state = int(dist.argmax())
                proposals.append(StringProposal(DRAFT_VOCAB[state]))
                continue
            if not self.pools.get(state):
                self.pools[state] = torch.multinomial(dist, 4096, replacement=True, generator=self.generator).tolist()
            state = self.pools[state].pop()
            piece = DRAFT_VOCAB[state]
            proposals.append(StringProposal(piece, same_length_q(dist, len(piece))))
        return proposals


# ---------------------------------------------------------------- brute force


def brute_paths(strings: Sequence[bytes]) -> set[tuple[int, ...]]:
    """Every non-empty target token path whose bytes are a prefix of one of strings."""
    found: set[tuple[int, ...]] = set()

    def walk(path: tuple[int, ...], spelled: bytes) -> None:
        for t, piece in enumerate(VOCAB):
            if piece is not None and any(s.startswith(spelled + piece) for s in strings):
                found.add((*path, t))
                walk((*path, t), spelled + piece)

    walk((), b"")
    return found


def brute_prefix_prob(context: Sequence[int], y: bytes) -> float:
    """P(the target's text after context starts with y), summing over token sequences."""

    def walk(path: list[int], spelled: bytes) -> float:
        if len(spelled) >= len(y):
            return float(spelled.startswith(y))
        if not y.startswith(spelled):
            return 0.0
        p = target_p(context + path)
        return sum(float(p[t]) * walk(path + [t], spelled + piece) for t, piece in enumerate(VOCAB) if piece)

    return walk([], b"")


def target_greedy(context: Sequence[int], n: int) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < n and END not in tokens:
        tokens.append(int(target_p([*context, *tokens]).argmax()))
    return tokens


def first_tokens_distribution(n: int) -> dict[tuple[int, ...], float]:
    """The target's first n tokens, END ending a sequence early: {tokens: probability}."""
    dist: dict[tuple[int, ...], float] = {}

    def walk(path: tuple[int, ...], prob: float) -> None:
        if len(path) == n or (path and path[-1] == END):
            dist[path] = dist.get(path, 0.0) + prob
            return
        for t, p_t in enumerate(target_p(path).tolist()):
            walk((*path, t), prob * p_t)

    walk((), 1.0)
    return dist


# ---------------------------------------------------------------- PrefixIndex


def test_prefix_index_docstring_example() -> None:
    index = PrefixIndex((b"a", b"b", b"ab", None, b"ba", b"a"))
    assert index.order.tolist() == [0, 5, 2, 1, 4]
    assert [index.range(r) for r in (b"a", b"ab", b"", b"c", b"b", b"bab")] == [
        (0, 3), (2, 3), (0, 5), (5, 5), (3, 5), (5, 5)
    ]  # fmt: skip
    assert index.exact(b"a") == (0, 5) and index.exact(b"x") == () and index.vocab_size == 6
    assert index.text([2, 3, 4]) == b"abba"


def test_prefix_index_ranges_match_brute_force_including_0xff() -> None:
    vocab = (b"\xff", b"a\xff", b"a\xff\xff", b"b", b"a", b"\xff\x00", None, b"a\xffb", b"\x00")
    index = PrefixIndex(vocab)
    for length in range(4):
        for r in map(bytes, itertools.product(b"ab\xff\x00", repeat=length)):
            lo, hi = index.range(r)
            expected = {t for t, piece in enumerate(vocab) if piece is not None and piece.startswith(r)}
            assert set(index.order[lo:hi].tolist()) == expected and hi - lo == len(expected), r


def test_prefix_index_refuses_tokens_without_bytes() -> None:
    with pytest.raises(AssertionError, match="have no bytes"):
        PrefixIndex((b"a", b""))


# ---------------------------------------------------------------- proposals and the tree


@pytest.mark.parametrize(
    "text, q, message",
    [
        (b"", None, "at least one byte"),
        (b"ab", {b"ab": 0.5, b"b": 0.5}, "proposal's length 2"),
        (b"ab", {b"ba": 1.0}, "has q = 0"),
        (b"ab", {b"ab": 0.5, b"ba": 0.4}, "sum to 1"),
    ],
)
def test_malformed_proposals_are_refused(text: bytes, q: dict | None, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        StringProposal(text, q)


def test_build_tree_docstring_example() -> None:
    index = PrefixIndex((b"a", b"b", b"ab", None))
    tree, node_bytes, kept = build_tree(index, [StringProposal(b"ab")], max_nodes=10)
    assert tree == Tree(tokens=(0, 2, 1), parents=(-1, -1, 0)) and node_bytes == [b"a", b"ab", b"ab"] and kept == 1
    assert build_tree(index, [StringProposal(b"ab")], max_nodes=2) == (Tree((), ()), [], 0)


PROPOSALS = [
    StringProposal(b"ab", {b"ab": 0.6, b"ba": 0.3, b"bb": 0.1}),
    StringProposal(b"a", {b"a": 0.7, b"b": 0.3}),
    StringProposal(b"bab"),
]


def test_candidate_strings() -> None:
    assert candidate_strings(PROPOSALS) == [[b"ab", b"ba", b"bb"], [b"aba", b"abb"], [b"ababab"]]


def test_build_tree_holds_every_tokenization_of_every_candidate() -> None:
    tree, node_bytes, kept = build_tree(INDEX, PROPOSALS, max_nodes=1000)
    paths = [tuple(tree.tokens[j] for j in tree.path(i)) for i in range(len(tree))]
    assert kept == 3 and len(set(paths)) == len(paths)
    assert set(paths) == brute_paths([s for position in candidate_strings(PROPOSALS) for s in position])
    assert node_bytes == [INDEX.text(path) for path in paths]
    assert {7, 2} <= set(tree.tokens)  # both ids spelling "ab"


def test_build_tree_keeps_the_positions_that_fit() -> None:
    sizes = [len(build_tree(INDEX, PROPOSALS[:j], 1000)[0]) for j in range(4)]
    assert sizes[0] == 0 and sizes[1] < sizes[2] < sizes[3]
    for max_nodes in range(sizes[3] + 2):
        tree, node_bytes, kept = build_tree(INDEX, PROPOSALS, max_nodes)
        assert kept == max(j for j in range(4) if sizes[j] <= max_nodes)
        assert (tree, node_bytes) == build_tree(INDEX, PROPOSALS[:kept], 1000)[:2]


# ---------------------------------------------------------------- F


def test_prefix_prob_docstring_example() -> None:
    index = PrefixIndex((b"a", b"b", b"ab", None))
    tree, node_bytes, _ = build_tree(index, [StringProposal(b"ab")], max_nodes=10)
    probs = torch.tensor(
        [[0.5, 0.1, 0.3, 0.1], [0.2, 0.4, 0.2, 0.2], [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7]],
        dtype=torch.float64,
    )  # (N+1, V): root, after a, after ab, after a b
    target = TreeTarget.build(tree, node_bytes, probs, index, [b"a", b"ab"])
    assert target.prefix_prob(b"ab") == pytest.approx(0.3 + 0.5 * 0.4)
    assert target.prefix_prob(b"a") == pytest.approx(0.5 + 0.3) and target.prefix_prob(b"") == 1.0


@pytest.mark.parametrize("context", [[], [2], [4], [5, 1]])
def test_prefix_prob_is_the_probability_the_text_starts_with_y(context: list[int]) -> None:
    tree, node_bytes, _ = build_tree(INDEX, PROPOSALS, max_nodes=1000)
    strings = [s for position in candidate_strings(PROPOSALS) for s in position]
    prefixes = sorted({s[:j] for s in strings for j in range(len(s) + 1)})
    target = TreeTarget.build(tree, node_bytes, tree_probs(context, tree), INDEX, prefixes)
    for y in prefixes:
        assert target.prefix_prob(y) == pytest.approx(brute_prefix_prob(context, y), abs=1e-12), y


def test_tokens_outside_a_near_certain_string_need_no_retries() -> None:
    """A confident target and a point-mass q: M_out = 1e-9. Recovery draws outside supp(q) directly
    (a loop drawing continuations until one falls outside would need ~1e9 tries)."""
    index = PrefixIndex((b"a", b"b", None))
    tree, node_bytes, _ = build_tree(index, [StringProposal(b"a")], max_nodes=10)
    probs = torch.tensor([[1 - 3e-9, 1e-9, 2e-9], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)  # (N+1, V)
    target = TreeTarget.build(tree, node_bytes, probs, index, [b"a"])
    generator = torch.Generator().manual_seed(0)
    counts = Counter(tuple(target.sample_tokens(b"", [b"a"], generator)) for _ in range(3000))
    assert set(counts) == {(1,), (2,)} and 800 < counts[(1,)] < 1200  # b : END = 1 : 2


# ---------------------------------------------------------------- greedy


def greedy_cases(n: int) -> list[tuple[list[int], list[StringProposal]]]:
    """(context, proposals): the target's own greedy text cut into 1-3 byte pieces, the last
    piece sometimes corrupted, or a drafter's proposals."""
    rng = torch.Generator().manual_seed(3)
    drafter = FakeDrafter("sampled", rng)
    cases = []
    for case in range(n):
        context = torch.randint(0, V, (int(torch.randint(0, 3, (), generator=rng)),), generator=rng).tolist()
        context = [t for t in context if t != END]
        if case % 2:
            cases.append((context, drafter.propose(3)))
            continue
        text = INDEX.text(target_greedy(context, 6)) or b"a"
        pieces, at = [], 0
        while at < len(text) and len(pieces) < 4:
            width = int(torch.randint(1, 4, (), generator=rng))
            pieces.append(text[at : at + width])
            at += width
        if case % 4 == 0:
            pieces[-1] = pieces[-1][:-1] + (b"b" if pieces[-1][-1:] == b"a" else b"a")
        cases.append((context, [StringProposal(piece) for piece in pieces]))
    return cases


def test_greedy_commits_the_targets_greedy_continuation() -> None:
    accepted = Counter()
    for context, proposals in greedy_cases(200):
        tree, node_bytes, kept = build_tree(INDEX, proposals, max_nodes=200)
        probs = torch.nn.functional.one_hot(tree_probs(context, tree).argmax(dim=-1), V).double()  # (N+1, V)
        generator = torch.Generator().manual_seed(0)
        state = generator.get_state()
        verdict = verify_strings(tree, node_bytes, probs, proposals[:kept], INDEX, generator, greedy=True)
        assert list(verdict.tokens) == target_greedy(context, len(verdict.tokens))
        assert torch.equal(generator.get_state(), state)
        text, spelled, n = INDEX.text(verdict.tokens), b"", 0
        while n < kept and text.startswith(spelled + proposals[n].text):
            spelled += proposals[n].text
            n += 1
        assert verdict.accepted == n
        accepted[n] += 1
    assert len(accepted) >= 3  # the cases accept none, some and all


def test_sampled_rule_on_one_hot_p_with_point_masses_is_greedy() -> None:
    for context, proposals in greedy_cases(200):
        proposals = [StringProposal(proposal.text) for proposal in proposals]
        tree, node_bytes, kept = build_tree(INDEX, proposals, max_nodes=200)
        probs = torch.nn.functional.one_hot(tree_probs(context, tree).argmax(dim=-1), V).double()  # (N+1, V)
        args = (tree, node_bytes, probs, proposals[:kept], INDEX, torch.Generator().manual_seed(1))
        assert verify_strings(*args, greedy=False) == verify_strings(*args, greedy=True)


def test_verifying_more_proposals_than_the_tree_kept_is_refused() -> None:
    tree, node_bytes, kept = build_tree(INDEX, PROPOSALS, max_nodes=20)
    assert kept < len(PROPOSALS)
    probs = tree_probs([], tree)
    with pytest.raises(AssertionError, match="the tree lacks token"):
        verify_strings(tree, node_bytes, probs, PROPOSALS, INDEX, torch.Generator().manual_seed(0), greedy=False)


def test_no_proposals_is_a_plain_target_step() -> None:
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # (1, V)
    for greedy in (True, False):
        verdict = verify_strings(Tree((), ()), [], probs, [], INDEX, torch.Generator().manual_seed(0), greedy)
        assert verdict == StringVerdict(0, (2,))


# ---------------------------------------------------------------- statistics

Verify = Callable[..., StringVerdict]


def generate(verify: Verify, drafter: FakeDrafter, n_out: int, k: int, max_nodes: int, generator) -> tuple[int, ...]:
    """Rounds of propose -> build_tree -> verify until n_out tokens or END; the first n_out."""
    out: list[int] = []
    while len(out) < n_out and END not in out:
        proposals = drafter.propose(k)
        tree, node_bytes, kept = build_tree(INDEX, proposals, max_nodes)
        verdict = verify(tree, node_bytes, tree_probs(out, tree), proposals[:kept], INDEX, generator, False)
        out.extend(verdict.tokens)
    if END in out:
        out = out[: out.index(END) + 1]
    return tuple(out[:n_out])


def output_pvalue(
    verify: Verify, kind: str = "sampled", n_out: int = 2, k: int = 2, max_nodes: int = 100, n: int = 4000
) -> float:
    drafter = FakeDrafter(kind, torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(12)
    counts = Counter(generate(verify, drafter, n_out, k, max_nodes, generator) for _ in range(n))
    return chi_square_pvalue(counts, first_tokens_distribution(n_out), n)


@pytest.mark.parametrize(
    "kind, n_out, k, max_nodes",
    [
        ("sampled", 2, 2, 100),
        ("point", 2, 2, 100),
        ("sampled", 3, 3, 24),  # the tree budget cuts positions off, on some rounds all of them
    ],
)
def test_committed_tokens_are_distributed_as_the_targets(kind: str, n_out: int, k: int, max_nodes: int) -> None:
    assert output_pvalue(verify_strings, kind, n_out, k, max_nodes) > PASS


def slrs_variant(
    q_of: Callable[[Sequence[StringProposal], int], dict[bytes, float]] = lambda proposals, i: proposals[i].support(),
    outside: bool = True,
    exclude_support: bool = True,
) -> Verify:
    """verify_strings with replaceable parts, to build wrong schemes; the defaults are right."""

    def verify(tree, node_bytes, probs, proposals, index, generator, greedy):
        strings = [s for position in candidate_strings(proposals) for s in position]
        target = TreeTarget.build(tree, node_bytes, probs, index, strings)
        accepted = b""
        for n, proposal in enumerate(proposals):
            q = q_of(proposals, n)
            p = {x: target.prefix_prob(accepted + x) / target.prefix_prob(accepted) for x in q}
            u = torch.rand((), generator=generator, dtype=torch.float64).item()
            if u < p[proposal.text] / q[proposal.text]:
                accepted += proposal.text
                continue
            residual = [max(0.0, p[x] - q[x]) for x in q]
            # outside=False drops M_out, except where the residual is empty and it is all there is
            m_out = 1.0 - sum(p.values()) if outside or not any(residual) else 0.0
            weights = torch.tensor([*residual, m_out if m_out > 1e-12 else 0.0], dtype=torch.float64)
            pick = int(torch.multinomial(weights, 1, generator=generator))
            if pick < len(q):
                return StringVerdict(n, tuple(target.sample_tokens(accepted + list(q)[pick], [], generator)))
            exclude = [accepted + x for x in q] if exclude_support else []
            return StringVerdict(n, tuple(target.sample_tokens(accepted, exclude, generator)))
        return StringVerdict(len(proposals), tuple(target.sample_tokens(accepted, [], generator)))

    return verify


def q_over_all_lengths(proposals: Sequence[StringProposal], i: int) -> dict[bytes, float]:
    """The drafter's probability of each string of its token's length, not given that length."""
    dist = DRAFTER[DRAFT_VOCAB.index(proposals[i - 1].text) if i else START]
    length = len(proposals[i].text)
    return same_length_q(dist, length, scale=sum(float(dist[d]) for d, x in enumerate(DRAFT_VOCAB) if len(x) == length))


def test_variant_with_its_defaults_is_verify_strings() -> None:
    """The control for the wrong schemes below: same verdicts, same seeds."""
    drafter = FakeDrafter("sampled", torch.Generator().manual_seed(5))
    for seed in range(300):
        context = [seed % 6] if seed % 3 else []
        proposals = drafter.propose(3)
        tree, node_bytes, kept = build_tree(INDEX, proposals, 200)
        args = (tree, node_bytes, tree_probs(context, tree), proposals[:kept], INDEX)
        expected = verify_strings(*args, torch.Generator().manual_seed(seed), False)
        assert slrs_variant()(*args, torch.Generator().manual_seed(seed), False) == expected


WRONG_SCHEMES = {
    "q over all lengths, not given the length": slrs_variant(q_of=q_over_all_lengths),
    "residual without M_out": slrs_variant(outside=False),
    "outcome outside supp(q) drawn from p, supp(q) not excluded": slrs_variant(exclude_support=False),
}


@pytest.mark.parametrize("verify", WRONG_SCHEMES.values(), ids=WRONG_SCHEMES.keys())
def test_statistic_rejects_a_wrong_scheme(verify: Verify) -> None:
    """Same scenario, seeds and sample size under which verify_strings passes."""
    assert output_pvalue(verify) < FAIL
