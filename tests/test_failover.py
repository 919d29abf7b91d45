"""Integration: replica pools over real processes on tiny models - 2 verifiers, 3 drafters,
2 orchestrators, one redis-server. Sessions spread over the replicas and stay on them; a
replica killed in the middle of 12 streams fails no request and changes no token; a client
whose orchestrator dies resumes its turn at the other one; a turn that fails leaves its
session exactly as it was."""

from __future__ import annotations

import threading
from collections import Counter
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from client import ServiceStack, generate

from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from specd import client
from specd.bench.metrics import by_language
from specd.bench.prompts import Prompt
from specd.bench.runner import BenchConfig, ServicesClient

DRAFTERS = ("drafter", "drafter2", "drafter3")
VERIFIERS = ("verifier", "verifier2")
PROMPTS = [f"def f{i}(x):\n    return x + {i}\n\ndef g{i}(y):" for i in range(12)]
NEW = 64


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    def extra_env(s: ServiceStack, name: str) -> dict[str, str]:
        if s.kind(name) != "orchestrator":
            return {}
        return {
            "SPECD_VERIFIER": ",".join(s.address(v) for v in VERIFIERS),
            "SPECD_DRAFTER": ",".join(s.address(d) for d in DRAFTERS),
            "SPECD_TURN_LEASE": "3",
        }

    s = ServiceStack(
        tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, tmp_path_factory.mktemp("failover"),
        services=(*VERIFIERS, *DRAFTERS, "orchestrator", "orchestrator2"), extra_env=extra_env,
    )  # fmt: skip
    s.up()
    yield s
    s.down()


@pytest.fixture(scope="module")
def reference(stack) -> dict[str, list[int]]:
    """Each prompt's greedy continuation by `ar`."""
    address = stack.address("orchestrator")
    return {p: generate(address, p, strategy="ar", max_new_tokens=NEW).token_ids for p in PROMPTS}


def status(stack, name: str) -> pb.ServiceStatus:
    with grpc.insecure_channel(stack.address(name)) as channel:
        stub = pb_grpc.DrafterStub(channel) if stack.kind(name) == "drafter" else pb_grpc.VerifierStub(channel)
        return stub.Status(pb.StatusRequest(), timeout=5)


def run_streams(stack, strategy: str, when_streaming=None, orchestrators: str | None = None) -> list[client.Result]:
    """The 12 prompts as concurrent streams; `when_streaming` runs once the first text arrives."""
    address = orchestrators or stack.address("orchestrator")
    first_text = threading.Event()
    request = dict(strategy=strategy, max_new_tokens=NEW, options={"k": 3})

    def one(prompt: str) -> client.Result:
        return client.generate(
            address, pb.GenerateRequest(prompt=prompt, **request), timeout=120, on_delta=lambda _: first_text.set()
        )

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(one, p) for p in PROMPTS]
        if when_streaming is not None:
            assert first_text.wait(60), "no stream produced text"
            when_streaming()
        return [f.result() for f in futures]


def restart(stack, names) -> None:
    for name in names:
        if name in stack.procs:
            stack.procs.pop(name)[0].kill()
        stack.start(name)
    for name in names:
        stack.wait(name)
    time.sleep(1.5)  # the orchestrators' next health check sees them


def kill(stack, *names: str) -> None:
    for name in names:
        proc, _ = stack.procs[name]
        proc.kill()  # SIGKILL: no drain, no goodbye


def test_sessions_spread_over_the_drafters_and_stay_on_them(stack, reference):
    before = {d: status(stack, d) for d in DRAFTERS}
    results = run_streams(stack, "sd")
    assert [r.token_ids for r in results] == [reference[p] for p in PROMPTS]
    after = {d: status(stack, d) for d in DRAFTERS}
    served = {d: after[d].calls - before[d].calls for d in DRAFTERS}
    assert all(served.values()), (served, Counter(a for r in results for a in r.stats.replicas), {d: stack.address(d) for d in DRAFTERS})  # every replica drafted
    hits = sum(after[d].context_hits - before[d].context_hits for d in DRAFTERS)
    misses = sum(after[d].context_misses - before[d].context_misses for d in DRAFTERS)
    assert hits / (hits + misses) >= 0.9, (hits, misses)
    assert [(r.stats.replicas, r.stats.failovers) for r in results if len(r.stats.replicas) != 2 or r.stats.failovers] == []


def test_a_drafter_killed_mid_stream_fails_nothing_and_changes_no_token(stack, reference):
    try:
        results = run_streams(stack, "sd", when_streaming=lambda: kill(stack, "drafter2"))
        assert [r.token_ids for r in results] == [reference[p] for p in PROMPTS]
        results = run_streams(stack, "cascade", when_streaming=lambda: kill(stack, "drafter", "drafter3"))
        assert [r.token_ids for r in results] == [reference[p] for p in PROMPTS]
        assert sum(r.stats.fallback_rounds for r in results) > 0  # no drafter was left
    finally:
        restart(stack, DRAFTERS)


def test_a_drafter_that_starts_receives_new_sessions(stack):
    """With a fixed draft length every turn reaches a drafter (adaptive may decode a short turn
    plainly, and then no turn would show where sessions go)."""
    address = stack.address("orchestrator")
    fixed = pb.StrategyOptions(k=2)
    kill(stack, "drafter3")
    try:
        time.sleep(1.5)
        first = generate(address, PROMPTS[0], strategy="sd", max_new_tokens=8, options=fixed)
        assert stack.address("drafter3") not in first.stats.replicas
    finally:
        restart(stack, ["drafter3"])
    deadline = time.monotonic() + 10
    seen = False
    i = 0
    while not seen and time.monotonic() < deadline:
        turn = generate(address, f"x{i} = ", strategy="sd", max_new_tokens=4, options=fixed)
        seen = stack.address("drafter3") in turn.stats.replicas
        i += 1
    assert seen, "no new session reached the restarted drafter within 10 s"


def test_a_verifier_killed_mid_stream_fails_nothing_and_changes_no_token(stack, reference):
    try:
        results = run_streams(stack, "sd", when_streaming=lambda: kill(stack, "verifier"))
        assert [r.token_ids for r in results] == [reference[p] for p in PROMPTS]
        assert sum(r.stats.failovers for r in results) > 0
    finally:
        restart(stack, ["verifier"])


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_client_resumes_its_turn_when_the_orchestrator_dies(stack, reference, how):
    both = f"{stack.address('orchestrator')},{stack.address('orchestrator2')}"

    def stop() -> None:
        proc, _ = stack.procs["orchestrator"]
        proc.kill() if how == "SIGKILL" else proc.terminate()

    try:
        results = run_streams(stack, "sd", when_streaming=stop, orchestrators=both)
        assert [r.token_ids for r in results] == [reference[p] for p in PROMPTS]
        assert [r.text for r in results] == ["".join(r.chunks) for r in results]
        if how == "SIGKILL":
            assert sum(r.resumes for r in results) > 0
    finally:
        restart(stack, ["orchestrator"])


def test_a_resumed_request_id_answers_again_without_appending_its_prompt(stack):
    address = stack.address("orchestrator")
    first = generate(address, PROMPTS[1], strategy="sd", max_new_tokens=16)
    request = dict(session_id=first.stats.session_id, request_id="turn-2", strategy="sd", max_new_tokens=16)
    second = generate(address, "\n# more", **request)
    again = generate(stack.address("orchestrator2"), "\n# more", **request)
    assert again.token_ids == second.token_ids and again.stats.prompt_tokens == second.stats.prompt_tokens
    tail = generate(address, "\n# more", **(request | {"request_id": "turn-2", "resume_from": 10}))
    assert tail.token_ids == second.token_ids[10:]
    with pytest.raises(grpc.RpcError) as err:
        generate(address, "\n# other", **request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "turn-2" in err.value.details()
    third = generate(address, "\n# more", session_id=first.stats.session_id, strategy="ar", max_new_tokens=1)
    prompt_growth = second.stats.prompt_tokens - first.stats.prompt_tokens - len(first.token_ids)
    assert third.stats.prompt_tokens == second.stats.prompt_tokens + len(second.token_ids) + prompt_growth


def test_a_failed_turn_leaves_the_session_as_it_was(stack):
    address = stack.address("orchestrator")
    control = generate(address, PROMPTS[2], strategy="sd", max_new_tokens=8)
    control = generate(address, "\n# again", session_id=control.stats.session_id, max_new_tokens=8)
    first = generate(address, PROMPTS[2], strategy="sd", max_new_tokens=8)
    kill(stack, *VERIFIERS)
    try:
        for _ in range(3):  # the retries of a client that does not give a request id
            with pytest.raises(grpc.RpcError) as err:
                generate(address, "\n# again", session_id=first.stats.session_id, max_new_tokens=8)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "verifier" in err.value.details()
    finally:
        restart(stack, VERIFIERS)
    after = generate(address, "\n# again", session_id=first.stats.session_id, max_new_tokens=8)
    assert after.stats.prompt_tokens == control.stats.prompt_tokens
    assert after.token_ids == control.token_ids


def test_a_second_turn_while_one_runs_is_aborted(stack):
    address = stack.address("orchestrator")
    first = generate(address, PROMPTS[3], strategy="ar", max_new_tokens=4)
    started = threading.Event()
    request = pb.GenerateRequest(prompt="\n", session_id=first.stats.session_id, strategy="ar", max_new_tokens=250)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.generate, address, request, on_delta=lambda _: started.set())
        assert started.wait(60)
        with pytest.raises(grpc.RpcError) as err:
            generate(stack.address("orchestrator2"), "\n", session_id=first.stats.session_id, max_new_tokens=4)
        assert err.value.code() == grpc.StatusCode.ABORTED and "in progress" in err.value.details()
        assert running.result().stats.finish_reason in ("length", "stop", "context")


def test_a_load_run_reports_latency_and_no_errors(stack):
    from specd.load import format_report, run_load

    report = run_load(stack.address("orchestrator"), streams=8, requests=16, max_new_tokens=24, strategy="sd")
    summary = report.summary()
    assert summary["requests"] == 16 and summary["errors"] == 0, summary["error_messages"]
    assert 0 < summary["ttft_p50_ms"] <= summary["ttft_p99_ms"] and 0 < summary["itl_p50_ms"] <= summary["itl_p99_ms"]
    assert summary["tokens"] > 16
    assert "time to first token" in format_report(summary)


def test_a_redis_restart_loses_no_session_and_fails_no_request(tiny_pair, tmp_path):
    """Redis with its append-only file, restarted between two turns: the first request after
    the restart succeeds (the stale pooled connection is retried) and the session is there."""
    import shutil

    from procs import free_port, start_process, stop_process, wait_for_port

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found on PATH")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(tmp_path)]  # fmt: skip

    def start_redis():
        proc = start_process(args, {}, tmp_path / "redis.log", cwd=tmp_path)
        wait_for_port(port, 10, proc, tmp_path / "redis.log")
        return proc

    redis_proc = start_redis()
    s = ServiceStack(tiny_pair.target_dir, tiny_pair.drafter_dir, f"redis://127.0.0.1:{port}/0", tmp_path / "stack")
    try:
        s.up()
        address = s.address("orchestrator")
        first = generate(address, PROMPTS[4], strategy="sd", max_new_tokens=8)
        stop_process(redis_proc)
        redis_proc = start_redis()
        second = generate(address, "\n# next", session_id=first.stats.session_id, strategy="sd", max_new_tokens=8)
        assert second.stats.prompt_tokens > first.stats.prompt_tokens + len(first.token_ids)
    finally:
        s.down()
        stop_process(redis_proc)


def test_a_session_drafts_on_the_pool_of_its_language(tiny_pair, redis_url, tmp_path):
    def extra_env(s: ServiceStack, name: str) -> dict[str, str]:
        if name == "orchestrator":
            return {"SPECD_DRAFTER": f"{s.address('drafter')},fr={s.address('drafter2')}"}
        return {}

    s = ServiceStack(
        tiny_pair.target_dir, tiny_pair.drafter_dir, redis_url, tmp_path,
        services=("verifier", "drafter", "drafter2", "orchestrator"), extra_env=extra_env,
    )  # fmt: skip
    french, english = "Bonjour, écris une fonction qui inverse une chaîne de caractères.", "Write a function that reverses a string."
    try:
        s.up()
        address = s.address("orchestrator")
        for text, language, drafter in ((french, "fr", "drafter2"), (english, "en", "drafter")):
            expected = generate(address, text, strategy="ar", max_new_tokens=16).token_ids
            result = generate(address, text, strategy="sd", max_new_tokens=16)
            assert result.token_ids == expected
            assert result.stats.language == language and result.stats.drafter_pool == (language if language == "fr" else "")
            assert s.address(drafter) in result.stats.replicas
            again = generate(address, "\n", session_id=result.stats.session_id, strategy="sd", max_new_tokens=4)
            assert again.stats.language == language  # kept with the session
        # The bench pools acceptance by language and pool from what each turn reports.
        bench = ServicesClient(address, BenchConfig(("ar", "sd"), 8, 4, 0.0, 0, 1.0, 0, 0, False, 60.0))
        try:
            record = bench.run(Prompt("mine/1", "mine", french), "sd", 8, 0)
        finally:
            bench.close()
        assert (record.language, record.drafter_pool) == ("fr", "fr") and record.drafted > 0
        assert [(row.language, row.drafter_pool) for row in by_language([record])] == [("fr", "fr")]
        kill(s, "drafter2")
        time.sleep(1.5)
        result = generate(address, french, strategy="sd", max_new_tokens=16)
        assert result.token_ids == generate(address, french, strategy="ar", max_new_tokens=16).token_ids
        assert result.stats.language == "fr" and s.address("drafter") in result.stats.replicas
    finally:
        s.down()
