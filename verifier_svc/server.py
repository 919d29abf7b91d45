"""Verifier gRPC servicer and process entry point (`python -m verifier_svc`).

The servicer converts messages to the core's typed arguments and its results back; the core
(verifier_svc/core.py) does the work, and services.hosting.rpc maps its errors to status codes.
"""

from __future__ import annotations

import sys

from services.config import ModelServiceConfig
from services.hosting import ModelServicer, rpc, run_model_service
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.runtime import load_runtime
from services.wire import (
    delta_from_pb,
    dists_from_pb,
    hidden_to_bytes,
    sampling_from_pb,
    strings_from_pb,
    tree_from_pb,
)
from services.worker import Worker
from verifier_svc.core import VerifierCore

DEFAULT_LISTEN = "127.0.0.1:50051"


class VerifierServicer(ModelServicer, pb_grpc.VerifierServicer):
    core: VerifierCore

    @rpc(pb.VerifyResponse)
    async def Verify(self, request: pb.VerifyRequest) -> pb.VerifyResponse:
        session_id, draft, q = request.context.session_id, list(request.draft), dists_from_pb(request.q)
        params = sampling_from_pb(request.sampling)
        if request.or_plain:
            claim = delta_from_pb(request.context)
            v = await self.core.verify_ahead(session_id, claim, draft, q, params, request.seed, or_plain=True)
            if v is None:
                return pb.VerifyResponse(context_miss=True)
        else:
            v = await self.core.verify(session_id, delta_from_pb(request.context), draft, q, params, request.seed)
        after_len, after_fingerprint = v.plain_after or (0, 0)
        return pb.VerifyResponse(
            accepted=v.accepted, tokens=v.tokens, compute_seconds=v.cost.compute_seconds,
            batch_sessions=v.cost.batch_sessions, batch_tokens=v.cost.batch_tokens,
            plain_after_len=after_len, plain_after_fingerprint=after_fingerprint,
        )  # fmt: skip

    @rpc(pb.VerifyTreeResponse)
    async def VerifyTree(self, request: pb.VerifyTreeRequest) -> pb.VerifyTreeResponse:
        tree, q = tree_from_pb(request.tree)
        v = await self.core.verify_tree(
            request.context.session_id, delta_from_pb(request.context), tree, q, sampling_from_pb(request.sampling),
            request.seed, request.want_hidden,
        )  # fmt: skip
        return pb.VerifyTreeResponse(
            accepted=v.accepted, tokens=v.tokens, compute_seconds=v.cost.compute_seconds,
            hidden=hidden_to_bytes(v.hidden) if v.hidden is not None else b"",
        )  # fmt: skip

    @rpc(pb.VerifyStringsResponse)
    async def VerifyStrings(self, request: pb.VerifyStringsRequest) -> pb.VerifyStringsResponse:
        v = await self.core.verify_strings(
            request.context.session_id, delta_from_pb(request.context), strings_from_pb(request.draft),
            sampling_from_pb(request.sampling), request.seed,
        )  # fmt: skip
        return pb.VerifyStringsResponse(
            accepted=v.accepted, tokens=v.tokens, compute_seconds=v.cost.compute_seconds, verified=v.verified,
            tree_nodes=v.tree_nodes,
        )  # fmt: skip


def build_core(config: ModelServiceConfig, worker: Worker) -> VerifierCore:
    runtime = load_runtime(config, "verifier")
    return VerifierCore(
        runtime, max_draft=config.max_draft, max_sessions=config.max_sessions, worker=worker,
        max_queue=config.max_queue, max_batch_tokens=config.max_batch_tokens, batch_wait=config.batch_wait_ms / 1000,
        prefill_chunk=config.prefill_chunk,
    )  # fmt: skip


def main() -> int:
    return run_model_service(
        name="verifier",
        default_listen=DEFAULT_LISTEN,
        build_core=build_core,
        make_servicer=VerifierServicer,
    )


if __name__ == "__main__":
    sys.exit(main())
