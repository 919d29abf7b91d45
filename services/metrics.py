"""Prometheus metrics: what every process exports, served on a port of its own.

Each service serves prometheus_client's default registry on SPECD_METRICS_LISTEN (host:port;
unset = no metrics endpoint), apart from its API port, so a scraper never shares the
API's queue and the endpoint can stay inside the cluster. One process is one service, so the
metrics are module-level objects in the module that records them (this one for what model
services share, orchestrator/metrics.py for the Generator, gateway/app.py for HTTP).
Names carry the `specd:` prefix; the README's "Metrics" lists them with their meaning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.config import split_host_port

log = logging.getLogger(__name__)

# Seconds, from a sub-millisecond RPC to a multi-second prefill of a long prompt.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

RPC_SECONDS = Histogram(
    "specd:rpc_duration_seconds",
    "Time a model service spent answering one call, by method and gRPC status code",
    ["method", "code"],
    buckets=RPC_BUCKETS,
)


FORWARD_TOKENS = Histogram(
    "specd:forward_tokens",
    "Tokens fed to one model pass (what the KV cache did not hold: a round's draft, or a prompt)",
    buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
BATCH_CALLS = Histogram(
    "specd:batch_calls",
    "Sessions' calls served by one batched model pass (verify and ar calls of a verifier)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
DRAFTER_CONTINUATIONS = Counter(
    "specd:drafter_continuations",
    "Drafts a drafter went on with after answering a Propose (continue_k), by outcome: started; used (a call "
    "answered from one); extended (the call asked for more than it had); cancelled (another call came)",
    ["outcome"],
)
KV_LOOKUPS = Counter(
    "specd:kv_cache_lookups",
    "Model passes by whether the session's KV cache held a prefix of the sequence (hit) or not (miss)",
    ["result"],
)
KV_REUSED_TOKENS = Counter("specd:kv_cache_reused_tokens", "Tokens a pass found in the KV cache instead of computing")
PREFIX_HITS = Counter(
    "specd:prefix_cache_hits", "New sessions that copied the KV entries of a kept context beginning like theirs"
)
PREFIX_TOKENS = Counter(
    "specd:prefix_cache_tokens", "Tokens new sessions copied from kept contexts instead of prefilling (services/prefixes.py)"
)


def observe_pass(reused: int, fed: int) -> None:
    """One model pass of a runtime: `reused` tokens came from the KV cache, `fed` were computed."""
    FORWARD_TOKENS.observe(fed)
    KV_LOOKUPS.labels("hit" if reused else "miss").inc()
    KV_REUSED_TOKENS.inc(reused)


def observe_prefix(tokens: int) -> None:
    """A new session copied `tokens` positions of a kept context (services/prefixes.py)."""
    PREFIX_HITS.inc()
    PREFIX_TOKENS.inc(tokens)


def serve_metrics(listen: str, what: str) -> str:
    """Serves the default registry at http://listen/metrics (host:port) in a thread; returns
    the URL. Raises ConfigError for a malformed address, OSError when the port is taken."""
    host, port = split_host_port(listen, "SPECD_METRICS_LISTEN")
    server, _ = start_http_server(port, addr=host)
    url = f"http://{host}:{server.server_port}/metrics"
    log.info("%s metrics at %s", what, url)
    return url


class ModelServiceCollector(Collector):
    """A drafter's or verifier's session counts, read when scraped (`core.contexts`: what
    `specd status` shows), and the process's resident memory."""

    def __init__(self, role: str, contexts, rss: Callable[[], int], queued: Callable[[], int] = lambda: 0) -> None:
        self.role = role
        self.contexts = contexts
        self.rss = rss
        self.queued = queued

    def collect(self) -> Iterator:
        counts = self.contexts.counts
        labels = ["role"]
        for name, doc, value in (
            ("specd:context_calls", "Calls that named a session's context", counts.calls),
            ("specd:context_hits", "Calls whose context delta matched the prefix held (session affinity)", counts.hits),
            ("specd:context_misses", "Calls whose delta missed: a whole-context resend follows, or a verify sent ahead is dropped", counts.misses),
            ("specd:context_full", "Calls that sent a whole context (a session's first call here, or a resend)", counts.full),
            ("specd:session_evictions", "Sessions dropped because more than SPECD_MAX_SESSIONS were held", counts.evictions),
        ):
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([self.role], value)
            yield family
        sessions = GaugeMetricFamily("specd:sessions", "Sessions whose context this service holds", labels=labels)
        sessions.add_metric([self.role], len(self.contexts))
        yield sessions
        rss = GaugeMetricFamily("specd:resident_memory_bytes", "Resident memory of the process", labels=labels)
        rss.add_metric([self.role], self.rss())
        yield rss
        queued = GaugeMetricFamily(
            "specd:queued_calls", "Calls waiting for the model or running (SPECD_MAX_QUEUE bounds it)", labels=labels
        )
        queued.add_metric([self.role], self.queued())
        yield queued


def register_model_service(role: str, contexts, rss: Callable[[], int], queued: Callable[[], int]) -> None:
    REGISTRY.register(ModelServiceCollector(role, contexts, rss, queued))

