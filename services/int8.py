"""int8 linears for the torch runtime on CPU (SPECD_DTYPE=int8): int8 weights per output
channel, 7-bit activations per row (per token), on fbgemm's or oneDNN's int8 GEMM.

Why these choices, measured on the 1.5B target's linears (28 layers of 1536/8960-wide
projections, 1.3 B weights in all, 2 threads; a pass over 1 / 3 / 5 / 8 tokens):

| kernel                                                   | 1      | 3      | 5      | 8      |
|----------------------------------------------------------|--------|--------|--------|--------|
| fp32, oneDNN (the fp32 default)                          | 220 ms | 306 ms | 317 ms | 361 ms |
| int8 weight-only (`_weight_int8pack_mm`, bf16)           | 115 ms | 145 ms | 244 ms | 290 ms |
| int8 per token, torchao Int8DynamicActivationInt8Weight  | 160 ms | 155 ms | 160 ms | 165 ms |
| int8 per tensor, fbgemm (`quantize_dynamic`)             | 82 ms  | 94 ms  | 101 ms | 111 ms |
| int8 per token, fbgemm (this module)                     | 80 ms  | 99 ms  | 110 ms | 107 ms |

Per-tensor dynamic quantization is as fast, but its activation scale is the largest value of
the whole pass: each row of a verify pass would be quantized by a scale that depends on the
other draft tokens, so a token's logits would change with the batch it is verified in, and
the greedy output would no longer be the model's own. Here each row is divided by its own
scale first, so static per-tensor quantization (scale 1, zero point 64) is exactly
per-row quantization; the integer products are exact and the row scale is applied after, in
fp32. A row's result is bitwise the same whatever other rows share the pass
(tests/test_runtime.py) - the property speculative decoding needs of its verifier.

The quantized model is its own model: its greedy output is the reference every strategy on it
reproduces (not the fp32 model's, from which it may part at close calls).

Why not 4 bits, as the GGUF has them: torch's int4 weight-only kernel
(`_weight_int4pack_mm_for_cpu`, bf16 activations, groups of 32) represents the Q4_K blocks of
the packaged GGUF exactly (scale and minimum per 32 weights) and keeps every row of a pass
independent of the others, but it dequantizes to bf16 and multiplies in floating point: in
the 1.5B target it ran 1.1 B weights in 48 ms a token, no faster per weight than fbgemm's
int8 here (24 G weights/s), so the whole one-token pass went from 96 to 94 ms only, and a
pass over 5 rows cost 158 ms against int8's 135 (its kernel switches from 4-row to larger
blocks past 4 rows).

Two kernels multiply the same int8 rows (`KERNELS`; SPECD_INT8_KERNEL, `choose_kernel`):
fbgemm's, and oneDNN's `qlinear_pointwise` on a prepacked weight. On a CPU with AMX tiles
(Intel Sapphire Rapids and later) oneDNN multiplies the rows of a pass in AMX and stays flat
where fbgemm's VNNI kernel grows by a row's compute. The 1.5B target's linears (28 layers and
the LM head, 2 threads, a pass over 1 / 3 / 5 / 8 / 16 rows, on AMX-capable Xeon cores):

| kernel                                   | 1     | 3     | 5     | 8      | 16     |
|------------------------------------------|-------|-------|-------|--------|--------|
| fbgemm                                   | 69 ms | 82 ms | 95 ms | 105 ms | 124 ms |
| oneDNN, AMX                              | 74 ms | 74 ms | 74 ms | 75 ms  | 76 ms  |
| oneDNN capped at AVX512-VNNI             | 72 ms | 77 ms | 80 ms | 88 ms  | 108 ms |
| oneDNN capped at AVX2                    | 343 ms| 823 ms| 841 ms| 644 ms | 707 ms |

Through the services, on the same Xeon, the one-row pass runs ~10% slower on oneDNN (101 against
92 ms in a service's thread), so plain decoding loses what every verify over several tokens
gains: `specd bench` (2 prompts a category, 96 tokens) measured the best strategy at 46.1
against 35.9 tok/s on HumanEval, 11.2 against 10.3 on GSM8K, 8.8 against 10.0 on MT-bench.
So a verifier runs oneDNN where the CPU has AMX, and a drafter (one-row passes; a trained
head's draft of 3 took 10.2 ms on oneDNN, 9.3 on fbgemm) and other CPUs fbgemm. Both compute
float(Σ q_x q_w) · s_w exactly (the integer sum, then one float product) from the same q_x:
the same model, bitwise, at every row count (tests/test_int8.py).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

QMAX = 127  # weights: symmetric int8
# Activations: 7 bits, travelling as uint8 x + 64 (both int8 GEMMs take unsigned
# activations). On CPUs without VNNI, fbgemm multiplies with vpmaddubsw, which adds pairs of
# uint8 x int8 products in int16 with saturation: 8-bit activations (up to 255 x 127 x 2)
# overflow it, and the "exact" integer product is not (measured on an AVX2 EPYC: the tiny
# test model's int8 argmax agreed with fp64 on 53% of positions; 88% with 7 bits). With
# activations in [1, 127] a pair stays below 2^15 on every x86 CPU (PyTorch's reduce_range).
ACT_QMAX = 63
ZERO_POINT = 64
KERNELS = ("onednn", "fbgemm")


def choose_kernel(requested: str = "auto", role: str = "verifier") -> str:
    """The int8 GEMM `requested` (SPECD_INT8_KERNEL): one of KERNELS, or auto - oneDNN for a
    verifier on a CPU with AMX int8 tiles; fbgemm for a drafter (its passes are one row, which
    fbgemm runs the cheaper: the table above) and on other CPUs."""
    if requested in KERNELS:
        return requested
    if requested != "auto":
        raise ValueError(f"the int8 kernel must be auto, {' or '.join(KERNELS)}; got {requested!r}")
    return "onednn" if role == "verifier" and _amx() else "fbgemm"


@functools.cache
def _amx() -> bool:
    """Whether this CPU has AMX int8 tiles (Linux's amx_int8 flag) and torch has oneDNN."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: fbgemm, the kernel that needs no particular CPU
        return False
    return "amx_int8" in flags.split() and torch.backends.mkldnn.is_available()


def quantize_rows(w: Tensor, block: int = 8192) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: (q (R, C) int8, scale (R,) float32) with w ≈ q * scale[:, None].

    Rows are independent, so they are quantized `block` at a time: the same result without
    float32 temporaries of a whole table (a 151,936 x 1,536 embedding's: 0.93 GB each)."""
    q = torch.empty(w.shape, dtype=torch.int8)  # (R, C)
    scale = torch.empty(w.shape[0], dtype=torch.float32)  # (R,)
    for i in range(0, w.shape[0], block):
        rows = w[i : i + block].float()
        scale[i : i + block] = (rows.abs().amax(dim=1) / QMAX).clamp_min(torch.finfo(torch.float32).tiny)
        q[i : i + block] = torch.round(rows / scale[i : i + block, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (per output channel) and activations quantized per row.

    y[i] = s_x[i] * (q_x[i] @ q_w^T) * s_w + b, with q_x[i] = round(x[i] / s_x[i]) and
    s_x[i] = max|x[i]| / 63: the (exact) integer product runs in `kernel` (KERNELS) on the
    weight prepacked for it.
    """

    def __init__(self, linear: nn.Linear, kernel: str = "auto") -> None:
        super().__init__()
        q, scale = quantize_rows(linear.weight.detach())
        self._pack(q, scale, None if linear.bias is None else linear.bias.detach().float(), kernel)

    @classmethod
    def from_quantized(cls, q: Tensor, scale: Tensor, bias: Tensor | None, kernel: str = "auto") -> Int8Linear:
        """From int8 rows q (out, in), their scales (out,) and a bias (out,) or None."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._pack(q, scale.float(), bias, kernel)
        return layer

    def _pack(self, q: Tensor, scale: Tensor, bias: Tensor | None, kernel: str) -> None:
        self.out_features, self.in_features = q.shape
        self.kernel = choose_kernel(kernel)
        zero = torch.zeros(self.out_features, dtype=torch.long)
        if self.kernel == "onednn":
            # Packed for a pass of one row (what decoding runs most); every row count runs on it.
            self._packed = torch.ops.onednn.qlinear_prepack(q.contiguous(), [1, self.in_features])
            self._scale, self._zero = scale.contiguous(), zero
        else:
            with warnings.catch_warnings():
                # torch deprecates quantized tensors in favour of torchao, whose CPU int8 path
                # is twice as slow here (see the table above); fbgemm's prepack still takes one.
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
                weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            self._packed = torch.ops.quantized.linear_prepack(weight, None)  # fbgemm's layout
        # Added after the row scale (a bias packed with the weight would be scaled by it).
        self.register_buffer("bias", None if bias is None else bias.clone())

    def rows(self) -> tuple[Tensor, Tensor]:
        """The int8 rows (out, in) and their scales (out,), as quantized."""
        if self.kernel == "onednn":
            return self._packed.to_dense().t().contiguous(), self._scale
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.int_repr().contiguous(), weight.q_per_channel_scales().float().contiguous()

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float()  # (M, in)
        scale = (rows.abs().amax(dim=1, keepdim=True) / ACT_QMAX).clamp_min(torch.finfo(torch.float32).tiny)  # (M, 1)
        # q_x rounded here (half to even), never by a kernel: fbgemm's vectorized quantization
        # of a large input (14 rows of 8,960 and more) adds the zero point before it rounds,
        # which moves halves, so a row's q_x would depend on the rows beside it.
        q_x = torch.round(rows / scale)
        if self.kernel == "onednn":
            y = torch.ops.onednn.qlinear_pointwise(
                q_x.add_(ZERO_POINT).to(torch.uint8), 1.0, ZERO_POINT, self._packed, self._scale, self._zero, None,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        else:
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q_x, 1.0, ZERO_POINT, self._packed)
        y = y * scale  # (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class Int8Embedding(nn.Module):
    """An embedding looked up from int8 rows (the tied LM head's, when the model ties them)."""

    def __init__(self, q: Tensor, scale: Tensor, padding_idx: int | None) -> None:
        super().__init__()
        self.register_buffer("q", q)  # (V, H) int8
        self.register_buffer("scale", scale)  # (V,)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: Tensor) -> Tensor:  # (...) -> (..., H)
        return self.q[ids].float() * self.scale[ids].unsqueeze(-1)


def quantize_model(model: nn.Module, kernel: str = "auto") -> int:
    """Replaces every nn.Linear of a transformers causal LM (LM head included) by an
    Int8Linear on `kernel`, and its input embedding by an Int8Embedding; returns the linears
    replaced.

    A model that ties its embedding to its LM head gets the same int8 rows in both (they are
    quantized from the one fp32 matrix the two shared)."""
    from services.torch_runtime import replace_linears

    embedding = model.get_input_embeddings()
    q, scale = quantize_rows(embedding.weight.detach())
    model.set_input_embeddings(Int8Embedding(q, scale, embedding.padding_idx))
    return replace_linears(model, lambda linear: Int8Linear(linear, kernel))


# -- projections that read one input, as one GEMM ---------------------------------------------

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sibling linears of one input


class StackedInt8(nn.Module):
    """The int8 rows of several linears that read the same input, stacked into one Int8Linear:
    one activation quantization and one GEMM call instead of one per projection.

    Every output channel is its own int8 dot product (exact) times its own weight scale and
    the row's activation scale, so the stacked result is bitwise the parts' results side by
    side (tests/test_runtime.py). The model keeps calling its projections by name: each is a
    StackedPart that takes its columns of the stacked output, computed on the first part's
    call and dropped once every part has read it (the parts are called one after another on
    the same input tensor, as transformers' attention and MLP modules do)."""

    def __init__(self, parts: list[Int8Linear]) -> None:
        super().__init__()
        rows = [p.rows() for p in parts]
        q = torch.cat([q for q, _ in rows])
        scale = torch.cat([scale for _, scale in rows])
        biases = [p.bias for p in parts]
        if all(b is None for b in biases):
            bias = None
        else:
            bias = torch.cat([torch.zeros(p.out_features) if b is None else b for p, b in zip(parts, biases)])
        self.linear = Int8Linear.from_quantized(q, scale, bias, parts[0].kernel)
        self.parts = len(parts)
        self._input: Tensor | None = None
        self._output: Tensor | None = None
        self._reads = 0

    def columns(self, x: Tensor, start: int, end: int) -> Tensor:
        if self._input is not x:
            self._input, self._output, self._reads = x, self.linear(x), 0
        out = self._output[..., start:end]
        self._reads += 1
        if self._reads == self.parts:
            self._input = self._output = None
        return out


class StackedPart(nn.Module):
    """One projection of a StackedInt8: its columns start:end of the stacked output."""

    def __init__(self, stacked: StackedInt8, start: int, end: int) -> None:
        super().__init__()
        self._stacked = [stacked]  # a list: the stack is registered once, by its owner
        self.start, self.end = start, end
        self.in_features, self.out_features = stacked.linear.in_features, end - start

    def forward(self, x: Tensor) -> Tensor:
        return self._stacked[0].columns(x, self.start, self.end)


def stack_projections(model: nn.Module) -> int:
    """Stacks the int8 projections that read one input (FUSED: q, k, v; gate, up) in every
    module that has them all; returns how many stacks it made. Outputs are unchanged, bitwise.
    Measured on the 1.5B target (2 threads, after 200 tokens of context): 28 layers' q, k, v,
    gate and up alone, 25.8 ms as separate calls, 20.5 ms stacked; a whole one-token pass
    87.4 -> 84.7 ms, a pass over 5 tokens 120.2 -> 119.2 ms (two runs each, interleaved)."""
    made = 0
    for owner in list(model.modules()):
        for names in FUSED:
            parts = [getattr(owner, name, None) for name in names]
            if not all(isinstance(p, Int8Linear) for p in parts):
                continue
            stacked = StackedInt8(parts)
            owner.add_module("stacked_" + "_".join(n.removesuffix("_proj") for n in names), stacked)
            start = 0
            for name, part in zip(names, parts):
                setattr(owner, name, StackedPart(stacked, start, start + part.out_features))
                start += part.out_features
            made += 1
    return made


# -- attention that computes every query row alone ------------------------------------------

ROWWISE = "specd_rowwise"  # the name it is registered under with transformers


def rowwise_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """Scaled dot-product attention with each query row computed by itself, over exactly the
    keys it may see, by the same kernel call a one-token pass makes.

    Why: SDPA over several query rows blocks and reduces differently than over one, so a
    verify pass over k+1 tokens would round differently than k+1 one-token passes. With the
    int8 linears (exact per row) and per-row norms, this makes every row of any pass bitwise
    what decoding that token alone gives: the runtime's greedy output does not depend on how
    tokens are batched. Costs one small kernel call per row and layer.

    query (B, H, T, D); key, value (B, KV, S, D); attention_mask None (causal: row i sees keys
    [0, S - T + i]) or (B, 1, T, S), bool (True = attend) or additive (0 = attend). Returns
    (B, T, H, D), as transformers' attention functions do.
    """
    b, heads, t, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    out = query.new_empty(b, t, heads, d)
    for i in range(t):
        if attention_mask is None:
            keys, values = key[:, :, : s - t + i + 1], value[:, :, : s - t + i + 1]
        else:
            row = attention_mask[0, 0, i]
            allowed = row if row.dtype == torch.bool else row == 0  # (S,)
            seen = int(allowed.sum())
            if bool(allowed[:seen].all()):  # a prefix: a view, no copy
                keys, values = key[:, :, :seen], value[:, :, :seen]
            else:
                index = allowed.nonzero().squeeze(1)
                keys, values = key.index_select(2, index), value.index_select(2, index)
        q = query[:, :, i].reshape(b, kv_heads, groups, d)  # the query heads that share a key head
        o = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scaling)  # (B, KV, G, D)
        out[:, i] = o.reshape(b, heads, d)
    return out, None


def use_rowwise_attention(model: nn.Module) -> None:
    """Makes a transformers model attend with rowwise_attention (registered once with
    transformers' attention and mask interfaces, its documented extension point)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROWWISE, rowwise_attention)
    AttentionMaskInterface.register(ROWWISE, sdpa_mask)
    model.set_attn_implementation(ROWWISE)


# -- a cache of the quantized model ----------------------------------------------------------

CACHE_NAME = "int8.safetensors"  # written next to the model's weights
CACHE_FORMAT = "specd-int8-1"


def save_quantized(model: nn.Module, path: Path, source: str) -> None:
    """Writes a quantized model's tensors (int8 rows and scales, and its fp32 norms, biases and
    buffers) to path, tagged with `source` (what they were quantized from)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = module.rows()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.contiguous()
        elif not list(module.children()) or isinstance(module, Int8Embedding):
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor is not None:
                    tensors[f"{name}.{key}" if name else key] = tensor.detach().contiguous()
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": CACHE_FORMAT, "source": source})
    partial.replace(path)


def load_quantized(folder: Path, path: Path, source: str, kernel: str = "auto") -> nn.Module | None:
    """The quantized model saved at path for this folder's config and `source`, its linears on
    `kernel`; None when there is none, it was made from something else, or it does not fit the
    architecture."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("source") != source:
            return None
        # Copies: a tensor read from the file may be a view of its memory map, which would
        # keep the whole file resident next to the packed weights.
        tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.q" in tensors:
            q, scale, bias = tensors.pop(f"{name}.q"), tensors.pop(f"{name}.scale"), tensors.pop(f"{name}.bias", None)
            _set_module(model, name, Int8Linear.from_quantized(q, scale, bias, kernel))
        elif isinstance(module, nn.Embedding) and f"{name}.q" in tensors:
            _set_module(model, name, Int8Embedding(tensors.pop(f"{name}.q"), tensors.pop(f"{name}.scale"), module.padding_idx))
    for key, tensor in tensors.items():
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return None  # the file lacks some tensor of this architecture: quantize anew
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass
    return model.eval()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)
