"""Strategies: how one round of decoding turns a context into committed tokens.

Each strategy is one async function over the Drafter/Verifier Protocols: draft, verify,
accept. Every one is lossless: greedy output is the target's own greedy output, sampled
output follows the target's distribution (the acceptance rule in services/acceptance.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar, cast

import torch

from orchestrator.backends import (
    AheadVerifier,
    BeamDrafter,
    ContinuingDrafter,
    Drafter,
    Reviewer,
    StringDrafter,
    StringVerifier,
    TreeDrafter,
    TreeVerifier,
    Verifier,
)
from services.context import common_prefix_len, fingerprint
from services.maxgram import MaxGramDrafter
from services.roles import CallCost, Draft, Verified, total_cost
from services.sampling import SamplingParams, SparseDist, round_seed
from services.tree import Tree, TreeShape

Capability = TypeVar("Capability")


class NotServable(RuntimeError):
    """FAILED_PRECONDITION: the deployment cannot run this request (e.g. no drafter)."""


@dataclass(frozen=True)
class Backends:
    verifier: Verifier
    drafter: Drafter | None = None
    # The cascade's drafters below the target, largest first; every one but the last must
    # also be a Reviewer. Empty: (drafter, maxgram), or (maxgram,) without a drafter.
    cascade: tuple[Drafter, ...] = ()
    maxgram: MaxGramDrafter = field(default_factory=MaxGramDrafter)  # the in-process statistical drafter
    # `lookup`'s: the same model, drafting only where the context repeats itself
    lookup: MaxGramDrafter = field(default_factory=lambda: MaxGramDrafter(matched_only=True))
    head: BeamDrafter | None = None  # `redrafter`'s and `parallel`'s: a drafter service hosting a trained head

    def cascade_levels(self) -> tuple[Drafter, ...]:
        if self.cascade:
            return self.cascade
        return (self.drafter, self.maxgram) if self.drafter is not None else (self.maxgram,)


def needs(backend: object | None, capability: type[Capability], strategy: str) -> Capability:
    """The drafter (or verifier) a strategy calls, typed by what it calls on it."""
    if backend is None:
        where = "a head drafter (SPECD_HEAD)" if strategy in HEAD_STRATEGIES else "a drafter (SPECD_DRAFTER)"
        raise NotServable(f"strategy {strategy!r} needs {where}, and none is configured")
    return cast(capability, backend)


@dataclass(frozen=True)
class RoundInput:
    session_id: str
    context: Sequence[int]  # committed tokens, prompt included
    params: SamplingParams
    seed: int  # the session's seed
    step: int  # rounds run so far in this session: with seed, it fixes the round's draws
    k: int  # draft length of `sd`, already capped by max_draft
    max_draft: int = 1 << 30  # the most draft tokens the round may send (its n + 1 must fit the room left)
    k_matrix: tuple[tuple[int, ...], ...] = ()  # `cascade`; empty = default_k_matrix
    tree: TreeShape | None = None  # `staged`; None = DEFAULT_TREE
    lookahead: Lookahead | None = None  # the turn's speculative next draft (pipelined strategies)
    carry: Carry | None = None  # the target's hidden state the turn's last round left (redrafter, parallel)
    head_only: bool = False  # redrafter, parallel: the head's beams alone, without the context's continuation
    # Pipelined strategies: the draft length a plain round (k = 0) drafts ahead for the next
    # round during its verify, after its guess of the bonus token (0: none; Lookahead)
    ahead_k: int = 0
    # Pipelined strategies, a round that drafts: where the next round's speculation fails
    # (the draft not all accepted, or the guess wrong), that round is the plain step its
    # verify sent ahead asks for instead (or_plain; plain rounds always ask for it)
    plain_ahead: bool = False


@dataclass(frozen=True)
class RoundResult:
    tokens: tuple[int, ...]  # to commit: n accepted + one recovered or bonus token
    drafted: int  # k actually drafted
    accepted: int  # n
    draft_cost: CallCost | None
    verify_cost: CallCost
    # A tree that branched (staged): its path of first candidates, the chain the drafter
    # would have drafted - its length and how many of its tokens were accepted
    first_path: tuple[int, int] | None = None


def sized(strategy: str, r: RoundInput, k: int, plain: bool = False, chain: bool = False) -> RoundInput:
    """The round with draft length k, in the strategy's own terms: `sd` and the foreign
    vocabularies draft k tokens; `cascade` gives its top drafter k tokens of the target's
    draft (row 0 of the k-matrix: k = 0 leaves only the statistical levels' tokens, nearly
    free; `plain`, none at all: plain decoding); `staged` grows its tree k deep (extra depths
    single paths), or with `chain` a chain of k first candidates."""
    k = min(k, r.max_draft)
    if strategy == "cascade":
        levels = r.k_matrix or ()
        if levels:
            top = (0,) * len(levels[0]) if plain and k == 0 else (k, *levels[0][1:])
            return replace(r, k=k, k_matrix=(top, *levels[1:]))
        return replace(r, k=k)
    if strategy == "staged" and chain and k:
        return replace(r, k=k, tree=TreeShape((1,) * k, k))
    if strategy == "staged":
        shape = r.tree or DEFAULT_TREE
        extra = max(0, k - len(shape.branching))
        return replace(r, k=k, tree=TreeShape((*shape.branching[:k], *(1,) * extra), shape.budget + extra))
    return replace(r, k=k)


async def ar_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Plain autoregressive decoding: a verify with an empty draft yields one token from p."""
    v = await backends.verifier.verify(r.session_id, r.context, (), (), r.params, round_seed(r.seed, r.step, "verify"))
    return RoundResult(v.tokens, 0, 0, None, v.cost)


async def sd_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
    Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative
    Sampling"): the drafter proposes k tokens, the target verifies them in one pass.
    """
    if r.k == 0:
        return await ar_round(backends, r)
    drafter = needs(backends.drafter, Drafter, "sd")
    d = await drafter.propose(r.session_id, r.context, r.k, r.params, round_seed(r.seed, r.step, "draft"))
    v = await backends.verifier.verify(
        r.session_id, r.context, d.tokens, d.q, r.params, round_seed(r.seed, r.step, "verify")
    )
    return RoundResult(v.tokens, len(d.tokens), v.accepted, d.cost, v.cost)


async def lookup_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; the max-gram model at the
    bottom of Chen et al. 2024's cascade): the draft is what followed the latest earlier
    occurrence of the context's longest recurring suffix, drafted in the orchestrator by its
    max-gram model (services/ngram.py) - no drafter model and no drafter call - and verified
    as in `sd`. Where no suffix of two or more tokens recurs, the round drafts nothing (plain
    decoding): the cascade's bigram guesses are accepted too rarely to pay for a longer verify.
    Its tokens are deterministic, so q is a point mass; whether and how much it drafts depends
    only on the context: lossless for greedy and sampling (a sampled draft token is accepted
    with probability p(token))."""
    return await sd_round(replace(backends, drafter=backends.lookup), r)


# -- pipelined ----------------------------------------------------------------------------


PROBE_AFTER = 16  # rounds before a draft ahead as long as one that came too late is tried again


@dataclass
class Lookahead:
    """One turn's speculative draft of its next round, drafted while the verifier checks the
    current one (pipelined `sd`), the verify of that draft sent ahead, and what became of
    such drafts.

    The draft runs after `assumed`: the current context with the current draft all
    accepted. Its first token is the drafter's guess g of the verifier's bonus token, the
    rest the next round's draft; it is used when the next round starts from assumed + g,
    and discarded on any other outcome. With `verify_ahead`, as soon as that draft is done
    its verify is sent too, claiming the context assumed + g (services/context.whole_claim):
    the verifier takes it right after the current verify, runs it where its answer made the
    guess true and refuses it at no cost where not, so a right guess gets its answer
    without a round trip or an idle verifier in between. A plain round's draft ahead sends
    that verify with `or_plain`, and with RoundInput.plain_ahead a drafting round's too:
    where the claim misses (the guess was wrong, or the draft not all accepted) the verifier
    takes a plain step after the context it holds instead, which is the next round whenever
    that context is the one the round starts from (`plain_steps`): a round after a failed
    speculation waits for no round trip either, and drafts ahead while the step runs."""

    verify_ahead: bool = True
    task: asyncio.Task | None = None  # the speculative draft
    sent: asyncio.Task | None = None  # its verify, sent ahead once the draft was done
    assumed: list[int] | None = None
    arrived_ready: bool = False  # the draft was done when the verify answered
    # Tokens after g a speculative draft can have and still be done when the verify it runs
    # beside answers: one more after a draft that was, one fewer than a draft that was not
    fits: int = 2
    # The shortest draft ahead (g included) lately not done when the verify it ran beside
    # answered, and the rounds left before drafts ahead may grow to its length again: a draft
    # one token longer than the last that was done in time is a probe, and a probe that
    # comes too late costs the next round a round trip (its verify leaves after it began)
    too_long: int = 1 << 30
    too_long_rounds: int = 0
    started: int = 0  # speculative drafts begun
    hits: int = 0  # used as the next round's draft
    ready: int = 0  # used, and done before the verify answered: no drafting wait at all
    verified: int = 0  # used with their verify already sent when the round began
    plain_steps: int = 0  # rounds whose speculation failed answered by the plain step sent ahead (or_plain)
    continued: int = 0  # used, and drafted by the drafter going on after its previous answer
    # Round trips of verifies that drafting overlapped: the round waited for its verify (sent
    # once its draft arrived), then for its next draft, which the drafter had been drafting
    # since its previous answer (a continuation), so the trip delayed nothing
    overlapped: int = 0
    or_plain: bool = False  # the verify sent ahead falls back to a plain step
    # The last drafting round's draft took the drafter longer than its verify took the
    # verifier: with the drafter on cores of its own, drafts ahead ask it to go on (continue_k)
    drafter_slower: bool = False
    verify_trip: bool = False  # the last round waited for its verify's round trip
    _verify: Callable[[Draft], Awaitable[Verified | None]] | None = field(default=None, repr=False)

    def start(
        self,
        assumed: list[int],
        draft: Awaitable[Draft],
        verify: Callable[[Draft], Awaitable[Verified | None]] | None = None,
        or_plain: bool = False,
    ) -> None:
        """Begins the speculative draft after `assumed`; with verify_ahead and `verify`, its
        verify (verify(draft)) is sent as soon as the draft is done, if it has a token after g
        (`or_plain`: `verify` asks for a plain step where the guess fails)."""
        self.discard()
        task = asyncio.ensure_future(draft)
        self._verify = verify if self.verify_ahead else None
        if self._verify is not None:
            task.add_done_callback(self._send)
        self.task, self.assumed, self.or_plain = task, assumed, or_plain
        self.arrived_ready = False

    def _send(self, done: asyncio.Task) -> None:
        """Sends the verify of a finished speculative draft (once; not for a discarded one)."""
        if done is not self.task or self.sent is not None or self._verify is None:
            return
        if not done.cancelled() and done.exception() is None and len(done.result().tokens) >= 2:
            self.sent = asyncio.ensure_future(self._verify(done.result()))

    async def take(self, context: Sequence[int], k: int, max_draft: int) -> Ahead | None:
        """The next round's draft if the speculation held for this context, None otherwise
        (the speculative draft and its verify discarded). With its verify sent ahead, the whole
        draft (if it fits max_draft) and that verify; without, at most k tokens, so nothing
        for k = 0 (the round would not draft). A draft not yet done is awaited whatever k:
        whether a draft is used depends on the context alone, never on how soon it was done
        (a drafter that ends drafts at low confidence finishes some sooner than others, so
        taking only the finished ones would favour some draws over others)."""
        task, assumed = self.task, self.assumed
        if task is None or assumed is None:
            return None
        sent_early = self.sent is not None  # its verify left before this round began
        n = len(assumed)
        if k == 0 and self._verify is None:
            self.discard()
            return None
        if len(context) != n + 1 or list(context[:n]) != assumed:
            # The round did not commit what the draft ahead assumed. Its verify, sent with
            # or_plain (now, if the draft is done but its done-callback has not run yet),
            # takes the plain step after what the round did commit.
            if task.done():
                self._send(task)
            sent, self.sent = self.sent, None
            self.discard()
            return self._failed(sent, sent_early)
        try:
            d = await task
        except Exception:  # noqa: BLE001 - a failed speculative draft costs only itself; the round drafts afresh
            self.discard()
            return None
        self._send(task)  # where its done-callback has not run yet
        sent = self.sent
        self.task = self.sent = self.assumed = None
        if not d.tokens or d.tokens[0] != context[-1] or len(d.tokens) < 2:
            return self._failed(sent, sent_early)
        rest = replace(d, tokens=d.tokens[1:], q=d.q[1:], cost=d.cost.sent_before_its_round())
        self.hits += 1
        self.ready += self.arrived_ready
        self.continued += d.continued
        self.overlapped += d.continued and self.verify_trip and not self.arrived_ready
        if sent is not None and len(rest.tokens) <= max_draft:
            self.verified += 1
            return Ahead(rest, sent, sent_early)
        _cancel(sent)
        return Ahead(replace(rest, tokens=rest.tokens[:k], q=rest.q[:k]), None) if k else None

    def _failed(self, sent: asyncio.Task | None, sent_early: bool) -> Ahead | None:
        """Where the speculation failed: with a verify sent with or_plain, the next round is
        plain, and its answer the plain step that verify takes instead (with that round's
        seed: the token a plain verify sent now would give) where it ran after exactly the
        round's context (`plain_step`); None without one (the round drafts afresh, or plain
        at k = 0). Not awaited here: the round drafts ahead while the step runs."""
        if not self.or_plain or sent is None:
            _cancel(sent)
            return None
        return Ahead(None, sent, sent_early)

    def plain_step(self, v: Verified | None, context: Sequence[int]) -> Verified | None:
        """A plain round's answer from the verify it took (`_failed`): the plain step where
        it ran after exactly `context`, None where not (the round verifies plainly itself)."""
        if v is None or v.plain_after != (len(context), fingerprint(context)):
            return None
        self.plain_steps += 1
        return v

    def may_grow(self, wanted: int) -> bool:
        """Whether a draft ahead of `wanted` tokens (g included) may be tried: shorter than
        the last one that was late, or that was PROBE_AFTER rounds ago."""
        return wanted < self.too_long

    def timed(self, wanted: int) -> None:
        """After a round that drafted `wanted` tokens ahead: what fits beside a verify."""
        if self.too_long_rounds:
            self.too_long_rounds -= 1
            if not self.too_long_rounds:
                self.too_long = 1 << 30
        if wanted <= 1:
            return
        if self.arrived_ready:  # one more token after g next time, unless that was late lately
            self.fits = max(self.fits, wanted if self.may_grow(wanted + 1) else wanted - 1)
        else:
            self.fits = max(1, wanted - 2)
            self.too_long, self.too_long_rounds = min(self.too_long, wanted), PROBE_AFTER

    def discard(self) -> None:
        _cancel(self.sent)
        _cancel(self.task)
        self.task = self.sent = self.assumed = None

    async def close(self) -> None:
        """Ends the turn's speculation: a draft or verify still running is cancelled and
        awaited, so no call outlives the turn. A cancelled call leaves the services' caches
        consistent: the caller's record of what a service holds is only ever a prefix claim,
        checked by the service (services/context.py), so the next call resends what is
        missing."""
        calls = [call for call in (self.task, self.sent) if call is not None]
        self.discard()
        for call in calls:
            with contextlib.suppress(BaseException):
                await call


@dataclass(frozen=True)
class Ahead:
    """A next round's draft from a Lookahead, and its verify if already sent."""

    draft: Draft | None  # None: the round is the plain step its verify took (or_plain)
    verify: asyncio.Task | None
    verify_sent_early: bool = False  # the verify left before the round that uses it began


def _cancel(task: asyncio.Task | None) -> None:
    if task is None:
        return
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()  # retrieved: a discarded call that failed is not an error to log


async def pipelined_sd_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Speculative decoding with drafting overlapped with verification (as in PipeSpec and
    SpecEdge): while the verifier checks round r's draft d_1..d_k, the drafter already drafts
    round r+1 after the context it will have if all of d is accepted - its own guess g of the
    bonus token first, then k more - and, once that draft is done, its verify is sent ahead
    (`Lookahead`). When the verifier commits exactly d + g, round r+1's draft is that
    continuation, often finished, and its verify often running or done, before the answer
    arrived; otherwise both are discarded and round r+1 drafts afresh, as `sd` does. A plain
    round (k = 0) given `ahead_k` drafts ahead too - g and ahead_k tokens after its context -
    where the drafter would otherwise idle through its verify (cores of its own). There,
    where the drafter is the slower service (`Lookahead.drafter_slower`), a draft ahead asks
    it to go on after answering with what round r+2's draft ahead will ask for, so that
    request finds its tokens drafted (or under way) instead of a drafter that idled while
    they travelled.

    Lossless: a speculative draft is drawn from the drafter's q after its assumed context,
    with its own seed, independently of the verifier's coins; it is used only when the
    committed context equals that assumed context - an event that depends on d, g and the
    verifier's coins, never on the tokens drafted after g. So a used draft is distributed as
    q given the context it is verified after, which is all the verifier's rejection rule
    needs, and greedy output is the target's argmax as always. A verify sent ahead is the
    round's own verify - the same context, draft, q and seed (round r+1's) - only sent
    earlier, and its answer is used only for that same context. Its draft length was fixed
    before round r's answer (round r's k or ahead_k, and the drafter's own confidence), never
    by the verifier's coins. A draft answered from the drafter's continuation is token for
    token and q for q the one that request would get drafted afresh
    (drafter_svc/continuation.py).
    """
    ahead = r.lookahead if r.lookahead is not None else Lookahead()
    taken = await ahead.take(r.context, r.k, r.max_draft)
    if taken is None and r.k == 0 and r.ahead_k == 0:
        return await ar_round(backends, r)
    drafter = needs(backends.drafter, Drafter, "sd")
    d: Draft | None = None  # None: a plain round that drafts ahead (r.ahead_k)
    sent, sent_early = None, False
    if taken is not None:
        d, sent, sent_early = taken.draft, taken.verify, taken.verify_sent_early
    elif r.k:
        d = await drafter.propose(r.session_id, r.context, r.k, r.params, round_seed(r.seed, r.step, "draft"))
    tokens, q = (d.tokens, d.q) if d is not None else ((), ())
    assumed = [*r.context, *tokens]
    room = r.max_draft - len(tokens) - 1  # round r+1's most draft tokens, if it commits d + g
    wanted = 0  # g and the tokens after it that round r+1's speculative draft asks for
    if room > 0 and (r.k or r.ahead_k):
        # g and round r+1's draft, seeded for round r+1 (a label of its own: `sd`'s draws differ).
        # After a draft, one token more than this round's k where the last speculative draft
        # was done before its verify answered (the drafter has time to spare): round r+1 may
        # draft longer - an adaptive k growing, or exploring - which a draft of exactly k
        # tokens would cap; but not where a draft ahead that long came too late lately
        # (Lookahead.may_grow). A round without a draft (plain, or the plain step sent ahead)
        # drafts ahead what fits beside its verify: a round that takes it waits for none of it.
        drafting = bool(r.k and tokens)
        grow = ahead.arrived_ready and ahead.may_grow(r.k + 2)
        after = r.k + (1 if grow else 0) if drafting else min(r.k or r.ahead_k, ahead.fits)
        seed = round_seed(r.seed, r.step + 1, "lookahead")
        # At most `room` tokens after g: the verify sent ahead carries them all.
        wanted = min(1 + after, room + 1)
        # A plain round's next round is plain where the guess fails, and with plain_ahead a
        # drafting round's where its draft or the guess fails: its verify sent ahead says so
        # (or_plain), and the verifier steps plainly there instead of refusing it.
        or_plain = r.plain_ahead or not tokens
        continues = r.plain_ahead and ahead.drafter_slower
        if continues and callable(getattr(drafter, "propose_and_continue", None)):
            # Where the drafter is the slower service (and on cores of its own), it goes on
            # drafting after this draft, for round r+2's draft ahead, rather than idle while its
            # answer travels and that request comes back (drafter_svc/continuation.py: the
            # same draft, only sooner).
            continue_seed = round_seed(r.seed, r.step + 2, "lookahead")
            draft = cast(ContinuingDrafter, drafter).propose_and_continue(
                r.session_id, assumed, wanted, r.params, seed, wanted + 1, continue_seed
            )
        else:
            draft = drafter.propose(r.session_id, assumed, wanted, r.params, seed)
        ahead.start(assumed, draft, _verify_next(backends.verifier, r, assumed, or_plain), or_plain)
        ahead.started += 1
    v = await _answer(sent)
    if taken is not None and d is None:
        v = ahead.plain_step(v, r.context)
    elif v is not None and v.plain_after is not None:  # a plain step where a verify of d was due
        v = None
    if v is None:
        v = await backends.verifier.verify(
            r.session_id, r.context, tokens, q, r.params, round_seed(r.seed, r.step, "verify")
        )
    elif sent_early:
        v = replace(v, cost=v.cost.sent_before_its_round())
    ahead.arrived_ready = ahead.task is not None and ahead.task.done()
    ahead.verify_trip = v.cost.round_trips > 0
    if d is not None:
        ahead.drafter_slower = d.cost.compute_seconds > v.cost.compute_seconds
    ahead.timed(wanted)
    return RoundResult(v.tokens, len(tokens), v.accepted, d.cost if d is not None else None, v.cost)


def _verify_next(
    verifier: Verifier, r: RoundInput, assumed: list[int], or_plain: bool = False
) -> Callable[[Draft], Awaitable[Verified | None]] | None:
    """Round r+1's verify of a speculative draft g, d'_1..d'_m after `assumed`, as round r+1
    would send it (`or_plain`: and where g fails, round r+1's plain step); None where the
    verifier cannot take a verify ahead."""
    if not callable(getattr(verifier, "verify_ahead", None)):
        return None
    ahead = cast(AheadVerifier, verifier)
    seed = round_seed(r.seed, r.step + 1, "verify")

    def verify(d: Draft) -> Awaitable[Verified | None]:
        context, draft, q = [*assumed, d.tokens[0]], d.tokens[1:], d.q[1:]
        return ahead.verify_ahead(r.session_id, context, draft, q, r.params, seed, or_plain=or_plain)

    return verify


async def _answer(sent: asyncio.Task | None) -> Verified | None:
    """The answer of a verify sent ahead; None when none was sent, or it was refused or failed
    (the round then verifies as usual)."""
    if sent is None:
        return None
    try:
        return await sent
    except Exception:  # noqa: BLE001 - the same verify is sent again, and fails over as every call does
        return None


# -- heterogeneous vocabularies ----------------------------------------------------------


async def slem_round(backends: Backends, r: RoundInput) -> RoundResult:
    """String-level exact match (Timor et al. 2025, "Accelerating LLM Inference with Lossless
    Speculative Decoding Algorithms for Heterogeneous Vocabularies", Alg. 2): the drafter,
    whatever its tokenizer, drafts k of its own tokens; their text, re-tokenized by the
    target's tokenizer (drafter_svc/foreign.py), is verified with point masses - exact match
    when greedy, accept with probability p(token) when sampling - so the output is the
    target's. With a drafter of the target's own vocabulary it is `sd`.
    """
    return await _translated_round(backends, r, "slem")


async def tli_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Token-level intersection (Timor et al. 2025, Alg. 4): the drafter draws only tokens
    that are also target tokens (same bytes), from its distribution restricted to them and
    renormalised, which is the q sent in target ids: standard rejection sampling, exact."""
    return await _translated_round(backends, r, "tli")


async def _translated_round(backends: Backends, r: RoundInput, vocab: str) -> RoundResult:
    if r.k == 0:
        return await ar_round(backends, r)
    drafter = needs(backends.drafter, Drafter, vocab)
    d = await drafter.propose(r.session_id, r.context, r.k, r.params, round_seed(r.seed, r.step, "draft"), vocab)
    # slem's k counts the drafter's tokens; the target tokens of their text must fit the room left.
    tokens = d.tokens[: r.max_draft]
    q = d.q[: len(tokens)]
    v = await backends.verifier.verify(r.session_id, r.context, tokens, q, r.params, round_seed(r.seed, r.step, "verify"))
    return RoundResult(v.tokens, len(tokens), v.accepted, d.cost, v.cost)


async def slrs_round(backends: Backends, r: RoundInput) -> RoundResult:
    """String-level rejection sampling (Timor et al. 2025, Alg. 3, made exact for any pair of
    vocabularies as described in services/slrs.py): the drafter sends k of its tokens as
    text, each with its distribution over strings of the same byte length; the target checks
    them in one tree pass over every target tokenization of those strings.

    Statistics count drafted strings (the drafter's tokens), not target tokens.
    """
    if r.k == 0:
        return await ar_round(backends, r)
    drafter = needs(backends.drafter, StringDrafter, "slrs")
    d = await drafter.propose_strings(r.session_id, r.context, r.k, r.params, round_seed(r.seed, r.step, "draft"))
    v = await cast(StringVerifier, backends.verifier).verify_strings(
        r.session_id, r.context, d.proposals, r.params, round_seed(r.seed, r.step, "verify")
    )
    return RoundResult(v.tokens, v.verified, v.accepted, d.cost, v.cost)


# -- cascade ----------------------------------------------------------------------------

# Default k-matrices by number of drafters below the target (see cascade_round for the
# meaning). Chosen by measurement on the packaged models (qwen2.5-coder 1.5B <- 0.5B <-
# max-gram, CPU): scripts/sweep_shapes.py, figures in the README ("The default k-matrix and tree").
DEFAULT_K_MATRICES: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((4,),),
    2: ((4, 2), (0, 3)),
}


def default_k_matrix(levels: int) -> tuple[tuple[int, ...], ...]:
    """The default for `levels` drafters: the table above; deeper cascades (not measured)
    have every level review 3 tokens at a time from the level just below it."""
    if levels in DEFAULT_K_MATRICES:
        return DEFAULT_K_MATRICES[levels]
    return tuple(tuple(3 if j == i else 0 for j in range(levels)) for i in range(levels))


def k_matrix_problems(k_matrix: Sequence[Sequence[int]], levels: int) -> list[str]:
    """Why a k-matrix cannot drive a cascade of `levels` drafters; empty when it can."""
    found = []
    if len(k_matrix) != levels or any(len(row) != levels for row in k_matrix):
        found.append(f"the k-matrix must be {levels} x {levels} (one row and column per drafter), got {[len(r) for r in k_matrix]}")
        return found
    if any(k < 0 for row in k_matrix for k in row):
        found.append("k-matrix entries must be >= 0")
    if any(k_matrix[i][j] for i in range(levels) for j in range(i)):
        found.append("k-matrix entries left of the diagonal must be 0 (a drafter only reviews smaller ones)")
    if not any(k_matrix[0]):
        found.append("row 0 of the k-matrix (the target's draft) is all zeros")
    return found


async def cascade_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Cascade Speculative Drafting (Chen et al. 2024, "Cascade Speculative Drafting for Even
    Faster LLM Inference"), with the two verbs of its reference code: every level `propose`s,
    every level but the bottom one also `review`s a smaller level's draft.

    Levels: 0 = the target, 1..L = backends.cascade_levels() (largest first; by default the
    drafter service, then the in-process max-gram model). k-matrix K (L x L, upper
    triangular): the draft that level i reviews is built left to right, drafter level j > i
    contributing K[i][j-1] tokens (horizontal cascade: larger drafters take the early
    positions, the likeliest to be accepted). A level j produces its share either by its own
    `propose` (when row j is all zeros, or j is the bottom) or in rounds of: build the draft
    level j reviews (row j, recursively: the vertical cascade), then `review` it, which emits
    n + 1 tokens per pass of level j. The target finally verifies row 0's draft.

    Why the output is exactly the target's (sampling and greedy):
    1. Every token a level hands upward travels with the q it is distributed as, given
       everything the upper levels see: a neural level's q is its own warped distribution
       truncated to its top entries and renormalised (drafter_svc.draft.own_distribution),
       whether the token came from its `propose` (sampled from exactly that q) or from its
       `review`; max-gram tokens are deterministic, q a point mass.
    2. A review is speculative sampling against the reviewer's own q: accept d with
       probability min(1, m(d)/s(d)), else draw from normalize(max(0, m - s)). For any
       proposal s that d truly came from, the emitted token is distributed exactly as m
       (Leviathan et al. 2023, Theorem 3.5; Chen et al. 2023) - which is claim 1 for the
       reviewer's tokens, by induction up from the bottom level. That s may itself be the
       output of a lower review is no obstacle: given the visible prefix, the token is
       distributed as the s sent with it, and the lower level's hidden draws are independent
       of this level's coins.
    3. The target's verify is the same rule with its untruncated warped p: whatever mix of
       q's the draft carries (one per token, each true by 1.), each emitted token is
       distributed as p given the prefix, so the output is the target's own distribution.
       Cutting a level's output to its share, or stopping early when the max-gram model has
       no match, depends only on the visible prefix and keeps every claim.
    4. All of this needs each call's random draws independent of every other call's: each
       call is seeded from (session seed, round, level, call number) (round_seed), which
       also makes a round replay exactly. (A level that sent no q at all would still be
       lossless - a point mass is a valid q for a token drawn independently of the
       reviewer's coins - only less often accepted. Sending a q the token was not drawn
       from - the untruncated distribution, or a "lenient" review's - is not, and
       tests/test_cascade.py checks that both mistakes fail its statistical test.)
    Greedy: every q is a point mass at the level's argmax and every rule is exact match, so
    the target emits its own argmax at every position.

    Deviations from the paper: no "leniency" (reviews that accept near-misses) - it would
    make a level's output no longer distributed as its q, so sampling would not be lossless;
    a level's share is capped so its last review cannot overshoot the draft (the sub-draft is
    one shorter than the tokens still wanted, since a review emits n + 1).
    """
    levels = backends.cascade_levels()
    k_matrix = r.k_matrix or default_k_matrix(len(levels))
    if not any(k_matrix[0]) and r.k == 0:  # an adaptive round that chose no draft at all
        return await ar_round(backends, r)
    problems = k_matrix_problems(k_matrix, len(levels))
    if problems:
        raise ValueError("; ".join(problems))
    costs: list[CallCost] = []

    async def draft_for(i: int, context: list[int], limit: int) -> tuple[list[int], list[SparseDist | None]]:
        """The draft level i reviews (at most `limit` tokens), built from levels below it."""
        tokens: list[int] = []
        qs: list[SparseDist | None] = []
        for j in range(i + 1, len(levels) + 1):
            want = min(len(tokens) + k_matrix[i][j - 1], limit)
            while len(tokens) < want:
                got, got_q = await produce(j, context + tokens, want - len(tokens))
                if not got:
                    break  # a statistical level with nothing to propose here
                take = want - len(tokens)
                tokens += got[:take]
                qs += got_q[:take]
        return tokens, qs

    async def produce(j: int, context: list[int], need: int) -> tuple[list[int], list[SparseDist | None]]:
        """Up to `need` tokens from level j after context, each with its q (None = point mass)."""
        level = levels[j - 1]
        seed = round_seed(r.seed, r.step, f"cascade.{j}.{len(costs)}")
        if j == len(levels) or not any(k_matrix[j]):
            d = await level.propose(r.session_id, context, need, r.params, seed)
            costs.append(d.cost)
            return list(d.tokens), list(d.q) or [None] * len(d.tokens)
        sub, sub_q = await draft_for(j, context, need - 1)
        v = await cast(Reviewer, level).review(r.session_id, context, sub, _wire_q(sub, sub_q), r.params, seed)
        costs.append(v.cost)
        return list(v.tokens), list(v.q) or [None] * len(v.tokens)

    draft, q = await draft_for(0, list(r.context), min(sum(k_matrix[0]), r.max_draft))
    v = await backends.verifier.verify(
        r.session_id, r.context, draft, _wire_q(draft, q), r.params, round_seed(r.seed, r.step, "verify")
    )
    return RoundResult(v.tokens, len(draft), v.accepted, total_cost(costs), v.cost)


def _wire_q(tokens: Sequence[int], q: Sequence[SparseDist | None]) -> tuple[SparseDist, ...]:
    """q as the wire carries it: none at all when every token is a point mass, else one per
    token with point masses written out."""
    if all(q_i is None for q_i in q):
        return ()
    return tuple(SparseDist.point(t) if q_i is None else q_i for t, q_i in zip(tokens, q))


# -- staged -----------------------------------------------------------------------------

# The default draft tree, chosen by measurement on the packaged models (scripts/sweep_shapes.py):
# three candidates for the first token, two for the second, then a single path.
DEFAULT_TREE = TreeShape(branching=(3, 2, 1, 1, 1), budget=8)


async def staged_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Staged Speculative Decoding (Spector & Re 2023, "Accelerating LLM Inference with
    Staged Speculative Decoding"): the drafter grows a tree of candidates (its best tokens
    when greedy, draws without replacement when sampling; drafter_svc.draft.propose_tree, whose
    own passes are sped up by a second stage of max-gram speculation), and the target
    verifies the whole tree in one pass with a tree attention mask, keeping only the accepted
    path in its KV cache (verifier_svc/core.py, verify_tree).

    Lossless: greedy keeps the longest path of target argmaxes; sampling walks the tree with
    recursive rejection sampling, exact at every node (services/multidraft.py).

    Statistics count a tree's depth as its drafted tokens (positions, not nodes), so that
    acceptance by position compares with `sd`.
    """
    shape = r.tree or DEFAULT_TREE
    depth = min(len(shape.branching), r.max_draft)
    if depth == 0:
        return await ar_round(backends, r)
    drafter = needs(backends.drafter, TreeDrafter, "staged")
    shape = TreeShape(shape.branching[:depth], shape.budget)
    t = await drafter.propose_tree(r.session_id, r.context, shape, r.params, round_seed(r.seed, r.step, "draft"))
    v = await cast(TreeVerifier, backends.verifier).verify_tree(
        r.session_id, r.context, t.tree, t.q, r.params, round_seed(r.seed, r.step, "verify")
    )
    first = t.tree.first_path()
    branched = (len(first), common_prefix_len(first, list(v.tokens[: v.accepted]))) if len(first) < len(t.tree) else None
    return RoundResult(v.tokens, t.tree.depth, v.accepted, t.cost, v.cost, branched)


# -- redrafter ---------------------------------------------------------------------------

# Beams a redrafter round keeps when the request gives no tree shape. One: with the head
# `specd train redrafter` makes here, a second beam added a tree row's cost to every verify
# and no acceptance (HumanEval, 1.5B target: 0.71x `ar` with one beam, 0.62x with two).
DEFAULT_BEAMS = 1
# The most tokens the head drafts beside the context's own continuation (lookup), which
# drafts the round's k: the head's acceptance past its third position is a few percent
# (HumanEval, 1.5B target: 42% / 22% / 4% at positions 1-3), and every node it adds
# lengthens the verify. Capped in every round, matched or not, so that the acceptance
# adaptive draft length measures past position 3 is lookup's: a head drafting k deep where
# nothing recurs pulled those rates down and with them the k of the rounds that copy
# (HumanEval: draft length 3.5 and tau 3.7, against lookup's own 6.4 and 5.3).
HEAD_DEPTH_BESIDE_LOOKUP = 3
# ... and where lookup's path exists: one token, the alternative to the path's first. The
# head's later tokens are accepted only where its first was and the path's was not (on
# HumanEval 83% of lookup's first tokens are accepted, 2% of the head's second), and on a
# CPU whose verify is not flat each node costs what a fifth of a token's pass does.
HEAD_DEPTH_BESIDE_MATCH = 1


@dataclass
class Carry:
    """What a trained head drafts a turn's next round from: the target's hidden state behind
    the context's last token, which holds while the context is `length` tokens long."""

    hidden: torch.Tensor | None = None  # (H,)
    length: int = -1


async def redrafter_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Recurrent drafting (Cheng et al. 2024, "Recurrent Drafter for Fast Speculative Decoding
    in Large Language Models"): the drafter's recurrent head turns the target's hidden state
    behind the context's last token into `width` beams of k tokens (services/redrafter.py),
    merged into a prefix tree, which the target verifies in one tree pass as in `staged`; the
    verify also returns the hidden state behind the round's last token, which the next round
    drafts from (`head_round`)."""
    return await head_round(backends, r, "redrafter")


async def parallel_round(backends: Backends, r: RoundInput) -> RoundResult:
    """Parallel drafting (Xiao et al. 2024, "ParallelSpec: Parallel Drafter for Efficient
    Speculative Decoding"): the drafter's parallel head drafts all k positions in one pass
    from the target's hidden state and k mask embeddings (services/redrafter.ParallelHead):
    one drafter pass a round, a chain (or, for a request's tree shape, the best joint drafts
    merged into a tree), verified as redrafter's are (`head_round`)."""
    return await head_round(backends, r, "parallel")


async def head_round(backends: Backends, r: RoundInput, strategy: str) -> RoundResult:
    """A round drafted by a trained head (Backends.head) from the target's hidden state,
    with the context's own continuation beside its beams.

    The head reads one hidden state and cannot see the context, so it rarely drafts what the
    answer copies from the prompt (a docstring, a variable name, a quoted line); prompt
    lookup drafts exactly that and nothing else. So the tree also holds, as one more path,
    what followed the latest earlier occurrence of the context's longest recurring suffix
    (`lookup`'s max-gram draft, k tokens, in the orchestrator at no model cost), and the head
    drafts at most HEAD_DEPTH_BESIDE_LOOKUP tokens (HEAD_DEPTH_BESIDE_MATCH where that path
    exists). One tree pass verifies both. `head_only`
    leaves the lookup path out: the head alone, k tokens, as the papers have it.

    A round without the hidden state (a turn's first, or after a round that drafted
    elsewhere) drafts the lookup path alone; with neither, or k = 0, it verifies an empty
    tree: a plain step that returns the hidden state.

    Lossless: the head's beams are chosen deterministically and the lookup path depends on
    the context only, so every node is verified as a point mass - greedy keeps the longest
    path of target argmaxes, sampling walks the tree by recursive rejection sampling
    (services/multidraft.py), exact whatever is drafted. Statistics count the tree's depth
    as drafted tokens, as `staged` does.
    """
    verifier = cast(TreeVerifier, backends.verifier)
    carry = r.carry if r.carry is not None else Carry()
    width = r.tree.branching[0] if r.tree is not None else DEFAULT_BEAMS
    depth = min(r.k, r.max_draft)
    copied = None
    if depth > 0 and not r.head_only:
        copied = await backends.lookup.propose(r.session_id, r.context, depth, r.params, 0)
    path = copied.tokens if copied is not None else ()
    drafted = None
    if depth > 0 and carry.hidden is not None and carry.length == len(r.context):
        head = needs(backends.head, BeamDrafter, strategy)
        beside = HEAD_DEPTH_BESIDE_MATCH if path else HEAD_DEPTH_BESIDE_LOOKUP
        head_depth = depth if r.head_only else min(depth, beside)
        drafted = await head.propose_beams(r.session_id, carry.hidden, r.context[-1], width, head_depth)
    tree = (drafted.tree if drafted is not None else Tree((), ())).with_path(path)
    v = await verifier.verify_tree(
        r.session_id, r.context, tree, (), r.params, round_seed(r.seed, r.step, "verify"), want_hidden=True
    )
    carry.hidden, carry.length = v.hidden, len(r.context) + len(v.tokens)
    if not len(tree):
        return RoundResult(v.tokens, 0, 0, None, v.cost)
    cost = total_cost(d.cost for d in (drafted, copied) if d is not None)
    return RoundResult(v.tokens, tree.depth, v.accepted, cost, v.cost)


Strategy = Callable[[Backends, RoundInput], Awaitable[RoundResult]]


@dataclass(frozen=True)
class StrategySpec:
    run: Strategy
    needs_drafter: bool  # calls the drafter service (`lookup` drafts in the orchestrator)
    # The drafter must share the target's vocabulary; False: any drafter that translates to
    # the target's (SPECD_TARGET_TOKENIZER), or one of the target's own vocabulary.
    same_vocab: bool = True
    drafts: bool = True  # a round's k is a draft length (`ar` verifies no draft)
    needs_head: bool = False  # drafts with a trained head of the strategy's name (Backends.head, SPECD_HEAD)
    pipelined: bool = False  # drafts the next round during a verify (Lookahead), a plain round's too (ahead_k)


STRATEGIES: dict[str, StrategySpec] = {
    "ar": StrategySpec(ar_round, needs_drafter=False, drafts=False),
    "lookup": StrategySpec(lookup_round, needs_drafter=False),
    "sd": StrategySpec(sd_round, needs_drafter=True),
    "sd-pipe": StrategySpec(pipelined_sd_round, needs_drafter=True, pipelined=True),
    "cascade": StrategySpec(cascade_round, needs_drafter=True),
    "staged": StrategySpec(staged_round, needs_drafter=True),
    "slem": StrategySpec(slem_round, needs_drafter=True, same_vocab=False),
    "tli": StrategySpec(tli_round, needs_drafter=True, same_vocab=False),
    "slrs": StrategySpec(slrs_round, needs_drafter=True, same_vocab=False),
    "redrafter": StrategySpec(redrafter_round, needs_drafter=False, needs_head=True),
    "parallel": StrategySpec(parallel_round, needs_drafter=False, needs_head=True),
}
# The strategies a trained head drafts for, each named by the head's kind (redrafter first)
HEAD_STRATEGIES = tuple(name for name, spec in STRATEGIES.items() if spec.needs_head)
