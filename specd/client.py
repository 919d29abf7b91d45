"""The Python client of the Generator service: one turn, resumed when its stream breaks.

Every turn carries a request id (the caller's, or one chosen here). The stream's first
message names the session; if the stream then breaks because the orchestrator died, restarted
or is draining (UNAVAILABLE, or a stream cut off without a status), the client calls again,
at any orchestrator replica, with the same session id and request id and `resume_from` set to
the tokens it already holds: the turn continues where it was, and no token is repeated or lost.
Any gRPC client does the same with those three fields.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.server import channel_options
from services.wire import FINAL_KEY

RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)


@dataclass
class Result:
    token_ids: list[int]
    text: str
    stats: pb.GenerationStats
    session_id: str = ""
    request_id: str = ""
    resumes: int = 0  # times the stream broke and the turn was resumed
    chunks: list[str] = field(default_factory=list)  # the text deltas as they arrived


def _final(err: grpc.RpcError) -> bool:
    """The orchestrator itself failed the turn (it marks every status it sends); a status
    without the mark comes from the transport: the orchestrator is gone or going."""
    metadata = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return any(key == FINAL_KEY for key, _ in metadata or ())


def generate(
    address: str,
    request: pb.GenerateRequest,
    *,
    timeout: float = 300.0,
    resumes: int = 5,
    backoff_seconds: float = 0.25,
    on_delta: Callable[[pb.TextDelta], None] | None = None,
) -> Result:
    """Runs one turn to its end at `address` (one host:port, or several comma-separated: the
    orchestrator replicas, tried in turn); resumes a broken stream up to `resumes` times,
    waiting a little longer each time. Raises grpc.RpcError on a status a retry cannot fix."""
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    base = pb.GenerateRequest()
    base.CopyFrom(request)
    if not base.request_id:
        base.request_id = uuid.uuid4().hex
    result = Result([], "", pb.GenerationStats(), base.session_id, base.request_id)
    stats = None
    while True:
        call = pb.GenerateRequest()
        call.CopyFrom(base)
        call.session_id = result.session_id
        call.resume_from = base.resume_from + len(result.token_ids) if result.session_id else 0
        try:
            at = addresses[result.resumes % len(addresses)]
            with grpc.insecure_channel(at, options=channel_options()) as channel:
                for reply in pb_grpc.GeneratorStub(channel).Generate(call, timeout=timeout):
                    event = reply.WhichOneof("event")
                    if event == "started":
                        result.session_id = reply.started.session_id
                    elif event == "delta":
                        result.token_ids.extend(reply.delta.token_ids)
                        result.chunks.append(reply.delta.text)
                        if on_delta is not None:
                            on_delta(reply.delta)
                    elif event == "stats":
                        stats = reply.stats
            if stats is None:  # cut off without a status
                raise _Broken()
        except (grpc.RpcError, _Broken) as err:
            broken = isinstance(err, _Broken) or (err.code() in RESUMABLE and not _final(err))
            if not broken or result.resumes >= resumes:
                if isinstance(err, _Broken):
                    raise RuntimeError("the stream ended without statistics") from None
                raise
            result.resumes += 1
            time.sleep(backoff_seconds * result.resumes)
            continue
        result.stats = stats
        result.text = "".join(result.chunks)
        return result


class _Broken(Exception):
    """A stream that ended without its statistics."""
