"""The bench's runs: each prompt through every system, interleaved prompt by prompt.

Systems (names as they appear in the table and in results.json):

| system        | what runs                                                                  |
|---------------|----------------------------------------------------------------------------|
| `<strategy>`  | the strategy through the services: Generator gRPC -> orchestrator -> drafter/verifier, Redis |
| `<strategy>@local` | the same Engine and strategy code in this process on the drafter's and verifier's cores (drafter_svc/core.py, verifier_svc/core.py) over the same runtimes, with an in-memory session store: no gRPC, no Redis |
| `hf-generate` | transformers' own `generate` of the target (when the verifier runs on torch: the same weights and kernels) |
| `hf-assisted` | transformers' assisted generation, `assistant_model=` the drafter (its defaults) |
| `llama-greedy` | llama-cpp-python's own greedy generation of the target's GGUF: what a CPU user runs without specd |
| `llama-lookup` | llama-cpp-python's prompt-lookup speculative decoding (`LlamaPromptLookupDecoding`) of the same GGUF |

For each prompt every system runs once, in an order rotated by one per prompt, so that
machine noise (another process waking up, thermal drift) hits all systems alike and no
system always runs right after a particular other one.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import torch

from drafter_svc.core import DrafterCore
from drafter_svc.foreign import Translation
from orchestrator.generate import Engine, GenerationRequest, Limits, NotServable, Stats, TextChunk
from orchestrator.store import ChatMessage, Session
from orchestrator.strategies import STRATEGIES, Backends
from orchestrator.text import chat_ids
from services.config import ModelServiceConfig
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.roles import Stopwatch
from services.runtime import Runtime, gguf_file, load_runtime, near_tie
from services.server import channel_options
from services.torch_runtime import TorchRuntime
from services.worker import Worker
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
from specd.bench.netem import DelayProxies
from specd.bench.prompts import Prompt
from verifier_svc.core import VerifierCore

log = logging.getLogger(__name__)

LOCAL_SUFFIX = "@local"
HF_PEERS = ("hf-generate", "hf-assisted")
LLAMA_PEERS = ("llama-greedy", "llama-lookup")
PEERS = HF_PEERS + LLAMA_PEERS
LOOKUP_TOKENS = 10  # LlamaPromptLookupDecoding's default draft length
LLAMA_PEER_CONTEXT = 4096  # the peers' n_ctx: prompt and answer fit (llama-cpp-python's default is 512)
WARMUP_TOKENS = 2  # enough to load every code path once (prefill, a round, a commit)


class BenchError(RuntimeError):
    """The bench cannot go on; the message says why."""


class System(NamedTuple):
    """A bench system of the services: a strategy and the options its name gives."""

    strategy: str
    k: int | None = None  # a fixed draft length (`:kN`); None: the bench's -k (0: adaptive)
    head_only: bool = False  # `:head`: a trained head's beams alone (redrafter, parallel)


SYSTEM_SYNTAX = "STRATEGY[:kN][:head], e.g. sd:k4 or redrafter:head"


def parse_system(name: str) -> System:
    """A bench system's name: a strategy, with its draft length fixed by `:kN` ("sd:k4"),
    and for a trained head's strategies `:head` to draft with the head alone, without the
    context's continuation beside it ("redrafter:head")."""
    strategy, *options = name.split(":")
    k, head_only = None, False
    for option in options:
        if option == "head" and not head_only:
            head_only = True
        elif option.startswith("k") and option[1:].isdigit() and int(option[1:]) >= 1 and k is None:
            k = int(option[1:])
        else:
            raise BenchError(f"system {name!r}: write a system as {SYSTEM_SYNTAX} (a fixed draft length N >= 1)")
    return System(strategy, k, head_only)


def rtt_system(system: str, rtt_ms: float) -> str:
    """The name of a system measured behind the bench's delay proxies."""
    return system if not rtt_ms else f"{system}@rtt{rtt_ms:g}ms"


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
    rtts_ms: tuple[float, ...] = (0.0,)  # round trips added by the bench's proxies, each its own systems
    pin: bool = False  # the stack's verifier and drafter on a core each, one thread each

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

    def request(self, prompt: Prompt, system: str, max_new_tokens: int, seed: int) -> pb.GenerateRequest:
        c = self.config
        strategy, k, head_only = parse_system(system)
        request = pb.GenerateRequest(
            strategy=strategy, max_new_tokens=max_new_tokens, temperature=c.temperature, top_k=c.top_k,
            top_p=c.top_p, seed=seed, options=pb.StrategyOptions(k=c.k if k is None else k, head_only=head_only),
        )  # fmt: skip
        request.chat.messages.append(pb.ChatMessage(role="user", content=prompt.text))
        return request

    def run(self, prompt: Prompt, system: str, max_new_tokens: int, seed: int, rtt_ms: float = 0.0) -> RunRecord:
        request = self.request(prompt, system, max_new_tokens, seed)
        strategy = request.strategy
        ids: list[int] = []
        stats = None
        watch = Stopwatch()
        for reply in self.stub.Generate(request, timeout=self.config.timeout_seconds):
            if reply.HasField("delta"):
                ids.extend(reply.delta.token_ids)
            elif reply.HasField("stats"):
                stats = reply.stats
        wall = watch.seconds
        if stats is None:
            raise BenchError(f"{strategy} on {prompt.id}: the stream ended without statistics")
        # Not part of the measurement; keeps the bench from filling Redis with sessions.
        self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=stats.session_id), timeout=30)
        return RunRecord(
            prompt_id=prompt.id, category=prompt.category, system=rtt_system(system, rtt_ms), path=SERVICES, strategy=strategy,
            prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens, wall_seconds=wall, token_ids=tuple(ids),
            finish_reason=stats.finish_reason, engine_wall_seconds=stats.wall_seconds,
            target_forwards=stats.target_forwards, drafted=stats.drafted, accepted=stats.accepted,
            acceptance_by_position=tuple(stats.acceptance_by_position), draft_seconds=stats.draft_seconds,
            verify_seconds=stats.verify_seconds, network_seconds=stats.network_seconds, round_trips=stats.round_trips,
            redis_seconds=stats.redis_seconds, bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received,
            rtt_ms=rtt_ms, draft_asked=round(stats.mean_draft_length * stats.target_forwards),
            speculative_drafts=stats.speculative_drafts, speculative_ready=stats.speculative_ready,
            speculative_verified=stats.speculative_verified, speculative_plain=stats.speculative_plain,
            speculative_continued=stats.speculative_continued, overlapped_round_trips=stats.overlapped_round_trips,
            language=stats.language, drafter_pool=stats.drafter_pool,
        )  # fmt: skip


# -- in process ---------------------------------------------------------------------------------


class MemoryStore:
    """SessionStore's methods on a dict: the in-process path measures no Redis at all. A
    turn works on a copy of what was stored (as it does on what it read from Redis), so the
    stored session is the undo of a turn until the turn begins."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.undo: dict[str, Session | None] = {}

    async def load(self, session_id: str) -> Session | None:
        return copy.deepcopy(self.sessions.get(session_id))

    async def client_of(self, session_id: str) -> str | None:
        session = self.sessions.get(session_id)
        return None if session is None else session.client

    async def begin(self, session: Session, owner: str) -> None:
        self.undo[session.id] = self.sessions.get(session.id)
        session.owner = owner
        self.sessions[session.id] = session

    async def commit(self, session: Session, new_tokens: list[int]) -> None:
        self.sessions[session.id] = session

    async def finish(self, session: Session) -> None:
        session.turn.done, session.owner = True, ""
        self.undo.pop(session.id, None)

    async def release(self, session: Session) -> None:
        self.sessions[session.id].lease = 0.0

    async def take_over(self, session: Session, owner: str) -> None:
        session.owner = self.sessions[session.id].owner = owner

    async def rollback(self, session_id: str) -> None:
        previous = self.undo.pop(session_id, None)
        if previous is None:
            self.sessions.pop(session_id, None)
        else:
            self.sessions[session_id] = previous

    async def delete(self, session_id: str) -> bool:
        self.undo.pop(session_id, None)
        return self.sessions.pop(session_id, None) is not None


@dataclass(frozen=True)
class LocalModels:
    """The target and drafter loaded in the bench process on the runtimes the services use,
    shared by the in-process runs, the peers and the near-tie check.

    Every model of the bench process - these two, and the peers' - is loaded and run on one
    thread, `worker`, as a model service does (services/worker.py): torch and llama.cpp keep
    an OpenMP thread team per calling thread, and once a library has more teams than there
    are cores, its threads stop spinning between parallel regions and every pass pays for
    waking them (measured: llama-cpp-python's greedy decoding of the target 30% slower after
    the in-process drafter had run on a thread of its own). A peer measured that way would
    look slower than it is for a user."""

    target: Runtime
    drafter: Runtime | None
    tokenizer: object  # the target's tokenizer
    target_dir: Path
    translation: Translation | None = None  # set when the drafter's vocabulary differs from the target's
    worker: Worker = field(default_factory=lambda: Worker("bench-models"))

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt as the orchestrator tokenizes a chat turn (generate.py, _turn_context)."""
        return chat_ids(self.tokenizer, [("user", prompt.text)])


def service_config(base: ModelServiceConfig, model: Path, runtime: str) -> ModelServiceConfig:
    """What a model service started by the bench reads, for one model (4 cached sessions)."""
    return dataclasses.replace(base, model=str(model), runtime=runtime, max_sessions=4)


def load_local(
    target_dir: Path,
    drafter_dir: Path | None,
    *,
    base: ModelServiceConfig,
    verifier_runtime: str,
    drafter_runtime: str,
    vocab_cache: Path,
) -> LocalModels:
    """Loads both models the way the services do (the same runtime choice, dtype, threads and
    kernels); a drafter of another vocabulary gets its translation (maps cached in vocab_cache)."""
    from transformers import AutoTokenizer

    worker = Worker("bench-models")
    drafter = (
        None
        if drafter_dir is None
        else worker.call(load_runtime, service_config(base, drafter_dir, drafter_runtime), "drafter")
    )
    target = worker.call(load_runtime, service_config(base, target_dir, verifier_runtime), "verifier")
    translation = None
    if drafter is not None and drafter.info.tokenizer_fingerprint != target.info.tokenizer_fingerprint:
        translation = Translation.build(
            drafter.tokenizer, target.tokenizer, drafter.info.vocab_size, target.info.vocab_size, vocab_cache
        )
    return LocalModels(target, drafter, AutoTokenizer.from_pretrained(target_dir), target_dir, translation, worker)


class InProcessRunner:
    """The orchestrator's Engine in this process, on the model services' cores and a MemoryStore."""

    def __init__(self, models: LocalModels, config: BenchConfig, q_top: int = 32) -> None:
        self.models = models
        self.config = config
        self.verifier = VerifierCore(models.target, max_sessions=4, worker=models.worker)
        self.drafter = (
            None
            if models.drafter is None
            else DrafterCore(models.drafter, q_top=q_top, translation=models.translation, worker=models.worker)
        )
        self.engine = Engine(
            tokenizer=models.tokenizer,
            store=MemoryStore(),
            backends=Backends(verifier=self.verifier, drafter=self.drafter),
            limits=Limits(
                default_strategy=REFERENCE, default_k=config.k,
                default_max_new_tokens=config.max_new_tokens, max_new_tokens_limit=1 << 20,
            ),
        )  # fmt: skip

    def run(self, prompt: Prompt, system: str, max_new_tokens: int, seed: int) -> RunRecord:
        c = self.config
        strategy, k, head_only = parse_system(system)
        request = GenerationRequest(
            messages=(ChatMessage("user", prompt.text),), max_new_tokens=max_new_tokens,
            # The services receive the temperature as a proto float32; round it the same way
            # so a seeded sampled run draws the same tokens in both paths.
            temperature=float(np.float32(c.temperature)), top_k=c.top_k, top_p=float(np.float32(c.top_p)),
            seed=seed, strategy=strategy, k=c.k if k is None else k, head_only=head_only,
        )  # fmt: skip
        ids, stats, wall = asyncio.run(self._generate(request))
        return RunRecord(
            prompt_id=prompt.id, category=prompt.category, system=system + LOCAL_SUFFIX, path=IN_PROCESS,
            strategy=strategy, prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens, wall_seconds=wall,
            token_ids=tuple(ids), finish_reason=stats.finish_reason, engine_wall_seconds=stats.wall_seconds,
            target_forwards=stats.target_forwards, drafted=stats.drafted, accepted=stats.accepted,
            acceptance_by_position=tuple(stats.acceptance_by_position),
            drafted_by_position=tuple(stats.drafted_by_position), draft_seconds=stats.draft_seconds,
            verify_seconds=stats.verify_seconds, network_seconds=stats.network_seconds, round_trips=stats.round_trips,
            redis_seconds=stats.redis_seconds, bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received,
            draft_asked=stats.draft_asked, speculative_drafts=stats.speculative_drafts,
            speculative_ready=stats.speculative_ready, speculative_verified=stats.speculative_verified,
            speculative_plain=stats.speculative_plain, speculative_continued=stats.speculative_continued,
            overlapped_round_trips=stats.overlapped_round_trips, language=stats.language,
            drafter_pool=stats.drafter_pool,
        )  # fmt: skip

    async def _generate(self, request: GenerationRequest) -> tuple[list[int], Stats, float]:
        ids: list[int] = []
        stats = None
        watch = Stopwatch()
        async for event in self.engine.generate(request):
            if isinstance(event, Stats):
                stats = event
            elif isinstance(event, TextChunk):
                ids.extend(event.token_ids)
        wall = watch.seconds
        if stats is None:
            raise BenchError("the in-process Engine ended a turn without its statistics")
        await self.engine.delete_session(stats.session_id)
        for core in (self.verifier, self.drafter):
            if core is not None:
                await core.release(stats.session_id)
        return ids, stats, wall


# -- peers: what a user would run instead ------------------------------------------------------


def _finish(ids: list[int], eos: Sequence[int]) -> str:
    return "stop" if ids and ids[-1] in eos else "length"


class PeerRunner:
    """transformers' `generate` of the target, plain and assisted by the drafter, on the bench
    process's torch models: with the verifier on torch they are the very model objects of the
    in-process path (the same kernels: the comparison is of decoding loops and algorithms).
    A drafter on another runtime is loaded again on torch, with the target's dtype, for
    assisted generation."""

    def __init__(self, models: LocalModels, config: BenchConfig, assistant: TorchRuntime | None) -> None:
        if not isinstance(models.target, TorchRuntime):
            raise BenchError("hf-generate needs the target on the torch runtime")
        self.models = models
        self.config = config
        self.target = models.target
        self.assistant = assistant

    @property
    def names(self) -> tuple[str, ...]:
        return HF_PEERS if self.assistant is not None else HF_PEERS[:1]

    def sampling_kwargs(self) -> dict[str, object]:
        """The same decoding as specd's, whatever the model folder's generation_config says:
        instruct models often ship sampling defaults and a repetition penalty, which specd
        does not apply, so both are overridden here."""
        c = self.config
        plain = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
        if c.greedy:
            return {"do_sample": False, **plain}
        return {"do_sample": True, "temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p, **plain}

    def run(self, prompt: Prompt, peer: str, max_new_tokens: int, seed: int) -> RunRecord:
        if peer not in self.names:
            raise BenchError(f"unknown peer {peer!r}")
        return self.models.worker.call(self._run, prompt, peer, max_new_tokens, seed)

    @torch.inference_mode()
    def _run(self, prompt: Prompt, peer: str, max_new_tokens: int, seed: int) -> RunRecord:
        info = self.target.info
        prompt_ids = self.models.prompt_ids(prompt)
        input_ids = torch.tensor([prompt_ids])  # (1, T)
        extra: dict[str, object] = {}
        if peer == "hf-assisted":
            extra["assistant_model"] = self.assistant.model
            if self.models.translation is not None:  # transformers' universal assisted generation
                extra.update(tokenizer=self.target.tokenizer, assistant_tokenizer=self.assistant.tokenizer)
        torch.manual_seed(seed)  # transformers samples from the global generator
        watch = Stopwatch()
        out = self.target.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            eos_token_id=list(info.eos_token_ids), pad_token_id=info.eos_token_ids[0],
            **self.sampling_kwargs(), **extra,
        )  # fmt: skip
        wall = watch.seconds
        ids = out[0, len(prompt_ids) :].tolist()
        return RunRecord(
            prompt_id=prompt.id, category=prompt.category, system=peer, path=PEER, strategy=peer,
            prompt_tokens=len(prompt_ids), new_tokens=len(ids), wall_seconds=wall, token_ids=tuple(ids),
            finish_reason=_finish(ids, info.eos_token_ids),
        )  # fmt: skip


class LlamaPeerRunner:
    """llama-cpp-python's own generation of the target's GGUF, as a CPU user runs it: greedy,
    and with its prompt-lookup speculative decoding. Same prompts and threads as the services;
    otherwise llama-cpp-python's defaults (one sequence, n_batch 512), with room for the
    longest prompt and answer. Prompt lookup needs every position's logits (logits_all), which
    plain greedy decoding does not pay for: each gets its own Llama."""

    names = LLAMA_PEERS

    def __init__(self, models: LocalModels, config: BenchConfig, threads: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        gguf = gguf_file(models.target_dir)
        if gguf is None:
            raise BenchError(f"{models.target_dir} holds no GGUF for llama-cpp-python")
        if not config.greedy:
            raise BenchError("the llama-cpp-python peers run greedy only (their sampling is not specd's)")
        self.models = models
        self.eos = models.target.info.eos_token_ids
        threads = threads or os.cpu_count() or 1  # llama-cpp-python's own default is half the cores
        common = dict(
            model_path=str(gguf), n_ctx=min(LLAMA_PEER_CONTEXT, models.target.info.max_context), n_threads=threads,
            n_threads_batch=threads, verbose=False,
        )  # fmt: skip
        lookup = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS)
        self.llamas = {
            "llama-greedy": models.worker.call(lambda: Llama(**common)),
            "llama-lookup": models.worker.call(lambda: Llama(**common, draft_model=lookup)),
        }

    def run(self, prompt: Prompt, peer: str, max_new_tokens: int, seed: int) -> RunRecord:
        if peer not in self.names:
            raise BenchError(f"unknown peer {peer!r}")
        return self.models.worker.call(self._run, prompt, peer, max_new_tokens)

    def _run(self, prompt: Prompt, peer: str, max_new_tokens: int) -> RunRecord:
        llama = self.llamas[peer]
        prompt_ids = self.models.prompt_ids(prompt)
        llama.reset()
        ids: list[int] = []
        watch = Stopwatch()
        for token in llama.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            ids.append(int(token))
            if token in self.eos or len(ids) >= max_new_tokens:
                break
        wall = watch.seconds
        return RunRecord(
            prompt_id=prompt.id, category=prompt.category, system=peer, path=PEER, strategy=peer,
            prompt_tokens=len(prompt_ids), new_tokens=len(ids), wall_seconds=wall, token_ids=tuple(ids),
            finish_reason=_finish(ids, self.eos),
        )  # fmt: skip


def load_peers(
    models: LocalModels, config: BenchConfig, base: ModelServiceConfig, drafter_dir: Path | None
) -> list[PeerRunner | LlamaPeerRunner]:
    """The peers this deployment can be compared with: llama-cpp-python's on a GGUF target
    (greedy runs), transformers' on a torch target (assisted generation with the drafter on
    torch, loaded again on it when the drafter service runs on llama)."""
    peers: list[PeerRunner | LlamaPeerRunner] = []
    if gguf_file(models.target_dir) is not None and config.greedy:
        peers.append(LlamaPeerRunner(models, config, base.threads))
    if isinstance(models.target, TorchRuntime):
        assistant = models.drafter if isinstance(models.drafter, TorchRuntime) else None
        if assistant is None and drafter_dir is not None:
            assistant = models.worker.call(load_runtime, service_config(base, drafter_dir, "torch"), "drafter")
        peers.append(PeerRunner(models, config, assistant))
    return peers


# -- the lossless check --------------------------------------------------------------------------


def top2_gap(target: Runtime, ids: Sequence[int]) -> float:
    """Gap between the target's two largest logits for the token after `ids` (a fresh pass)."""
    logits = target.logits(GAP_SESSION, list(ids), 1)[0]  # (V,)
    target.release(GAP_SESSION)
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


GAP_SESSION = "bench-near-tie-check"


def other_model_peers(models: LocalModels | None) -> tuple[str, ...]:
    """Peers that run the target on another runtime than the verifier's: another model (the
    GGUF's Q4 weights, or their torch conversion), whose greedy output is not ar's to match."""
    if models is None:
        return ()
    return HF_PEERS if models.target.info.runtime == "llama" else LLAMA_PEERS


def check_prompt(
    prompt: Prompt, records: Sequence[RunRecord], models: LocalModels | None, unchecked: Sequence[str] = ()
) -> list[Check]:
    """Greedy: every system's tokens against `ar`'s, with the near-tie rule of the verifier's
    runtime where they part. `unchecked`: systems of another model (a peer on another runtime)."""
    reference = next((r for r in records if r.system == REFERENCE), None)
    if reference is None:
        return []
    bound = near_tie(models.target.info) if models is not None else None
    checks = []
    for r in records:
        if r is reference or r.system in unchecked:
            continue
        at = first_divergence(r.token_ids, reference.token_ids)
        gap = None
        if at is not None and models is not None:
            ids = models.prompt_ids(prompt) + list(reference.token_ids[:at])
            gap = models.worker.call(top2_gap, models.target, ids)
        check = classify(prompt.id, r.system, at, gap, bound) if bound is not None else classify(prompt.id, r.system, at, gap)
        if check.flagged:
            log.warning("%s on %s: %s at new token %s (top-2 gap %s)", r.system, prompt.id, check.status, at, gap)
        checks.append(check)
    return checks


# -- the loop ----------------------------------------------------------------------------------


def build_tasks(
    config: BenchConfig,
    services: ServicesClient,
    in_process: InProcessRunner | None,
    peers: Sequence[PeerRunner | LlamaPeerRunner] = (),
    proxies: DelayProxies | None = None,
) -> list[Task]:
    """Every system to run: each strategy through the services (at each round trip the
    proxies add, when there are proxies), in-process, and the peers."""

    def through_services(p: Prompt, n: int, seed: int, system: str, rtt_ms: float) -> RunRecord:
        if proxies is not None:
            proxies.set_rtt_ms(rtt_ms)
        return services.run(p, system, n, seed, rtt_ms)

    tasks = [
        Task(rtt_system(s, rtt), SERVICES, parse_system(s).strategy,
             lambda p, n, seed, s=s, rtt=rtt: through_services(p, n, seed, s, rtt))  # fmt: skip
        for rtt in (config.rtts_ms if proxies is not None else (0.0,))
        for s in config.strategies
    ]
    if in_process is not None:
        tasks += [
            Task(s + LOCAL_SUFFIX, IN_PROCESS, parse_system(s).strategy, lambda p, n, seed, s=s: in_process.run(p, s, n, seed))
            for s in config.strategies
        ]
    for runner in peers:
        tasks += [
            Task(name, PEER, name, lambda p, n, seed, name=name, runner=runner: runner.run(p, name, n, seed))
            for name in runner.names
        ]
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
                run.checks.extend(check_prompt(prompt, done, models, other_model_peers(models)))
            on_prompt(run)
    return run


def registered_strategies() -> tuple[str, ...]:
    """Every strategy in the registry, `ar` first (strategies added later are picked up)."""
    return (REFERENCE, *[s for s in STRATEGIES if s != REFERENCE])


def default_systems() -> tuple[str, ...]:
    """What the bench runs when told nothing: every strategy (adaptive where it drafts), and
    `sd` with the fixed draft length it had before adaptive, as the reference adaptive must beat."""
    return (*registered_strategies(), "sd:k4")
