"""Verification: one target pass over the draft, then the acceptance rule."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.acceptance import Verdict, accept
from services.context import ContextDelta, resolve_delta
from services.runtime import ModelHost
from services.sampling import SamplingParams, SparseDist


def verify(
    host: ModelHost,
    delta: ContextDelta,
    draft: Sequence[int],
    q: Sequence[SparseDist],
    params: SamplingParams,
    generator: torch.Generator,
) -> Verdict | None:
    """Verifies d_1..d_k after the context; None when the delta misses.

    The target runs once over context + draft (only the uncached suffix is fed) and
    yields p_1..p_{k+1}; the acceptance rule returns the n accepted tokens plus one
    more. An empty draft is a plain autoregressive step. The service then holds the
    context extended by the returned tokens, which is what the caller commits.
    """
    context = resolve_delta(host.held_context(delta.session_id), delta)
    if context is None:
        return None
    if not context:
        raise ValueError("the context is empty: verification needs at least one token to follow")
    logits = host.logits(delta.session_id, [*context, *draft], len(draft) + 1)  # (k+1, V)
    verdict = accept(list(draft), list(q), logits, params, generator)
    host.session(delta.session_id).context = [*context, *verdict.tokens]
    return verdict
