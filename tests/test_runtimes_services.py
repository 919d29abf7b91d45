"""Integration: every strategy through real processes on each verifier runtime, on tiny models.

For each verifier runtime - llama.cpp (the tiny model's F32 GGUF) and torch in int8 - a stack
of real processes (verifier, a drafter of the target's vocabulary and one of another, both on
llama.cpp, two orchestrators, redis) must give, for every strategy, greedy output equal to
`ar` through the same stack; and `ar` itself must equal that runtime's own greedy decoding,
one token at a time, in this process. (The torch fp64 verifier is covered by
tests/test_pipeline.py, test_strategies_services.py and test_foreign.py.)
"""

from __future__ import annotations

import pytest
import torch
from client import ServiceStack, generate

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",  # repeats itself: max-gram has matches
    "The quick brown fox",
]
NEW = 24
SAME_VOCAB = ("lookup", "sd", "cascade", "staged")
OTHER_VOCAB = ("slem", "tli", "slrs")
VERIFIERS = {"llama": ("llama", "float64"), "torch-int8": ("torch", "int8")}  # name -> (SPECD_RUNTIME, SPECD_DTYPE)


@pytest.fixture(scope="module", params=list(VERIFIERS))
def stack(request, tiny_pair, tiny_foreign, redis_server, tmp_path_factory):
    runtime, dtype = VERIFIERS[request.param]

    def extra_env(s: ServiceStack, name: str) -> dict[str, str]:
        if name == "drafter2":
            return {"SPECD_MODEL": str(tiny_foreign), "SPECD_TARGET_TOKENIZER": str(s.target_dir)}
        if name == "orchestrator2":
            return {"SPECD_DRAFTER": s.address("drafter2")}
        return {}

    s = ServiceStack(
        tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, tmp_path_factory.mktemp(f"rt-{request.param}"),
        dtype=dtype, verifier_runtime=runtime, drafter_runtime="llama",
        services=("verifier", "drafter", "drafter2", "orchestrator", "orchestrator2"), extra_env=extra_env,
    )  # fmt: skip
    s.up()
    s.kind_of_verifier = request.param
    yield s
    s.down()


def own_greedy(stack: ServiceStack, prompt_ids: list[int], n: int) -> list[int]:
    """The verifier runtime's own greedy decoding, one token at a time, in this process."""
    from services.llama_runtime import load_llama
    from services.torch_runtime import load_torch

    if stack.kind_of_verifier == "llama":
        runtime = load_llama(stack.target_dir, max_sessions=1, max_draft=4, threads=1, kv_tokens=2048)
    else:
        runtime = load_torch(stack.target_dir, dtype="int8", device="cpu", max_sessions=1, threads=1)
    seq = list(prompt_ids)
    for _ in range(n):
        seq.append(int(torch.argmax(runtime.logits("own", seq, 1)[0])))
    return seq[len(prompt_ids) :]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_strategy_equals_ar_on_this_verifier_runtime(stack, prompt):
    main, foreign = stack.address("orchestrator"), stack.address("orchestrator2")
    ar = generate(main, prompt, strategy="ar", max_new_tokens=NEW)
    assert ar.stats.drafted == 0 and len(ar.token_ids) > 0
    for strategy in SAME_VOCAB:
        result = generate(main, prompt, strategy=strategy, max_new_tokens=NEW)
        assert result.token_ids == ar.token_ids, strategy
        # lookup drafts only where the text repeats itself (the first prompt does at once)
        assert result.stats.drafted > 0 or (strategy == "lookup" and prompt != PROMPTS[0]), strategy
    for strategy in OTHER_VOCAB:
        result = generate(foreign, prompt, strategy=strategy, max_new_tokens=NEW)
        assert result.token_ids == ar.token_ids, strategy


def test_ar_through_the_services_is_the_runtimes_own_greedy_decoding(stack, tiny_pair):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.tokenizer_dir)
    prompt = PROMPTS[1]
    ar = generate(stack.address("orchestrator"), prompt, strategy="ar", max_new_tokens=NEW)
    expected = own_greedy(stack, tokenizer.encode(prompt), len(ar.token_ids))
    assert ar.token_ids == expected


def test_a_sampled_run_replays_on_this_verifier_runtime(stack):
    """Seeded sampling through the same stack gives the same tokens twice, for sd and cascade."""
    main = stack.address("orchestrator")
    for strategy in ("sd", "cascade"):
        runs = [
            generate(main, PROMPTS[1], strategy=strategy, max_new_tokens=NEW, temperature=0.9, seed=7)
            for _ in range(2)
        ]
        assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) > 0, strategy
