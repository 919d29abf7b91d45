"""Command-line flags for every service: each environment variable a service reads is also a
flag (`SPECD_MAX_SESSIONS` is `--max-sessions`, `REDIS_URL` is `--redis-url`), and
`python -m verifier_svc --help` lists them with their meaning and default.

Flags do not parse values themselves: a flag given is laid over the environment, and the
service's config is built from that (services/config.py), so a value is checked in one place
and an error names the variable whichever way it came. tests/test_flags.py checks that each
list below names exactly the variables its service reads, with the defaults it applies.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    env: str  # the environment variable
    help: str
    default: str = ""  # as the variable would be written; "" = none

    @property
    def flag(self) -> str:
        return "--" + self.env.removeprefix("SPECD_").lower().replace("_", "-")


# What every process reads, the gateway included
OBSERVED = (
    Setting("SPECD_METRICS_LISTEN", "host:port of the Prometheus /metrics endpoint (none when unset)"),
    Setting("SPECD_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", "INFO"),
)
# What every gRPC service reads
COMMON = (
    Setting("SPECD_LISTEN", "host:port to serve gRPC on"),
    Setting("SPECD_HOME", "where prepared models live", "~/.cache/specd"),
    Setting("SPECD_GRACE_SECONDS", "seconds in-flight calls get on SIGTERM, after health turns NOT_SERVING", "5"),
    *OBSERVED,
)
INTERNAL_TOKEN = (
    Setting("SPECD_INTERNAL_TOKEN_FILE", "a file holding the token orchestrators and model services share"),
    Setting("SPECD_INTERNAL_TOKEN", "the shared token itself (the file wins)"),
)
API_KEYS = (
    Setting("SPECD_API_KEYS_FILE", "API keys, one a line: callers then need one (an open API when unset)"),
    Setting("SPECD_API_KEYS", "API keys, comma-separated (added to the file's)"),
)

MODEL_SERVICE = (
    Setting("SPECD_MODEL", "a catalog name (specd models list), a Hugging Face model folder, or a GGUF file"),
    *COMMON,
    Setting("SPECD_RUNTIME", "llama (llama.cpp, GGUF), torch (transformers), or auto: what is fastest for the role here", "auto"),
    Setting("SPECD_DTYPE", "torch runtime weights: auto (int8 on CPU, bfloat16 on CUDA), int8, float32, bfloat16, float16, float64", "auto"),
    Setting("SPECD_DEVICE", "cpu, cuda, cuda:1, ...", "cpu"),
    Setting("SPECD_THREADS", "threads of a forward pass; 0 = every core", "0"),
    Setting("SPECD_ONEDNN", "torch on CPU fp32: oneDNN linears (1) or MKL (0)", "1"),
    Setting("SPECD_INT8_KERNEL", "torch int8: the GEMM, auto (oneDNN on CPUs with AMX, fbgemm elsewhere), onednn or fbgemm", "auto"),
    Setting("SPECD_HUGE_PAGES", "torch runtime on CPU: back the loaded weights with 2 MB pages (1) or leave the kernel's default (0)", "1"),
    Setting("SPECD_KV_TOKENS", "llama runtime: KV cells all sessions share; 0 = 8192 for a drafter, the model's context for a verifier", "0"),
    Setting("SPECD_KV_RESIDENT", "llama runtime: KV cells other sessions keep while one runs (the rest are parked in host memory)", "0"),
    Setting("SPECD_MAX_SESSIONS", "sessions whose KV cache is kept (least recently used dropped)", "16"),
    Setting("SPECD_PREFIX_CACHE", "contexts whose KV entries new sessions that begin the same way copy (a chat template and system prompt); 0 = off", "4"),
    Setting("SPECD_Q_TOP", "drafters: entries of the truncated proposal distribution q sent when sampling", "32"),
    Setting("SPECD_MAX_DRAFT", "the longest draft, or most tree nodes, one call may carry", "64"),
    Setting("SPECD_MAX_QUEUE", "calls that may wait for the model; more get RESOURCE_EXHAUSTED and a retry hint (0 = no bound)", "64"),
    Setting("SPECD_MAX_BATCH_TOKENS", "tokens one pass may feed for the calls of different sessions batched into it; 0 = one call per pass", "256"),
    Setting("SPECD_BATCH_WAIT_MS", "how long a batched pass may wait for the sessions of the pass before it", "20"),
    Setting("SPECD_PREFILL_CHUNK", "verifier: uncached context tokens a pass shared by several sessions feeds (chunked prefill); 0 = no limit", "64"),
    Setting("SPECD_SECOND_STAGE", "drafters: max-gram tokens fed ahead while growing a tree; 0 = off", "4"),
    Setting("SPECD_DRAFT_MIN_CONFIDENCE", "drafters: stop a draft before a position whose top probability is below this", "0"),
    Setting("SPECD_TARGET_TOKENIZER", "drafters: the target's tokenizer; a drafter of another vocabulary translates to it"),
    *INTERNAL_TOKEN,
)  # fmt: skip

ORCHESTRATOR = (
    Setting("SPECD_VERIFIER", "the verifier's replicas: comma-separated host:port and dns:///name:port"),
    Setting("SPECD_DRAFTER", "the drafter's replicas, as --verifier; fr=host:port entries: a pool for that language"),
    Setting("SPECD_TOKENIZER", "the target's tokenizer: a catalog name or folder"),
    Setting("REDIS_URL", "the session store", "redis://127.0.0.1:6379/0"),
    Setting("REDIS_PASSWORD", "Redis' password, when REDIS_URL carries none"),
    *COMMON,
    Setting("SPECD_STRATEGY", "the strategy of a request that names none", "sd"),
    Setting("SPECD_K", "the draft length of a request that gives none; 0 = adaptive", "0"),
    Setting("SPECD_MAX_NEW_TOKENS", "max new tokens of a request that gives none", "128"),
    Setting("SPECD_MAX_NEW_TOKENS_LIMIT", "the most max new tokens a request may ask", "4096"),
    Setting("SPECD_SESSION_TTL", "seconds an idle session stays in Redis", "86400"),
    Setting("SPECD_RPC_TIMEOUT", "seconds an internal call may take", "120"),
    Setting("SPECD_CASCADE", "the cascade's levels below the target, largest first: host:port, maxgram, tli:host:port, slem:host:port"),
    Setting("SPECD_K_MATRIX", "the cascade's default k-matrix, rows separated by ';' (e.g. 4,2;0,3)"),
    Setting("SPECD_TREE", "staged's default tree, branching:budget (e.g. 3,2,1,1,1:8)"),
    Setting("SPECD_HEALTH_INTERVAL", "seconds between health checks of each replica", "1"),
    Setting("SPECD_VERIFIER_WAIT", "seconds a round waits for a verifier replica before UNAVAILABLE", "10"),
    Setting("SPECD_LOAD_FACTOR", "a replica above this times its share of active sessions takes no new ones", "1.25"),
    Setting("SPECD_REDIS_TIMEOUT", "seconds a Redis call may take before UNAVAILABLE", "2"),
    Setting("SPECD_TURN_LEASE", "seconds after which a turn that stopped advancing may be taken over", "30"),
    Setting(
        "SPECD_HEAD",
        "replicas of a drafter service hosting a trained head (strategies redrafter, parallel), as SPECD_VERIFIER; "
        "fr=host:port entries: the head for that language's prompts",
    ),
    Setting("SPECD_OWN_CORES", "1: drafters and verifiers run on cores of their own (separate machines, pinned): the first round's prefills overlap, and rounds draft under load", "0"),
    Setting("SPECD_VERIFY_AHEAD", "pipelined strategies (sd-pipe): send the verify of the speculative next draft as soon as it is drafted (1) or after the round's answer (0)", "1"),
    *API_KEYS,
    *INTERNAL_TOKEN,
)  # fmt: skip

GATEWAY = (
    Setting("SPECD_HTTP_LISTEN", "host:port of the OpenAI-compatible HTTP API", "127.0.0.1:8000"),
    Setting("SPECD_ORCHESTRATOR", "the orchestrator replicas, comma-separated host:port", "127.0.0.1:50050"),
    Setting("SPECD_MODEL_NAME", "the model id clients name and /v1/models lists", "specd"),
    Setting("SPECD_RPC_TIMEOUT", "seconds a turn may take", "300"),
    *OBSERVED,
    *API_KEYS,
)  # fmt: skip


def environment(
    prog: str, description: str, settings: Sequence[Setting], argv: Sequence[str], env: Mapping[str, str]
) -> dict[str, str]:
    """The environment with the flags in `argv` laid over it (`--help` prints them and exits)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Every flag is also read from its environment variable (shown in brackets); a flag given wins.",
    )
    for s in settings:
        default = f"; default {s.default}" if s.default else ""
        parser.add_argument(s.flag, dest=s.env, metavar="VALUE", help=f"{s.help} [${s.env}{default}]")
    given = {name: value for name, value in vars(parser.parse_args(list(argv))).items() if value is not None}
    return {**env, **given}
