"""Sessions in Redis: the truth about every conversation.

Layout, per session id S (both keys expire after the session's idle TTL):

    specd:session:S         hash: mode, messages, sampling, seed, step, strategy, k, totals,
                            created, updated
    specd:session:S:tokens  list: the committed token ids, prompt included

A round appends its tokens with RPUSH and updates a few hash fields, so the bytes a round
sends to Redis do not grow with the length of the conversation.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from services.sampling import SamplingParams

PREFIX = "specd:session:"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass
class Totals:
    """Running statistics of a session, over all its turns."""

    new_tokens: int = 0
    target_forwards: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class Session:
    id: str
    mode: str  # "raw" (prompts appended as text) or "chat" (messages through the chat template)
    tokens: list[int]
    messages: list[ChatMessage]
    sampling: SamplingParams
    seed: int
    step: int
    strategy: str
    k: int
    totals: Totals = field(default_factory=Totals)
    created: float = field(default_factory=time.time)


class SessionStore:
    def __init__(self, client: aioredis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds

    @staticmethod
    def _keys(session_id: str) -> tuple[str, str]:
        return PREFIX + session_id, PREFIX + session_id + ":tokens"

    async def load(self, session_id: str) -> Session | None:
        meta_key, tokens_key = self._keys(session_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.lrange(tokens_key, 0, -1)
            meta, tokens = await pipe.execute()
        if not meta:
            return None
        meta = {k.decode(): v.decode() for k, v in meta.items()}
        return Session(
            id=session_id,
            mode=meta["mode"],
            tokens=[int(t) for t in tokens],
            messages=[ChatMessage(**m) for m in json.loads(meta["messages"])],
            sampling=SamplingParams(**json.loads(meta["sampling"])),
            seed=int(meta["seed"]),
            step=int(meta["step"]),
            strategy=meta["strategy"],
            k=int(meta["k"]),
            totals=Totals(**json.loads(meta["totals"])),
            created=float(meta["created"]),
        )

    async def save(self, session: Session) -> None:
        """Writes the whole session (start of a turn: the context may have been re-rendered)."""
        meta_key, tokens_key = self._keys(session.id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                meta_key,
                mapping={
                    "mode": session.mode,
                    "messages": json.dumps([asdict(m) for m in session.messages]),
                    "sampling": json.dumps(asdict(session.sampling)),
                    "seed": session.seed,
                    "step": session.step,
                    "strategy": session.strategy,
                    "k": session.k,
                    "totals": json.dumps(asdict(session.totals)),
                    "created": session.created,
                    "updated": time.time(),
                },
            )
            pipe.delete(tokens_key)
            if session.tokens:
                pipe.rpush(tokens_key, *session.tokens)
            pipe.expire(meta_key, self.ttl_seconds)
            pipe.expire(tokens_key, self.ttl_seconds)
            await pipe.execute()

    async def commit(self, session: Session, new_tokens: list[int]) -> None:
        """Appends one round's tokens and its step and totals."""
        meta_key, tokens_key = self._keys(session.id)
        async with self.client.pipeline(transaction=True) as pipe:
            if new_tokens:
                pipe.rpush(tokens_key, *new_tokens)
            pipe.hset(
                meta_key,
                mapping={"step": session.step, "totals": json.dumps(asdict(session.totals)), "updated": time.time()},
            )
            pipe.expire(meta_key, self.ttl_seconds)
            pipe.expire(tokens_key, self.ttl_seconds)
            await pipe.execute()

    async def save_messages(self, session: Session) -> None:
        meta_key, _ = self._keys(session.id)
        await self.client.hset(meta_key, "messages", json.dumps([asdict(m) for m in session.messages]))

    async def delete(self, session_id: str) -> bool:
        return bool(await self.client.delete(*self._keys(session_id)))
