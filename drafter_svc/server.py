"""Drafter gRPC servicer and process entry point (`python -m drafter_svc`).

The servicer converts messages to the core's typed arguments and its results back; the core
(drafter_svc/core.py, or the max-gram drafter for SPECD_MODEL=maxgram) does the work, and
services.hosting.rpc maps its errors to status codes.
"""

from __future__ import annotations

import logging
import sys

import torch

from drafter_svc.core import DrafterCore
from drafter_svc.foreign import Translation
from drafter_svc.head import HeadDrafter, load_head_drafter
from services import maxgram
from services.config import ModelServiceConfig
from services.errors import Unsupported
from services.hosting import ModelServicer, rpc, run_model_service
from services.maxgram import MaxGramDrafter
from services.models import resolve
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.redrafter import is_head
from services.runtime import Runtime, load_runtime, tokenizer_fingerprint
from services.wire import (
    delta_from_pb,
    dists_from_pb,
    dists_to_pb,
    hidden_from_bytes,
    sampling_from_pb,
    shape_from_pb,
    strings_to_pb,
    tree_to_pb,
    vocab_from_pb,
)
from services.worker import Worker

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50052"


class DrafterServicer(ModelServicer, pb_grpc.DrafterServicer):
    core: DrafterCore | MaxGramDrafter | HeadDrafter

    @rpc(pb.ProposeResponse)
    async def Propose(self, request: pb.ProposeRequest) -> pb.ProposeResponse:
        args = (
            request.context.session_id, delta_from_pb(request.context), request.k,
            sampling_from_pb(request.sampling), request.seed,
        )  # fmt: skip
        if request.continue_k and isinstance(self.core, DrafterCore):
            d = await self.core.propose_and_continue(
                *args, request.continue_k, request.continue_seed, vocab_from_pb(request.vocab)
            )
        else:
            d = await self.core.propose(*args, vocab_from_pb(request.vocab))
        return pb.ProposeResponse(
            tokens=d.tokens, q=dists_to_pb(d.q), compute_seconds=d.cost.compute_seconds, continued=d.continued
        )

    @rpc(pb.ProposeStringsResponse)
    async def ProposeStrings(self, request: pb.ProposeStringsRequest) -> pb.ProposeStringsResponse:
        d = await self.core.propose_strings(
            request.context.session_id, delta_from_pb(request.context), request.k,
            sampling_from_pb(request.sampling), request.seed,
        )  # fmt: skip
        return pb.ProposeStringsResponse(draft=strings_to_pb(d.proposals), compute_seconds=d.cost.compute_seconds)

    @rpc(pb.ReviewResponse)
    async def Review(self, request: pb.ReviewRequest) -> pb.ReviewResponse:
        r = await self.core.review(
            request.context.session_id, delta_from_pb(request.context), list(request.draft),
            dists_from_pb(request.q), sampling_from_pb(request.sampling), request.seed,
        )  # fmt: skip
        return pb.ReviewResponse(
            accepted=r.accepted, tokens=r.tokens, q=dists_to_pb(r.q), compute_seconds=r.cost.compute_seconds
        )

    @rpc(pb.ProposeTreeResponse)
    async def ProposeTree(self, request: pb.ProposeTreeRequest) -> pb.ProposeTreeResponse:
        t = await self.core.propose_tree(
            request.context.session_id, delta_from_pb(request.context), shape_from_pb(request.shape),
            sampling_from_pb(request.sampling), request.seed,
        )  # fmt: skip
        return pb.ProposeTreeResponse(
            tree=tree_to_pb(t.tree, t.q), compute_seconds=t.cost.compute_seconds, drafter_forwards=t.forwards
        )

    @rpc(pb.ProposeBeamsResponse)
    async def ProposeBeams(self, request: pb.ProposeBeamsRequest) -> pb.ProposeBeamsResponse:
        if not isinstance(self.core, HeadDrafter):
            raise Unsupported("this drafter hosts no trained draft head; start one with SPECD_MODEL=<a trained head>")
        t = await self.core.propose_beams(
            "", hidden_from_bytes(request.hidden), request.last_token, request.width, request.depth
        )
        return pb.ProposeBeamsResponse(tree=tree_to_pb(t.tree, t.q), compute_seconds=t.cost.compute_seconds)


def build_core(config: ModelServiceConfig, worker: Worker) -> DrafterCore | MaxGramDrafter:
    if config.model == maxgram.NAME:
        return MaxGramDrafter(max_sessions=config.max_sessions, max_draft=config.max_draft)
    path = resolve(config.model, config.home)
    if is_head(path):
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        return load_head_drafter(
            path, config.home, max_draft=config.max_draft, worker=worker, int8_kernel=config.int8_kernel,
            huge_pages=config.huge_pages,
        )
    runtime = load_runtime(config, "drafter")
    return DrafterCore(
        runtime, q_top=config.q_top, second_stage=config.second_stage, max_draft=config.max_draft,
        max_sessions=config.max_sessions, translation=translation_for(runtime, config), worker=worker,
        min_confidence=config.draft_min_confidence, max_queue=config.max_queue,
        max_batch_tokens=config.max_batch_tokens, batch_wait=config.batch_wait_ms / 1000,
    )  # fmt: skip


def main() -> int:
    return run_model_service(
        name="drafter",
        default_listen=DEFAULT_LISTEN,
        build_core=build_core,
        make_servicer=DrafterServicer,
    )


def translation_for(runtime: Runtime, config: ModelServiceConfig) -> Translation | None:
    """The translation to the target's vocabulary (SPECD_TARGET_TOKENIZER), when it differs
    from this drafter's; None when it is the same, or no target tokenizer is configured."""
    if not config.target_tokenizer:
        return None
    from transformers import AutoTokenizer

    target_dir = resolve(config.target_tokenizer, config.home)
    target_dir = target_dir if target_dir.is_dir() else target_dir.parent
    target_tokenizer = AutoTokenizer.from_pretrained(target_dir)
    if tokenizer_fingerprint(target_tokenizer) == runtime.info.tokenizer_fingerprint:
        log.info("this drafter shares the target's vocabulary")
        return None
    target_rows = model_rows(target_dir, len(target_tokenizer))
    return Translation.build(runtime.tokenizer, target_tokenizer, runtime.info.vocab_size, target_rows, config.home / "vocab")


def model_rows(folder, tokenizer_len: int) -> int:
    """A model's output rows (its config's vocab_size; at least the tokenizer's length)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
        rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0
    except (OSError, ValueError):
        rows = 0
    return max(int(rows), tokenizer_len)


if __name__ == "__main__":
    sys.exit(main())
