"""The OpenAI-compatible gateway and the Prometheus endpoints, over real processes: a
redis-server, verifier, drafter and orchestrator on the tiny models, and `python -m gateway`
in front, called with the `openai` package and with curl."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import openai
import pytest
import redis
from client import ServiceStack, generate
from procs import free_port, start_module, stop_process, wait_for_port
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.store import PREFIX

MODEL = "tiny-target"
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    metrics = {name: free_port() for name in ("orchestrator", "verifier", "drafter")}

    def extra_env(_: ServiceStack, name: str) -> dict[str, str]:
        return {"SPECD_METRICS_LISTEN": f"127.0.0.1:{metrics[name]}"}

    logs = tmp_path_factory.mktemp("gateway")
    s = ServiceStack(tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, logs, extra_env=extra_env)
    s.up()
    s.metrics = metrics
    port = free_port()
    env = {
        "SPECD_HTTP_LISTEN": f"127.0.0.1:{port}",
        "SPECD_ORCHESTRATOR": s.address("orchestrator"),
        "SPECD_MODEL_NAME": MODEL,
        "SPECD_RPC_TIMEOUT": "60",
    }
    log_path = logs / "gateway.log"
    gateway = start_module("gateway", env, log_path)
    wait_for_port(port, 60, gateway, log_path)
    s.http = f"http://127.0.0.1:{port}"
    yield s
    stop_process(gateway)
    s.down()


@pytest.fixture(scope="module")
def api(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.http}/v1", api_key="unused", max_retries=0, timeout=60)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def grown(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_completion_equals_the_generator_and_reports_speculation(stack, api):
    expected = generate(stack.address("orchestrator"), PROMPT, strategy="ar", max_new_tokens=24)
    reply = api.completions.create(model=f"{MODEL}:sd", prompt=PROMPT, max_tokens=24, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    extension = reply.model_extra["specd"]
    assert extension["strategy"] == "sd"
    assert reply.usage.completion_tokens == len(expected.token_ids)
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == extension["accepted"]
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == extension["drafted"] > 0


def test_chat_stream_equals_the_whole_answer(stack, api):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    chunks = list(api.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_sampling_with_a_seed_repeats(stack, api):
    ask = dict(model=f"{MODEL}:cascade", prompt=PROMPT, max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    first, second = api.completions.create(**ask), api.completions.create(**ask)
    assert first.choices[0].text == second.choices[0].text
    assert first.model_extra["specd"]["strategy"] == "cascade"


@pytest.mark.parametrize(
    ("ask", "status", "param"),
    [
        (dict(model="no-such-model"), 404, "model"),
        (dict(n=2), 400, "n"),
        (dict(presence_penalty=0.5), 400, "presence_penalty"),
        (dict(temperature=5), 400, "temperature"),
        (dict(max_tokens=0), 400, "max_tokens"),
        (dict(model=f"{MODEL}:warp"), 400, "model"),
        (dict(extra_body={"specd": {"strategy": "warp"}}), 400, "specd.strategy"),
        (dict(extra_body={"specd": {"head_only": "yes"}}), 400, "specd.head_only"),
        (dict(extra_body={"colour": "blue"}), 400, "colour"),
        (dict(stop=["x"] * 17), 400, "stop"),
    ],
)
def test_bad_requests_name_the_field(api, ask, status, param):
    request = dict(model=MODEL, prompt=PROMPT, max_tokens=4) | ask
    with pytest.raises(openai.APIStatusError) as err:
        api.completions.create(**request)
    assert err.value.status_code == status
    assert err.value.body["param"] == param and err.value.body["message"]


def test_orchestrator_refusals_become_http_errors(api):
    with pytest.raises(openai.BadRequestError) as err:  # over SPECD_MAX_NEW_TOKENS_LIMIT (256)
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100_000)
    assert err.value.body["code"] == "invalid_argument" and "256" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):  # a session that does not exist
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"specd": {"session_id": "0" * 32}})


def test_sessions_are_deleted_unless_kept(stack, api):
    kept = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"specd": {"keep_session": True}})
    session = kept.model_extra["specd"]["session_id"]
    more = api.completions.create(model=MODEL, prompt=" x", max_tokens=4, extra_body={"specd": {"session_id": session}})
    assert more.model_extra["specd"]["session_id"] == session
    assert more.usage.prompt_tokens > kept.usage.prompt_tokens  # it continued the kept context
    dropped = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    gone = dropped.model_extra["specd"]["session_id"]
    store = redis.Redis.from_url(stack.redis_url)
    assert store.exists(PREFIX + session)
    deadline = time.monotonic() + 10
    while store.exists(PREFIX + gone):  # deleted in the background once the answer is out
        assert time.monotonic() < deadline, "the session of a request that did not keep it still exists"
        time.sleep(0.1)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model=MODEL, prompt=" x", max_tokens=4, extra_body={"specd": {"session_id": gone}})


def test_models_and_health(stack, api):
    ids = [m.id for m in api.models.list()]
    assert ids[0] == MODEL and f"{MODEL}:cascade" in ids and f"{MODEL}:lookup" in ids
    with urllib.request.urlopen(f"{stack.http}/health", timeout=10) as reply:
        body = json.loads(reply.read())
    assert reply.status == 200 and body["status"] == "ok"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(stack):
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "stream": True})
    out = subprocess.run(
        ["curl", "-sN", "-H", "Content-Type: application/json", "-d", body, f"{stack.http}/v1/completions"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    bad = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-d", "{not json", f"{stack.http}/v1/completions"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.rsplit("\n", 1)  # fmt: skip
    assert bad[1] == "400" and "not valid JSON" in json.loads(bad[0])["error"]["message"]


def test_metrics_count_what_the_turns_reported(stack):
    before = scrape(stack.metrics["orchestrator"])
    results = [
        generate(stack.address("orchestrator"), p, strategy="sd", max_new_tokens=20, options={"k": 3})
        for p in (PROMPT, "The quick brown fox", "import json\n")
    ]
    after = scrape(stack.metrics["orchestrator"])
    stats = [r.stats for r in results]
    assert grown(before, after, "specd:request_success_total", strategy="sd", finished_reason="length") + grown(
        before, after, "specd:request_success_total", strategy="sd", finished_reason="stop"
    ) == 3
    assert grown(before, after, "specd:generation_tokens_total", strategy="sd") == sum(s.new_tokens for s in stats)
    assert grown(before, after, "specd:prompt_tokens_total", strategy="sd") == sum(s.prompt_tokens for s in stats)
    drafted = grown(before, after, "specd:spec_decode_num_draft_tokens_total", strategy="sd")
    assert drafted == sum(s.drafted for s in stats) > 0
    accepted = grown(before, after, "specd:spec_decode_num_accepted_tokens_total", strategy="sd")
    assert accepted == sum(s.accepted for s in stats)
    per_position = [grown(before, after, "specd:spec_decode_num_accepted_tokens_per_pos_total", strategy="sd",
                          position=str(i)) for i in range(3)]  # fmt: skip
    assert sum(per_position) == accepted and per_position == sorted(per_position, reverse=True)
    forwards = sum(s.target_forwards for s in stats)
    assert grown(before, after, "specd:target_forwards_total", strategy="sd") == forwards
    trips = grown(before, after, "specd:round_trips_total", strategy="sd")
    assert trips == sum(s.round_trips for s in stats) and forwards <= trips <= 2 * forwards  # a verify, and a draft
    assert grown(before, after, "specd:round_phase_seconds_count", strategy="sd", phase="verify") == forwards
    assert grown(before, after, "specd:time_to_first_token_seconds_count", strategy="sd") == 3
    assert grown(before, after, "specd:inter_token_latency_seconds_count", strategy="sd") > 0

    verifier = scrape(stack.metrics["verifier"])
    assert verifier[("specd:rpc_duration_seconds_count", (("code", "OK"), ("method", "Verify")))] >= forwards
    assert verifier[("specd:context_calls_total", (("role", "verifier"),))] >= forwards
    assert verifier[("specd:resident_memory_bytes", (("role", "verifier"),))] > 0
    assert verifier[("specd:queued_calls", (("role", "verifier"),))] == 0  # nothing runs between turns
    assert verifier[("specd:forward_tokens_count", ())] >= forwards  # one pass a round, and prefills
    assert verifier[("specd:kv_cache_lookups_total", (("result", "hit"),))] >= forwards - 3  # each turn's first misses
    drafter = scrape(stack.metrics["drafter"])
    assert drafter[("specd:rpc_duration_seconds_count", (("code", "OK"), ("method", "Propose")))] > 0
