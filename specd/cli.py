"""The `specd` command line: prepare models, run the local stack, generate."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc

from services.config import default_home
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b-instruct"
DEFAULT_ADDRESS = "127.0.0.1:50050"
DEMO_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home or os.environ.get("SPECD_HOME") or default_home())


# -- up / down ------------------------------------------------------------------------------


def _spec(args: argparse.Namespace):
    """The stack the options describe; ValueError names a bad --head."""
    from specd.stack import StackSpec, parse_heads

    head, language_heads = parse_heads(args.head or "")
    return StackSpec(
        home=_home(args),
        target=args.target,
        drafter="" if args.drafter == "none" else args.drafter,
        host=args.host,
        orchestrator_port=args.port,
        redis_port=args.redis_port,
        redis_url=os.environ.get("REDIS_URL", ""),
        dtype=args.dtype,
        default_k=args.k,
        verifier_runtime=args.verifier_runtime,
        drafter_runtime=args.drafter_runtime,
        verifier_replicas=args.verifier_replicas,
        drafter_replicas=args.drafter_replicas,
        threads=args.threads,
        verifier_port=args.port + 1,
        drafter_port=args.port + 1 + args.verifier_replicas,
        http_listen="" if getattr(args, "http_listen", "none") == "none" else args.http_listen,
        metrics_port=getattr(args, "metrics_port", 0),
        api_keys_file=getattr(args, "api_keys_file", None) or "",
        head=head,
        head_port=args.port - 1,
        # the heads for one language on the ports before the head's
        language_heads={
            language: (name, args.port - 2 - i) for i, (language, name) in enumerate(language_heads.items())
        },
    )


def _prepare_if_needed(spec) -> None:
    """Prepares the catalog models the stack serves; the target's int8 weights too when the
    verifier will run on torch in int8 (the CPU default), so the verifier starts in seconds."""
    from services.models import catalog, prepare

    known = catalog()
    int8 = spec.verifier_runtime in ("auto", "torch") and spec.dtype in ("auto", "int8")
    for name in (spec.target, spec.drafter):
        if name in known:
            prepare(name, spec.home, int8=int8 and name == spec.target, say=print)


def _start(spec, command: str) -> str | None:
    """Prepares the models and starts the stack; returns the orchestrator's address."""
    from specd.stack import StackError, up

    try:
        _prepare_if_needed(spec)
        procs = up(spec)
    except StackError as err:
        print(f"specd {command}: {err}", file=sys.stderr)
        return None
    return next(p for p in procs if p.name == "orchestrator").address


def cmd_up(args: argparse.Namespace) -> int:
    from specd.stack import down

    try:
        spec = _spec(args)
    except ValueError as err:
        print(f"specd up: {err}", file=sys.stderr)
        return 2
    address = _start(spec, "up")
    if address is None:
        return 1
    print(f"\nspecd is up. Try:  specd generate --address {address} \"{DEMO_PROMPT}\"")
    if spec.http_listen:
        print(f"OpenAI-compatible API:  http://{spec.http_listen}/v1  (model {Path(spec.target).name})")
    if args.detach:
        print("Stop it with:  specd down" + (f" --home {args.home}" if args.home else ""))
        return 0
    print("Press Ctrl-C to stop.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print()
    finally:
        down(spec.home)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from specd.stack import status

    procs = status(_home(args))
    if args.json:
        print(json.dumps([asdict(p) for p in procs], indent=2))
        return 0 if procs else 1
    if not procs:
        print("no running stack (start one with `specd up`)")
        return 1

    def count(v: int | None) -> str:
        return "-" if v is None else str(v)

    print(f"{'name':<14} {'address':<22} {'pid':>7} {'state':<9} {'RSS MB':>7} {'sessions':>8} {'calls':>7} "
          f"{'hits':>6} {'misses':>6} {'full':>6}")  # fmt: skip
    for p in procs:
        state = "healthy" if p.healthy else "running" if p.alive else "dead"
        print(f"{p.name:<14} {p.address:<22} {p.pid:>7} {state:<9} {p.rss_bytes / 1e6:>7.0f} {count(p.sessions):>8} "
              f"{count(p.calls):>7} {count(p.context_hits):>6} {count(p.context_misses):>6} {count(p.full_contexts):>6}")  # fmt: skip
    return 0 if all(p.healthy for p in procs) else 1


def cmd_down(args: argparse.Namespace) -> int:
    from specd.stack import down

    if down(_home(args)) == 0:
        print("no running stack")
    return 0


# -- generate -------------------------------------------------------------------------------


def build_request(args: argparse.Namespace, stdin=sys.stdin) -> pb.GenerateRequest:
    request = pb.GenerateRequest(session_id=args.session or "", strategy=args.strategy or "", stop=args.stop or [])
    prompt = stdin.read() if args.prompt == "-" else args.prompt
    if args.raw:
        request.prompt = prompt
    else:
        messages = ([pb.ChatMessage(role="system", content=args.system)] if args.system else []) + [
            pb.ChatMessage(role="user", content=prompt)
        ]
        request.chat.messages.extend(messages)
    for field in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(request, field, value)
    if args.k is not None:
        request.options.k = args.k
    request.options.head_only = args.head_only
    return request


def format_stats(s: pb.GenerationStats) -> str:
    return (
        f"[{s.strategy}] {s.new_tokens} tokens in {s.wall_seconds:.2f}s = {s.tokens_per_second:.2f} tok/s | "
        f"target forwards {s.target_forwards} | round trips {s.round_trips} | τ {s.mean_accepted_length:.2f} | "
        f"acceptance {s.acceptance_rate:.0%} | "
        + (f"draft length {s.mean_draft_length:.1f} adaptive ({s.ar_rounds} rounds without a draft) | " if s.adaptive else "")
        + (f"chains {s.chain_rounds}/{s.target_forwards} | " if s.chain_rounds else "")
        + (f"next drafts ready {s.speculative_ready}/{s.target_forwards} | " if s.speculative_drafts else "")
        + (f"verified ahead {s.speculative_verified}/{s.target_forwards} | " if s.speculative_verified else "")
        + (f"plain steps sent ahead {s.speculative_plain} | " if s.speculative_plain else "")
        + (f"drafted going on {s.speculative_continued}/{s.target_forwards} | " if s.speculative_continued else "")
        + f"finish {s.finish_reason} | session {s.session_id}"
        + (f" | failovers {s.failovers}" if s.failovers else "")
        + (f" | rounds without a drafter {s.fallback_rounds}" if s.fallback_rounds else "")
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """One turn; a stream broken by an orchestrator that stopped is resumed (specd/client.py)."""
    from specd.client import answered_by_orchestrator, generate

    request = build_request(args)
    shown: list[str] = []

    def show(text: str) -> None:
        shown.append(text)
        if not args.json:
            print(text, end="", flush=True)

    try:
        result = generate(args.address, request, timeout=args.timeout, on_delta=lambda delta: show(delta.text))
    except grpc.RpcError as err:
        if not args.json and shown:
            print()
        hint = ""
        if err.code() == grpc.StatusCode.UNAVAILABLE and not answered_by_orchestrator(err):
            # The orchestrator itself names a backend it cannot reach; this is no orchestrator at all.
            hint = f" (no orchestrator answers at {args.address}: is the stack running? start it with `specd up`)"
        print(f"specd generate: {err.code().name}: {err.details()}{hint}", file=sys.stderr)
        return 1
    text, ids, stats = [result.text], result.token_ids, result.stats
    if args.json:
        from google.protobuf.json_format import MessageToDict

        stats_dict = MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        for field in stats.DESCRIPTOR.fields:  # protobuf's JSON writes 64-bit integers as strings
            if field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
                stats_dict[field.name] = int(stats_dict[field.name])
        out = {"text": "".join(text), "token_ids": ids, "stats": stats_dict}
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(flush=True)
        print(format_stats(stats), file=sys.stderr)
    return 0


# -- load -----------------------------------------------------------------------------------


def cmd_load(args: argparse.Namespace) -> int:
    from specd.load import format_report, run_load
    from specd.stack import read_state

    home = _home(args)

    def progress(report) -> None:
        if not args.json:
            print(f"\r{report.requests}/{args.requests} requests, {len(report.errors)} errors", end="", file=sys.stderr)

    report = run_load(
        args.address, streams=args.streams, requests=args.requests, duration=args.duration,
        max_new_tokens=args.max_new_tokens, strategy=args.strategy or "",
        home=home if read_state(home) else None, progress=progress, timeout=args.timeout,
    )  # fmt: skip
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(file=sys.stderr)
        print(format_report(summary))
    return 1 if report.errors else 0


# -- demo -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepares the default models, starts the stack, answers one prompt with each of
    ar and sd, and stops the stack."""
    from specd.stack import down

    try:
        spec = _spec(args)
    except ValueError as err:
        print(f"specd demo: {err}", file=sys.stderr)
        return 2
    address = _start(spec, "demo")
    if address is None:
        return 1
    try:
        for strategy in ("ar", "sd") if spec.drafter else ("ar",):
            print(f"\n=== {strategy}: {args.prompt}\n")
            gen_args = argparse.Namespace(
                address=address, prompt=args.prompt, raw=False, system=None, session=None, strategy=strategy,
                stop=None, max_new_tokens=args.max_new_tokens, temperature=None, top_k=None, top_p=None,
                seed=None, k=None, json=False, timeout=args.timeout,
            )
            if cmd_generate(gen_args) != 0:
                return 1
    finally:
        down(spec.home, say=lambda _: None)
    return 0


# -- parser ---------------------------------------------------------------------------------


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _listen_or_none(text: str) -> str:
    from services.config import ConfigError, split_host_port

    if text != "none":
        try:
            split_host_port(text, "--http-listen")
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_stack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"target model: catalog name or folder (default {DEFAULT_TARGET})")
    p.add_argument("--drafter", default=DEFAULT_DRAFTER, help=f"drafter model, or 'none' (default {DEFAULT_DRAFTER})")
    p.add_argument(
        "--head", help="a trained head (`specd train redrafter|parallel`) to serve for the strategy of its kind, on "
        "the port before the orchestrator's (default: none); then `fr=HEAD` entries, a head for prompts in that "
        "language (`specd train --language fr`) on the ports before it: NAME,fr=NAME-fr",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind every service to (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50050, help="orchestrator port; the verifiers and drafters use the next ones (default 50050)")
    p.add_argument("--redis-port", type=int, default=6399, help="port of the redis-server started when REDIS_URL is unset (default 6399)")
    p.add_argument("--verifier-runtime", default="auto", choices=["auto", "llama", "torch"], help="the verifier's runtime (default auto: torch in int8 on CPU, its multi-token pass is the cheapest)")
    p.add_argument("--drafter-runtime", default="auto", choices=["auto", "llama", "torch"], help="the drafter's runtime (default auto: llama on CPU, its one-token pass is the cheapest)")
    p.add_argument("--dtype", default="auto", choices=["auto", "int8", "float32", "bfloat16", "float16", "float64"], help="weights of a model on the torch runtime (default auto: int8 on CPU, bfloat16 on CUDA)")
    p.add_argument("-k", type=int, default=0, help="default draft length (default 0: adaptive, chosen each round)")
    p.add_argument("--verifier-replicas", type=_at_least_one, default=1, help="verifier processes, on the ports after the orchestrator's (default 1)")
    p.add_argument("--drafter-replicas", type=_at_least_one, default=1, help="drafter processes, on the ports after the verifiers' (default 1)")
    p.add_argument(
        "--threads", type=int, default=0,
        help="threads of each model service's passes (default $SPECD_THREADS, else every core: fastest for one "
        "stream at a time; with concurrent streams, cores / model processes avoids oversubscription, docs/scale-out.md)",
    )  # fmt: skip
    p.add_argument("--home", help="models and run state (default $SPECD_HOME or ~/.cache/specd)")


def _add_generate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (sent as a user chat message unless --raw); - reads it from stdin")
    p.add_argument("--address", default=os.environ.get("SPECD_ADDRESS", DEFAULT_ADDRESS), help=f"orchestrator host:port (default $SPECD_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument(
        "--strategy",
        help="ar (plain decoding), lookup (drafts copied from the context, no drafter), sd, cascade, staged (a "
        "drafter of the target's vocabulary), slem, tli, slrs (a drafter of any vocabulary), or redrafter, parallel "
        "(a trained head: specd up --head); default: the server's",
    )
    p.add_argument("-k", type=int, help="draft length (default: the server's; adaptive unless it fixes one)")
    p.add_argument("--head-only", action="store_true",
                   help="redrafter, parallel: draft with the trained head alone, without the context's own "
                   "continuation beside its beams")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: the server's, 128)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only (0 = off)")
    p.add_argument("--top-p", type=float, help="sample from the smallest set with this much probability (1 = off)")
    p.add_argument("--seed", type=int, help="seed of the sampling draws; the same seed gives the same text")
    p.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    p.add_argument("--session", help="continue this session (its id is printed after each answer)")
    p.add_argument("--system", help="a system message to put before the prompt")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and statistics")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the whole answer (default 600)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specd")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specd",
        description="Lossless speculative decoding served as gRPC microservices.",
    )
    parser.add_argument("--version", action="version", version=f"specd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from specd.models_cli import add_models_commands

    add_models_commands(sub)
    from specd.bench_cli import add_bench_command

    add_bench_command(sub)
    from specd.train_cli import add_train_command

    add_train_command(sub)

    p = sub.add_parser("up", help="start redis, verifier, drafter, orchestrator and the HTTP gateway on this machine")
    _add_stack_options(p)
    p.add_argument(
        "--http-listen", type=_listen_or_none, default=os.environ.get("SPECD_HTTP_LISTEN") or "127.0.0.1:8000",
        help="host:port of the OpenAI-compatible HTTP API, or 'none' (default $SPECD_HTTP_LISTEN or 127.0.0.1:8000)",
    )  # fmt: skip
    p.add_argument(
        "--api-keys-file", default=os.environ.get("SPECD_API_KEYS_FILE"),
        help="API keys, one a line: every Generate call and HTTP request then needs one "
        "(clients send $SPECD_API_KEY); default $SPECD_API_KEYS_FILE, else an open API on loopback",
    )  # fmt: skip
    p.add_argument(
        "--metrics-port", type=int, default=9100,
        help="port of the orchestrator's Prometheus /metrics; the model services and the gateway take the next "
        "ones, as `specd status` lists them (default 9100; 0 = none)",
    )  # fmt: skip
    p.add_argument("--detach", action="store_true", help="return once healthy; stop later with `specd down`")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="list the running stack's processes: health, memory, sessions, context hits")
    p.add_argument("--home", help="as given to `specd up`")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("down", help="stop the stack started by `specd up --detach`")
    p.add_argument("--home", help="as given to `specd up`")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("generate", help="generate from a prompt on a running stack, streaming the text")
    _add_generate_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("load", help="concurrent streams against a running stack: latency percentiles, errors, memory")
    p.add_argument("--address", default=os.environ.get("SPECD_ADDRESS", DEFAULT_ADDRESS), help=f"orchestrator host:port, or several comma-separated (default $SPECD_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--streams", type=_at_least_one, default=32, help="concurrent streams (default 32)")
    p.add_argument("--requests", type=_at_least_one, default=64, help="turns in all (default 64)")
    p.add_argument("--duration", type=float, default=180.0, help="stop issuing turns after this many seconds (default 180)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per turn (default 64)")
    p.add_argument("--strategy", help="the strategy of every turn (default: the server's)")
    p.add_argument("--home", help="the local stack's home, for each process's memory (default as `specd up`)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one turn may take before it counts as failed (default 600)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("demo", help="prepare models, start the stack, answer a prompt with ar and sd, stop")
    _add_stack_options(p)
    p.add_argument("--prompt", default=DEMO_PROMPT, help="the prompt to answer")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (default 96)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per answer (default 900)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM exits through SystemExit, so `finally` blocks stop the stacks that `up`,
    # `demo` and `bench` started instead of leaving them orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
