"""One generation turn: load the session, run a strategy round by round, commit, stream.

This is the orchestrator's domain logic; the gRPC servicer only converts messages and
maps the exceptions below to status codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from orchestrator.adaptive import FIXED_K, DraftLength, TreeWidth
from orchestrator.backends import Translated
from orchestrator.languages import LanguagePools, detect_language
from orchestrator.pool import NoReplica
from orchestrator.store import ChatMessage, Session, SessionStore, Totals, Turn, TurnInProgress
from orchestrator.strategies import (
    DEFAULT_TREE,
    HEAD_STRATEGIES,
    STRATEGIES,
    Backends,
    Carry,
    Lookahead,
    NotServable,
    RoundInput,
    RoundResult,
    ar_round,
    default_k_matrix,
    k_matrix_problems,
    sd_round,
    sized,
)
from orchestrator.text import TextStream, chat_ids
from services.roles import CallCost, Stopwatch
from services.runtime import HEAD_RUNTIME, ModelInfo
from services.sampling import SamplingParams, round_seed
from services.tree import TreeShape

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# A session id is 128 random bits in hex, as the orchestrator makes them: checked before it
# names a Redis key, so no id reaches another key.
SESSION_ID = re.compile(r"[0-9a-f]{32}")
MAX_REQUEST_ID = 128  # characters of a caller's request id
# The largest prompt (all chat messages together) accepted before tokenizing: beyond any
# context a packaged model has, and small enough that tokenizing it takes well under a second.
MAX_PROMPT_BYTES = 1 << 20
# Of a translating drafter's context, the share a session may fill counted in target tokens:
# the same text is more tokens in a smaller vocabulary (SmolLM2's 49k against Qwen's 152k).
FOREIGN_CONTEXT_MARGIN = 0.6
DRAFT_LOOKAHEAD = 8  # cells a drafter may fill beyond a round's draft (staged's second stage, the bonus)
# Drafter on cores of its own: plain rounds have it catch up once it is this many tokens
# behind (a call every plain round would double the calls of sessions that decode plainly;
# a few tokens fed with a draft cost little more than one)
KEEP_UP_TOKENS = 4


def new_session_id() -> str:
    return secrets.token_hex(16)


def check_session_id(session_id: str) -> None:
    if not SESSION_ID.fullmatch(session_id):
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "..."
        raise InvalidInput(f"session_id must be 32 lowercase hex characters (as TurnStarted gave it), got {shown!r}")


class InvalidInput(ValueError):
    """The request must be fixed by the caller (INVALID_ARGUMENT)."""


class SessionNotFound(KeyError):
    """NOT_FOUND: the session id is unknown or expired."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | None = None  # raw text; or
    messages: tuple[ChatMessage, ...] | None = None  # chat messages
    session_id: str = ""  # continue this session; "" starts one
    max_new_tokens: int | None = None
    temperature: float | None = None  # None: the session's value, else greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    strategy: str = ""
    k: int = 0  # 0 = the server's default (Limits.default_k; 0 there = adaptive)
    k_matrix: tuple[tuple[int, ...], ...] = ()  # `cascade`; empty = default
    tree: TreeShape | None = None  # `staged`; None = default
    head_only: bool = False  # redrafter, parallel: the head's beams without the context's continuation
    request_id: str = ""  # names the turn, so that a call after a broken stream resumes it
    resume_from: int = 0  # the turn's tokens the caller already holds
    client: str = ""  # the caller's API key id (services/auth.py): a session is its creator's alone


def request_fingerprint(req: GenerationRequest) -> str:
    """What a request asks for, whatever session, request id and resume point it names."""
    what = replace(req, session_id="", request_id="", resume_from=0)
    return hashlib.blake2b(repr(what).encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class TurnStarted:
    """The first event of a turn: where it lives, for a caller to resume it."""

    session_id: str
    request_id: str
    resumed_from: int


class TurnOutput:
    """The text stream of a turn that skips what the caller already holds (`skip` tokens):
    those are decoded (the text after them depends on them) but not sent again."""

    def __init__(self, stream: TextStream, skip: int) -> None:
        self.stream = stream
        self.skip = skip
        self.seen = 0

    def push(self, tokens: list[int]) -> tuple[str, tuple[int, ...]]:
        """The text and tokens to send for the next committed tokens."""
        held = max(0, min(len(tokens), self.skip - self.seen))
        self.seen += len(tokens)
        if held:
            self.stream.push(tokens[:held])
        shown = tuple(tokens[held:])
        return (self.stream.push(shown) if shown else ""), shown

    def finish(self) -> str:
        """The held-back tail, unless the caller holds every token (it got the tail with them)."""
        tail = self.stream.finish()
        return tail if self.seen > self.skip else ""


@dataclass(frozen=True)
class Limits:
    default_strategy: str
    default_k: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    default_k_matrix: tuple[tuple[int, ...], ...] = ()  # `cascade`; empty = strategies.default_k_matrix
    default_tree: TreeShape | None = None  # `staged`; None = strategies.DEFAULT_TREE
    # drafters and verifiers on cores of their own (SPECD_OWN_CORES): the drafter prefills a
    # turn beside its first round, and rounds draft under load (orchestrator/adaptive.py)
    own_cores: bool = False
    # pipelined strategies send the verify of their speculative next draft ahead (SPECD_VERIFY_AHEAD)
    verify_ahead: bool = True


@dataclass(frozen=True)
class TextChunk:
    text: str
    token_ids: tuple[int, ...]


@dataclass
class Stats:
    """Statistics of one turn (definitions in docs/architecture.md, Statistics)."""

    session_id: str
    strategy: str
    finish_reason: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    network_seconds: float = 0.0
    round_trips: int = 0  # model-service calls the rounds sent and then waited for (services/roles.CallCost)
    redis_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    failovers: int = 0  # calls redone on another replica
    fallback_rounds: int = 0  # rounds drafted by max-gram: no drafter was reachable, or the context outgrew its
    replicas: list[str] = field(default_factory=list)  # the model service replicas that served the turn
    language: str = ""  # the session's language, when drafter pools are by language
    drafter_pool: str = ""  # the language of the drafter pool it drafted on ("" = the default pool)
    adaptive: bool = False  # each round's draft length chosen by measured acceptance and cost
    ar_rounds: int = 0  # rounds that drafted nothing
    draft_asked: int = 0  # draft tokens asked for, over all rounds
    speculative_drafts: int = 0  # pipelined: next-round drafts begun during a verify
    speculative_hits: int = 0  # of those, used as the next round's draft
    speculative_ready: int = 0  # of those, finished before the verify answered
    speculative_verified: int = 0  # of those, with their verify sent ahead
    speculative_plain: int = 0  # pipelined: rounds whose speculation failed, answered by the plain step sent ahead
    speculative_continued: int = 0  # pipelined: drafts used that the drafter drafted going on after its last answer
    overlapped_round_trips: int = 0  # pipelined: verifies' round trips that drafting overlapped (not in round_trips)
    chain_rounds: int = 0  # staged, adaptive: rounds that drafted a chain of first candidates, not the tree

    @property
    def mean_draft_length(self) -> float:
        return self.draft_asked / self.target_forwards if self.target_forwards else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """τ: tokens per target forward, 1 + accepted / forwards."""
        return 1.0 + self.accepted / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds else 0.0

    def add_round(self, r: RoundResult, asked: int) -> None:
        self.target_forwards += 1
        self.draft_asked += asked
        self.ar_rounds += r.drafted == 0
        self.drafted += r.drafted
        self.accepted += r.accepted
        for i in range(r.drafted):
            if i == len(self.drafted_by_position):
                self.drafted_by_position.append(0)
                self.accepted_by_position.append(0)
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += i < r.accepted
        costs: list[CallCost] = [c for c in (r.draft_cost, r.verify_cost) if c is not None]
        self.draft_seconds += r.draft_cost.compute_seconds if r.draft_cost else 0.0
        self.verify_seconds += r.verify_cost.compute_seconds
        self.network_seconds += sum(c.network_seconds for c in costs)
        self.round_trips += sum(c.round_trips for c in costs)
        self.bytes_sent += sum(c.bytes_sent for c in costs)
        self.bytes_received += sum(c.bytes_received for c in costs)
        self.failovers += sum(c.failovers for c in costs)
        self.replicas.extend(a for c in costs for a in c.replicas if a not in self.replicas)


class Engine:
    """Runs generation turns for the Generator service (or in-process, for tests and bench)."""

    def __init__(self, *, tokenizer, store: SessionStore, backends: Backends, limits: Limits) -> None:
        self.tokenizer = tokenizer
        self.store = store
        self.backends = backends
        self.limits = limits
        self._target: ModelInfo | None = None
        self._infos: dict[int, ModelInfo] = {}  # id(drafter) -> its Info, asked once like the target's
        self.owner = uuid.uuid4().hex  # this engine, as the owner of the turns it runs
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # one thread: the tokenizer is shared
        self.in_flight = 0  # turns streaming now (a stopping server waits for them)
        # per strategy (STRATEGY:head for a head alone): what adaptive rounds measured
        self.draft_lengths: dict[str, DraftLength | TreeWidth] = {}
        # Called after each round is committed: (strategy, result, round seconds, commit seconds)
        self.on_round: Callable[[str, RoundResult, float, float], None] | None = None

    # -- checks -------------------------------------------------------------------------

    async def target_info(self) -> ModelInfo:
        if self._target is None:
            self._target = await self.backends.verifier.info()
        return self._target

    async def _check_drafter(self, target: ModelInfo, strategy: str, same_vocab: bool) -> None:
        """The drafter exists and speaks the target's ids: it shares the target's vocabulary
        (statistical drafters, with no fingerprint, work on any vocabulary's ids), or, for
        slem/tli/slrs, translates to it. Cascade levels are checked for `cascade`."""
        drafter = self.backends.drafter
        if drafter is None:
            raise NotServable(f"strategy {strategy!r} needs a drafter, and none is configured (SPECD_DRAFTER)")
        info = await self._info(drafter)
        own = _same_vocab(info, target)
        if same_vocab and strategy != "cascade" and not own:
            raise NotServable(
                f"drafter {info.model} has another vocabulary than the target {target.model}, and strategy "
                f"{strategy!r} needs the same tokenizer; use slem, tli or slrs with this drafter"
            )
        if not same_vocab and not own and info.wire_fingerprint != target.tokenizer_fingerprint:
            raise NotServable(
                f"drafter {info.model} has another vocabulary than the target {target.model} and does not translate "
                f"to it: start it with SPECD_TARGET_TOKENIZER set to the target's model"
            )
        if strategy == "cascade":
            await self._check_cascade(target)
        if info.runtime == HEAD_RUNTIME:
            raise NotServable(
                f"drafter {info.model} is a trained draft head: it drafts for the strategy {info.dtype} only, "
                "given as SPECD_HEAD"
            )

    def _language_pools(self) -> list[LanguagePools]:
        """The drafter's and the head's pools, where they are pooled by language."""
        return [b for b in (self.backends.drafter, self.backends.head) if isinstance(b, LanguagePools)]

    async def _check_head(self, target: ModelInfo, strategy: str) -> None:
        """The strategy's head drafter exists, hosts a head of the strategy's kind (redrafter,
        parallel; a head reports it as its dtype), and was trained for this target."""
        if self.backends.head is None:
            raise NotServable(f"strategy {strategy!r} needs a head drafter (SPECD_HEAD), and none is configured")
        info = await self._info(self.backends.head)
        if info.runtime != HEAD_RUNTIME:
            raise NotServable(
                f"SPECD_HEAD's drafter serves {info.model}, not a trained head (`specd train {strategy}`)"
            )
        if info.dtype != strategy:
            raise NotServable(
                f"strategy {strategy!r} needs a {strategy} head; SPECD_HEAD serves the {info.dtype} head {info.model} "
                f"(train one with `specd train {strategy}`, or ask for the strategy {info.dtype})"
            )
        if info.weights != target.weights:
            raise NotServable(
                f"the head {info.model} was trained for a target with weights {info.weights}; the verifier "
                f"serves {target.model} with {target.weights}: train a head for it with `specd train {strategy}`"
            )

    async def _check_cascade(self, target: ModelInfo) -> None:
        """Every level shares the target's vocabulary, or translates to it (a tli/slem level,
        which proposes but cannot review: its row of the k-matrix must be zeros)."""
        for level in self.backends.cascade_levels():
            info = await self._info(level)
            own = _same_vocab(info, target)
            translated = isinstance(level, Translated) and info.wire_fingerprint == target.tokenizer_fingerprint
            if not own and not translated:
                raise NotServable(
                    f"cascade level {info.model} has another vocabulary than the target {target.model}; give it as "
                    f"tli:HOST:PORT or slem:HOST:PORT in SPECD_CASCADE, with SPECD_TARGET_TOKENIZER set on that drafter"
                )

    async def _drafting_context(self, strategy: str, target: ModelInfo) -> int:
        """The longest context every drafter of the strategy takes, in target tokens (0: no
        limit). A drafter of another vocabulary counts its own tokens, which may be more for
        the same text: its limit is taken with a margin (FOREIGN_CONTEXT_MARGIN)."""
        drafters = self.backends.cascade_levels() if strategy == "cascade" else (self.backends.drafter,)
        limits = []
        for drafter in drafters:
            info = await self._info(drafter)
            if info.max_context:
                own = _same_vocab(info, target)
                limits.append(info.max_context if own else int(info.max_context * FOREIGN_CONTEXT_MARGIN))
        return min(limits, default=0)

    async def _info(self, drafter) -> ModelInfo:
        if id(drafter) not in self._infos:
            self._infos[id(drafter)] = await drafter.info()
        return self._infos[id(drafter)]

    def k_matrix(self, req: GenerationRequest) -> tuple[tuple[int, ...], ...]:
        """The request's k-matrix, else the server's, else the default for the cascade's depth."""
        levels = self.backends.cascade_levels()
        k_matrix = req.k_matrix or self.limits.default_k_matrix or default_k_matrix(len(levels))
        problems = k_matrix_problems(k_matrix, len(levels))
        if not problems:
            problems = [
                f"row {j} of the k-matrix must be zeros: level {j} translates another vocabulary (tli/slem) and "
                "cannot review a smaller level's draft"
                for j, level in enumerate(levels, start=1)
                if isinstance(level, Translated) and j < len(levels) and any(k_matrix[j])
            ]
        if problems:
            raise InvalidInput("k_matrix: " + "; ".join(problems))
        return k_matrix

    def _validate(self, req: GenerationRequest) -> tuple[str, int, int]:
        strategy = req.strategy or self.limits.default_strategy
        if strategy not in STRATEGIES:
            raise InvalidInput(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        max_new = self.limits.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if not 0 < max_new <= self.limits.max_new_tokens_limit:
            raise InvalidInput(f"max_new_tokens must be in [1, {self.limits.max_new_tokens_limit}], got {max_new}")
        self.k_matrix(req)
        if req.tree is not None and req.tree.problems():
            raise InvalidInput("tree: " + "; ".join(req.tree.problems()))
        if req.head_only and strategy not in HEAD_STRATEGIES:
            heads = " and ".join(HEAD_STRATEGIES)
            raise InvalidInput(f"head_only applies to {heads} (a trained head's strategies), not {strategy!r}")
        k = req.k or self.limits.default_k
        if req.session_id:
            check_session_id(req.session_id)
        if len(req.request_id) > MAX_REQUEST_ID or not req.request_id.isprintable():
            raise InvalidInput(f"request_id must be at most {MAX_REQUEST_ID} printable characters")
        if any(not s for s in req.stop):
            raise InvalidInput("stop strings must not be empty")
        size = len((req.prompt or "").encode()) + sum(len(m.content.encode()) for m in req.messages or ())
        if size > MAX_PROMPT_BYTES:
            raise InvalidInput(f"the prompt is {size} bytes; at most {MAX_PROMPT_BYTES} are accepted")
        if req.prompt is None and not req.messages:
            raise InvalidInput("the request has no input: give a prompt or chat messages")
        if req.prompt == "":
            raise InvalidInput("the prompt is empty")
        for i, m in enumerate(req.messages or ()):
            if m.role not in ROLES:
                raise InvalidInput(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}")
        if req.messages and not any(m.content for m in req.messages):
            raise InvalidInput("every chat message is empty")
        problems = self._requested_sampling(req).problems()
        if problems:
            raise InvalidInput("; ".join(problems))
        return strategy, max_new, k

    @staticmethod
    def _requested_sampling(req: GenerationRequest, base: SamplingParams | None = None) -> SamplingParams:
        """The request's sampling values, the base's (default: greedy) where the request gives none."""
        base = base or SamplingParams()
        return SamplingParams(
            temperature=base.temperature if req.temperature is None else req.temperature,
            top_k=base.top_k if req.top_k is None else req.top_k,
            top_p=base.top_p if req.top_p is None else req.top_p,
        )

    # -- the turn -----------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TurnStarted | TextChunk | Stats]:
        """One turn: TurnStarted first, then the text as it is committed, Stats last. A
        request naming the session and request id of a turn that broke off continues it."""
        started = time.perf_counter()
        strategy, max_new, k = self._validate(req)
        k_matrix = self.k_matrix(req)
        target = await self.target_info()
        spec = STRATEGIES[strategy]
        drafter_down = False
        drafting_context = 0  # the longest context the turn's drafters take (0: no limit)
        try:
            if spec.needs_drafter:
                await self._check_drafter(target, strategy, spec.same_vocab)
                drafting_context = await self._drafting_context(strategy, target)
            if spec.needs_head:
                await self._check_head(target, strategy)
        except NoReplica as err:
            if err.role != "drafter":
                raise
            log.warning("%s: this turn drafts with max-gram", err)
            drafter_down = True
        t0 = time.perf_counter()
        session, resumed = await self._open_turn(req, strategy, k, target)
        turn = session.turn
        stats = Stats(**turn.stats) if resumed and turn.stats else Stats(session_id=session.id, strategy=strategy)
        drafting = self.backends.head if STRATEGIES[strategy].needs_head else self.backends.drafter
        for pools in self._language_pools():
            label = pools.assign(session.id, session.language)
            if pools is drafting:
                stats.language, stats.drafter_pool = session.language, label
        stats.prompt_tokens = turn.prompt_end
        stats.redis_seconds += time.perf_counter() - t0
        yield TurnStarted(session.id, turn.request_id, req.resume_from)
        self.in_flight += 1
        try:
            shape = (max_new, k, k_matrix)
            async for event in self._rounds(req, session, stats, target, shape, drafter_down, drafting_context):
                yield event
        except Exception:  # the caller gets a final status and does not resume: undo the turn
            if not turn.done:
                await self._roll_back(session)
            raise
        except BaseException:  # the caller went away, or this orchestrator stops: the turn can be resumed
            if not turn.done:
                await self._release(session)
            raise
        finally:
            self.in_flight -= 1
        stats.wall_seconds += time.perf_counter() - started
        log.info(
            "session %s: %s, %d tokens in %.2fs (%.2f tok/s), τ %.2f, acceptance %.2f, draft length %.1f%s%s, finish %s%s%s%s",
            session.id, stats.strategy, stats.new_tokens, stats.wall_seconds, stats.tokens_per_second,
            stats.mean_accepted_length, stats.acceptance_rate, stats.mean_draft_length,
            " (adaptive)" if stats.adaptive else "",
            f", chains {stats.chain_rounds}/{stats.target_forwards}" if stats.chain_rounds else "", stats.finish_reason,
            f", next drafts ready {stats.speculative_ready}/{stats.target_forwards}" if stats.speculative_drafts else "",
            f", plain steps sent ahead {stats.speculative_plain}" if stats.speculative_plain else "",
            f", {stats.failovers} failovers" if stats.failovers else "",
        )  # fmt: skip
        yield stats

    def _draft_length(
        self, req: GenerationRequest, session: Session, strategy: str, k: int
    ) -> DraftLength | TreeWidth | None:
        """What chooses the turn's draft lengths (and `staged`'s shape): None when the turn's k
        is fixed - the request's or the server's k, a cascade's k-matrix or a staged tree the
        request gives - or when the turn samples with a seed the request gives: a seeded
        stream replays, and adaptive choices follow measured timings that no seed fixes
        (greedy output is the same whatever k, so greedy turns adapt)."""
        fixed = k or (strategy == "cascade" and req.k_matrix) or (strategy == "staged" and req.tree)
        replayed = req.seed is not None and not session.sampling.greedy
        if fixed or replayed or strategy == "ar":
            return None
        # A head alone drafts other trees than a head beside lookup: rates and costs of their own
        key = f"{strategy}:head" if req.head_only else strategy
        if key not in self.draft_lengths:
            if strategy == "staged":
                self.draft_lengths[key] = TreeWidth(own_cores=self.limits.own_cores)
            else:
                # a pipelined strategy's plain rounds draft ahead where the drafter has cores of its own
                ahead = STRATEGIES[strategy].pipelined and self.limits.own_cores and self.limits.verify_ahead
                self.draft_lengths[key] = DraftLength(own_cores=self.limits.own_cores, pipelined=ahead)
        return self.draft_lengths[key]

    async def _rounds(
        self, req, session, stats, target, shape, drafter_down, drafting_context
    ) -> AsyncIterator[TextChunk]:
        """The turn's rounds from where its committed tokens end, then its end. A round whose
        context (and draft) would not fit a drafter's context drafts with max-gram instead,
        like a round without a reachable drafter; the target's context is the turn's limit."""
        max_new, k, k_matrix = shape
        turn = session.turn
        spec = STRATEGIES[stats.strategy]
        round_fn = spec.run
        adaptive = self._draft_length(req, session, stats.strategy, k)
        stats.adaptive = adaptive is not None
        k = k or FIXED_K  # the draft length of a turn that does not adapt, when none is given
        # a pipelined strategy's next draft, begun during a verify, and its verify sent ahead
        lookahead = Lookahead(verify_ahead=self.limits.verify_ahead)
        carry = Carry()  # the target's hidden state behind the last round (redrafter, parallel)
        warming: asyncio.Future | None = None  # the drafter's catch-up beside a plain round
        drafter_fed = 0  # context tokens this turn has sent the drafter so far
        out = TurnOutput(TextStream(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), req.stop),
                         req.resume_from)  # fmt: skip
        text, shown = out.push(session.tokens[turn.prompt_end :])
        reason = stats.finish_reason if turn.done else self._finish_reason(session, stats, target, out, max_new)
        try:
            while True:
                if reason:
                    text += out.finish()
                if text or shown:
                    yield TextChunk(text, shown)
                if reason:
                    break
                room = min(max_new - stats.new_tokens, target.max_context - len(session.tokens))
                watch = Stopwatch()
                r = RoundInput(
                    session.id, session.tokens, session.sampling, session.seed, session.step, min(k, room - 1),
                    max_draft=room - 1, k_matrix=k_matrix, tree=req.tree or self.limits.default_tree,
                    lookahead=lookahead, carry=carry, head_only=req.head_only,
                )  # fmt: skip
                ahead_k = 0
                if adaptive is not None:
                    choice = adaptive.choose(session.acceptance, session.step, room - 1, session.ar_streak,
                                             timed=stats.target_forwards > 0, streams=self.in_flight)  # fmt: skip
                    r = sized(stats.strategy, r, choice.k, choice.plain, choice.chain)
                    stats.chain_rounds += choice.chain and r.k > 0
                    ahead_k = choice.ahead
                fallbacks = stats.fallback_rounds
                outgrown = bool(drafting_context) and len(session.tokens) + _draft_cells(r) >= drafting_context
                if outgrown and not drafter_down and stats.fallback_rounds == 0:
                    log.info("session %s: %d tokens outgrow the drafter's context (%d); rounds draft with max-gram",
                             session.id, len(session.tokens), drafting_context)  # fmt: skip
                if warming is not None and r.k:
                    # The drafter's catch-up, begun beside an earlier plain round (below): a
                    # round that drafts waits for it; one that does not goes on without it.
                    await warming
                    warming = None
                # Where drafter and verifier have cores of their own, the drafter keeps up
                # with the context beside the rounds that do not need it (KEEP_UP_TOKENS): a
                # drafting round after plain ones would otherwise first feed it every token
                # they committed (a probe after eight plain rounds: 215 ms of drafting for 2
                # tokens against 130 ms right after a drafting round, pinned, one thread).
                keep_up = self.limits.own_cores and spec.needs_drafter and spec.same_vocab
                keep_up = keep_up and not (drafter_down or outgrown)
                # A turn's first round prefills its new tokens in the verifier; drafting first
                # would put the drafter's own prefill before it. So there the first round
                # drafts nothing, and the drafter prefills meanwhile: the first token comes
                # after the slower of the two prefills, not after both.
                plain = keep_up and stats.target_forwards == 0
                r = replace(r, k=0) if plain else r
                # A pipelined strategy's plain round drafts the next round ahead on the drafter's
                # own cores during its verify, which would otherwise idle them, and sends that
                # draft's verify ahead: the next round, if it commits the drafter's guess, finds
                # its answer computed or under way. Where the speculation fails, a round after
                # any round is the plain step that verify took instead: computed right after
                # this round's verify, with no round trip of its own and no idle verifier.
                if spec.pipelined and keep_up and self.limits.verify_ahead and not plain:
                    r = replace(r, ahead_k=ahead_k if r.k == 0 else 0, plain_ahead=True)
                behind = len(r.context) - drafter_fed
                idle = warming is None or warming.done()
                if keep_up and r.k == 0 and not r.ahead_k and behind >= KEEP_UP_TOKENS and idle:
                    warming = asyncio.ensure_future(self._prefill_drafter(r))
                    drafter_fed = len(r.context)
                elif r.k or r.ahead_k:
                    drafter_fed = len(r.context)
                plain_steps = lookahead.plain_steps
                if plain:
                    result = await ar_round(self.backends, r)
                else:
                    result = await self._round(round_fn, r, stats, drafter_down or outgrown)
                tokens = list(result.tokens[:room])
                eos_at = next((i for i, t in enumerate(tokens) if t in target.eos_token_ids), None)
                if eos_at is not None:
                    tokens = tokens[: eos_at + 1]
                session.tokens.extend(tokens)
                session.step += 1
                # A round that drafts after plain ones first had the drafter feed every token they
                # committed (on shared cores, or beyond what keeping up fed it): its time is not
                # what a round of that length costs among drafting rounds (below)
                after_plain = bool(r.k) and session.ar_streak > 0
                # A plain round that verified a draft drafted ahead measured acceptance as a
                # probe does (its time and tokens are k = 0's in a pipelined strategy's choice)
                session.ar_streak = 0 if r.k or result.drafted else session.ar_streak + 1
                stats.add_round(result, r.k if spec.drafts else 0)
                stats.new_tokens += len(tokens)
                _add_totals(session.totals, result, len(tokens))
                text, shown = out.push(tokens)
                reason = self._finish_reason(session, stats, target, out, max_new)
                turn.stats = asdict(stats)
                redis_before = stats.redis_seconds
                await self._timed(stats, self.store.commit(session, tokens))
                if self.on_round is not None:
                    self.on_round(stats.strategy, result, watch.seconds, stats.redis_seconds - redis_before)
                if isinstance(adaptive, DraftLength) and spec.pipelined:
                    adaptive.fits = lookahead.fits  # what its plain rounds' drafts ahead can be
                if adaptive is not None and stats.fallback_rounds == fallbacks:
                    # The round's whole cost, its commit included: what a longer draft amortises.
                    # A turn's first round also prefills what the turn added: not a round's cost;
                    # nor is a probe's, which catches the drafter up on the plain rounds before it
                    # (timed, it made drafting look dearer after every plain streak, and so the
                    # streaks longer).
                    # Nor is a drafting round's that took the plain step sent ahead instead: it
                    # cost neither what its k costs nor what a plain round's own verify does.
                    stepped = bool(r.k) and lookahead.plain_steps > plain_steps
                    seconds = watch.seconds if stats.target_forwards > 1 and not (after_plain or stepped) else None
                    adaptive.observe(session.acceptance, r.k, result.drafted, result.accepted, seconds,
                                     result.verify_cost, result.first_path)  # fmt: skip
        finally:
            if warming is not None:
                warming.cancel()
            await lookahead.close()
            stats.speculative_drafts += lookahead.started
            stats.speculative_hits += lookahead.hits
            stats.speculative_ready += lookahead.ready
            stats.speculative_verified += lookahead.verified
            stats.speculative_plain += lookahead.plain_steps
            stats.speculative_continued += lookahead.continued
            stats.overlapped_round_trips += lookahead.overlapped
            stats.round_trips -= lookahead.overlapped
        if not turn.done:
            stats.finish_reason = reason
            if session.mode == "chat":
                session.messages.append(ChatMessage("assistant", out.stream.text))
            turn.stats = asdict(stats)
            await self._timed(stats, self.store.finish(session))

    async def _prefill_drafter(self, r: RoundInput) -> None:
        """Has the drafter feed the turn's context (a one-token draft, discarded), so the next
        round's draft starts from its cache. A failure only costs that round the prefill."""
        try:
            await self.backends.drafter.propose(r.session_id, r.context, 1, r.params, round_seed(r.seed, r.step, "prefill"))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the round that drafts next meets the same drafter and says why
            log.debug("session %s: the drafter's prefill failed: %s", r.session_id, err)

    async def _round(self, round_fn, r: RoundInput, stats: Stats, drafter_down: bool) -> RoundResult:
        """One round of the strategy; with no drafter reachable, one drafted by max-gram."""
        if not drafter_down:
            try:
                return await round_fn(self.backends, r)
            except NoReplica as err:
                if err.role != "drafter":
                    raise
                log.warning("session %s: %s; this round drafts with max-gram", r.session_id, err)
        stats.fallback_rounds += 1
        fallback = Backends(verifier=self.backends.verifier, drafter=self.backends.maxgram)
        return await sd_round(fallback, r)

    @staticmethod
    def _finish_reason(session: Session, stats: Stats, target: ModelInfo, out: TurnOutput, max_new: int) -> str:
        if stats.new_tokens and session.tokens[-1] in target.eos_token_ids:
            return "stop"
        if out.stream.stopped:
            return "stop_string"
        if stats.new_tokens >= max_new:
            return "length"
        if len(session.tokens) >= target.max_context:
            return "context"
        return ""

    async def _roll_back(self, session: Session) -> None:
        """Puts a failed turn's session back as it was before the turn; never raises (what
        cannot be undone now is undone by the session's next turn, once the lease runs out)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.store.rollback(session.id)), timeout=2.0)
        except Exception as err:  # noqa: BLE001 - Redis may be why the turn failed
            log.warning("session %s: could not roll the failed turn back: %s", session.id, err)
            await self._release(session)

    async def _release(self, session: Session) -> None:
        """Leaves a broken-off turn to be resumed (or rolled back by the next); never raises."""
        try:
            await asyncio.wait_for(asyncio.shield(self.store.release(session)), timeout=2.0)
        except Exception as err:  # noqa: BLE001 - Redis may be why the turn broke off; the lease runs out then
            log.warning("session %s: could not release the turn: %s", session.id, err)

    async def _open_turn(
        self, req: GenerationRequest, strategy: str, k: int, target: ModelInfo
    ) -> tuple[Session, bool]:
        """The session with its turn begun, or the turn the request resumes (True)."""
        fingerprint = request_fingerprint(req)
        mode = "raw" if req.messages is None else "chat"
        if not req.session_id:
            seed = secrets.randbits(63) if req.seed is None else req.seed
            session = Session(new_session_id(), mode, [], [], self._requested_sampling(req), seed, 0, strategy, k)
            session.client = req.client
            if self._language_pools():
                session.language = detect_language(_prompt_text(req))
        else:
            session = await self._load(req.session_id, req.client)
            turn = session.turn
            if req.request_id and turn is not None and turn.request_id == req.request_id:
                if turn.fingerprint != fingerprint:
                    raise InvalidInput(
                        f"request_id {req.request_id!r} named another request of session {session.id}; "
                        "give a new request id for a new request"
                    )
                if not turn.done:
                    await self.store.take_over(session, self.owner)
                return session, True
            if session.open_turn is not None:
                if session.lease > time.time():
                    raise TurnInProgress(
                        f"session {session.id} has a turn in progress (request {session.open_turn.request_id}); "
                        "wait for it to end, or resume it with its request_id"
                    )
                await self.store.rollback(session.id)
                session = await self._load(req.session_id, req.client)
            if session.mode == "raw" and mode == "chat":
                raise InvalidInput(f"session {session.id} holds raw text; continue it with a prompt, not messages")
            session.sampling = self._requested_sampling(req, base=session.sampling)
            if req.seed is not None:
                session.seed = req.seed
            session.strategy, session.k = strategy, k
        # Off the event loop: a long prompt takes a while to render and tokenize, and other
        # turns' rounds must go on meanwhile.
        session.tokens = await asyncio.get_running_loop().run_in_executor(self._tokenizing, self._turn_context, session, req)
        if len(session.tokens) >= target.max_context:
            raise InvalidInput(
                f"the prompt is {len(session.tokens)} tokens; the target's context is {target.max_context} tokens"
            )
        session.turn = Turn(req.request_id or uuid.uuid4().hex, fingerprint, len(session.tokens))
        await self.store.begin(session, self.owner)
        log.info("session %s: %s, %d prompt tokens, request %s", session.id, strategy, len(session.tokens),
                 session.turn.request_id)  # fmt: skip
        return session, False

    async def _load(self, session_id: str, client: str) -> Session:
        """The session, if `client` (an API key id) created it: another key's session is as
        absent as one that never was."""
        session = await self.store.load(session_id)
        if session is None or session.client != client:
            raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
        return session

    def _turn_context(self, session: Session, req: GenerationRequest) -> list[int]:
        """The token ids this turn generates after."""
        if session.mode == "raw":
            first = not session.tokens
            return session.tokens + self.tokenizer.encode(req.prompt, add_special_tokens=first)
        new = list(req.messages) if req.messages is not None else [ChatMessage("user", req.prompt)]
        session.messages.extend(new)
        # Chat turns re-render the whole conversation: the model services keep their
        # caches by longest common prefix, so only the changed tail is prefilled again.
        return chat_ids(self.tokenizer, [(m.role, m.content) for m in session.messages])

    async def _timed(self, stats: Stats, op) -> None:
        t0 = time.perf_counter()
        await op
        stats.redis_seconds += time.perf_counter() - t0

    async def delete_session(self, session_id: str, client: str = "") -> bool:
        check_session_id(session_id)
        if await self.store.client_of(session_id) != client:  # another key's, or none
            return False
        return await self.store.delete(session_id)


def _prompt_text(req: GenerationRequest) -> str:
    """What the request says: its prompt, or its last user message (else its last message)."""
    if req.messages is None:
        return req.prompt or ""
    users = [m.content for m in req.messages if m.role == "user"]
    return users[-1] if users else req.messages[-1].content


def _draft_cells(r: RoundInput) -> int:
    """At most how far past the context a round's drafting reaches in a drafter: its chain,
    its tree's nodes, the cascade's shares, with room for the second stage's lookahead."""
    tree = (r.tree or DEFAULT_TREE).budget
    cascade = sum(r.k_matrix[0]) if r.k_matrix else 0
    return max(r.k, tree, cascade) + DRAFT_LOOKAHEAD


def _same_vocab(info: ModelInfo, target: ModelInfo) -> bool:
    """A drafter shares the target's vocabulary (statistical drafters have no fingerprint: any ids)."""
    return not info.tokenizer_fingerprint or info.tokenizer_fingerprint == target.tokenizer_fingerprint


def _add_totals(totals: Totals, r: RoundResult, committed: int) -> None:
    totals.new_tokens += committed
    totals.target_forwards += 1
    totals.drafted += r.drafted
    totals.accepted += r.accepted

