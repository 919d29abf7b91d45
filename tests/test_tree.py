"""Draft trees: hand-written fixtures for the structure (services/tree.py), the tree pass and
KV compaction of the runtime, and the greedy and table-driven tree acceptance rules
(services/multidraft.py). Statistical tests of sampled tree verification are in
tests/test_staged.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.multidraft import TreeVerdict, recursive_rejection, verify_tree_greedy, verify_tree_sampled
from services.runtime import TREE_PREFILL, ModelHost, ModelInfo
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
    with pytest.raises(AssertionError, match=message):
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


# ---------------------------------------------------------------- the runtime's tree pass

INFO = ModelInfo("tiny", 512, 2048, (2,), "float64", "cpu", "x")
CONTEXT = list(range(30, 50))


@pytest.fixture(scope="module")
def model(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir, dtype=torch.float64).eval()


@torch.inference_mode()
def last_logits(model, seq: list[int]) -> torch.Tensor:
    return model(torch.tensor([seq])).logits[0, -1]  # (V,)


def path_seq(tree: Tree, node: int) -> list[int]:
    return CONTEXT + [tree.tokens[i] for i in tree.path(node)]


def test_tree_pass_equals_a_chain_pass_per_path(model) -> None:
    host = ModelHost(model, INFO, max_sessions=2)
    host.logits("s", CONTEXT[:12], 1)  # a warm cache over part of the context: 8 tokens ride along
    rows = host.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)  # (N+1, V)
    assert torch.allclose(rows[0], last_logits(model, CONTEXT), atol=1e-9)
    for node in range(len(TREE)):
        assert torch.allclose(rows[1 + node], last_logits(model, path_seq(TREE, node)), atol=1e-9), node
    assert host.session("s").cache.get_seq_length() == len(CONTEXT) + len(TREE)


def test_a_long_uncached_context_is_prefilled_first(model) -> None:
    """Above TREE_PREFILL uncached tokens, the context gets a causal pass of its own first."""
    host = ModelHost(model, INFO, max_sessions=2)
    context = list(range(100, 100 + TREE_PREFILL + 20))
    rows = host.tree_logits("s", context, TREE, len(TREE) + 1)
    assert torch.allclose(rows[0], last_logits(model, context), atol=1e-9)
    assert torch.allclose(rows[5], last_logits(model, context + [7, 5, 9]), atol=1e-9)
    assert host.session("s").cache.get_seq_length() == len(context) + len(TREE)


def test_keep_path_compacts_the_cache_to_the_accepted_path(model) -> None:
    host = ModelHost(model, INFO, max_sessions=2)
    host.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)
    host.keep_path("s", [0, 2, 4])
    state = host.session("s")
    assert state.cached_tokens == CONTEXT + [7, 5, 9] and state.cached_tree is None
    assert state.cache.get_seq_length() == len(CONTEXT) + 3
    # The compacted cache is the one a chain pass builds: the next token's logits agree.
    seq = CONTEXT + [7, 5, 9, 11]
    assert torch.allclose(host.logits("s", seq, 1)[0], last_logits(model, seq), atol=1e-9)
    assert state.cache.get_seq_length() == len(seq)


def test_keep_path_refuses_a_non_path(model) -> None:
    host = ModelHost(model, INFO, max_sessions=2)
    host.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)
    with pytest.raises(AssertionError, match="not a path"):
        host.keep_path("s", [0, 4])


def test_a_later_pass_keeps_the_cached_path_it_continues(model) -> None:
    """A drafter's cache after a tree round: the next context runs through nodes 0 and 3."""
    host = ModelHost(model, INFO, max_sessions=2)
    host.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)
    seq = CONTEXT + [7, 6, 12]
    assert torch.allclose(host.logits("s", seq, 1)[0], last_logits(model, seq), atol=1e-9)
    assert host.session("s").cache.get_seq_length() == len(seq)


def test_growing_a_tree_feeds_only_new_nodes(model) -> None:
    host = ModelHost(model, INFO, max_sessions=2)
    first = Tree((7, 8), (-1, -1))
    host.tree_logits("s", CONTEXT, first, 3)
    rows = host.tree_logits("s", CONTEXT, TREE, 3)  # nodes 2, 3, 4 are new
    assert host.session("s").cache.get_seq_length() == len(CONTEXT) + len(TREE)
    for row, node in zip(rows, (2, 3, 4)):
        assert torch.allclose(row, last_logits(model, path_seq(TREE, node)), atol=1e-9)


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
