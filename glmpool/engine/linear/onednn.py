"""fp32 weights reordered once at load into oneDNN's blocked layout (oneDNN is bundled with torch).

MKL's GEMM (F.linear) repacks the whole weight on every call, so a batch's few rows cost several times
one row; oneDNN with the weight reordered once does not. The tied embedding table is kept twice: plain
for the lookup and reordered for the output projection, the largest matmul (docs/benchmarks.md, "Moved
from the code", has the figures).

Batching must not change results: a row's output must not depend on how many rows are multiplied with
it. From 2 rows up oneDNN sums every row in the same order, but a lone row takes a GEMV kernel that sums
in another (and streams the weight slower). So a lone row goes, per weight, by the first of these that
gives it the bits it gets among others (lone_row_route, probed once at load): glmpool's own row kernel
(row_kernel.py, in oneDNN's multi-row order), oneDNN's GEMV where it happens to agree, or oneDNN with
the row computed as two (itself twice), which costs time, but only there. Where the row kernel is used,
up to OWN_KERNEL_ROWS rows go through its multi-row form as well (AVX-512): the same sums, faster.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import row_kernel
from .base import WeightMethod


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


def _matmul(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


class LoneRow(NamedTuple):
    """How a lone row is multiplied by a weight to get the bits it gets among other rows."""
    chunk: int | None = None  # by the row kernel, with this chunk length (row_kernel.c)
    pad: bool = False  # else by oneDNN as two rows (itself twice), where alone it would sum differently
    several: bool = False  # with a chunk: up to OWN_KERNEL_ROWS rows by the kernel too (AVX-512)
    address: int | None = None  # with a chunk: the weight's, read once (torch's accessor is an operator call)


def lone_row_route(weight: torch.Tensor, bias: torch.Tensor | None) -> LoneRow:
    """Probe how a lone row must be multiplied by `weight` (plain or reordered) to keep its bits."""
    out_features, in_features = weight.shape
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0))
    among_others = _matmul(x, weight, bias)[0]
    chunk = row_kernel.probe(weight, bias, out_features, in_features, x[0], among_others)
    if chunk is not None:
        return LoneRow(chunk=chunk, several=row_kernel.several_rows_available(),
                       address=torch.ops.mkldnn.data_ptr(weight))
    return LoneRow(pad=not torch.equal(_matmul(x[:1], weight, bias)[0], among_others))


# Up to this many rows (a batch's decode step, a short prompt) glmpool's multi-row kernel, which sums as
# oneDNN does (the same chunk), beats oneDNN; beyond, oneDNN's GEMM wins (docs/benchmarks.md).
OWN_KERNEL_ROWS = 128


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           lone_row: LoneRow = LoneRow()) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T + bias; `weight` plain or reordered by `_reorder_linear_weight`;
    lone_row: lone_row_route(weight, bias), see the module docstring."""
    rows = x.numel() // x.shape[-1]
    if (rows == 1 and lone_row.chunk) or (rows <= OWN_KERNEL_ROWS and lone_row.several):
        return row_kernel.rows_times_packed(x, weight, bias, weight.shape[0], lone_row.chunk, lone_row.address)
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1 and lone_row.pad:
        out = _matmul(x2.expand(2, -1).contiguous(), weight, bias)[:1]
    else:
        out = _matmul(x2, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class OneDNN(WeightMethod):
    """fp32 weights reordered once into oneDNN's blocked layout (an opaque tensor)."""

    name = "onednn"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = bias
        self.lone_row = lone_row_route(self.packed, bias)

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype == torch.float32 and available()

    @classmethod
    def batch_invariant(cls) -> bool:
        return True  # by lone_row_route, per weight

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias, self.lone_row)

    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.packed,)
