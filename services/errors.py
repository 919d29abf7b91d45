"""The errors a model service's core raises, and the input checks that raise them.

The cores (drafter_svc/core.py, verifier_svc/core.py) check their inputs with these and
never with `assert` (checks must survive `python -O`); the servicers map each error to one
gRPC status code, in one place (services/hosting.py).

Pure: standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence


class BadRequest(ValueError):
    """Input the caller must fix: INVALID_ARGUMENT, with this message."""


class Unsupported(RuntimeError):
    """A call this service cannot serve as configured (a drafter of another vocabulary asked
    to review, the max-gram drafter asked for a tree): FAILED_PRECONDITION, naming the way out."""


class Busy(RuntimeError):
    """The service's queue is full (SPECD_MAX_QUEUE calls wait already): RESOURCE_EXHAUSTED,
    with a hint of when to try again rather than an ever longer wait."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ContextMiss(LookupError):
    """The service does not hold the prefix a context delta claims: the caller resends the
    whole context (services/context.py). Not an error to the caller: a reply with context_miss."""


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise BadRequest(f"{what} has ids outside [0, {vocab_size}): {bad[:5]}")


def check_draft_length(n: int, limit: int, what: str = "a draft") -> None:
    if n > limit:
        raise BadRequest(f"{what} of {n} is above this service's limit of {limit} (SPECD_MAX_DRAFT)")


def check_chain(draft: Sequence[int], q: Sequence, vocab_size: int, limit: int) -> None:
    """A chain draft and its q (one sparse distribution per token, or none), as a reviewing
    drafter or the verifier takes them."""
    check_token_ids(draft, vocab_size, "draft")
    check_draft_length(len(draft), limit)
    if q and len(q) != len(draft):
        raise BadRequest(f"q has {len(q)} entries for {len(draft)} draft tokens; send one per token or none")
    for i, q_i in enumerate(q):
        check_token_ids(q_i.ids.tolist(), vocab_size, f"q[{i}].ids")
