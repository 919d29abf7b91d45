"""Malformed input, generated: every public and internal endpoint gets SPECD_FUZZ_EXAMPLES
(default 1,000) requests built to be wrong (ids out of the vocabulary or negative, NaN and
infinite floats, probabilities above 1, oversize drafts and ids, unknown roles and
strategies, huge stop lists, bytes that are not a protobuf message or not JSON) over real
processes on the tiny models. Every answer must be a clear status: never UNKNOWN or
INTERNAL, never HTTP 5xx, always within the deadline; no process dies; a rejected request
leaves the session it names unchanged in Redis. The counts per endpoint are printed (`-s`)
and written to $SPECD_FUZZ_REPORT when set."""

from __future__ import annotations

import collections
import json
import os
import time

import grpc
import pytest
import redis
from client import ServiceStack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import free_port, start_module, stop_process, wait_for_port

from orchestrator.store import PREFIX
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from specd import client

EXAMPLES = int(os.environ.get("SPECD_FUZZ_EXAMPLES", "1000"))
DEADLINE_S = 20.0
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)  # fmt: skip
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

# -- values built to be wrong -------------------------------------------------------------------

VOCAB = 512  # at least the tiny models' vocabulary; ids around it are the interesting ones
ints32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([-(2**31), -1, 0, 1, VOCAB - 1, VOCAB, VOCAB + 1, 100_000, 2**31 - 1]),
    st.integers(0, 300),
)
uints32 = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 80), st.sampled_from([2**32 - 1, 65, 64, 4096]))
uints64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64 - 1]))
floats = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-45, -0.0, 0.0, 1.0, 1.5, 2.0, 3.4e38]),
)
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "*", "?", "a:tokens", "\x00", "é" * 3000]))
session_ids = st.one_of(texts, st.text(alphabet="0123456789abcdef", min_size=30, max_size=34))
# Most calls are plausible but for one or two fields, so they get past the first check and
# reach the deeper ones (a call wrong everywhere only ever meets the first).
good_ids = st.lists(st.integers(0, 300), min_size=1, max_size=40)
tokens = st.one_of(st.lists(ints32, max_size=90), good_ids, good_ids)
dists = st.lists(st.builds(pb.SparseDist, ids=st.lists(ints32, max_size=8), probs=st.lists(floats, max_size=8)), max_size=12)
good_floats = st.floats(0.0, 2.0)
sampling = st.one_of(
    st.builds(pb.Sampling, temperature=floats, top_k=ints32, top_p=floats),
    st.builds(pb.Sampling, temperature=st.one_of(floats, good_floats), top_k=st.integers(0, 50), top_p=st.floats(0.01, 1.0)),
    st.builds(pb.Sampling, temperature=good_floats, top_k=st.one_of(ints32, st.just(0)), top_p=st.one_of(floats, st.just(1.0))),
)
contexts = st.one_of(
    st.builds(pb.Context, session_id=session_ids, base_len=uints32, base_fingerprint=uints64, tokens=tokens),
    st.builds(pb.Context, session_id=st.sampled_from(["fuzz-a", "fuzz-b"]), tokens=tokens),
    st.builds(pb.Context, session_id=st.just("fuzz-a"), base_len=st.integers(0, 50), base_fingerprint=uints64, tokens=good_ids),
)
string_drafts = st.lists(
    st.one_of(
        st.builds(pb.StringDraft, text=st.binary(max_size=12), candidates=st.lists(st.binary(max_size=8), max_size=6),
                  probs=st.lists(floats, max_size=6)),
        # the text among its candidates, with one probability that may be anything
        st.builds(lambda text, p: pb.StringDraft(text=text, candidates=[text], probs=[p]), st.binary(min_size=1, max_size=3), floats),
    ),
    max_size=10,
)  # fmt: skip
trees = st.builds(pb.DraftTree, tokens=tokens, parents=st.lists(ints32, max_size=90), q=dists)
shapes = st.builds(pb.TreeShape, branching=st.lists(uints32, max_size=12), budget=uints32)
vocab_modes = st.integers(0, 5)

INTERNAL = {
    ("Verifier", "Verify"): st.builds(pb.VerifyRequest, context=contexts, draft=tokens, q=dists, sampling=sampling, seed=uints64),
    ("Verifier", "VerifyTree"): st.builds(pb.VerifyTreeRequest, context=contexts, tree=trees, sampling=sampling, seed=uints64),
    ("Verifier", "VerifyStrings"): st.builds(
        pb.VerifyStringsRequest, context=contexts, draft=string_drafts, sampling=sampling, seed=uints64
    ),
    ("Verifier", "Release"): st.builds(pb.ReleaseRequest, session_id=session_ids),
    ("Drafter", "Propose"): st.builds(
        pb.ProposeRequest, context=contexts, k=uints32, sampling=sampling, seed=uints64, vocab=vocab_modes
    ),
    ("Drafter", "ProposeTree"): st.builds(pb.ProposeTreeRequest, context=contexts, shape=shapes, sampling=sampling, seed=uints64),
    ("Drafter", "ProposeStrings"): st.builds(
        pb.ProposeStringsRequest, context=contexts, k=uints32, sampling=sampling, seed=uints64
    ),
    ("Drafter", "Review"): st.builds(pb.ReviewRequest, context=contexts, draft=tokens, q=dists, sampling=sampling, seed=uints64),
    ("Drafter", "Release"): st.builds(pb.ReleaseRequest, session_id=session_ids),
}

ROLES = st.one_of(st.sampled_from(["system", "user", "assistant", "", "tool", "USER"]), st.text(max_size=8))
generate_requests = st.builds(
    lambda prompt, chat, session_id, fields, stop, strategy, k, matrix, tree: _generate(
        prompt, chat, session_id, fields, stop, strategy, k, matrix, tree
    ),
    prompt=st.one_of(st.none(), texts),
    chat=st.lists(st.tuples(ROLES, texts), max_size=4),
    session_id=st.one_of(st.just(""), session_ids, st.just("KNOWN")),
    fields=st.fixed_dictionaries({}, optional={
        "max_new_tokens": ints32, "temperature": floats, "top_k": ints32, "top_p": floats, "seed": uints64,
        "request_id": texts, "resume_from": uints32,
    }),
    stop=st.one_of(st.lists(texts, max_size=5), st.lists(st.just("x"), min_size=100, max_size=3000)),
    strategy=st.one_of(st.sampled_from(["", "ar", "sd", "cascade", "staged", "lookup", "slem", "warp"]), st.text(max_size=6)),
    k=uints32,
    matrix=st.lists(st.lists(uints32, max_size=4), max_size=4),
    tree=st.one_of(st.none(), shapes),
)  # fmt: skip


def _generate(prompt, chat, session_id, fields, stop, strategy, k, matrix, tree) -> pb.GenerateRequest:
    request = pb.GenerateRequest(session_id=session_id, stop=stop, strategy=strategy, **fields)
    if prompt is not None:
        request.prompt = prompt
    elif chat:
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in chat)
    request.options.k = k
    request.options.k_matrix.extend(pb.KRow(k=row) for row in matrix)
    if tree is not None:
        request.options.tree.CopyFrom(tree)
    return request


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "stream", "stream_options", "n", "logprobs", "specd", "presence_penalty", "tools", "user"]  # fmt: skip
OPTIONAL = {
    "max_tokens": st.one_of(json_values, st.integers(1, 4)), "temperature": st.one_of(json_values, st.floats(0, 2)),
    "stop": json_values, "stream": st.booleans(), "seed": json_values, "n": json_values, "top_p": json_values,
    "specd": st.fixed_dictionaries({}, optional={"strategy": json_values, "k": json_values, "session_id": json_values}),
}
MODELS = st.sampled_from(["tiny-target", "tiny-target:sd", "tiny-target:lookup", "tiny-target:warp", "x"])


def http_bodies(path: str):
    """Wrong everywhere; or plausible but for a value or two (so some get answered)."""
    chat = path.endswith("chat/completions")
    plausible = st.fixed_dictionaries(
        {"model": MODELS, "messages": st.lists(st.fixed_dictionaries({"role": ROLES, "content": st.one_of(texts, json_values)}),
                                                min_size=1, max_size=3)}
        if chat else {"model": MODELS, "prompt": st.one_of(texts, texts, json_values)},
        optional=OPTIONAL,
    )  # fmt: skip
    return st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), texts), json_values, max_size=8).map(json.dumps),
        plausible.map(json.dumps),
        plausible.map(json.dumps),
        st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    )


# -- the stack ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fuzz")

    def extra_env(_: ServiceStack, name: str) -> dict[str, str]:
        # Short answers: the point is what is refused, not generating
        return {"SPECD_MAX_NEW_TOKENS_LIMIT": "4", "SPECD_MAX_NEW_TOKENS": "2"} if name == "orchestrator" else {}

    s = ServiceStack(tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, logs, extra_env=extra_env)
    s.up()
    port = free_port()
    env = {"SPECD_HTTP_LISTEN": f"127.0.0.1:{port}", "SPECD_ORCHESTRATOR": s.address("orchestrator"),
           "SPECD_MODEL_NAME": "tiny-target"}  # fmt: skip
    s.gateway = start_module("gateway", env, logs / "gateway.log")
    wait_for_port(port, 60, s.gateway, logs / "gateway.log")
    s.http = f"http://127.0.0.1:{port}"
    known = client.generate(s.address("orchestrator"), pb.GenerateRequest(prompt="def f(", strategy="ar"))
    s.known = known.stats.session_id
    s.redis = redis.Redis.from_url(redis_server.url)
    yield s
    s.gateway.terminate()
    stop_process(s.gateway)
    s.down()
    report = os.environ.get("SPECD_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({k: dict(v) for k, v in COUNTS.items()}, f, indent=2)
    for endpoint, counts in sorted(COUNTS.items()):
        print(f"{endpoint}: {sum(counts.values())} requests, {dict(counts)}")


def alive(stack) -> None:
    for name, (proc, log) in stack.procs.items():
        assert proc.poll() is None, f"{name} died; see {log}"
    assert stack.gateway.poll() is None, "the gateway died"


def call(channel: grpc.Channel, service: str, method: str, request, endpoint: str) -> None:
    stub = getattr(pb_grpc, f"{service}Stub")(channel)
    started = time.monotonic()
    try:
        getattr(stub, method)(request, timeout=DEADLINE_S)
        COUNTS[endpoint]["OK"] += 1
    except grpc.RpcError as err:
        COUNTS[endpoint][err.code().name] += 1
        assert err.code() not in FORBIDDEN, f"{endpoint}: {err.code().name}: {err.details()}\n{request}"[:3000]
        assert len(err.details() or "") < 8192, f"{endpoint}: a {len(err.details())}-character message"
    assert time.monotonic() - started < DEADLINE_S


@pytest.mark.parametrize(("service", "method"), list(INTERNAL), ids=[f"{s}.{m}" for s, m in INTERNAL])
def test_internal_rpcs_answer_malformed_calls_with_clear_statuses(stack, service, method):
    port = stack.address("verifier" if service == "Verifier" else "drafter")
    with grpc.insecure_channel(port) as channel:

        @FUZZ
        @given(request=INTERNAL[(service, method)])
        def run(request):
            call(channel, service, method, request, f"{service}.{method}")

        run()
    alive(stack)


def test_generate_answers_malformed_requests_and_leaves_the_session_alone(stack):
    address = stack.address("orchestrator")
    meta, tokens = PREFIX + stack.known, PREFIX + stack.known + ":tokens"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)

        @FUZZ
        @given(request=generate_requests)
        def run(request):
            names_known = request.session_id == "KNOWN"
            if names_known:
                request.session_id = stack.known
                before = (stack.redis.hgetall(meta), stack.redis.lrange(tokens, 0, -1))
            started = time.monotonic()
            try:
                for _ in stub.Generate(request, timeout=DEADLINE_S):
                    pass
                COUNTS["Generator.Generate"]["OK"] += 1
            except grpc.RpcError as err:
                COUNTS["Generator.Generate"][err.code().name] += 1
                assert err.code() not in FORBIDDEN, f"{err.code().name}: {err.details()}\n{request}"[:3000]
                if names_known:  # refused: the session is as it was
                    assert (stack.redis.hgetall(meta), stack.redis.lrange(tokens, 0, -1)) == before
            assert time.monotonic() - started < DEADLINE_S

        run()

        @FUZZ
        @given(session_id=session_ids)
        def delete(session_id):
            call(channel, "Generator", "DeleteSession", pb.DeleteSessionRequest(session_id=session_id),
                 "Generator.DeleteSession")  # fmt: skip

        delete()
    assert stack.redis.exists(meta), "fuzzed calls deleted a session they did not name"
    alive(stack)


METHODS = [("Generator", "Generate"), ("Generator", "DeleteSession"), *INTERNAL]


def test_bytes_that_are_no_protobuf_message_get_invalid_argument(stack):
    """A body that does not decode is refused as INVALID_ARGUMENT by every method."""
    for service, method in METHODS:
        target = {"Generator": "orchestrator", "Verifier": "verifier", "Drafter": "drafter"}[service]
        with grpc.insecure_channel(stack.address(target)) as channel:
            raw = channel.unary_stream if method == "Generate" else channel.unary_unary
            send = raw(f"/specd.v1.{service}/{method}", request_serializer=None, response_deserializer=None)

            @settings(max_examples=max(20, EXAMPLES // 20), deadline=None, database=None, derandomize=True)
            @given(body=st.one_of(st.binary(min_size=1, max_size=64), st.sampled_from([b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f"])))
            def run(body):
                try:
                    reply = send(body, timeout=DEADLINE_S)
                    if method == "Generate":
                        list(reply)
                    COUNTS[f"{service}.{method} (bytes)"]["OK"] += 1
                except grpc.RpcError as err:
                    COUNTS[f"{service}.{method} (bytes)"][err.code().name] += 1
                    assert err.code() not in FORBIDDEN, f"{service}.{method}: {err.code().name}: {err.details()}"

            run()
    alive(stack)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_http_endpoints_answer_malformed_bodies_without_a_server_error(stack, path):
    import http.client

    host, port = stack.http.removeprefix("http://").split(":")

    @FUZZ
    @given(body=http_bodies(path))
    def run(body):
        connection = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
        try:
            connection.request("POST", path, body=body.encode("utf-8", "surrogatepass"),
                               headers={"Content-Type": "application/json"})  # fmt: skip
            reply = connection.getresponse()
            payload = reply.read()
        finally:
            connection.close()
        COUNTS[f"POST {path}"][str(reply.status)] += 1
        assert reply.status < 500, f"{reply.status}: {payload[:500]!r} for {body[:500]!r}"
        if reply.status >= 400:
            assert json.loads(payload)["error"]["message"]

    run()
    alive(stack)


def test_a_context_longer_than_the_model_takes_is_refused(stack):
    """Model services check a context against their model's, rather than run off its end."""
    for service, target, request in (
        ("Verifier", "verifier", lambda ctx: pb.VerifyRequest(context=ctx, draft=[1, 2])),
        ("Drafter", "drafter", lambda ctx: pb.ProposeRequest(context=ctx, k=2)),
    ):  # fmt: skip
        with grpc.insecure_channel(stack.address(target)) as channel:
            stub = getattr(pb_grpc, f"{service}Stub")(channel)
            info = stub.Info(pb.InfoRequest(), timeout=10)
            context = pb.Context(session_id="too-long", tokens=[5] * (info.max_context + 10))
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, "Verify" if service == "Verifier" else "Propose")(request(context), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"this model's context is {info.max_context}" in err.value.details()
