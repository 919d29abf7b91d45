"""Drafters of another vocabulary than the target's: slem, tli and slrs (strategies.py,
drafter_svc/foreign.py, services/slrs.py) on tiny models, in this process and through real
processes with a real redis-server.

Greedy output must equal plain decoding whatever the drafter; sampled output of tli and slrs
must follow the target's distribution (chi-square on the first token). The tiny foreign
drafter is random and rarely right, so the same strategies also run with the tiny same-vocab
drafter, which is often right: the accepting paths are exercised too.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
import torch
from client import ServiceStack, generate
from test_acceptance import chi_square_pvalue
from test_cascade import decode

from drafter_svc.core import DrafterCore
from drafter_svc.foreign import Translation
from orchestrator.strategies import Backends
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.runtime import tokenizer_fingerprint
from services.sampling import SamplingParams, target_probs
from services.torch_runtime import load_torch
from verifier_svc.core import VerifierCore

pytestmark = pytest.mark.usefixtures("single_thread_torch")

FOREIGN_STRATEGIES = ("slem", "tli", "slrs")
PROMPTS = {
    "code": "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n",
    "prose": "The quick brown fox jumps over the lazy dog. It was the best of times,",
    "non-English": "Grüße aus München: schön, dass Sie da sind! 東京へようこそ。",
}


@pytest.fixture(scope="module")
def hosts(tiny_pair, tiny_foreign):
    load = lambda path: load_torch(path, dtype="float64", device="cpu", max_sessions=64)  # noqa: E731
    return load(tiny_pair.target_dir), load(tiny_pair.drafter_dir), load(tiny_foreign)


@pytest.fixture(scope="module")
def translation(hosts, tmp_path_factory) -> Translation:
    target, _, foreign = hosts
    return Translation.build(
        foreign.tokenizer, target.tokenizer, foreign.info.vocab_size, target.info.vocab_size,
        tmp_path_factory.mktemp("vocab"),
    )  # fmt: skip


def test_the_foreign_drafter_really_has_another_vocabulary(hosts, translation) -> None:
    target, _, foreign = hosts
    assert foreign.info.tokenizer_fingerprint != target.info.tokenizer_fingerprint
    assert 0 < translation.vocab_map.shared < foreign.info.vocab_size  # overlapping, not a subset


@pytest.mark.parametrize("strategy", FOREIGN_STRATEGIES)
@pytest.mark.parametrize("kind", PROMPTS)
def test_greedy_with_a_foreign_drafter_equals_plain_decoding(hosts, translation, strategy, kind) -> None:
    target, _, foreign = hosts
    backends = Backends(VerifierCore(target), DrafterCore(foreign, translation=translation))
    context = target.tokenizer(PROMPTS[kind]).input_ids
    params = SamplingParams()
    expected, _ = asyncio.run(decode(backends, "ar", context, 40, params, session=f"ar-{kind}"))
    got, results = asyncio.run(decode(backends, strategy, context, 40, params, session=f"{strategy}-{kind}"))
    assert got == expected
    assert sum(r.drafted for r in results) > 0, "the foreign drafter drafted nothing"


@pytest.mark.parametrize("strategy", FOREIGN_STRATEGIES)
def test_greedy_with_a_same_vocab_drafter_equals_plain_decoding_and_accepts(hosts, strategy) -> None:
    target, drafter, _ = hosts
    backends = Backends(VerifierCore(target), DrafterCore(drafter))
    context = target.tokenizer(PROMPTS["code"]).input_ids
    params = SamplingParams()
    expected, _ = asyncio.run(decode(backends, "ar", context, 48, params, session="ar-same"))
    got, results = asyncio.run(decode(backends, strategy, context, 48, params, session=f"{strategy}-same"))
    assert got == expected
    assert sum(r.accepted for r in results) > 0, "a drafter that is often right was never accepted"


SAMPLED = SamplingParams(temperature=1.0, top_k=4)  # four tokens: a chi-square test with power
SAMPLES = 1000


# slrs with the same-vocab drafter: its drafts are often right, so acceptance is exercised too.
@pytest.mark.parametrize("strategy, drafter_kind", [("tli", "foreign"), ("slrs", "foreign"), ("slrs", "same-vocab")])
def test_sampled_first_token_follows_the_target(hosts, translation, strategy, drafter_kind) -> None:
    target, drafter, foreign = hosts
    local = DrafterCore(foreign, translation=translation) if drafter_kind == "foreign" else DrafterCore(drafter)
    backends = Backends(VerifierCore(target), local)
    context = target.tokenizer(PROMPTS["prose"]).input_ids
    p = target_probs(target.logits("p", context, 1)[0].double(), SAMPLED)  # (V,)
    support = torch.nonzero(p).flatten().tolist()
    firsts: Counter[tuple[int, ...]] = Counter()
    for seed in range(SAMPLES):
        out, _ = asyncio.run(decode(backends, strategy, context, 1, SAMPLED, seed=seed, session=f"{strategy}-{seed % 4}"))
        firsts[(out[0],)] += 1
    expected = {(t,): float(p[t]) for t in support}
    assert chi_square_pvalue(firsts, expected, SAMPLES) > 1e-3, (firsts, expected)


# ---------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def stack(tiny_pair, tiny_foreign, redis_server, tmp_path_factory):
    """drafter: the foreign drafter, translating to the target; orchestrator2: a cascade of the
    foreign drafter through tli (it proposes, never reviews) above the in-process max-gram."""
    root = tmp_path_factory.mktemp("foreign")

    def extra_env(s: ServiceStack, name: str) -> dict[str, str]:
        if name == "drafter":
            return {"SPECD_TARGET_TOKENIZER": str(tiny_pair.target_dir)}
        if name == "orchestrator2":
            return {"SPECD_CASCADE": f"tli:{s.address('drafter')},maxgram", "SPECD_K_MATRIX": "3,2;0,0"}
        return {}

    s = ServiceStack(
        tiny_pair.target_dir, tiny_foreign, redis_server.url, root / "logs",
        services=("verifier", "drafter", "orchestrator", "orchestrator2"), extra_env=extra_env,
    )  # fmt: skip
    s.up()
    yield s
    s.down()


def test_the_drafter_says_it_speaks_the_target_vocabulary(stack, tiny_pair, tiny_foreign) -> None:
    from transformers import AutoTokenizer

    with grpc.insecure_channel(stack.address("drafter")) as channel:
        info = pb_grpc.DrafterStub(channel).Info(pb.InfoRequest(), timeout=30)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_foreign))
    assert info.wire_tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_pair.target_dir))
    assert info.shared_tokens > 0


@pytest.mark.parametrize("kind", PROMPTS)
def test_greedy_slem_tli_slrs_and_a_tli_cascade_equal_ar_over_the_services(stack, kind) -> None:
    main = stack.address("orchestrator")
    expected = generate(main, PROMPTS[kind], strategy="ar", max_new_tokens=32).token_ids
    for strategy in FOREIGN_STRATEGIES:
        got = generate(main, PROMPTS[kind], strategy=strategy, max_new_tokens=32)
        assert got.token_ids == expected, strategy
        assert got.stats.drafted > 0, strategy
    cascade = generate(stack.address("orchestrator2"), PROMPTS[kind], strategy="cascade", max_new_tokens=32)
    assert cascade.token_ids == expected


@pytest.mark.parametrize("strategy", ["sd", "staged"])
def test_same_vocab_strategies_are_refused_with_the_way_out(stack, strategy) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(stack.address("orchestrator"), "hello", strategy=strategy, max_new_tokens=4)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "slem, tli or slrs" in err.value.details()


def test_a_foreign_cascade_level_cannot_review(stack) -> None:
    options = pb.StrategyOptions(k_matrix=[pb.KRow(k=[3, 2]), pb.KRow(k=[0, 2])])
    with pytest.raises(grpc.RpcError) as err:
        generate(stack.address("orchestrator2"), "hello", strategy="cascade", max_new_tokens=4, options=options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot review" in err.value.details()
