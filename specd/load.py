"""`specd load`: concurrent streams against a running stack, timed as a user sees them.

Each of `streams` workers sends turns one after another (through the resuming client,
specd/client.py) until `requests` turns have run or `duration` seconds have passed. It
prints time to first token and inter-token latency (p50 / p99), tokens per second over the
run, the failed requests (there should be none, whatever replica dies meanwhile), and each
local process's resident memory before and after.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.pb import specd_pb2 as pb
from specd import client

PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a function that returns the n-th Fibonacci number iteratively.",
    "Explain in two sentences what a hash map is.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a function that merges two sorted lists into one sorted list.",
    "Give three tips for writing readable code.",
    "Write a function that counts the words in a text file.",
    "Write a binary search over a sorted list of integers.",
)


@dataclass
class LoadReport:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    resumes: int = 0
    failovers: int = 0
    tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0  # summed over the turns' GenerationStats
    ar_rounds: int = 0
    drafted: int = 0
    ttft: list[float] = field(default_factory=list)  # seconds to the first token, per request
    itl: list[float] = field(default_factory=list)  # seconds per token after the first, per token
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {
            "requests": self.requests, "errors": len(self.errors), "resumes": self.resumes, "failovers": self.failovers,
            "tokens": self.tokens, "seconds": self.seconds,
            "tokens_per_second": self.tokens / self.seconds if self.seconds else 0.0,
            "tau": self.tokens / self.target_forwards if self.target_forwards else None,
            "ar_round_share": self.ar_rounds / self.target_forwards if self.target_forwards else None,
            "drafted_per_round": self.drafted / self.target_forwards if self.target_forwards else None,
            "ttft_p50_ms": _ms(pct(self.ttft, 0.5)), "ttft_p99_ms": _ms(pct(self.ttft, 0.99)),
            "itl_p50_ms": _ms(pct(self.itl, 0.5)), "itl_p99_ms": _ms(pct(self.itl, 0.99)),
            "itl_mean_ms": _ms(statistics.fmean(self.itl)) if self.itl else None,
            "rss_before_mb": {k: v / 1e6 for k, v in self.rss_before.items()},
            "rss_after_mb": {k: v / 1e6 for k, v in self.rss_after.items()},
            "error_messages": self.errors[:10],
        }  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _rss(home: Path | None) -> dict[str, int]:
    if home is None:
        return {}
    from specd.stack import status

    return {p.name: p.rss_bytes for p in status(home) if p.alive}


def run_load(
    address: str,
    *,
    streams: int = 32,
    requests: int = 64,
    duration: float = 180.0,
    max_new_tokens: int = 64,
    strategy: str = "",
    home: Path | None = None,
    progress=None,
    timeout: float = 600.0,
    prompts: Sequence[str] = PROMPTS,
    k: int = 0,
    head_only: bool = False,
) -> LoadReport:
    """Runs the load (see the module's doc) and returns what it measured. Request i asks
    prompts[i % len(prompts)] as one user message; k: the draft length (0: adaptive);
    head_only: a trained head's strategy drafts with the head alone (StrategyOptions)."""
    report = LoadReport(rss_before=_rss(home))
    lock = threading.Lock()
    issued = 0
    started = time.monotonic()
    deadline = started + duration

    def next_index() -> int | None:
        nonlocal issued
        with lock:
            if issued >= requests or time.monotonic() >= deadline:
                return None
            issued += 1
            return issued - 1

    def one(i: int) -> None:
        request = pb.GenerateRequest(strategy=strategy, max_new_tokens=max_new_tokens)
        if k:
            request.options.k = k
        request.options.head_only = head_only
        request.chat.messages.append(pb.ChatMessage(role="user", content=prompts[i % len(prompts)]))
        sent = time.monotonic()
        arrivals: list[tuple[float, int]] = []
        try:
            result = client.generate(
                address, request, timeout=timeout,
                on_delta=lambda d: arrivals.append((time.monotonic(), len(d.token_ids))),
            )  # fmt: skip
        except (grpc.RpcError, RuntimeError) as err:
            message = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
            with lock:
                report.requests += 1
                report.errors.append(message)
            return
        timed = [(t, n) for t, n in arrivals if n]
        with lock:
            report.requests += 1
            report.resumes += result.resumes
            report.failovers += result.stats.failovers
            report.tokens += len(result.token_ids)
            report.target_forwards += result.stats.target_forwards
            report.ar_rounds += result.stats.ar_rounds
            report.drafted += result.stats.drafted
            if timed:
                report.ttft.append(timed[0][0] - sent)
                for (before, _), (at, n) in zip(timed, timed[1:]):
                    report.itl.extend([(at - before) / n] * n)
            if progress is not None:
                progress(report)

    def worker() -> None:
        while (i := next_index()) is not None:
            one(i)

    with ThreadPoolExecutor(streams) as pool:
        for future in [pool.submit(worker) for _ in range(streams)]:
            future.result()
    report.seconds = time.monotonic() - started
    report.rss_after = _rss(home)
    return report


def format_report(summary: dict) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    lines = [
        f"requests {summary['requests']}, errors {summary['errors']}, resumed streams {summary['resumes']}, "
        f"failovers {summary['failovers']}",
        f"tokens {summary['tokens']} in {summary['seconds']:.1f}s = {summary['tokens_per_second']:.2f} tok/s",
        f"time to first token  p50 {ms(summary['ttft_p50_ms'])}  p99 {ms(summary['ttft_p99_ms'])}",
        f"inter-token latency  p50 {ms(summary['itl_p50_ms'])}  p99 {ms(summary['itl_p99_ms'])}",
    ]
    for name in summary["rss_before_mb"] | summary["rss_after_mb"]:
        before, after = summary["rss_before_mb"].get(name), summary["rss_after_mb"].get(name)
        lines.append(f"  {name:<14} RSS {before or 0:>7.0f} MB -> {after or 0:>7.0f} MB")
    lines += [f"  error: {m}" for m in summary["error_messages"]]
    return "\n".join(lines)
