"""The model runtime: KV caches reused by longest common prefix, LRU eviction, oneDNN linears."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.runtime import ModelHost, ModelInfo, use_onednn_linears

INFO = ModelInfo("tiny", 512, 2048, (2,), "float64", "cpu", "x")


@pytest.fixture(scope="module")
def model(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir, dtype=torch.float64).eval()


@torch.inference_mode()
def full_logits(model, seq: list[int]) -> torch.Tensor:
    return model(torch.tensor([seq])).logits[0]  # (T, V)


def test_logits_match_a_full_pass_whatever_the_cache_held(model):
    host = ModelHost(model, INFO, max_sessions=4)
    seq = list(range(10, 40))
    expected = full_logits(model, seq)
    # Grow, roll back past a rejected draft, and branch: each answer equals a fresh full pass.
    assert torch.allclose(host.logits("s", seq[:20], 3), expected[17:20], atol=1e-9)
    assert torch.allclose(host.logits("s", seq[:25], 5), expected[20:25], atol=1e-9)
    branch = seq[:22] + [7, 8, 9]
    assert torch.allclose(host.logits("s", branch, 4), full_logits(model, branch)[21:25], atol=1e-9)
    assert torch.allclose(host.logits("s", seq, 1), expected[29:30], atol=1e-9)
    assert host.session("s").cached_tokens == seq


def test_a_repeated_sequence_refeeds_only_the_last_token(model):
    host = ModelHost(model, INFO, max_sessions=4)
    seq = list(range(5, 25))
    first = host.logits("s", seq, 1)
    assert torch.allclose(host.logits("s", seq, 1), first, atol=1e-12)
    assert host.session("s").cache.get_seq_length() == len(seq)


def test_sessions_are_evicted_least_recently_used(model):
    host = ModelHost(model, INFO, max_sessions=2)
    for sid in ("a", "b"):
        host.logits(sid, [1, 2, 3], 1)
    host.session("a")  # a is now the most recent
    host.logits("c", [4, 5], 1)
    assert host.held_context("b") is None and host.held_context("a") is not None
    assert host.session_count == 2
    assert host.release("a") and not host.release("a")


@torch.inference_mode()
def test_onednn_linears_agree_with_torch(tiny_pair):
    stock = AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir, dtype=torch.float32).eval()
    fast = copy.deepcopy(stock)
    assert use_onednn_linears(fast) == sum(isinstance(m, torch.nn.Linear) for m in stock.modules())
    ids = torch.tensor([list(range(30, 60))])
    a, b = stock(ids).logits, fast(ids).logits
    assert (a - b).abs().max() < 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))
