"""API keys and session ownership: the orchestrator and the gateway as real processes with
keys configured, called over gRPC and with the `openai` package."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import openai
import pytest
from client import ServiceStack
from procs import free_port, start_module, stop_process, wait_for_port

from services.auth import ApiKeys, Unauthenticated, key_id
from services.config import ConfigError
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from specd import client

KEY_A, KEY_B = "sk-alpha-0123456789", "sk-beta-9876543210"
INTERNAL_TOKEN = "internal-5f1c0e"
MODEL = "tiny-target"


# -- the key list ---------------------------------------------------------------------------


def test_keys_come_from_a_file_and_the_environment(tmp_path):
    file = tmp_path / "keys"
    file.write_text(f"# one key a line\n{KEY_A}\n\n  {KEY_B}  \n")
    keys = ApiKeys.from_env({"SPECD_API_KEYS_FILE": str(file), "SPECD_API_KEYS": "sk-inline"})
    assert len(keys) == 3 and not keys.open
    assert keys.identify(f"Bearer {KEY_B}") == key_id(KEY_B) != key_id(KEY_A)
    assert keys.identify("bearer sk-inline") == key_id("sk-inline")
    for bad in (None, "", KEY_A, f"Basic {KEY_A}", "Bearer ", f"Bearer {KEY_A}x", f"Bearer {KEY_A[:-1]}"):
        with pytest.raises(Unauthenticated):
            keys.identify(bad)


def test_no_key_means_an_open_api_and_a_bad_file_is_a_config_error(tmp_path):
    assert ApiKeys.from_env({}).open and ApiKeys.from_env({}).identify(None) == ""
    with pytest.raises(ConfigError, match="cannot read"):
        ApiKeys.from_env({"SPECD_API_KEYS_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="holds no key"):
        ApiKeys.from_env({"SPECD_API_KEYS_FILE": str(tmp_path / "empty")})


# -- over real processes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("security")
    keys = logs / "keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")

    def extra_env(_: ServiceStack, name: str) -> dict[str, str]:
        internal = {"SPECD_INTERNAL_TOKEN": INTERNAL_TOKEN}
        return {"SPECD_API_KEYS_FILE": str(keys), **internal} if name == "orchestrator" else internal

    s = ServiceStack(tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, logs, extra_env=extra_env)
    s.up()
    port = free_port()
    env = {
        "SPECD_HTTP_LISTEN": f"127.0.0.1:{port}", "SPECD_ORCHESTRATOR": s.address("orchestrator"),
        "SPECD_MODEL_NAME": MODEL, "SPECD_API_KEYS_FILE": str(keys),
    }  # fmt: skip
    gateway = start_module("gateway", env, logs / "gateway.log")
    wait_for_port(port, 60, gateway, logs / "gateway.log")
    s.http = f"http://127.0.0.1:{port}"
    yield s
    stop_process(gateway)
    s.down()


def turn(stack, api_key: str | None, **fields) -> client.Result:
    request = pb.GenerateRequest(prompt=fields.pop("prompt", "def f("), max_new_tokens=4, strategy="ar", **fields)
    return client.generate(stack.address("orchestrator"), request, timeout=60, api_key=api_key, resumes=0)


def delete(stack, session_id: str, api_key: str) -> bool:
    with grpc.insecure_channel(stack.address("orchestrator")) as channel:
        reply = pb_grpc.GeneratorStub(channel).DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id), timeout=10, metadata=client.auth_metadata(api_key)
        )
    return reply.deleted


@pytest.mark.parametrize("api_key", ["", "sk-wrong"])
def test_generate_needs_a_configured_key(stack, api_key):
    with pytest.raises(grpc.RpcError) as err:
        turn(stack, api_key)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in err.value.details()


def test_a_session_belongs_to_the_key_that_created_it(stack):
    mine = turn(stack, KEY_A)
    session = mine.stats.session_id
    with pytest.raises(grpc.RpcError) as err:  # another key cannot read it...
        turn(stack, KEY_B, prompt=" x", session_id=session)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert delete(stack, session, KEY_B) is False  # ...nor delete it
    again = turn(stack, KEY_A, prompt=" x", session_id=session)
    assert again.stats.session_id == session and again.stats.prompt_tokens > mine.stats.prompt_tokens
    assert delete(stack, session, KEY_A) is True


def test_the_gateway_checks_keys_and_passes_them_on(stack):
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{stack.http}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert err.value.body["code"] == "invalid_api_key"
    api = openai.OpenAI(base_url=f"{stack.http}/v1", api_key=KEY_A, max_retries=0, timeout=60)
    reply = api.completions.create(model=MODEL, prompt="def f(", max_tokens=4, extra_body={"specd": {"keep_session": True}})
    session = reply.model_extra["specd"]["session_id"]
    other = openai.OpenAI(base_url=f"{stack.http}/v1", api_key=KEY_B, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=MODEL, prompt=" x", max_tokens=4, extra_body={"specd": {"session_id": session}})
    assert delete(stack, session, KEY_A) is True
    with urllib.request.urlopen(f"{stack.http}/health", timeout=10) as health:  # probes need no key
        assert health.status == 200
    with pytest.raises(urllib.error.HTTPError) as no_key:
        urllib.request.urlopen(f"{stack.http}/v1/models", timeout=10)
    assert no_key.value.code == 401


@pytest.mark.parametrize("token", [None, "internal-wrong"])
def test_model_services_take_calls_from_orchestrators_only(stack, token):
    """Drafters and verifiers refuse calls without the internal token (the orchestrator, which
    has it, served every turn above); health checks need none, so probes keep working."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.auth import TOKEN_HEADER

    metadata = () if token is None else ((TOKEN_HEADER, token),)
    for name, call in (
        ("verifier", lambda ch: pb_grpc.VerifierStub(ch).Info(pb.InfoRequest(), timeout=10, metadata=metadata)),
        ("drafter", lambda ch: pb_grpc.DrafterStub(ch).Release(pb.ReleaseRequest(session_id="x"), timeout=10, metadata=metadata)),
    ):  # fmt: skip
        with grpc.insecure_channel(stack.address(name)) as channel:
            with pytest.raises(grpc.RpcError) as err:
                call(channel)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(stack.address("verifier")) as channel:  # the right token is served
        info = pb_grpc.VerifierStub(channel).Info(pb.InfoRequest(), timeout=10, metadata=((TOKEN_HEADER, INTERNAL_TOKEN),))
    assert info.vocab_size > 0


def test_the_orchestrator_sends_redis_its_password(redis_server):
    """REDIS_PASSWORD reaches a Redis that requires one; without it the orchestrator's
    client is refused (an error its readiness reports as 'redis does not answer')."""
    import asyncio

    import redis

    from orchestrator.server import redis_from_url

    plain = redis.Redis.from_url(redis_server.url)
    plain.config_set("requirepass", "pw-123")
    try:

        async def check() -> None:
            good = redis_from_url(redis_server.url, 2.0, "pw-123")
            assert await good.ping()
            await good.aclose()
            bad = redis_from_url(redis_server.url, 2.0)
            with pytest.raises(redis.exceptions.ConnectionError):  # AuthenticationError is one
                await bad.ping()
            await bad.aclose()

        asyncio.run(check())
    finally:
        redis.Redis.from_url(redis_server.url, password="pw-123").config_set("requirepass", "")
