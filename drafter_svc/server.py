"""Drafter gRPC servicer and process entry point (`python -m drafter_svc`)."""

from __future__ import annotations

import logging
import sys
import time

import grpc

from drafter_svc import maxgram
from drafter_svc.draft import propose, propose_tree, review
from drafter_svc.foreign import Translation, propose_slem, propose_strings, propose_tli
from drafter_svc.maxgram import MaxGramHost, MaxGramServicer
from services.config import ModelServiceConfig
from services.hosting import HostRunner, ModelServicer, abort_bad_request, load_configured_host, run_model_service
from services.models import resolve
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.runtime import ModelHost, tokenizer_fingerprint
from services.sampling import seeded_generator
from services.vocab import token_bytes
from services.wire import (
    BadRequest,
    check_token_ids,
    delta_from_pb,
    dists_from_pb,
    dists_to_pb,
    info_to_pb,
    sampling_from_pb,
    shape_from_pb,
    strings_to_pb,
    tree_to_pb,
    vocab_from_pb,
)

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50052"


class DrafterServicer(ModelServicer, pb_grpc.DrafterServicer):
    """A neural drafter. With a `translation` its vocabulary differs from the target's: calls
    still carry target ids, and it drafts by slem, tli or slrs only (drafter_svc/foreign.py)."""

    def __init__(self, runner: HostRunner, config: ModelServiceConfig, translation: Translation | None = None) -> None:
        super().__init__(runner, config)
        self.translation = translation
        host = runner.host
        self.own_bytes = (
            translation.drafter_bytes
            if translation is not None
            else token_bytes(host.tokenizer, size=host.info.vocab_size) if host.tokenizer is not None else None
        )
        self.info = host.info if translation is None else translation.wire_info(host.info)

    @property
    def wire_vocab(self) -> int:
        """The range of token ids calls carry: the target's when translating."""
        return self.translation.target_rows if self.translation is not None else self.info.vocab_size

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return info_to_pb(self.info)

    async def _refuse_foreign(self, context: grpc.aio.ServicerContext, what: str) -> None:
        if self.translation is not None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this drafter ({self.info.model}) has another vocabulary than the target's, so it cannot {what}; "
                "use the strategies slem, tli or slrs with it",
            )

    async def Propose(self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        host = self.runner.host
        try:
            delta = delta_from_pb(request.context, self.wire_vocab)
            params = sampling_from_pb(request.sampling)
            mode = vocab_from_pb(request.vocab)
            if request.k > self.config.max_draft:
                raise BadRequest(f"k={request.k} is above this drafter's limit of {self.config.max_draft}")
        except BadRequest as err:
            await abort_bad_request(context, err)
        generator = seeded_generator(request.seed)
        started = time.perf_counter()
        if self.translation is None:
            work, args = propose, (host, delta, request.k, params, self.config.q_top, generator)
        elif mode == "native":
            await self._refuse_foreign(context, "propose target tokens directly (vocab mode native)")
        else:
            translate = propose_slem if mode == "slem" else propose_tli
            work, args = translate, (host, self.translation, delta, request.k, params, self.config.q_top, generator)
        try:
            proposal = await self.runner.run(work, *args)
        except ValueError as err:
            await abort_bad_request(context, BadRequest(str(err)))
        elapsed = time.perf_counter() - started
        if proposal is None:
            return pb.ProposeResponse(context_miss=True, compute_seconds=elapsed)
        return pb.ProposeResponse(tokens=proposal.tokens, q=dists_to_pb(proposal.q), compute_seconds=elapsed)

    async def ProposeStrings(
        self, request: pb.ProposeStringsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProposeStringsResponse:
        host = self.runner.host
        try:
            delta = delta_from_pb(request.context, self.wire_vocab)
            params = sampling_from_pb(request.sampling)
            if request.k > self.config.max_draft:
                raise BadRequest(f"k={request.k} is above this drafter's limit of {self.config.max_draft}")
            if self.own_bytes is None:
                raise BadRequest("this drafter was loaded without a tokenizer, so it cannot draft text")
        except BadRequest as err:
            await abort_bad_request(context, err)
        generator = seeded_generator(request.seed)
        started = time.perf_counter()
        proposals = await self.runner.run(
            propose_strings, host, self.translation, self.own_bytes, delta, request.k, params, self.config.q_top,
            generator,
        )
        elapsed = time.perf_counter() - started
        if proposals is None:
            return pb.ProposeStringsResponse(context_miss=True, compute_seconds=elapsed)
        return pb.ProposeStringsResponse(draft=strings_to_pb(proposals), compute_seconds=elapsed)

    async def Review(self, request: pb.ReviewRequest, context: grpc.aio.ServicerContext) -> pb.ReviewResponse:
        await self._refuse_foreign(context, "review a draft")
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
        await self._refuse_foreign(context, "grow a draft tree")
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
        if config.model == maxgram.NAME:
            return MaxGramServicer(runner, config)
        return DrafterServicer(runner, config, translation_for(runner.host, config))

    return run_model_service(
        name="drafter",
        default_listen=DEFAULT_LISTEN,
        make_servicer=make_servicer,
        add_to_server=pb_grpc.add_DrafterServicer_to_server,
        load=load,
    )


def translation_for(host: ModelHost, config: ModelServiceConfig) -> Translation | None:
    """The translation to the target's vocabulary (SPECD_TARGET_TOKENIZER), when it differs
    from this drafter's; None when it is the same, or no target tokenizer is configured."""
    if not config.target_tokenizer:
        return None
    from transformers import AutoTokenizer

    target_tokenizer = AutoTokenizer.from_pretrained(resolve(config.target_tokenizer, config.home))
    if tokenizer_fingerprint(target_tokenizer) == host.info.tokenizer_fingerprint:
        log.info("this drafter shares the target's vocabulary")
        return None
    target_rows = _model_rows(resolve(config.target_tokenizer, config.home), len(target_tokenizer))
    return Translation.build(host.tokenizer, target_tokenizer, host.info.vocab_size, target_rows, config.home / "vocab")


def _model_rows(folder, tokenizer_len: int) -> int:
    """The target model's output rows (its config's vocab_size; at least the tokenizer's length)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
        rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0
    except (OSError, ValueError):
        rows = 0
    return max(int(rows), tokenizer_len)


if __name__ == "__main__":
    sys.exit(main())
