"""Start, wait for and stop real service processes in integration tests.

Integration tests run each service as its own OS process (as in production), so a
failure must say why the process did not come up: every helper that gives up raises
with the tail of the process's log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 40
POLL_S = 0.05
REDIS_START_TIMEOUT_S = 10.0
REDIS_START_ATTEMPTS = 3  # free_port can race with another process taking the port


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_run(n: int, attempts: int = 50) -> int:
    """The first of n consecutive loopback ports that were all free a moment ago."""
    for _ in range(attempts):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no run of {n} free ports found")


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log, for error messages; never raises."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {log_path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def start_process(
    args: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO_ROOT
) -> subprocess.Popen:
    """Start `args` with `env` laid over the current environment, stdout+stderr to `log_path`.

    Runs from the repository root so `python -m verifier_svc` resolves without an
    install. Unbuffered output so the log is complete when a test reads its tail.
    Its own session, so a Ctrl-C in pytest does not race the test's own shutdown.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "ab") as log:  # Popen keeps its own duplicate of the descriptor
        return subprocess.Popen(
            args,
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_module(
    module: str, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()
) -> subprocess.Popen:
    """Start `python -m module` with this interpreter (the test virtualenv)."""
    return start_process([sys.executable, "-m", module, *args], env, log_path)


def _check_alive(proc: subprocess.Popen, log_path: Path, waiting_for: str) -> None:
    code = proc.poll()
    if code is not None:
        raise RuntimeError(
            f"process {proc.args!r} exited with {code} while waiting for {waiting_for}; "
            f"log tail ({log_path}):\n{log_tail(log_path)}"
        )


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log_path: Path) -> None:
    """Block until 127.0.0.1:`port` accepts a TCP connection.

    Raises RuntimeError if `proc` exits first and TimeoutError after `timeout` seconds,
    both with the log tail.
    """
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(proc, log_path, f"port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"port {port} of {proc.args!r} not open after {timeout} s; "
                f"log tail ({log_path}):\n{log_tail(log_path)}"
            )
        time.sleep(POLL_S)


def wait_for_grpc_health(
    port: int, timeout: float, proc: subprocess.Popen, log_path: Path, service: str = ""
) -> None:
    """Block until the gRPC health service on `port` reports `service` as SERVING.

    An open port is not enough: a service binds before its model is loaded, and the
    standard health service is how it says it is ready ("" = the whole server).
    """
    wait_for_port(port, timeout, proc, log_path)
    deadline = time.monotonic() + timeout
    last = "no answer"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            _check_alive(proc, log_path, f"gRPC health on port {port}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"gRPC health of {service or '<server>'} on port {port} is {last} after "
                    f"{timeout} s; log tail ({log_path}):\n{log_tail(log_path)}"
                )
            time.sleep(POLL_S)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> int:
    """SIGTERM (a graceful stop, as Kubernetes does), then SIGKILL after `timeout` s.

    Returns the exit code (negative: killed by that signal).
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server owned by a test (or the test session)."""

    url: str  # redis://127.0.0.1:PORT/0
    port: int
    process: subprocess.Popen
    log_path: Path


def _wait_for_ping(server: RedisServer, timeout: float) -> bool:
    """True once the server answers PING; False if its process exited first."""
    deadline = time.monotonic() + timeout
    client = redis.Redis(port=server.port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        while server.process.poll() is None:
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                stop_process(server.process)
                raise TimeoutError(
                    f"redis-server on port {server.port} did not answer PING within {timeout} s; "
                    f"log tail ({server.log_path}):\n{log_tail(server.log_path)}"
                )
            time.sleep(POLL_S)
        return False
    finally:
        client.close()


def start_redis(binary: str, data_dir: Path, timeout: float = REDIS_START_TIMEOUT_S) -> RedisServer:
    """Start a real, empty, non-persistent redis-server on a free loopback port.

    Returns once it answers PING; stop it with `stop_process(server.process)`. Retries on
    a fresh port if the process exits early (another process took the port meanwhile).
    """
    for _ in range(REDIS_START_ATTEMPTS):
        port = free_port()
        log_path = data_dir / f"redis-{port}.log"
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(data_dir)]  # fmt: skip
        server = RedisServer(
            url=f"redis://127.0.0.1:{port}/0",
            port=port,
            process=start_process(args, {}, log_path, cwd=data_dir),
            log_path=log_path,
        )
        if _wait_for_ping(server, timeout):
            return server
    raise RuntimeError(
        f"redis-server exited before answering PING ({REDIS_START_ATTEMPTS} attempts); "
        f"log tail ({server.log_path}):\n{log_tail(server.log_path)}"
    )
