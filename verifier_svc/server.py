"""Verifier gRPC servicer and process entry point (`python -m verifier_svc`)."""

from __future__ import annotations

import sys
import time

import grpc

from services.hosting import ModelServicer, abort_bad_request, run_model_service
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.sampling import seeded_generator
from services.slrs import PrefixIndex
from services.wire import (
    BadRequest,
    check_token_ids,
    delta_from_pb,
    dists_from_pb,
    sampling_from_pb,
    strings_from_pb,
    tree_from_pb,
)
from verifier_svc.verify import string_index, verify, verify_strings, verify_tree

DEFAULT_LISTEN = "127.0.0.1:50051"


class VerifierServicer(ModelServicer, pb_grpc.VerifierServicer):
    _strings: PrefixIndex | None = None  # the target vocabulary as bytes, built on the first VerifyStrings

    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext) -> pb.VerifyResponse:
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
            verdict = await self.runner.run(verify, host, delta, list(request.draft), q, params, generator)
        except ValueError as err:
            await abort_bad_request(context, BadRequest(str(err)))
        elapsed = time.perf_counter() - started
        if verdict is None:
            return pb.VerifyResponse(context_miss=True, compute_seconds=elapsed)
        return pb.VerifyResponse(accepted=verdict.accepted, tokens=verdict.tokens, compute_seconds=elapsed)

    async def VerifyTree(
        self, request: pb.VerifyTreeRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyTreeResponse:
        host = self.runner.host
        try:
            delta = delta_from_pb(request.context, host.info.vocab_size)
            params = sampling_from_pb(request.sampling)
            tree, q = tree_from_pb(request.tree, host.info.vocab_size)
            if len(tree) > self.config.max_draft:
                raise BadRequest(f"a tree of {len(tree)} nodes is above the limit of {self.config.max_draft}")
        except BadRequest as err:
            await abort_bad_request(context, err)
        generator = seeded_generator(request.seed)
        started = time.perf_counter()
        try:
            verdict = await self.runner.run(verify_tree, host, delta, tree, q, params, generator)
        except (ValueError, AssertionError) as err:
            await abort_bad_request(context, BadRequest(str(err)))
        elapsed = time.perf_counter() - started
        if verdict is None:
            return pb.VerifyTreeResponse(context_miss=True, compute_seconds=elapsed)
        return pb.VerifyTreeResponse(accepted=verdict.accepted, tokens=verdict.tokens, compute_seconds=elapsed)


    async def VerifyStrings(
        self, request: pb.VerifyStringsRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyStringsResponse:
        host = self.runner.host
        try:
            delta = delta_from_pb(request.context, host.info.vocab_size)
            params = sampling_from_pb(request.sampling)
            if len(request.draft) > self.config.max_draft:
                raise BadRequest(f"a draft of {len(request.draft)} strings is above the limit of {self.config.max_draft}")
            proposals = strings_from_pb(request.draft)
            if host.tokenizer is None:
                raise BadRequest("this verifier was loaded without a tokenizer, so it cannot check drafted text")
        except BadRequest as err:
            await abort_bad_request(context, err)
        if self._strings is None:
            self._strings = await self.runner.run(string_index, host.tokenizer, host.info.vocab_size)
        generator = seeded_generator(request.seed)
        started = time.perf_counter()
        try:
            result = await self.runner.run(
                verify_strings, host, self._strings, delta, proposals, params, generator, self.config.max_draft
            )
        except ValueError as err:
            await abort_bad_request(context, BadRequest(str(err)))
        elapsed = time.perf_counter() - started
        if result is None:
            return pb.VerifyStringsResponse(context_miss=True, compute_seconds=elapsed)
        return pb.VerifyStringsResponse(
            accepted=result.verdict.accepted,
            tokens=result.verdict.tokens,
            compute_seconds=elapsed,
            verified=result.verified,
            tree_nodes=result.tree_nodes,
        )


def main() -> int:
    return run_model_service(
        name="verifier",
        default_listen=DEFAULT_LISTEN,
        make_servicer=VerifierServicer,
        add_to_server=pb_grpc.add_VerifierServicer_to_server,
    )


if __name__ == "__main__":
    sys.exit(main())
