"""Conversions between protobuf messages and the plain objects the domain code uses.

Servicers and clients call these and nothing else touches protobuf types.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from services.context import ContextDelta
from services.errors import BadRequest, check_token_ids
from services.pb import specd_pb2 as pb
from services.runtime import ModelInfo
from services.sampling import SamplingParams, SparseDist
from services.slrs import StringProposal
from services.tree import Tree, TreeShape


def sampling_to_pb(params: SamplingParams) -> pb.Sampling:
    return pb.Sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)


def sampling_from_pb(msg: pb.Sampling) -> SamplingParams:
    # An unset Sampling message has top_p 0; treat it as "top-p off".
    params = SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p or 1.0)
    problems = params.problems()
    if problems:
        raise BadRequest("; ".join(problems))
    return params


def delta_to_pb(delta: ContextDelta) -> pb.Context:
    return pb.Context(
        session_id=delta.session_id,
        base_len=delta.base_len,
        base_fingerprint=delta.base_fingerprint,
        tokens=delta.tokens,
    )


def delta_from_pb(msg: pb.Context) -> ContextDelta:
    """The call's context delta (its token ids are checked by the core, which knows its vocabulary)."""
    if not msg.session_id:
        raise BadRequest("context.session_id is empty")
    return ContextDelta(msg.session_id, msg.base_len, msg.base_fingerprint, tuple(msg.tokens))


def dists_to_pb(q: Sequence[SparseDist]) -> list[pb.SparseDist]:
    return [pb.SparseDist(ids=d.ids.tolist(), probs=d.probs.tolist()) for d in q]


def dists_from_pb(msgs: Sequence[pb.SparseDist], vocab_size: int | None = None) -> tuple[SparseDist, ...]:
    """Parses and checks proposal distributions (ids checked against vocab_size when given)."""
    dists = []
    for i, msg in enumerate(msgs):
        if len(msg.ids) != len(msg.probs) or not msg.ids:
            raise BadRequest(f"q[{i}] needs as many ids as probs, and at least one")
        if vocab_size is not None:
            check_token_ids(msg.ids, vocab_size, f"q[{i}].ids")
        probs = torch.tensor(list(msg.probs), dtype=torch.float32)
        if not bool(torch.isfinite(probs).all()) or (probs < 0).any() or abs(float(probs.sum()) - 1.0) > 1e-4:
            raise BadRequest(f"q[{i}] must be a probability distribution (sum {float(probs.sum()):.4f})")
        if len(set(msg.ids)) != len(msg.ids):
            raise BadRequest(f"q[{i}].ids must be distinct")
        dists.append(SparseDist(torch.tensor(list(msg.ids), dtype=torch.long), probs))
    return tuple(dists)


def info_to_pb(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=info.model,
        vocab_size=info.vocab_size,
        max_context=info.max_context,
        eos_token_ids=info.eos_token_ids,
        dtype=info.dtype,
        device=info.device,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        wire_tokenizer_fingerprint=info.wire_tokenizer_fingerprint,
        shared_tokens=info.shared_tokens,
        weights=info.weights,
        runtime=info.runtime,
    )


def info_from_pb(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=msg.model,
        vocab_size=msg.vocab_size,
        max_context=msg.max_context,
        eos_token_ids=tuple(msg.eos_token_ids),
        dtype=msg.dtype,
        device=msg.device,
        tokenizer_fingerprint=msg.tokenizer_fingerprint,
        wire_tokenizer_fingerprint=msg.wire_tokenizer_fingerprint,
        shared_tokens=msg.shared_tokens,
        weights=msg.weights,
        runtime=msg.runtime,
    )


def tree_to_pb(tree: Tree, q: Sequence[SparseDist | None]) -> pb.DraftTree:
    """A tree and its per-node q (N+1 entries or none); None travels as a SparseDist with no ids."""
    return pb.DraftTree(
        tokens=tree.tokens,
        parents=tree.parents,
        q=[pb.SparseDist() if d is None else pb.SparseDist(ids=d.ids.tolist(), probs=d.probs.tolist()) for d in q],
    )


def tree_from_pb(msg: pb.DraftTree, vocab_size: int | None = None) -> tuple[Tree, tuple[SparseDist | None, ...]]:
    """Parses and checks a draft tree and its per-node q."""
    if len(msg.tokens) != len(msg.parents):
        raise BadRequest(f"tree has {len(msg.tokens)} tokens and {len(msg.parents)} parents; give one of each per node")
    if vocab_size is not None:
        check_token_ids(msg.tokens, vocab_size, "tree.tokens")
    try:
        tree = Tree(tuple(msg.tokens), tuple(msg.parents))
    except ValueError as err:
        raise BadRequest(f"tree: {err}") from None
    if msg.q and len(msg.q) != len(tree) + 1:
        raise BadRequest(f"tree.q has {len(msg.q)} entries; send N+1 = {len(tree) + 1} (root first) or none")
    q: list[SparseDist | None] = []
    for d in msg.q:
        q.append(dists_from_pb([d], vocab_size)[0] if d.ids else None)
    return tree, tuple(q)


def shape_to_pb(shape: TreeShape) -> pb.TreeShape:
    return pb.TreeShape(branching=shape.branching, budget=shape.budget)


def shape_from_pb(msg: pb.TreeShape) -> TreeShape:
    shape = TreeShape(tuple(msg.branching), msg.budget)
    problems = shape.problems()
    if problems:
        raise BadRequest("; ".join(problems))
    return shape


VOCAB_MODES = {"native": pb.VOCAB_NATIVE, "slem": pb.VOCAB_SLEM, "tli": pb.VOCAB_TLI}


def vocab_to_pb(mode: str) -> int:
    return VOCAB_MODES[mode]


def vocab_from_pb(value: int) -> str:
    for name, number in VOCAB_MODES.items():
        if number == value:
            return name
    raise BadRequest(f"unknown vocab mode {value}; known: {', '.join(f'{n}={v}' for n, v in VOCAB_MODES.items())}")


def strings_to_pb(proposals: Sequence[StringProposal]) -> list[pb.StringDraft]:
    out = []
    for p in proposals:
        candidates = list(p.q) if p.q else []
        out.append(pb.StringDraft(text=p.text, candidates=candidates, probs=[p.q[c] for c in candidates]))
    return out


def strings_from_pb(msgs: Sequence[pb.StringDraft], max_bytes: int = 256) -> tuple[StringProposal, ...]:
    """Parses and checks drafted strings: non-empty text, and candidates of its length whose
    probabilities form a distribution that gives the text itself a positive probability."""
    proposals = []
    for i, msg in enumerate(msgs):
        if not msg.text or len(msg.text) > max_bytes:
            raise BadRequest(f"draft[{i}].text must hold 1 to {max_bytes} bytes, got {len(msg.text)}")
        if len(msg.candidates) != len(msg.probs):
            raise BadRequest(f"draft[{i}] has {len(msg.candidates)} candidates and {len(msg.probs)} probs; give one of each")
        if not msg.candidates:
            proposals.append(StringProposal(bytes(msg.text), None))
            continue
        q = dict(zip((bytes(c) for c in msg.candidates), msg.probs))
        if len(q) != len(msg.candidates) or any(len(c) != len(msg.text) for c in q):
            raise BadRequest(f"draft[{i}].candidates must be distinct strings of {len(msg.text)} bytes, like its text")
        total = sum(q.values())
        distribution = all(math.isfinite(v) and v >= 0 for v in q.values()) and abs(total - 1) <= 1e-3
        if not distribution or not q.get(bytes(msg.text), 0.0) > 0:  # NaN fails every comparison
            raise BadRequest(f"draft[{i}]: probs must be a distribution (sum {total:.4f}) giving the text a positive probability")
        proposals.append(StringProposal(bytes(msg.text), q))
    return tuple(proposals)


def hidden_to_bytes(h: Tensor) -> bytes:
    """h (H,) as the wire carries it: float16, little-endian."""
    return h.to(torch.float16).contiguous().numpy().astype("<f2").tobytes()


def hidden_from_bytes(raw: bytes) -> Tensor:
    """(H,) float32 from hidden_to_bytes's bytes."""
    if len(raw) % 2:
        raise BadRequest(f"hidden has {len(raw)} bytes; it carries float16 values, 2 bytes each")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32))
