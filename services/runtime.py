"""The model runtime: one causal LM and the KV caches of the sessions it serves.

A service keeps, per session, the context its caller has committed (to check context
deltas against) and a KV cache over some token sequence. Every forward pass asks for the
logits of the last positions of a sequence; the cache is cropped to its longest common
prefix with that sequence and only the rest is fed. Rolling back rejected draft tokens is
therefore not a separate operation: the next call simply shares a shorter prefix.

A tree pass (`tree_logits`, services/tree.py) leaves the cache holding the context and then
tree nodes in node order. `keep_path` compacts it to the context plus one root-to-node path
(what a verifier keeps of an accepted draft); a later call whose sequence continues through
cached nodes keeps that path the same way, and drops the other nodes.

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
from services.ngram import NgramIndex
from services.tree import ROOT, Tree, attention_bias

log = logging.getLogger(__name__)

# Uncached context tokens above which a tree pass prefills them causally first (see tree_logits).
TREE_PREFILL = 64
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
    # A drafter translating a foreign vocabulary speaks the target's ids on the wire (slem,
    # tli, slrs): the target's fingerprint here, and how many tokens the two share.
    wire_tokenizer_fingerprint: str = ""
    shared_tokens: int = 0

    @property
    def wire_fingerprint(self) -> str:
        """The vocabulary of the ids this service takes and returns in calls."""
        return self.wire_tokenizer_fingerprint or self.tokenizer_fingerprint


@dataclass
class SessionState:
    """What a service holds for one session."""

    context: list[int] = field(default_factory=list)  # committed tokens, as the caller sent them
    cache: object | None = None  # transformers Cache over cached_tokens, then cached_tree's nodes
    cached_tokens: list[int] = field(default_factory=list)
    cached_tree: Tree | None = None  # nodes cached after cached_tokens by the last tree pass
    ngram: NgramIndex | None = None  # a drafter's max-gram index of the context (its second stage)


class ModelHost:
    """Owns one model and its per-session state. Not thread-safe: call from one thread."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo, *, max_sessions: int, tokenizer=None) -> None:
        self.model = model
        self.info = info
        self.tokenizer = tokenizer  # the model's own, when loaded from a folder (text-level drafting needs it)
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
        self._settle_tree(state, seq)
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


    @torch.inference_mode()
    def tree_logits(self, session_id: str, context: Sequence[int], tree: Tree, n_last: int) -> torch.Tensor:
        """Logits (n_last, V) after each of the last n_last entries of (the context's last
        token, node 0, ..., node N-1): row j predicts what follows that entry's path.

        One pass with a tree attention mask and depth-based position ids (services/tree.py).
        When the cache already holds this context and the first nodes of this tree (a drafter
        growing its tree depth by depth), only the new nodes are fed. A long uncached stretch
        of context (a new session's prompt) is first prefilled by an ordinary causal pass, so
        the tree pass and its mask stay small; a short one (the tokens the last round
        committed) rides along in the tree pass, which saves a pass per round.
        """
        n = len(tree)
        assert context and 1 <= n_last <= n + 1, f"need a context and 1 <= n_last <= {n + 1}, got {n_last}"
        context = list(context)
        state = self.session(session_id)
        cached_nodes = 0
        reusable = state.cached_tree is not None and state.cached_tokens == context and state.cached_tree.prefix_of(tree)
        if reusable and n_last <= n:
            cached_nodes = min(len(state.cached_tree), n - n_last)
        else:
            self._settle_tree(state, context)
        cached_context = len(context) if cached_nodes else common_prefix_len(state.cached_tokens, context)
        # The context's last token is fed with the tree when the row after it is asked for.
        wanted = len(context) - 1 if n_last == n + 1 else len(context)
        if wanted - cached_context > TREE_PREFILL:
            self.logits(session_id, context[:wanted], 1)
            cached_context = wanted
        cached_context = min(cached_context, wanted)
        if state.cache is None or cached_context == 0:
            state.cache, cached_context = _new_cache(self.model), 0
        else:
            held = state.cache.get_seq_length()
            if held > cached_context + cached_nodes:
                state.cache.crop(cached_context + cached_nodes - held)
        bias, positions = attention_bias(tree, len(context), cached_context, cached_nodes, self.model.dtype)
        fed = torch.tensor([context[cached_context:] + list(tree.tokens[cached_nodes:])], device=self.device)  # (1, T)
        out = self.model(
            input_ids=fed,
            attention_mask=bias.to(self.device),  # (1, 1, T, S)
            position_ids=positions.to(self.device),  # (1, T)
            past_key_values=state.cache,
            use_cache=True,
            logits_to_keep=n_last,
        )
        state.cache = out.past_key_values
        state.cached_tokens, state.cached_tree = context, (tree if n else None)
        rows = out.logits[0, -n_last:]  # (n_last, V)
        return rows if rows.dtype in (torch.float32, torch.float64) else rows.float()

    def keep_path(self, session_id: str, path: Sequence[int]) -> None:
        """Compacts the cache to the context plus one root-to-node path of the cached tree
        (node indices, root first): the KV entries of every other node are dropped."""
        self._keep_path(self.session(session_id), list(path))

    def _keep_path(self, state: SessionState, path: list[int]) -> None:
        if state.cached_tree is None and not path:
            return  # an empty tree was passed: the cache holds just the context
        assert state.cached_tree is not None, "no tree is cached"
        tree = state.cached_tree
        assert list(path) == tree.path(path[-1] if path else ROOT), f"{list(path)} is not a path from the root"
        keep = len(state.cached_tokens)
        index = torch.tensor([*range(keep), *(keep + node for node in path)], device=self.device)  # (keep + n,)
        for layer in state.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)  # (B, H, keep + n, D)
            layer.values = layer.values.index_select(-2, index)
        state.cached_tokens = state.cached_tokens + [tree.tokens[node] for node in path]
        state.cached_tree = None

    def settle(self, session_id: str, seq: Sequence[int]) -> None:
        """Keeps the cached tree nodes that continue seq as a path and drops the others, so
        the cache holds no node that seq does not go through."""
        self._settle_tree(self.session(session_id), list(seq))

    def _settle_tree(self, state: SessionState, seq: list[int]) -> None:
        """Before a pass over seq: keep the cached nodes that continue seq as a path, drop the rest."""
        if state.cached_tree is None:
            return
        tree, base = state.cached_tree, len(state.cached_tokens)
        path: list[int] = []
        if seq[:base] == state.cached_tokens:
            for token in seq[base:]:
                below = path[-1] if path else ROOT
                child = next((c for c in tree.children(below) if tree.tokens[c] == token), None)
                if child is None:
                    break
                path.append(child)
        self._keep_path(state, path)


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
    return ModelHost(model, info, max_sessions=max_sessions, tokenizer=tokenizer)


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
