"""Draft trees: hand-written fixtures for the structure (services/tree.py) and the greedy
and table-driven tree acceptance rules (services/multidraft.py). The runtimes' tree pass and
KV compaction are in tests/test_runtime.py, statistical tests of sampled tree verification
in tests/test_staged.py."""

from __future__ import annotations

import pytest
import torch

from services.multidraft import TreeVerdict, recursive_rejection, verify_tree_greedy, verify_tree_sampled
from services.sampling import SparseDist
from services.tree import ROOT, Tree, attention_bias

# The docstring's tree: node: token (parent)   0: 7 (root)  1: 8 (root)  2: 5 (0)  3: 6 (0)  4: 9 (2)
TREE = Tree(tokens=(7, 8, 5, 6, 9), parents=(-1, -1, 0, 0, 2))
X = True
_ = False


def test_structure_by_eye() -> None:
    assert TREE.children(ROOT) == [0, 1] and TREE.children(0) == [2, 3] and TREE.children(4) == []
    assert TREE.depths() == [1, 1, 2, 2, 3] and TREE.depth == 3
    assert [TREE.path(i) for i in range(5)] == [[0], [1], [0, 2], [0, 3], [0, 2, 4]]
    assert TREE.path(ROOT) == []
    assert TREE.positions(10).tolist() == [10, 10, 11, 11, 12]
    assert Tree.chain([4, 5, 6]) == Tree((4, 5, 6), (-1, 0, 1))


@pytest.mark.parametrize(
    ("tree", "path", "expected"),
    [
        # into an empty tree: a chain
        (Tree((), ()), (4, 5), Tree((4, 5), (ROOT, 0))),
        # the whole path is already there: the same tree
        (TREE, (7, 5, 9), TREE),
        (TREE, (8,), TREE),
        # follows 7 -> 5, then leaves the tree: one new node under node 2
        (TREE, (7, 5, 3), Tree((7, 8, 5, 6, 9, 3), (-1, -1, 0, 0, 2, 2))),
        # follows 7 -> 5 -> 9 and goes deeper
        (TREE, (7, 5, 9, 1, 2), Tree((7, 8, 5, 6, 9, 1, 2), (-1, -1, 0, 0, 2, 4, 5))),
        # a new first token: a new branch at the root, after every existing node
        (TREE, (6, 7), Tree((7, 8, 5, 6, 9, 6, 7), (-1, -1, 0, 0, 2, -1, 5))),
        # an empty path: the same tree
        (TREE, (), TREE),
    ],
)
def test_a_path_joins_a_tree_where_their_prefixes_agree(tree, path, expected) -> None:
    assert tree.with_path(path) == expected


def test_ancestor_mask_by_eye() -> None:
    assert TREE.ancestor_mask().tolist() == [
        # 0  1  2  3  4
        [X, _, _, _, _],  # 0
        [_, X, _, _, _],  # 1
        [X, _, X, _, _],  # 2
        [X, _, _, X, _],  # 3
        [X, _, X, _, X],  # 4
    ]


@pytest.mark.parametrize(
    "tokens, parents, message",
    [
        ((1, 2), (-1,), "one entry per node"),
        ((1, 2), (-1, 1), "earlier node"),
        ((1, 2), (-2, -1), "earlier node"),
        ((1, 1), (-1, -1), "appears twice"),
    ],
)
def test_malformed_trees_are_refused(tokens, parents, message) -> None:
    with pytest.raises(ValueError, match=message):
        Tree(tokens, parents)


def test_attention_bias_feeding_the_context_tail_and_every_node() -> None:
    """Context of 3 tokens, 2 cached: feed the last context token and the 5 nodes."""
    bias, positions = attention_bias(TREE, context_len=3, cached_context=2, cached_nodes=0, dtype=torch.float32)
    assert bias.shape == (1, 1, 6, 8)
    assert (bias[0, 0] == 0).tolist() == [
        # c0 c1 c2 n0 n1 n2 n3 n4
        [X, X, X, _, _, _, _, _],  # c2 (causal)
        [X, X, X, X, _, _, _, _],  # n0
        [X, X, X, _, X, _, _, _],  # n1
        [X, X, X, X, _, X, _, _],  # n2
        [X, X, X, X, _, _, X, _],  # n3
        [X, X, X, X, _, X, _, X],  # n4
    ]
    assert positions.tolist() == [[2, 3, 3, 4, 4, 5]]
    assert float(bias.min()) == torch.finfo(torch.float32).min


def test_attention_bias_feeding_only_new_nodes() -> None:
    """The whole context and nodes 0-2 cached (a drafter's second depth): feed nodes 3 and 4."""
    bias, positions = attention_bias(TREE, context_len=3, cached_context=3, cached_nodes=3, dtype=torch.float64)
    assert (bias[0, 0] == 0).tolist() == [
        [X, X, X, X, _, _, X, _],  # n3
        [X, X, X, X, _, X, _, X],  # n4
    ]
    assert positions.tolist() == [[4, 5]]


# ---------------------------------------------------------------- acceptance on trees


@pytest.mark.parametrize(
    "argmax, path, tokens",
    [  # the rows of services/multidraft.py's worked example; entry 0 after the root, 1 + i after node i
        ([7, 6, 0, 0, 1, 0], (0, 3), (7, 6, 1)),
        ([8, 0, 4, 0, 0, 0], (1,), (8, 4)),
        ([3, 0, 0, 0, 0, 0], (), (3,)),
        ([7, 5, 0, 9, 0, 2], (0, 2, 4), (7, 5, 9, 2)),  # the deepest leaf: 2 is the bonus
    ],
)
def test_verify_tree_greedy(argmax, path, tokens) -> None:
    assert verify_tree_greedy(TREE, argmax) == TreeVerdict(path, tokens)


def one_hot_rows(*tokens: int, vocab: int = 12) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).double()  # (len, V)


def test_sampled_rule_on_one_hot_p_is_the_greedy_rule() -> None:
    p = one_hot_rows(7, 6, 0, 0, 1, 0)  # (N+1, V)
    for seed in range(30):
        verdict = verify_tree_sampled(TREE, [], p, torch.Generator().manual_seed(seed))
        assert verdict == TreeVerdict((0, 3), (7, 6, 1))


def test_recursive_rejection_certain_outcomes() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.0, 1.0, 0.0])  # (V,)
    # Point-mass candidates: the second one is the target's certain token.
    assert recursive_rejection([1, 2], None, p, g) == (1, 2)
    # No candidate can be accepted: the token comes from the residual, never a candidate.
    assert recursive_rejection([0, 1], SparseDist(torch.tensor([0, 1]), torch.tensor([0.5, 0.5])), p, g) == (None, 2)


def test_recursive_rejection_refuses_a_candidate_q_cannot_draw() -> None:
    q = SparseDist(torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
    with pytest.raises(AssertionError, match="q = 0"):
        recursive_rejection([3], q, torch.full((4,), 0.25), torch.Generator())


@pytest.mark.parametrize(
    ("tree", "first"),
    [
        (TREE, [7, 5, 9]),  # 7 before 8, 5 before 6, then 9
        (Tree((), ()), []),
        (Tree.chain([4, 5, 6]), [4, 5, 6]),
        # the first child of the root has no children: the path ends there, whatever its sibling holds
        (Tree((1, 2, 3), (-1, -1, 1)), [1]),
    ],
)
def test_the_first_path_follows_every_nodes_first_child(tree, first) -> None:
    assert tree.first_path() == first
