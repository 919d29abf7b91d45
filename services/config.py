"""One frozen configuration object per service, built from environment variables in `main`.

The same variable names are used by `specd up`, docker-compose and the Kubernetes
manifests; services/flags.py makes each one a command-line flag as well (`--help`).
"""

from __future__ import annotations

import math

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # services.tree needs torch: a process that only reads its config does not
    from services.tree import TreeShape

DTYPES = ("auto", "int8", "float32", "bfloat16", "float16", "float64")
INT8_KERNELS = ("auto", "onednn", "fbgemm")  # services/int8.KERNELS, and auto


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says which and why."""


def default_home() -> Path:
    return Path.home() / ".cache" / "specd"


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name, "1" if default else "0").lower()
    if raw not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")
    return raw in ("1", "true", "yes")


def _float(env: Mapping[str, str], name: str, default: float, low: float = 0.0, high: float = math.inf,
           zero: bool = False) -> float:  # fmt: skip
    """A number > low (>= low with `zero`) and <= high."""
    raw = _get(env, name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not (low <= value if zero else low < value) or not value <= high:
        upper = f" and <= {high:g}" if math.isfinite(high) else ""
        raise ConfigError(f"{name} must be {'>=' if zero else '>'} {low:g}{upper}, got {value}")
    return value


@dataclass(frozen=True)
class ModelServiceConfig:
    """Configuration of a drafter or verifier process."""

    model: str  # SPECD_MODEL: a catalog name (see `specd models list`), a Hugging Face folder or a GGUF file
    listen: str  # SPECD_LISTEN: host:port to serve on
    home: Path  # SPECD_HOME: where prepared models live
    # SPECD_RUNTIME: llama (llama.cpp, GGUF), torch (transformers) or auto: per role, what is
    # fastest here (services/runtime.choose_runtime)
    runtime: str = "auto"
    # SPECD_DTYPE (torch): auto = int8 on CPU (services/int8.py), bfloat16 on CUDA; or float32, ...
    dtype: str = "auto"
    device: str = "cpu"  # SPECD_DEVICE: cpu, cuda, cuda:1, ...
    threads: int = 0  # SPECD_THREADS: threads of a forward pass; 0 = every core
    onednn: bool = True  # SPECD_ONEDNN: oneDNN linears on CPU fp32 (multi-token passes ~2x cheaper)
    # SPECD_INT8_KERNEL: the int8 GEMM, auto (oneDNN on CPUs with AMX, fbgemm elsewhere), onednn
    # or fbgemm (services/int8.py)
    int8_kernel: str = "auto"
    # SPECD_HUGE_PAGES (torch on CPU): back the loaded weights with 2 MB pages (services/hugepages.py)
    huge_pages: bool = True
    kv_tokens: int = 0  # SPECD_KV_TOKENS (llama): KV cells shared by all sessions; 0 = 8192 (drafter), the model's context (verifier)
    # SPECD_KV_RESIDENT (llama): KV cells other sessions may keep in the cache while one runs;
    # the rest are parked in host memory (a pass attends over every cell held: services/llama_runtime.py)
    kv_resident: int = 0
    max_sessions: int = 16  # SPECD_MAX_SESSIONS: KV caches kept (LRU); a miss costs a re-prefill
    # SPECD_PREFIX_CACHE: contexts whose KV entries are kept for new sessions that begin the same
    # way, a chat template and system prompt (services/prefixes.py); 0 = off
    prefix_cache: int = 4
    q_top: int = 32  # SPECD_Q_TOP: entries of the truncated proposal distribution q a drafter sends
    max_draft: int = 64  # SPECD_MAX_DRAFT: the longest draft (or most tree nodes) accepted in one call
    # SPECD_MAX_QUEUE: calls that may wait for the model; more are refused with RESOURCE_EXHAUSTED
    # and a retry hint (0 = no bound)
    max_queue: int = 64
    # SPECD_MAX_BATCH_TOKENS: tokens one pass may feed for the calls of different sessions
    # batched into it (verify and ar; propose) (services/calls.py); 0 = one call per pass
    max_batch_tokens: int = 256
    # SPECD_BATCH_WAIT_MS: how long a batched pass may wait for the sessions of the pass before
    # it to send their next call (none missing: no wait)
    batch_wait_ms: float = 20.0
    # SPECD_PREFILL_CHUNK (verifier): uncached context tokens a pass feeds in all while several
    # sessions' calls share it or wait, oldest first; the rest in the passes after (chunked
    # prefill, services/calls.py); 0 = no limit
    prefill_chunk: int = 64
    grace_seconds: float = 5.0  # SPECD_GRACE_SECONDS: time in-flight calls get on shutdown
    # SPECD_SECOND_STAGE: max-gram tokens a drafter feeds ahead of need while growing a tree
    # (staged's second stage; saves drafter passes where the max-gram model guesses right); 0 = off
    second_stage: int = 4
    # SPECD_DRAFT_MIN_CONFIDENCE (drafters): a draft stops before a position where the
    # drafter's own top probability is below this (0 = never stops early)
    draft_min_confidence: float = 0.0
    # SPECD_TARGET_TOKENIZER (drafters): the target's tokenizer, a catalog name or folder. A
    # drafter whose vocabulary differs from it translates (strategies slem, tli, slrs); '' = none.
    target_tokenizer: str = ""
    metrics_listen: str = ""  # SPECD_METRICS_LISTEN: host:port of the Prometheus endpoint; '' = none

    @classmethod
    def from_env(cls, env: Mapping[str, str], default_listen: str) -> ModelServiceConfig:
        model = _get(env, "SPECD_MODEL", "")
        if not model:
            raise ConfigError("SPECD_MODEL is not set: give a catalog name (specd models list) or a model folder")
        dtype = _get(env, "SPECD_DTYPE", "auto")
        if dtype not in DTYPES:
            raise ConfigError(f"SPECD_DTYPE must be one of {', '.join(DTYPES)}, got {dtype!r}")
        int8_kernel = _get(env, "SPECD_INT8_KERNEL", "auto")
        if int8_kernel not in INT8_KERNELS:
            raise ConfigError(f"SPECD_INT8_KERNEL must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
        runtime = _get(env, "SPECD_RUNTIME", "auto")
        if runtime not in ("auto", "llama", "torch"):
            raise ConfigError(f"SPECD_RUNTIME must be auto, llama or torch, got {runtime!r}")
        return cls(
            model=model,
            listen=_get(env, "SPECD_LISTEN", default_listen),
            home=Path(_get(env, "SPECD_HOME", str(default_home()))),
            runtime=runtime,
            dtype=dtype,
            device=_get(env, "SPECD_DEVICE", "cpu"),
            threads=_int(env, "SPECD_THREADS", 0),
            onednn=_bool(env, "SPECD_ONEDNN", True),
            int8_kernel=int8_kernel,
            huge_pages=_bool(env, "SPECD_HUGE_PAGES", True),
            kv_tokens=_int(env, "SPECD_KV_TOKENS", 0),
            kv_resident=_int(env, "SPECD_KV_RESIDENT", 0),
            max_sessions=_int(env, "SPECD_MAX_SESSIONS", 16, minimum=1),
            prefix_cache=_int(env, "SPECD_PREFIX_CACHE", 4),
            q_top=_int(env, "SPECD_Q_TOP", 32, minimum=1),
            max_draft=_int(env, "SPECD_MAX_DRAFT", 64, minimum=1),
            max_queue=_int(env, "SPECD_MAX_QUEUE", 64),
            max_batch_tokens=_int(env, "SPECD_MAX_BATCH_TOKENS", 256),
            prefill_chunk=_int(env, "SPECD_PREFILL_CHUNK", 64),
            batch_wait_ms=_float(env, "SPECD_BATCH_WAIT_MS", 20.0, zero=True),
            grace_seconds=_float(env, "SPECD_GRACE_SECONDS", 5.0),
            second_stage=_int(env, "SPECD_SECOND_STAGE", 4),
            draft_min_confidence=_float(env, "SPECD_DRAFT_MIN_CONFIDENCE", 0.0, high=1.0, zero=True),
            target_tokenizer=_get(env, "SPECD_TARGET_TOKENIZER", ""),
            metrics_listen=_listen(env, "SPECD_METRICS_LISTEN"),
        )


DNS = "dns:///"


def split_target(target: str) -> tuple[str, str]:
    """The host (or DNS name) and port of a `host:port` or `dns:///name:port` target."""
    host, _, port = target.removeprefix(DNS).rpartition(":")
    return host, port


def split_host_port(address: str, name: str) -> tuple[str, int]:
    """A listening address `host:port` (`[::1]:port` for IPv6); ConfigError naming `name`."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name} must be host:port (e.g. 127.0.0.1:9100), got {address!r}")
    return host.strip("[]"), int(port)


def _listen(env: Mapping[str, str], name: str, default: str = "") -> str:
    """An optional host:port to listen on ('' = off), checked now rather than at bind time."""
    value = _get(env, name, default)
    if value:
        split_host_port(value, name)
    return value


def parse_targets(text: str, separator: str = ",") -> tuple[str, ...]:
    """The replicas of a pool: `host:port` and `dns:///name:port` entries (a name re-resolved
    periodically, every address a replica), separated by `separator`."""
    targets = tuple(t.strip() for t in text.split(separator) if t.strip())
    for target in targets:
        host, port = split_target(target)
        if not host or not port.isdigit():
            raise ConfigError(f"{target!r} is not host:port or dns:///name:port")
    return targets


def labelled_targets(text: str, name: str = "SPECD_DRAFTER", addresses: bool = True) -> dict[str, tuple[str, ...]]:
    """The pools of SPECD_DRAFTER (or SPECD_HEAD, `name`): unlabelled entries form the default
    pool (""), `fr=host:port` entries the pool of prompts in that language (an ISO 639 code,
    as language identification reports it). addresses=False: entries are names (`specd up
    --head`), kept as they are."""
    pools: dict[str, list[str]] = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        label, sep, target = entry.partition("=")
        if not sep:
            label, target = "", entry
        elif not (label.isalpha() and label.islower() and 2 <= len(label) <= 3):
            raise ConfigError(f"{name}: {entry!r}: a pool's label is a language code such as fr or de, got {label!r}")
        pools.setdefault(label, []).extend(parse_targets(target) if addresses else [target.strip()])
    if pools and "" not in pools:
        raise ConfigError(f"{name}={text!r} has no unlabelled entry: give the default pool too")
    return {label: tuple(targets) for label, targets in pools.items()}


def cascade_level(level: str) -> tuple[str, tuple[str, ...]]:
    """One SPECD_CASCADE level: ("maxgram", ()), or its vocabulary mode ("native", "tli",
    "slem") and its pool's targets, joined by '+' ("tli:d1:50052+d2:50052")."""
    if level == "maxgram":
        return "maxgram", ()
    mode, _, rest = level.partition(":")
    if mode in ("tli", "slem") and rest:
        return mode, parse_targets(rest, "+")
    return "native", parse_targets(level, "+")


def _int_list(name: str, text: str, minimum: int = 0) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {text!r}") from None
    if any(v < minimum for v in values):
        raise ConfigError(f"{name} entries must be >= {minimum}, got {text!r}")
    return values


def _k_matrix(env: Mapping[str, str], name: str) -> tuple[tuple[int, ...], ...]:
    """Rows separated by ';', entries by ','; '' = none (the strategy's default)."""
    raw = _get(env, name, "")
    return tuple(_int_list(name, row) for row in raw.split(";")) if raw else ()


def _tree(env: Mapping[str, str], name: str) -> TreeShape | None:
    """"branching:budget", e.g. "3,2,1,1,1:8"; '' = none (the strategy's default)."""
    from services.tree import TreeShape

    raw = _get(env, name, "")
    if not raw:
        return None
    branching, _, budget = raw.partition(":")
    budget_values = _int_list(name, budget)
    shape = TreeShape(_int_list(name, branching, minimum=1), budget_values[0] if len(budget_values) == 1 else 0)
    if shape.problems():
        raise ConfigError(f"{name}={raw!r}: {'; '.join(shape.problems())} (the format is branching:budget, e.g. 3,2,1,1,1:8)")
    return shape


@dataclass(frozen=True)
class OrchestratorConfig:
    """Configuration of the orchestrator (the public Generator service)."""

    listen: str  # SPECD_LISTEN
    # SPECD_VERIFIER: the verifier's replicas, comma-separated host:port and dns:///name:port
    # entries (a name is re-resolved periodically, each of its addresses a replica)
    verifier: str
    # SPECD_DRAFTER: the drafter's replicas, as SPECD_VERIFIER ('' = none; only `ar` then);
    # `fr=host:port` entries form the pool of prompts in that language
    drafter: str
    redis_url: str  # REDIS_URL: session store
    tokenizer: str  # SPECD_TOKENIZER: the target's tokenizer (catalog name or folder)
    home: Path  # SPECD_HOME
    default_strategy: str = "sd"  # SPECD_STRATEGY
    # SPECD_K: draft length when a request gives none; 0 = adaptive (orchestrator/adaptive.py)
    default_k: int = 0
    default_max_new_tokens: int = 128  # SPECD_MAX_NEW_TOKENS
    max_new_tokens_limit: int = 4096  # SPECD_MAX_NEW_TOKENS_LIMIT: larger requests are refused
    session_ttl_seconds: int = 86400  # SPECD_SESSION_TTL: idle sessions expire from Redis
    rpc_timeout_seconds: float = 120.0  # SPECD_RPC_TIMEOUT: deadline of every internal call
    grace_seconds: float = 5.0  # SPECD_GRACE_SECONDS
    # SPECD_CASCADE: the cascade's drafters below the target, largest first, comma-separated:
    # host:port of a drafter service (replicas of one level joined by '+', dns:///name:port too),
    # `maxgram` (in-process), or tli:host:port / slem:host:port for a drafter of another
    # vocabulary (it proposes, never reviews). '' = SPECD_DRAFTER, then maxgram.
    cascade: tuple[str, ...] = ()
    # SPECD_K_MATRIX: the cascade's default k-matrix ("4,2;0,3"); '' = the built-in default.
    k_matrix: tuple[tuple[int, ...], ...] = ()
    # SPECD_TREE: staged's default tree, "branching:budget" ("3,2,1,1,1:8"); '' = the built-in default.
    tree: TreeShape | None = None
    health_interval_seconds: float = 1.0  # SPECD_HEALTH_INTERVAL: how often each replica's health is checked
    # SPECD_VERIFIER_WAIT: how long a round waits for a verifier replica to come back before
    # the request fails with UNAVAILABLE (drafters never wait: the round drafts without them)
    verifier_wait_seconds: float = 10.0
    # SPECD_LOAD_FACTOR: a replica holding more than this times its share of the active
    # sessions takes no new ones (bounded-load rendezvous routing, orchestrator/pool.py)
    load_factor: float = 1.25
    redis_timeout_seconds: float = 2.0  # SPECD_REDIS_TIMEOUT: a Redis call slower than this fails as UNAVAILABLE
    turn_lease_seconds: float = 30.0  # SPECD_TURN_LEASE: a turn not advanced for this long may be taken over
    # SPECD_OWN_CORES: drafters and verifiers run on cores of their own (separate machines, a
    # pinned stack). Then the drafter prefills a turn beside its first round (which drafts
    # nothing), and rounds draft under load. On shared cores (the default: `specd up` on one
    # machine) the drafter prefills in the first round that drafts, and no round drafts while
    # the verifier's passes are shared: a drafter's compute is taken from the verifier's cores
    # then (measured unpinned: sd's first token 9.4 s, not 2.2, with the overlap; cascade at
    # 16 sessions 0.09x ar while drafting under load)
    own_cores: bool = False
    # SPECD_VERIFY_AHEAD: a pipelined round sends the verify of its speculative next draft as
    # soon as that draft is done, before its own verify answers (orchestrator/strategies.py)
    verify_ahead: bool = True
    # SPECD_HEAD: the replicas of a drafter service hosting a trained head, pooled by language
    # as SPECD_DRAFTER ('' = none): what the strategy redrafter (or parallel, by the head's
    # kind) drafts with; `fr=` replicas host a head trained for French (`specd train --language`)
    head: str = ""
    metrics_listen: str = ""  # SPECD_METRICS_LISTEN: host:port of the Prometheus endpoint; '' = none
    # REDIS_PASSWORD: Redis' password, when REDIS_URL has none (a Secret, apart from the URL)
    redis_password: str = field(default="", repr=False)

    def pools(self) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]], tuple[tuple[str, tuple[str, ...]], ...]]:
        """The verifier's targets, the drafter's by language ("" = the default pool), and each
        cascade level's (mode, targets)."""
        return parse_targets(self.verifier), labelled_targets(self.drafter), tuple(map(cascade_level, self.cascade))

    def head_pools(self) -> dict[str, tuple[str, ...]]:
        """The trained head's targets by language, as the drafter's ({} = no head)."""
        return labelled_targets(self.head, "SPECD_HEAD")

    @classmethod
    def from_env(cls, env: Mapping[str, str], default_listen: str) -> OrchestratorConfig:
        verifier = _get(env, "SPECD_VERIFIER", "")
        tokenizer = _get(env, "SPECD_TOKENIZER", "")
        missing = [name for name, value in (("SPECD_VERIFIER", verifier), ("SPECD_TOKENIZER", tokenizer)) if not value]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be set for the orchestrator")
        config = cls(
            listen=_get(env, "SPECD_LISTEN", default_listen),
            verifier=verifier,
            drafter=_get(env, "SPECD_DRAFTER", ""),
            redis_url=_get(env, "REDIS_URL", "redis://127.0.0.1:6379/0"),
            tokenizer=tokenizer,
            home=Path(_get(env, "SPECD_HOME", str(default_home()))),
            default_strategy=_get(env, "SPECD_STRATEGY", "sd"),
            default_k=_int(env, "SPECD_K", 0, minimum=0),
            default_max_new_tokens=_int(env, "SPECD_MAX_NEW_TOKENS", 128, minimum=1),
            max_new_tokens_limit=_int(env, "SPECD_MAX_NEW_TOKENS_LIMIT", 4096, minimum=1),
            session_ttl_seconds=_int(env, "SPECD_SESSION_TTL", 86400, minimum=1),
            rpc_timeout_seconds=_float(env, "SPECD_RPC_TIMEOUT", 120.0),
            grace_seconds=_float(env, "SPECD_GRACE_SECONDS", 5.0),
            cascade=tuple(level.strip() for level in _get(env, "SPECD_CASCADE", "").split(",") if level.strip()),
            k_matrix=_k_matrix(env, "SPECD_K_MATRIX"),
            tree=_tree(env, "SPECD_TREE"),
            health_interval_seconds=_float(env, "SPECD_HEALTH_INTERVAL", 1.0),
            verifier_wait_seconds=_float(env, "SPECD_VERIFIER_WAIT", 10.0),
            load_factor=_float(env, "SPECD_LOAD_FACTOR", 1.25),
            redis_timeout_seconds=_float(env, "SPECD_REDIS_TIMEOUT", 2.0),
            turn_lease_seconds=_float(env, "SPECD_TURN_LEASE", 30.0),
            own_cores=_bool(env, "SPECD_OWN_CORES", False),
            verify_ahead=_bool(env, "SPECD_VERIFY_AHEAD", True),
            head=_get(env, "SPECD_HEAD", ""),
            metrics_listen=_listen(env, "SPECD_METRICS_LISTEN"),
            redis_password=_get(env, "REDIS_PASSWORD", ""),
        )
        config.pools()  # every address well formed, or a ConfigError naming the bad one
        config.head_pools()
        if config.load_factor < 1:
            raise ConfigError(f"SPECD_LOAD_FACTOR must be >= 1, got {config.load_factor}")
        return config


@dataclass(frozen=True)
class GatewayConfig:
    """Configuration of the OpenAI-compatible HTTP gateway (gateway/)."""

    listen: str  # SPECD_HTTP_LISTEN: host:port of the HTTP API
    # SPECD_ORCHESTRATOR: the orchestrator's replicas, comma-separated host:port (a stream that
    # breaks is resumed at the next one)
    orchestrator: str
    model_name: str  # SPECD_MODEL_NAME: the model id clients name (`model`), and list at /v1/models
    rpc_timeout_seconds: float = 300.0  # SPECD_RPC_TIMEOUT: the longest a turn may take
    metrics_listen: str = ""  # SPECD_METRICS_LISTEN: host:port of the Prometheus endpoint; '' = none

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewayConfig:
        orchestrator = _get(env, "SPECD_ORCHESTRATOR", "127.0.0.1:50050")
        for address in orchestrator.split(","):
            split_host_port(address.strip(), "SPECD_ORCHESTRATOR")
        return cls(
            listen=_listen(env, "SPECD_HTTP_LISTEN", "127.0.0.1:8000"),
            orchestrator=orchestrator,
            model_name=_get(env, "SPECD_MODEL_NAME", "specd"),
            rpc_timeout_seconds=_float(env, "SPECD_RPC_TIMEOUT", 300.0),
            metrics_listen=_listen(env, "SPECD_METRICS_LISTEN"),
        )
