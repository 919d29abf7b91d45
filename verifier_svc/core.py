"""The verifier's core: the target's runtime, the committed context of each session, and
every call a verifier answers, with typed arguments and results.

The same object serves the gRPC servicer (verifier_svc/server.py, which only converts
messages) and callers in this process (tests, `specd bench`'s in-process path), where it is
the Verifier the strategies call. Each call resolves its context once, checks its input
(raising services.errors types), runs on the core's one worker thread, and records the
context extended by the returned tokens: what the caller commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from services import slrs
from services.acceptance import accept
from services.calls import PENDING, ModelCalls
from services.context import ContextDelta, fingerprint, whole_claim
from services.errors import BadRequest, ContextMiss, Unsupported, check_chain, check_draft_length, check_token_ids
from services.roles import Verified
from services.runtime import ModelInfo, Runtime
from services.sampling import SamplingParams, SparseDist
from services.sessions import Context
from services.tree import Tree
from services.worker import Worker
from verifier_svc.verify import string_index, tree_verdict, verify_strings


class VerifierCore:
    def __init__(
        self,
        runtime: Runtime,
        *,
        max_draft: int = 64,
        max_sessions: int = 16,
        worker: Worker | None = None,
        max_queue: int = 0,
        max_batch_tokens: int = 256,
        batch_wait: float = 0.0,
        prefill_chunk: int = 0,
    ) -> None:
        self.runtime = runtime
        self.max_draft = max_draft  # longest draft, most tree nodes, and the slrs tree budget
        # worker: the thread the runtime was loaded on, in a service; max_queue: calls that may
        # wait for it before more are refused (0: no bound); max_batch_tokens, batch_wait
        # (seconds) and prefill_chunk: how verify calls of several sessions share passes
        # (services/calls.py)
        self._calls = ModelCalls(
            runtime, max_sessions, runtime.info.vocab_size, worker or Worker("verifier"), max_queue=max_queue,
            max_batch_tokens=max_batch_tokens, batch_wait=batch_wait, prefill_chunk=prefill_chunk,
        )  # fmt: skip
        self.contexts = self._calls.contexts
        self._strings: slrs.PrefixIndex | None = None  # the target vocabulary as bytes, built on first use

    @property
    def queued(self) -> int:
        """Calls waiting for the model or running."""
        return self._calls.queued

    async def info(self) -> ModelInfo:
        return self.runtime.info

    async def release(self, session_id: str) -> bool:
        return await self._calls.release(session_id)

    async def verify(
        self,
        session_id: str,
        context: Context,
        draft: Sequence[int],
        q: Sequence[SparseDist],
        params: SamplingParams,
        seed: int,
    ) -> Verified:
        """d_1..d_k checked in one target pass: n accepted tokens plus one (an empty draft: `ar`).

        The pass may be shared with other sessions' verify calls (services/calls.py); the
        acceptance rule then runs on this call's own rows with its own seeded generator."""
        vocab = self.runtime.info.vocab_size
        check_chain(draft, q, vocab, self.max_draft)
        draft, q = list(draft), list(q)

        def finish(full: list[int], logits: torch.Tensor, generator: torch.Generator) -> Verified:
            v = accept(draft, q, logits, params, generator)
            self.contexts.commit(session_id, [*full, *v.tokens])
            return Verified(v.accepted, v.tokens, PENDING)

        return await self._calls.run_pass(session_id, context, seed, draft, finish)

    async def verify_ahead(
        self,
        session_id: str,
        context: Sequence[int] | ContextDelta,
        draft: Sequence[int],
        q: Sequence[SparseDist],
        params: SamplingParams,
        seed: int,
        or_plain: bool = False,
    ) -> Verified | None:
        """`verify`, run only where this service's committed context for the session starts
        with all of `context` when the call's turn comes (services/context.whole_claim): a
        pipelined round's next verify, sent before the answer that commits its context; None,
        with nothing computed, where it does not. With `or_plain`, where it does not, a plain
        step after the context held then (with the same sampling and seed), which the answer
        names (Verified.plain_after): a pipelined round's next round, which is plain where
        the speculation its draft started from failed. `context` may be the claim
        itself (a ContextDelta, as a remote caller sends it)."""
        claim = context if isinstance(context, ContextDelta) else whole_claim(session_id, context)
        try:
            return await self.verify(session_id, claim, draft, q, params, seed)
        except ContextMiss:
            held = self.contexts.held(session_id) if or_plain else None
            if not held:
                return None
        try:
            v = await self.verify(session_id, whole_claim(session_id, held), (), (), params, seed)
        except ContextMiss:  # the session moved on meanwhile
            return None
        return replace(v, plain_after=(len(held), fingerprint(held)))

    async def verify_tree(
        self,
        session_id: str,
        context: Context,
        tree: Tree,
        q: Sequence[SparseDist | None],
        params: SamplingParams,
        seed: int,
        want_hidden: bool = False,
    ) -> Verified:
        """A draft tree checked in one pass with a tree attention mask (staged, redrafter),
        which may be shared with other sessions' verify calls (services/calls.py). A tree of
        no nodes is a plain step. want_hidden: the result carries the target's hidden state
        at the position whose logits gave the last returned token (the accepted path's last
        node, or the context's end), which a trained draft head drafts from."""
        if want_hidden and not self.runtime.hidden_states:
            raise Unsupported(
                f"this verifier's runtime ({self.runtime.info.runtime}) returns no hidden states; "
                "run it with SPECD_RUNTIME=torch for redrafter and parallel"
            )
        vocab = self.runtime.info.vocab_size
        check_token_ids(tree.tokens, vocab, "tree.tokens")
        check_draft_length(len(tree), self.max_draft, "a tree")
        if q and len(q) != len(tree) + 1:
            raise BadRequest(f"tree q has {len(q)} entries; send N+1 = {len(tree) + 1} (root first) or none")
        for i, q_i in enumerate(q):
            if q_i is not None:
                check_token_ids(q_i.ids.tolist(), vocab, f"tree q[{i}].ids")

        def finish(full: list[int], logits: torch.Tensor, generator: torch.Generator) -> Verified:
            v = tree_verdict(tree, list(q), logits, params, generator)
            hidden = None
            if want_hidden:  # row 0 follows the context, row 1 + i node i
                hidden = self.runtime.last_hidden(session_id)[v.path[-1] + 1 if v.path else 0].clone()
            self.runtime.keep_path(session_id, v.path)
            self.contexts.commit(session_id, [*full, *v.tokens])
            return Verified(v.accepted, v.tokens, PENDING, hidden=hidden)

        return await self._calls.run_pass(session_id, context, seed, tree, finish)

    async def verify_strings(
        self,
        session_id: str,
        context: Context,
        proposals: Sequence[slrs.StringProposal],
        params: SamplingParams,
        seed: int,
    ) -> Verified:
        """Drafted text checked by string-level rejection sampling (slrs)."""
        check_draft_length(len(proposals), self.max_draft, "a draft of strings")
        if self.runtime.tokenizer is None:
            raise Unsupported("this verifier was loaded without a tokenizer, so it cannot check drafted text")

        def work(full: list[int], generator: torch.Generator) -> Verified:
            if self._strings is None:
                self._strings = string_index(self.runtime.tokenizer, self.runtime.info.vocab_size)
            r = verify_strings(
                self.runtime, self._strings, session_id, full, list(proposals), params, generator, self.max_draft
            )
            self.contexts.commit(session_id, [*full, *r.verdict.tokens])
            return Verified(r.verdict.accepted, r.verdict.tokens, PENDING, r.verified, r.tree_nodes)

        return await self._calls.run(session_id, context, seed, work)
