"""A recurrent draft head (Cheng et al. 2024, "Recurrent Drafter for Fast Speculative Decoding
in Large Language Models", ReDrafter): drafting from the target's own last hidden state.

Vocabulary (the notation of services/acceptance.py): the context c_1..c_T was committed by
the target; its last token c_T came out of the target's LM head at position T-1, whose input
(the final norm's output) is h. The head drafts d_1..d_k after c_T from h alone, without
the target and without a model of its own over the context:

    s_0 = 0,  e_0 = E[c_T]                        E: the target's token embedding (frozen)
    s_j = silu(W e_{j-1} + U s_{j-1} + b)         the recurrence over what was drafted so far
    x_j = r_L(... r_1(P [h; s_j]))                r(x) = x + silu(R x): residual blocks
    q_j = softmax(O x_j)                          O: the target's LM head (frozen)
    d_j drawn from q_j, e_j = E[d_j]

Beam search over q (width b, depth k) gives b candidate drafts; their common prefixes are
merged into one prefix tree (`beams_to_tree`), which the verifier checks in one tree pass
(services/multidraft.py). The tree's children are chosen deterministically, so every node is
verified as a point mass: greedy output is the target's argmax path, sampled output exact by
recursive rejection sampling over point masses - lossless whatever the head drafts.

Worked example: beams (5, 7, 2), (5, 7, 9), (5, 3, 3) become

    node  token  parent  path
    0     5      -1      5
    1     7      0       5 7
    2     2      1       5 7 2
    3     9      1       5 7 9
    4     3      0       5 3
    5     3      4       5 3 3

A parallel head (`ParallelHead`, strategy `parallel`) drafts all k positions in one pass
from learned mask embeddings instead of a recurrence; it is served, verified and trained the
same way.

Deviations from the paper: the head's first step takes e_0 = E[c_T] with s_0 = 0 rather than
a learned start; the target's LM head is shared and frozen (the paper trains its own), which
keeps the head to a few million parameters and lets LM-head grouping (CORAL) cut its cost
later.

Pure: torch, safetensors and the standard library; the tables E and O are passed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from services.models import HEAD_MANIFEST
from services.tree import ROOT, Tree

MANIFEST = HEAD_MANIFEST  # what a trained head's folder holds, beside its weights
WEIGHTS = "head.safetensors"
KIND = "redrafter"
PARALLEL = "parallel"  # the kind of a ParallelHead


@dataclass(frozen=True)
class TargetId:
    """The target a head was trained for: it reads that model's hidden states and tables only."""

    model: str  # catalog name or folder, as given to `specd train`
    weights: str  # what its weights are (services/models.weights_id)
    tokenizer_fingerprint: str
    hidden_size: int
    vocab_size: int
    folder: str = ""  # where it was when the head was trained (tried first; else `model` is resolved)


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int  # H: the target's hidden size (h, E's rows and O's columns)
    # residual blocks after the projection of [h; s] (4 measured no better than 2, and
    # slower; a narrower head, d = 256 or 128 inside with x = h + Up z, learned less:
    # docs/trained-drafters.md)
    blocks: int = 2
    # CORAL's LM-head grouping (`LmHeadGroups`): the vocabulary in `groups` groups (0: none),
    # of which each step computes only the rows of the `active` groups its router ranks best
    groups: int = 0
    active: int = 0
    vocab_size: int = 0  # V: the rows of O the groups partition (0 without groups)
    depth: int = 0  # a parallel head's positions drafted in one pass (its mask embeddings); 0 for a recurrent head


@dataclass
class Manifest:
    """What `specd train` wrote, and how: read back by the drafter and `specd models list`."""

    kind: str
    target: TargetId
    config: HeadConfig
    seed: int
    data: dict = field(default_factory=dict)  # sources, tokens, positions, held-out split
    steps: int = 0
    loss: list[float] = field(default_factory=list)  # training loss, one entry per logged step
    held_out: dict = field(default_factory=dict)  # acceptance on held-out text by draft position
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            kind=raw["kind"], target=TargetId(**raw["target"]), config=HeadConfig(**raw["config"]), seed=raw["seed"],
            data=raw.get("data", {}), steps=raw.get("steps", 0), loss=raw.get("loss", []),
            held_out=raw.get("held_out", {}), seconds=raw.get("seconds", 0.0),
        )  # fmt: skip


class LmHeadGroups(nn.Module):
    """CORAL's LM-head weight grouping: the rows of O (one per vocabulary entry) partitioned
    into G groups, and a router that scores the groups from a step's features x, so that a
    step computes only the rows of its `active` best groups instead of all V.

    The groups are a spherical k-means over O's rows (`group_vocabulary`: tokens whose output
    rows point the same way share a group); the router starts as each group's mean row (x
    scores a group as it would score its average token) and is then trained on the head's own
    features against the target's label mass per group (specd/train.fit_groups). Exactness is not at
    stake: a draft from fewer rows is still verified by the target.
    """

    def __init__(self, hidden_size: int, vocab_size: int, count: int, active: int) -> None:
        super().__init__()
        self.active = active
        self.router = nn.Linear(hidden_size, count)  # (G, H)
        self.register_buffer("group_of", torch.zeros(vocab_size, dtype=torch.int64))  # (V,)

    @property
    def count(self) -> int:
        return self.router.out_features

    def active_groups(self, x: Tensor) -> Tensor:
        """(B, active) the best groups of each row of x (B, H)."""
        return self.router(x).topk(min(self.active, self.count), dim=-1).indices

    def mask(self, x: Tensor) -> Tensor:
        """(B, V) True at the vocabulary rows each row of x computes."""
        chosen = torch.zeros(x.shape[0], self.count, dtype=torch.bool).scatter_(1, self.active_groups(x), True)
        return chosen[:, self.group_of]


def group_vocabulary(out: Tensor, count: int, seed: int, iterations: int = 8, block: int = 16384) -> Tensor:
    """(V,) the group of each row of O (V, H): spherical k-means, seeded (rows compared by
    direction, `block` rows at a time; a group left empty keeps its centre)."""
    generator = torch.Generator().manual_seed(seed)
    norms = out.norm(dim=1).clamp_min(1e-12)  # (V,)
    picked = torch.randperm(out.shape[0], generator=generator)[:count]
    centres = out[picked].float() / norms[picked, None]  # (G, H): G distinct rows to start from
    group_of = torch.empty(out.shape[0], dtype=torch.int64)
    for _ in range(iterations):
        sums = torch.zeros_like(centres)
        for i in range(0, out.shape[0], block):
            rows = out[i : i + block].float() / norms[i : i + block, None]
            group_of[i : i + block] = (rows @ centres.T).argmax(dim=1)
            sums.index_add_(0, group_of[i : i + block], rows)
        length = sums.norm(dim=1, keepdim=True)
        centres = torch.where(length > 0, sums / length.clamp_min(1e-12), centres)
    return group_of


def group_means(out: Tensor, group_of: Tensor, count: int) -> Tensor:
    """(G, H) each group's mean row of O: the router's starting weights."""
    sums = torch.zeros(count, out.shape[1]).index_add_(0, group_of, out.float())
    return sums / torch.bincount(group_of, minlength=count).clamp_min(1)[:, None]


def residual_blocks(hidden_size: int, count: int) -> nn.ModuleList:
    """R_1..R_L of r(x) = x + silu(R x), each started near zero so that the blocks start near
    the identity and O first sees something like the projection of h."""
    blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(count))
    with torch.no_grad():
        for block in blocks:
            block.weight.mul_(0.1)
            block.bias.zero_()
    return blocks


class RecurrentHead(nn.Module):
    """The head's own parameters (W, U, b, P, R_1..R_L, and the LM-head groups' router when
    config.groups > 0); E and O are the target's, passed to each call."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.config = config
        self.rnn_w = nn.Linear(H, H)  # W, b
        self.rnn_u = nn.Linear(H, H, bias=False)  # U
        self.proj = nn.Linear(2 * H, H)  # P
        self.blocks = residual_blocks(H, config.blocks)  # R_1..R_L
        self.groups = LmHeadGroups(H, config.vocab_size, config.groups, config.active) if config.groups > 0 else None

    def step(self, h: Tensor, s: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """One recurrence step: (s_j, x_j) from h (B, H), s_{j-1} (B, H) and e_{j-1} (B, H)."""
        s = F.silu(self.rnn_w(e) + self.rnn_u(s))  # (B, H)
        x = self.proj(torch.cat([h, s], dim=-1))  # (B, H)
        for block in self.blocks:
            x = x + F.silu(block(x))
        return s, x

    def start(self, h: Tensor) -> Tensor:
        """s_0 for a batch of hidden states h (B, H): zeros."""
        return torch.zeros_like(h)

    def teacher_forced(self, h: Tensor, embed: Callable[[Tensor], Tensor], inputs: Tensor) -> Iterator[Tensor]:
        """x_1..x_k (each (B, H)) with the head reading the given tokens inputs (B, k) rather
        than its own drafts: what training and the held-out agreement walk."""
        s = self.start(h)
        for j in range(inputs.shape[1]):
            s, x = self.step(h, s, embed(inputs[:, j]))
            yield x

    def draft(
        self, embed: nn.Module, lm_head: nn.Module, h: Tensor, last_token: int, width: int, depth: int
    ) -> list[Beam]:
        """The `width` best drafts of `depth` tokens (`beam_search`)."""
        return beam_search(self, embed, lm_head, h, last_token, width, depth)


class ParallelHead(nn.Module):
    """A parallel drafter (Xiao et al. 2024, "ParallelSpec: Parallel Drafter for Efficient
    Speculative Decoding"): k positions drafted in one pass, from k learned mask embeddings.

    ParallelSpec appends k [MASK] tokens to the context of a small language model and reads
    its k next tokens off one forward pass. Here the context is the target's own hidden state
    h behind c_T (as the recurrent head reads it), so the drafter is a head, not a model over
    the context: each position j reads h, the last token's embedding and its mask m_j,

        x_j = r_L(... r_1(P [h; E[c_T] + m_j]))       j = 1..k, all in one batch
        q_j = softmax(O x_j)

    No position sees the tokens drafted before it (that is what makes it one pass); position
    j learns the target's distribution there marginalised over what comes between. Trained
    as the recurrent head is (`distill_loss`, through `teacher_forced`), groups and all.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        H = config.hidden_size
        if config.depth < 1:
            raise ValueError(f"a parallel head drafts >= 1 positions, got depth {config.depth}")
        self.config = config
        self.masks = nn.Parameter(0.02 * torch.randn(config.depth, H))  # m_1..m_k
        self.proj = nn.Linear(2 * H, H)  # P
        self.blocks = residual_blocks(H, config.blocks)  # R_1..R_L
        self.groups = LmHeadGroups(H, config.vocab_size, config.groups, config.active) if config.groups > 0 else None

    def features(self, h: Tensor, e: Tensor, depth: int) -> Tensor:
        """x_1..x_depth, (B, depth, H), from h (B, H) and E[c_T] (B, H), in one pass."""
        B, H = h.shape
        reads = e[:, None] + self.masks[None, :depth]  # (B, depth, H)
        x = self.proj(torch.cat([h[:, None].expand(B, depth, H), reads], dim=-1))  # (B, depth, H)
        for block in self.blocks:
            x = x + F.silu(block(x))
        return x

    def teacher_forced(self, h: Tensor, embed: Callable[[Tensor], Tensor], inputs: Tensor) -> Iterator[Tensor]:
        """x_1..x_k for inputs (B, k): only inputs[:, 0] (c_T) is read."""
        x = self.features(h, embed(inputs[:, 0]), min(inputs.shape[1], self.config.depth))
        yield from x.unbind(dim=1)

    @torch.inference_mode()
    def draft(
        self, embed: nn.Module, lm_head: nn.Module, h: Tensor, last_token: int, width: int, depth: int
    ) -> list[Beam]:
        """The `width` best drafts of min(depth, k) tokens by summed log q_j, from one pass."""
        depth = min(depth, self.config.depth)
        x = self.features(h.to(torch.float32)[None], embed(torch.tensor([last_token])), depth)[0]  # (depth, H)
        logq = torch.log_softmax(lm_head(x).float(), dim=-1)  # (depth, V)
        tokens, scores = torch.empty(1, 0, dtype=torch.int64), torch.zeros(1)
        for j in range(depth):
            tokens, scores, _ = _extend(tokens, scores, logq[j].expand(len(scores), -1), width)
        return [Beam(tuple(t.tolist()), float(score)) for t, score in zip(tokens, scores)]


Head = RecurrentHead | ParallelHead
HEADS: dict[str, type[Head]] = {KIND: RecurrentHead, PARALLEL: ParallelHead}  # by Manifest.kind


@dataclass(frozen=True)
class Beam:
    tokens: tuple[int, ...]
    logprob: float  # sum of log q_j(d_j) along the beam


@torch.inference_mode()
def beam_search(
    head: RecurrentHead, embed: nn.Module, lm_head: nn.Module, h: Tensor, last_token: int, width: int, depth: int
) -> list[Beam]:
    """The `width` most likely drafts of `depth` tokens under the head's q, best first.

    h: (H,) the target's hidden state that produced last_token (c_T). Each step extends every
    beam by every token and keeps the `width` best by summed log q (ties: the lower beam
    index, then the lower token id, as torch.topk orders them on CPU).
    """
    assert h.dim() == 1 and h.shape[0] == head.config.hidden_size, (
        f"h must be ({head.config.hidden_size},), got {tuple(h.shape)}"
    )
    assert width >= 1 and depth >= 1, f"width and depth must be >= 1, got {width}, {depth}"
    h = h.to(torch.float32)[None]  # (1, H)
    s = head.start(h)  # (1, H)
    e = embed(torch.tensor([last_token]))  # (1, H)
    tokens = torch.empty(1, 0, dtype=torch.int64)  # (beams, j)
    scores = torch.zeros(1)  # (beams,)
    for _ in range(depth):
        s, x = head.step(h.expand(s.shape[0], -1), s, e)
        logq = torch.log_softmax(lm_head(x).float(), dim=-1)  # (beams, V)
        tokens, scores, beam = _extend(tokens, scores, logq, width)
        s = s[beam]
        e = embed(tokens[:, -1])
    return [Beam(tuple(t.tolist()), float(score)) for t, score in zip(tokens, scores)]


def _extend(tokens: Tensor, scores: Tensor, logq: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """One beam-search step: every beam (tokens (b, j), scores (b,)) extended by every token
    under its log q (b, V), the `width` best kept: (tokens (w, j + 1), scores (w,), the beam
    each came from (w,))."""
    total = (scores[:, None] + logq).flatten()  # (b * V,)
    scores, flat = torch.topk(total, min(width, total.numel()))  # (w,) each
    beam, token = flat // logq.shape[1], flat % logq.shape[1]
    return torch.cat([tokens[beam], token[:, None]], dim=1), scores, beam


def beams_to_tree(beams: Sequence[Sequence[int]], budget: int | None = None) -> Tree:
    """The prefix tree of the beams (see the module's worked example): one node per distinct
    prefix, created in beam order, so a node's parent is always earlier and better beams'
    nodes come first among siblings. budget: the most nodes; a beam that would pass it is
    left out whole (the ones before it are kept)."""
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for beam in beams:
        new = [j for j in range(1, len(beam) + 1) if tuple(beam[:j]) not in index]
        if budget is not None and len(tokens) + len(new) > budget:
            continue
        for j in new:
            prefix = tuple(beam[:j])
            index[prefix] = len(tokens)
            tokens.append(prefix[-1])
            parents.append(index[prefix[:-1]] if j > 1 else ROOT)
    return Tree(tuple(tokens), tuple(parents))


def distill_loss(
    head: RecurrentHead,
    embed: Callable[[Tensor], Tensor],
    out_rows: Tensor,
    h: Tensor,
    inputs: Tensor,
    label_ids: Tensor,
    label_probs: Tensor,
    candidates: Tensor,
    aligned: Tensor | None = None,
    align: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The multi-step distillation loss of a batch, over a candidate subset of the vocabulary.

    h: (B, H) the target's hidden state at position t; inputs: (B, k) the tokens the head
    reads at steps 1..k (teacher forcing: x_{t+1}..x_{t+k}); label_ids / label_probs: (B, k, K)
    the target's top-K distribution at positions t+1..t+k (renormalised), what steps 1..k
    should draft; candidates: (C,) vocabulary ids whose rows of O (out_rows: (C, H)) the
    softmax runs over - every label id among them. A softmax over C rows instead of V keeps a
    step of training cheap on a CPU (sampled softmax); the random rows among the candidates
    push the rest of the vocabulary down.

    aligned: (B, k, H) the target's own hidden states H_{t+1}..H_{t+k}, whose LM-head outputs
    are the labels. With align > 0, each step's features x_j are also pulled towards H_{t+j}
    (smooth L1, weighted by align): CORAL's cross-step representation alignment ("Learning
    Consistent Representations across Multi-step Training with Lighter Speculative Drafter",
    2025; here towards the target's features, as EAGLE's regression), which gives every
    step the target's whole representation to learn from rather than K label
    probabilities, and keeps the steps' inputs to O alike (the head reuses one O for every
    step).

    Returns (loss, top-1 agreement per step (k,)): the soft cross-entropy summed over steps
    plus the weighted alignment term, averaged over the batch.
    """
    assert inputs.dim() == 2 and label_ids.shape[:2] == inputs.shape == label_probs.shape[:2], (
        f"inputs (B, k) and labels (B, k, K) must agree, got {tuple(inputs.shape)} and {tuple(label_ids.shape)}"
    )
    position = torch.full((int(candidates.max()) + 1,), -1, dtype=torch.int64)
    position[candidates] = torch.arange(candidates.numel())
    target_pos = position[label_ids]  # (B, k, K)
    assert bool((target_pos >= 0).all()), "every label id must be among the candidates"
    loss = h.new_zeros(())
    agree = []
    for j, x in enumerate(head.teacher_forced(h, embed, inputs)):
        logq = torch.log_softmax(x @ out_rows.T, dim=-1)  # (B, C)
        picked = logq.gather(1, target_pos[:, j])  # (B, K)
        loss = loss - (label_probs[:, j] * picked).sum(-1).mean()
        if aligned is not None and align > 0:
            loss = loss + align * F.smooth_l1_loss(x, aligned[:, j])
        agree.append((logq.argmax(-1) == target_pos[:, j, 0]).float().mean())
    return loss, torch.stack(agree)


def save_head(folder: Path, head: Head, manifest: Manifest) -> None:
    """Writes a trained head: its weights and its manifest, the manifest last (a folder with a
    manifest is complete)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous() for name, t in head.state_dict().items()}, folder / WEIGHTS)
    (folder / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")


def is_head(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def load_head(folder: Path) -> tuple[Head, Manifest]:
    from safetensors.torch import load_file

    if not is_head(folder):
        raise FileNotFoundError(f"{folder} holds no trained head ({MANIFEST}); train one with `specd train redrafter`")
    manifest = Manifest.from_json((folder / MANIFEST).read_text(encoding="utf-8"))
    if manifest.kind not in HEADS:
        raise ValueError(
            f"{folder} holds a {manifest.kind!r} drafter, not a head this version serves ({', '.join(HEADS)})"
        )
    head = HEADS[manifest.kind](manifest.config)
    head.load_state_dict(load_file(folder / WEIGHTS))
    return head.eval(), manifest
