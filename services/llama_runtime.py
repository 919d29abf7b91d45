"""The `llama` runtime: llama.cpp through llama-cpp-python's low-level API, for GGUF files.

The contract is services/runtime.py's; here is how llama.cpp keeps it.

One llama.cpp context serves every session. Its KV cache is unified: cells belong to
sequence ids, and a token attends to the cells of its (first) sequence at positions up to
its own. Each cached session owns one sequence id (`Slot.seq`), least recently used evicted;
the cache holds the session's `tokens` at positions 0..len-1 of that sequence. Every pass
is one `llama_decode` over the tokens past the longest common prefix (`llama_memory_seq_rm`
drops the rest first: that is the rollback), with logits asked only where they are needed.

A tree pass gives every leaf of the tree a temporary sequence that holds the context and
the leaf's root-to-leaf path: the context's cells get the leaf sequences by
`llama_memory_seq_cp` (a tag, not a copy, in a unified cache), and a tree node fed in the
batch carries the sequence of every leaf below it. A node then attends to exactly the
context, its ancestors and itself, at position len(context) + depth - 1 (services/tree.py).
Worked example, context of 10 tokens at positions 0..9 in the session's sequence s, tree
(7, 8, 5, 6, 9) with parents (-1, -1, 0, 0, 2): the leaves are nodes 1, 3 and 4, given
temporary sequences a, b and c; the context's cells are tagged s, a, b, c, and the batch is

    node   token  position  sequences   sees
    0      7      10        b, c        context, 0
    1      8      10        a           context, 1
    2      5      11        c           context, 0, 2
    3      6      11        b           context, 0, 3
    4      9      12        c           context, 0, 2, 4

`keep_path` tags the path's cells with s (`seq_cp` from a sequence that runs through the
path's last node) and drops the temporary sequences, which frees the other nodes' cells. A
drafter growing its tree depth by depth feeds only the new nodes: a new leaf below a cached
leaf takes over that leaf's sequence, any other gets a fresh one tagged on the cells of its
cached ancestors.

Temporary sequences come from a shared pool; when it runs dry, other sessions' cached trees
(a drafter's tree at rest between rounds) are dropped first, which costs them a re-feed of
at most a tree's depth of tokens. When the KV cache itself is full, least recently used
sessions are evicted until the batch fits.

Parking. A pass attends over every used cell of the unified cache, masked to its own
sequences, so each session left in the cache makes every other session's passes dearer
(measured on the 1.5B target: a one-token pass 65 ms alone, 99 ms with 14 other sessions of
500 tokens cached). So at most `resident_cells` cells of other sessions stay in the cache
while a session runs (default none); beyond that the least recently used are parked: their
sequence's state is copied to host memory (`llama_state_seq_get_data`) and their cells
freed, and put back (`llama_state_seq_set_data`) when the session returns. Measured on the
1.5B target, sessions of 500 tokens taking turns, a one-token pass: 62 ms for one session;
with 8, 71 ms parking every other session against 80 ms keeping them all (4: 68 against 70);
a budget of 1024 cells was worse than either (77 ms with 8: it parks and attends). A session
that cannot be put back (the cache is full) starts again from an empty cache: a re-prefill,
never a wrong token.

Kept contexts (services/prefixes.py). A session that prefilled from an empty cache offers
its context: its first positions' state is copied out to host memory through a temporary
sequence, as parking copies a session's. A new session whose context begins the same way
(every chat turn begins with the template and system prompt) has that state put into its
own sequence (`llama_state_seq_set_data`), cut to the common prefix, and feeds the rest.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from services.context import common_prefix_len
from services.metrics import observe_pass, observe_prefix
from services.errors import BadRequest
from services.lru import Lru
from services.prefixes import DEFAULT_ENTRIES, MAX_TOKENS, Prefixes
from services.runtime import (
    ChainCall, ModelInfo, PassCall, TreeCall, alone, check_batch, eos_token_ids, gguf_file, tokenizer_fingerprint,
    weights_id,
)  # fmt: skip
from services.torch_runtime import TREE_PREFILL, _check_n_last, _check_path, continued_path
from services.tree import ROOT, Tree

log = logging.getLogger(__name__)

LLAMA_MAX_SEQ = 256  # llama.cpp's bound on sequence ids in one context
N_BATCH = 512  # tokens per llama_decode; a longer prefill is fed in chunks
# A drafter's KV cells unless SPECD_KV_TOKENS says otherwise. Other sessions are parked in
# host memory while one runs, so the cache holds one session's context and its trees; past
# this many tokens a session's rounds go on without drafts (the orchestrator reads the
# drafter's max_context). The 0.5B drafter's cache at the model's 32,768 cells costs 400 MB
# resident; at 8,192, 100 MB.
DRAFTER_KV_TOKENS = 8192


@dataclass
class Slot:
    """One session's part of the KV cache."""

    seq: int  # its sequence id
    tokens: list[int] = field(default_factory=list)  # cached at positions 0..len-1 of seq
    tree: Tree | None = None  # nodes cached after tokens by the last tree pass
    leaf_seqs: dict[int, int] = field(default_factory=dict)  # tree leaf -> its temporary sequence
    parked: np.ndarray | None = None  # the sequence's state in host memory while its cells are freed
    fresh: bool = False  # the pass under way began from an empty cache or a kept context (prefixes)

    @property
    def cells(self) -> int:
        """KV cells the session holds in the cache (none while parked)."""
        if self.parked is not None:
            return 0
        return len(self.tokens) + (len(self.tree) if self.tree is not None else 0)


class LlamaRuntime:
    """One GGUF model in one llama.cpp context, and the KV cache of every session. Not
    thread-safe: call from one thread."""

    hidden_states = False  # the context is built without embeddings (a recurrent head needs torch)

    def __init__(
        self,
        lib,
        model,
        context,
        info: ModelInfo,
        tokenizer: Callable[[], object] | None,
        *,
        max_sessions: int,
        n_seq_max: int,
        n_batch: int,
        resident_cells: int = 0,
        prefix_entries: int = DEFAULT_ENTRIES,
    ) -> None:
        self._lib = lib  # the llama_cpp module
        self._model = model
        self._ctx = context
        self._mem = lib.llama_get_memory(context)
        self.info = info
        self._load_tokenizer = tokenizer
        self._tokenizer = None
        self.n_batch = n_batch
        self.resident_cells = resident_cells  # cells other sessions may keep cached while one runs
        self.parks = self.unparks = 0  # sessions parked and put back, for Status
        self._free_session_seqs = list(range(max_sessions - 1, -1, -1))
        self._free_tree_seqs = list(range(n_seq_max - 1, max_sessions - 1, -1))
        self._slots: Lru[str, Slot] = Lru(max_sessions, on_evict=self._free_slot, what="KV cache of session")
        self._batch = lib.llama_batch_init(n_batch, 0, n_seq_max)
        self._n_vocab = info.vocab_size
        # Contexts prefilled from an empty cache, kept for new sessions that begin the same
        # way (services/prefixes.py): their first positions' state in host memory, as parking
        # keeps a session's, since cells left in the cache would make every pass dearer
        self.prefixes: Prefixes[np.ndarray] = Prefixes(prefix_entries)

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer, read on first use (None when it has none).

        Only text-level work needs it (slrs, a translation between vocabularies); the ids a
        pass takes and returns do not. Held by every drafter, Qwen2.5's 151k-token tokenizer
        costs ~120 MB resident, an eighth of the 0.5B drafter's memory."""
        if self._tokenizer is None and self._load_tokenizer is not None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def close(self) -> None:
        """Frees the context, the model and the batch (also done when the process ends)."""
        if self._ctx is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None

    # -- sessions ---------------------------------------------------------------------

    def _slot(self, session_id: str) -> Slot:
        return self._slots_for([session_id])[0]

    def _slots_for(self, session_ids: Sequence[str]) -> list[Slot]:
        """The sessions' slots (at most the cache's capacity), their cells in the cache (put
        back if parked), and other sessions parked until they hold at most resident_cells cells."""
        slots: list[Slot] = []
        for session_id in session_ids:
            slot = self._slots.get(session_id)
            if slot is None:
                if not self._free_session_seqs:
                    self._slots.evict_oldest()  # never one of these: they were used just now
                slot = Slot(self._free_session_seqs.pop())
                self._slots[session_id] = slot
            slots.append(slot)
        running = set(session_ids)
        others = [self._slots.peek(other) for other in self._slots if other not in running]  # oldest first
        held = sum(other.cells for other in others)
        for other in others:
            if held <= self.resident_cells:
                break
            held -= other.cells
            self._park(other)
        for slot in slots:
            if slot.parked is not None:
                self._unpark(slot)
        return slots

    def _park(self, slot: Slot) -> None:
        if slot.parked is not None or not slot.tokens:
            return
        self._drop_tree(slot)
        size = self._lib.llama_state_seq_get_size(self._ctx, slot.seq)
        state = np.empty(size, dtype=np.uint8)  # uninitialised: every byte is written next
        if self._lib.llama_state_seq_get_data(self._ctx, _bytes(state), size, slot.seq) != size:
            state = None  # not saved: the session re-prefills when it returns
            slot.tokens = []
        self._lib.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        slot.parked = state
        self.parks += 1

    def _unpark(self, slot: Slot) -> None:
        state, slot.parked = slot.parked, None
        if self._lib.llama_state_seq_set_data(self._ctx, _bytes(state), state.size, slot.seq) == 0:
            log.info("could not put a parked session back (the KV cache is full): it re-prefills")
            self._lib.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            slot.tokens = []
            return
        self.unparks += 1

    def _free_slot(self, session_id: str, slot: Slot) -> None:
        self._drop_tree(slot)
        slot.parked = None
        self._lib.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        self._free_session_seqs.append(slot.seq)

    def last_hidden(self, session_id: str) -> torch.Tensor | None:
        return None

    def cached(self, session_id: str) -> tuple[list[int], int]:
        slot = self._slots.peek(session_id)
        if slot is None:
            return [], 0
        return list(slot.tokens), 0 if slot.tree is None else len(slot.tree)

    def release(self, session_id: str) -> bool:
        slot = self._slots.pop(session_id)
        if slot is not None:
            self._free_slot(session_id, slot)
        return slot is not None

    @property
    def session_count(self) -> int:
        return len(self._slots)

    # -- forward ----------------------------------------------------------------------

    def logits(self, session_id: str, seq: Sequence[int], n_last: int) -> torch.Tensor:
        _check_n_last(n_last, len(seq))
        seq = list(seq)
        slot = self._slot(session_id)
        self._reuse(slot, seq, n_last)
        rows: list[torch.Tensor] = []
        while len(slot.tokens) < len(seq):  # chunks of n_batch; the last n_last get logits
            start = len(slot.tokens)
            chunk = seq[start : start + self.n_batch]
            wanted = max(0, len(chunk) - (len(seq) - n_last - start))
            entries = [(token, start + i, (slot.seq,)) for i, token in enumerate(chunk)]
            rows.append(self._decode(entries, wanted, keep_sessions={session_id}))
            slot.tokens += chunk
        self._offer(slot)
        return torch.cat(rows)  # (n_last, V)

    def logits_batch(self, calls: Sequence[PassCall]) -> list[torch.Tensor]:
        """See services/runtime.py: one llama_decode over every chain call's new tokens, each
        in its session's sequence, with logits at each call's last n_last tokens (a drafter's
        step for many sessions); a tree call in a pass of its own. Every session of the batch
        is in the cache for it (put back if parked); other sessions are parked as for one. One
        pass per call when the batch holds more sessions than the cache keeps, or more tokens
        than a llama_decode takes."""
        check_batch(calls)
        if any(isinstance(call, TreeCall) for call in calls):
            chains = [call for call in calls if isinstance(call, ChainCall)]
            rows = iter(self.logits_batch(chains))
            return [next(rows) if isinstance(call, ChainCall) else alone(self, call) for call in calls]
        if len(calls) < 2 or len(calls) > self._slots.capacity:
            return [alone(self, call) for call in calls]
        seqs = [list(call.seq) for call in calls]
        for call, seq in zip(calls, seqs):
            _check_n_last(call.n_last, len(seq))
        slots = self._slots_for([call.session_id for call in calls])
        entries: list[tuple[int, int, tuple[int, ...]]] = []
        wanted: list[bool] = []
        for call, seq, slot in zip(calls, seqs, slots):
            keep = self._reuse(slot, seq, call.n_last)
            entries += [(token, keep + i, (slot.seq,)) for i, token in enumerate(seq[keep:])]
            wanted += [i >= len(seq) - keep - call.n_last for i in range(len(seq) - keep)]
        if len(entries) > self.n_batch:
            return [alone(self, call) for call in calls]
        rows = self._decode(entries, wanted, keep_sessions={call.session_id for call in calls})
        for seq, slot in zip(seqs, slots):
            slot.tokens = seq
            self._offer(slot)
        return list(rows.split([call.n_last for call in calls]))

    def _reuse(self, slot: Slot, seq: list[int], n_last: int) -> int:
        """Cuts a session's cache back to what a pass over seq reuses: the common prefix, less
        the positions whose logits are asked for (always fed); how many tokens it keeps."""
        self._settle(slot, seq)
        if not slot.tokens:
            self._from_prefix(slot, seq, len(seq) - n_last)
            slot.fresh = True
        keep = min(common_prefix_len(slot.tokens, seq), len(seq) - n_last)
        self._truncate(slot, keep)
        observe_pass(keep, len(seq) - keep)
        return keep

    def _from_prefix(self, slot: Slot, seq: list[int], most: int) -> None:
        """An empty slot about to take seq: filled from the kept context with the longest
        common prefix (cut to at most `most` positions), where one has one."""
        found = self.prefixes.best(seq, most)
        if found is None:
            return
        state, length = found
        if self._lib.llama_state_seq_set_data(self._ctx, _bytes(state), state.size, slot.seq) == 0:
            self._lib.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)  # the cache is full: prefill it all
            return
        self._lib.llama_memory_seq_rm(self._mem, slot.seq, length, -1)  # the kept context past the common prefix
        slot.tokens = seq[:length]
        observe_prefix(length)

    def _offer(self, slot: Slot) -> None:
        """After a chain pass: a context prefilled from an empty cache (or from a kept one it
        goes beyond) is kept, its first MAX_TOKENS positions copied out through a temporary
        sequence, for sessions that begin the same way."""
        fresh, slot.fresh = slot.fresh, False
        if not fresh or slot.tree is not None or not self.prefixes.wanted(slot.tokens) or not self._free_tree_seqs:
            return
        length = min(len(slot.tokens), MAX_TOKENS)
        temp = self._free_tree_seqs.pop()
        try:
            self._lib.llama_memory_seq_cp(self._mem, slot.seq, temp, 0, length)
            size = self._lib.llama_state_seq_get_size(self._ctx, temp)
            state = np.empty(size, dtype=np.uint8)
            if self._lib.llama_state_seq_get_data(self._ctx, _bytes(state), size, temp) == size:
                self.prefixes.keep(slot.tokens[:length], state)
        finally:
            self._lib.llama_memory_seq_rm(self._mem, temp, -1, -1)
            self._free_tree_seqs.append(temp)

    def tree_logits(self, session_id: str, context: Sequence[int], tree: Tree, n_last: int) -> torch.Tensor:
        n = len(tree)
        if not context:
            raise ValueError("a tree pass needs a context")
        _check_n_last(n_last, n + 1)
        context = list(context)
        slot = self._slot(session_id)
        held = slot.tree
        growing = held is not None and slot.tokens == context and held.prefix_of(tree) and n_last == n - len(held)
        if growing:
            first_new, tail = len(held), []
        else:
            self._settle(slot, context)
            self._drop_tree(slot)
            # The context's last token is fed with the tree when the row after it is asked for.
            wanted = len(context) - 1 if n_last == n + 1 else len(context)
            keep = min(common_prefix_len(slot.tokens, context), wanted)
            if wanted - keep > TREE_PREFILL:
                self.logits(session_id, context[:wanted], 1)
                keep = wanted
            self._truncate(slot, keep)
            first_new, tail = 0, context[keep:]
        leaf_seqs = self._assign_leaves(session_id, slot, tree, first_new)
        below = _leaves_below(tree, leaf_seqs)  # node -> sequences of the leaves below it
        every_leaf = tuple(leaf_seqs.values())
        base = len(slot.tokens)
        entries = [(token, base + i, (slot.seq, *every_leaf)) for i, token in enumerate(tail)]
        depths = tree.depths()
        entries += [(tree.tokens[j], len(context) - 1 + depths[j], below[j]) for j in range(first_new, n)]
        observe_pass(base + first_new, len(entries))
        rows = self._decode(entries, n_last, keep_sessions={session_id})
        slot.tokens = context
        slot.tree, slot.leaf_seqs = (tree if n else None), leaf_seqs
        return rows

    def keep_path(self, session_id: str, path: Sequence[int]) -> None:
        self._keep_path(self._slot(session_id), list(path))

    def settle(self, session_id: str, seq: Sequence[int]) -> None:
        self._settle(self._slot(session_id), list(seq))

    def _settle(self, slot: Slot, seq: list[int]) -> None:
        if slot.tree is not None:
            self._keep_path(slot, continued_path(slot.tree, slot.tokens, seq))

    def _keep_path(self, slot: Slot, path: list[int]) -> None:
        if slot.tree is None and not path:
            return
        tree = _check_path(slot.tree, path)
        if path:
            end = path[-1]
            through = _leaves_below(tree, slot.leaf_seqs)[end][0]  # a sequence that runs through end
            base = len(slot.tokens)
            self._lib.llama_memory_seq_cp(self._mem, through, slot.seq, base, base + len(path))
            slot.tokens = slot.tokens + [tree.tokens[node] for node in path]
        self._drop_tree(slot)

    # -- bookkeeping ------------------------------------------------------------------

    def _truncate(self, slot: Slot, keep: int) -> None:
        if keep < len(slot.tokens):
            self._lib.llama_memory_seq_rm(self._mem, slot.seq, keep, -1)
            slot.tokens = slot.tokens[:keep]

    def _drop_tree(self, slot: Slot) -> None:
        """Frees the temporary sequences of a slot's cached tree, and with them its nodes' cells."""
        for seq in slot.leaf_seqs.values():
            self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._free_tree_seqs.append(seq)
        slot.tree, slot.leaf_seqs = None, {}

    def _take_tree_seq(self, session_id: str) -> int:
        """A free temporary sequence; other sessions' cached trees are dropped when none is left."""
        if not self._free_tree_seqs:
            for other in list(self._slots):
                slot = self._slots.peek(other)
                if other != session_id and slot.tree is not None:
                    self._drop_tree(slot)
                    break
        if not self._free_tree_seqs:
            raise BadRequest(f"a tree with more leaves than this runtime's {LLAMA_MAX_SEQ} sequences allow")
        return self._free_tree_seqs.pop()

    def _assign_leaves(self, session_id: str, slot: Slot, tree: Tree, first_new: int) -> dict[int, int]:
        """A temporary sequence for every leaf of `tree`, whose first `first_new` nodes are cached.

        A cached leaf keeps its sequence, or hands it to the first new leaf below it; every
        other new leaf gets a fresh sequence, tagged on the cells of the context and of its
        cached ancestors, so it holds everything its path attends to but the new nodes."""
        cached_below = _leaves_below(tree.prefix(first_new), slot.leaf_seqs) if first_new else {}
        position = len(slot.tokens) - 1  # of the context's last token; a node's is position + depth
        depths = tree.depths()
        assigned: dict[int, int] = {}
        for leaf in tree.leaves():
            if leaf < first_new:
                assigned[leaf] = slot.leaf_seqs[leaf]
                continue
            anchor = leaf
            while anchor != ROOT and anchor >= first_new:
                anchor = tree.parents[anchor]
            if anchor != ROOT and anchor in slot.leaf_seqs and slot.leaf_seqs[anchor] not in assigned.values():
                assigned[leaf] = slot.leaf_seqs[anchor]
                continue
            seq = self._take_tree_seq(session_id)
            if anchor == ROOT:
                self._lib.llama_memory_seq_cp(self._mem, slot.seq, seq, -1, -1)
            else:
                self._lib.llama_memory_seq_cp(self._mem, cached_below[anchor][0], seq, -1, position + depths[anchor] + 1)
            assigned[leaf] = seq
        # Cached leaves that got children hand their sequence on; one that did not is a leaf still.
        return assigned

    def _decode(
        self, entries: list[tuple[int, int, tuple[int, ...]]], outputs: int | list[bool], keep_sessions: set[str]
    ) -> torch.Tensor:
        """One llama_decode over (token, position, sequences) entries; the logits (n_outputs, V)
        of the entries `outputs` flags (an int n: the last n), in order. A full KV cache parks
        sessions other than keep_sessions until it fits."""
        b = self._batch
        n = len(entries)
        if n > self.n_batch:
            raise ValueError(f"a batch of {n} tokens is above this runtime's {self.n_batch}")
        flags = [i >= n - outputs for i in range(n)] if isinstance(outputs, int) else outputs
        n_outputs = sum(flags)
        b.n_tokens = n
        for i, (token, pos, seqs) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = len(seqs)
            row = b.seq_id[i]
            for j, seq in enumerate(seqs):
                row[j] = seq
            b.logits[i] = int(flags[i])
        while True:
            code = self._lib.llama_decode(self._ctx, b)
            if code == 0:
                break
            if code == 1 and self._evict_other(keep_sessions):
                continue
            if code == 1:
                raise BadRequest(f"the KV cache ({self.info.max_context} tokens) cannot hold this session's context")
            raise RuntimeError(f"llama_decode failed with code {code}")
        if n_outputs == 0:
            return torch.empty(0, self._n_vocab)
        out = self._lib.llama_get_logits(self._ctx)
        rows = np.ctypeslib.as_array(out, shape=(n_outputs * self._n_vocab,))
        return torch.from_numpy(rows.reshape(n_outputs, self._n_vocab).copy())  # (n_outputs, V)

    def _evict_other(self, keep_sessions: set[str]) -> bool:
        """Frees cells for a batch that did not fit: parks the least recently used session
        not in the batch that holds any; False when none does."""
        for other in list(self._slots):
            slot = self._slots.peek(other)
            if other not in keep_sessions and slot.cells:
                self._park(slot)
                log.info("parked session %s: the KV cache is full", other)
                return True
        return False


def _bytes(buffer: np.ndarray):
    """A uint8 numpy buffer as the `uint8_t *` llama.cpp's state calls take."""
    return buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def _leaves_below(tree: Tree, leaf_seqs: dict[int, int]) -> dict[int, tuple[int, ...]]:
    """node -> the sequences of the leaves in its subtree (the leaf's own first)."""
    below: dict[int, list[int]] = {node: [] for node in range(len(tree))}
    for leaf, seq in leaf_seqs.items():
        node = leaf
        while node != ROOT:
            below[node].append(seq)
            node = tree.parents[node]
    return {node: tuple(seqs) for node, seqs in below.items()}


def load_llama(
    path: Path,
    *,
    max_sessions: int,
    max_draft: int,
    threads: int = 0,
    kv_tokens: int = 0,
    resident_cells: int = 0,
    tokenizer_dir: Path | None = None,
    prefix_entries: int = DEFAULT_ENTRIES,
) -> LlamaRuntime:
    """Loads a GGUF file (or a folder holding one) into a LlamaRuntime.

    max_draft: the most tree nodes one call may carry (each may be a leaf with its own
    temporary sequence). kv_tokens: cells of the KV cache shared by every session (0: the
    model's training context). resident_cells: cells other sessions may keep in the cache
    while one runs (more are parked in host memory; see the module's docstring). prefix_entries:
    contexts kept for new sessions that begin the same way (services/prefixes.py). The tokenizer is read from tokenizer_dir (default: the GGUF's
    folder when it holds tokenizer files, else from the GGUF itself).
    """
    import llama_cpp

    from services.roles import Stopwatch

    folder, file = (path, gguf_file(path)) if path.is_dir() else (path.parent, path)
    if file is None or not file.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    n_seq_max = min(LLAMA_MAX_SEQ, max_sessions + max_draft + 1)
    if max_sessions + 2 > n_seq_max:
        raise ValueError(
            f"the llama runtime holds at most {LLAMA_MAX_SEQ - max_draft - 1} sessions with SPECD_MAX_DRAFT={max_draft}; "
            f"lower SPECD_MAX_SESSIONS ({max_sessions})"
        )
    watch = Stopwatch()
    llama_cpp.llama_log_set(_log_callback(), ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(file).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise OSError(f"llama.cpp could not load {file}")
    n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = kv_tokens or n_ctx_train
    params.n_batch = params.n_ubatch = N_BATCH
    params.n_seq_max = n_seq_max
    params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
    params.kv_unified = True  # one pool of cells: sequences share it, and seq_cp tags instead of copying
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.no_perf = True
    context = llama_cpp.llama_init_from_model(model, params)
    if not context:
        llama_cpp.llama_model_free(model)
        raise OSError(f"llama.cpp could not create a context for {file} ({params.n_ctx} KV cells)")
    load_tokenizer = functools.partial(_tokenizer, tokenizer_dir or folder, file)
    tokenizer = load_tokenizer()  # for the fingerprint and end ids; dropped below, read again on demand
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    desc = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(model, desc, len(desc))
    info = ModelInfo(
        model=str(path),
        vocab_size=n_vocab,
        max_context=min(n_ctx_train, llama_cpp.llama_n_ctx(context)),
        eos_token_ids=eos_token_ids(folder, tokenizer),
        dtype=desc.value.decode(errors="replace").rsplit(" ", 1)[-1] if desc.value else "gguf",
        device="cpu",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        runtime="llama",
        weights=weights_id(folder if path.is_dir() else file),
    )
    log.info(
        "loaded %s with llama.cpp in %.1fs (%s, vocab %d, %d KV cells, %d threads, %d sequences)",
        file, watch.seconds, desc.value.decode(errors="replace"), n_vocab, llama_cpp.llama_n_ctx(context),
        params.n_threads, n_seq_max,
    )
    return LlamaRuntime(
        llama_cpp, model, context, info, load_tokenizer, max_sessions=max_sessions, n_seq_max=n_seq_max, n_batch=N_BATCH,
        resident_cells=resident_cells, prefix_entries=prefix_entries,
    )  # fmt: skip


# ggml's log levels (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 the continuation of the last line.
GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
llama_log = logging.getLogger("llama.cpp")


@functools.cache
def _log_callback():
    """llama.cpp's log, forwarded to the `llama.cpp` logger: its load report (hundreds of
    lines a model) at debug, warnings and errors as such. Made once and kept for the life of
    the process: llama.cpp holds the pointer."""
    import llama_cpp

    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data) -> None:
        if level != 5:
            last[0] = GGML_LEVELS.get(level, logging.DEBUG)
        line = text.decode("utf-8", errors="replace").rstrip("\n")
        if line and llama_log.isEnabledFor(last[0]):
            llama_log.log(last[0], "%s", line)

    return forward


def _tokenizer(folder: Path, file: Path):
    """The model's Hugging Face tokenizer: from the folder's tokenizer files, else from the GGUF."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
