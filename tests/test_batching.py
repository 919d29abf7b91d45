"""Batching across sessions (services/calls.py, services/packed.py): verify and ar calls of
different sessions that wait for the verifier share one pass, and each gets what it would have
got alone: the same tokens, greedy or sampled (draws keyed by the call's seed), the same
context committed. Then the edges: a tree call and a context miss among them, a session
released mid-batch, a caller that gave up, the token budget; and over real processes, eight
concurrent sessions each produce the target's own greedy output."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.errors import ContextMiss
from services.runtime import ChainCall
from services.sampling import SamplingParams
from services.context import ContextDelta, common_prefix_len, fingerprint
from services.tree import Tree
from verifier_svc.core import VerifierCore

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module", params=["int8", "float64"])
def runtime(request, tiny_pair):
    from services.torch_runtime import load_torch

    return load_torch(tiny_pair.target_dir, dtype=request.param, device="cpu", max_sessions=32, threads=1)


def delta(session: str, held: list[int], new: list[int]) -> ContextDelta:
    """A delta over what the verifier holds for a session (held), adding `new`."""
    return ContextDelta(session, len(held), fingerprint(held), tuple(new))


def calls(n: int) -> list[tuple[str, list[int], list[int]]]:
    """(session, context, draft) of n sessions: contexts of different lengths, drafts of
    different lengths (an empty one is an `ar` step)."""
    return [(f"s{i}", list(range(20 + i, 40 + 3 * i)), [5 + i, 9, 11, 4][: i % 5]) for i in range(n)]


async def run_all(core: VerifierCore, work, params=GREEDY) -> list:
    return await asyncio.gather(
        *(core.verify(s, context, draft, [], params, seed=100 + i) for i, (s, context, draft) in enumerate(work))
    )


async def until_queued(core: VerifierCore, n: int) -> None:
    while core.queued < n:
        await asyncio.sleep(0)


def alone(runtime, work, params=GREEDY) -> list:
    """Each call on a core that never batches, one after another, every session from nothing."""
    for s, _, _ in work:
        runtime.release(s)
    core = VerifierCore(runtime, max_batch_tokens=0)

    async def one_by_one():
        return [await core.verify(s, c, d, [], params, seed=100 + i) for i, (s, c, d) in enumerate(work)]

    out = asyncio.run(one_by_one())
    for s, _, _ in work:
        runtime.release(s)
    return out


class FedTokens:
    """A runtime that records, per batched pass, its calls, the uncached context tokens its
    chain calls fed before the rows they asked for, and its kinds of call."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.passes: list[tuple[int, int]] = []  # (calls, uncached context tokens fed)
        self.kinds: list[set[str]] = []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def logits_batch(self, calls):
        fed = 0
        for c in calls:
            if isinstance(c, ChainCall):
                held = min(common_prefix_len(self.runtime.cached(c.session_id)[0], c.seq), len(c.seq) - c.n_last)
                fed += len(c.seq) - c.n_last - held
        self.passes.append((len(calls), fed))
        self.kinds.append({type(c).__name__ for c in calls})
        return self.runtime.logits_batch(calls)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_concurrent_calls_share_passes_and_get_what_they_get_alone(runtime, params):
    work = calls(8)
    expected = alone(runtime, work, params)
    core = VerifierCore(runtime)
    got = asyncio.run(run_all(core, work, params))
    assert [(v.accepted, v.tokens) for v in got] == [(v.accepted, v.tokens) for v in expected]
    assert core._calls.passes < len(work), "eight concurrent calls never shared a pass"
    for (s, context, draft), v in zip(work, got):
        assert core.contexts.state(s).context == [*context, *v.tokens]
    # The next round of each session reuses what the batched pass cached: deltas, one pass each.
    deltas = [(s, delta(s, [*context, *v.tokens], [])) for (s, context, _), v in zip(work, got)]
    asyncio.run(run_all(core, [(s, d, []) for s, d in deltas], params))
    assert core.contexts.counts.hits == len(work)
    for s, _, _ in work:
        runtime.release(s)


def test_a_tree_call_and_a_context_miss_among_batched_calls(runtime):
    work = calls(4)
    expected = alone(runtime, work)
    tree = Tree(tokens=(7, 8, 5), parents=(-1, -1, 0))
    tree_alone = asyncio.run(VerifierCore(runtime).verify_tree("tree", list(range(50, 70)), tree, [], GREEDY, 0))
    runtime.release("tree")
    recorded = FedTokens(runtime)
    core = VerifierCore(recorded)
    gate = threading.Event()
    core._calls.worker.submit(gate.wait)  # the worker is busy until every call waits

    async def mixed():
        task = asyncio.gather(
            run_all(core, work),
            core.verify_tree("tree", list(range(50, 70)), tree, [], GREEDY, 0),
            core.verify("unknown", delta("unknown", list(range(10)), [3]), [4], [], GREEDY, 0),
            return_exceptions=True,
        )
        await until_queued(core, len(work) + 2)
        gate.set()
        return await task

    chains, tree_got, miss = asyncio.run(mixed())
    assert [v.tokens for v in chains] == [v.tokens for v in expected]
    assert tree_got.tokens == tree_alone.tokens
    assert isinstance(miss, ContextMiss)
    assert any(kinds == {"ChainCall", "TreeCall"} for kinds in recorded.kinds), "the tree never shared a pass"
    assert runtime.cached("tree")[1] == 0, "the tree's cache kept more than its accepted path"
    for s in [*(s for s, _, _ in work), "tree"]:
        runtime.release(s)


def test_a_session_released_mid_batch_is_served_then_forgotten(runtime):
    work = calls(3)
    expected = alone(runtime, work)
    core = VerifierCore(runtime)

    async def with_release():
        batch = asyncio.ensure_future(run_all(core, work))
        await until_queued(core, len(work))  # the release is queued behind them
        released = await core.release("s1")
        return await batch, released

    got, released = asyncio.run(with_release())
    assert [v.tokens for v in got] == [v.tokens for v in expected]
    assert released and runtime.cached("s1") == ([], 0)
    with pytest.raises(ContextMiss):  # its caller resends the whole context
        asyncio.run(core.verify("s1", delta("s1", work[1][1], [3]), [], [], GREEDY, 0))
    for s, _, _ in work:
        runtime.release(s)


def test_a_caller_that_gave_up_leaves_the_others_served(runtime):
    work = calls(4)
    expected = alone(runtime, work)
    core = VerifierCore(runtime)

    async def one_cancelled():
        tasks = [asyncio.ensure_future(core.verify(s, c, d, [], GREEDY, seed=100 + i)) for i, (s, c, d) in enumerate(work)]
        await until_queued(core, len(work))
        tasks[2].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    got = asyncio.run(one_cancelled())
    assert isinstance(got[2], asyncio.CancelledError)
    assert [v.tokens for i, v in enumerate(got) if i != 2] == [v.tokens for i, v in enumerate(expected) if i != 2]
    assert core.queued == 0
    for s, _, _ in work:
        runtime.release(s)


def test_the_token_budget_splits_a_batch_oldest_first(runtime):
    """A budget of 30 tokens fits one 20-40 token call per pass: every call still runs, in
    arrival order, and a pass never waits for more."""
    work = calls(4)
    expected = alone(runtime, work)
    core = VerifierCore(runtime, max_batch_tokens=30)
    got = asyncio.run(run_all(core, work))
    assert [v.tokens for v in got] == [v.tokens for v in expected]
    assert core._calls.passes == len(work)
    for s, _, _ in work:
        runtime.release(s)


def test_calls_of_one_session_never_share_a_pass(runtime):
    """Two calls of one session (a client retrying) run one after the other, each over the
    context the other left: never in the same pass."""
    core = VerifierCore(runtime)
    context = list(range(30, 50))

    async def twice():
        return await asyncio.gather(
            core.verify("same", context, [], [], GREEDY, 0), core.verify("same", context, [7], [], GREEDY, 0)
        )

    first, second = asyncio.run(twice())
    assert core._calls.passes == 2
    assert core.contexts.state("same").context == [*context, *second.tokens]
    runtime.release("same")


def ar_steps(core: VerifierCore, session: str, context: list[int], steps: int, draft: list[int] = ()):
    """A session's `steps` rounds (the first with `draft`, then `ar`), each over what the last
    committed; the tokens of each round."""

    async def run() -> list[list[int]]:
        held, out = list(context), []
        for step in range(steps):
            v = await core.verify(session, held, list(draft) if step == 0 else [], [], GREEDY, step)
            held += v.tokens
            out.append(v.tokens)
        return out

    return run()


def test_long_prefills_are_fed_in_chunks_while_others_share_their_passes(runtime):
    """With other sessions decoding, two 70-token contexts share 8 uncached tokens a pass
    (the others' steps ride along), and every session gets what it gets alone; a lone long
    call is fed at once."""
    longs, draft = {"long0": list(range(100, 170)), "long1": list(range(200, 270))}, [7, 9]
    shorts = {f"d{i}": list(range(20 + i, 30 + i)) for i in range(3)}
    reference = VerifierCore(runtime, max_batch_tokens=0)
    expected = {s: asyncio.run(ar_steps(reference, s, c, 6)) for s, c in shorts.items()}
    expected |= {s: asyncio.run(ar_steps(reference, s, c, 1, draft)) for s, c in longs.items()}
    for s in expected:
        runtime.release(s)
    recorded = FedTokens(runtime)
    core = VerifierCore(recorded, prefill_chunk=8, batch_wait=0.5)

    async def together():
        return await asyncio.gather(
            *(ar_steps(core, s, c, 6) for s, c in shorts.items()),
            *(ar_steps(core, s, c, 1, draft) for s, c in longs.items()),
        )

    got = asyncio.run(together())
    assert dict(zip([*shorts, *longs], got)) == expected
    shared = [fed for calls, fed in recorded.passes if calls > 1]
    assert max(shared) <= 8 and sum(shared) >= 3 * 8, f"uncached tokens fed by shared passes: {shared}"
    assert core._calls.chunks >= 3
    runtime.release("long0")
    lone = VerifierCore(runtime, prefill_chunk=8)
    assert asyncio.run(ar_steps(lone, "long0", longs["long0"], 1, draft)) == expected["long0"]
    assert lone._calls.chunks == 0 and lone._calls.passes == 1
    for s in expected:
        runtime.release(s)


# ---------------------------------------------------------------- over real processes


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    from client import ServiceStack
    from procs import free_port

    metrics = f"127.0.0.1:{free_port()}"

    def extra_env(_: ServiceStack, name: str) -> dict[str, str]:
        return {"SPECD_METRICS_LISTEN": metrics} if name == "verifier" else {}

    s = ServiceStack(tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, tmp_path_factory.mktemp("batch"),
                     dtype="int8", extra_env=extra_env)  # fmt: skip
    s.up()
    s.metrics = f"http://{metrics}/metrics"
    yield s
    s.down()


def batch_calls(url: str) -> tuple[float, float]:
    """(passes, calls they served) from the verifier's specd:batch_calls histogram."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("specd:batch_calls_")}
    return values["specd:batch_calls_count"], values["specd:batch_calls_sum"]


PROMPTS = [f"def f{i}(x):\n    y = x * {i}\n    return" for i in range(8)]


@pytest.mark.parametrize("strategy", ["ar", "sd", "staged"])
def test_eight_concurrent_sessions_produce_the_targets_greedy_tokens(stack, strategy):
    from client import generate

    address = stack.address("orchestrator")
    expected = {p: generate(address, p, strategy="ar", max_new_tokens=24).token_ids for p in PROMPTS}
    passes, served = batch_calls(stack.metrics)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: generate(address, p, strategy=strategy, max_new_tokens=24), PROMPTS))
    assert [r.token_ids for r in results] == [expected[p] for p in PROMPTS]
    more_passes, more_served = batch_calls(stack.metrics)
    assert more_served - served > more_passes - passes, "no pass served two sessions at once"


def test_a_pass_waits_briefly_for_the_sessions_of_the_pass_before(runtime):
    """Two sessions served together stay together: when one comes back first, the pass waits
    (up to batch_wait) for the other instead of starting alone. A lone session never waits."""
    core = VerifierCore(runtime, batch_wait=2.0)
    a, b = list(range(30, 50)), list(range(60, 80))

    async def together():
        first = await asyncio.gather(core.verify("a", a, [], [], GREEDY, 0), core.verify("b", b, [], [], GREEDY, 0))
        passes = core._calls.passes
        late_b = asyncio.ensure_future(asyncio.sleep(0.05))
        second_a = asyncio.ensure_future(core.verify("a", [*a, *first[0].tokens], [], [], GREEDY, 1))
        await late_b
        second_b = await core.verify("b", [*b, *first[1].tokens], [], [], GREEDY, 1)
        await second_a
        return passes, core._calls.passes, second_b

    before, after, _ = asyncio.run(together())
    assert after - before == 1, "the second pass did not wait for the session that came back late"
    lone = VerifierCore(runtime, batch_wait=5.0)

    async def alone_steps():
        context = list(range(90, 100))
        for step in range(3):
            context += (await lone.verify("lone", context, [], [], GREEDY, step)).tokens

    asyncio.run(asyncio.wait_for(alone_steps(), timeout=4.0))  # would take 10 s if a lone session waited
    for s in ("a", "b", "lone"):
        runtime.release(s)


# ---------------------------------------------------------------- drafters


@pytest.fixture(scope="module", params=["llama", "float64"])
def drafter_runtime(request, tiny_pair):
    if request.param == "llama":
        from services.llama_runtime import load_llama

        rt = load_llama(tiny_pair.drafter_dir, max_sessions=16, max_draft=16, threads=1, kv_tokens=4096)
    else:
        from services.torch_runtime import load_torch

        rt = load_torch(tiny_pair.drafter_dir, dtype="float64", device="cpu", max_sessions=16, threads=1)
    yield rt
    getattr(rt, "close", lambda: None)()


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_concurrent_proposals_grow_in_lockstep_and_draft_what_they_draft_alone(drafter_runtime, params):
    """Six sessions' proposals (k from 1 to 6) share passes, one step of every growing draft
    per pass, and each draws with its own seed: the drafts they get alone."""
    from drafter_svc.core import DrafterCore

    work = [(f"d{i}", list(range(20 + i, 40 + 2 * i)), i + 1) for i in range(6)]

    async def propose_all(core, together: bool):
        calls = [core.propose(s, c, k, params, seed=7 + i) for i, (s, c, k) in enumerate(work)]
        if together:
            return await asyncio.gather(*calls)
        return [await call for call in calls]

    alone = asyncio.run(propose_all(DrafterCore(drafter_runtime, max_batch_tokens=0), together=False))
    for s, _, _ in work:
        drafter_runtime.release(s)
    core = DrafterCore(drafter_runtime)
    got = asyncio.run(propose_all(core, together=True))
    assert [d.tokens for d in got] == [d.tokens for d in alone]
    assert [len(d.tokens) for d in got] == [k for _, _, k in work]
    assert core._calls.passes < len(work), "six concurrent proposals never shared a batch"
    for s, _, _ in work:
        drafter_runtime.release(s)
