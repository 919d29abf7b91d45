"""Integration: cascade and staged through real processes (verifier, two drafters, a
max-gram drafter service, three orchestrators) and a real redis-server, on tiny models.

Greedy output of both strategies must equal plain decoding (`ar`, itself checked against
transformers' generate in tests/test_pipeline.py); seeded sampling replays; sessions continue
the same after a drafter restart (context misses on Review and ProposeTree); bad options get
INVALID_ARGUMENT.
"""

from __future__ import annotations

import time

import grpc
import pytest
from client import ServiceStack, generate
from tiny import build_model, build_tokenizer

from services.pb import specd_pb2 as pb

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",  # repeats itself: max-gram has matches
    "The quick brown fox",
]
NEW = 32


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    """orchestrator: the default cascade (drafter <- in-process max-gram); orchestrator2: four
    levels, drafter <- drafter2 <- the max-gram drafter service <- in-process max-gram;
    orchestrator3: as orchestrator, with drafter and verifier on cores of their own."""
    root = tmp_path_factory.mktemp("strategies")
    # A second, worse drafter for the middle of a deep cascade: the target plus more noise.
    drafter2 = build_model(root / "drafter2", build_tokenizer(root / "tok"), seed=2, base=tiny_pair.target_dir, noise=0.01)

    def extra_env(stack: ServiceStack, name: str) -> dict[str, str]:
        if name == "drafter2":
            return {"SPECD_MODEL": str(drafter2)}
        if name == "drafter3":  # the max-gram drafter service
            return {"SPECD_MODEL": "maxgram"}
        if name == "orchestrator2":
            levels = [stack.address("drafter"), stack.address("drafter2"), stack.address("drafter3"), "maxgram"]
            return {"SPECD_CASCADE": ",".join(levels)}
        if name == "orchestrator3":  # drafter and verifier as on machines of their own
            return {"SPECD_OWN_CORES": "1"}
        return {}

    s = ServiceStack(
        tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, root / "logs",
        services=("verifier", "drafter", "drafter2", "drafter3", "orchestrator", "orchestrator2", "orchestrator3"),
        extra_env=extra_env,
    )  # fmt: skip
    s.up()
    yield s
    s.down()


# orchestrator2's four levels: the drafter drafts 3 (reviewing drafter2's 2 and the max-gram
# service's 1), then in-process max-gram 2; drafter2 reviews 2 from the max-gram service.
DEEP = [[3, 0, 0, 2], [0, 2, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]]


def k_matrix(rows) -> pb.StrategyOptions:
    return pb.StrategyOptions(k_matrix=[pb.KRow(k=row) for row in rows])


def tree(branching, budget) -> pb.StrategyOptions:
    return pb.StrategyOptions(tree=pb.TreeShape(branching=branching, budget=budget))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_cascade_and_staged_equal_ar(stack, prompt):
    main, deep = stack.address("orchestrator"), stack.address("orchestrator2")
    expected = generate(main, prompt, strategy="ar", max_new_tokens=NEW).token_ids
    runs = {
        "cascade, default k-matrix": (main, dict(strategy="cascade")),
        "cascade, horizontal only": (main, dict(strategy="cascade", options=k_matrix([[3, 3], [0, 0]]))),
        "cascade, four levels": (deep, dict(strategy="cascade", options=k_matrix(DEEP))),
        "staged, default tree": (main, dict(strategy="staged")),
        "staged, bushy tree": (main, dict(strategy="staged", options=tree([3, 2, 2], 12))),
    }  # fmt: skip
    for what, (address, fields) in runs.items():
        result = generate(address, prompt, max_new_tokens=NEW, **fields)
        assert result.token_ids == expected, what
        assert result.stats.drafted > 0 and result.stats.target_forwards < NEW, what


def test_adaptive_staged_drafts_trees_and_chains_and_equals_ar(stack):
    """Adaptive staged chooses each round between its tree and a chain of first candidates
    (orchestrator/adaptive.TreeWidth): over a few turns both shapes draft, and every turn's
    output is ar's."""
    main = stack.address("orchestrator")
    expected = generate(main, PROMPTS[0], strategy="ar", max_new_tokens=NEW).token_ids
    chains = drafting = 0
    for _ in range(4):
        result = generate(main, PROMPTS[0], strategy="staged", max_new_tokens=NEW)
        assert result.token_ids == expected
        chains += result.stats.chain_rounds
        drafting += result.stats.target_forwards - result.stats.ar_rounds
    assert 0 < chains < drafting


def test_sampled_runs_replay_with_their_seed(stack):
    address = stack.address("orchestrator2")
    for strategy in ("cascade", "staged"):
        options = k_matrix(DEEP) if strategy == "cascade" else None
        kwargs = dict(strategy=strategy, max_new_tokens=24, temperature=1.2, top_p=0.95, options=options)
        first = generate(address, PROMPTS[0], seed=5, **kwargs)
        assert generate(address, PROMPTS[0], seed=5, **kwargs).token_ids == first.token_ids, strategy
        assert generate(address, PROMPTS[0], seed=6, **kwargs).token_ids != first.token_ids, strategy


def test_sessions_continue_the_same_after_a_drafter_restart(stack):
    """The restarted drafter has lost its caches: Review and ProposeTree report a context miss,
    the orchestrator resends, and nothing changes."""
    address = stack.address("orchestrator2")
    runs = {
        "cascade": dict(strategy="cascade", options=k_matrix(DEEP)),
        "staged": dict(strategy="staged"),
    }

    def two_turns(restart: bool) -> dict[str, tuple[list[int], list[int]]]:
        sampling = dict(max_new_tokens=16, temperature=1.0, seed=9)
        firsts = {what: generate(address, PROMPTS[1], **sampling, **fields) for what, fields in runs.items()}
        if restart:
            stack.restart("drafter")
            time.sleep(1.5)  # the orchestrator's next health check sees it back; till then rounds draft with max-gram
        return {
            what: (first.token_ids, generate(address, " jumps", session_id=first.stats.session_id, **sampling, **runs[what]).token_ids)
            for what, first in firsts.items()
        }

    assert two_turns(restart=True) == two_turns(restart=False)


@pytest.mark.parametrize(
    "options, words",
    [
        (k_matrix([[4, 2]]), "k_matrix"),
        (k_matrix([[4, 2], [1, 3]]), "left of the diagonal"),
        (tree([], 4), "branching"),
        (tree([2, 0], 4), "branching"),
        (tree([2, 2], 0), "budget"),
    ],
)
def test_bad_options_get_invalid_argument(stack, options, words):
    strategy = "staged" if options.HasField("tree") else "cascade"
    with pytest.raises(grpc.RpcError) as err:
        generate(stack.address("orchestrator"), "hi", strategy=strategy, max_new_tokens=4, options=options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_the_maxgram_service_proposes_but_does_not_review(stack):
    """A k-matrix that asks the max-gram service (level 3 of orchestrator2) to review fails
    clearly; the max-gram service's own proposals are covered by the four-level run above."""
    options = k_matrix([[2, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, 2]])  # row 3: level 3 reviews
    with pytest.raises(grpc.RpcError) as err:
        generate(stack.address("orchestrator2"), "hi", strategy="cascade", max_new_tokens=4, options=options)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "max-gram drafter has no distribution to review" in err.value.details()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_adaptive_and_pipelined_sd_equal_ar(stack, prompt):
    """The stack's default k is adaptive; sd-pipe drafts the next round during each verify."""
    address = stack.address("orchestrator")
    expected = generate(address, prompt, strategy="ar", max_new_tokens=NEW).token_ids
    for what, fields in {
        "sd, adaptive": dict(strategy="sd"),
        "sd-pipe, adaptive": dict(strategy="sd-pipe"),
        "sd-pipe, k 3": dict(strategy="sd-pipe", options=pb.StrategyOptions(k=3)),
        "tli, adaptive": dict(strategy="tli"),
        "sd-pipe, adaptive, own cores": dict(strategy="sd-pipe"),  # plain rounds draft ahead
    }.items():
        at = stack.address("orchestrator3") if "own cores" in what else address
        result = generate(at, prompt, max_new_tokens=NEW, **fields)
        assert result.token_ids == expected, what
        assert result.stats.adaptive == ("k 3" not in what), what
        assert result.stats.mean_draft_length > 0, what
        if "sd-pipe" in what:
            assert result.stats.speculative_drafts > 0, what
            assert result.stats.speculative_hits <= result.stats.speculative_drafts, what
            # every draft used had its verify sent ahead (SPECD_VERIFY_AHEAD is on by default)
            assert result.stats.speculative_verified == result.stats.speculative_hits, what


def test_the_round_trips_a_round_waits_for(stack):
    """`ar` waits for one call a round and `sd` for two where it drafts; `sd-pipe` for fewer: a
    round that uses a speculative draft waited for no draft call of its own, nor for its verify
    where that was sent before the round began."""
    address, prompt = stack.address("orchestrator"), PROMPTS[0]
    plain = generate(address, prompt, strategy="ar", max_new_tokens=NEW).stats
    assert plain.round_trips == plain.target_forwards
    for strategy in ("sd", "sd-pipe"):
        s = generate(address, prompt, strategy=strategy, max_new_tokens=NEW, options=pb.StrategyOptions(k=3)).stats
        sequential = s.target_forwards + (s.target_forwards - s.ar_rounds)  # a verify a round, a draft where it drafted
        if strategy == "sd":
            assert s.round_trips == sequential
        else:
            assert s.speculative_hits > 0
            assert s.round_trips <= sequential - s.speculative_hits, (s.round_trips, sequential, s.speculative_hits)


def test_pipelined_sampling_replays_with_its_seed(stack):
    address = stack.address("orchestrator")
    kwargs = dict(strategy="sd-pipe", max_new_tokens=24, temperature=1.0, top_k=20)
    first = generate(address, PROMPTS[1], seed=3, **kwargs)
    assert generate(address, PROMPTS[1], seed=3, **kwargs).token_ids == first.token_ids
    assert generate(address, PROMPTS[1], seed=4, **kwargs).token_ids != first.token_ids


def test_a_discarded_speculative_draft_leaves_the_drafter_consistent(stack):
    """A speculative Propose that is cancelled in flight, or finishes and is thrown away, leaves
    the drafter's caches such that the next Propose of the session drafts exactly what a
    fresh session drafts after the same context."""
    import asyncio

    from orchestrator.backends import RemoteDrafter
    from orchestrator.strategies import Lookahead
    from services.sampling import SamplingParams
    from services.server import channel_options

    context = [5, 17, 9, 33, 12, 40, 7, 21]
    params = SamplingParams(temperature=0.8)

    async def run() -> tuple[list, list]:
        async with grpc.aio.insecure_channel(stack.address("drafter"), options=channel_options()) as channel:
            drafter = RemoteDrafter(stack.address("drafter"), channel, 60.0)
            got, fresh = [], []
            for n, cancel_after in enumerate((0.0, 0.005, None)):  # at once, mid-call, after it finished
                session = f"spec-{n}"
                await drafter.propose(session, context, 4, params, 1)
                ahead = Lookahead()
                assumed = [*context, 3, 3, 3]
                ahead.start(assumed, drafter.propose(session, assumed, 6, params, 2))
                if cancel_after is None:
                    await ahead.task
                else:
                    await asyncio.sleep(cancel_after)
                assert await ahead.take([*context, 8], 4, 64) is None  # the verifier took another path
                await ahead.close()
                truth = [*context, 8, 11]
                got.append((await drafter.propose(session, truth, 5, params, 9)).tokens)
                fresh.append((await drafter.propose(f"fresh-{n}", truth, 5, params, 9)).tokens)
            return got, fresh

    got, fresh = asyncio.run(run())
    assert got == fresh


def test_a_drafter_that_goes_on_after_its_answer_gives_the_draft_a_fresh_session_gets(stack):
    """Over gRPC (Propose's continue_k): the call a continuation drafted for, and a call of
    another context that cancels one, each get what a fresh session of the real drafter
    drafts; so the continuation and its cancellation leave the drafter's caches consistent."""
    import asyncio

    from orchestrator.backends import RemoteDrafter
    from services.sampling import SamplingParams
    from services.server import channel_options

    context = [5, 17, 9, 33, 12, 40, 7, 21]
    params = SamplingParams(temperature=0.8)

    async def run() -> tuple[list, list]:
        async with grpc.aio.insecure_channel(stack.address("drafter"), options=channel_options()) as channel:
            drafter = RemoteDrafter(stack.address("drafter"), channel, 60.0)
            first = await drafter.propose_and_continue("cont", context, 3, params, 1, 5, 2)
            after = [*context, *first.tokens]
            served = await drafter.propose_and_continue("cont", after, 4, params, 2, 6, 3)
            other = [*after, 8, 11]  # not the context its continuation drafts after: cancelled
            cancelled = await drafter.propose("cont", other, 5, params, 4)
            assert (first.continued, served.continued, cancelled.continued) == (False, True, False)
            got = [first.tokens, served.tokens, cancelled.tokens]
            fresh = [
                (await drafter.propose("cont-fresh", context, 3, params, 1)).tokens,
                (await drafter.propose("cont-fresh2", after, 4, params, 2)).tokens,
                (await drafter.propose("cont-fresh3", other, 5, params, 4)).tokens,
            ]
            return got, fresh

    got, fresh = asyncio.run(run())
    assert got == fresh


def over_grpc(stack, calls):
    """What `calls(verifier)` returns, run against the stack's verifier over gRPC."""
    import asyncio

    from orchestrator.backends import RemoteVerifier
    from services.server import channel_options

    async def run():
        async with grpc.aio.insecure_channel(stack.address("verifier"), options=channel_options()) as channel:
            return await calls(RemoteVerifier(stack.address("verifier"), channel, 60.0))

    return asyncio.run(run())


VERIFIED_CONTEXT = [5, 17, 9, 33, 12, 40, 7, 21]


def test_a_verify_sent_ahead_runs_only_on_the_context_it_claims(stack):
    """Over gRPC: a verify sent ahead whose claimed context the verifier does not hold is
    refused (None) and changes nothing; one whose claim holds answers exactly what a verify of
    that context answers in a fresh session."""
    from services.sampling import SamplingParams

    greedy = SamplingParams()

    async def calls(verifier):
        first = await verifier.verify("ahead", VERIFIED_CONTEXT, (), (), greedy, 1)
        held = [*VERIFIED_CONTEXT, *first.tokens]
        wrong = await verifier.verify_ahead("ahead", [*held, 3], (4, 5), (), greedy, 2)
        right = await verifier.verify_ahead("ahead", held, (4, 5), (), greedy, 2)
        fresh = await verifier.verify("ahead-fresh", held, (4, 5), (), greedy, 2)
        after = await verifier.verify("ahead", [*held, *right.tokens], (), (), greedy, 3)
        after_fresh = await verifier.verify("ahead-fresh2", [*held, *right.tokens], (), (), greedy, 3)
        return wrong, right, fresh, after, after_fresh

    wrong, right, fresh, after, after_fresh = over_grpc(stack, calls)
    assert wrong is None
    assert right is not None and (right.accepted, right.tokens) == (fresh.accepted, fresh.tokens)
    assert after.tokens == after_fresh.tokens  # the session's cache is consistent after both


def test_a_verify_sent_ahead_with_or_plain_steps_after_the_context_held(stack):
    """Over gRPC: with or_plain, a verify sent ahead whose claim misses answers a plain step
    after the context the verifier holds, names that context, and gives the token a plain
    verify of it gives in a fresh session; the session goes on consistently after it."""
    from services.context import fingerprint
    from services.sampling import SamplingParams

    greedy = SamplingParams()

    async def calls(verifier):
        first = await verifier.verify("or-plain", VERIFIED_CONTEXT, (), (), greedy, 1)
        held = [*VERIFIED_CONTEXT, *first.tokens]
        step = await verifier.verify_ahead("or-plain", [*held, 3], (4, 5), (), greedy, 2, or_plain=True)
        fresh = await verifier.verify("or-plain-fresh", held, (), (), greedy, 2)
        after = await verifier.verify("or-plain", [*held, *step.tokens], (6,), (), greedy, 3)
        after_fresh = await verifier.verify("or-plain-fresh2", [*held, *step.tokens], (6,), (), greedy, 3)
        return held, step, fresh, after, after_fresh

    held, step, fresh, after, after_fresh = over_grpc(stack, calls)
    assert step is not None and step.plain_after == (len(held), fingerprint(held))
    assert (step.accepted, step.tokens) == (0, fresh.tokens)
    assert (after.accepted, after.tokens) == (after_fresh.accepted, after_fresh.tokens)
