"""A small test client for the Generator service and a stack of real service processes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from procs import free_port, start_process, stop_process

from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from specd import client
from specd.client import Result  # noqa: F401 (for tests)
from specd.stack import free_ports, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def generate(address: str, prompt: str | None = None, messages=None, **fields) -> Result:
    """Runs one turn to completion with the Python client (resuming a broken stream);
    raises grpc.RpcError on a failed status."""
    request = pb.GenerateRequest(**fields)
    if messages is not None:
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    else:
        request.prompt = prompt
    return client.generate(address, request, timeout=300)


MODULES = {"verifier": "verifier_svc", "drafter": "drafter_svc", "orchestrator": "orchestrator"}


@dataclass
class ServiceStack:
    """verifier, drafter and orchestrator as real processes on loopback ports.

    More of each kind can be added by name ("drafter2", "orchestrator2"): `services` lists
    what `up` starts, and `extra_env(stack, name)` gives a service's own variables on top of
    its kind's (addresses of the others are known by then: every port is chosen up front).
    """

    target_dir: Path
    drafter_dir: Path
    redis_url: str
    logs: Path
    dtype: str = "float64"
    threads: int = 1  # tiny models are all per-op overhead; real models want every core
    verifier_runtime: str = "auto"  # SPECD_RUNTIME of the verifier (auto: torch)
    drafter_runtime: str = "auto"  # SPECD_RUNTIME of the drafters (auto: llama, for a model with a GGUF)
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict = field(default_factory=dict)
    services: tuple[str, ...] = ("verifier", "drafter", "orchestrator")
    extra_env: Callable[[ServiceStack, str], dict[str, str]] | None = None

    @staticmethod
    def kind(name: str) -> str:
        return name.rstrip("0123456789")

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def env(self, name: str) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "SPECD_LISTEN": self.address(name),
            "SPECD_THREADS": str(self.threads),
            "SPECD_HOME": str(self.logs / "home"),
            "SPECD_GRACE_SECONDS": "1",
        }
        if self.kind(name) == "orchestrator":
            env |= {
                "SPECD_VERIFIER": self.address("verifier"),
                "SPECD_DRAFTER": self.address("drafter"),
                "SPECD_TOKENIZER": str(self.target_dir),
                "REDIS_URL": self.redis_url,
                "SPECD_MAX_NEW_TOKENS_LIMIT": "256",
                "SPECD_RPC_TIMEOUT": "60",
                "SPECD_VERIFIER_WAIT": "2",
            }
        else:
            verifier = self.kind(name) == "verifier"
            model = self.target_dir if verifier else self.drafter_dir
            runtime = self.verifier_runtime if verifier else self.drafter_runtime
            env |= {"SPECD_MODEL": str(model), "SPECD_DTYPE": self.dtype, "SPECD_RUNTIME": runtime}
        return env | (self.extra_env(self, name) if self.extra_env else {})

    def start(self, name: str) -> None:
        module = MODULES[self.kind(name)]
        self.ports.setdefault(name, free_port())
        log_path = self.logs / f"{name}.log"
        self.procs[name] = (start_process([sys.executable, "-m", module], self.env(name), log_path), log_path)

    def wait(self, name: str) -> None:
        proc, log_path = self.procs[name]
        import time

        wait_healthy(name, proc, self.address(name), log_path, time.monotonic() + 120)

    def stop(self, name: str) -> None:
        proc, _ = self.procs.pop(name)
        stop_process(proc)

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)
        self.wait(name)

    def up(self) -> ServiceStack:
        """Starts every service and waits for each; if one fails, stops those started (a fixture
        that fails in its set-up never reaches its own teardown)."""
        unassigned = [name for name in self.services if name not in self.ports]
        self.ports.update(zip(unassigned, free_ports(len(unassigned))))
        try:
            for name in self.services:
                self.start(name)
            for name in self.services:
                self.wait(name)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for name in list(self.procs):
            self.stop(name)
