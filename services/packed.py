"""One forward pass over the new tokens of several sessions (the torch runtime's batching).

A verify or `ar` call feeds a session a few tokens after its cached context. Decoding is
bound by reading the weights, so the linear layers (nearly all of a pass) cost about the
same for the few tokens of one session as for the tokens of sixteen: the tokens of every
session in a batch are packed into one (1, T) sequence for the embedding, the norms, the
linears and the LM head, and only attention is done per session, over that session's own
KV cache (a transformers DynamicCache it keeps between calls, as an unbatched pass does).
No padding, no copy of any cache.

A session's part may be a draft tree (a staged verify): its tokens carry their depth-based
positions and a tree attention mask, as an unbatched tree pass does.

Each row comes out as an unbatched pass would give it:
- the int8 linears (services/int8.py) and the norms compute every row by itself;
- attention is services/int8.rowwise_attention, row by row over the row's own keys, as the
  int8 model's unbatched passes do;
- rotary position embeddings are computed per session, over exactly the positions an
  unbatched pass computes them for (their cos and sin may round by one ulp differently over
  a different number of positions).
So on the int8 model a session's logits are bitwise those of an unbatched pass
(tests/test_packed.py); on fp32 and bf16 they differ by float rounding (attention there is
SDPA over all rows when unbatched), within the runtime's near-tie bound.

Supported: decoder-only models laid out as Llama's (Llama, Mistral, Qwen2, Qwen3): pre-norm
layers, q/k/v/o projections, rotary embeddings, no sliding window. `packable` says whether a
model is; the runtime passes sessions one by one otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.int8 import rowwise_attention

LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Segment:
    """One session's part of a packed pass: `tokens` fed after `start` cached positions of
    `cache`, and the logits of its last `n_last` tokens wanted. A draft tree's segment gives
    its tokens' positions (depth-based) and which cached and fed entries each may attend to
    (services/tree.attention_bias); a chain's attend causally from start on."""

    cache: object  # a transformers DynamicCache holding exactly `start` positions
    start: int
    tokens: list[int]
    n_last: int
    positions: torch.Tensor | None = None  # (len(tokens),) position ids; None: start, start + 1, ...
    mask: torch.Tensor | None = None  # (len(tokens), start + len(tokens)): bool, or additive (0 = attend)


def packable(model: torch.nn.Module) -> bool:
    """Whether packed_forward can run this transformers causal LM."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or getattr(config, "model_type", "") not in LAYOUTS:
        return False
    if getattr(inner, "has_sliding_layers", False) or getattr(config, "use_sliding_window", False):
        return False
    return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


@torch.inference_mode()
def packed_forward(model: torch.nn.Module, segments: Sequence[Segment]) -> list[torch.Tensor]:
    """One pass over every segment's tokens; each segment's cache extended by its tokens, and
    per segment its logits (n_last, V) in the model's dtype."""
    inner = model.model
    device = next(model.parameters()).device
    bounds: list[tuple[int, int]] = []
    fed: list[int] = []
    for seg in segments:
        if not 1 <= seg.n_last <= len(seg.tokens):
            raise ValueError(f"need 1 <= n_last <= {len(seg.tokens)}, got {seg.n_last}")
        bounds.append((len(fed), len(fed) + len(seg.tokens)))
        fed += seg.tokens
    hidden = inner.embed_tokens(torch.tensor([fed], dtype=torch.long, device=device))  # (1, T, H)
    rotary = [
        inner.rotary_emb(hidden[:, a:b], _positions(seg, device)[None]) for seg, (a, b) in zip(segments, bounds)
    ]  # per segment: cos, sin (1, t, D)
    for layer in inner.layers[: model.config.num_hidden_layers]:
        residual = hidden
        attended = _attention(layer.self_attn, layer.input_layernorm(hidden), segments, bounds, rotary)
        hidden = residual + attended
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    wanted = torch.tensor([i for (a, b), seg in zip(bounds, segments) for i in range(b - seg.n_last, b)], device=device)
    logits = model.lm_head(inner.norm(hidden.index_select(1, wanted)))[0]  # (sum n_last, V)
    return list(logits.split([seg.n_last for seg in segments]))


def _attention(
    attn: torch.nn.Module,
    x: torch.Tensor,
    segments: Sequence[Segment],
    bounds: list[tuple[int, int]],
    rotary: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The layer's self-attention over the packed x (1, T, H): projections over every row at
    once, rotary and attention per segment, each segment's keys and values appended to its cache."""
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    shape = (1, x.shape[1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape).transpose(1, 2)  # (1, KV, T, D)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (1, heads, T, D)
    out = x.new_empty(1, x.shape[1], q.shape[1], attn.head_dim)  # (1, T, heads, D)
    for seg, (a, b), (cos, sin) in zip(segments, bounds, rotary):
        q_seg, k_seg = rope(q[:, :, a:b], k[:, :, a:b], cos, sin)
        keys, values = seg.cache.update(k_seg, v[:, :, a:b], attn.layer_idx)
        mask = None if seg.mask is None else seg.mask[None, None]  # (1, 1, t, S)
        out[:, a:b], _ = rowwise_attention(attn, q_seg, keys, values, mask, scaling=attn.scaling)
    return attn.o_proj(out.reshape(1, x.shape[1], -1))


def _positions(seg: Segment, device: torch.device) -> torch.Tensor:
    if seg.positions is not None:
        return seg.positions.to(device)
    return torch.arange(seg.start, seg.start + len(seg.tokens), device=device)
