"""Draft trees: the structure a staged draft travels in, and what one tree pass needs.

A tree hangs below the root, the end of the context. Node i holds a token and the index of
its parent: -1 for the root, otherwise an earlier node, so nodes are in topological order and
a node's path from the root is its context continuation. Siblings are listed in the order
the drafter drew them (the multi-draft acceptance rule depends on it).

One model pass over all N nodes yields the distribution after every node at once, if node i
attends to the whole context, to its ancestors and to itself - never to its siblings or
cousins - and sits at position len(context) + depth(i) - 1, where it would be in a chain.

Worked example, context of 10 tokens, tree (tokens 7, 8, 5, 6, 9):

    node  token  parent  depth  position  path       attends to (nodes)
    0     7      -1      1      10        7          0
    1     8      -1      1      10        8          1
    2     5      0       2      11        7 5        0 2
    3     6      0       2      11        7 6        0 3
    4     9      2       3      12        7 5 9      0 2 4

Pure: torch and the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ROOT = -1


@dataclass(frozen=True)
class TreeShape:
    """How a drafter grows a tree: at depth d every expanded node gets up to branching[d-1]
    children, and the tree holds at most `budget` nodes (see drafter_svc.draft.propose_tree)."""

    branching: tuple[int, ...]  # children per expanded node, by depth; the depth is its length
    budget: int  # most nodes in the tree: what one target pass verifies

    def problems(self, max_nodes: int | None = None) -> list[str]:
        found = []
        if not self.branching or any(b < 1 for b in self.branching):
            found.append(f"tree branching needs at least one depth and every entry >= 1, got {list(self.branching)}")
        if self.budget < 1:
            found.append(f"tree budget must be >= 1, got {self.budget}")
        if max_nodes is not None and self.budget > max_nodes:
            found.append(f"a tree budget of {self.budget} nodes is above the limit of {max_nodes}")
        return found


@dataclass(frozen=True)
class Tree:
    tokens: tuple[int, ...]  # (N,) token of each node
    parents: tuple[int, ...]  # (N,) parent of each node: ROOT or an earlier node

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(
                f"tokens and parents must have one entry per node, got {len(self.tokens)} and {len(self.parents)}"
            )
        for i, parent in enumerate(self.parents):
            if not ROOT <= parent < i:
                raise ValueError(f"node {i}'s parent must be -1 (the root) or an earlier node, got {parent}")
        seen = set()
        for token, parent in zip(self.tokens, self.parents):
            if (parent, token) in seen:
                raise ValueError(f"token {token} appears twice among the children of {parent}")
            seen.add((parent, token))

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> Tree:
        """A tree with one child per node: an ordinary draft d_1..d_k."""
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        """The children of node (ROOT for the root's), in sibling order."""
        return [i for i, parent in enumerate(self.parents) if parent == node]

    def path(self, node: int) -> list[int]:
        """The nodes from the root down to node, node included; [] for the root."""
        nodes = []
        while node != ROOT:
            nodes.append(node)
            node = self.parents[node]
        return nodes[::-1]

    def first_path(self) -> list[int]:
        """The tokens down the first child of every node from the root: with siblings in
        the order drawn, the chain a drafter drafting one candidate a position would give."""
        tokens, node = [], ROOT
        while children := self.children(node):
            node = children[0]
            tokens.append(self.tokens[node])
        return tokens

    def leaves(self) -> list[int]:
        """The nodes without children, in node order."""
        parents = set(self.parents)
        return [i for i in range(len(self)) if i not in parents]

    def prefix(self, n: int) -> Tree:
        """The tree of the first n nodes (a tree, since parents come before their children)."""
        return Tree(self.tokens[:n], self.parents[:n])

    def depths(self) -> list[int]:
        """Depth of each node: 1 for the root's children."""
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 if parent == ROOT else depth[parent] + 1)
        return depth

    @property
    def depth(self) -> int:
        """The longest path: how many positions the tree drafts."""
        return max(self.depths(), default=0)

    def ancestor_mask(self) -> Tensor:
        """(N, N) bool: [i, j] is True iff node j is node i or one of its ancestors."""
        mask = torch.zeros(len(self), len(self), dtype=torch.bool)  # (N, N)
        for i, parent in enumerate(self.parents):
            if parent != ROOT:
                mask[i] = mask[parent]
            mask[i, i] = True
        return mask

    def positions(self, context_len: int) -> Tensor:
        """(N,) int64 position id of each node after a context of context_len tokens."""
        return context_len - 1 + torch.tensor(self.depths(), dtype=torch.int64)

    def with_path(self, tokens: Sequence[int]) -> Tree:
        """The tree with the draft `tokens` added as a path from the root: it follows the
        nodes already there for as long as they hold its tokens, and adds the rest after the
        existing nodes (so every node keeps its index, and new siblings come last)."""
        out_tokens, out_parents = list(self.tokens), list(self.parents)
        node = ROOT
        for token in tokens:
            child = next((i for i in self.children(node) if out_tokens[i] == token), None) if node < len(self) else None
            if child is None:
                out_tokens.append(token)
                out_parents.append(node)
                child = len(out_tokens) - 1
            node = child
        return Tree(tuple(out_tokens), tuple(out_parents))

    def prefix_of(self, other: Tree) -> bool:
        """Whether this tree's nodes are the first nodes of other (same tokens and parents)."""
        n = len(self)
        return other.tokens[:n] == self.tokens and other.parents[:n] == self.parents


def attention_bias(
    tree: Tree, context_len: int, cached_context: int, cached_nodes: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The attention mask and position ids of a pass that feeds the uncached part of
    context + tree, given a KV cache that holds the first `cached_context` context tokens and
    then (only when the whole context is cached) the first `cached_nodes` nodes.

    Returns an additive mask (1, 1, T, S) of dtype - 0 where attending, the dtype's minimum
    elsewhere - and position ids (1, T): T = fed tokens (context tokens, then nodes), S = what
    the cache holds after the pass (context, then every node in node order).
    """
    assert 0 <= cached_context <= context_len and 0 <= cached_nodes <= len(tree)
    assert cached_nodes == 0 or cached_context == context_len, "nodes can only be cached after the whole context"
    n = len(tree)
    fed_context = context_len - cached_context
    total = context_len + n  # (S,)
    allowed = torch.zeros(fed_context + n - cached_nodes, total, dtype=torch.bool)  # (T, S)
    for row in range(fed_context):  # a context token: causal over the context
        allowed[row, : cached_context + row + 1] = True
    ancestors = tree.ancestor_mask()  # (N, N)
    for row, node in enumerate(range(cached_nodes, n), start=fed_context):
        allowed[row, :context_len] = True
        allowed[row, context_len:] = ancestors[node]
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)  # (T, S)
    positions = torch.cat(
        [torch.arange(cached_context, context_len, dtype=torch.int64), tree.positions(context_len)[cached_nodes:]]
    )  # (T,)
    return bias[None, None], positions[None]
