"""Acceptance rules: which draft tokens the target keeps, and the one token it adds.

Vocabulary, used the same way everywhere in specd (as in vLLM's rejection sampler):

- draft tokens d_1..d_k: proposed by a drafter, with proposal distributions q_1..q_k.
- p_1..p_{k+1}: the target's distributions at each draft position and one past the last.
- accepted tokens d_1..d_n: the longest prefix of the draft the rule keeps; n = accepted count.
- recovered token: on the first rejection (at position n+1), drawn from the residual
  normalize(max(0, p_{n+1} - q_{n+1})) in place of d_{n+1}.
- bonus token: when all k are accepted (n = k), drawn from p_{k+1} for free.

Every round therefore emits n + 1 tokens: d_1..d_n, then exactly one recovered or bonus token.

Worked example, k = 3, draft (5, 9, 2):

    target argmax   5  9  7  4      greedy: n = 2, tokens (5, 9, 7); 7 is recovered
    target argmax   5  9  2  4      greedy: n = 3, tokens (5, 9, 2, 4); 4 is the bonus
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from services.sampling import SamplingParams, SparseDist, sample, target_probs


@dataclass(frozen=True)
class Verdict:
    """The outcome of one round of verification."""

    accepted: int  # n: draft tokens kept
    tokens: tuple[int, ...]  # d_1..d_n then the recovered or bonus token; n + 1 entries
    draft_len: int  # k: draft tokens proposed

    def __post_init__(self) -> None:
        assert 0 <= self.accepted <= self.draft_len, f"accepted {self.accepted} outside [0, {self.draft_len}]"
        assert len(self.tokens) == self.accepted + 1, f"{self.accepted} accepted needs {self.accepted + 1} tokens"

    @property
    def bonus(self) -> bool:
        """Whether the last token is a bonus (all k accepted) rather than a recovered one."""
        return self.accepted == self.draft_len


def verify_greedy(draft: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """Accepts d_i while it equals the target's argmax; then emits the argmax where they part.

    draft: (k,); target_argmax: (k+1,), the argmax of p_1..p_{k+1}.
    """
    k = len(draft)
    assert len(target_argmax) == k + 1, f"target_argmax needs k+1 = {k + 1} entries, got {len(target_argmax)}"
    n = 0
    while n < k and draft[n] == target_argmax[n]:
        n += 1
    return Verdict(accepted=n, tokens=(*map(int, draft[:n]), int(target_argmax[n])), draft_len=k)


def _residual(p_i: Tensor, q_i: SparseDist | None, d_i: int) -> Tensor:
    """max(0, p_i - q_i), unnormalised: (V,) float64, what a rejection samples from.

    q_i None is a point mass at d_i, whose residual is p_i without d_i. Deviation from the
    papers: when the residual has ~no mass (p_i and q_i agree up to floating-point error) it
    falls back to p_i; a rejection then has about that same ~0 probability, which bounds the effect.
    """
    if q_i is None:
        residual = p_i.to(torch.float64, copy=True)  # (V,)
        residual[d_i] = 0
    else:
        residual = p_i.double().index_add(0, q_i.ids, q_i.probs.double(), alpha=-1).clamp_(min=0)  # (V,)
    return residual if float(residual.sum()) > 1e-9 else p_i.double()


def verify_sampled(
    draft: Sequence[int],
    q: Sequence[SparseDist | None],
    p: Tensor,
    generator: torch.Generator,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
    Speculative Decoding", Algorithm 1; Chen et al. 2023, "Accelerating Large Language Model
    Decoding with Speculative Sampling", Algorithm 2): the emitted tokens are distributed
    exactly as if sampled from p one at a time.

    For i = 1..k: draw r ~ U[0, 1); accept d_i iff r < min(1, p_i(d_i) / q_i(d_i)); on the
    first rejection sample the recovered token from normalize(max(0, p_i - q_i)) and stop.
    If all k are accepted, sample the bonus token from p_{k+1}.

    draft: (k,) token ids, each drawn from its q_i.
    q: k entries, or none at all meaning all point masses.
    p: (k+1, V) float, target probabilities from `target_probs`.

    Deviations from the papers:
    - q is sparse (a SparseDist, zero outside its ids), not a dense (V,) row.
    - q_i = None is a point mass at d_i, for greedy and statistical drafters that send no q:
      the acceptance ratio becomes p_i(d_i), and the residual is p_i with d_i removed.
    - an empty residual (floating-point agreement of p_i and q_i) falls back to p_i.
    """
    k = len(draft)
    assert p.dim() == 2 and p.shape[0] == k + 1, f"p must be (k+1, V) with k+1 = {k + 1}, got {tuple(p.shape)}"
    assert len(q) in (0, k), f"q must have 0 or k = {k} entries, got {len(q)}"
    assert all(0 <= d < p.shape[1] for d in draft), f"draft {list(draft)} has ids outside [0, {p.shape[1]})"
    for i, d_i in enumerate(draft):
        q_i = q[i] if q else None
        q_d = q_i.prob(d_i) if q_i is not None else 1.0
        assert q_d > 0, f"d_{i + 1} = {d_i} has q = 0: the draft was not sampled from the q sent with it"
        r = torch.rand((), generator=generator, dtype=torch.float64).item()
        if r < min(1.0, float(p[i, d_i]) / q_d):
            continue
        recovered = sample(_residual(p[i], q_i, d_i), generator)
        return Verdict(accepted=i, tokens=(*map(int, draft[:i]), recovered), draft_len=k)
    bonus = sample(p[k], generator)
    return Verdict(accepted=k, tokens=(*map(int, draft), bonus), draft_len=k)


def accept(
    draft: Sequence[int],
    q: Sequence[SparseDist | None],
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator,
) -> Verdict:
    """The verifier's one call: target logits (k+1, V) -> Verdict, greedy or sampled per params.

    Greedy consumes no randomness; sampled draws from p = target_probs(logits, params), the
    same p that plain decoding samples from.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(draft) + 1, (
        f"logits must be (k+1, V) with k+1 = {len(draft) + 1}, got {tuple(logits.shape)}"
    )
    assert not params.problems(), f"invalid sampling params: {params.problems()}"
    if params.greedy:
        return verify_greedy(draft, logits.argmax(dim=-1).tolist())
    return verify_sampled(draft, q, target_probs(logits, params), generator)
