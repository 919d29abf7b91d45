"""`specd train`: the command-line face of specd/train.py (which imports torch only when run)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from specd.cli import DEFAULT_DRAFTER, DEFAULT_TARGET


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a draft head for a target on this machine")
    kinds = train.add_subparsers(dest="train_command", required=True, metavar="DRAFTER")
    heads = {
        "redrafter": (
            "a recurrent draft head over the target's hidden state (strategy redrafter)",
            "Distils a recurrent draft head from TARGET (ReDrafter): the target reads the Python standard library's "
            "source teacher-forced and answers chat prompts made from its documented functions, and the head learns "
            "to predict the target's own next tokens from its hidden state, one token after another.",
        ),
        "parallel": (
            "a parallel draft head: every draft position in one pass (strategy parallel)",
            "Distils a parallel draft head from TARGET (ParallelSpec): on the same data as redrafter, the head learns "
            "to predict the target's next --depth tokens at once, from its hidden state and one mask embedding per "
            "position.",
        ),
    }
    for kind, (summary, description) in heads.items():
        _add_head_command(kinds, kind, summary, description)


def _add_head_command(kinds: argparse._SubParsersAction, kind: str, summary: str, description: str) -> None:
    p = kinds.add_parser(
        kind, help=summary,
        description=description + " Writes HOME/heads/NAME; serve it with a drafter started with SPECD_MODEL=NAME.",
    )  # fmt: skip
    p.add_argument("--target", default=DEFAULT_TARGET, help="catalog name or model folder (default %(default)s)")
    p.add_argument("--name", help=f"the head's name under HOME/heads (default {kind}-TARGET, {kind}-TARGET-LANG)")
    p.add_argument("--minutes", type=float, help="time budget of the whole run (default 45; 30 with --language)")
    p.add_argument(
        "--language", metavar="LANG",
        help="a head for prompts in this language (fr, de, ja, ...: the code a drafter pool is labelled with): "
        "the general head fine-tuned on the language's translated GSM8K problems the bench does not read",
    )  # fmt: skip
    p.add_argument(
        "--from", dest="base", default="", metavar="HEAD",
        help=f"with --language: the head to start from (default {kind}-TARGET where trained; 'none' = fresh)",
    )  # fmt: skip
    p.add_argument(
        "--drafter", default="auto",
        help="the model that drafts the target's answers to the training prompts (strategy sd: the target's own "
        f"greedy answers, faster): a catalog name or folder, 'none' = the target alone (default auto: "
        f"{DEFAULT_DRAFTER} for {DEFAULT_TARGET}, none for another target)",
    )  # fmt: skip
    p.add_argument(
        "--answer-minutes", type=float, metavar="M",
        help="minutes of the run spent answering training prompts no earlier run answered (answers are kept in "
        "HOME/heads/.data and every run adds its own; default: a share of the data budget, none once the text's "
        "passes and some answers are kept)",
    )  # fmt: skip
    p.add_argument("--depth", type=int, default=4, help="draft positions trained (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order, the head's start and its batches")
    p.add_argument(
        "--dtype", default="auto", help="the target's dtype, as the verifier runs it (default auto: int8 on CPU)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument(
        "--fresh-data", action="store_true",
        help="run the target over the text again, even where an earlier run's passes are kept (HOME/heads/.data)",
    )  # fmt: skip
    p.add_argument(
        "--groups", type=int, default=256,
        help="LM-head groups (CORAL): the vocabulary in this many groups, a router picks which a step computes "
        "(default %(default)s; 0 = every row, every step)",
    )  # fmt: skip
    p.add_argument("--active-groups", type=int, default=4, help="groups a drafting step computes (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a few hundred tokens and 30 steps: to check the pipeline")
    p.add_argument("--home", help="where models and heads are kept (default $SPECD_HOME or ~/.cache/specd)")
    p.set_defaults(func=cmd_train_head, kind=kind)


def cmd_train_head(args: argparse.Namespace) -> int:
    import logging

    from services.models import ModelNotFound, ModelPrepareError, default_head_name, default_home

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The in-process Engine that drafts the target's answers logs every turn; the progress bar says it
    logging.getLogger("orchestrator").setLevel(logging.WARNING)
    home = Path(args.home or os.environ.get("SPECD_HOME") or default_home()).expanduser()
    minutes = args.minutes if args.minutes is not None else 30.0 if args.language else 45.0
    if args.depth < 1 or minutes <= 0 or args.groups < 0 or args.active_groups < 1:
        print(
            f"specd train {args.kind}: --depth and --active-groups must be >= 1, --groups >= 0 and --minutes > 0",
            file=sys.stderr,
        )
        return 2
    if args.answer_minutes is not None and not 0 <= args.answer_minutes < minutes:
        print(f"specd train {args.kind}: --answer-minutes must be >= 0 and less than the run's --minutes ({minutes:g}), "
              "which also trains", file=sys.stderr)  # fmt: skip
        return 2
    from specd.bench.prompts import GSM_LANGUAGES
    from specd.train import TrainSettings, run

    if args.language and args.language not in GSM_LANGUAGES:
        print(f"specd train {args.kind}: no training data in --language {args.language!r}; there is in: "
              + ", ".join(GSM_LANGUAGES), file=sys.stderr)  # fmt: skip
        return 2
    if args.base and not args.language:
        print(f"specd train {args.kind}: --from is for a language's head (--language)", file=sys.stderr)
        return 2

    settings = TrainSettings(
        depth=args.depth, seed=args.seed, minutes=minutes, fresh_data=args.fresh_data, groups=args.groups,
        active_groups=args.active_groups, kind=args.kind, language=args.language or "",
        answer_minutes=args.answer_minutes,
    )  # fmt: skip
    drafter = args.drafter
    if drafter == "auto":
        drafter = DEFAULT_DRAFTER if args.target == DEFAULT_TARGET else "none"
    if args.quick:
        settings = dataclasses.replace(settings, chunk=64, max_tokens=640, max_steps=30, fresh_data=False)
    name = args.name or default_head_name(args.target, args.kind) + (f"-{args.language}" if args.language else "")
    try:
        folder = run(
            args.target, name, home, settings, dtype=args.dtype, threads=args.threads, progress=True, base=args.base,
            drafter="" if drafter == "none" else drafter,
        )  # fmt: skip
    except (ModelNotFound, ModelPrepareError, FileNotFoundError, ValueError) as err:
        print(f"specd train {args.kind}: {err}", file=sys.stderr)
        return 2
    from services.redrafter import load_head

    _, manifest = load_head(folder)
    print(f"wrote {folder} ({manifest.steps} steps on {manifest.data['positions']} positions, {manifest.seconds:.0f}s)")
    held = manifest.held_out
    print("held-out agreement with the target by draft position: "
          + " ".join(f"{a:.2f}" for a in held["agreement_by_position"]))  # fmt: skip
    if "grouped_agreement_by_position" in held:
        print(f"  computing {held['grouped_rows_per_step']:.0f} of {manifest.target.vocab_size} LM-head rows a step: "
              + " ".join(f"{a:.2f}" for a in held["grouped_agreement_by_position"]))  # fmt: skip
    if "base_agreement" in held:
        base = held["base_agreement"]
        served = base.get("grouped_agreement_by_position", base["agreement_by_position"])
        print(f"  {held['base']} (the head it started from) on the same held-out answers: "
              + " ".join(f"{a:.2f}" for a in served))  # fmt: skip
    return 0
