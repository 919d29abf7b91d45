"""services/flags.py: each service's flags are exactly the variables it reads, with the
defaults it applies, and a flag given wins over the environment."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from procs import REPO_ROOT

from services import flags
from services.auth import ApiKeys, internal_token
from services.config import GatewayConfig, ModelServiceConfig, OrchestratorConfig

REQUIRED = {
    "model": {"SPECD_MODEL": "m"},
    "orchestrator": {"SPECD_VERIFIER": "127.0.0.1:1", "SPECD_TOKENIZER": "t"},
    "gateway": {},
}
READ_IN_MAIN = {"SPECD_LOG_LEVEL"}  # read before the config, to set up logging


class Recording(dict):
    """An environment that remembers every variable asked for."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)


def build_model(env) -> object:
    return ModelServiceConfig.from_env(env, "127.0.0.1:50051"), internal_token(env)


def build_orchestrator(env) -> object:
    keys = ApiKeys.from_env(env)
    return OrchestratorConfig.from_env(env, "127.0.0.1:50050"), keys.open, internal_token(env)


def build_gateway(env) -> object:
    return GatewayConfig.from_env(env), ApiKeys.from_env(env).open


CASES = [
    ("model", flags.MODEL_SERVICE, build_model),
    ("orchestrator", flags.ORCHESTRATOR, build_orchestrator),
    ("gateway", flags.GATEWAY, build_gateway),
]


@pytest.mark.parametrize(("kind", "settings", "build"), CASES, ids=[c[0] for c in CASES])
def test_the_flags_are_the_variables_the_service_reads(kind: str, settings, build: Callable) -> None:
    env = Recording(REQUIRED[kind])
    build(env)
    listed = {s.env for s in settings}
    assert env.asked - listed == set(), "read but without a flag"
    assert listed - env.asked - READ_IN_MAIN == set(), "a flag nothing reads"
    assert len({s.flag for s in settings}) == len(settings)


@pytest.mark.parametrize(("kind", "settings", "build"), CASES, ids=[c[0] for c in CASES])
def test_the_defaults_shown_are_the_defaults_applied(kind: str, settings, build: Callable) -> None:
    base = build(dict(REQUIRED[kind]))
    for s in settings:
        if s.default and s.env not in READ_IN_MAIN and s.env != "SPECD_HOME":
            assert build({**REQUIRED[kind], s.env: s.default}) == base, s.env


def test_a_flag_wins_over_the_environment_and_help_names_the_variables(capsys) -> None:
    env = flags.environment("x", "", flags.MODEL_SERVICE, ["--max-sessions", "3", "--kv-tokens=8"], {"SPECD_MAX_SESSIONS": "9"})
    assert env["SPECD_MAX_SESSIONS"] == "3" and env["SPECD_KV_TOKENS"] == "8"
    config = ModelServiceConfig.from_env({**env, "SPECD_MODEL": "m"}, "127.0.0.1:1")
    assert config.max_sessions == 3 and config.kv_tokens == 8
    with pytest.raises(SystemExit):
        flags.environment("x", "", flags.MODEL_SERVICE, ["--no-such-flag", "1"], {})
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["verifier_svc", "drafter_svc", "orchestrator", "gateway"])
def test_every_service_has_help(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert f"python -m {module}" in out.stdout and "--metrics-listen" in out.stdout and "$SPECD_METRICS_LISTEN" in out.stdout
