"""The bench's runs: each prompt through every system, interleaved prompt by prompt.

Systems (names as they appear in the table and in results.json):

| system        | what runs                                                                  |
|---------------|----------------------------------------------------------------------------|
| `<strategy>`  | the strategy through the services: Generator gRPC -> orchestrator -> drafter/verifier, Redis |
| `<strategy>@local` | the same Engine and strategy code in this process on LocalDrafter/LocalVerifier, with an in-memory session store: no gRPC, no Redis |
| `hf-generate` | transformers' own `generate` of the target                                 |
| `hf-assisted` | transformers' assisted generation, `assistant_model=` the drafter (its defaults) |

For each prompt every system runs once, in an order rotated by one per prompt, so that
machine noise (another process waking up, thermal drift) hits all systems alike and no
system always runs right after a particular other one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch

from drafter_svc.foreign import Translation
from orchestrator.backends import LocalDrafter, LocalVerifier
from orchestrator.generate import Engine, GenerationRequest, Limits, NotServable, Stats
from orchestrator.store import ChatMessage, Session
from orchestrator.strategies import STRATEGIES, Backends
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.runtime import ModelHost, load_host
from services.server import channel_options
from specd.bench.metrics import (
    IN_PROCESS,
    PEER,
    REFERENCE,
    SERVICES,
    Check,
    RunError,
    RunRecord,
    classify,
    first_divergence,
)
from specd.bench.prompts import Prompt

log = logging.getLogger(__name__)

LOCAL_SUFFIX = "@local"
PEERS = ("hf-generate", "hf-assisted")
WARMUP_TOKENS = 2  # enough to load every code path once (prefill, a round, a commit)


class BenchError(RuntimeError):
    """The bench cannot go on; the message says why."""


@dataclass(frozen=True)
class BenchConfig:
    strategies: tuple[str, ...]  # `ar` first: it is the reference of every speedup
    max_new_tokens: int
    k: int  # draft length of every drafting strategy
    temperature: float  # 0 = greedy, and then every output is checked against ar's
    top_k: int
    top_p: float
    seed: int  # prompt i samples with seed + i, the same for every system
    in_process_limit: int  # prompts per category also run in-process (0: none)
    peers: bool  # run hf-generate and hf-assisted
    timeout_seconds: float  # per generation through the services

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Task:
    """One system, ready to run a prompt: (prompt, max_new_tokens, seed) -> RunRecord."""

    system: str
    path: str
    strategy: str
    run: Callable[[Prompt, int, int], RunRecord]


@dataclass
class BenchRun:
    """What the bench produced so far (grows prompt by prompt)."""

    records: list[RunRecord] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    errors: list[RunError] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # system -> why it did not run


# -- through the services -----------------------------------------------------------------------


class ServicesClient:
    """The Generator service, called the way a user's client would."""

    def __init__(self, address: str, config: BenchConfig) -> None:
        self.address = address
        self.config = config
        self.channel = grpc.insecure_channel(address, options=channel_options())
        self.stub = pb_grpc.GeneratorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def request(self, prompt: Prompt, strategy: str, max_new_tokens: int, seed: int) -> pb.GenerateRequest:
        c = self.config
        request = pb.GenerateRequest(
            strategy=strategy, max_new_tokens=max_new_tokens, temperature=c.temperature, top_k=c.top_k,
            top_p=c.top_p, seed=seed, options=pb.StrategyOptions(k=c.k),
        )  # fmt: skip
        request.chat.messages.append(pb.ChatMessage(role="user", content=prompt.text))
        return request

    def run(self, prompt: Prompt, strategy: str, max_new_tokens: int, seed: int) -> RunRecord:
        request = self.request(prompt, strategy, max_new_tokens, seed)
        ids: list[int] = []
        stats = None
        started = time.perf_counter()
        for reply in self.stub.Generate(request, timeout=self.config.timeout_seconds):
            if reply.HasField("delta"):
                ids.extend(reply.delta.token_ids)
            else:
                stats = reply.stats
        wall = time.perf_counter() - started
        if stats is None:
            raise BenchError(f"{strategy} on {prompt.id}: the stream ended without statistics")
        # Not part of the measurement; keeps the bench from filling Redis with sessions.
        self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=stats.session_id), timeout=30)
        return RunRecord(
            prompt_id=prompt.id, category=prompt.category, system=strategy, path=SERVICES, strategy=strategy,
            prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens, wall_seconds=wall, token_ids=tuple(ids),
            finish_reason=stats.finish_reason, engine_wall_seconds=stats.wall_seconds,
            target_forwards=stats.target_forwards, drafted=stats.drafted, accepted=stats.accepted,
            acceptance_by_position=tuple(stats.acceptance_by_position), draft_seconds=stats.draft_seconds,
            verify_seconds=stats.verify_seconds, network_seconds=stats.network_seconds,
            redis_seconds=stats.redis_seconds, bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received,
        )  # fmt: skip


# -- in process ---------------------------------------------------------------------------------


class MemoryStore:
    """SessionStore's five methods on a dict: the in-process path measures no Redis at all."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    async def load(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    async def save(self, session: Session) -> None:
        self.sessions[session.id] = session

    async def commit(self, session: Session, new_tokens: list[int]) -> None:
        self.sessions[session.id] = session

    async def save_messages(self, session: Session) -> None:
        self.sessions[session.id] = session

    async def delete(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None


@dataclass(frozen=True)
class LocalModels:
    """The target and drafter loaded in the bench process, shared by in-process runs, peers
    and the near-tie check (one copy of the weights for all three)."""

    target: ModelHost
    drafter: ModelHost | None
    tokenizer: object  # the target's tokenizer
    translation: Translation | None = None  # set when the drafter's vocabulary differs from the target's

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt as the orchestrator tokenizes a chat turn (generate.py, _turn_context)."""
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer.encode(rendered, add_special_tokens=False)


def load_local(
    target_dir: Path, drafter_dir: Path | None, *, dtype: str, threads: int, onednn: bool, vocab_cache: Path
) -> LocalModels:
    """Loads both models the way the services do (same dtype, threads and kernels); a drafter
    of another vocabulary gets its translation (vocabulary maps cached in vocab_cache)."""
    from transformers import AutoTokenizer

    def load(path: Path) -> ModelHost:
        return load_host(path, dtype=dtype, device="cpu", max_sessions=4, threads=threads, onednn=onednn)

    drafter = None if drafter_dir is None else load(drafter_dir)
    target = load(target_dir)
    translation = None
    if drafter is not None and drafter.info.tokenizer_fingerprint != target.info.tokenizer_fingerprint:
        translation = Translation.build(
            drafter.tokenizer, target.tokenizer, drafter.info.vocab_size, target.info.vocab_size, vocab_cache
        )
    return LocalModels(target, drafter, AutoTokenizer.from_pretrained(target_dir), translation)


class InProcessRunner:
    """The orchestrator's Engine in this process, on local models and a MemoryStore."""

    def __init__(self, models: LocalModels, config: BenchConfig, q_top: int = 32) -> None:
        self.models = models
        self.config = config
        drafter = None if models.drafter is None else LocalDrafter(models.drafter, q_top, translation=models.translation)
        self.engine = Engine(
            tokenizer=models.tokenizer,
            store=MemoryStore(),
            backends=Backends(verifier=LocalVerifier(models.target), drafter=drafter),
            limits=Limits(
                default_strategy=REFERENCE, default_k=config.k,
                default_max_new_tokens=config.max_new_tokens, max_new_tokens_limit=1 << 20,
            ),
        )  # fmt: skip

    def run(self, prompt: Prompt, strategy: str, max_new_tokens: int, seed: int) -> RunRecord:
        c = self.config
        request = GenerationRequest(
            messages=(ChatMessage("user", prompt.text),), max_new_tokens=max_new_tokens,
            # The services receive the temperature as a proto float32; round it the same way
            # so a seeded sampled run draws the same tokens in both paths.
            temperature=float(np.float32(c.temperature)), top_k=c.top_k, top_p=float(np.float32(c.top_p)),
            seed=seed, strategy=strategy, k=c.k,
        )  # fmt: skip
        ids, stats, wall = asyncio.run(self._generate(request))
        for host in (self.models.target, self.models.drafter):
            if host is not None:
                host.release(stats.session_id)
        return RunRecord(
            prompt_id=prompt.id, category=prompt.category, system=strategy + LOCAL_SUFFIX, path=IN_PROCESS,
            strategy=strategy, prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens, wall_seconds=wall,
            token_ids=tuple(ids), finish_reason=stats.finish_reason, engine_wall_seconds=stats.wall_seconds,
            target_forwards=stats.target_forwards, drafted=stats.drafted, accepted=stats.accepted,
            acceptance_by_position=tuple(stats.acceptance_by_position),
            drafted_by_position=tuple(stats.drafted_by_position), draft_seconds=stats.draft_seconds,
            verify_seconds=stats.verify_seconds, network_seconds=stats.network_seconds,
            redis_seconds=stats.redis_seconds, bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received,
        )  # fmt: skip

    async def _generate(self, request: GenerationRequest) -> tuple[list[int], Stats, float]:
        ids: list[int] = []
        stats = None
        started = time.perf_counter()
        async for event in self.engine.generate(request):
            if isinstance(event, Stats):
                stats = event
            else:
                ids.extend(event.token_ids)
        wall = time.perf_counter() - started
        assert stats is not None, "Engine.generate ends with its Stats"
        await self.engine.delete_session(stats.session_id)
        return ids, stats, wall


# -- peers: transformers' own decoding ---------------------------------------------------------


class PeerRunner:
    """transformers' `generate` on the same weights: plain, and assisted by the drafter.

    The peers run on the very model objects of the in-process path, so with specd's oneDNN
    linears (SPECD_ONEDNN, on by default) they use the same kernels: the comparison is of
    decoding loops and algorithms, not of matrix kernels. (It also keeps one copy of each
    model in the bench process, which matters next to the services' copies on a 24 GiB
    machine.) With SPECD_ONEDNN=0 everything runs on stock torch linears.
    """

    def __init__(self, models: LocalModels, config: BenchConfig) -> None:
        self.models = models
        self.config = config

    def sampling_kwargs(self) -> dict[str, object]:
        """The same decoding as specd's, whatever the model folder's generation_config says:
        instruct models often ship sampling defaults and a repetition penalty, which specd
        does not apply, so both are overridden here."""
        c = self.config
        plain = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
        if c.greedy:
            return {"do_sample": False, **plain}
        return {"do_sample": True, "temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p, **plain}

    @torch.inference_mode()
    def run(self, prompt: Prompt, peer: str, max_new_tokens: int, seed: int) -> RunRecord:
        assert peer in PEERS, f"unknown peer {peer!r}"
        info = self.models.target.info
        prompt_ids = self.models.prompt_ids(prompt)
        input_ids = torch.tensor([prompt_ids])  # (1, T)
        extra: dict[str, object] = {}
        if peer == "hf-assisted":
            extra["assistant_model"] = self.models.drafter.model
            if self.models.translation is not None:  # transformers' universal assisted generation
                extra.update(tokenizer=self.models.target.tokenizer, assistant_tokenizer=self.models.drafter.tokenizer)
        torch.manual_seed(seed)  # transformers samples from the global generator
        started = time.perf_counter()
        out = self.models.target.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            eos_token_id=list(info.eos_token_ids), pad_token_id=info.eos_token_ids[0],
            **self.sampling_kwargs(), **extra,
        )  # fmt: skip
        wall = time.perf_counter() - started
        ids = out[0, len(prompt_ids) :].tolist()
        finish = "stop" if ids and ids[-1] in info.eos_token_ids else "length"
        return RunRecord(
            prompt_id=prompt.id, category=prompt.category, system=peer, path=PEER, strategy=peer,
            prompt_tokens=len(prompt_ids), new_tokens=len(ids), wall_seconds=wall, token_ids=tuple(ids),
            finish_reason=finish,
        )  # fmt: skip


# -- the lossless check --------------------------------------------------------------------------


@torch.inference_mode()
def top2_gap(host: ModelHost, ids: Sequence[int]) -> float:
    """Gap between the target's two largest logits for the token after `ids` (a fresh pass)."""
    logits = host.model(torch.tensor([list(ids)])).logits[0, -1]  # (V,)
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def check_prompt(prompt: Prompt, records: Sequence[RunRecord], models: LocalModels | None) -> list[Check]:
    """Greedy: every system's tokens against `ar`'s, with the near-tie rule where they part."""
    reference = next((r for r in records if r.system == REFERENCE), None)
    if reference is None:
        return []
    checks = []
    for r in records:
        if r is reference:
            continue
        at = first_divergence(r.token_ids, reference.token_ids)
        gap = None
        if at is not None and models is not None:
            gap = top2_gap(models.target, models.prompt_ids(prompt) + list(reference.token_ids[:at]))
        check = classify(prompt.id, r.system, at, gap)
        if check.flagged:
            log.warning("%s on %s: %s at new token %s (top-2 gap %s)", r.system, prompt.id, check.status, at, gap)
        checks.append(check)
    return checks


# -- the loop ----------------------------------------------------------------------------------


def build_tasks(
    config: BenchConfig,
    services: ServicesClient,
    in_process: InProcessRunner | None,
    peers: PeerRunner | None,
) -> list[Task]:
    tasks = [Task(s, SERVICES, s, lambda p, n, seed, s=s: services.run(p, s, n, seed)) for s in config.strategies]
    if in_process is not None:
        tasks += [
            Task(s + LOCAL_SUFFIX, IN_PROCESS, s, lambda p, n, seed, s=s: in_process.run(p, s, n, seed))
            for s in config.strategies
        ]
    if peers is not None:
        names = PEERS if peers.models.drafter is not None else PEERS[:1]  # assisted needs the drafter
        tasks += [Task(name, PEER, name, lambda p, n, seed, name=name: peers.run(p, name, n, seed)) for name in names]
    return tasks


def warm_up(tasks: Sequence[Task], prompt: Prompt, seed: int, run: BenchRun) -> list[Task]:
    """Runs every task once on a few tokens, unrecorded, and drops those that cannot serve.

    The first call of each path pays one-time costs (allocations, lazy imports, gRPC
    connections) that would otherwise land on the first prompt. A strategy the deployment
    cannot serve (say, one that needs a drafter of another vocabulary) is skipped with its
    reason rather than failing the whole bench; `ar` cannot be skipped.
    """
    ready = []
    for task in tasks:
        try:
            task.run(prompt, WARMUP_TOKENS, seed)
            ready.append(task)
        except (grpc.RpcError, NotServable) as err:
            reason = err.details() if isinstance(err, grpc.RpcError) else str(err)
            if task.strategy == REFERENCE:
                raise BenchError(f"{task.system} cannot run, and every speedup needs it: {reason}") from None
            log.warning("skipping %s: %s", task.system, reason)
            run.skipped[task.system] = reason
    return ready


def in_process_prompts(prompts: Sequence[Prompt], limit: int) -> set[str]:
    """Ids of the first `limit` prompts of each category: those also run in-process and by the peers."""
    seen: dict[str, int] = {}
    chosen = set()
    for p in prompts:
        if seen.get(p.category, 0) < limit:
            chosen.add(p.id)
        seen[p.category] = seen.get(p.category, 0) + 1
    return chosen


def run_bench(
    prompts: Sequence[Prompt],
    config: BenchConfig,
    tasks: Sequence[Task],
    models: LocalModels | None,
    *,
    on_prompt: Callable[[BenchRun], None] = lambda run: None,
    progress: bool = True,
) -> BenchRun:
    """Every prompt through every task, order rotated per prompt; checks greedy outputs."""
    from tqdm import tqdm

    run = BenchRun()
    tasks = warm_up(tasks, prompts[0], config.seed, run)
    local_ids = in_process_prompts(prompts, config.in_process_limit)
    # In-process runs and peers measure against the services on a subset, to bound the time.
    plan = [[t for t in tasks if t.path == SERVICES or p.id in local_ids] for p in prompts]
    with tqdm(total=sum(map(len, plan)), desc="bench", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        for i, (prompt, prompt_tasks) in enumerate(zip(prompts, plan)):
            shift = i % len(prompt_tasks)
            done: list[RunRecord] = []
            for task in [*prompt_tasks[shift:], *prompt_tasks[:shift]]:
                bar.set_postfix_str(f"{prompt.id} {task.system}")
                try:
                    done.append(task.run(prompt, config.max_new_tokens, config.seed + i))
                except (grpc.RpcError, BenchError, NotServable) as err:
                    reason = err.details() if isinstance(err, grpc.RpcError) else str(err)
                    log.error("%s on %s failed: %s", task.system, prompt.id, reason)
                    run.errors.append(RunError(prompt.id, task.system, reason))
                bar.update()
            order = {t.system: j for j, t in enumerate(tasks)}
            run.records.extend(sorted(done, key=lambda r: order[r.system]))
            if config.greedy:
                run.checks.extend(check_prompt(prompt, done, models))
            on_prompt(run)
    return run


def registered_strategies() -> tuple[str, ...]:
    """Every strategy in the registry, `ar` first (strategies added later are picked up)."""
    return (REFERENCE, *[s for s in STRATEGIES if s != REFERENCE])
