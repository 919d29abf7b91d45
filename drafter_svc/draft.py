"""Drafting: propose k tokens, and when sampling the exact q each was drawn from; review a
smaller level's draft (a middle level of a cascade); grow a draft tree (staged).

Plain functions over a runtime (services/runtime.py) and a session's full context; the
drafter's core (drafter_svc/core.py) resolves context deltas, seeds and times them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.acceptance import Verdict, verify_greedy, verify_sampled
from services.ngram import NgramIndex
from services.runtime import ChainCall, Runtime
from services.sampling import SamplingParams, SparseDist, target_probs, truncated
from services.tree import ROOT, Tree, TreeShape


@dataclass(frozen=True)
class Proposal:
    tokens: tuple[int, ...]  # d_1..d_k
    q: tuple[SparseDist, ...]  # one per token when sampling; empty when greedy (point masses)


@dataclass(frozen=True)
class DraftJob:
    """One session's `propose` in a batch (propose_many)."""

    session_id: str
    context: list[int]
    k: int
    params: SamplingParams
    generator: torch.Generator
    stop: Callable[[int], bool] = lambda drafted: False  # given the tokens drafted so far


def propose_many(runtime: Runtime, jobs: Sequence[DraftJob], q_top: int, min_confidence: float = 0.0) -> list[Proposal]:
    """Drafts each job's k tokens autoregressively after its context, the jobs (sessions) in
    lockstep: each step is one Runtime.logits_batch over every draft still growing (a
    session's first step feeds what its cache lacks, later ones one token each), so sixteen
    sessions' drafts cost k batched passes, not 16k passes. Each job draws with its own
    generator: its draft is the one it would have drafted alone.

    When sampling, each token is drawn from its q truncated to the q_top most likely
    entries and renormalised, and that truncated q is what is returned: the verifier's
    rejection rule then uses exactly the distribution the token came from, which keeps it
    lossless, while the payload stays q_top pairs per token.

    With min_confidence > 0 a draft ends before a position where the drafter's top
    probability (of its warped distribution; of its plain softmax when greedy) is below it
    (llama.cpp's draft p-min). Lossless: whether position i is drafted at all depends on the
    tokens before it and the drafter's own distribution there, never on the token it would
    draw, so a drafted token is still distributed as its q, and an undrafted position is
    the verifier's bonus token, drawn from p.

    A job's `stop(drafted)` true ends its draft before the next pass (its caller has gone
    away; a continuation was cut short: drafter_svc/continuation.py).
    """
    seqs = [list(job.context) for job in jobs]
    tokens: list[list[int]] = [[] for _ in jobs]
    qs: list[list[SparseDist]] = [[] for _ in jobs]
    growing = [i for i, job in enumerate(jobs) if job.k > 0]
    while growing:
        growing = [i for i in growing if not jobs[i].stop(len(tokens[i]))]
        if not growing:
            break
        rows = runtime.logits_batch([ChainCall(jobs[i].session_id, seqs[i], 1) for i in growing])
        still: list[int] = []
        for i, row in zip(growing, rows):
            logits, params = row[0], jobs[i].params  # (V,)
            if min_confidence > 0 and _confidence(logits, params) < min_confidence:
                continue
            if params.greedy:
                token = int(torch.argmax(logits))
            else:
                q = own_distribution(logits, params, q_top)
                token = q.sample(jobs[i].generator)
                qs[i].append(q)
            tokens[i].append(token)
            seqs[i].append(token)
            if len(tokens[i]) < jobs[i].k:
                still.append(i)
        growing = still
    return [Proposal(tuple(t), tuple(q)) for t, q in zip(tokens, qs)]


def _confidence(logits: torch.Tensor, params: SamplingParams) -> float:
    """The drafter's top probability at a position: of the distribution it draws from."""
    probs = torch.softmax(logits.double(), dim=-1) if params.greedy else target_probs(logits, params)
    return float(probs.max())


@dataclass(frozen=True)
class Review:
    verdict: Verdict  # n accepted draft tokens, then one recovered or bonus token
    q: tuple[SparseDist, ...]  # one per verdict token when sampling; empty when greedy (point masses)


def own_distribution(logits: torch.Tensor, params: SamplingParams, q_top: int) -> SparseDist:
    """The distribution a drafter draws from and sends as q: its warped distribution (V,)
    truncated to the q_top most likely entries and renormalised. `propose` and `review` both
    use it, so every token a drafter hands upward is distributed exactly as the q it sends."""
    return truncated(target_probs(logits, params), q_top)


def review(
    runtime: Runtime,
    session_id: str,
    context: list[int],
    draft: Sequence[int],
    q: Sequence[SparseDist | None],
    params: SamplingParams,
    q_top: int,
    generator: torch.Generator,
) -> Review:
    """A middle level of a cascade reviews a smaller level's draft.

    One pass over context + draft gives this drafter's own distributions m_1..m_{k+1}
    (`own_distribution`). Sampling: speculative sampling (services/acceptance.verify_sampled)
    with m in place of the target's p, so the returned tokens are distributed exactly as if
    this drafter had sampled them one by one from m, and m_1..m_{n+1} are returned as their q.
    Greedy: each m_i is a point mass at this drafter's argmax, and the rule is exact match.

    Like the verifier, the caller then holds the context extended by the returned tokens.
    """
    logits = runtime.logits(session_id, [*context, *draft], len(draft) + 1)  # (k+1, V)
    if params.greedy:
        verdict = verify_greedy(list(draft), logits.argmax(dim=-1).tolist())
        own: tuple[SparseDist, ...] = ()
    else:
        m = [own_distribution(row, params, q_top) for row in logits]
        vocab = logits.shape[-1]
        verdict = verify_sampled(list(draft), list(q), torch.stack([m_i.dense(vocab) for m_i in m]), generator)
        own = tuple(m[: verdict.accepted + 1])
    return Review(verdict, own)


@dataclass(frozen=True)
class TreeProposal:
    tree: Tree
    # When sampling, N+1 entries: what the root's (entry 0) and node i's (entry 1 + i) children
    # were drawn from, without replacement, in sibling order; None for a leaf. Empty when greedy.
    q: tuple[SparseDist | None, ...]
    forwards: int  # passes of the drafter model
    guessed: int = 0  # second-stage guesses fed
    saved: int = 0  # passes the guesses saved: depths whose every node to expand was guessed
    timed: tuple[tuple[int, float], ...] = ()  # (nodes fed, seconds) of each pass but the first


class _Passes:
    """The nodes a drafter has fed to its model while growing one tree, and their logits.

    The computed tree is a superset of the proposed one: it holds the proposal's expanded
    nodes, and also the second stage's guesses (max-gram tokens fed ahead of need). A
    proposed node whose guess was right finds its logits here and costs no pass of its own.
    """

    def __init__(self, runtime: Runtime, session_id: str, context: list[int]) -> None:
        self.runtime, self.session_id, self.context = runtime, session_id, context
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.logits: dict[int, torch.Tensor] = {}  # computed node (ROOT: the context) -> (V,)
        self.count = 0
        self.guessed = self.saved = 0  # the second stage's guesses fed, and passes they saved
        # The passes after the first (that one also feeds what the cache lacks of the context)
        self.timed: list[tuple[int, float]] = []

    def find(self, parent: int, token: int) -> int | None:
        return next((i for i, (t, p) in enumerate(zip(self.tokens, self.parents)) if p == parent and t == token), None)

    def add(self, parent: int, token: int) -> int:
        """The computed node for token under parent, appended if new."""
        found = self.find(parent, token)
        if found is None:
            self.tokens.append(token)
            self.parents.append(parent)
            found = len(self.tokens) - 1
        return found

    def run(self, first_new: int, want_root: bool) -> None:
        """One pass over the nodes appended since first_new (and the context's tail for the root)."""
        n_last = len(self.tokens) - first_new + (1 if want_root else 0)
        if n_last == 0:
            return
        started = time.perf_counter()
        rows = self.runtime.tree_logits(self.session_id, self.context, Tree(tuple(self.tokens), tuple(self.parents)), n_last)
        if not want_root:
            self.timed.append((n_last, time.perf_counter() - started))
        entries = ([ROOT] if want_root else []) + list(range(first_new, len(self.tokens)))
        self.logits.update(zip(entries, rows))
        self.count += 1


def propose_tree(
    runtime: Runtime,
    session_id: str,
    context: list[int],
    shape: TreeShape,
    params: SamplingParams,
    q_top: int,
    ngram: NgramIndex | None,
    lookahead: int,
    generator: torch.Generator,
) -> TreeProposal:
    """Grows a draft tree after the context, one drafter pass per depth at most (Staged
    Speculative Decoding, Spector & Re 2023: a tree-structured batch, and a second stage of
    speculation inside the drafter).

    Depth d = 1..D: the nodes at depth d-1 are ranked by their path probability under this
    drafter, and the best ones get up to branching[d-1] children each, while the budget
    lasts (keeping one node for every deeper depth). Children are the drafter's most likely
    tokens when greedy; when sampling, draws without replacement from its own distribution q
    (own_distribution), which is returned per expanded node for recursive rejection sampling
    (services/multidraft.py). How many children a node gets is fixed before they are drawn,
    from the ranks of it and its peers only - never from the children's own values, which
    would bias them away from q.

    Second stage (lookahead > 0, with `ngram` the session's max-gram index): each pass also
    feeds, below the best node being expanded,
    the max-gram model's guess of how the path continues (services/ngram.py, over the
    context). Where the drafter then picks the guessed token, that node's logits are already
    computed, and a depth whose every node to expand was guessed costs no pass. The guesses
    change no draw - a sampled child is drawn from q as always, and merely found guessed -
    so the tree and its q are exactly what they would be without the second stage.
    """
    if lookahead > 0 and ngram is not None:
        ngram.sync(context)
    else:
        ngram, lookahead = None, 0
    passes = _Passes(runtime, session_id, context)
    tokens: list[int] = []
    parents: list[int] = []
    score: dict[int, float] = {ROOT: 0.0}  # log path probability under the drafter
    computed: dict[int, int] = {ROOT: ROOT}  # proposed node -> computed node, once fed or guessed
    q_of: dict[int, SparseDist] = {}
    frontier = [ROOT]
    depth = len(shape.branching)
    for d, branching in enumerate(shape.branching, start=1):
        room = shape.budget - len(tokens)
        if room <= 0 or not frontier:
            break
        allowed = max(1, room - (depth - d))
        plan: list[tuple[int, int]] = []  # (node, children), best first
        for node in sorted(frontier, key=lambda u: -score[u]):
            if allowed == 0:
                break
            plan.append((node, min(branching, allowed)))
            allowed -= plan[-1][1]
        _compute(passes, plan, tokens, parents, computed, ngram, min(lookahead, depth - d))
        frontier = []
        for node, m in plan:
            logits = passes.logits[computed[node]]  # (V,)
            if params.greedy:
                top = torch.topk(logits, m)
                chosen, logp = top.indices, logits.log_softmax(-1)[top.indices]  # (m,) each
            else:
                own = own_distribution(logits, params, q_top)
                picks = torch.multinomial(own.probs, min(m, own.ids.numel()), replacement=False, generator=generator)
                chosen, logp = own.ids[picks], own.probs[picks].log()  # (m,) each, in draw order
                q_of[node] = own
            for token, token_logp in zip(chosen.tolist(), logp.tolist()):
                tokens.append(token)
                parents.append(node)
                child = len(tokens) - 1
                score[child] = score[node] + token_logp
                guessed = passes.find(computed[node], token)
                if guessed is not None:
                    computed[child] = guessed
                frontier.append(child)
    q = (q_of.get(ROOT), *(q_of.get(i) for i in range(len(tokens)))) if not params.greedy else ()
    return TreeProposal(Tree(tuple(tokens), tuple(parents)), q, passes.count, passes.guessed, passes.saved, tuple(passes.timed))


def _compute(
    passes: _Passes,
    plan: list[tuple[int, int]],
    tokens: list[int],
    parents: list[int],
    computed: dict[int, int],
    ngram: NgramIndex | None,
    lookahead: int,
) -> None:
    """Makes the logits of every node in plan available, in at most one pass."""
    want_root = ROOT not in passes.logits
    missing = [node for node, _ in plan if node != ROOT and computed.get(node) not in passes.logits]
    if not want_root and not missing:
        passes.saved += 1
        return  # every node to expand was guessed by the second stage: no pass
    first_new = len(passes.tokens)
    for node in missing:  # a missing node's parent was expanded, hence computed
        computed[node] = passes.add(computed[parents[node]], tokens[node])
    if ngram is not None and lookahead > 0:
        best = plan[0][0]
        path = [tokens[i] for i in _path(parents, best)]
        below = computed[best]
        for token in _guess(ngram, path, lookahead):
            fed = len(passes.tokens)
            below = passes.add(below, token)
            passes.guessed += len(passes.tokens) - fed
    passes.run(first_new, want_root)


def _path(parents: list[int], node: int) -> list[int]:
    nodes = []
    while node != ROOT:
        nodes.append(node)
        node = parents[node]
    return nodes[::-1]


def _guess(ngram: NgramIndex, path: list[int], k: int) -> list[int]:
    """The max-gram continuation of context + path (the index holds the context)."""
    if not path:
        return ngram.propose(k)
    base = len(ngram.tokens)
    ngram.sync([*ngram.tokens, *path])
    guess = ngram.propose(k)
    ngram.sync(ngram.tokens[:base])
    return guess
