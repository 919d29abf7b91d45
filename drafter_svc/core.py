"""The drafter's core: one runtime, the committed context of each session, and every call a
drafter answers, with typed arguments and results.

The same object serves the gRPC servicer (drafter_svc/server.py, which only converts
messages) and callers in this process (tests, `specd bench`'s in-process path), where it is
the Drafter the strategies call. Each call resolves its context (a delta over gRPC, the whole
sequence in process) once, checks its input (raising services.errors types), runs the model
work on the core's one worker thread, and records what the caller now believes is held.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import torch

from drafter_svc.continuation import Continuation, Continuations, ProposeItem
from drafter_svc.draft import DraftJob, propose_many, propose_tree, review
from drafter_svc.foreign import Translation, propose_slem, propose_strings, propose_tli
from services.calls import PENDING, Batched, ModelCalls
from services.context import ContextDelta, fingerprint
from services.errors import BadRequest, Unsupported, check_chain, check_draft_length
from services.ngram import NgramIndex
from services.roles import Draft, Reviewed, StringsDraft, TreeDraft, total_cost
from services.runtime import ModelInfo, Runtime
from services.sampling import SamplingParams, SparseDist
from services.second_stage import GuessLedger, PassTimes
from services.sessions import Context
from services.tree import TreeShape
from services.vocab import token_bytes
from services.worker import Worker

VOCAB_MODES = ("native", "slem", "tli")


class DrafterCore:
    """A neural drafter. With a `translation` its vocabulary differs from the target's: calls
    still carry target ids, and it drafts by slem, tli or slrs only (drafter_svc/foreign.py)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        q_top: int = 32,
        second_stage: int = 4,
        max_draft: int = 64,
        max_sessions: int = 16,
        translation: Translation | None = None,
        worker: Worker | None = None,
        min_confidence: float = 0.0,
        max_queue: int = 0,
        max_batch_tokens: int = 256,
        batch_wait: float = 0.0,
    ) -> None:
        self.runtime = runtime
        self.min_confidence = min_confidence  # propose stops before a less confident position
        self.q_top = q_top  # entries of the truncated q sent when sampling
        self.second_stage = second_stage  # max-gram lookahead while growing trees (0 = off)
        self.pass_times = PassTimes()  # what this drafter's tree passes cost: whether guesses pay
        self.max_draft = max_draft
        self.translation = translation
        self._info = runtime.info if translation is None else translation.wire_info(runtime.info)
        # The range of ids calls carry: the target's when translating.
        self.wire_vocab = translation.target_rows if translation is not None else runtime.info.vocab_size
        # worker: the thread the runtime was loaded on, in a service; max_batch_tokens and
        # batch_wait (seconds): how the proposals of several sessions share passes (services/calls.py)
        self._calls = ModelCalls(
            runtime, max_sessions, self.wire_vocab, worker or Worker("drafter"), max_queue=max_queue,
            max_batch_tokens=max_batch_tokens, batch_wait=batch_wait,
        )  # fmt: skip
        self.contexts = self._calls.contexts
        self._own_bytes: list[bytes | None] | None = None
        self.continuations = Continuations(max_sessions)  # drafts begun after an answer (continuation.py)

    @property
    def queued(self) -> int:
        """Calls waiting for the model or running."""
        return self._calls.queued

    async def info(self) -> ModelInfo:
        return self._info

    async def release(self, session_id: str) -> bool:
        self.continuations.discard(session_id)
        return await self._calls.release(session_id)

    # -- the calls ------------------------------------------------------------------------

    async def propose(
        self, session_id: str, context: Context, k: int, params: SamplingParams, seed: int, vocab: str = "native"
    ) -> Draft:
        """k tokens in target ids; `vocab` (slem | tli) says how a drafter with another
        vocabulary translates; a drafter of the target's own vocabulary ignores it."""
        return await self.propose_and_continue(session_id, context, k, params, seed, 0, 0, vocab)

    async def propose_and_continue(
        self,
        session_id: str,
        context: Context,
        k: int,
        params: SamplingParams,
        seed: int,
        continue_k: int,
        continue_seed: int,
        vocab: str = "native",
    ) -> Draft:
        """`propose`; then, with continue_k > 0, this drafter goes on drafting continue_k tokens
        after the context and the draft, with continue_seed, for the call that will ask for
        them (drafter_svc/continuation.py; a drafter of another vocabulary does not)."""
        check_draft_length(k, self.max_draft, "k")
        continue_k = min(continue_k, self.max_draft)  # advisory: a continuation never fails a call
        if vocab not in VOCAB_MODES:
            raise BadRequest(f"unknown vocab mode {vocab!r}; known: {', '.join(VOCAB_MODES)}")
        if self.translation is not None and vocab == "native":
            self._refuse_foreign("propose target tokens directly (vocab mode native)")
        if self.translation is None:  # batched with other sessions' proposals (propose_many)
            d, full = await self._draft(session_id, context, k, params, seed)
            if continue_k:
                self._continue(session_id, full, d.tokens, continue_k, params, continue_seed)
            return d

        def work(full: list[int], generator: torch.Generator) -> Draft:
            translate = propose_slem if vocab == "slem" else propose_tli
            p = translate(self.runtime, self.translation, session_id, full, k, params, self.q_top, generator)
            self.contexts.commit(session_id, full)
            return Draft(p.tokens, p.q, PENDING)

        return await self._calls.run(session_id, context, seed, work)

    async def _draft(
        self, session_id: str, context: Context, k: int, params: SamplingParams, seed: int
    ) -> tuple[Draft, list[int]]:
        """The draft of a propose call and the context it was drafted after: from the
        session's continuation where it drafted for this call, drafted afresh otherwise."""
        c = self.continuations.take(session_id, context, params, seed)
        if c is not None:
            d = await self._from_continuation(session_id, c, k)
            if d is not None:
                self.continuations.count("used")
                return d, c.context
        return await self._fresh(session_id, context, seed, k, params)

    async def _fresh(
        self, session_id: str, context: Context, seed: int, k: int, params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> tuple[Draft, list[int]]:  # fmt: skip
        # A caller that cancels (a pipelined strategy's discarded speculative draft) frees the
        # worker after the drafter pass under way: the draft stops between tokens.
        cancelled = threading.Event()
        item = ProposeItem(k, params, lambda drafted: cancelled.is_set(), generator)
        try:
            d = await self._calls.run_batched(session_id, context, seed, item, k, self._propose_many)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        assert item.full is not None  # set by the batch that drafted it
        return d, item.full

    async def _from_continuation(self, session_id: str, c: Continuation, k: int) -> Draft | None:
        """k tokens of a continuation that serves the call (awaited if still drafting, and
        extended with its own generator if it was cut short); None where it failed."""
        c.cap = k
        try:
            d = await asyncio.shield(c.task)
        except asyncio.CancelledError:
            c.cancel()
            raise
        except Exception:  # noqa: BLE001 - a failed continuation costs only itself: the call drafts afresh
            return None
        if len(d.tokens) < k and c.cut:  # cut short: the tokens it lacks, drawn on with its generator
            assert c.item is not None and c.item.generator is not None
            claim = ContextDelta(session_id, len(c.context), fingerprint(c.context), d.tokens)
            rest, _ = await self._fresh(session_id, claim, c.seed, k - len(d.tokens), c.params, c.item.generator)
            self.continuations.count("extended")
            cost = total_cost([d.cost, rest.cost]) or d.cost
            return Draft((*d.tokens, *rest.tokens), (*d.q, *rest.q), cost, continued=True)
        return Draft(d.tokens[:k], d.q[:k], d.cost, continued=True)

    def _continue(
        self, session_id: str, full: list[int], tokens: Sequence[int], k: int, params: SamplingParams, seed: int
    ) -> None:
        """Starts the session's continuation after full + tokens (see continuation.py)."""
        room = self.runtime.info.max_context - len(full) - len(tokens) - 1
        if min(k, room) <= 0:
            return
        c = Continuation([*full, *tokens], seed, params, min(k, room), lambda: self._calls.waiting)
        c.item = ProposeItem(self.max_draft, params, c.stop)
        claim = ContextDelta(session_id, len(full), fingerprint(full), tuple(tokens))
        c.task = asyncio.ensure_future(
            self._calls.run_batched(session_id, claim, seed, c.item, c.cap, self._propose_many)
        )
        c.task.add_done_callback(_retrieved)
        self.continuations.add(session_id, c)

    def _propose_many(self, calls: list[Batched]) -> list[Draft]:
        """The batch of `propose`: the sessions' drafts grown in lockstep (draft.propose_many)."""
        items: list[ProposeItem] = [c.item for c in calls]
        for c, item in zip(calls, items):
            item.full, item.generator = c.full, item.generator or c.generator
        jobs = [DraftJob(c.session_id, c.full, i.k, i.params, i.generator, i.stop) for c, i in zip(calls, items)]
        proposals = propose_many(self.runtime, jobs, self.q_top, self.min_confidence)
        for c in calls:
            self.contexts.commit(c.session_id, c.full)
        return [Draft(p.tokens, p.q, PENDING) for p in proposals]

    async def propose_strings(
        self, session_id: str, context: Context, k: int, params: SamplingParams, seed: int
    ) -> StringsDraft:
        """Up to k drafted tokens as text, each with its distribution over strings of its length (slrs)."""
        check_draft_length(k, self.max_draft, "k")
        if self.runtime.tokenizer is None:
            raise Unsupported("this drafter was loaded without a tokenizer, so it cannot draft text")

        def work(full: list[int], generator: torch.Generator) -> StringsDraft:
            proposals = propose_strings(
                self.runtime, self.translation, self.own_bytes(), session_id, full, k, params, self.q_top, generator
            )
            self.contexts.commit(session_id, full)
            return StringsDraft(tuple(proposals), PENDING)

        return await self._calls.run(session_id, context, seed, work)

    async def review(
        self,
        session_id: str,
        context: Context,
        draft: Sequence[int],
        q: Sequence[SparseDist],
        params: SamplingParams,
        seed: int,
    ) -> Reviewed:
        """A middle level of a cascade reviews a smaller level's draft (drafter_svc/draft.review)."""
        self._refuse_foreign("review a draft")
        check_chain(draft, q, self.wire_vocab, self.max_draft)

        def work(full: list[int], generator: torch.Generator) -> Reviewed:
            r = review(self.runtime, session_id, full, list(draft), list(q), params, self.q_top, generator)
            self.contexts.commit(session_id, [*full, *r.verdict.tokens])
            return Reviewed(r.verdict.accepted, r.verdict.tokens, r.q, PENDING)

        return await self._calls.run(session_id, context, seed, work)

    async def propose_tree(
        self, session_id: str, context: Context, shape: TreeShape, params: SamplingParams, seed: int
    ) -> TreeDraft:
        """A draft tree of this shape (staged; drafter_svc/draft.propose_tree)."""
        self._refuse_foreign("grow a draft tree")
        problems = shape.problems(self.max_draft)
        if problems:
            raise BadRequest("; ".join(problems))

        def work(full: list[int], generator: torch.Generator) -> TreeDraft:
            state = self.contexts.state(session_id)
            lookahead = 0
            if self.second_stage:
                state.ngram = state.ngram or NgramIndex()
                state.guesses = state.guesses or GuessLedger()
                lookahead = self.second_stage if state.guesses.guess(self.pass_times) else 0
            p = propose_tree(self.runtime, session_id, full, shape, params, self.q_top, state.ngram, lookahead, generator)
            for nodes, seconds in p.timed:
                self.pass_times.observe(nodes, seconds)
            if lookahead:
                state.guesses.observe(p.guessed, p.saved)
            self.contexts.commit(session_id, full)
            return TreeDraft(p.tree, p.q, p.forwards, PENDING)

        return await self._calls.run(session_id, context, seed, work)

    # -- plumbing -------------------------------------------------------------------------

    def own_bytes(self) -> list[bytes | None]:
        """This drafter's tokens as bytes (built on first use: slrs only)."""
        if self._own_bytes is None:
            self._own_bytes = (
                self.translation.drafter_bytes
                if self.translation is not None
                else token_bytes(self.runtime.tokenizer, size=self.runtime.info.vocab_size)
            )
        return self._own_bytes

    def _refuse_foreign(self, what: str) -> None:
        if self.translation is not None:
            raise Unsupported(
                f"this drafter ({self._info.model}) has another vocabulary than the target's, so it cannot {what}; "
                "use the strategies slem, tli or slrs with it"
            )


def _retrieved(task: asyncio.Future) -> None:
    """A continuation's failure (a context miss, Busy) is retrieved here: it costs only itself."""
    if not task.cancelled():
        task.exception()
