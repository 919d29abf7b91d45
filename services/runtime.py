"""The model runtime: one causal LM and the KV caches of the sessions it serves.

A service keeps, per session, the context its caller has committed (to check context
deltas against) and a KV cache over some token sequence. Every forward pass asks for the
logits of the last positions of a sequence; the cache is cropped to its longest common
prefix with that sequence and only the rest is fed. Rolling back rejected draft tokens is
therefore not a separate operation: the next call simply shares a shorter prefix.

Caches are evicted least-recently-used. Losing one costs a re-prefill, never a wrong token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.context import common_prefix_len

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    model: str
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    device: str
    tokenizer_fingerprint: str


@dataclass
class SessionState:
    """What a service holds for one session."""

    context: list[int] = field(default_factory=list)  # committed tokens, as the caller sent them
    cache: object | None = None  # transformers Cache over cached_tokens
    cached_tokens: list[int] = field(default_factory=list)


class ModelHost:
    """Owns one model and its per-session state. Not thread-safe: call from one thread."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo, *, max_sessions: int) -> None:
        self.model = model
        self.info = info
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, SessionState] = OrderedDict()
        self.device = next(model.parameters()).device

    # -- sessions ---------------------------------------------------------------------

    def session(self, session_id: str) -> SessionState:
        """The state of a session, created empty on first use (evicting the oldest)."""
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = SessionState()
            while len(self._sessions) > self.max_sessions:
                evicted, _ = self._sessions.popitem(last=False)
                log.info("evicted session %s (LRU, max %d)", evicted, self.max_sessions)
        self._sessions.move_to_end(session_id)
        return state

    def held_context(self, session_id: str) -> list[int] | None:
        state = self._sessions.get(session_id)
        return None if state is None else state.context

    def release(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # -- forward ----------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, session_id: str, seq: Sequence[int], n_last: int) -> torch.Tensor:
        """Logits (n_last, V) that predict the tokens after each of the last n_last of seq.

        Row i is the model's distribution for position len(seq) - n_last + i + 1, given
        seq[: len(seq) - n_last + i + 1].
        """
        assert 1 <= n_last <= len(seq), f"need 1 <= n_last <= {len(seq)}, got {n_last}"
        seq = list(seq)
        state = self.session(session_id)
        # Reuse the cache up to the common prefix, but always feed the positions whose
        # logits are asked for.
        keep = min(common_prefix_len(state.cached_tokens, seq), len(seq) - n_last)
        if state.cache is None or keep == 0:
            state.cache = _new_cache(self.model)
            keep = 0
        elif keep < len(state.cached_tokens):
            state.cache.crop(keep - len(state.cached_tokens))  # a negative count drops that many
        fed = torch.tensor([list(seq[keep:])], dtype=torch.long, device=self.device)  # (1, T)
        out = self.model(input_ids=fed, past_key_values=state.cache, use_cache=True, logits_to_keep=n_last)
        state.cache = out.past_key_values
        state.cached_tokens = seq
        rows = out.logits[0, -n_last:]  # (n_last, V)
        return rows if rows.dtype in (torch.float32, torch.float64) else rows.float()


def _new_cache(model: torch.nn.Module) -> object:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token string -> id), to tell compatible tokenizers apart."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


class OneDNNLinear(torch.nn.Module):
    """nn.Linear on CPU through oneDNN, with the weight prepacked once.

    Why: on CPU, MKL's fp32 GEMM over 2-8 rows (a verify pass over a short draft) costs
    3-4x a one-row pass, which eats most of a speculative speedup; oneDNN runs the same
    5 rows for about 1.5x a one-row pass (measured on the 1.5B target, 2 threads).
    Results agree with nn.Linear to float rounding.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to_mkldnn())  # (out, in), oneDNN layout
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to_mkldnn())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return torch.ops.aten.mkldnn_linear(x.contiguous().to_mkldnn(), self.weight, self.bias).to_dense()


def use_onednn_linears(module: torch.nn.Module) -> int:
    """Replaces every nn.Linear below module by a OneDNNLinear; returns how many."""
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, OneDNNLinear(child))
            swapped += 1
        else:
            swapped += use_onednn_linears(child)
    return swapped


def load_host(
    path: Path, *, dtype: str, device: str, max_sessions: int, threads: int = 0, onednn: bool = True
) -> ModelHost:
    """Loads a Hugging Face model folder into a ModelHost.

    onednn: on CPU in float32, run the linear layers through oneDNN (see use_onednn_linears).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = ModelInfo(
        model=str(path),
        vocab_size=model.get_output_embeddings().weight.shape[0],
        max_context=int(getattr(model.config, "max_position_embeddings", 0) or 0),
        eos_token_ids=eos_token_ids(path, tokenizer),
        dtype=dtype,
        device=device,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    kernels = "torch"
    if onednn and device == "cpu" and dtype == "float32" and torch.backends.mkldnn.is_available():
        use_onednn_linears(model)
        kernels = "oneDNN"
    log.info(
        "loaded %s in %.1fs (vocab %d, context %d, %s on %s, %s linears, %d threads)",
        path, time.perf_counter() - started, info.vocab_size, info.max_context, dtype, device, kernels,
        torch.get_num_threads(),
    )
    return ModelHost(model, info, max_sessions=max_sessions)


def eos_token_ids(path: Path, tokenizer) -> tuple[int, ...]:
    """The ids that end a generation: generation_config's eos ids, else the tokenizer's."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    except OSError:
        pass
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return tuple(ids)
