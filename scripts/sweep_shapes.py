"""Measures cascade k-matrices and staged tree shapes against `ar` and `sd` on the packaged
models, in this process (the orchestrator's Engine on local models, no services), so the
built-in defaults (orchestrator/strategies.py: DEFAULT_K_MATRICES, DEFAULT_TREE) rest on
figures anyone can reproduce:

    .venv/bin/python scripts/sweep_shapes.py --limit 2 --max-new-tokens 64

Configurations run interleaved prompt by prompt (the order rotates), greedy, and every
output is checked against `ar`'s. Prints one Markdown table: tokens/s summed over prompts,
speedup over `ar`, τ (tokens per target pass), acceptance, drafter time share.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

from drafter_svc.core import DrafterCore
from orchestrator.generate import Engine, GenerationRequest, Limits, Stats, TextChunk
from orchestrator.store import ChatMessage
from orchestrator.strategies import Backends
from services.config import ModelServiceConfig, default_home
from services.maxgram import MaxGramDrafter
from services.models import resolve
from services.tree import TreeShape
from specd.bench.prompts import load_prompts
from specd.bench.runner import MemoryStore, load_local
from verifier_svc.core import VerifierCore

# `sd k=4` is the cascade 4,0;0,0 and the staged chain 1,1,1,1:4, so neither is repeated.
K_MATRICES = {
    "cascade 4,2;0,0 (0.5B, then max-gram)": ((4, 2), (0, 0)),
    "cascade 4,2;0,3 (default)": ((4, 2), (0, 3)),
    "cascade 3,3;0,2": ((3, 3), (0, 2)),
}
TREES = {
    "staged 2,2,1,1:6": TreeShape((2, 2, 1, 1), 6),
    "staged 3,2,1,1,1:8 (default)": TreeShape((3, 2, 1, 1, 1), 8),
    "staged 4,2,1,1,1:10": TreeShape((4, 2, 1, 1, 1), 10),
}


@dataclass
class Totals:
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    def add(self, stats: Stats, wall: float) -> None:
        self.tokens += stats.new_tokens
        self.seconds += wall
        self.forwards += stats.target_forwards
        self.drafted += stats.drafted
        self.accepted += stats.accepted
        self.draft_seconds += stats.draft_seconds


async def run(engine: Engine, request: GenerationRequest) -> tuple[list[int], Stats, float]:
    ids: list[int] = []
    stats = None
    started = time.perf_counter()
    async for event in engine.generate(request):
        if isinstance(event, Stats):
            stats = event
        elif isinstance(event, TextChunk):
            ids.extend(event.token_ids)
    wall = time.perf_counter() - started
    await engine.delete_session(stats.session_id)
    return ids, stats, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=2, help="prompts per category (humaneval, mt-bench, gsm8k)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verifier-runtime", default="auto", help="auto (torch int8 on CPU), llama or torch")
    parser.add_argument("--drafter-runtime", default="auto", help="auto (llama on CPU), llama or torch")
    args = parser.parse_args()
    home = default_home()
    target = resolve("qwen2.5-coder-1.5b-instruct", home)
    base = ModelServiceConfig(model=str(target), listen="", home=home, threads=args.threads)
    local = load_local(
        target, resolve("qwen2.5-coder-0.5b-instruct", home), base=base, verifier_runtime=args.verifier_runtime,
        drafter_runtime=args.drafter_runtime, vocab_cache=home / "vocab",
    )  # fmt: skip
    maxgram = MaxGramDrafter()
    drafter = DrafterCore(local.drafter)
    engine = Engine(
        tokenizer=local.tokenizer,
        store=MemoryStore(),
        backends=Backends(VerifierCore(local.target), drafter, cascade=(drafter, maxgram), maxgram=maxgram),
        limits=Limits(default_strategy="ar", default_k=4, default_max_new_tokens=args.max_new_tokens,
                      max_new_tokens_limit=4096),
    )  # fmt: skip
    configs: dict[str, dict] = {"ar": {"strategy": "ar"}, "sd k=4": {"strategy": "sd", "k": 4}}
    configs |= {name: {"strategy": "cascade", "k_matrix": km} for name, km in K_MATRICES.items()}
    configs |= {name: {"strategy": "staged", "tree": shape} for name, shape in TREES.items()}
    totals = {name: Totals() for name in configs}
    prompts = load_prompts(home=home, categories=["humaneval", "mt-bench", "gsm8k"], limit=args.limit, prompt_file=None)
    names = list(configs)
    for i, prompt in enumerate(prompts):
        order = names[i % len(names) :] + names[: i % len(names)]
        reference: list[int] | None = None
        outputs = {}
        for name in order:
            request = GenerationRequest(
                messages=(ChatMessage("user", prompt.text),), max_new_tokens=args.max_new_tokens, **configs[name]
            )
            ids, stats, wall = asyncio.run(run(engine, request))
            for host in (local.target, local.drafter):
                host.release(stats.session_id)
            totals[name].add(stats, wall)
            outputs[name] = ids
            print(f"{prompt.id:>20} {name:<40} {stats.new_tokens / wall:5.2f} tok/s", flush=True)
        reference = outputs["ar"]
        for name, ids in outputs.items():
            if ids != reference:
                totals[name].mismatches.append(prompt.id)
    ar = totals["ar"]
    print(f"\n{len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy\n")
    print("| configuration | tok/s | speedup vs ar | τ | acceptance | draft time share | differs from ar |")
    print("|---|---|---|---|---|---|---|")
    for name, t in totals.items():
        tau = t.tokens / t.forwards if t.forwards else 0
        acc = f"{t.accepted / t.drafted:.0%}" if t.drafted else "—"
        share = f"{t.draft_seconds / t.seconds:.0%}" if t.drafted else "—"
        speed = (t.tokens / t.seconds) / (ar.tokens / ar.seconds)
        print(f"| {name} | {t.tokens / t.seconds:.2f} | {speed:.2f}× | {tau:.2f} | {acc} | {share} | "
              f"{', '.join(t.mismatches) or 'no'} |")  # fmt: skip


if __name__ == "__main__":
    main()
