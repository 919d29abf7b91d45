"""`specd bench --concurrency 1,4,16,32`: the stack under many sessions at once.

At each concurrency level c, c streams send turns one after another (specd/load.py: the
client users run, timed as they see it) until each has answered `turns` prompts; every
strategy runs at every level, the strategies interleaved within a level so that a noisy
machine slows them alike. Per strategy and level: aggregate tokens per second (all streams'
tokens over the level's wall time), inter-token latency p50 / p99, time to first token
p50 / p99, failed requests. A session's verify calls share passes with the other sessions'
(services/calls.py), which is where the aggregate comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from specd.bench.report import _f, _pct
from specd.bench.runner import parse_system
from specd.load import run_load


@dataclass(frozen=True)
class Level:
    strategy: str
    concurrency: int
    requests: int
    errors: int
    tokens: int
    seconds: float
    tokens_per_second: float
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tau: float | None  # tokens per target pass
    ar_round_share: float | None  # rounds that drafted nothing (adaptive found no draft worth it)
    drafted_per_round: float | None


def sweep(
    address: str,
    systems: Sequence[str],
    levels: Sequence[int],
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    turns: int = 2,
    k: int = 0,
    timeout: float = 1800.0,
    on_level: Callable[[Level], None] | None = None,
) -> list[Level]:
    """Every system (a strategy, STRATEGY:kN for a fixed draft length, others get k, 0 =
    adaptive; STRATEGY:head a trained head alone) at every level (see the module's doc);
    on_level after each measurement."""
    measured: list[Level] = []
    for concurrency in levels:
        for system in systems:
            strategy, fixed, head_only = parse_system(system)
            report = run_load(
                address, streams=concurrency, requests=concurrency * turns, duration=float("inf"),
                max_new_tokens=max_new_tokens, strategy=strategy, timeout=timeout, prompts=prompts, k=fixed or k,
                head_only=head_only,
            )  # fmt: skip
            s = report.summary()
            level = Level(
                strategy=system, concurrency=concurrency, requests=s["requests"], errors=s["errors"],
                tokens=s["tokens"], seconds=s["seconds"], tokens_per_second=s["tokens_per_second"],
                itl_p50_ms=s["itl_p50_ms"], itl_p99_ms=s["itl_p99_ms"], ttft_p50_ms=s["ttft_p50_ms"],
                ttft_p99_ms=s["ttft_p99_ms"], tau=s["tau"], ar_round_share=s["ar_round_share"],
                drafted_per_round=s["drafted_per_round"],
            )  # fmt: skip
            measured.append(level)
            if on_level is not None:
                on_level(level)
    return measured


def render(levels: Sequence[Level], header: Sequence[str] = ()) -> str:
    """The results as markdown: one row per strategy and level, with the aggregate's ratio to
    the same strategy at concurrency 1 and to `ar` at the same concurrency."""

    alone = {lv.strategy: lv.tokens_per_second for lv in levels if lv.concurrency == min(x.concurrency for x in levels)}
    ar = {lv.concurrency: lv.tokens_per_second for lv in levels if lv.strategy == "ar"}
    lines = [
        *header,
        "",
        "| strategy | sessions | tok/s (all) | x one session | x ar | ITL p50 ms | ITL p99 ms | TTFT p50 ms | TTFT p99 ms | τ | drafted / round | rounds with no draft | requests | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in sorted(levels, key=lambda x: (x.concurrency, x.strategy != "ar", x.strategy)):
        vs_alone = lv.tokens_per_second / alone[lv.strategy] if alone.get(lv.strategy) else None
        vs_ar = lv.tokens_per_second / ar[lv.concurrency] if ar.get(lv.concurrency) else None
        cells = [
            lv.strategy, lv.concurrency, _f(lv.tokens_per_second, 1), _f(vs_alone), _f(vs_ar),
            *(_f(v, 0) for v in (lv.itl_p50_ms, lv.itl_p99_ms, lv.ttft_p50_ms, lv.ttft_p99_ms)),
            _f(lv.tau), _f(lv.drafted_per_round), _pct(lv.ar_round_share), lv.requests, lv.errors,
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def as_json(levels: Sequence[Level]) -> list[dict]:
    return [asdict(lv) for lv in levels]


def plot(levels: Sequence[Level], out: Path) -> Path:
    """concurrency.png: aggregate tokens/s (left) and p50 / p99 inter-token latency (right)
    against concurrency, a line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy in dict.fromkeys(lv.strategy for lv in levels):
        mine = sorted((lv for lv in levels if lv.strategy == strategy), key=lambda lv: lv.concurrency)
        xs = [lv.concurrency for lv in mine]
        (line,) = left.plot(xs, [lv.tokens_per_second for lv in mine], marker="o", label=strategy)
        right.plot(xs, [lv.itl_p50_ms or 0 for lv in mine], marker="o", color=line.get_color(), label=f"{strategy} p50")
        right.plot(xs, [lv.itl_p99_ms or 0 for lv in mine], marker="x", linestyle="--", color=line.get_color(),
                   label=f"{strategy} p99")  # fmt: skip
    for ax, title, ylabel in ((left, "aggregate throughput", "tokens/s, all sessions"),
                              (right, "inter-token latency", "ms")):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "concurrency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
