"""The runtime contract (services/runtime.py), one suite against every runtime on the tiny
models: KV caches reused by longest common prefix, rollback, tree passes equal to chain
passes along each path, keeping one path, LRU eviction, release. Then what only one runtime
promises: int8 rows bitwise independent of their batch, oneDNN linears equal to torch's.

Each runtime is checked against itself: a fresh session's pass over the same tokens is the
reference, within the runtime's own float tolerance (fp64: exact to 1e-9; int8: bitwise;
llama.cpp, F32 weights and an f16 KV cache: 1e-3).
"""

from __future__ import annotations

import copy

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from services.prefixes import Prefixes
from services.tree import Tree

CONTEXT = list(range(30, 50))
# The tree of services/tree.py's docstring: 0: 7 (root)  1: 8 (root)  2: 5 (0)  3: 6 (0)  4: 9 (2)
TREE = Tree(tokens=(7, 8, 5, 6, 9), parents=(-1, -1, 0, 0, 2))
RUNTIMES = {"torch-float64": 1e-9, "torch-int8": 0.0, "llama": 1e-3}  # name -> tolerance


def load(kind: str, folder, max_sessions: int = 4, resident_cells: int = 10**6):
    """The contract suite keeps every llama.cpp session in the cache (the reference `fresh`
    runs in a session of its own); parking is tested on its own, below."""
    if kind == "llama":
        from services.llama_runtime import load_llama

        return load_llama(
            folder, max_sessions=max_sessions, max_draft=16, threads=1, kv_tokens=4096, resident_cells=resident_cells
        )
    from services.torch_runtime import load_torch

    return load_torch(folder, dtype=kind.split("-")[1], device="cpu", max_sessions=max_sessions, threads=1)


@pytest.fixture(scope="module", params=list(RUNTIMES))
def runtime(request, tiny_pair):
    rt = load(request.param, tiny_pair.target_dir)
    rt.tolerance = RUNTIMES[request.param]
    rt.kind = request.param
    yield rt
    getattr(rt, "close", lambda: None)()


def fresh(rt, seq: list[int]) -> torch.Tensor:
    """The runtime's own logits after seq, from a session with nothing cached (and no kept
    context of another session copied in: services/prefixes.py)."""
    kept, rt.prefixes = rt.prefixes, Prefixes(0)
    try:
        row = rt.logits("fresh", seq, 1)[0]
    finally:
        rt.prefixes = kept
    rt.release("fresh")
    return row


def close(rt, a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a.double() - b.double()).abs().max() <= rt.tolerance)


def path_seq(tree: Tree, node: int, context: list[int] = CONTEXT) -> list[int]:
    return context + [tree.tokens[i] for i in tree.path(node)]


def test_logits_match_a_fresh_pass_whatever_the_cache_held(runtime):
    seq = list(range(10, 40))
    # Grow, roll back past a rejected draft, and branch: each answer equals a fresh pass.
    rows = runtime.logits("s", seq[:20], 3)
    assert all(close(runtime, rows[i], fresh(runtime, seq[: 18 + i])) for i in range(3))
    rows = runtime.logits("s", seq[:25], 5)
    assert all(close(runtime, rows[i], fresh(runtime, seq[: 21 + i])) for i in range(5))
    branch = seq[:22] + [7, 8, 9]
    rows = runtime.logits("s", branch, 4)
    assert all(close(runtime, rows[i], fresh(runtime, branch[: 22 + i])) for i in range(4))
    assert close(runtime, runtime.logits("s", seq, 1)[0], fresh(runtime, seq))
    assert runtime.cached("s") == (seq, 0)
    runtime.release("s")


def test_a_repeated_sequence_refeeds_only_the_last_token(runtime):
    seq = list(range(5, 25))
    first = runtime.logits("s", seq, 1)
    assert close(runtime, runtime.logits("s", seq, 1)[0], first[0])
    assert runtime.cached("s") == (seq, 0)
    runtime.release("s")


def test_sessions_are_evicted_least_recently_used_and_released(tiny_pair, runtime):
    rt = load(runtime.kind, tiny_pair.target_dir, max_sessions=2)
    for sid in ("a", "b"):
        rt.logits(sid, [1, 2, 3], 1)
    rt.logits("a", [1, 2, 3, 4], 1)  # a is now the most recent
    rt.logits("c", [4, 5], 1)
    assert rt.cached("b") == ([], 0) and rt.cached("a") == ([1, 2, 3, 4], 0)
    assert rt.session_count == 2
    assert rt.release("a") and not rt.release("a") and rt.session_count == 1
    # An evicted session is only a miss: recomputed, the same logits.
    assert close(runtime, rt.logits("b", [1, 2, 3], 1)[0], fresh(runtime, [1, 2, 3]))


def test_a_new_session_copies_a_kept_context_that_begins_it(runtime):
    """Session a prefills a context from nothing: it is kept. Session b, beginning with the same
    20 tokens (a chat template and system prompt), copies their entries and feeds the rest;
    its logits are what prefilling it all gives. The kept copy is a copy: a's cache rolled
    back and grown in place after it changes nothing of b's."""
    before, runtime.prefixes = runtime.prefixes, Prefixes(2)
    copied = REGISTRY.get_sample_value("specd:prefix_cache_tokens_total") or 0.0
    shared = list(range(100, 120))
    a, b = shared + [5, 6, 7, 8], shared + [9, 10, 11]
    runtime.logits("a", a, 1)
    assert len(runtime.prefixes) == 1 and runtime.prefixes.hits == 0
    runtime.logits("a", shared[:10] + [1, 2, 3, 4, 5], 2)  # a's own cache, cut and grown in place
    rows = runtime.logits("b", b, 3)
    assert runtime.prefixes.hits == 1 and runtime.prefixes.reused_tokens == len(shared)
    assert REGISTRY.get_sample_value("specd:prefix_cache_tokens_total") == copied + len(shared)  # the metric
    assert all(close(runtime, rows[i], fresh(runtime, b[: len(b) - 2 + i])) for i in range(3))
    assert runtime.cached("b") == (b, 0)
    # b went beyond what it copied: its context is kept too, and a third session finds the longer match
    assert len(runtime.prefixes) == 2
    c = b[:-1] + [12, 13]
    assert close(runtime, runtime.logits("c", c, 1)[0], fresh(runtime, c))
    assert runtime.prefixes.reused_tokens == 2 * len(shared) + 2
    # Too little in common (fewer than MIN_TOKENS): prefilled from nothing
    short = shared[:5] + list(range(300, 320))
    assert close(runtime, runtime.logits("d", short, 1)[0], fresh(runtime, short))
    assert runtime.prefixes.hits == 2
    for sid in "abcd":
        runtime.release(sid)
    runtime.prefixes = before


def test_tree_pass_equals_a_chain_pass_per_path(runtime):
    runtime.logits("s", CONTEXT[:12], 1)  # a warm cache over part of the context: 8 tokens ride along
    rows = runtime.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)  # (N+1, V)
    assert close(runtime, rows[0], fresh(runtime, CONTEXT))
    for node in range(len(TREE)):
        assert close(runtime, rows[1 + node], fresh(runtime, path_seq(TREE, node))), node
    assert runtime.cached("s") == (CONTEXT, len(TREE))
    runtime.release("s")


def test_a_long_uncached_context_is_prefilled_first(runtime):
    from services.torch_runtime import TREE_PREFILL

    context = list(range(100, 100 + TREE_PREFILL + 20))
    rows = runtime.tree_logits("s", context, TREE, len(TREE) + 1)
    assert close(runtime, rows[0], fresh(runtime, context))
    assert close(runtime, rows[5], fresh(runtime, context + [7, 5, 9]))
    assert runtime.cached("s") == (context, len(TREE))
    runtime.release("s")


def test_keep_path_compacts_the_cache_to_the_accepted_path(runtime):
    runtime.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)
    runtime.keep_path("s", [0, 2, 4])
    assert runtime.cached("s") == (CONTEXT + [7, 5, 9], 0)
    # The compacted cache is the one a chain pass builds: the next token's logits agree.
    seq = CONTEXT + [7, 5, 9, 11]
    assert close(runtime, runtime.logits("s", seq, 1)[0], fresh(runtime, seq))
    assert runtime.cached("s") == (seq, 0)
    runtime.release("s")


def test_keep_path_refuses_a_non_path(runtime):
    runtime.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)
    with pytest.raises(ValueError, match="not a path"):
        runtime.keep_path("s", [0, 4])
    runtime.release("s")


def test_a_later_pass_keeps_the_cached_path_it_continues(runtime):
    """A drafter's cache after a tree round: the next context runs through nodes 0 and 3."""
    runtime.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)
    seq = CONTEXT + [7, 6, 12]
    assert close(runtime, runtime.logits("s", seq, 1)[0], fresh(runtime, seq))
    assert runtime.cached("s") == (seq, 0)
    runtime.release("s")


def test_growing_a_tree_feeds_only_new_nodes(runtime):
    first = Tree((7, 8), (-1, -1))
    runtime.tree_logits("s", CONTEXT, first, 3)
    rows = runtime.tree_logits("s", CONTEXT, TREE, 3)  # nodes 2, 3, 4 are new
    assert runtime.cached("s") == (CONTEXT, len(TREE))
    for row, node in zip(rows, (2, 3, 4)):
        assert close(runtime, row, fresh(runtime, path_seq(TREE, node))), node
    # A third depth below a node that was a leaf, and a new sibling of a cached node.
    deeper = Tree((*TREE.tokens, 3, 4), (*TREE.parents, 4, 1))
    rows = runtime.tree_logits("s", CONTEXT, deeper, 2)
    for row, node in zip(rows, (5, 6)):
        assert close(runtime, row, fresh(runtime, path_seq(deeper, node))), node
    runtime.keep_path("s", [0, 2, 4, 5])
    seq = CONTEXT + [7, 5, 9, 3, 1]
    assert close(runtime, runtime.logits("s", seq, 1)[0], fresh(runtime, seq))
    runtime.release("s")


def test_trees_of_two_sessions_share_the_cache(runtime):
    """Two sessions with trees cached at once (drafters between rounds) stay correct."""
    other = [c + 1 for c in CONTEXT]
    runtime.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)
    rows = runtime.tree_logits("t", other, TREE, len(TREE) + 1)
    assert close(runtime, rows[3], fresh(runtime, other + [7, 5]))
    seq = CONTEXT + [8, 2]
    assert close(runtime, runtime.logits("s", seq, 1)[0], fresh(runtime, seq))
    runtime.release("s")
    runtime.release("t")


def test_the_info_describes_the_model(runtime, tiny_pair):
    from services.runtime import tokenizer_fingerprint

    info = runtime.info
    assert info.vocab_size == 512 and info.max_context >= 2048 and info.eos_token_ids == (2,)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(runtime.tokenizer)
    assert info.runtime == runtime.kind.split("-")[0]


def test_a_batch_equals_each_call_alone(runtime):
    """logits_batch over sessions in every state (a new one, a verify after a cached context,
    one that rolls back, one-token steps) gives each what its own pass gives, and leaves every
    cache as its own pass would: the next calls reuse them."""
    from services.runtime import ChainCall

    seqs = {"new": list(range(60, 75)), "verify": CONTEXT + [7, 8, 9, 10], "rollback": CONTEXT[:15] + [3, 4]}
    runtime.logits("verify", CONTEXT, 1)
    runtime.logits("rollback", CONTEXT + [5, 6], 1)
    runtime.logits("step", CONTEXT, 1)
    calls = [ChainCall("new", seqs["new"], 3), ChainCall("verify", seqs["verify"], 5),
             ChainCall("rollback", seqs["rollback"], 2), ChainCall("step", CONTEXT + [11], 1)]  # fmt: skip
    rows = runtime.logits_batch(calls)
    for call, got in zip(calls, rows):
        want = torch.stack([fresh(runtime, list(call.seq[: len(call.seq) - call.n_last + i + 1])) for i in range(call.n_last)])
        assert got.shape == want.shape and close(runtime, got, want), call.session_id
    assert runtime.cached("verify")[0] == seqs["verify"]
    again = runtime.logits_batch([ChainCall("verify", seqs["verify"] + [12], 1), ChainCall("step", CONTEXT + [11, 12], 1)])
    assert close(runtime, again[0][0], fresh(runtime, seqs["verify"] + [12]))
    assert close(runtime, again[1][0], fresh(runtime, CONTEXT + [11, 12]))
    with pytest.raises(ValueError, match="one call per session"):
        runtime.logits_batch([ChainCall("step", CONTEXT, 1), ChainCall("step", CONTEXT, 1)])
    for session in ("new", "verify", "rollback", "step"):
        runtime.release(session)


def test_a_batch_next_to_a_tree_keeps_both_caches(runtime):
    """A session whose cache ends in a tree (staged) settles its path before joining a batch."""
    from services.runtime import ChainCall

    runtime.tree_logits("t", CONTEXT, TREE, len(TREE) + 1)
    seq = path_seq(TREE, 4) + [3]  # continues the path 0 -> 2 -> 4
    rows = runtime.logits_batch([ChainCall("t", seq, 2), ChainCall("u", CONTEXT, 1)])
    assert close(runtime, rows[0][1], fresh(runtime, seq))
    assert close(runtime, rows[1][0], fresh(runtime, CONTEXT))
    runtime.release("t")
    runtime.release("u")


def test_a_tree_shares_a_batch_with_chains(runtime):
    """A draft tree in a batch (a staged verify among other sessions' verify calls) gives
    what its own tree pass gives, each node what the chain along its path gives; the cache
    then holds the context and the tree, and keeping a path makes it a chain again. On torch
    int8 the rows are bitwise those of its own tree pass."""
    from services.runtime import ChainCall, TreeCall

    alone = runtime.tree_logits("own", CONTEXT[:-1] + [4], TREE, len(TREE) + 1)
    runtime.release("own")
    runtime.logits("verify", CONTEXT[:12], 1)
    calls = [ChainCall("verify", CONTEXT[:12] + [7, 8], 3), TreeCall("tree", CONTEXT[:-1] + [4], TREE, len(TREE) + 1),
             ChainCall("new", CONTEXT[:9], 1)]  # fmt: skip
    chain, tree, new = runtime.logits_batch(calls)
    assert close(runtime, chain[2], fresh(runtime, CONTEXT[:12] + [7, 8]))
    assert close(runtime, new[0], fresh(runtime, CONTEXT[:9]))
    assert close(runtime, tree, alone)
    if runtime.kind == "torch-int8":
        assert torch.equal(tree, alone)
    for node in range(len(TREE)):
        assert close(runtime, tree[1 + node], fresh(runtime, path_seq(TREE, node, CONTEXT[:-1] + [4]))), node
    assert runtime.cached("tree") == (CONTEXT[:-1] + [4], len(TREE))
    runtime.keep_path("tree", [0, 2])
    step = runtime.logits("tree", path_seq(TREE, 2, CONTEXT[:-1] + [4]) + [3], 1)
    assert close(runtime, step[0], fresh(runtime, path_seq(TREE, 2, CONTEXT[:-1] + [4]) + [3]))
    for session in ("verify", "tree", "new"):
        runtime.release(session)


# ---------------------------------------------------------------- what one runtime promises


@pytest.fixture(scope="module", params=["onednn", "fbgemm"])
def int8(tiny_pair, request):
    """The int8 runtime on each kernel (services/int8.KERNELS)."""
    from services.torch_runtime import load_torch

    return load_torch(
        tiny_pair.target_dir, dtype="int8", device="cpu", max_sessions=4, threads=1, int8_kernel=request.param
    )


def test_int8_rows_do_not_depend_on_their_batch(int8):
    """Every row of a pass is bitwise what a one-token pass gives (services/int8.py): a
    prefill, a verify over 6 tokens and a tree pass against one token at a time."""
    seq = list(range(60, 100))
    steps = {}
    int8.logits("a", seq[:10], 1)
    for i in range(11, len(seq) + 1):
        steps[i] = int8.logits("a", seq[:i], 1)[0]
    prefill = int8.logits("b", seq, len(seq) - 10)
    assert all(torch.equal(prefill[j], steps[11 + j]) for j in range(len(seq) - 10))
    int8.logits("c", seq[:20], 1)
    verify = int8.logits("c", seq[:26], 6)
    assert all(torch.equal(verify[j], steps[21 + j]) for j in range(6))
    tree = Tree((seq[20], 7, seq[21]), (-1, -1, 0))
    rows = int8.tree_logits("d", seq[:20], tree, 4)
    assert torch.equal(rows[0], steps[20]) and torch.equal(rows[1], steps[21]) and torch.equal(rows[3], steps[22])


def test_int8_keeps_the_fp32_models_choices_mostly(tiny_pair, int8):
    """Quantized, the model stays the model: its argmax agrees with fp32's on most positions."""
    fp32 = load("torch-float64", tiny_pair.target_dir)
    seq = list(range(100, 180))
    agree = (int8.logits("q", seq, 60).argmax(-1) == fp32.logits("q", seq, 60).argmax(-1)).float().mean()
    assert agree >= 0.8, f"int8 agrees with fp32 on {float(agree):.0%} of positions"


@torch.inference_mode()
def test_stacked_projections_change_no_bit(tiny_pair, int8):
    """The int8 runtime stacks q, k, v and gate, up into one GEMM each (services/int8.py):
    its logits are bitwise those of the same int8 model calling them one by one, in a
    prefill, a decode step and a packed pass of two sessions."""
    from services.int8 import Int8Linear, StackedPart, quantize_model, use_rowwise_attention
    from services.packed import Segment, packed_forward
    from services.torch_runtime import _new_cache

    parts = [m for m in int8.model.modules() if isinstance(m, StackedPart)]
    assert len(parts) == 5 * int8.model.config.num_hidden_layers
    separate = AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir, dtype=torch.float32).eval()
    quantize_model(separate, next(m for m in int8.model.modules() if isinstance(m, Int8Linear)).kernel)
    use_rowwise_attention(separate)
    models = (int8.model, separate)
    seq = list(range(40, 80))
    caches = [_new_cache(m) for m in models]
    prefill = [m(torch.tensor([seq]), past_key_values=c, use_cache=True).logits for m, c in zip(models, caches)]
    assert torch.equal(*prefill)
    step = [m(torch.tensor([[7]]), past_key_values=c, use_cache=True).logits for m, c in zip(models, caches)]
    assert torch.equal(*step)
    packed = [
        packed_forward(m, [Segment(c, len(seq) + 1, [3, 4, 5], 3), Segment(_new_cache(m), 0, seq[:9], 2)])
        for m, c in zip(models, caches)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*packed))

@torch.inference_mode()
def test_onednn_linears_agree_with_torch(tiny_pair):
    from services.torch_runtime import use_onednn_linears

    stock = AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir, dtype=torch.float32).eval()
    fast = copy.deepcopy(stock)
    assert use_onednn_linears(fast) == sum(isinstance(m, torch.nn.Linear) for m in stock.modules())
    ids = torch.tensor([list(range(30, 60))])
    a, b = stock(ids).logits, fast(ids).logits
    assert (a - b).abs().max() < 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))


# ---------------------------------------------------------------- llama.cpp: parked sessions


@pytest.fixture(scope="module")
def llama(tiny_pair):
    rt = load("llama", tiny_pair.target_dir, resident_cells=0)  # the default: park every other session
    rt.tolerance = RUNTIMES["llama"]
    yield rt
    rt.close()


def test_llama_parks_the_other_sessions_while_one_runs(llama):
    """A pass attends over every cell of the cache, so the other sessions' cells are copied
    out while one runs; a parked session continues where it was."""
    a, b = list(range(10, 40)), list(range(60, 90))
    llama.logits("a", a, 1)
    parks, unparks = llama.parks, llama.unparks
    llama.logits("b", b, 1)
    assert llama.parks == parks + 1 and llama._slots.peek("a").cells == 0
    assert llama.cached("a") == (a, 0)  # parked, not forgotten
    assert close(llama, llama.logits("a", a + [5], 1)[0], fresh(llama, a + [5]))
    assert llama.unparks == unparks + 1 and llama._slots.peek("b").cells == 0
    assert close(llama, llama.logits("b", b + [6, 7], 2)[1], fresh(llama, b + [6, 7]))
    llama.release("a")
    llama.release("b")


def test_llama_a_parked_drafter_tree_is_dropped_and_its_path_refed(llama):
    llama.tree_logits("s", CONTEXT, TREE, len(TREE) + 1)
    llama.logits("other", list(range(90, 100)), 1)  # parks s, whose tree goes
    assert llama.cached("s") == (CONTEXT, 0)
    seq = CONTEXT + [7, 5, 9]
    assert close(llama, llama.logits("s", seq, 1)[0], fresh(llama, seq))
    llama.release("s")
    llama.release("other")


def test_llama_a_full_cache_parks_rather_than_forgets(tiny_pair):
    from services.llama_runtime import load_llama

    rt = load_llama(tiny_pair.target_dir, max_sessions=4, max_draft=4, threads=1, kv_tokens=256, resident_cells=10**6)
    rt.tolerance = RUNTIMES["llama"]
    seqs = {sid: [start + i % 50 for i in range(100)] for sid, start in (("a", 10), ("b", 100), ("c", 200))}
    for sid, seq in seqs.items():  # a and b fill 200 of 256 cells; c does not fit beside them
        rt.logits(sid, seq, 1)
    assert rt.parks >= 1 and rt._slots.peek("a").cells == 0 and rt.cached("a") == (seqs["a"], 0)
    assert close(rt, rt.logits("a", seqs["a"] + [3], 1)[0], fresh(rt, seqs["a"] + [3]))
    rt.close()


def test_a_llama_drafter_gets_its_own_kv_budget_and_reads_the_tokenizer_on_demand(tiny_pair):
    """SPECD_KV_TOKENS unset: a drafter's cache holds DRAFTER_KV_TOKENS cells, a verifier's the
    model's context; the tokenizer is dropped after load (its fingerprint kept) and read again
    on first use."""
    from services.config import ModelServiceConfig
    from services.llama_runtime import DRAFTER_KV_TOKENS
    from services.runtime import load_runtime, tokenizer_fingerprint

    config = ModelServiceConfig(model=str(tiny_pair.target_dir), listen="", home=tiny_pair.target_dir, runtime="llama",
                                threads=1, max_sessions=2)  # fmt: skip
    cells = {}
    for role in ("drafter", "verifier"):
        rt = load_runtime(config, role)
        cells[role] = rt._lib.llama_n_ctx(rt._ctx)
        if role == "drafter":
            assert rt._tokenizer is None and rt.info.tokenizer_fingerprint
            assert tokenizer_fingerprint(rt.tokenizer) == rt.info.tokenizer_fingerprint  # read on first use
        rt.close()
    n_ctx_train = cells["verifier"]
    assert cells["drafter"] == DRAFTER_KV_TOKENS and n_ctx_train != DRAFTER_KV_TOKENS
