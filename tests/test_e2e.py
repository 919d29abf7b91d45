"""End to end on the real packaged models (prepared by `specd models prepare --all`, which the
README's test command runs first), on two deployments, one after the other:

- default: what `specd up` runs on a CPU: the verifier on torch in int8, the drafters on
  llama.cpp. Every row of an int8 pass is bitwise what a one-token pass gives
  (services/int8.py), so every strategy must give exactly the int8 model's own greedy
  `generate`, token for token, with no near-tie allowance;
- fp32: the verifier and drafters on torch in fp32 (oneDNN linears), against the fp32 model's
  own greedy `generate`. fp32 arithmetic of a pass over several tokens can differ in the last
  bits from a pass over one, so a divergence is accepted where the top-2 logit gap at that
  position is below 1e-3 (services.runtime.NEAR_TIE), and fails anywhere else.

Greedy `ar`, `lookup`, `sd`, `cascade` (target <- 0.5B <- max-gram), `staged` (tree drafts)
through the services; `slem`, `tli` and `slrs` with the drafters of other vocabularies
(SmolLM2-135M; Gemma-3-270M on the default deployment). fp32 runs one prompt per strategy:
the default deployment covers all three, and `make test` has to stay inside CI's time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from client import ServiceStack, generate

from services.config import default_home
from services.models import ModelNotFound, resolve
from services.runtime import NEAR_TIE

pytestmark = pytest.mark.e2e

TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFTER = "qwen2.5-coder-0.5b-instruct"
FOREIGN = {"smollm2": "smollm2-135m-instruct", "gemma": "gemma-3-270m"}  # drafters of other vocabularies
NEW_TOKENS = 32
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences what a hash map is.",
    "Écris une fonction JavaScript qui inverse une chaîne de caractères.",
]
# deployment -> (SPECD_DTYPE, SPECD_RUNTIME of the drafters, near-tie bound)
DEPLOYMENTS = {"default": ("auto", "auto", NEAR_TIE["int8"]), "fp32": ("float32", "torch", NEAR_TIE["torch"])}
FULL = "default"  # the deployment that runs every prompt, and the Gemma drafter


def _model(name: str) -> Path:
    home = Path(os.environ.get("SPECD_HOME") or default_home())
    try:
        return resolve(name, home)
    except ModelNotFound as err:
        pytest.fail(f"{err} (the README's test command prepares the models first)")


@pytest.fixture(scope="module", params=list(DEPLOYMENTS))
def deployment(request, redis_server, tmp_path_factory):
    """One stack (orchestrator: the 0.5B drafter; orchestrator2 and 3: SmolLM2 and Gemma) and
    the target as the verifier runs it, in this process, for the reference. What the services
    load is made first, here (int8 weights, fp32 safetensors), so that no service spends its
    start-up deadline converting."""
    from services.models import torch_folder
    from services.torch_runtime import load_torch

    dtype, drafter_runtime, near_tie = DEPLOYMENTS[request.param]
    foreign = {name: _model(model) for name, model in FOREIGN.items() if request.param == FULL or name != "gemma"}
    if dtype != "auto":
        for folder in (_model(TARGET), _model(DRAFTER), *foreign.values()):
            torch_folder(folder)
    target = load_torch(
        _model(TARGET), dtype="int8" if dtype == "auto" else dtype, device="cpu", max_sessions=2, threads=2
    )

    def extra_env(s: ServiceStack, name: str) -> dict[str, str]:
        if name in ("drafter2", "drafter3"):
            model = foreign["smollm2" if name == "drafter2" else "gemma"]
            return {"SPECD_MODEL": str(model), "SPECD_TARGET_TOKENIZER": str(s.target_dir)}
        if name in ("orchestrator2", "orchestrator3"):
            return {"SPECD_DRAFTER": s.address("drafter" + name[-1])}
        return {}

    s = ServiceStack(
        _model(TARGET), _model(DRAFTER), redis_server.url, tmp_path_factory.mktemp(f"e2e-{request.param}"),
        dtype=dtype, threads=2, drafter_runtime=drafter_runtime,
        services=("verifier", "drafter", "drafter2", "orchestrator", "orchestrator2")
        + (("drafter3", "orchestrator3") if "gemma" in foreign else ()),
        extra_env=extra_env,
    )  # fmt: skip
    s.up()
    s.deployment = request.param
    yield s, target, near_tie, {}
    s.down()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def reference(deployment, prompt: str) -> tuple[list[int], list[int]]:
    """The target's own greedy `generate` of a chat prompt, on the verifier's weights and
    kernels (computed once per prompt and deployment)."""
    _, target, _, found = deployment
    if prompt not in found:
        tokenizer = target.tokenizer
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(rendered, add_special_tokens=False).input_ids
        with torch.inference_mode():
            out = target.model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        found[prompt] = prompt_ids, out[0, len(prompt_ids) :].tolist()
    return found[prompt]


CASES = [
    *((strategy, "orchestrator", prompt) for strategy in ("ar", "lookup", "sd", "cascade", "staged") for prompt in PROMPTS),
    *((strategy, "orchestrator2", prompt) for strategy in ("slem", "tli", "slrs") for prompt in PROMPTS),  # SmolLM2
    *((strategy, "orchestrator3", PROMPTS[0]) for strategy in ("slem", "tli", "slrs")),  # Gemma 3
]


@pytest.mark.parametrize("strategy, orchestrator, prompt", CASES)
def test_greedy_strategy_equals_the_targets_own_generate(deployment, strategy, orchestrator, prompt):
    stack, target, near_tie, _ = deployment
    if stack.deployment != FULL and (prompt != PROMPTS[0] or orchestrator == "orchestrator3"):
        pytest.skip(f"{stack.deployment}: the first prompt only, no Gemma drafter (the {FULL} deployment runs them)")
    prompt_ids, expected = reference(deployment, prompt)
    result = generate(stack.address(orchestrator), messages=[("user", prompt)], strategy=strategy, max_new_tokens=NEW_TOKENS)
    assert result.stats.prompt_tokens == len(prompt_ids)
    # lookup drafts where the answer repeats itself, which a short answer may never do
    assert (result.stats.drafted > 0) == (strategy != "ar") or strategy == "lookup"

    at = first_divergence(result.token_ids, expected)
    if at is None:
        assert result.token_ids == expected
        return
    top = torch.topk(target.logits("gap", prompt_ids + expected[:at], 1)[0], 2).values
    target.release("gap")
    gap = float(top[0] - top[1])
    decode = target.tokenizer.decode
    assert gap < near_tie, (
        f"{strategy} parted from the target at new token {at} where the top-2 logit gap is {gap:.2e} "
        f"(the near-tie bound of this runtime is {near_tie}):\n"
        f"{strategy}: {decode(result.token_ids)!r}\ntarget: {decode(expected)!r}"
    )
