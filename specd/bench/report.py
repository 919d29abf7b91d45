"""The bench's outputs: Markdown tables (stdout), results.json (every raw figure), PNG plots.

Plots use matplotlib's object API on an Agg canvas (no pyplot), so making them changes no
global backend and needs no display.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from specd.bench.metrics import (
    ALL,
    REFERENCE,
    SERVICES,
    Check,
    LanguageRow,
    Overhead,
    RunError,
    RunRecord,
    Summary,
    by_language,
)

SCHEMA = 1  # bumped when a field of results.json changes meaning
PARTS = ("draft", "verify", "network", "redis", "other")  # the time split of a round, in this order


@dataclass(frozen=True)
class Machine:
    """What the figures were measured on: they mean little without it."""

    cpu: str
    logical_cpus: int
    torch_threads: int
    memory_gib: float
    torch: str
    transformers: str
    python: str
    platform: str
    load_average: tuple[float, float, float]  # at the start: other work on the machine skews every figure


@dataclass(frozen=True)
class Models:
    """Which models and deployment the figures are of."""

    target: str  # as given: catalog name or folder
    target_dir: str
    drafter: str
    drafter_dir: str  # "" for none
    target_runtime: str  # the verifier's runtime and weights, e.g. "torch (int8)"
    drafter_runtime: str
    services: str  # orchestrator address
    stack: str  # "started by the bench" or "given with --address"


def describe_machine() -> Machine:
    import torch
    import transformers

    return Machine(
        cpu=_cpu_model(),
        logical_cpus=os.cpu_count() or 0,
        torch_threads=torch.get_num_threads(),
        memory_gib=round(_memory_bytes() / 2**30, 1),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        load_average=tuple(round(x, 2) for x in os.getloadavg()),
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


# -- Markdown ----------------------------------------------------------------------------------


def _f(value: float | int | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _flags(s: Summary) -> str:
    parts = []
    if s.divergences:
        parts.append(f"**{s.divergences} DIVERGED**")
    if s.unverified:
        parts.append(f"{s.unverified} unverified")
    if s.near_ties:
        parts.append(f"{s.near_ties} near-tie")
    return ", ".join(parts)


def _ordered(summaries: Sequence[Summary]) -> list[Summary]:
    """Category by category (ALL last), systems in run order within each."""
    categories = list(dict.fromkeys(s.category for s in summaries if s.category != ALL)) + [ALL]
    systems = list(dict.fromkeys(s.system for s in summaries))
    return sorted(summaries, key=lambda s: (categories.index(s.category), systems.index(s.system)))


def summary_table(summaries: Sequence[Summary]) -> str:
    """The main table: speed, acceptance, where a round's time goes, bytes, lossless flags."""
    head = (
        "| category | system | prompts | tokens | wall s | tok/s | speedup | τ | accept | k | ready | fwd/token "
        "| draft ms | verify ms | net ms | redis ms | other ms | B sent/round | B recv/round | flags |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in _ordered(summaries):
        speedup = _f(s.speedup, 2, "x") if s.system != REFERENCE else "1.00x"
        accept = "–" if s.acceptance_rate is None else f"{s.acceptance_rate:.0%}"
        lines.append(
            f"| {s.category} | {s.system} | {s.prompts} | {s.new_tokens} | {_f(s.wall_seconds, 1)} "
            f"| {_f(s.tokens_per_second)} | {speedup} | {_f(s.mean_accepted_length)} | {accept} "
            f"| {_f(s.draft_length, 1)} | {_pct(s.ready_fraction)} | {_f(s.forwards_per_token)} | {_f(s.draft_ms_per_round, 1)} | {_f(s.verify_ms_per_round, 1)} "
            f"| {_f(s.network_ms_per_round, 1)} | {_f(s.redis_ms_per_round, 1)} | {_f(s.other_ms_per_round, 1)} "
            f"| {_f(s.bytes_sent_per_round, 0)} | {_f(s.bytes_received_per_round, 0)} | {_flags(s)} |"
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def network_share(s: Summary, rtt_ms: float) -> float | None:
    """The share of a system's wall time its rounds waited on the network's round trip: the
    calls each round sent and then waited for, times the round trip, over the wall time.
    Counted, not timed, so a machine's swings in compute speed do not reach it (a difference
    of tokens/s at two round trips measured minutes apart is mostly those swings)."""
    if s.round_trips_per_round is None or s.rounds is None or not s.wall_seconds:
        return None
    return s.round_trips_per_round * s.rounds * rtt_ms / 1000 / s.wall_seconds


def rtt_table(summaries: Sequence[Summary], rtts_ms: Sequence[float]) -> str:
    """Speed against the network's round trip (all categories): tokens/s of each strategy at
    each RTT and its change from 0 ms, the round trips a round waits for and the share of
    wall time they take at that RTT (network_share), pipelined `sd` against `sd` at the same
    RTT (speed, and network share), and how often a pipelined draft was ready."""
    if len(rtts_ms) < 2:
        return ""
    by_name = {s.system: s for s in summaries if s.category == ALL and s.path == SERVICES}
    bases = [name for name in by_name if "@rtt" not in name]
    head = "| system | " + " | ".join(f"{r:g} ms" for r in rtts_ms) + " |"
    lines = [head, "|" + "---|" * (len(rtts_ms) + 1)]

    def at(base: str, rtt: float) -> Summary | None:
        return by_name.get(base if not rtt else f"{base}@rtt{rtt:g}ms")

    for base in bases:
        cells = []
        zero = at(base, 0.0)
        for rtt in rtts_ms:
            s = at(base, rtt)
            if s is None:
                cells.append("–")
                continue
            cell = f"{s.tokens_per_second:.2f} tok/s"
            if zero and zero.tokens_per_second and rtt:
                cell += f" ({s.tokens_per_second / zero.tokens_per_second - 1:+.0%})"
            if s.round_trips_per_round is not None:
                cell += f", {s.round_trips_per_round:.2f} round trips a round"
                share = network_share(s, rtt)
                if rtt and share is not None:
                    cell += f" = network {share:.1%}"
            if s.ready_fraction is not None:
                cell += f", ready {s.ready_fraction:.0%}"
            if s.ahead_fraction:
                cell += f", verified ahead {s.ahead_fraction:.0%}"
            if s.continued_fraction:
                cell += f", drafted going on {s.continued_fraction:.0%}"
            cells.append(cell)
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    for fast, slow in (("sd-pipe", "sd"),):
        ratios, shares = [], []
        for rtt in rtts_ms:
            a, b = at(fast, rtt), at(slow, rtt)
            ratios.append(f"{a.tokens_per_second / b.tokens_per_second:.2f}x" if a and b and b.tokens_per_second else "–")
            ours, theirs = (network_share(x, rtt) if x and rtt else None for x in (a, b))
            shares.append(f"{ours / theirs:.2f}x" if ours is not None and theirs else "–")
        if any(r != "–" for r in ratios):
            lines.append(f"| {fast} / {slow} | " + " | ".join(ratios) + " |")
        if any(r != "–" for r in shares):
            lines.append(f"| {fast} / {slow}: network share | " + " | ".join(shares) + " |")
    return "\n".join(lines)


def acceptance_table(summaries: Sequence[Summary]) -> str:
    """Acceptance rate per draft position, for the systems that drafted."""
    rows = [s for s in _ordered(summaries) if s.acceptance_by_position]
    if not rows:
        return ""
    width = max(len(s.acceptance_by_position) for s in rows)
    head = "| category | system | " + " | ".join(f"pos {i + 1}" for i in range(width)) + " |"
    lines = [head, "|" + "---|" * (width + 2)]
    for s in rows:
        cells = [f"{r:.0%}" for r in s.acceptance_by_position] + ["–"] * (width - len(s.acceptance_by_position))
        lines.append(f"| {s.category} | {s.system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def language_table(rows: Sequence[LanguageRow]) -> str:
    """Acceptance per language and drafter pool (a stack whose drafters are pooled by language)."""
    if not rows:
        return ""
    lines = ["| system | language | drafter pool | prompts | drafted | accept | τ |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.system} | {row.language} | {row.drafter_pool or 'default'} | {row.prompts} | {row.drafted} "
            f"| {_pct(row.acceptance_rate)} | {_f(row.mean_accepted_length)} |"
        )
    return "\n".join(lines)


def overhead_table(overheads: Sequence[Overhead]) -> str:
    if not overheads:
        return ""
    lines = [
        "| strategy | category | prompts | services tok/s | in-process tok/s | distributed overhead |",
        "|---|---|---|---|---|---|",
    ]
    for o in overheads:
        lines.append(
            f"| {o.strategy} | {o.category} | {o.prompts} | {_f(o.services_tokens_per_second)} "
            f"| {_f(o.in_process_tokens_per_second)} | {_f(o.overhead_percent, 1, '%')} |"
        )
    return "\n".join(lines)


def flagged_lines(checks: Sequence[Check]) -> list[str]:
    return [
        f"- {c.prompt_id} / {c.system}: {c.status} at new token {c.position}"
        + ("" if c.gap is None else f" (target top-2 logit gap {c.gap:.2e})")
        for c in checks
        if c.flagged
    ]


def render_markdown(
    summaries: Sequence[Summary],
    overheads: Sequence[Overhead],
    checks: Sequence[Check],
    *,
    records: Sequence[RunRecord] = (),
    header: Sequence[str],
    greedy: bool,
    skipped: dict[str, str],
    errors: Sequence[RunError],
    rtts_ms: Sequence[float] = (),
) -> str:
    """The whole report a person reads: header, tables, and every flag explained."""
    out = [*header, "", summary_table(summaries)]
    rtt = rtt_table(summaries, rtts_ms)
    if rtt:
        out += ["", "Against the network's round trip (delay proxies in front of each model service):", "", rtt]
    acceptance = acceptance_table(summaries)
    if acceptance:
        out += ["", "Acceptance rate by draft position:", "", acceptance]
    languages = language_table(by_language(records))
    if languages:
        out += ["", "Acceptance by the session's language and the drafter pool it drafted on:", "", languages]
    overhead = overhead_table(overheads)
    if overhead:
        out += [
            "",
            "Distributed overhead (same strategy through gRPC + Redis vs in-process, same prompts):",
            "",
            overhead,
        ]
    if greedy:
        flagged = flagged_lines(checks)
        verdict = f"{len(flagged)} flagged" if flagged else "every output equals ar's"
        out += ["", f"Greedy lossless check against ar ({len(checks)} outputs): {verdict}.", *flagged]
    out += [f"- skipped {system}: {why}" for system, why in skipped.items()]
    out += [f"- error: {e.system} on {e.prompt_id}: {e.error}" for e in errors]
    return "\n".join(out)


# -- results.json ------------------------------------------------------------------------------


def results_document(
    *,
    command: Sequence[str],
    config: object,
    machine: Machine,
    models: Models,
    prompts: Sequence[object],
    records: Sequence[RunRecord],
    checks: Sequence[Check],
    summaries: Sequence[Summary],
    overheads: Sequence[Overhead],
    errors: Sequence[RunError],
    skipped: dict[str, str],
) -> dict:
    """Every raw figure, and what is needed to reproduce and interpret them."""
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": list(command),
        "config": asdict(config),
        "machine": asdict(machine),
        "models": asdict(models),
        "prompts": [asdict(p) for p in prompts],
        "summaries": [asdict(s) for s in summaries],
        "by_language": [asdict(row) for row in by_language(records)],
        "overheads": [asdict(o) for o in overheads],
        "checks": [asdict(c) for c in checks],
        "records": [asdict(r) for r in records],
        "errors": [asdict(e) for e in errors],
        "skipped": dict(skipped),
    }


def write_json(document: dict, path: Path) -> None:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)


# -- plots -------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_speedup(summaries: Sequence[Summary], path: Path) -> None:
    """Grouped bars: speedup over ar, per category (and all), one bar per system."""
    rows = [s for s in summaries if s.system != REFERENCE and s.speedup is not None]
    categories = list(dict.fromkeys(s.category for s in _ordered(rows)))
    systems = list(dict.fromkeys(s.system for s in rows))
    figure = _figure(max(6.0, 1.4 * len(categories) * max(1, len(systems)) / 2 + 2), 4.2)
    ax = figure.add_subplot()
    width = 0.8 / max(1, len(systems))
    for j, system in enumerate(systems):
        values = {s.category: s.speedup for s in rows if s.system == system}
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(categories))]
        bars = ax.bar(xs, [values.get(c, 0.0) for c in categories], width, label=system)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel("speedup over ar (tokens/s ratio)")
    ax.set_title("Speedup by category and system")
    ax.margins(y=0.12)  # room for the value labels
    figure.legend(fontsize=8, loc="outside lower center", ncols=min(6, max(1, len(systems))), frameon=False)
    figure.savefig(path)


def plot_acceptance(summaries: Sequence[Summary], path: Path) -> None:
    """Acceptance rate by draft position: one line per (drafting strategy, category)."""
    rows = [s for s in _ordered(summaries) if s.acceptance_by_position and s.path == SERVICES]
    figure = _figure(6.4, 4.2)
    ax = figure.add_subplot()
    for s in rows:
        positions = range(1, len(s.acceptance_by_position) + 1)
        style = {"linewidth": 2.4, "color": "black"} if s.category == ALL else {"linewidth": 1.2, "alpha": 0.85}
        ax.plot(positions, s.acceptance_by_position, marker="o", label=f"{s.system} · {s.category}", **style)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance rate by draft position")
    if rows:
        ax.legend(fontsize=8)
        ax.set_xticks(range(1, max(len(s.acceptance_by_position) for s in rows) + 1))
    figure.savefig(path)


def plot_time_per_round(summaries: Sequence[Summary], path: Path) -> None:
    """Stacked bars: where the time of one round goes, per system, over all prompts."""
    rows = [s for s in summaries if s.category == ALL and s.rounds]
    figure = _figure(6.4, 1.6 + 0.55 * max(1, len(rows)))
    ax = figure.add_subplot()
    left = [0.0] * len(rows)
    for part in PARTS:
        values = [max(0.0, getattr(s, f"{part}_ms_per_round") or 0.0) for s in rows]
        ax.barh([s.system for s in rows], values, left=left, label=part)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per round (one target forward)")
    ax.set_title("Time per round, all prompts")
    figure.legend(fontsize=8, loc="outside lower center", ncols=len(PARTS), frameon=False)
    figure.savefig(path)


def write_plots(summaries: Sequence[Summary], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "speedup.png", out / "acceptance_by_position.png", out / "time_per_round.png"]
    for plot, path in zip((plot_speedup, plot_acceptance, plot_time_per_round), paths):
        plot(summaries, path)
    return paths
