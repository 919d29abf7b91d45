"""The test infrastructure itself: tiny models behave as integration tests assume."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest
import redis
import torch
from procs import RedisServer, free_port, start_process, stop_process, wait_for_port
from tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, TinyPair, build_model, build_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

pytestmark = pytest.mark.usefixtures("single_thread_torch")

ROUND_TRIP_TEXTS = {
    "code": "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # 3\n",
    "prose": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., isn't it?",
    "whitespace": "  leading\t\ttabs\n\n\n  trailing   \r\n \u00a0nbsp\u2003em-space ",
    "non_ascii": "naïve café — Zürich, Ελληνικά, русский, 日本語のテキスト",
    "emoji": "ship it 🚀🎉 👩‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "specials": f"{BOS_TOKEN}user\nhi{EOS_TOKEN}\n",
}

# Text the drafter is teacher-forced on: prose and code not in the tokenizer's corpus.
AGREEMENT_TEXT = (
    "Speculative decoding runs a cheap model ahead of an expensive one. The expensive\n"
    "model checks every proposed token in a single pass and keeps the longest prefix it\n"
    "agrees with, so the output is exactly what it would have written on its own.\n\n"
    "def accept(draft, target):\n"
    "    n = 0\n"
    "    while n < len(draft) and draft[n] == target[n]:\n"
    "        n += 1\n"
    "    return draft[:n] + [target[n]]\n\n"
    "class Session:\n"
    "    def __init__(self, session_id: str, tokens: list[int]) -> None:\n"
    "        self.session_id = session_id\n"
    "        self.tokens = tokens\n"
) * 2

PROMPTS = (
    "Write a function that returns the sum of a list.",
    "Explain speculative decoding in one sentence.",
    "hello",
    "import json",
)


@pytest.fixture(scope="module")
def tokenizer(tiny_pair: TinyPair) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_pair.tokenizer_dir)


@pytest.fixture(scope="module")
def target(tiny_pair: TinyPair) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir).eval()


@pytest.fixture(scope="module")
def drafter(tiny_pair: TinyPair) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_pair.drafter_dir).eval()


def chat_ids(tokenizer: PreTrainedTokenizerBase, content: str) -> torch.Tensor:
    """(1, T) prompt ids of one user turn plus the assistant header."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, return_dict=False
    )
    return torch.tensor([ids])


def greedy(model: PreTrainedModel, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """(1, T + n) prompt plus greedy continuation, stopping after eos.

    A bare KV-cached loop: twice as fast as `generate` on these tiny models, whose cost
    is Python overhead, not arithmetic.
    """
    eos_id = model.generation_config.eos_token_id
    out = model(prompt, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while tokens[-1] != eos_id and len(tokens) < max_new_tokens:
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return torch.cat([prompt, torch.tensor([tokens])], dim=1)


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_TEXTS))
def test_round_trip(tiny_pair: TinyPair, name: str) -> None:
    text = ROUND_TRIP_TEXTS[name]
    from_tokenizer_dir = AutoTokenizer.from_pretrained(tiny_pair.tokenizer_dir)
    from_target_dir = AutoTokenizer.from_pretrained(tiny_pair.target_dir)
    ids = from_tokenizer_dir.encode(text, add_special_tokens=False)
    assert from_tokenizer_dir.decode(ids) == text
    # AutoTokenizer picks Qwen2Tokenizer for model folders: it must encode identically.
    assert from_target_dir.encode(text, add_special_tokens=False) == ids
    assert len(ids) < len(text.encode())  # merges happen: not one token per byte


def test_round_trip_normalises_to_nfc(tokenizer: PreTrainedTokenizerBase) -> None:
    """Like real Qwen: decomposed accents come back composed (matters for string-level SD)."""
    decomposed = "cafe\u0301"
    ids = tokenizer.encode(decomposed, add_special_tokens=False)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", decomposed) == "café"


def test_vocabulary(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == 512
    assert tokenizer.convert_tokens_to_ids([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]) == [0, 1, 2]
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == (PAD_TOKEN, EOS_TOKEN, None)
    for word in (" the", " def", " return", " self", " is"):
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    assert tokenizer.encode(f"a{EOS_TOKEN}", add_special_tokens=False)[-1] == 2


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    first = build_tokenizer(tmp_path / "a")
    second = build_tokenizer(tmp_path / "b")
    assert first.get_vocab() == second.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = chat_ids(tokenizer, "Hi")[0].tolist()
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not without_prompt.endswith("assistant\n")


def test_model_folders_load(tiny_pair: TinyPair, target: PreTrainedModel, drafter: PreTrainedModel) -> None:
    for folder, model in ((tiny_pair.target_dir, target), (tiny_pair.drafter_dir, drafter)):
        assert (folder / "model.safetensors").is_file()
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert model.config.vocab_size == 512 and not model.config.tie_word_embeddings
        assert model.config.max_position_embeddings == 2048
        assert model.generation_config.eos_token_id == 2
    assert not torch.equal(target.lm_head.weight, drafter.lm_head.weight)


def test_build_model_is_seeded(tmp_path: Path, tiny_pair: TinyPair) -> None:
    """Same seed, same weights; another seed, other weights; the caller's RNG untouched."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.tokenizer_dir)
    rng_before = torch.get_rng_state()
    folders = [build_model(tmp_path / f"m{i}", tokenizer, seed=seed) for i, seed in enumerate((0, 0, 7))]
    assert torch.equal(torch.get_rng_state(), rng_before)
    weights = [(folder / "model.safetensors").read_bytes() for folder in folders]
    assert weights[0] == weights[1] != weights[2]
    assert weights[0] == (tiny_pair.target_dir / "model.safetensors").read_bytes()


def test_greedy_generate_is_deterministic(
    tiny_pair: TinyPair, tokenizer: PreTrainedTokenizerBase, target: PreTrainedModel
) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir).eval()
    prompt = chat_ids(tokenizer, PROMPTS[0])
    with torch.no_grad():
        first = target.generate(prompt, max_new_tokens=48, do_sample=False)
        second = reloaded.generate(prompt, max_new_tokens=48, do_sample=False)
        # KV-cached greedy equals the argmax of one full forward (what a verifier computes).
        full = target(first).logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(first, second)
    assert first.shape[1] > prompt.shape[1] + 8
    assert torch.equal(full, first[0, prompt.shape[1] :])
    assert torch.equal(greedy(target, prompt, 48), first)


def test_drafter_agrees_often_but_not_always(
    tokenizer: PreTrainedTokenizerBase, target: PreTrainedModel, drafter: PreTrainedModel
) -> None:
    ids = torch.tensor([tokenizer.encode(AGREEMENT_TEXT, add_special_tokens=False)])  # (1, T)
    with torch.no_grad():
        agree = target(ids).logits.argmax(-1) == drafter(ids).logits.argmax(-1)  # (1, T)
    rate = agree.float().mean().item()
    assert ids.shape[1] > 200
    assert 0.30 <= rate <= 0.95, f"greedy agreement {rate:.2%}"


def test_target_top2_gap(tokenizer: PreTrainedTokenizerBase, target: PreTrainedModel) -> None:
    """Greedy output is stable only if the argmax is never a near-tie."""
    gaps = []
    with torch.no_grad():
        for content in PROMPTS:
            prompt = chat_ids(tokenizer, content)
            out = greedy(target, prompt, 100)  # (1, T + n)
            top2 = target(out).logits[0, prompt.shape[1] - 1 : -1].topk(2).values  # (n, 2)
            gaps.append(top2[:, 0] - top2[:, 1])
    gap = torch.cat(gaps)
    assert gap.numel() >= 200
    assert (gap > 1e-3).float().mean().item() >= 0.99, f"min gap {gap.min().item():.2e}"


def test_redis_server_is_real(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("specd:test:key", "värde")
        client.set("specd:test:stray", "left for the next test")
        assert client.get("specd:test:key") == "värde".encode()
        assert client.info("server")["redis_version"]
        assert client.config_get("save")["save"] == ""
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_redis_url_starts_empty(redis_url: str) -> None:
    """Runs after test_redis_server_is_real, which leaves keys behind."""
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_wait_for_port_and_stop(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    proc = start_process(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        {"SPECD_TEST_MARKER": "1"},
        log_path,
    )
    try:
        wait_for_port(port, 10, proc, log_path)
    finally:
        code = stop_process(proc, timeout=5)
    assert code != 0 and proc.poll() is not None  # stopped by SIGTERM, not exited on its own


def test_wait_for_port_reports_a_dead_process(tmp_path: Path) -> None:
    log_path = tmp_path / "dead.log"
    proc = start_process(
        [sys.executable, "-c", "import os, sys; print('boom', os.environ['SPECD_X']); sys.exit(3)"],
        {"SPECD_X": "from-env"},
        log_path,
    )
    with pytest.raises(RuntimeError, match=r"exited with 3(.|\n)*boom from-env"):
        wait_for_port(free_port(), 10, proc, log_path)
