"""fp32 matmuls on CPU through oneDNN (bundled with torch), with weights reordered once at load.

Measured on the 2-core AVX2 test machines, y = x W^T + b for the medium model's shapes: a weight
reordered into oneDNN's blocked layout multiplies 1 row as fast as F.linear (MKL) and 4-16 rows 2-5x
faster -- MKL's GEMM repacks the whole of W on every call, oneDNN's packed GEMM does not. The tied
output projection keeps its plain layout (the embedding lookup needs it, and a second copy would cost
vocab x hidden floats); oneDNN on the plain matrix is still about 2x faster than MKL from 4 rows on.

Batching must not change results: a row's output must not depend on how many rows are multiplied
with it. oneDNN sums a lone row in another order than two or more (a GEMV kernel), while any count
from 2 up agrees bit for bit; a lone row is therefore computed as two (itself twice), which costs
nothing measurable in a memory-bound multiply.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn


@functools.cache
def available() -> bool:
    """oneDNN's linear and weight reorder are present and compute a known product right."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_linear_pointwise"):
            return False
        weight = torch.arange(12.0).view(3, 4)
        x = torch.ones(1, 4)
        expected = torch.tensor([[6.0, 22.0, 38.0]])
        return bool(torch.equal(linear(x, weight, None), expected)
                    and torch.equal(linear(x, ops._reorder_linear_weight(weight), None), expected))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T + bias; `weight` plain or reordered by `_reorder_linear_weight`."""
    rows = x.reshape(-1, x.shape[-1])
    lone = rows.shape[0] == 1
    if lone:  # see the module docstring
        rows = rows.expand(2, -1).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    if lone:
        out = out[:1]
    return out.view(*x.shape[:-1], out.shape[-1])


class PackedLinear(nn.Module):
    """An nn.Linear (fp32, CPU) whose weight lives only in oneDNN's layout (an opaque buffer, left out of
    the state_dict). Inference only: load the checkpoint first, then pack (pack_linears)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach()), persistent=False)
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        """A plain copy of the weight (e.g. to quantize it)."""
        return self.packed.to_dense()

    def __deepcopy__(self, memo: dict) -> PackedLinear:  # an opaque tensor has no storage to copy
        return PackedLinear(self.weight, copy.deepcopy(self.bias, memo))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN layout"


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and available()


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of a model by a PackedLinear; returns how many. Only for fp32 on the CPU
    (see usable())."""
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    for name in names:  # one at a time, so memory holds at most one matrix twice
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        source = getattr(parent, child)
        setattr(parent, child, PackedLinear(source.weight, source.bias))
    return len(names)
