"""Tree verification: which path of a draft tree the target keeps, and the one token it adds.

Vocabulary as in services/acceptance.py, per node of the tree: the children of a node are its
candidates c_1..c_m (in the order the drafter drew them); p is the target's distribution
after the node, q the drafter's distribution the candidates were drawn from. Walking down from
the root, at most one candidate per node is accepted; the walk ends at a node where none is
(a recovered token is drawn) or at a leaf (a bonus token is drawn from p after it). A round
emits the accepted path's n tokens plus that one token.

Worked example (greedy), tree as in services/tree.py (node: token) 0: 7, 1: 8, 2: 5 under 0,
3: 6 under 0, 4: 9 under 2:

    target argmax after   root 7 | node 0 6 | node 3 1     path (0, 3), tokens (7, 6, 1)
    target argmax after   root 8 | node 1 4                path (1,), tokens (8, 4) - 4 is the bonus (1 is a leaf)
    target argmax after   root 3                           path (), tokens (3,)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from services.sampling import SparseDist, sample
from services.tree import ROOT, Tree


@dataclass(frozen=True)
class TreeVerdict:
    path: tuple[int, ...]  # accepted nodes, root first; n = len(path)
    tokens: tuple[int, ...]  # their tokens, then the recovered or bonus token; n + 1 entries

    def __post_init__(self) -> None:
        assert len(self.tokens) == len(self.path) + 1, f"a path of {len(self.path)} needs {len(self.path) + 1} tokens"

    @property
    def accepted(self) -> int:
        return len(self.path)


def verify_tree_greedy(tree: Tree, target_argmax: Sequence[int]) -> TreeVerdict:
    """The longest root path whose every token is the target's argmax after its parent.

    target_argmax: (N+1,), entry 0 after the root (the context), entry 1 + i after node i.
    Siblings have distinct tokens, so at most one child matches at each step.
    """
    assert len(target_argmax) == len(tree) + 1, f"target_argmax needs N+1 = {len(tree) + 1} entries"
    path: list[int] = []
    node = ROOT
    while True:
        wanted = int(target_argmax[node + 1])
        child = next((c for c in tree.children(node) if tree.tokens[c] == wanted), None)
        if child is None:
            return TreeVerdict(tuple(path), (*(tree.tokens[i] for i in path), wanted))
        path.append(child)
        node = child


def _normalized(x: Tensor) -> Tensor | None:
    total = float(x.sum())
    return x / total if total > 1e-9 else None


def recursive_rejection(
    candidates: Sequence[int], q: SparseDist | None, p: Tensor, generator: torch.Generator
) -> tuple[int | None, int]:
    """One node's multi-draft step: (index of the accepted candidate or None, emitted token).

    Recursive rejection sampling (Jeon et al. 2024, "Recursive Speculative Decoding:
    Accelerating LLM Inference via Sampling Without Replacement", Algorithm 1), which is
    SpecInfer's multi-step speculative sampling (Miao et al. 2024, "SpecInfer", Algorithm 2)
    with candidates drawn WITHOUT replacement: for i = 1..m, accept c_i with probability
    min(1, p_i(c_i) / q_i(c_i)); on rejection
        p_{i+1} = normalize(max(0, p_i - q_i))      (the residual, as in speculative sampling)
        q_{i+1} = normalize(q_i without c_i)        (what c_{i+1} was drawn from)
    and if every candidate is rejected, emit a token drawn from p_{m+1}.

    Why exact: c_i, given everything before it, is distributed as q_i (that is how it was
    drawn), so step i is an ordinary speculative-sampling step targeting p_i, whose "draw from
    the residual" is carried out by the steps after it - which by induction emit exactly
    p_{i+1}. Hence step 1 emits exactly p_1 = p. A rejection is possible only where
    p_i(c_i) < q_i(c_i), which makes p_{i+1}(c_i) = 0, so dropping c_i from q loses nothing.
    (With replacement, SpecInfer keeps q_{i+1} = q_i; here the draws are without replacement
    and q must be updated, or the scheme is not exact.)

    q None: the candidates were chosen deterministically (a greedy drafter's top tokens); each
    is then a point-mass proposal: accept c_i with probability p_i(c_i), else
    p_{i+1} = normalize(p_i without c_i). Overall a candidate is accepted with probability
    p(c_1) + ... + p(c_m).

    candidates: (m,) distinct token ids; p: (V,) target probabilities after the node.
    Deviation from the paper: an empty residual (floating-point agreement of p_i and q_i)
    falls back to p_i, as in services/acceptance.py.
    """
    assert p.dim() == 1, f"p must be (V,), got {tuple(p.shape)}"
    assert len(set(candidates)) == len(candidates), f"candidates {list(candidates)} repeat a token"
    p_i = p.double()  # (V,)
    q_i = None if q is None else q.dense(p.numel()).double()  # (V,)
    for index, c in enumerate(candidates):
        q_c = 1.0 if q_i is None else float(q_i[c])
        assert q_c > 0, f"candidate {c} has q = 0: it was not drawn from the q sent with it"
        r = torch.rand((), generator=generator, dtype=torch.float64).item()
        if r < min(1.0, float(p_i[c]) / q_c):
            return index, int(c)
        if q_i is None:
            residual = p_i.clone()
            residual[c] = 0
        else:
            residual = (p_i - q_i).clamp_(min=0)
            q_i = q_i.clone()
            q_i[c] = 0
            q_i = _normalized(q_i)
            assert q_i is not None or index == len(candidates) - 1, "more candidates than q has tokens"
        normalized = _normalized(residual)
        if normalized is not None:
            p_i = normalized
    return None, sample(p_i, generator)


def verify_tree_sampled(
    tree: Tree, q: Sequence[SparseDist | None], p: Tensor, generator: torch.Generator
) -> TreeVerdict:
    """Walks down the tree with `recursive_rejection` at every node; exact for sampling.

    q: N+1 entries (entry 0 the root's, 1 + i node i's: what its children were drawn from,
    None for deterministic children or a leaf), or empty for all None.
    p: (N+1, V) target probabilities, row 0 after the context, row 1 + i after node i.

    Why the path is exact: the acceptance at each node is exact given the tree above it; the
    subtree below an accepted child was drawn by the drafter before, and independently of,
    the target's coins, so the next node's step is exact too; after a rejection the emitted
    token ends the round, and at a leaf the bonus token is drawn from p itself.
    """
    assert p.dim() == 2 and p.shape[0] == len(tree) + 1, f"p must be (N+1, V) with N+1 = {len(tree) + 1}"
    assert len(q) in (0, len(tree) + 1), f"q must have 0 or N+1 = {len(tree) + 1} entries, got {len(q)}"
    path: list[int] = []
    node = ROOT
    while True:
        children = tree.children(node)
        row = node + 1
        if not children:
            token = sample(p[row], generator)
            break
        chosen, token = recursive_rejection([tree.tokens[c] for c in children], q[row] if q else None, p[row], generator)
        if chosen is None:
            break
        node = children[chosen]
        path.append(node)
    return TreeVerdict(tuple(path), (*(tree.tokens[i] for i in path), token))
