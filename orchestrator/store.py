"""Sessions in Redis: the truth about every conversation.

Layout, per session id S (every key expires after the session's idle TTL):

    specd:session:S              hash: mode, messages, sampling, seed, step, strategy, k, totals,
                                 drafting, turn, owner, lease, created, updated
    specd:session:S:tokens       list: the committed token ids, prompt included
    specd:session:S:undo         the hash as it was before the open turn began (absent for a
    specd:session:S:undo:tokens  new session), and the list

A round appends its tokens with RPUSH and updates a few hash fields, so the bytes a round
sends to Redis do not grow with the length of the conversation.

Turns are atomic. A turn begins by copying the session to the undo keys; its rounds commit
only while this orchestrator still owns the turn (`owner`, checked in the same script that
commits) and renew its lease; it finishes by dropping the undo keys. A turn that broke off
(an error, a cancelled stream, a dead orchestrator) stays as it was for a caller to resume by
its request id; a caller that starts another turn instead first rolls it back to the undo
copy, once its lease has run out, so a failed turn leaves the session exactly as it was.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from orchestrator.adaptive import Acceptance
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


class TurnInProgress(RuntimeError):
    """ABORTED: another turn of the session is running (its lease has not run out)."""


class TurnLost(RuntimeError):
    """This orchestrator no longer owns the turn: a resumed call took it over."""


@dataclass
class Turn:
    """The session's latest turn: which request it answers and where its tokens begin."""

    request_id: str
    fingerprint: str  # of the request's fields: a request id names one request
    prompt_end: int  # tokens[prompt_end:] are what the turn generated
    done: bool = False
    stats: dict = field(default_factory=dict)  # the turn's statistics so far (generate.Stats)


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
    turn: Turn | None = None
    owner: str = ""  # the orchestrator advancing the open turn ("" when none is)
    lease: float = 0.0  # unix time until which the owner holds the open turn
    language: str = ""  # of its first prompt, when drafter pools are by language ("" = unknown)
    client: str = ""  # the id of the API key that created it (services/auth.py; "" = an open API)
    # Adaptive draft length: the session's measured acceptance by position, and its rounds in
    # a row that drafted nothing (orchestrator/adaptive.py).
    acceptance: Acceptance = field(default_factory=Acceptance)
    ar_streak: int = 0

    @property
    def open_turn(self) -> Turn | None:
        return self.turn if self.turn is not None and not self.turn.done else None


# Commits a round only if this orchestrator still owns the turn: KEYS meta, tokens;
# ARGV owner, ttl, then field/value pairs for the hash, then "--", then the tokens.
COMMIT = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local i = 3
while ARGV[i] ~= '--' do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if #ARGV > i then redis.call('RPUSH', KEYS[2], unpack(ARGV, i + 1)) end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[2]) end
return 1
"""

# Puts the session back as it was before its open turn: KEYS meta, tokens, undo, undo tokens.
ROLLBACK = """
redis.call('DEL', KEYS[1], KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('RENAME', KEYS[3], KEYS[1])
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('RENAME', KEYS[4], KEYS[2]) end
  return 1
end
return 0
"""


def _meta(session: Session) -> dict[str, str | float | int]:
    return {
        "mode": session.mode,
        "messages": json.dumps([asdict(m) for m in session.messages]),
        "sampling": json.dumps(asdict(session.sampling)),
        "seed": session.seed,
        "step": session.step,
        "strategy": session.strategy,
        "k": session.k,
        "totals": json.dumps(asdict(session.totals)),
        "drafting": _drafting(session),
        "turn": json.dumps(asdict(session.turn)) if session.turn else "",
        "owner": session.owner,
        "lease": session.lease,
        "language": session.language,
        "client": session.client,
        "created": session.created,
        "updated": time.time(),
    }


def _drafting(session: Session) -> str:
    return json.dumps({"acceptance": session.acceptance.to_json(), "ar_streak": session.ar_streak})


class SessionStore:
    def __init__(self, client: aioredis.Redis, ttl_seconds: int, lease_seconds: float = 30.0) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self.lease_seconds = lease_seconds
        self._commit = client.register_script(COMMIT)
        self._rollback = client.register_script(ROLLBACK)

    @staticmethod
    def _keys(session_id: str) -> tuple[str, str, str, str]:
        meta = PREFIX + session_id
        return meta, meta + ":tokens", meta + ":undo", meta + ":undo:tokens"

    async def load(self, session_id: str) -> Session | None:
        meta_key, tokens_key, _, _ = self._keys(session_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.lrange(tokens_key, 0, -1)
            meta, tokens = await pipe.execute()
        if not meta:
            return None
        meta = {k.decode(): v.decode() for k, v in meta.items()}
        drafting = json.loads(meta.get("drafting") or "{}")
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
            turn=Turn(**json.loads(meta["turn"])) if meta.get("turn") else None,
            owner=meta.get("owner", ""),
            lease=float(meta.get("lease", 0.0)),
            language=meta.get("language", ""),
            client=meta.get("client", ""),
            acceptance=Acceptance.from_json(drafting.get("acceptance")),
            ar_streak=int(drafting.get("ar_streak", 0)),
        )

    async def client_of(self, session_id: str) -> str | None:
        """The id of the API key that created the session (services/auth.py; "" = an open
        API), None when there is no such session: one field read, not the session."""
        mode, client = await self.client.hmget(self._keys(session_id)[0], "mode", "client")
        return None if mode is None else (client or b"").decode()

    async def begin(self, session: Session, owner: str) -> None:
        """Starts the session's turn (session.turn) owned by `owner`: keeps the session as it
        was in the undo keys, then writes it whole (the context may have been re-rendered)."""
        meta_key, tokens_key, undo_key, undo_tokens_key = self._keys(session.id)
        session.owner, session.lease = owner, time.time() + self.lease_seconds
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(undo_key, undo_tokens_key)
            pipe.copy(meta_key, undo_key)
            pipe.copy(tokens_key, undo_tokens_key)
            pipe.hset(meta_key, mapping=_meta(session))
            pipe.delete(tokens_key)
            if session.tokens:
                pipe.rpush(tokens_key, *session.tokens)
            for key in self._keys(session.id):
                pipe.expire(key, self.ttl_seconds)
            await pipe.execute()

    async def commit(self, session: Session, new_tokens: list[int]) -> None:
        """Appends one round's tokens with the session's step, totals and turn, and renews
        the lease; raises TurnLost if another orchestrator has taken the turn over."""
        session.lease = time.time() + self.lease_seconds
        fields = {"step": session.step, "totals": json.dumps(asdict(session.totals)), "lease": session.lease,
                  "drafting": _drafting(session), "turn": json.dumps(asdict(session.turn)),
                  "updated": time.time()}  # fmt: skip
        await self._run_owned(session, fields, new_tokens)

    async def finish(self, session: Session) -> None:
        """Ends the turn: done, its messages saved, no undo kept, no owner."""
        session.turn.done = True
        fields = {"turn": json.dumps(asdict(session.turn)), "messages": json.dumps([asdict(m) for m in session.messages]),
                  "owner": "", "lease": 0.0, "updated": time.time()}  # fmt: skip
        await self._run_owned(session, fields, [])
        session.owner = ""
        await self.client.delete(*self._keys(session.id)[2:])

    async def release(self, session: Session) -> None:
        """Gives up a broken-off turn: it can be resumed, or rolled back by the next turn at once."""
        try:
            await self._run_owned(session, {"lease": 0.0}, [])
        except TurnLost:
            pass

    async def take_over(self, session: Session, owner: str) -> None:
        """Makes `owner` the owner of the session's open turn (a resumed call)."""
        session.owner, session.lease = owner, time.time() + self.lease_seconds
        await self.client.hset(self._keys(session.id)[0], mapping={"owner": owner, "lease": session.lease})

    async def rollback(self, session_id: str) -> None:
        """Puts the session back as it was before its open turn (deletes a new one)."""
        await self._rollback(keys=list(self._keys(session_id)))

    async def _run_owned(self, session: Session, fields: dict, tokens: list[int]) -> None:
        meta_key, tokens_key, _, _ = self._keys(session.id)
        args = [session.owner, self.ttl_seconds, *(x for kv in fields.items() for x in kv), "--", *tokens]
        if not await self._commit(keys=[meta_key, tokens_key], args=args):
            raise TurnLost(f"session {session.id}: another orchestrator took over the turn")

    async def delete(self, session_id: str) -> bool:
        return bool(await self.client.delete(*self._keys(session_id)))
