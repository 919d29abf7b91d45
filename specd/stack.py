"""The local stack: redis-server, verifier, drafter and orchestrator as processes on loopback.

`specd up` starts them, waits for each health check and records them in a state file;
`specd down` (or Ctrl-C on a foreground `specd up`) stops them in reverse order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class StackSpec:
    home: Path
    target: str  # catalog name or model folder
    drafter: str  # catalog name or folder; "" for none
    host: str = "127.0.0.1"
    orchestrator_port: int = 50050
    verifier_port: int = 50051
    drafter_port: int = 50052  # the first drafter's; replicas take the ports after it
    redis_port: int = 6399
    verifier_replicas: int = 1  # the verifiers take verifier_port, verifier_port + 1, ...
    drafter_replicas: int = 1
    threads: int = 0  # SPECD_THREADS of each model service; 0 = $SPECD_THREADS, else every core
    redis_url: str = ""  # an existing Redis; "" starts redis-server
    dtype: str = "auto"  # SPECD_DTYPE of the model services (torch runtime)
    verifier_runtime: str = "auto"  # SPECD_RUNTIME of the verifier
    drafter_runtime: str = "auto"  # SPECD_RUNTIME of the drafter
    default_k: int = 0  # 0 = adaptive
    # Each model service on a core of its own with one thread (verifier on core 0, drafters on
    # the next): parallel like separate machines, rather than competing for every core.
    pin: bool = False
    # The address the orchestrator calls for a role instead of its replicas' (a proxy in front).
    routes: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 600.0  # model loading on a slow disk can take minutes
    # The OpenAI-compatible HTTP gateway's host:port ("" = none; gateway/)
    http_listen: str = ""
    # The first Prometheus endpoint's port: the orchestrator's, then each model service's and
    # the gateway's, in the order `specd status` lists them (0 = none)
    metrics_port: int = 0
    api_keys_file: str = ""  # SPECD_API_KEYS_FILE of the orchestrator and the gateway ("" = an open API)
    max_sessions: int = 0  # SPECD_MAX_SESSIONS of the model services (0 = their default)
    # A trained head (`specd train redrafter|parallel`: its name under home/heads, or a
    # folder) served by a drafter process of its own for the strategy of its kind; "" = none
    head: str = ""
    head_port: int = 50049
    # Heads for one language's prompts (`specd train --language`), each served by a drafter
    # process of its own and made that language's pool of SPECD_HEAD: language -> (head, port)
    language_heads: dict[str, tuple[str, int]] = field(default_factory=dict)

    def address(self, port: int) -> str:
        return f"{self.host}:{port}"

    def model_services(self) -> list[tuple[str, str, str, int, str]]:
        """(name, module, model, port, runtime) of every verifier and drafter replica."""
        services = [
            (_replica("verifier", i), "verifier_svc", self.target, self.verifier_port + i, self.verifier_runtime)
            for i in range(self.verifier_replicas)
        ]
        if self.drafter:
            services += [
                (_replica("drafter", i), "drafter_svc", self.drafter, self.drafter_port + i, self.drafter_runtime)
                for i in range(self.drafter_replicas)
            ]
        if self.head:
            services.append(("head", "drafter_svc", self.head, self.head_port, "torch"))
            services += [
                (f"head-{language}", "drafter_svc", head, port, "torch")
                for language, (head, port) in self.language_heads.items()
            ]
        return services

    def pool(self, role: str) -> str:
        """SPECD_VERIFIER, SPECD_DRAFTER or SPECD_HEAD for the orchestrator: every replica's
        address (the head's then `fr=` the heads for one language)."""
        if role in self.routes:
            return self.routes[role]
        pools = [self.address(port) for name, _, _, port, _ in self.model_services() if _role(name) == role]
        if role == "head" and pools:
            pools += [f"{language}={self.address(port)}" for language, (_, port) in self.language_heads.items()]
        return ",".join(pools)


def parse_heads(text: str) -> tuple[str, dict[str, str]]:
    """--head's value: the head of every prompt, then `fr=NAME` entries, the head of prompts
    in that language (as SPECD_HEAD pools them): (head, {language: head})."""
    from services.config import ConfigError, labelled_targets

    try:
        pools = labelled_targets(text, "--head", addresses=False)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    if any(len(heads) > 1 for heads in pools.values()):
        raise ValueError(f"--head {text!r}: one head per language")
    return (pools[""][0] if pools else ""), {language: heads[0] for language, heads in pools.items() if language}


def _replica(role: str, i: int) -> str:
    return role if i == 0 else f"{role}{i + 1}"


def _role(name: str) -> str:
    return name.rstrip("0123456789")


@dataclass
class Proc:
    name: str
    pid: int
    address: str
    log: str
    metrics: str = ""  # the URL of its Prometheus endpoint, if it serves one


def run_dir(home: Path) -> Path:
    return home / "run"


def state_file(home: Path) -> Path:
    return run_dir(home) / "stack.json"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports on host that were free a moment ago.

    All n sockets stay bound until every port is chosen: closing each before asking for
    the next lets the OS hand out the same port twice.
    """
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def _spawn(name: str, args: list[str], env: dict[str, str], log_path: Path, cpus: set[int] | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    with open(log_path, "ab") as log:
        # A new session: Ctrl-C in the terminal reaches `specd up`, which stops the
        # children in order, instead of killing them all at once.
        return subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pin
        )


def pinned_cpus(index: int) -> set[int]:
    """The core of the index-th model service of a pinned stack (round robin over this machine's)."""
    cores = sorted(os.sched_getaffinity(0))
    return {cores[index % len(cores)]}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_redis(proc: subprocess.Popen, host: str, port: int, log_path: Path, deadline: float) -> None:
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=1)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"redis-server exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            if client.ping():
                return
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    raise StackError(f"redis-server did not answer on {host}:{port}:\n{_tail(log_path)}")


def wait_healthy(name: str, proc: subprocess.Popen | None, address: str, log_path: Path, deadline: float) -> None:
    """Polls the health check until it passes: the standard gRPC health service at a host:port
    (SERVING), or an http:// URL (200; the gateway's /health)."""
    from services.healthcheck import probe

    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{name} exited with {proc.returncode}; last log lines ({log_path}):\n{_tail(log_path)}")
        if probe(address, timeout=1)[0]:
            return
        time.sleep(0.5)
    raise StackError(f"{name} at {address} was not healthy in time; last log lines ({log_path}):\n{_tail(log_path)}")


def health_address(proc: Proc) -> str:
    """Where a process of the stack is health-checked: the gateway at its /health URL."""
    return proc.address.removesuffix("/v1") + "/health" if _role(proc.name) == "gateway" else proc.address


def default_strategy(spec: StackSpec) -> str:
    """The orchestrator's default: sd with a drafter of the target's vocabulary, tli with one
    of another (slem and slrs are there too, by request), lookup without a drafter (it drafts
    in the orchestrator, and decodes plainly where the text does not repeat itself)."""
    if not spec.drafter:
        return "lookup"
    from transformers import AutoTokenizer

    from services.models import ModelNotFound, resolve
    from services.runtime import tokenizer_fingerprint

    try:
        prints = {
            tokenizer_fingerprint(AutoTokenizer.from_pretrained(resolve(model, spec.home)))
            for model in (spec.target, spec.drafter)
        }
    except (ModelNotFound, OSError, ValueError):
        return "sd"  # the services will report what is wrong with the models
    return "sd" if len(prints) == 1 else "tli"


def up(spec: StackSpec, say=print) -> list[Proc]:
    """Starts the stack and returns its processes, all healthy."""
    if state_file(spec.home).exists() and any(_alive(p.pid) for p in read_state(spec.home)):
        raise StackError(f"a stack is already running (see {state_file(spec.home)}); stop it with `specd down`")
    ports = [spec.orchestrator_port] + [port for _, _, _, port, _ in spec.model_services()]
    if not spec.redis_url:
        ports.append(spec.redis_port)
    metrics = _metrics_ports(spec)
    ports += metrics.values()
    if spec.http_listen:
        ports.append(int(spec.http_listen.rpartition(":")[2]))
    busy = [p for p in ports if not _port_free(spec.host, p)]
    if busy:
        raise StackError(f"ports {busy} on {spec.host} are in use; stop what holds them or choose other ports")
    logs = run_dir(spec.home) / "logs"
    deadline = time.monotonic() + spec.start_timeout
    procs: list[Proc] = []
    started: list[subprocess.Popen] = []
    base_env = {**os.environ, "SPECD_HOME": str(spec.home), "PYTHONUNBUFFERED": "1"}
    try:
        redis_url = spec.redis_url
        if not redis_url:
            server = shutil.which("redis-server")
            if server is None:
                raise StackError("redis-server is not installed: install it (apt-get install redis-server) or set REDIS_URL")
            data = run_dir(spec.home) / "redis"
            data.mkdir(parents=True, exist_ok=True)
            log_path = logs / "redis.log"
            # Append-only file, fsynced every second: sessions survive a Redis restart.
            args = [server, "--port", str(spec.redis_port), "--bind", spec.host, "--save", "", "--appendonly", "yes",
                    "--appendfsync", "everysec", "--dir", str(data)]  # fmt: skip
            proc = _spawn("redis", args, base_env, log_path)
            started.append(proc)
            _wait_redis(proc, spec.host, spec.redis_port, log_path, deadline)
            redis_url = f"redis://{spec.host}:{spec.redis_port}/0"
            procs.append(Proc("redis", proc.pid, redis_url, str(log_path)))
            say(f"redis        {redis_url}")
        for index, (name, module, model, port, runtime) in enumerate(spec.model_services()):
            env = {
                **base_env, "SPECD_MODEL": model, "SPECD_LISTEN": spec.address(port), "SPECD_DTYPE": spec.dtype,
                "SPECD_RUNTIME": runtime,
            }  # fmt: skip
            if spec.threads or spec.pin:
                env["SPECD_THREADS"] = "1" if spec.pin else str(spec.threads)
            if spec.max_sessions:
                env["SPECD_MAX_SESSIONS"] = str(spec.max_sessions)
            if _role(name) == "drafter":
                env["SPECD_TARGET_TOKENIZER"] = spec.target  # translates if its vocabulary differs
            env |= _metrics_env(spec, metrics, name)
            cpus = pinned_cpus(index) if spec.pin else None
            proc = _spawn(name, [sys.executable, "-m", module], env, logs / f"{name}.log", cpus)
            if cpus is not None:
                say(f"{name:<12} pinned to CPU {min(cpus)}, one thread")
            started.append(proc)
            procs.append(Proc(name, proc.pid, spec.address(port), str(logs / f"{name}.log"), _metrics_url(spec, metrics, name)))
        orch_env = {
            **base_env,
            "SPECD_LISTEN": spec.address(spec.orchestrator_port),
            "SPECD_VERIFIER": spec.pool("verifier"),
            "SPECD_DRAFTER": spec.pool("drafter"),
            "SPECD_HEAD": spec.pool("head"),
            "SPECD_TOKENIZER": spec.target,
            "SPECD_STRATEGY": default_strategy(spec),
            "SPECD_K": str(spec.default_k),
            "REDIS_URL": redis_url,
            # a pinned stack gives drafter and verifier cores of their own
            **({"SPECD_OWN_CORES": "1"} if spec.pin else {}),
            **_metrics_env(spec, metrics, "orchestrator"),
            **_keys_env(spec),
        }
        log_path = logs / "orchestrator.log"
        proc = _spawn("orchestrator", [sys.executable, "-m", "orchestrator"], orch_env, log_path)
        started.append(proc)
        orchestrator = spec.address(spec.orchestrator_port)
        procs.append(Proc("orchestrator", proc.pid, orchestrator, str(log_path), _metrics_url(spec, metrics, "orchestrator")))
        if spec.http_listen:
            gateway_env = {
                **base_env, "SPECD_HTTP_LISTEN": spec.http_listen, "SPECD_ORCHESTRATOR": orchestrator,
                "SPECD_MODEL_NAME": Path(spec.target).name, **_metrics_env(spec, metrics, "gateway"), **_keys_env(spec),
            }  # fmt: skip
            log_path = logs / "gateway.log"
            proc = _spawn("gateway", [sys.executable, "-m", "gateway"], gateway_env, log_path)
            started.append(proc)
            procs.append(Proc("gateway", proc.pid, f"http://{spec.http_listen}/v1", str(log_path), _metrics_url(spec, metrics, "gateway")))
        write_state(spec.home, procs)
        for p, popen in zip(procs, started):
            if p.name == "redis":
                continue
            say(f"waiting for {p.name} at {p.address} (log: {p.log}) ...")
            wait_healthy(p.name, popen, health_address(p), Path(p.log), deadline)
            say(f"{p.name:<12} {p.address}  healthy")
    except BaseException:
        for proc in reversed(started):
            _terminate(proc.pid)
        state_file(spec.home).unlink(missing_ok=True)
        raise
    return procs


def _keys_env(spec: StackSpec) -> dict[str, str]:
    return {"SPECD_API_KEYS_FILE": str(Path(spec.api_keys_file).resolve())} if spec.api_keys_file else {}


def _metrics_ports(spec: StackSpec) -> dict[str, int]:
    """The Prometheus port of each process (none when spec.metrics_port is 0)."""
    if not spec.metrics_port:
        return {}
    names = ["orchestrator", *(name for name, *_ in spec.model_services())] + (["gateway"] if spec.http_listen else [])
    return {name: spec.metrics_port + i for i, name in enumerate(names)}


def _metrics_env(spec: StackSpec, ports: dict[str, int], name: str) -> dict[str, str]:
    return {"SPECD_METRICS_LISTEN": spec.address(ports[name])} if name in ports else {}


def _metrics_url(spec: StackSpec, ports: dict[str, int], name: str) -> str:
    return f"http://{spec.address(ports[name])}/metrics" if name in ports else ""


def write_state(home: Path, procs: list[Proc]) -> None:
    path = state_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(p) for p in procs], indent=2))


def read_state(home: Path) -> list[Proc]:
    try:
        return [Proc(**p) for p in json.loads(state_file(home).read_text())]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _terminate(pid: int, timeout: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def down(home: Path, say=print) -> int:
    """Stops the processes of the running stack, orchestrator first; returns how many."""
    procs = read_state(home)
    stopped = 0
    for p in reversed(procs):
        if _alive(p.pid):
            _terminate(p.pid)
            say(f"stopped {p.name} (pid {p.pid})")
            stopped += 1
    state_file(home).unlink(missing_ok=True)
    return stopped


@dataclass
class ProcStatus:
    """One process of the running stack, as `specd status` shows it."""

    name: str
    role: str
    address: str
    pid: int
    alive: bool
    healthy: bool
    rss_bytes: int = 0
    metrics: str = ""  # the URL of its Prometheus endpoint, if it serves one
    sessions: int | None = None  # model services: what their Status RPC reports
    calls: int | None = None
    context_hits: int | None = None
    context_misses: int | None = None
    full_contexts: int | None = None


def _model_status(role: str, address: str):
    from services.pb import specd_pb2 as pb
    from services.pb import specd_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DrafterStub(channel) if role == "drafter" else pb_grpc.VerifierStub(channel)
        try:
            return stub.Status(pb.StatusRequest(), timeout=2)
        except grpc.RpcError:
            return None


def status(home: Path) -> list[ProcStatus]:
    """Every process of the stack: alive, healthy, memory, and what each model service served."""
    from services.healthcheck import probe
    from services.server import rss_bytes

    out = []
    for p in read_state(home):
        role = _role(p.name)
        alive = _alive(p.pid)
        entry = ProcStatus(p.name, role, p.address, p.pid, alive, False, rss_bytes(p.pid) if alive else 0, p.metrics)
        if alive and role == "redis":
            import redis

            try:
                entry.healthy = bool(redis.Redis.from_url(p.address, socket_timeout=2).ping())
            except redis.exceptions.RedisError:
                pass
        elif alive:
            entry.healthy, _ = probe(health_address(p))
            reply = _model_status(role, p.address) if role in ("verifier", "drafter") else None
            if reply is not None:
                entry.sessions, entry.calls = reply.sessions, reply.calls
                entry.context_hits, entry.context_misses = reply.context_hits, reply.context_misses
                entry.full_contexts = reply.full_contexts
        out.append(entry)
    return out
