"""Drafter gRPC servicer and process entry point (`python -m drafter_svc`)."""

from __future__ import annotations

import sys
import time

import grpc

from drafter_svc import maxgram
from drafter_svc.draft import propose, propose_tree, review
from drafter_svc.maxgram import MaxGramHost, MaxGramServicer
from services.config import ModelServiceConfig
from services.hosting import HostRunner, ModelServicer, abort_bad_request, load_configured_host, run_model_service
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.runtime import ModelHost
from services.sampling import seeded_generator
from services.wire import (
    BadRequest,
    check_token_ids,
    delta_from_pb,
    dists_from_pb,
    dists_to_pb,
    sampling_from_pb,
    shape_from_pb,
    tree_to_pb,
)

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

    async def Review(self, request: pb.ReviewRequest, context: grpc.aio.ServicerContext) -> pb.ReviewResponse:
        host = self.runner.host
        vocab = host.info.vocab_size
        try:
            delta = delta_from_pb(request.context, vocab)
            params = sampling_from_pb(request.sampling)
            check_token_ids(request.draft, vocab, "draft")
            if len(request.draft) > self.config.max_draft:
                raise BadRequest(f"a draft of {len(request.draft)} tokens is above the limit of {self.config.max_draft}")
            q = dists_from_pb(request.q, vocab)
            if q and len(q) != len(request.draft):
                raise BadRequest(f"q has {len(q)} entries for {len(request.draft)} draft tokens; send one per token or none")
        except BadRequest as err:
            await abort_bad_request(context, err)
        generator = seeded_generator(request.seed)
        started = time.perf_counter()
        try:
            result = await self.runner.run(
                review, host, delta, list(request.draft), q, params, self.config.q_top, generator
            )
        except (ValueError, AssertionError) as err:
            await abort_bad_request(context, BadRequest(str(err)))
        elapsed = time.perf_counter() - started
        if result is None:
            return pb.ReviewResponse(context_miss=True, compute_seconds=elapsed)
        return pb.ReviewResponse(
            accepted=result.verdict.accepted,
            tokens=result.verdict.tokens,
            q=dists_to_pb(result.q),
            compute_seconds=elapsed,
        )

    async def ProposeTree(
        self, request: pb.ProposeTreeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProposeTreeResponse:
        host = self.runner.host
        try:
            delta = delta_from_pb(request.context, host.info.vocab_size)
            params = sampling_from_pb(request.sampling)
            shape = shape_from_pb(request.shape, self.config.max_draft)
        except BadRequest as err:
            await abort_bad_request(context, err)
        generator = seeded_generator(request.seed)
        started = time.perf_counter()
        try:
            proposal = await self.runner.run(
                propose_tree, host, delta, shape, params, self.config.q_top, self.config.second_stage, generator
            )
        except ValueError as err:
            await abort_bad_request(context, BadRequest(str(err)))
        elapsed = time.perf_counter() - started
        if proposal is None:
            return pb.ProposeTreeResponse(context_miss=True, compute_seconds=elapsed)
        return pb.ProposeTreeResponse(
            tree=tree_to_pb(proposal.tree, proposal.q), compute_seconds=elapsed, drafter_forwards=proposal.forwards
        )


def main() -> int:
    def load(config: ModelServiceConfig) -> ModelHost | MaxGramHost:
        if config.model == maxgram.NAME:
            return MaxGramHost(max_sessions=config.max_sessions)
        return load_configured_host(config)

    def make_servicer(runner: HostRunner, config: ModelServiceConfig) -> ModelServicer:
        statistical = config.model == maxgram.NAME
        return (MaxGramServicer if statistical else DrafterServicer)(runner, config)

    return run_model_service(
        name="drafter",
        default_listen=DEFAULT_LISTEN,
        make_servicer=make_servicer,
        add_to_server=pb_grpc.add_DrafterServicer_to_server,
        load=load,
    )


if __name__ == "__main__":
    sys.exit(main())
