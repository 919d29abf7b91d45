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

from drafter_svc.draft import DraftJob, propose_many, propose_tree, review
from drafter_svc.foreign import Translation, propose_slem, propose_strings, propose_tli
from services.calls import PENDING, Batched, ModelCalls
from services.errors import BadRequest, Unsupported, check_chain, check_draft_length
from services.ngram import NgramIndex
from services.roles import Draft, Reviewed, StringsDraft, TreeDraft
from services.runtime import ModelInfo, Runtime
from services.second_stage import GuessLedger, PassTimes
from services.sampling import SamplingParams, SparseDist
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

    @property
    def queued(self) -> int:
        """Calls waiting for the model or running."""
        return self._calls.queued

    async def info(self) -> ModelInfo:
        return self._info

    async def release(self, session_id: str) -> bool:
        return await self._calls.release(session_id)

    # -- the calls ------------------------------------------------------------------------

    async def propose(
        self, session_id: str, context: Context, k: int, params: SamplingParams, seed: int, vocab: str = "native"
    ) -> Draft:
        """k tokens in target ids; `vocab` (slem | tli) says how a drafter with another
        vocabulary translates; a drafter of the target's own vocabulary ignores it."""
        check_draft_length(k, self.max_draft, "k")
        if vocab not in VOCAB_MODES:
            raise BadRequest(f"unknown vocab mode {vocab!r}; known: {', '.join(VOCAB_MODES)}")
        if self.translation is not None and vocab == "native":
            self._refuse_foreign("propose target tokens directly (vocab mode native)")

        # A caller that cancels (a pipelined strategy's discarded speculative draft) frees the
        # worker after the drafter pass under way: the draft stops between tokens.
        cancelled = threading.Event()
        try:
            if self.translation is None:  # batched with other sessions' proposals (propose_many)
                return await self._calls.run_batched(
                    session_id, context, seed, (k, params, cancelled.is_set), k, self._propose_many
                )

            def work(full: list[int], generator: torch.Generator) -> Draft:
                translate = propose_slem if vocab == "slem" else propose_tli
                p = translate(self.runtime, self.translation, session_id, full, k, params, self.q_top, generator)
                self.contexts.commit(session_id, full)
                return Draft(p.tokens, p.q, PENDING)

            return await self._calls.run(session_id, context, seed, work)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def _propose_many(self, calls: list[Batched]) -> list[Draft]:
        """The batch of `propose`: the sessions' drafts grown in lockstep (draft.propose_many)."""
        jobs = [DraftJob(c.session_id, c.full, c.item[0], c.item[1], c.generator, c.item[2]) for c in calls]
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
