"""Pure bench arithmetic: per-prompt records -> per-category figures, and the lossless check.

Definitions (docs/architecture.md, Statistics), summed over prompts before dividing, so a long answer
weighs more than a short one, as it does on the machine:

    tokens/s            = Σ new tokens / Σ wall seconds
    speedup             = (tokens/s of the system) / (tokens/s of `ar`), on the prompts both ran
                          (in greedy mode both produced the same tokens, so this is wall(ar) / wall(system))
    τ                   = 1 + Σ accepted / Σ target forwards
    acceptance rate     = Σ accepted / Σ drafted
    forwards per token  = Σ target forwards / Σ new tokens
    time per round      = Σ seconds of each part / Σ rounds (a round = one target forward)
    overhead            = (s/token through the services − s/token in-process) / s/token through the services

A worked example of speedup: ar makes 100 tokens in 40 s (2.5 tok/s), sd the same 100
tokens in 25 s (4 tok/s): speedup 1.6. The services report acceptance per draft position as
rates, not counts, so rates are pooled over prompts weighted by each prompt's drafted
tokens per position (exact where every round drafted k tokens; in-process records carry
exact counts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NEAR_TIE = 1e-3  # top-2 logit gap below which fp32 reorderings may flip the argmax; per runtime: services.runtime.near_tie
ALL = "all"  # the category that pools every prompt
REFERENCE = "ar"  # the system every speedup and every greedy check is measured against
SERVICES, IN_PROCESS, PEER = "services", "in-process", "peer"


@dataclass(frozen=True)
class RunRecord:
    """One prompt through one system; None where a system cannot measure a figure."""

    prompt_id: str
    category: str
    system: str  # "sd" (services), "sd@local" (in-process), "hf-generate", "hf-assisted"
    path: str  # SERVICES, IN_PROCESS or PEER
    strategy: str  # the specd strategy, or the peer's name
    prompt_tokens: int
    new_tokens: int
    wall_seconds: float  # as the bench saw it, from request to last token
    token_ids: tuple[int, ...]
    finish_reason: str = ""
    engine_wall_seconds: float | None = None  # as the engine measured it (services and in-process)
    target_forwards: int | None = None
    drafted: int = 0
    accepted: int = 0
    acceptance_by_position: tuple[float, ...] = ()
    drafted_by_position: tuple[int, ...] | None = None  # exact counts, where known (in-process)
    draft_seconds: float | None = None
    verify_seconds: float | None = None
    network_seconds: float | None = None
    round_trips: int | None = None  # model-service calls the rounds sent and then waited for
    redis_seconds: float | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    rtt_ms: float = 0.0  # the round trip the bench's proxies added to every model service call
    draft_asked: int | None = None  # draft tokens asked for over the turn's rounds (adaptive: chosen)
    speculative_drafts: int = 0  # pipelined: next-round drafts begun during a verify
    speculative_ready: int = 0  # of those, used and done before the verify answered
    speculative_verified: int = 0  # of those, used with their verify sent ahead
    speculative_plain: int = 0  # rounds whose speculation failed, answered by the plain step sent ahead
    speculative_continued: int = 0  # drafts used that the drafter drafted going on after its last answer
    overlapped_round_trips: int = 0  # verifies' round trips that drafting overlapped (not in round_trips)
    language: str = ""  # the session's language, where the drafters are pooled by language
    drafter_pool: str = ""  # the pool it drafted on ("" = the default pool)


@dataclass(frozen=True)
class Check:
    """Greedy mode: does this record's output equal `ar`'s for the same prompt?

    status: "match"; "near-tie" (parted where the target's top-2 logit gap < NEAR_TIE:
    allowed, flagged); "diverged" (parted elsewhere: a lossless bug); "unverified" (parted,
    and no in-process target to measure the gap).
    """

    prompt_id: str
    system: str
    status: str
    position: int | None = None  # index of the first differing new token
    gap: float | None = None  # top-2 logit gap of the target there

    @property
    def flagged(self) -> bool:
        return self.status != "match"


@dataclass(frozen=True)
class RunError:
    """A run that failed mid-bench: recorded, and the bench goes on with the next one."""

    prompt_id: str
    system: str
    error: str


@dataclass(frozen=True)
class Summary:
    """One system on one category (or ALL)."""

    system: str
    path: str
    strategy: str
    category: str
    prompts: int
    new_tokens: int
    wall_seconds: float
    tokens_per_second: float
    speedup: float | None  # over `ar` on the same prompts; None without them
    mean_accepted_length: float | None  # τ; None where target forwards are unknown (peers)
    acceptance_rate: float | None  # None where nothing was drafted
    acceptance_by_position: tuple[float, ...]
    forwards_per_token: float | None
    rounds: int | None
    draft_ms_per_round: float | None
    verify_ms_per_round: float | None
    network_ms_per_round: float | None
    round_trips_per_round: float | None  # calls a round sent and waited for: what a network's round trip delays
    redis_ms_per_round: float | None
    other_ms_per_round: float | None  # the rest of the wall time: orchestration, tokenizing, client
    bytes_sent_per_round: float | None
    bytes_received_per_round: float | None
    draft_length: float | None  # draft tokens asked per round
    ready_fraction: float | None  # pipelined: rounds whose draft was ready when the verify answered
    ahead_fraction: float | None  # pipelined: rounds whose verify was sent before the round began
    continued_fraction: float | None  # pipelined: rounds whose draft the drafter drafted going on after its last answer
    near_ties: int
    divergences: int
    unverified: int
    flagged_prompts: tuple[str, ...]


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token; a prefix that ends early differs where it ends."""
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if at is None and len(a) != len(b):
        return min(len(a), len(b))
    return at


def classify(
    prompt_id: str, system: str, position: int | None, gap: float | None, near_tie: float = NEAR_TIE
) -> Check:
    """The check's verdict from where the outputs part and the target's gap there (None:
    unknown); near_tie: the bound of the verifier's runtime (services.runtime.near_tie)."""
    if position is None:
        return Check(prompt_id, system, "match")
    if gap is None:
        return Check(prompt_id, system, "unverified", position)
    return Check(prompt_id, system, "near-tie" if gap < near_tie else "diverged", position, gap)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _sum_or_none(values: Iterable[float | int | None]) -> float | None:
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values)


def pooled_acceptance_by_position(records: Sequence[RunRecord]) -> tuple[float, ...]:
    """Acceptance rate per draft position, pooled over records (see the module docstring)."""
    accepted: list[float] = []
    drafted: list[float] = []
    for r in records:
        rates = r.acceptance_by_position
        if not rates:
            continue
        counts = r.drafted_by_position or (r.drafted / len(rates),) * len(rates)
        for i, (rate, count) in enumerate(zip(rates, counts)):
            if i == len(drafted):
                accepted.append(0.0)
                drafted.append(0.0)
            accepted[i] += rate * count
            drafted[i] += count
    return tuple(a / d if d else 0.0 for a, d in zip(accepted, drafted))


def throughput(records: Sequence[RunRecord]) -> float:
    wall = sum(r.wall_seconds for r in records)
    return sum(r.new_tokens for r in records) / wall if wall else 0.0


def speedup(records: Sequence[RunRecord], reference: Sequence[RunRecord]) -> float | None:
    """Throughput of `records` over that of `reference`, on the prompts both ran."""
    ref = {r.prompt_id: r for r in reference}
    common = [r for r in records if r.prompt_id in ref]
    base = throughput([ref[r.prompt_id] for r in common])
    return throughput(common) / base if common and base else None


def overhead_percent(services: Sequence[RunRecord], local: Sequence[RunRecord]) -> float | None:
    """Share of the services' time per token that the in-process run did not need, in %.

    Example: 0.40 s/token through the services, 0.36 s/token in-process: 10%.
    """
    by_id = {r.prompt_id: r for r in local}
    common = [r for r in services if r.prompt_id in by_id]
    remote, near = throughput(common), throughput([by_id[r.prompt_id] for r in common])
    if not common or not remote or not near:
        return None
    return (1 / remote - 1 / near) / (1 / remote) * 100


def summarize(
    records: Sequence[RunRecord], reference: Sequence[RunRecord], checks: Sequence[Check], category: str
) -> Summary:
    """One system's records (one category, or all) into its figures."""
    assert records, "summarize needs at least one record"
    first = records[0]
    assert all(r.system == first.system for r in records), "records of one system only"
    ids = {r.prompt_id for r in records}
    mine = [c for c in checks if c.system == first.system and c.prompt_id in ids]
    forwards = _sum_or_none(r.target_forwards for r in records)
    new_tokens = sum(r.new_tokens for r in records)
    wall = sum(r.wall_seconds for r in records)
    drafted = sum(r.drafted for r in records)
    accepted = sum(r.accepted for r in records)

    def per_round_ms(values: Iterable[float | None]) -> float | None:
        total = _sum_or_none(values)
        return None if total is None or not forwards else total / forwards * 1000

    parts = [per_round_ms(getattr(r, f) for r in records) for f in ("draft_seconds", "verify_seconds")]
    parts += [per_round_ms(getattr(r, f) for r in records) for f in ("network_seconds", "redis_seconds")]
    other = None if None in parts or not forwards else wall / forwards * 1000 - sum(parts)
    sent, received = _sum_or_none(r.bytes_sent for r in records), _sum_or_none(r.bytes_received for r in records)
    asked = _sum_or_none(r.draft_asked for r in records)
    trips = _sum_or_none(r.round_trips for r in records)
    return Summary(
        system=first.system,
        path=first.path,
        strategy=first.strategy,
        category=category,
        prompts=len(records),
        new_tokens=new_tokens,
        wall_seconds=wall,
        tokens_per_second=throughput(records),
        speedup=speedup(records, reference),
        mean_accepted_length=None if not forwards else 1 + accepted / forwards,
        acceptance_rate=_ratio(accepted, drafted),
        acceptance_by_position=pooled_acceptance_by_position(records),
        forwards_per_token=None if forwards is None else _ratio(forwards, new_tokens),
        rounds=None if forwards is None else int(forwards),
        draft_ms_per_round=parts[0],
        verify_ms_per_round=parts[1],
        network_ms_per_round=parts[2],
        round_trips_per_round=None if trips is None or not forwards else trips / forwards,
        redis_ms_per_round=parts[3],
        other_ms_per_round=other,
        bytes_sent_per_round=None if sent is None or not forwards else sent / forwards,
        bytes_received_per_round=None if received is None or not forwards else received / forwards,
        draft_length=None if asked is None or not forwards else asked / forwards,
        ready_fraction=_ratio(sum(r.speculative_ready for r in records), forwards or 0)
        if any(r.speculative_drafts for r in records) else None,
        ahead_fraction=_ratio(sum(r.speculative_verified for r in records), forwards or 0)
        if any(r.speculative_drafts for r in records) else None,
        continued_fraction=_ratio(sum(r.speculative_continued for r in records), forwards or 0)
        if any(r.speculative_drafts for r in records) else None,
        near_ties=sum(c.status == "near-tie" for c in mine),
        divergences=sum(c.status == "diverged" for c in mine),
        unverified=sum(c.status == "unverified" for c in mine),
        flagged_prompts=tuple(sorted({c.prompt_id for c in mine if c.flagged})),
    )


def summarize_all(records: Sequence[RunRecord], checks: Sequence[Check]) -> list[Summary]:
    """Every system on every category and on ALL, systems and categories in order of appearance."""
    systems = list(dict.fromkeys(r.system for r in records))
    categories = list(dict.fromkeys(r.category for r in records))
    reference = [r for r in records if r.system == REFERENCE]
    out = []
    for system in systems:
        mine = [r for r in records if r.system == system]
        for category in [*categories, ALL]:
            chosen = mine if category == ALL else [r for r in mine if r.category == category]
            if chosen:
                out.append(summarize(chosen, reference, checks, category))
    return out


@dataclass(frozen=True)
class LanguageRow:
    """One system's sessions of one language on one drafter pool (drafters pooled by language)."""

    system: str
    language: str
    drafter_pool: str  # "" = the default pool
    prompts: int
    drafted: int
    accepted: int
    target_forwards: int
    acceptance_rate: float | None
    mean_accepted_length: float | None  # τ


def by_language(records: Sequence[RunRecord]) -> list[LanguageRow]:
    """Acceptance per language and drafter pool, for the systems whose sessions were
    identified by language (a stack whose drafters are pooled by language); empty otherwise."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        if r.language and r.drafted:
            groups.setdefault((r.system, r.language, r.drafter_pool), []).append(r)
    rows = []
    for (system, language, pool), group in groups.items():
        drafted = sum(r.drafted for r in group)
        accepted = sum(r.accepted for r in group)
        forwards = sum(r.target_forwards or 0 for r in group)
        rows.append(
            LanguageRow(
                system, language, pool, len(group), drafted, accepted, forwards, _ratio(accepted, drafted),
                None if not forwards else 1 + accepted / forwards,
            )  # fmt: skip
        )
    return sorted(rows, key=lambda row: (row.system, row.language, row.drafter_pool))


@dataclass(frozen=True)
class Overhead:
    """The same strategy through the services and in-process, on the prompts both ran."""

    strategy: str
    category: str
    prompts: int
    services_tokens_per_second: float
    in_process_tokens_per_second: float
    overhead_percent: float | None


def overheads(records: Sequence[RunRecord]) -> list[Overhead]:
    """Distributed overhead of every strategy that also ran in-process, per category and ALL."""
    out = []
    categories = list(dict.fromkeys(r.category for r in records))
    local_strategies = list(dict.fromkeys(r.strategy for r in records if r.path == IN_PROCESS))
    for strategy in local_strategies:
        local = [r for r in records if r.path == IN_PROCESS and r.strategy == strategy]
        ids = {r.prompt_id for r in local}
        remote = [r for r in records if r.path == SERVICES and r.strategy == strategy and r.prompt_id in ids]
        for category in [*categories, ALL]:
            rc = [r for r in remote if category in (ALL, r.category)]
            lc = [r for r in local if category in (ALL, r.category)]
            if rc and lc:
                out.append(
                    Overhead(strategy, category, len(rc), throughput(rc), throughput(lc), overhead_percent(rc, lc))
                )
    return out
