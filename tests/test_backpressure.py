"""Back-pressure over real processes: model services with room for one waiting call
(SPECD_MAX_QUEUE=1) refuse the rest with RESOURCE_EXHAUSTED and a retry hint; under concurrent
turns the orchestrator retries a full verifier and drafts with max-gram past a full drafter,
so every turn still finishes with the target's greedy tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from client import ServiceStack, generate

from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.server import RETRY_AFTER_KEY

PROMPTS = [f"def f{i}(x):\n    y = x * {i}\n    return" for i in range(6)]


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    def extra_env(_: ServiceStack, name: str) -> dict[str, str]:
        return {} if name == "orchestrator" else {"SPECD_MAX_QUEUE": "1"}

    s = ServiceStack(tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, tmp_path_factory.mktemp("busy"),
                     extra_env=extra_env)  # fmt: skip
    s.up()
    yield s
    s.down()


def test_a_full_queue_answers_resource_exhausted_with_a_retry_hint(stack):
    context = list(range(1, 400))

    def verify(i: int):
        with grpc.insecure_channel(stack.address("verifier")) as channel:
            request = pb.VerifyRequest(context=pb.Context(session_id=f"busy-{i}", tokens=context), draft=[5, 6, 7])
            try:
                pb_grpc.VerifierStub(channel).Verify(request, timeout=60)
                return None
            except grpc.RpcError as err:
                return err

    with ThreadPoolExecutor(12) as pool:
        errors = [e for e in pool.map(verify, range(12)) if e is not None]
    assert errors, "twelve concurrent calls never found the one-call queue full"
    for err in errors:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "SPECD_MAX_QUEUE" in err.details()
        hint = dict(err.trailing_metadata())[RETRY_AFTER_KEY]
        assert int(hint) >= 1


def test_concurrent_turns_finish_with_the_targets_tokens(stack):
    address = stack.address("orchestrator")
    expected = {p: generate(address, p, strategy="ar", max_new_tokens=24).token_ids for p in PROMPTS}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: generate(address, p, strategy="sd", max_new_tokens=24, options={"k": 4}), PROMPTS))
    assert [r.token_ids for r in results] == [expected[p] for p in PROMPTS]
    assert sum(r.stats.fallback_rounds for r in results) > 0, "no round found the drafter full"
