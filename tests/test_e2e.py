"""End to end on the real packaged models (prepared by `specd models prepare --all`, which the
README's test command runs first): greedy `sd`, `cascade` (target <- 0.5B <- max-gram) and
`staged` (tree drafts) through the services equal the target's own greedy `generate`; so do
`slem`, `tli` and `slrs` with the drafters of other vocabularies (SmolLM2-135M, Gemma-3-270M).

fp32 arithmetic of a pass over several tokens can differ in the last bits from a pass over
one, so the two may part at a near-tie. A divergence is accepted only where the gap between
the target's top two logits at that position is below 1e-3; anywhere else it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from client import ServiceStack, generate
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.config import default_home
from services.models import ModelNotFound, resolve

pytestmark = pytest.mark.e2e

TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFTER = "qwen2.5-coder-0.5b-instruct"
FOREIGN = {"smollm2": "smollm2-135m-instruct", "gemma": "gemma-3-270m"}  # drafters of other vocabularies
NEAR_TIE = 1e-3
NEW_TOKENS = 32
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences what a hash map is.",
    "Écris une fonction JavaScript qui inverse une chaîne de caractères.",
]


def _model(name: str) -> Path:
    home = Path(os.environ.get("SPECD_HOME") or default_home())
    try:
        return resolve(name, home)
    except ModelNotFound as err:
        pytest.fail(f"{err} (the README's test command prepares the models first)")


@pytest.fixture(scope="module")
def target():
    path = _model(TARGET)
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    """orchestrator: the 0.5B drafter; orchestrator2 and 3: SmolLM2 and Gemma (drafter2, 3)."""
    foreign = {name: _model(model) for name, model in FOREIGN.items()}

    def extra_env(s: ServiceStack, name: str) -> dict[str, str]:
        if name in ("drafter2", "drafter3"):
            model = foreign["smollm2" if name == "drafter2" else "gemma"]
            return {"SPECD_MODEL": str(model), "SPECD_TARGET_TOKENIZER": str(s.target_dir)}
        if name in ("orchestrator2", "orchestrator3"):
            return {"SPECD_DRAFTER": s.address("drafter" + name[-1])}
        return {}

    s = ServiceStack(
        _model(TARGET), _model(DRAFTER), redis_server.url, tmp_path_factory.mktemp("e2e"), dtype="float32", threads=2,
        services=("verifier", "drafter", "drafter2", "drafter3", "orchestrator", "orchestrator2", "orchestrator3"),
        extra_env=extra_env,
    )  # fmt: skip
    s.up()
    yield s
    s.down()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@torch.inference_mode()
def top2_gap(model, ids: list[int]) -> float:
    logits = model(torch.tensor([ids])).logits[0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


@pytest.fixture(scope="module")
def reference(target):
    """The target's own greedy continuation of a chat prompt, computed once per prompt."""
    tokenizer, model = target
    found: dict[str, tuple[list[int], list[int]]] = {}

    def continuation(prompt: str) -> tuple[list[int], list[int]]:
        if prompt not in found:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            prompt_ids = tokenizer(rendered, add_special_tokens=False).input_ids
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            found[prompt] = prompt_ids, out[0, len(prompt_ids) :].tolist()
        return found[prompt]

    return continuation


CASES = [
    *((strategy, "orchestrator", prompt) for strategy in ("sd", "cascade", "staged") for prompt in PROMPTS),
    *((strategy, "orchestrator2", prompt) for strategy in ("slem", "tli", "slrs") for prompt in PROMPTS),  # SmolLM2
    *((strategy, "orchestrator3", PROMPTS[0]) for strategy in ("slem", "tli", "slrs")),  # Gemma 3
]


@pytest.mark.parametrize("strategy, orchestrator, prompt", CASES)
def test_greedy_strategy_equals_the_targets_own_generate(stack, target, reference, strategy, orchestrator, prompt):
    tokenizer, model = target
    prompt_ids, expected = reference(prompt)
    address = stack.address(orchestrator)
    result = generate(address, messages=[("user", prompt)], strategy=strategy, max_new_tokens=NEW_TOKENS)
    assert result.stats.prompt_tokens == len(prompt_ids)
    assert result.stats.drafted > 0

    at = first_divergence(result.token_ids, expected)
    if at is None:
        assert result.token_ids == expected
        return
    gap = top2_gap(model, prompt_ids + expected[:at])
    assert gap < NEAR_TIE, (
        f"{strategy} parted from the target at new token {at} where the top-2 logit gap is {gap:.2e} (not a near-tie):\n"
        f"{strategy}: {tokenizer.decode(result.token_ids)!r}\ntarget: {tokenizer.decode(expected)!r}"
    )
