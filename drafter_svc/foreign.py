"""Drafting with a tokenizer other than the target's (Timor et al. 2025, "Accelerating LLM
Inference with Lossless Speculative Decoding Algorithms for Heterogeneous Vocabularies").

Calls keep speaking the target's ids: the context arrives in target ids (deltas and
fingerprints work as for any drafter), is turned into text and re-tokenized for this
drafter (services/vocab.TextBridge), and what the drafter proposes goes back out as target
ids or as text. The KV cache is keyed by the drafter's own ids, so the longest-common-prefix
reuse of services/runtime.py works across rounds as usual.

Three ways out, one per strategy:
- slem (string-level exact match): the drafted text re-tokenized by the target's tokenizer.
  No q (point masses): the verifier accepts a token exactly when the target would have
  produced it (greedy) or with probability p(token) (sampling), which is lossless for any
  draft drawn independently of the verifier's coins.
- tli (token-level intersection): the drafter draws only tokens whose bytes are also one
  target token, from its distribution restricted to those tokens and renormalised; the
  token and that q are mapped to target ids, so standard rejection sampling is exact.
- slrs (string-level rejection sampling): each drafted token as bytes with the drafter's
  distribution over strings of the same length (services/slrs.py has the scheme and proof).

When the target's context ends in the middle of a UTF-8 character (a byte-fallback token),
the drafter cannot see that character as text: it proposes nothing and the round is a
plain target step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from drafter_svc.draft import Proposal, own_distribution
from services.runtime import ModelInfo, Runtime, tokenizer_fingerprint
from services.sampling import SamplingParams, SparseDist, target_probs, truncated
from services.slrs import StringProposal
from services.vocab import TextBridge, VocabMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Translation:
    """What a drafter needs to draft for a target with another vocabulary."""

    bridge: TextBridge
    vocab_map: VocabMap
    drafter_bytes: list[bytes | None]  # by drafter id; None = special token
    target_bytes: list[bytes | None]  # by target id
    shared: torch.Tensor  # (V_drafter,) bool: drafter ids with a target twin
    target_rows: int  # the target's vocabulary size: the range of ids on the wire
    target_fingerprint: str

    @classmethod
    def build(cls, drafter_tokenizer, target_tokenizer, drafter_rows: int, target_rows: int, cache_dir: Path) -> Translation:
        started = time.perf_counter()
        vocab_map = VocabMap.load_or_build(
            drafter_tokenizer, target_tokenizer, cache_dir, drafter_size=drafter_rows, target_size=target_rows
        )
        bridge = TextBridge(drafter_tokenizer, target_tokenizer, drafter_rows, target_rows)
        translation = cls(
            bridge=bridge,
            vocab_map=vocab_map,
            drafter_bytes=bridge.drafter_token_bytes,
            target_bytes=bridge.target_token_bytes,
            shared=vocab_map.drafter_to_target >= 0,
            target_rows=target_rows,
            target_fingerprint=tokenizer_fingerprint(target_tokenizer),
        )
        log.info(
            "translating to the target's vocabulary (%d tokens, %d shared with this drafter's %d) in %.1fs",
            target_rows, vocab_map.shared, drafter_rows, time.perf_counter() - started,
        )
        return translation

    def wire_info(self, own: ModelInfo) -> ModelInfo:
        """The drafter's ModelInfo as callers see it: its own vocabulary, speaking the target's."""
        return dataclasses.replace(
            own, wire_tokenizer_fingerprint=self.target_fingerprint, shared_tokens=self.vocab_map.shared
        )


def drafter_ids(translation: Translation | None, context: list[int]) -> list[int]:
    """The context in the drafter's own ids: empty when it cannot be drafted after (a context
    ending mid-character); translation None: a drafter of the target's own vocabulary."""
    if translation is None:
        return list(context)
    ids, pending = translation.bridge.drafter_context(context)
    return [] if pending else ids


def _next_token(
    logits: torch.Tensor, params: SamplingParams, q_top: int, generator: torch.Generator, allowed: torch.Tensor | None
) -> tuple[int, SparseDist | None] | None:
    """One drafter token and the q it was drawn from (None when greedy), drawn only from
    `allowed` ids when given; None when no allowed token has any probability."""
    if params.greedy:
        masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
        return int(torch.argmax(masked)), None
    if allowed is None:
        q = own_distribution(logits, params, q_top)
    else:
        probs = target_probs(logits, params) * allowed  # (V,)
        if not float(probs.sum()) > 0:
            return None
        q = truncated(probs, q_top)
    return q.sample(generator), q


def propose_slem(
    runtime: Runtime,
    translation: Translation,
    session_id: str,
    context: list[int],
    k: int,
    params: SamplingParams,
    q_top: int,
    generator: torch.Generator,
) -> Proposal:
    """Up to k drafter tokens, as text re-tokenized for the target (q empty: point masses)."""
    seq = drafter_ids(translation, context)
    if not seq:
        return Proposal((), ())
    text = b""
    ending: list[int] = []  # a drafted special token with a target twin (an end of turn)
    for _ in range(k):
        token, _q = _next_token(runtime.logits(session_id, seq, 1)[0], params, q_top, generator, None)
        piece = translation.drafter_bytes[token]
        if piece is None:
            twin = int(translation.vocab_map.drafter_to_target[token])
            ending = [twin] if twin >= 0 else []
            break
        text += piece
        seq.append(token)
    tokens = translation.bridge.draft_to_target(context, text) if text else []
    if ending and b"".join(translation.target_bytes[t] or b"" for t in tokens) == text:
        tokens.append(ending[0])  # only after the whole text: a cut-off tail would misplace it
    return Proposal(tuple(tokens), ())


def propose_tli(
    runtime: Runtime,
    translation: Translation,
    session_id: str,
    context: list[int],
    k: int,
    params: SamplingParams,
    q_top: int,
    generator: torch.Generator,
) -> Proposal:
    """Up to k tokens drawn from the drafter's distribution restricted to the tokens both
    vocabularies share, with that q, in target ids. Stops after a special token."""
    seq = drafter_ids(translation, context)
    tokens: list[int] = []
    qs: list[SparseDist] = []
    to_target = translation.vocab_map.drafter_to_target
    while seq and len(tokens) < k:
        drawn = _next_token(runtime.logits(session_id, seq, 1)[0], params, q_top, generator, translation.shared)
        if drawn is None:
            break
        token, q = drawn
        tokens.append(int(to_target[token]))
        if q is not None:
            qs.append(SparseDist(to_target[q.ids], q.probs))
        if translation.drafter_bytes[token] is None:
            break
        seq.append(token)
    return Proposal(tuple(tokens), tuple(qs))


def propose_strings(
    runtime: Runtime,
    translation: Translation | None,
    own_bytes: Sequence[bytes | None],
    session_id: str,
    context: list[int],
    k: int,
    params: SamplingParams,
    q_top: int,
    generator: torch.Generator,
) -> list[StringProposal]:
    """Up to k drafter tokens as text, each with the drafter's distribution over strings of
    its byte length (slrs). Stops before a special token.

    The distribution: q truncated to its top entries (what the token is drawn from), restricted
    to tokens of the drawn token's byte length, summed over tokens with equal bytes, and
    renormalised. Given that length (drawn with the token, independently of the verifier),
    the text is distributed exactly so. translation None: a drafter of the target's own vocabulary.
    """
    seq = drafter_ids(translation, context)
    proposals: list[StringProposal] = []
    while seq and len(proposals) < k:
        token, q = _next_token(runtime.logits(session_id, seq, 1)[0], params, q_top, generator, None)
        text = own_bytes[token]
        if not text:
            break
        proposals.append(StringProposal(text, None if q is None else _same_length(q, own_bytes, len(text))))
        seq.append(token)
    return proposals


def _same_length(q: SparseDist, own_bytes: Sequence[bytes | None], length: int) -> dict[bytes, float]:
    """q over strings: the mass of tokens of `length` bytes, by their bytes, renormalised."""
    mass: dict[bytes, float] = {}
    for token, prob in zip(q.ids.tolist(), q.probs.double().tolist()):
        text = own_bytes[token]
        if text is not None and len(text) == length and prob > 0:
            mass[text] = mass.get(text, 0.0) + prob
    total = sum(mass.values())
    return {text: prob / total for text, prob in mass.items()}
