"""The max-gram drafter (services/ngram.py) as a Drafter: no weights, one n-gram index of
each session's context, least recently used evicted.

The same object is the cascade's in-process bottom level in the orchestrator and the model
of a drafter service started with SPECD_MODEL=maxgram. Its proposals are deterministic, so
their q is a point mass (empty); it cannot review or grow trees, having no distribution to
judge or branch by.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.errors import Unsupported, check_draft_length
from services.lru import Lru
from services.ngram import NgramIndex
from services.roles import Draft, Stopwatch
from services.runtime import ModelInfo
from services.sampling import SamplingParams
from services.sessions import Context, SessionContexts

NAME = "maxgram"
# vocab 0 and no tokenizer fingerprint: a statistical drafter takes the ids of any vocabulary.
INFO = ModelInfo(NAME, 0, 0, (), "", "cpu", "")
ANY_ID = 2**31 - 1  # ids are checked against this instead of a vocabulary


class MaxGramDrafter:
    """Proposes up to k tokens that followed the context's longest recurring suffix;
    matched_only: none where no suffix of length >= 2 recurs (no bigram-table guesses)."""

    queued = 0  # calls waiting (services/hosting.Core): it answers in the event loop, nothing waits

    def __init__(
        self, max_n: int = 4, max_sessions: int = 1024, max_draft: int = 1 << 30, matched_only: bool = False
    ) -> None:
        self.max_n = max_n
        self.max_draft = max_draft
        self.matched_only = matched_only
        self.contexts = SessionContexts(max_sessions)
        self._indexes: Lru[str, NgramIndex] = Lru(max_sessions, what="max-gram index of session")

    async def propose(
        self, session_id: str, context: Context, k: int, params: SamplingParams, seed: int, vocab: str = "native"
    ) -> Draft:
        watch = Stopwatch()
        check_draft_length(k, self.max_draft, "k")
        full = self.contexts.resolve(session_id, context, ANY_ID)
        self.contexts.commit(session_id, full)
        index = self._indexes.get_or_create(session_id, lambda: NgramIndex(self.max_n))
        index.sync(full)
        return Draft(tuple(index.propose(k, self.matched_only)), (), watch.local_cost())

    async def review(self, session_id: str, context: Context, draft: Sequence[int], *args) -> Draft:
        raise Unsupported("the max-gram drafter has no distribution to review a draft by; it can only be a cascade's bottom level")

    async def propose_tree(self, session_id: str, context: Context, *args) -> Draft:
        raise Unsupported("the max-gram drafter cannot grow a draft tree; staged needs a neural drafter")

    async def propose_strings(self, session_id: str, context: Context, *args) -> Draft:
        raise Unsupported("the max-gram drafter drafts no text; slrs needs a neural drafter")

    async def info(self) -> ModelInfo:
        return INFO

    async def release(self, session_id: str) -> bool:
        had = self._indexes.pop(session_id) is not None
        return self.contexts.release(session_id) or had
