"""Target sampling distribution p, draft proposal distributions q, and replayable randomness.

Pure: imports torch and the standard library only. `target_probs` is the single place that
turns logits into p, so plain decoding (`ar`) and every speculative strategy sample from
the same distribution, which is what "lossless" is measured against.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor


MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4


@dataclass(frozen=True)
class SamplingParams:
    """How the target samples; the same fields and semantics as transformers' warpers.
    A temperature below MIN_TEMPERATURE would turn the scaled logits into infinities (a
    denormal divides them past float32's range); one that small samples the argmax anyway."""

    temperature: float = 0.0  # 0 means greedy (argmax); otherwise logits are divided by it
    top_k: int = 0  # keep the k largest logits (ties at the boundary kept); 0 disables
    top_p: float = 1.0  # keep the smallest set reaching this cumulative probability; 1 disables

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def problems(self) -> list[str]:
        """Human-readable reasons these params are invalid; empty when valid."""
        found = []
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):  # also NaN
            found.append(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {self.temperature}"
            )
        if self.top_k < 0:
            found.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            found.append(f"top_p must be in (0, 1], got {self.top_p}")
        return found


def _top_k(scores: Tensor, top_k: int) -> Tensor:
    """transformers' TopKLogitsWarper: drops scores below the k-th largest, so ties survive."""
    kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]  # (..., 1)
    return scores.masked_fill(scores < kth, -math.inf)


def _top_p(scores: Tensor, top_p: float) -> Tensor:
    """transformers' TopPLogitsWarper, op for op, so ties at the boundary break the same way.

    Sorted ascending, a token is dropped while the mass below and including it is <= 1 - top_p;
    what remains is the smallest set whose mass reaches top_p, and never less than one token.
    """
    sorted_scores, sorted_ids = torch.sort(scores, descending=False)  # (..., V) each
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_drop = cumulative <= 1 - top_p
    sorted_drop[..., -1:] = False
    drop = sorted_drop.scatter(-1, sorted_ids, sorted_drop)
    return scores.masked_fill(drop, -math.inf)


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """p: logits (..., V) -> probabilities (..., V); float64 stays float64, all else is float32.

    Temperature, then top-k, then top-p, in the order transformers applies them. Greedy
    returns a one-hot at torch.argmax (the first index on ties) so that the sampled
    acceptance rule, given this p, reproduces greedy decoding exactly.
    """
    assert logits.is_floating_point() and logits.dim() >= 1, f"logits must be float (..., V), got {logits.dtype}"
    assert not params.problems(), f"invalid sampling params: {params.problems()}"
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scores = logits.to(dtype)  # (..., V)
    if params.greedy:
        return torch.nn.functional.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(dtype)
    scores = scores / params.temperature
    if params.top_k > 0:
        scores = _top_k(scores, params.top_k)
    if params.top_p < 1:
        scores = _top_p(scores, params.top_p)
    return scores.softmax(dim=-1)


def sample(probs: Tensor, generator: torch.Generator) -> int:
    """One token id drawn from probs (V,); the generator makes the draw replayable."""
    assert probs.dim() == 1, f"probs must be (V,), got {tuple(probs.shape)}"
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare
class SparseDist:
    """A distribution over the vocabulary that is zero outside `ids`: how q travels on the wire."""

    ids: Tensor  # (m,) int64, unique token ids
    probs: Tensor  # (m,) float32, sums to 1

    def __post_init__(self) -> None:
        assert self.ids.dtype == torch.int64 and self.probs.dtype == torch.float32, (
            f"ids must be int64 and probs float32, got {self.ids.dtype} and {self.probs.dtype}"
        )
        assert self.ids.dim() == 1 and self.ids.shape == self.probs.shape and self.ids.numel() > 0, (
            f"ids and probs must be non-empty (m,), got {tuple(self.ids.shape)} and {tuple(self.probs.shape)}"
        )
        assert self.ids.unique().numel() == self.ids.numel(), "ids must be unique"
        assert bool((self.probs >= 0).all()), "probs must be >= 0"
        total = float(self.probs.double().sum())
        assert abs(total - 1) <= 1e-4, f"probs must sum to 1, got {total}"

    @classmethod
    def point(cls, token: int) -> SparseDist:
        """All mass on one token: the q of a greedy or statistical drafter."""
        return cls(torch.tensor([token], dtype=torch.int64), torch.ones(1, dtype=torch.float32))

    def dense(self, vocab_size: int) -> Tensor:
        """The same distribution as a (V,) float32 tensor."""
        assert int(self.ids.max()) < vocab_size, f"token {int(self.ids.max())} outside a vocabulary of {vocab_size}"
        out = torch.zeros(vocab_size, dtype=torch.float32)  # (V,)
        out[self.ids] = self.probs
        return out

    def prob(self, token: int) -> float:
        hit = (self.ids == token).nonzero()  # (0 or 1, 1)
        return float(self.probs[hit[0, 0]]) if hit.numel() else 0.0

    def sample(self, generator: torch.Generator) -> int:
        """A token drawn from exactly this distribution, as a drafter must do before sending it."""
        return int(self.ids[sample(self.probs, generator)])


def truncated(probs: Tensor, top: int) -> SparseDist:
    """The `top` most likely entries of probs (V,), zeros dropped, renormalised.

    A drafter samples from this and sends it as q. Rejection sampling is exact for any q
    the draft was really drawn from, so truncating q costs acceptance rate, never correctness.
    """
    assert probs.dim() == 1 and top >= 1, f"need probs (V,) and top >= 1, got {tuple(probs.shape)}, {top}"
    values, ids = torch.topk(probs, min(top, probs.numel()))  # (top,) each, descending
    keep = values > 0
    values, ids = values[keep].double(), ids[keep]
    assert ids.numel() > 0, "probs has no positive entry"
    return SparseDist(ids=ids.to(torch.int64), probs=(values / values.sum()).to(torch.float32))


def round_seed(seed: int, step: int, role: str) -> int:
    """The 63-bit seed of one call of one round: (session seed, round step, role "draft" or
    "verify"). It travels in the call, and the service seeds a generator with it, so a round
    replays exactly on any replica.

    blake2b rather than hash(): Python salts str hashes per process.
    """
    digest = hashlib.blake2b(f"{seed}\x00{step}\x00{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for a call's random draws."""
    return torch.Generator(device="cpu").manual_seed(seed)
