"""Drafting: propose k tokens, and when sampling the exact q each was drawn from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.context import ContextDelta, resolve_delta
from services.runtime import ModelHost
from services.sampling import SamplingParams, SparseDist, target_probs, truncated


@dataclass(frozen=True)
class Proposal:
    tokens: tuple[int, ...]  # d_1..d_k
    q: tuple[SparseDist, ...]  # one per token when sampling; empty when greedy (point masses)


def propose(
    host: ModelHost,
    delta: ContextDelta,
    k: int,
    params: SamplingParams,
    q_top: int,
    generator: torch.Generator,
) -> Proposal | None:
    """Drafts k tokens autoregressively after the context; None when the delta misses.

    When sampling, each token is drawn from its q truncated to the q_top most likely
    entries and renormalised, and that truncated q is what is returned: the verifier's
    rejection rule then uses exactly the distribution the token came from, which keeps it
    lossless, while the payload stays q_top pairs per token.
    """
    context = resolve_delta(host.held_context(delta.session_id), delta)
    if context is None:
        return None
    if not context:
        raise ValueError("the context is empty: a draft needs at least one token to follow")
    host.session(delta.session_id).context = context
    seq = list(context)
    tokens: list[int] = []
    qs: list[SparseDist] = []
    for _ in range(k):
        logits = host.logits(delta.session_id, seq, 1)[0]  # (V,)
        if params.greedy:
            token = int(torch.argmax(logits))
        else:
            q = truncated(target_probs(logits, params), q_top)
            token = q.sample(generator)
            qs.append(q)
        tokens.append(token)
        seq.append(token)
    return Proposal(tuple(tokens), tuple(qs))
