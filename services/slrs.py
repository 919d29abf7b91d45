"""String-level rejection sampling (SLRS): lossless speculative decoding with a drafter whose
tokenizer is not the target's, verified on strings of bytes rather than on tokens.

String-level rejection sampling is from Timor et al. 2025, "Accelerating LLM Inference with
Lossless Speculative Decoding Algorithms for Heterogeneous Vocabularies" (ICML, arXiv:2502.05202);
here it runs one drafter token at a time, each against the target's distribution over the next
bytes of the same length. F below is the prefix probability of a token-level model summed over
the tokens that cover the prefix (Vieira et al. 2024, "From Language Models over Tokens to
Language Models over Characters", arXiv:2412.03719).

Vocabulary. Every target token t has bytes β(t) (`PrefixIndex.token_bytes`); a special token
(None there, e.g. EOS) has none, and ends the text a round compares: END (a round stops after
it; should the model go on past it, the next round does). The drafter proposes strings s_1..s_k,
the bytes of its tokens d_1..d_k, each sent with q_i: the drafter's distribution over strings of
length ℓ_i = |s_i| (its token probabilities restricted to tokens of that byte length, summed
over tokens with equal bytes, renormalised; None is a point mass at s_i, for greedy drafters).
The verification tree holds target token paths v below the root (the end of the context):
bytes B(v), probability P(v) (the product of p along it), distribution p_v after it.

    mass(v, y) = sum of p_v(t) over tokens t whose β(t) starts with y[|B(v)|:]   (B(v) a proper prefix of y)
    F(y)       = P(the target's text starts with y)
               = sum of P(v) mass(v, y) over nodes v with B(v) a proper prefix of y;   F(b"") = 1

(exactly one token covers the last byte of y: the one after such a v). Given accepted bytes A,
the target's next ℓ bytes Z are x with probability p(x) = F(A + x) / F(A) for each |x| = ℓ,
and "out" (shorter, cut by END) with the rest.

The round, for i = 1..k with A = s_1..s_{i-1}:
    draw u ~ U[0, 1); if u < p(s_i) / q_i(s_i): accept, A = A + s_i
    else draw Z from the residual max(0, p - q_i) and stop: x in supp(q_i) with weight
    max(0, p(x) - q_i(x)), or any other outcome with weight M_out = 1 - sum of p(x) over supp(q_i)
    (q_i is 0 there); commit target tokens drawn given "the text starts with A + x", or given
    "the text starts with A and Z is not in supp(q_i)".
If all k are accepted, commit target tokens drawn given "the text starts with A".

Tokens given an event E (`TreeTarget.sample_tokens`): from the root, each next token t is drawn
with weight p_u(t) P(E | path u, t), until the path decides E (then E holds); after that, tokens
are drawn from p itself while the path is a tree node: free tokens, such as the bonus after a
path that ends exactly at the accepted bytes.

Worked example: target tokens 0: b"a", 1: b"b", 2: b"ab", 3: END; one proposal s_1 = b"ab".

    node  token  parent  B(v)   P(v)                  F(b"ab") = p_root(ab) + p_root(a) p_0(b)
    0     a      root    a      p_root(a)             (mass(root, b"ab") = p_root(ab): only
    1     ab     root    ab     p_root(ab)             token 2 starts with "ab")
    2     b      0       ab     p_root(a) p_0(b)

Why the committed tokens are distributed exactly as the target's:
1. Bytes. Given its length ℓ_i (drawn by the drafter, independently of the verifier's coins),
   s_i ~ q_i, so step i is speculative sampling (Leviathan et al. 2023, Algorithm 1) of Z
   against p over the outcomes {|x| = ℓ_i} ∪ {out}: its outcome, accepted or recovered, is
   distributed exactly as the target's Z given A.
2. Tokens. Claim, by induction from i = k + 1 down: given A at step i, the round commits
   τ[:σ], where τ ~ target given "the text starts with A" and σ is a stopping time (whether to
   stop after m tokens depends on τ[:m] and on coins independent of τ). For i = k + 1 this is
   sample_tokens. At step i, each branch commits such a prefix of τ given "starts with A + x"
   (x = s_i accepted, by the claim for i + 1; or x recovered) or given "starts with A, Z not in
   supp(q_i)"; by 1 the branches are taken with the target's probabilities of those events,
   so together they commit τ given A, stopped by the rule of the branch Z(τ) selects - still
   a stopping time, since every branch stops only once Z is decided. Later drafts are drawn
   by the drafter independently of τ. Rounds compose (the next round conditions on what was
   committed), so the committed sequence is the target's.
3. Why the tree suffices: every quantity above is F of an A or an A + x, or p_u at a path u
   whose bytes are a proper prefix of one: all nodes of the tree of `build_tree`. A path that
   leaves the tree has decided its event, so no target pass beyond the tree is ever needed.

Design choices, and deviations:
- Recovery "outside supp(q_i)" is drawn directly, token by token given the event, rather than by
  drawing continuations until one falls outside supp(q_i): such a loop takes 1 / M_out tries,
  which for a confident target and a point-mass q (M_out = 1 - p(s_i), say 1e-6) is no bound
  at all, and a cap of c tries fails with probability up to about 1 / (e c) per proposal.
- Tokens are committed up to the token that decides the event (plus free tokens in the tree),
  not until ℓ bytes past A, so a round needs no target pass beyond the tree.
- The tree grows exponentially with the bytes it covers (a string of m bytes has up to 2^(m-1)
  tokenizations, all of them when every piece of it is a token), hence build_tree's max_nodes;
  and q_i must be truncated (top few strings): every x in supp(q_i) needs its tokenizations.
- Deviation: M_out below 1e-12, and a residual below 1e-12 in all (p and q_i agree up to
  floating-point error), count as 0; the latter falls back to p, as in services/acceptance.py.

Requirements on the caller: β must be context-free (the bytes of a token never depend on what
precedes it: byte-level BPE, not SentencePiece's leading-space rule at the start of a text),
and every non-special token has at least one byte.

Pure: torch and the standard library only.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from services.sampling import sample
from services.tree import ROOT, Tree

TINY = 1e-12  # below this a probability counts as floating-point error (see the deviations above)


class PrefixIndex:
    """The target's non-special tokens sorted by their bytes, so that the tokens whose bytes
    start with a prefix r are the contiguous range order[lo:hi] = range(r), found by bisection.

    Worked example, token_bytes (b"a", b"b", b"ab", None, b"ba", b"a"):

        order = (0, 5, 2, 1, 4)   bytes a a ab b ba
        range(b"a") = (0, 3)   range(b"ab") = (2, 3)   range(b"") = (0, 5)   range(b"c") = (5, 5)
        exact(b"a") = (0, 5)   exact(b"x") = ()
    """

    def __init__(self, token_bytes: Sequence[bytes | None]) -> None:
        empty = [t for t, b in enumerate(token_bytes) if b is not None and not b]
        assert not empty, f"tokens {empty[:5]} have no bytes: mark them None (special) or give them bytes"
        self.token_bytes = tuple(token_bytes)  # (V,) β(t), None for a special token
        pieces = {t: piece for t, piece in enumerate(token_bytes) if piece is not None}
        ids = sorted(pieces, key=lambda t: (pieces[t], t))
        self.order = torch.tensor(ids, dtype=torch.int64)  # (V',) non-special ids, by bytes
        self._sorted = [pieces[t] for t in ids]  # (V',) their bytes, for bisection
        exact: dict[bytes, list[int]] = {}
        for t in ids:
            exact.setdefault(pieces[t], []).append(t)
        self._exact = {piece: tuple(same) for piece, same in exact.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def range(self, prefix: bytes) -> tuple[int, int]:
        """(lo, hi): order[lo:hi] are the tokens whose bytes start with prefix."""
        lo = bisect.bisect_left(self._sorted, prefix)
        # The first string past every extension of prefix: drop trailing 0xff bytes, bump the last.
        head = prefix.rstrip(b"\xff")
        if not head:
            return lo, len(self._sorted)
        return lo, bisect.bisect_left(self._sorted, head[:-1] + bytes([head[-1] + 1]), lo)

    def exact(self, piece: bytes) -> tuple[int, ...]:
        """The tokens whose bytes are exactly piece (several when a vocabulary repeats bytes)."""
        return self._exact.get(piece, ())

    def text(self, tokens: Sequence[int]) -> bytes:
        """The bytes of a token sequence; special tokens add none."""
        return b"".join(self.token_bytes[t] or b"" for t in tokens)


@dataclass(frozen=True)
class StringProposal:
    """One drafted token, as the target sees it: its bytes and what they were drawn from."""

    text: bytes  # s_i: the bytes of the drafter's token d_i, non-empty
    q: Mapping[bytes, float] | None = None  # q_i over strings of length |text|; None: a point mass at text

    def __post_init__(self) -> None:
        assert self.text, "a proposal needs at least one byte"
        if self.q is not None:
            assert all(len(x) == len(self.text) for x in self.q), (
                f"q must be over strings of the proposal's length {len(self.text)}, got lengths "
                f"{sorted({len(x) for x in self.q})}"
            )
            assert self.q.get(self.text, 0.0) > 0, f"{self.text!r} has q = 0: it was not drawn from the q sent with it"
            assert all(v >= 0 for v in self.q.values()), "q must be >= 0"
            total = sum(self.q.values())
            assert abs(total - 1) <= 1e-4, f"q must sum to 1, got {total}"

    def support(self) -> dict[bytes, float]:
        """q_i as {x: q_i(x)} over supp(q_i), which holds text; {text: 1.0} for a point mass."""
        if self.q is None:
            return {self.text: 1.0}
        return {x: float(v) for x, v in self.q.items() if v > 0}


@dataclass(frozen=True)
class StringVerdict:
    accepted: int  # n: proposals kept, s_1..s_n (drafter tokens)
    tokens: tuple[int, ...]  # target token ids to commit; at least one

    def __post_init__(self) -> None:
        assert self.accepted >= 0 and self.tokens, f"need accepted >= 0 and a token, got {self}"


def candidate_strings(proposals: Sequence[StringProposal]) -> list[list[bytes]]:
    """Per position i: s_1..s_{i-1} + x for every x in supp(q_i) (s_i among them)."""
    out, accepted = [], b""
    for proposal in proposals:
        out.append([accepted + x for x in proposal.support()])
        accepted += proposal.text
    return out


def build_tree(
    index: PrefixIndex, proposals: Sequence[StringProposal], max_nodes: int
) -> tuple[Tree, list[bytes], int]:
    """The tree of every target token path whose bytes are a prefix (proper or equal) of a
    candidate string (`candidate_strings`), for the first positions whose candidates fit in
    max_nodes nodes: (tree, B(v) of each node, positions kept - possibly 0, a plain target step).

    Positions are added whole, in order, and the cut depends only on the strings, never on a
    random draw of the verifier: the rounds stay exact whatever is cut. Nodes of a position come
    after those of the positions before it, parents before children.

    Worked example, target tokens 0: b"a", 1: b"b", 2: b"ab", proposal b"ab" (a point mass):
    nodes 0: a (root), 1: ab (root), 2: b (under 0) - both tokenizations of "ab" and their prefixes.
    """
    assert max_nodes >= 0, f"max_nodes must be >= 0, got {max_nodes}"
    tokens: list[int] = []
    parents: list[int] = []
    node_bytes: list[bytes] = []
    child: dict[tuple[int, int], int] = {}

    def add_paths(string: bytes) -> bool:
        """Adds the paths spelling a prefix of string; False once that would pass max_nodes."""
        stack = [(ROOT, b"")]
        while stack:
            node, spelled = stack.pop()
            rest = string[len(spelled) :]
            for j in range(1, len(rest) + 1):
                for token in index.exact(rest[:j]):
                    if (node, token) not in child:
                        if len(tokens) == max_nodes:
                            return False
                        child[node, token] = len(tokens)
                        tokens.append(token)
                        parents.append(node)
                        node_bytes.append(spelled + rest[:j])
                    if j < len(rest):
                        stack.append((child[node, token], spelled + rest[:j]))
        return True

    for kept, strings in enumerate(candidate_strings(proposals)):
        size = len(tokens)
        if not all(add_paths(string) for string in strings):
            del tokens[size:], parents[size:], node_bytes[size:]
            return Tree(tuple(tokens), tuple(parents)), node_bytes, kept
    return Tree(tuple(tokens), tuple(parents)), node_bytes, len(proposals)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare
class TreeTarget:
    """The target's distributions over a verification tree, read as a distribution over texts.

    Row r: 0 the root, 1 + i node i (the rows of probs). Built for the strings whose F it
    will be asked for: mass(v, y) is computed, in one pass, for those y only.
    """

    index: PrefixIndex
    p: Tensor  # (N+1, V) float64 target probabilities after each row, rows normalised
    row_bytes: list[bytes]  # (N+1,) B(v)
    path_prob: list[float]  # (N+1,) P(v), float64
    children: list[dict[int, int]]  # (N+1,) token -> row of that child
    lineage: list[frozenset[int]]  # (N+1,) rows from the root down to each row, itself included
    rows_with: dict[bytes, list[int]]  # B -> the rows with those bytes
    masses: dict[tuple[int, bytes], float]  # (row, y) -> mass(v, y), for every y built for

    @classmethod
    def build(
        cls, tree: Tree, node_bytes: Sequence[bytes], probs: Tensor, index: PrefixIndex, strings: Sequence[bytes]
    ) -> TreeTarget:
        n = len(tree)
        assert probs.dim() == 2 and probs.shape == (n + 1, index.vocab_size), (
            f"probs must be (N+1, V) = ({n + 1}, {index.vocab_size}), got {tuple(probs.shape)}"
        )
        assert len(node_bytes) == n, f"node_bytes needs one entry per node, got {len(node_bytes)} for {n}"
        row_bytes = [b"", *node_bytes]
        parent_rows = [parent + 1 for parent in tree.parents]
        for i, (token, parent_row) in enumerate(zip(tree.tokens, parent_rows)):
            piece = index.token_bytes[token]
            assert piece is not None and row_bytes[i + 1] == row_bytes[parent_row] + piece, (
                f"node {i}'s bytes {row_bytes[i + 1]!r} are not its parent's plus its token's"
            )
        p = probs.to(torch.float64, copy=True)  # (N+1, V)
        p /= p.sum(dim=-1, keepdim=True)  # what multinomial draws from, so F and the draws agree
        edge = p[torch.tensor(parent_rows), torch.tensor(tree.tokens)].tolist() if n else []  # (N,) p along each edge
        path_prob, children, lineage = [1.0], [{} for _ in range(n + 1)], [frozenset({0})]
        for i, (token, parent_row) in enumerate(zip(tree.tokens, parent_rows)):
            path_prob.append(path_prob[parent_row] * edge[i])
            children[parent_row][token] = i + 1
            lineage.append(lineage[parent_row] | {i + 1})
        rows_with: dict[bytes, list[int]] = {}
        for row, spelled in enumerate(row_bytes):
            rows_with.setdefault(spelled, []).append(row)
        queries = [(row, y) for y in dict.fromkeys(strings) for j in range(len(y)) for row in rows_with.get(y[:j], ())]
        for row, y in queries:  # F(y) needs every path spelling a proper prefix of y: a missing one is silent
            rest = y[len(row_bytes[row]) :]
            missing = [t for j in range(1, len(rest)) for t in index.exact(rest[:j]) if t not in children[row]]
            assert not missing, (
                f"the tree lacks token {missing[0]} after {row_bytes[row]!r} on the way to {y!r}: "
                "build it with build_tree over these proposals, and verify only the kept ones"
            )
        masses: dict[tuple[int, bytes], float] = {}
        if queries:
            # cumulative[r, j]: the mass of row r's first j tokens in byte order, so a range's
            # mass is one subtraction; one cumsum serves every query.
            cumulative = torch.nn.functional.pad(p[:, index.order.to(p.device)].cumsum(dim=-1), (1, 0))  # (N+1, V'+1)
            rows, lo, hi = torch.tensor(
                [(row, *index.range(y[len(row_bytes[row]) :])) for row, y in queries], device=p.device
            ).T  # (Q,) each
            masses = dict(zip(queries, (cumulative[rows, hi] - cumulative[rows, lo]).clamp(min=0).tolist()))
        return cls(index, p, row_bytes, path_prob, children, lineage, rows_with, masses)

    def joint(self, row: int, y: bytes) -> float:
        """P(the path runs through row, and the text starts with y); F(y) for the root."""
        spelled = self.row_bytes[row]
        if spelled.startswith(y):
            return self.path_prob[row]
        if not y.startswith(spelled):
            return 0.0
        assert (row, y) in self.masses, f"F({y!r}) needs masses not built: pass {y!r} to TreeTarget.build"
        return sum(
            self.path_prob[v] * self.masses[v, y]
            for j in range(len(spelled), len(y))
            for v in self.rows_with.get(y[:j], ())
            if row in self.lineage[v]
        )

    def prefix_prob(self, y: bytes) -> float:
        """F(y) = P(the target's text starts with y)."""
        return self.joint(0, y)

    def row(self, row: int) -> Tensor:
        """(V,) float64 on the CPU: the target's distribution after a row, normalised."""
        return self.p[row].cpu()

    def sample_tokens(self, y: bytes, exclude: Sequence[bytes], generator: torch.Generator) -> list[int]:
        """Target tokens from the root, drawn given E = "the text starts with y and with none of
        exclude" (strings that extend y, none a prefix of another), up to the token that decides
        E; then drawn from p while the path is a tree node.

        Each token t after a path u is drawn with weight p_u(t) P(E | u, t), so the tokens up to
        the deciding one are the target's given E. A path that leaves the tree has decided E.
        """
        assert all(len(e) > len(y) and e.startswith(y) for e in exclude), f"{list(exclude)} must extend {y!r}"
        assert not any(a != b and b.startswith(a) for a in exclude for b in exclude), (
            "no excluded string may extend another"
        )
        strings = (y, *exclude)
        signs = (1.0, *(-1.0 for _ in exclude))

        def undecided(spelled: bytes) -> bool:
            return any(len(s) > len(spelled) and s.startswith(spelled) for s in strings)

        tokens: list[int] = []
        row: int | None = 0
        while row is not None and undecided(self.row_bytes[row]):
            token = sample(self._given(row, strings, signs), generator)
            tokens.append(token)
            spelled = self.row_bytes[row] + (self.index.token_bytes[token] or b"")
            row = self.children[row].get(token)
            assert row is not None or self.index.token_bytes[token] is None or not undecided(spelled), (
                f"the tree lacks the path to {spelled!r}: build it with build_tree over these proposals"
            )
        while row is not None:  # decided: E holds, and tokens in the tree cost no target pass
            token = sample(self.row(row), generator)
            tokens.append(token)
            row = self.children[row].get(token)
        return tokens

    def _given(self, row: int, strings: Sequence[bytes], signs: Sequence[float]) -> Tensor:
        """(V,) float64: p_u(t) P(E | u, t) for the path u of row, where E's indicator is the sum
        of sign x [the text starts with s] (1 for y, -1 for each excluded string: disjoint events).

        A token whose path leaves the tree, or ends there, decides each "starts with s" by its
        bytes: a range of the index. A child whose bytes are a proper prefix of some s is a
        tree node: its P(E | u, t) comes from the paths below it.
        """
        spelled = self.row_bytes[row]
        indicator = torch.zeros(self.index.vocab_size, dtype=torch.float64)  # (V,)
        for s, sign in zip(strings, signs):
            if spelled.startswith(s):
                indicator += sign
            elif s.startswith(spelled):
                lo, hi = self.index.range(s[len(spelled) :])
                indicator[self.index.order[lo:hi]] += sign
        weights = self.row(row) * indicator  # (V,)
        for token, child in self.children[row].items():
            child_bytes = self.row_bytes[child]
            if any(len(s) > len(child_bytes) and s.startswith(child_bytes) for s in strings):
                joint = sum(sign * self.joint(child, s) for s, sign in zip(strings, signs))
                weights[token] = joint / self.path_prob[row]
        weights.clamp_(min=0)
        assert float(weights.sum()) > 0, f"no token after {spelled!r} satisfies the event (floating-point error)"
        return weights


def verify_strings(
    tree: Tree,
    node_bytes: Sequence[bytes],
    probs: Tensor,
    proposals: Sequence[StringProposal],
    index: PrefixIndex,
    generator: torch.Generator,
    greedy: bool,
) -> StringVerdict:
    """String-level rejection sampling of proposals against the target (see the module docstring).

    tree, node_bytes: from build_tree(index, proposals, ...), with proposals cut to the kept ones.
    probs: (N+1, V) target probabilities, row 0 after the context, row 1 + i after node i; for
    greedy the one-hot rows of target_probs.
    Greedy consumes no randomness and commits the target's greedy tokens (`_verify_greedy`).
    """
    assert probs.dim() == 2 and probs.shape == (len(tree) + 1, index.vocab_size), (
        f"probs must be (N+1, V) = ({len(tree) + 1}, {index.vocab_size}), got {tuple(probs.shape)}"
    )
    if greedy:
        return _verify_greedy(tree, probs, proposals, index)
    strings = [s for position in candidate_strings(proposals) for s in position]
    target = TreeTarget.build(tree, node_bytes, probs, index, strings)
    accepted = b""  # A
    for n, proposal in enumerate(proposals):
        q = proposal.support()
        f_a = target.prefix_prob(accepted)
        p = {x: target.prefix_prob(accepted + x) / f_a for x in q}  # the target's p(Z = x), x in supp(q_i)
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        if u < p[proposal.text] / q[proposal.text]:
            accepted += proposal.text
            continue
        return StringVerdict(n, tuple(_recover(target, accepted, p, q, generator)))
    return StringVerdict(len(proposals), tuple(target.sample_tokens(accepted, (), generator)))


def _recover(
    target: TreeTarget, accepted: bytes, p: dict[bytes, float], q: dict[bytes, float], generator: torch.Generator
) -> list[int]:
    """After a rejection: Z from the residual max(0, p - q) over x in supp(q) and "any other
    outcome" (M_out), then the target's tokens given that outcome."""
    residual = [max(0.0, p[x] - q[x]) for x in q]
    m_out = 1.0 - sum(p.values())
    weights = torch.tensor([*residual, m_out if m_out > TINY else 0.0], dtype=torch.float64)  # (|supp q| + 1,)
    if float(weights.sum()) <= TINY:  # p and q agree up to floating-point error: fall back to p
        return target.sample_tokens(accepted, (), generator)
    pick = sample(weights, generator)
    if pick < len(q):
        return target.sample_tokens(accepted + list(q)[pick], (), generator)
    return target.sample_tokens(accepted, [accepted + x for x in q], generator)


def _verify_greedy(tree: Tree, probs: Tensor, proposals: Sequence[StringProposal], index: PrefixIndex) -> StringVerdict:
    """The target's greedy walk: its argmax after each row while that token's node is in the
    tree, then the first argmax outside it. accepted = how many s_1..s_i its bytes start with.

    Worked example, tree of the module docstring, argmax a after the root and b after node 0:
    tokens (a, b, t) where t is the argmax after node 2; accepted 1.
    """
    argmax = probs.argmax(dim=-1).tolist()  # (N+1,)
    child = {(parent + 1, token): i + 1 for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents))}
    tokens: list[int] = []
    row: int | None = 0
    while row is not None:
        tokens.append(argmax[row])
        row = child.get((row, argmax[row]))
    text, n, spelled = index.text(tokens), 0, b""
    for proposal in proposals:
        spelled += proposal.text
        if not text.startswith(spelled):
            break
        n += 1
    return StringVerdict(n, tuple(tokens))
