"""The int8 linears (services/int8.py) on each kernel: exact integer products, so every row of
a pass is bitwise what that row alone gives, and the kernels give the same model."""

from __future__ import annotations

import pytest
import torch

from services.int8 import ACT_QMAX, KERNELS, Int8Linear, StackedInt8, choose_kernel, quantize_rows


def exact(layer_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float(Σ q_x q_w) · s_w · s_x + b, the integer sum computed in int64."""
    s_x = (x.abs().amax(dim=1, keepdim=True) / ACT_QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    q_x = torch.round(x / s_x).long()
    return (q_x @ layer_q.long().t()).float() * w_scale * s_x + bias


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("inputs", "outputs"), [(96, 200), (4096, 24)])
def test_rows_are_exact_whatever_shares_the_pass(kernel, inputs, outputs):
    """Wide inputs too: fbgemm quantizes a large input (rows x inputs) on a vectorized path
    that rounded halves differently, so q_x is rounded before any kernel sees it."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(inputs, outputs)
    layer = Int8Linear(linear, kernel)
    q, scale = quantize_rows(linear.weight.detach())
    x = torch.randn(64, inputs) * 3
    want = exact(q, scale, linear.bias.detach(), x)
    for rows in (1, 2, 3, 5, 8, 13, 17, 33, 64):
        got = layer(x[:rows])
        assert torch.equal(got, want[:rows]), f"{kernel}, {rows} rows: off by {(got - want[:rows]).abs().max():.3g}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_read_back_as_quantized(kernel):
    torch.manual_seed(1)
    q = torch.randint(-127, 128, (40, 24), dtype=torch.int8)
    scale = torch.rand(40) + 0.01
    got_q, got_scale = Int8Linear.from_quantized(q, scale, None, kernel).rows()
    assert torch.equal(got_q, q) and torch.equal(got_scale, scale)


def test_the_kernels_run_the_same_model_and_stack_alike():
    torch.manual_seed(2)
    parts = [torch.nn.Linear(64, n, bias=False) for n in (48, 16)]
    x = torch.randn(5, 64)
    outputs = []
    for kernel in KERNELS:
        layers = [Int8Linear(p, kernel) for p in parts]
        stacked = StackedInt8(layers)
        assert stacked.linear.kernel == kernel
        outputs.append(stacked.linear(x))
        assert torch.equal(outputs[-1], torch.cat([layer(x) for layer in layers], dim=1))
    assert torch.equal(*outputs)


def test_the_kernel_choice():
    assert choose_kernel("fbgemm") == "fbgemm" and choose_kernel("onednn") == "onednn"
    assert choose_kernel("auto") in KERNELS
    assert choose_kernel("auto", "drafter") == "fbgemm"  # one-row passes: fbgemm's are the cheaper
    assert choose_kernel("onednn", "drafter") == "onednn"
    with pytest.raises(ValueError, match="auto, onednn or fbgemm"):
        choose_kernel("mkl")


def test_a_service_config_names_the_kernel():
    from services.config import ConfigError, ModelServiceConfig

    env = {"SPECD_MODEL": "tiny"}
    assert ModelServiceConfig.from_env(env, "127.0.0.1:1").int8_kernel == "auto"
    assert ModelServiceConfig.from_env({**env, "SPECD_INT8_KERNEL": "fbgemm"}, "127.0.0.1:1").int8_kernel == "fbgemm"
    with pytest.raises(ConfigError, match="SPECD_INT8_KERNEL"):
        ModelServiceConfig.from_env({**env, "SPECD_INT8_KERNEL": "amx"}, "127.0.0.1:1")
