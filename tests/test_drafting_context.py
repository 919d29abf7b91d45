"""A drafter whose context is shorter than the target's (a small KV cache here, a drafter of
another family in practice): rounds that would not fit it draft with max-gram, the turn goes
on, and greedy output stays the target's."""

from __future__ import annotations

import grpc
import pytest
from client import ServiceStack, generate

from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc

DRAFTER_CONTEXT = 256


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    def extra_env(_: ServiceStack, name: str) -> dict[str, str]:
        return {"SPECD_KV_TOKENS": str(DRAFTER_CONTEXT)} if name == "drafter" else {}

    s = ServiceStack(
        tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, tmp_path_factory.mktemp("context"),
        drafter_runtime="llama", extra_env=extra_env,
    )  # fmt: skip
    s.up()
    yield s
    s.down()


def test_rounds_past_the_drafters_context_draft_with_maxgram(stack):
    with grpc.insecure_channel(stack.address("drafter")) as channel:
        assert pb_grpc.DrafterStub(channel).Info(pb.InfoRequest(), timeout=10).max_context == DRAFTER_CONTEXT
    address = stack.address("orchestrator")
    prompt = "def f(x):\n    return x + 1\n" * 12  # short of the drafter's context; the answer outgrows it
    expected = generate(address, prompt, strategy="ar", max_new_tokens=160)
    assert expected.stats.prompt_tokens + expected.stats.new_tokens > DRAFTER_CONTEXT > expected.stats.prompt_tokens
    for strategy in ("sd", "cascade", "staged"):
        result = generate(address, prompt, strategy=strategy, max_new_tokens=160, options={"k": 4})
        assert result.token_ids == expected.token_ids, strategy
        assert 0 < result.stats.fallback_rounds < result.stats.target_forwards, strategy  # drafted, then max-gram
    long = generate(address, prompt * 3, strategy="sd", max_new_tokens=16)  # past it from the start
    assert long.stats.fallback_rounds == long.stats.target_forwards
