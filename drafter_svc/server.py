"""Drafter gRPC servicer and process entry point (`python -m drafter_svc`)."""

from __future__ import annotations

import sys
import time

import grpc

from drafter_svc.draft import propose
from services.hosting import ModelServicer, abort_bad_request, run_model_service
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.sampling import seeded_generator
from services.wire import BadRequest, delta_from_pb, dists_to_pb, sampling_from_pb

DEFAULT_LISTEN = "127.0.0.1:50052"


class DrafterServicer(ModelServicer, pb_grpc.DrafterServicer):
    async def Propose(self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        host = self.runner.host
        try:
            delta = delta_from_pb(request.context, host.info.vocab_size)
            params = sampling_from_pb(request.sampling)
            if request.k > self.config.max_draft:
                raise BadRequest(f"k={request.k} is above this drafter's limit of {self.config.max_draft}")
        except BadRequest as err:
            await abort_bad_request(context, err)
        generator = seeded_generator(request.seed)
        started = time.perf_counter()
        try:
            proposal = await self.runner.run(
                propose, host, delta, request.k, params, self.config.q_top, generator
            )
        except ValueError as err:
            await abort_bad_request(context, BadRequest(str(err)))
        elapsed = time.perf_counter() - started
        if proposal is None:
            return pb.ProposeResponse(context_miss=True, compute_seconds=elapsed)
        return pb.ProposeResponse(tokens=proposal.tokens, q=dists_to_pb(proposal.q), compute_seconds=elapsed)


def main() -> int:
    return run_model_service(
        name="drafter",
        default_listen=DEFAULT_LISTEN,
        make_servicer=DrafterServicer,
        add_to_server=pb_grpc.add_DrafterServicer_to_server,
    )


if __name__ == "__main__":
    sys.exit(main())
