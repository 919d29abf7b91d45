"""The `torch` runtime: a transformers causal LM and the KV caches of its sessions.

The contract is services/runtime.py's. Here a session's cache is a transformers
DynamicCache over `tokens`, then the nodes of the last tree pass (`tree`); cropping the
cache is how a shorter common prefix rolls back, and `keep_path` index-selects the
accepted path out of the tree's entries. A session prefilled from an empty cache is
offered to `prefixes` (services/prefixes.py) as a copy of its cache's first positions, and a
new session beginning the same way starts from a copy of that copy.

Kernels on CPU: fp32 linears run through oneDNN (OneDNNLinear), or int8 ones
(services/int8.py, SPECD_DTYPE=int8); both keep a pass over a few tokens close to the cost of
a pass over one, which is what a verifier needs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.context import common_prefix_len
from services.metrics import observe_pass, observe_prefix
from services.lru import Lru
from services.packed import Segment, packable, packed_forward
from services.prefixes import DEFAULT_ENTRIES, MAX_TOKENS, Prefixes
from services.runtime import (
    ModelInfo, PassCall, TreeCall, alone, check_batch, eos_token_ids, tokenizer_fingerprint, trim_heap,
    weights_id,
)  # fmt: skip
from services.tree import ROOT, Tree, attention_bias

log = logging.getLogger(__name__)

# Uncached context tokens above which a tree pass prefills them causally first (see tree_logits).
TREE_PREFILL = 64
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class KvState:
    """One session's cache: a transformers Cache over `tokens`, then `tree`'s nodes."""

    cache: object | None = None
    tokens: list[int] = field(default_factory=list)
    tree: Tree | None = None  # nodes cached after `tokens` by the last tree pass
    hidden: torch.Tensor | None = None  # (n_last, H) the LM head's input rows of the last pass
    # the cache began, for the pass under way, from nothing or a kept context (prefixes)
    fresh: bool = False


class TorchRuntime:
    """Owns one transformers model and its per-session caches. Not thread-safe: call from one thread."""

    hidden_states = True  # last_hidden answers (a recurrent draft head drafts from it)

    def __init__(
        self, model: torch.nn.Module, info: ModelInfo, *, max_sessions: int, tokenizer=None,
        prefix_entries: int = DEFAULT_ENTRIES,
    ) -> None:  # fmt: skip
        self.model = model
        self.info = info
        self.tokenizer = tokenizer  # the model's own, when loaded from a folder (text-level drafting needs it)
        self._caches: Lru[str, KvState] = Lru(max_sessions, what="KV cache of session")
        # Contexts prefilled from an empty cache, kept for new sessions that begin the same
        # way (services/prefixes.py): copies of their caches' first positions
        self.prefixes: Prefixes[object] = Prefixes(prefix_entries)
        self.device = next(model.parameters()).device
        self._packable = packable(model)
        # The LM head's input of the last pass (1, rows, H), rows in the order of the logits
        # it returned: the hidden states a recurrent draft head reads (last_hidden).
        self._head_input: torch.Tensor | None = None
        model.get_output_embeddings().register_forward_hook(self._record_head_input)

    def _record_head_input(self, module, args, output) -> None:
        self._head_input = args[0]

    def _take_hidden(self) -> torch.Tensor:
        """(rows, H) the last pass's LM head input, copied (a view would keep the whole pass's
        activations alive), and forgotten here."""
        rows, self._head_input = self._head_input[0].float().clone(), None
        return rows

    def last_hidden(self, session_id: str) -> torch.Tensor | None:
        """(n_last, H) float32: the LM head's input at the positions whose logits the
        session's last pass returned, row for row."""
        state = self._caches.peek(session_id)
        return None if state is None else state.hidden

    def _state(self, session_id: str) -> KvState:
        return self._caches.get_or_create(session_id, KvState)

    def cached(self, session_id: str) -> tuple[list[int], int]:
        state = self._caches.peek(session_id)
        if state is None:
            return [], 0
        return list(state.tokens), 0 if state.tree is None else len(state.tree)

    def release(self, session_id: str) -> bool:
        return self._caches.pop(session_id) is not None

    @property
    def session_count(self) -> int:
        return len(self._caches)

    # -- forward ----------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, session_id: str, seq: Sequence[int], n_last: int) -> torch.Tensor:
        seq = list(seq)
        state, keep = self._reuse(session_id, seq, n_last)
        fed = torch.tensor([seq[keep:]], dtype=torch.long, device=self.device)  # (1, T)
        observe_pass(keep, len(seq) - keep)
        out = self.model(input_ids=fed, past_key_values=state.cache, use_cache=True, logits_to_keep=n_last)
        state.cache = out.past_key_values
        state.tokens = seq
        state.hidden = self._take_hidden()
        self._offer(state)
        return _float_rows(out.logits[0, -n_last:])  # (n_last, V)

    @torch.inference_mode()
    def logits_batch(self, calls: Sequence[PassCall]) -> list[torch.Tensor]:
        """See services/runtime.py: the sessions' new tokens, chains and draft trees, in one
        packed pass (services/packed.py) when the model's layout allows, else one pass each."""
        check_batch(calls)
        if len(calls) < 2 or not self._packable:
            return [alone(self, call) for call in calls]
        states: list[KvState] = []
        segments: list[Segment] = []
        for call in calls:
            if isinstance(call, TreeCall):
                state, segment = self._tree_segment(call.session_id, call.context, call.tree, call.n_last)
            else:
                seq = list(call.seq)
                state, keep = self._reuse(call.session_id, seq, call.n_last)
                observe_pass(keep, len(seq) - keep)
                segment = Segment(state.cache, keep, seq[keep:], call.n_last)
            states.append(state)
            segments.append(segment)
        rows = packed_forward(self.model, segments)
        hidden = self._take_hidden().split([call.n_last for call in calls])
        for state, call, h in zip(states, calls, hidden):
            state.hidden = h
            # (a state a larger batch evicted from the LRU is dropped after)
            if isinstance(call, TreeCall):
                _tree_cached(state, call.context, call.tree)
            else:
                state.tokens = list(call.seq)
                self._offer(state)
        return [_float_rows(r) for r in rows]

    def _reuse(self, session_id: str, seq: list[int], n_last: int) -> tuple[KvState, int]:
        """A session's state with its cache cut back to what a pass over seq reuses: the
        common prefix, less the positions whose logits are asked for (always fed)."""
        _check_n_last(n_last, len(seq))
        state = self._state(session_id)
        self._settle(state, seq)
        keep = min(common_prefix_len(state.tokens, seq), len(seq) - n_last)
        if state.cache is None or keep == 0:
            state.cache, keep = self._from_prefix(seq, len(seq) - n_last)
            state.tokens, state.fresh = seq[:keep], True
        elif keep < len(state.tokens):
            state.cache.crop(keep - len(state.tokens))  # a negative count drops that many
        return state, keep

    def _from_prefix(self, seq: list[int], most: int) -> tuple[object, int]:
        """A cache for a pass over seq from nothing: copied from the kept context with the
        longest common prefix (at most `most` positions), or empty."""
        found = self.prefixes.best(seq, most)
        if found is None:
            return _new_cache(self.model), 0
        kept, length = found
        observe_prefix(length)
        return _copy_cache(self.model, kept, length), length

    def _offer(self, state: KvState) -> None:
        """After a chain pass: a context prefilled from an empty cache (or from a kept one it
        goes beyond) is kept for sessions that begin the same way - a copy, since a
        session's cache changes in place."""
        fresh, state.fresh = state.fresh, False
        if fresh and state.tree is None and self.prefixes.wanted(state.tokens):
            length = min(len(state.tokens), MAX_TOKENS)
            self.prefixes.keep(state.tokens[:length], _copy_cache(self.model, state.cache, length))

    @torch.inference_mode()
    def tree_logits(self, session_id: str, context: Sequence[int], tree: Tree, n_last: int) -> torch.Tensor:
        """See services/runtime.py. One pass with a tree attention mask and depth-based
        position ids (services/tree.py; prepared by _tree_segment)."""
        state, segment = self._tree_segment(session_id, context, tree, n_last)
        out = self.model(
            input_ids=torch.tensor([segment.tokens], device=self.device),  # (1, T)
            attention_mask=segment.mask[None, None],  # (1, 1, T, S)
            position_ids=segment.positions[None],  # (1, T)
            past_key_values=state.cache,
            use_cache=True,
            logits_to_keep=n_last,
        )
        state.cache = out.past_key_values
        _tree_cached(state, context, tree)
        state.hidden = self._take_hidden()
        return _float_rows(out.logits[0, -n_last:])  # (n_last, V)

    def _tree_segment(self, session_id: str, context: Sequence[int], tree: Tree, n_last: int) -> tuple[KvState, Segment]:
        """A tree pass's part, with the session's cache cut to what it reuses. A long uncached
        stretch of context (a new session's prompt) is first prefilled by an ordinary causal
        pass, so the tree pass and its mask stay small; a short one (the tokens the last round
        committed) rides along in the tree pass, which saves a pass per round."""
        n = len(tree)
        if not context:
            raise ValueError("a tree pass needs a context")
        _check_n_last(n_last, n + 1)
        context = list(context)
        state = self._state(session_id)
        cached_nodes = 0
        reusable = state.tree is not None and state.tokens == context and state.tree.prefix_of(tree)
        if reusable and n_last <= n:
            cached_nodes = min(len(state.tree), n - n_last)
        else:
            self._settle(state, context)
        cached_context = len(context) if cached_nodes else common_prefix_len(state.tokens, context)
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
        fed = context[cached_context:] + list(tree.tokens[cached_nodes:])
        observe_pass(cached_context + cached_nodes, len(fed))
        start = cached_context + cached_nodes
        return state, Segment(state.cache, start, fed, n_last, positions[0].to(self.device), bias[0, 0].to(self.device))

    def keep_path(self, session_id: str, path: Sequence[int]) -> None:
        self._keep_path(self._state(session_id), list(path))

    @torch.inference_mode()
    def _keep_path(self, state: KvState, path: list[int]) -> None:
        if state.tree is None and not path:
            return  # an empty tree was passed: the cache holds just the context
        tree = _check_path(state.tree, path)
        keep, n = len(state.tokens), len(path)
        # Only the nodes move: the path's entries are copied over the first n node slots and
        # the rest cut off, so a round costs O(tree), not a copy of the whole context's cache
        # (6 ms a round at 300 tokens on the 1.5B target).
        index = torch.tensor([keep + node for node in path], dtype=torch.long, device=self.device)  # (n,)
        for layer in state.cache.layers:
            if n:
                layer.keys[..., keep : keep + n, :] = layer.keys.index_select(-2, index)
                layer.values[..., keep : keep + n, :] = layer.values.index_select(-2, index)
            layer.keys = layer.keys[..., : keep + n, :]  # (B, H, keep + n, D)
            layer.values = layer.values[..., : keep + n, :]
        state.tokens = state.tokens + [tree.tokens[node] for node in path]
        state.tree = None

    def settle(self, session_id: str, seq: Sequence[int]) -> None:
        self._settle(self._state(session_id), list(seq))

    def _settle(self, state: KvState, seq: list[int]) -> None:
        """Before a pass over seq: keep the cached nodes that continue seq as a path, drop the rest."""
        if state.tree is not None:
            self._keep_path(state, continued_path(state.tree, state.tokens, seq))


def _tree_cached(state: KvState, context: Sequence[int], tree: Tree) -> None:
    """After a tree pass: the cache holds the context, then the tree's nodes (none: no tree)."""
    state.tokens, state.tree = list(context), (tree if len(tree) else None)


def continued_path(tree: Tree, base: list[int], seq: list[int]) -> list[int]:
    """The longest root-to-node path of `tree` (cached after `base`) that seq runs through."""
    path: list[int] = []
    if seq[: len(base)] == base:
        for token in seq[len(base) :]:
            below = path[-1] if path else ROOT
            child = next((c for c in tree.children(below) if tree.tokens[c] == token), None)
            if child is None:
                break
            path.append(child)
    return path


def _check_path(tree: Tree | None, path: list[int]) -> Tree:
    if tree is None:
        raise ValueError("no tree is cached, so there is no path to keep")
    if list(path) != tree.path(path[-1] if path else ROOT):
        raise ValueError(f"{list(path)} is not a path from the root of the cached tree")
    return tree


def _check_n_last(n_last: int, most: int) -> None:
    if not 1 <= n_last <= most:
        raise ValueError(f"need 1 <= n_last <= {most}, got {n_last}")


def _float_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows if rows.dtype in (torch.float32, torch.float64) else rows.float()


def _new_cache(model: torch.nn.Module) -> object:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _copy_cache(model: torch.nn.Module, cache, length: int) -> object:
    """A new cache holding copies of `cache`'s first `length` positions."""
    out = _new_cache(model)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone(), i)
    return out


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


def replace_linears(module: torch.nn.Module, make) -> int:
    """Replaces every nn.Linear below module by make(linear); returns how many."""
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, make(child))
            swapped += 1
        else:
            swapped += replace_linears(child, make)
    return swapped


def use_onednn_linears(module: torch.nn.Module) -> int:
    """Replaces every nn.Linear below module by a OneDNNLinear; returns how many."""
    return replace_linears(module, OneDNNLinear)


def load_torch(
    path: Path, *, dtype: str, device: str, max_sessions: int, threads: int = 0, onednn: bool = True,
    int8_kernel: str = "auto", prefix_entries: int = DEFAULT_ENTRIES,
) -> TorchRuntime:  # fmt: skip
    """Loads a Hugging Face model folder into a TorchRuntime.

    dtype int8 (CPU only): the weights quantized at the first load (services/int8.py) and kept
    next to them (int8.safetensors), so later loads read int8 tensors only; a prepared folder
    without safetensors weights is quantized from its GGUF, dequantized in memory, and never
    written out in fp32, its linears on `int8_kernel` (services/int8.choose_kernel). onednn: on
    CPU in float32, run the linear layers through oneDNN (see use_onednn_linears).
    prefix_entries: contexts kept for new sessions that begin the same way (services/prefixes.py).
    """
    from transformers import AutoTokenizer

    from services.roles import Stopwatch

    if threads > 0:
        torch.set_num_threads(threads)
    watch = Stopwatch()
    if dtype == "int8":
        from services.int8 import choose_kernel

        kernel = choose_kernel(int8_kernel)
        model, kernels = _load_int8(path, kernel), f"int8 ({kernel})"
    else:
        model = _from_pretrained(path, DTYPES[dtype]).to(device).eval()
        kernels = "torch"
        if onednn and device == "cpu" and dtype == "float32" and torch.backends.mkldnn.is_available():
            use_onednn_linears(model)
            _release_checkpoint(model)
            kernels = "oneDNN"
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = ModelInfo(
        model=str(path),
        vocab_size=model.get_output_embeddings().out_features,
        max_context=int(getattr(model.config, "max_position_embeddings", 0) or 0),
        eos_token_ids=eos_token_ids(path, tokenizer),
        dtype=dtype,
        device=device,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        runtime="torch",
        weights=weights_id(path),
    )
    log.info(
        "loaded %s in %.1fs (vocab %d, context %d, %s on %s, %s linears, %d threads)",
        path, watch.seconds, info.vocab_size, info.max_context, dtype, device, kernels, torch.get_num_threads(),
    )
    return TorchRuntime(model, info, max_sessions=max_sessions, tokenizer=tokenizer, prefix_entries=prefix_entries)


def _from_pretrained(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The folder's model: its safetensors weights, else its GGUF dequantized in memory."""
    from transformers import AutoModelForCausalLM

    from services.runtime import gguf_file, has_torch_weights

    if has_torch_weights(path) or gguf_file(path) is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    log.info("reading %s's weights from its GGUF (dequantized in memory: a minute or two)", path)
    return AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file(path).name, dtype=dtype)


def _load_int8(path: Path, kernel: str) -> torch.nn.Module:
    """The int8 model of a folder, its linears on `kernel`: from its cache when that was made
    from these weights, else quantized now and cached (when the folder is writable)."""
    from services.int8 import (
        CACHE_NAME, load_quantized, quantize_model, save_quantized, stack_projections, use_rowwise_attention,
    )  # fmt: skip

    source = weights_id(path)
    cache = path / CACHE_NAME
    model = load_quantized(path, cache, source, kernel)
    if model is None:
        model = _from_pretrained(path, torch.float32).eval()
        quantize_model(model, kernel)
        _release_checkpoint(model)
        try:
            save_quantized(model, cache, source)
            log.info("cached the int8 weights in %s", cache)
        except OSError as err:
            log.warning("could not cache the int8 weights in %s (%s): the next start quantizes again", cache, err)
    stack_projections(model)
    trim_heap()
    use_rowwise_attention(model)
    return model


def _release_checkpoint(model: torch.nn.Module) -> None:
    """After the linears got weights of their own (int8, oneDNN layout): lets the loaded fp32
    checkpoint go. What kept its tensors (norms, biases) may be views of the checkpoint's
    memory map, which would keep the whole file mapped; they get copies of their own, and
    the freed heap memory goes back to the OS (glibc would keep it otherwise)."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and not buffer.is_mkldnn:
                    setattr(module, name, buffer.clone())
    trim_heap()

