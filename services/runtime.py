"""The runtime interface: what a model service needs of its model, whichever engine runs it.

A runtime owns one causal LM and the KV caches of the sessions it serves (least recently
used evicted). Every forward pass asks for the logits of the last positions of a sequence;
the cache is cut back to its longest common prefix with that sequence and only the rest is
fed. Rolling back rejected draft tokens is therefore not a separate operation: the next
call simply shares a shorter prefix.

A tree pass (`tree_logits`, services/tree.py) leaves the cache holding the context and then
tree nodes. `keep_path` compacts it to the context plus one root-to-node path (what a
verifier keeps of an accepted draft); a later call whose sequence continues through cached
nodes keeps that path the same way (`settle`), and drops the other nodes.

Two implementations:
- `torch` (services/torch_runtime.py): transformers, for any Hugging Face folder, CUDA in
  bf16/fp16, and CPU in fp32 (oneDNN linears) or int8 (services/int8.py);
- `llama` (services/llama_runtime.py): llama.cpp through llama-cpp-python, for GGUF files.
Which is faster depends on the role (`choose_runtime`). Losing a cache costs a re-prefill,
never a wrong token, on either.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the catalog and `specd models list` import this module without paying for torch
    import torch

    from services.tree import Tree

log = logging.getLogger(__name__)

RUNTIMES = ("llama", "torch")
HEAD_RUNTIME = "head"  # what a drafter hosting a trained draft head reports as its runtime (its kind as dtype)
GGUF_NAME = "model.gguf"  # the GGUF file inside a prepared catalog folder (services/models.py)


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
    runtime: str = ""  # llama | torch; "" for a model with no runtime (max-gram)
    weights: str = ""  # what the weights are (weights_id); a recurrent head: its target's

    @property
    def wire_fingerprint(self) -> str:
        """The vocabulary of the ids this service takes and returns in calls."""
        return self.wire_tokenizer_fingerprint or self.tokenizer_fingerprint


@dataclass(frozen=True)
class ChainCall:
    """One session's part of a batched pass (Runtime.logits_batch): what `logits` takes."""

    session_id: str
    seq: Sequence[int]
    n_last: int


@dataclass(frozen=True)
class TreeCall:
    """One session's draft tree in a batched pass (Runtime.logits_batch): what `tree_logits` takes."""

    session_id: str
    context: Sequence[int]
    tree: Tree
    n_last: int


PassCall = ChainCall | TreeCall


def check_batch(calls: Sequence[PassCall]) -> None:
    """A batch's calls extend one cache each: two calls of one session cannot share a pass."""
    sessions = [call.session_id for call in calls]
    if len(set(sessions)) < len(sessions):
        raise ValueError("a batch holds at most one call per session")


def alone(runtime: Runtime, call: PassCall) -> torch.Tensor:
    """One call of a batch in a pass of its own: `logits` or `tree_logits`."""
    if isinstance(call, TreeCall):
        return runtime.tree_logits(call.session_id, call.context, call.tree, call.n_last)
    return runtime.logits(call.session_id, call.seq, call.n_last)


class Runtime(Protocol):
    """One model and its per-session KV caches. Not thread-safe: call from one thread."""

    info: ModelInfo
    tokenizer: object | None  # the model's own Hugging Face tokenizer (text-level drafting needs it)
    hidden_states: bool  # last_hidden answers (torch); llama.cpp's context is built without them

    def logits(self, session_id: str, seq: Sequence[int], n_last: int) -> torch.Tensor:
        """Logits (n_last, V) float32 that predict the tokens after each of the last n_last of seq.

        Row i is the model's distribution for position len(seq) - n_last + i + 1, given
        seq[: len(seq) - n_last + i + 1].
        """
        ...

    def logits_batch(self, calls: Sequence[PassCall]) -> list[torch.Tensor]:
        """`logits` (ChainCall) and `tree_logits` (TreeCall) of several sessions (one call
        each) in one pass where the runtime can: per call what it returns alone, within the
        runtime's near-tie bound (bitwise on torch int8). How a verifier serves many sessions
        at the cost of few passes."""
        ...

    def tree_logits(self, session_id: str, context: Sequence[int], tree: Tree, n_last: int) -> torch.Tensor:
        """Logits (n_last, V) float32 after each of the last n_last entries of (the context's
        last token, node 0, ..., node N-1): row j predicts what follows that entry's path.
        When the cache holds this context and the first nodes of this tree (a drafter growing
        its tree depth by depth), only the new nodes are fed."""
        ...

    def keep_path(self, session_id: str, path: Sequence[int]) -> None:
        """Compacts the cache to the context plus one root-to-node path of the cached tree
        (node indices, root first): every other node is dropped."""
        ...

    def settle(self, session_id: str, seq: Sequence[int]) -> None:
        """Keeps the cached tree nodes that continue seq as a path and drops the others."""
        ...

    def cached(self, session_id: str) -> tuple[list[int], int]:
        """What the cache holds for a session: its chain of tokens and how many tree nodes follow."""
        ...

    def last_hidden(self, session_id: str) -> torch.Tensor | None:
        """(n_last, H) float32: the LM head's input (the final norm's output) at the positions
        whose logits the session's last pass returned, row for row; None without hidden_states."""
        ...

    def release(self, session_id: str) -> bool:
        """Frees a session's cache; whether it had one."""
        ...

    @property
    def session_count(self) -> int: ...


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token string -> id), to tell compatible tokenizers apart."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


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


def gguf_file(folder: Path) -> Path | None:
    """The GGUF a model folder holds (a prepared catalog folder, or any folder with one GGUF)."""
    own = folder / GGUF_NAME
    if own.is_file():
        return own
    found = sorted(folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def weights_id(path: Path) -> str:
    """What a model's weights are: the GGUF's sha256 for a prepared catalog folder, else the
    names, sizes and times of its weight files. Tells a stale int8 cache, and the target a
    recurrent draft head was trained for."""
    folder = path if path.is_dir() else path.parent
    marker = folder / ".complete"
    if marker.is_file():
        return "sha256:" + marker.read_text(encoding="utf-8").strip()
    files = sorted([*folder.glob("model*.safetensors"), *folder.glob("*.gguf")]) if path.is_dir() else [path]
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def has_torch_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def choose_runtime(requested: str, role: str, path: Path, device: str) -> str:
    """The runtime a model service runs its model on.

    auto follows the measurements in the README ("Runtimes"): on CPU a drafter runs on
    llama.cpp when its model has a GGUF (the fastest one-token pass, which drafting is made
    of), the verifier on torch in int8 (a pass over k+1 tokens costs little more than one,
    and a row's logits do not change with the batch it is in, so its strategies reproduce
    its own greedy output); CUDA, and folders without a GGUF, run on torch.
    """
    gguf = path if path.suffix == ".gguf" else gguf_file(path) if path.is_dir() else None
    if requested == "llama":
        if not device.startswith("cpu"):
            raise ValueError(f"the llama runtime runs on the CPU in specd; use SPECD_RUNTIME=torch for {device}")
        if gguf is None:
            raise ValueError(f"{path} holds no GGUF file for the llama runtime; use SPECD_RUNTIME=torch for it")
        return "llama"
    if requested == "torch" or not device.startswith("cpu") or gguf is None:
        return "torch"
    return "llama" if role == "drafter" else "torch"


def choose_dtype(requested: str, device: str) -> str:
    """The torch runtime's dtype: auto = int8 on CPU (services/int8.py), bfloat16 on CUDA."""
    if requested == "auto":
        return "int8" if device.startswith("cpu") else "bfloat16"
    if requested == "int8" and not device.startswith("cpu"):
        raise ValueError(f"SPECD_DTYPE=int8 runs on the CPU; use bfloat16 or float16 on {device}")
    return requested


def load_runtime(config, role: str) -> Runtime:
    """The runtime a model service's config asks for (services/config.ModelServiceConfig);
    role: drafter or verifier, for the auto choice."""
    from services.models import resolve, torch_folder

    path = resolve(config.model, config.home)
    runtime = choose_runtime(config.runtime, role, path, config.device)
    if runtime == "llama":
        from services.llama_runtime import DRAFTER_KV_TOKENS, load_llama

        kv_tokens = config.kv_tokens or (DRAFTER_KV_TOKENS if role == "drafter" else 0)
        loaded: Runtime = load_llama(
            path, max_sessions=config.max_sessions, max_draft=config.max_draft, threads=config.threads,
            kv_tokens=kv_tokens, resident_cells=config.kv_resident, prefix_entries=config.prefix_cache,
        )  # fmt: skip
    else:
        from services.int8 import choose_kernel
        from services.torch_runtime import load_torch

        dtype = choose_dtype(config.dtype, config.device)
        # int8 quantizes straight from a GGUF and caches the result; other dtypes load faster
        # from safetensors, converted once.
        folder = path if dtype == "int8" and path.is_dir() else torch_folder(path)
        loaded = load_torch(
            folder, dtype=dtype, device=config.device, max_sessions=config.max_sessions, threads=config.threads,
            onednn=config.onednn, int8_kernel=choose_kernel(config.int8_kernel, role),
            prefix_entries=config.prefix_cache,
        )  # fmt: skip
    settle_memory(huge_pages=runtime == "torch" and config.huge_pages and config.device.startswith("cpu"))
    return loaded


def settle_memory(huge_pages: bool) -> None:
    """After a model is loaded: the heap's freed pages back to the OS (`trim_heap`), then,
    with `huge_pages`, what stays resident (the weights) in 2 MB pages (services/hugepages.py;
    llama.cpp's mapped GGUF gets them from the page cache already)."""
    trim_heap()
    if huge_pages:
        from services.hugepages import use_huge_pages

        log.info("%s", use_huge_pages().describe())


def trim_heap() -> None:
    """Hands the heap pages freed while loading back to the OS (glibc's malloc_trim).

    Loading leaves freed temporaries behind (an int8 model is read, then packed for fbgemm):
    glibc raises its mmap threshold after the first large frees, so later ones come from the
    heap and stay resident. Measured on the 1.5B int8 target: 3.24 GB resident after loading,
    2.33 GB after the trim. Reference cycles go first (a tokenizer read for its fingerprint
    and dropped: 24 MB). The trim is a no-op where the C library has no malloc_trim."""
    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


# Top-2 logit gap below which a pass over several tokens and a pass over one may pick
# different argmaxes on a runtime, so that a strategy's greedy output may part from the
# runtime's own one-token-at-a-time greedy output there (and only there). Measured on the
# packaged models (README, "Lossless on each runtime"): torch in fp32 differs between batch
# shapes by float rounding; torch in int8 not at all (every row of a pass is bitwise what a
# one-token pass gives: services/int8.py), so any divergence there is a bug; llama.cpp's
# kernels change with the batch shape and the KV cache's layout, and its activations are
# requantized at every layer, which turns rounding differences into logit differences of up
# to a few tenths.
NEAR_TIE = {"torch": 1e-3, "int8": 0.0, "llama": 0.5}


def near_tie(info: ModelInfo) -> float:
    """The near-tie bound (NEAR_TIE) of the runtime a model runs on."""
    if info.runtime == "llama":
        return NEAR_TIE["llama"]
    return NEAR_TIE["int8"] if info.dtype == "int8" else NEAR_TIE["torch"]
