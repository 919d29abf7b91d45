"""drafter_svc serving the max-gram model (SPECD_MODEL=maxgram): no weights, an n-gram index
of each session's context (services/ngram.py). It answers Propose with deterministic tokens
and no q (point masses); it cannot Review or grow trees, having no distribution to judge by."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import grpc

from services.context import ContextDelta, resolve_delta
from services.hosting import ModelServicer, abort_bad_request
from services.ngram import NgramIndex
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.runtime import ModelInfo, SessionState
from services.wire import BadRequest, delta_from_pb

log = logging.getLogger(__name__)

NAME = "maxgram"
# Token ids are checked against vocab_size; the max-gram model takes any vocabulary's ids, and
# has no tokenizer fingerprint, which tells callers it needs no matching vocabulary.
INFO = ModelInfo(NAME, 2**31 - 1, 0, (), "", "cpu", "")


class MaxGramHost:
    """Per-session state of the max-gram drafter, least recently used evicted (the
    ModelHost surface the servicers use: info, sessions, release)."""

    def __init__(self, *, max_sessions: int, max_n: int = 4) -> None:
        self.info = INFO
        self.max_sessions = max_sessions
        self.max_n = max_n
        self._sessions: OrderedDict[str, SessionState] = OrderedDict()

    def session(self, session_id: str) -> SessionState:
        state = self._sessions.pop(session_id, None) or SessionState(ngram=NgramIndex(self.max_n))
        self._sessions[session_id] = state
        while len(self._sessions) > self.max_sessions:
            evicted, _ = self._sessions.popitem(last=False)
            log.info("evicted session %s (LRU, max %d)", evicted, self.max_sessions)
        return state

    def held_context(self, session_id: str) -> list[int] | None:
        state = self._sessions.get(session_id)
        return None if state is None else state.context

    def release(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    @property
    def session_count(self) -> int:
        return len(self._sessions)


def propose_maxgram(host: MaxGramHost, delta: ContextDelta, k: int) -> tuple[int, ...] | None:
    """Up to k max-gram tokens after the context (fewer when nothing matches); None on a miss."""
    context = resolve_delta(host.held_context(delta.session_id), delta)
    if context is None:
        return None
    state = host.session(delta.session_id)
    state.context = context
    state.ngram.sync(context)
    return tuple(state.ngram.propose(k))


class MaxGramServicer(ModelServicer, pb_grpc.DrafterServicer):
    """Propose only; Review and ProposeTree answer UNIMPLEMENTED (the generated base)."""

    async def Propose(self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        host = self.runner.host
        try:
            delta = delta_from_pb(request.context, host.info.vocab_size)
            if request.k > self.config.max_draft:
                raise BadRequest(f"k={request.k} is above this drafter's limit of {self.config.max_draft}")
        except BadRequest as err:
            await abort_bad_request(context, err)
        started = time.perf_counter()
        tokens = await self.runner.run(propose_maxgram, host, delta, request.k)
        elapsed = time.perf_counter() - started
        if tokens is None:
            return pb.ProposeResponse(context_miss=True, compute_seconds=elapsed)
        return pb.ProposeResponse(tokens=tokens, compute_seconds=elapsed)
