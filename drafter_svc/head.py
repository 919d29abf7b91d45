"""A drafter service that hosts a trained draft head instead of a model: recurrent (strategy
redrafter) or parallel (strategy parallel).

The head (services/redrafter.py) drafts from the target's hidden state, which each call
carries, so it holds no session and no cache: any replica serves any round. It reads the
target's token embedding E and LM head O, loaded from the target's folder and quantized to
int8 rows (services/int8.py): for the 1.5B target 2 x 151,936 x 1,536 weights, 0.47 GB
instead of 1.9 GB in float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from services.errors import BadRequest, Unsupported, check_draft_length
from services.int8 import choose_kernel
from services.redrafter import Head, LmHeadGroups, Manifest, ParallelHead, beams_to_tree, load_head
from services.roles import Stopwatch, TreeDraft
from services.runtime import HEAD_RUNTIME, ModelInfo, gguf_file, has_torch_weights, settle_memory, weights_id
from services.sessions import SessionContexts
from services.worker import Worker

log = logging.getLogger(__name__)


def target_tables(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's token embedding E and LM head O, (V, H) float32 each (one tensor twice
    when they are tied): from its safetensors weights, else dequantized from its GGUF."""
    if has_torch_weights(folder):
        return _safetensors_tables(folder)
    gguf = gguf_file(folder)
    if gguf is None:
        raise FileNotFoundError(f"{folder} holds neither safetensors weights nor a GGUF file")
    import gguf as gguf_lib

    found = {}
    for tensor in gguf_lib.GGUFReader(gguf).tensors:
        if tensor.name in ("token_embd.weight", "output.weight"):
            found[tensor.name] = torch.from_numpy(gguf_lib.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    embed = found["token_embd.weight"]
    return embed, found.get("output.weight", embed)


def _safetensors_tables(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else None

    def read(name: str) -> torch.Tensor | None:
        file = folder / (files.get(name, "") if files is not None else "model.safetensors")
        if not file.is_file():
            return None
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(name).float() if name in f.keys() else None

    embed = read("model.embed_tokens.weight")
    if embed is None:
        raise FileNotFoundError(f"{folder}'s weights hold no model.embed_tokens.weight")
    out = read("lm_head.weight")
    return embed, out if out is not None else embed


def int8_tables(
    embed: torch.Tensor, out: torch.Tensor, groups: LmHeadGroups | None = None, kernel: str = "auto"
) -> tuple[nn.Module, nn.Module]:
    """E as an int8 embedding and O as an int8 linear layer (row-wise scales) on `kernel`
    (services/int8.choose_kernel), or, for a head with LM-head groups, as a GroupedLmHead."""
    from services.int8 import Int8Embedding, Int8Linear, quantize_rows

    q, scale = quantize_rows(embed)
    q_out, scale_out = (q, scale) if out is embed else quantize_rows(out)
    lm_head = (
        Int8Linear.from_quantized(q_out, scale_out, None, kernel)
        if groups is None
        else GroupedLmHead(q_out, scale_out, groups, kernel)
    )
    return Int8Embedding(q, scale, None), lm_head


class GroupedLmHead(nn.Module):
    """O computed only for the rows of the groups a step's router picks (CORAL's LM-head
    grouping, services/redrafter.LmHeadGroups): each group's int8 rows packed as a layer of
    their own, and every other row's logit -inf.

    Rows are computed for the union of the groups the beams' routers pick, so every beam
    sees the same rows (one call per group, not per beam and group). With 256 groups, 4
    active, a step computes ~3,300 of the 1.5B target's 151,936 rows."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, groups: LmHeadGroups, kernel: str = "auto") -> None:
        from services.int8 import Int8Linear

        super().__init__()
        self.groups = groups
        self.vocab_size = q.shape[0]
        order = torch.argsort(groups.group_of, stable=True)  # vocabulary ids, group by group
        sizes = torch.bincount(groups.group_of, minlength=groups.count).tolist()
        self.ids = list(torch.split(order, sizes))  # group g's ids
        self.parts = [
            Int8Linear.from_quantized(q[ids], scale[ids], None, kernel) if len(ids) else None for ids in self.ids
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, V)
        logits = x.new_full((x.shape[0], self.vocab_size), -torch.inf, dtype=torch.float32)
        for g in torch.unique(self.groups.active_groups(x)).tolist():
            if self.parts[g] is not None:
                logits[:, self.ids[g]] = self.parts[g](x)
        return logits


class HeadDrafter:
    """The Drafter core of a service started with SPECD_MODEL naming a trained head's folder."""

    def __init__(
        self,
        head: Head,
        manifest: Manifest,
        embed: nn.Module,
        lm_head: nn.Module,
        *,
        name: str,
        max_draft: int = 64,
        worker: Worker | None = None,
    ) -> None:
        self.head = head
        self.manifest = manifest
        self.embed = embed
        self.lm_head = lm_head
        self.max_draft = max_draft  # the most tree nodes a call may ask for
        self.worker = worker or Worker("drafter")
        self.contexts = SessionContexts(1)  # none is ever held: a call carries all the head reads
        self.queued = 0
        target = manifest.target
        self._info = ModelInfo(
            # dtype: the head's kind (redrafter, parallel), which the orchestrator matches to the strategy
            model=name, vocab_size=target.vocab_size, max_context=1 << 30, eos_token_ids=(), dtype=manifest.kind,
            device="cpu", tokenizer_fingerprint=target.tokenizer_fingerprint, runtime=HEAD_RUNTIME,
            weights=target.weights,
        )  # fmt: skip

    async def info(self) -> ModelInfo:
        return self._info

    async def release(self, session_id: str) -> bool:
        return False

    async def propose_beams(
        self, session_id: str, hidden: torch.Tensor, last_token: int, width: int, depth: int
    ) -> TreeDraft:
        """The prefix tree of the head's `width` best drafts of `depth` tokens after last_token,
        drafted from the target's hidden state (the head's own `draft`: a recurrent head's beam
        search, one step a token; a parallel head's one pass, at most its trained depth)."""
        H, V = self.head.config.hidden_size, self._info.vocab_size
        if hidden.shape != (H,):
            raise BadRequest(f"hidden has {hidden.numel()} values; this head reads the target's {H}")
        if not bool(torch.isfinite(hidden).all()):
            raise BadRequest("hidden holds values that are not finite")
        if not 0 <= last_token < V:
            raise BadRequest(f"last_token {last_token} is outside [0, {V})")
        if width < 1 or depth < 1:
            raise BadRequest(f"width and depth must be >= 1, got {width} and {depth}")
        check_draft_length(width * depth, self.max_draft, "a beam tree of width x depth nodes")

        def work() -> TreeDraft:
            watch = Stopwatch()
            beams = self.head.draft(self.embed, self.lm_head, hidden, last_token, width, depth)
            tree = beams_to_tree([b.tokens for b in beams])
            passes = 1 if isinstance(self.head, ParallelHead) else depth
            return TreeDraft(tree, (), passes, watch.local_cost())

        self.queued += 1
        try:
            return await self.worker.run(work)
        finally:
            self.queued -= 1

    async def propose(self, *args, **kwargs):
        raise Unsupported(self._only_beams())

    async def review(self, *args, **kwargs):
        raise Unsupported(self._only_beams())

    async def propose_tree(self, *args, **kwargs):
        raise Unsupported(self._only_beams())

    async def propose_strings(self, *args, **kwargs):
        raise Unsupported(self._only_beams())

    def _only_beams(self) -> str:
        return (
            f"this drafter hosts a trained {self.manifest.kind} head ({self._info.model}); "
            f"it drafts for the strategy {self.manifest.kind} only"
        )


def load_head_drafter(
    folder: Path, home: Path, *, max_draft: int, worker: Worker, int8_kernel: str = "auto", huge_pages: bool = True
) -> HeadDrafter:
    """A trained head and its target's tables (int8, on `int8_kernel`), checked against the
    target it was trained for."""
    from services.models import resolve

    watch = Stopwatch()
    head, manifest = load_head(folder)
    trained_on = Path(manifest.target.folder) if manifest.target.folder else None
    target_dir = trained_on if trained_on is not None and trained_on.is_dir() else resolve(manifest.target.model, home)
    found = weights_id(target_dir)
    if found != manifest.target.weights:
        raise ValueError(
            f"the head in {folder} was trained for {manifest.target.model} with weights {manifest.target.weights}, "
            f"but {target_dir} now holds {found}; train it again with `specd train {manifest.kind}`"
        )
    embed, lm_head = int8_tables(*target_tables(target_dir), head.groups, choose_kernel(int8_kernel, "drafter"))
    settle_memory(huge_pages)  # the float32 tables' pages back to the OS, the int8 ones in 2 MB pages
    log.info("loaded the %s head %s for %s in %.1fs", manifest.kind, folder, manifest.target.model, watch.seconds)
    return HeadDrafter(head, manifest, embed, lm_head, name=str(folder), max_draft=max_draft, worker=worker)
