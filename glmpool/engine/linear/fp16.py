"""fp16 weights, fp32 arithmetic, on the CPU: by glmpool's kernel where it is built (AVX-512 or AVX2), else
through FBGEMM (bundled with torch's x86 builds) where it is batch-invariant.

Decoding one sequence reads every weight once per token, so bytes per weight set its speed. THUDM
publishes ChatGLM-6B in fp16: held as fp16, the weights lose nothing and take half the memory of fp32;
both kernels widen them to fp32 in registers as they stream them, and everything outside the matmuls
stays fp32.

glmpool's kernel (row_kernel.rows_times_half) multiplies any number of rows: one sequence's decode step,
a batch's, a prompt. Each output is summed in the same order whatever the rows, so batching cannot change
a result by construction. FBGEMM splits the rows into tiles and picks one micro-kernel per tile height;
with AVX-512 they all sum alike, but its AVX2 kernels for tiles of 1 and 2 rows sum in another order than
those for 3-6, so there a row's bits depend on how many rows go with it. fbgemm_batch_invariant() finds
that out once per process, and FBGEMM is usable only where it holds. FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes
FBGEMM use its AVX2 kernels on an AVX-512 CPU (.ci/run's second pass).

FBGEMM packs only from fp32, so a matrix larger than PACK_SLICE_BYTES in fp32 is packed in slices of
rows through one reused fp32 buffer and multiplied slice by slice: an fp32 copy of ChatGLM-6B's whole
output projection (2.1 GB) would make the load's peak twice the model's fp16 size. Each output is computed
from its own row alone, so slicing changes no bit (tested); each slice costs a call (several slices of
the output projection were measured 1.7x as slow as one), so slices are as large as the peak allows:
ChatGLM-6B's output projection takes two, no other matrix more than one.

The tied embedding table is kept twice in fp16: plain for the lookup and packed for the output
projection.
"""
from __future__ import annotations

import functools

import torch

from .. import row_kernel
from .base import WeightMethod


@functools.cache
def fbgemm_available() -> bool:
    """FBGEMM's fp16 linear is present (x86 builds) and computes a known product right."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.arange(12.0).view(3, 4), None)
        out = torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 4), packed)
        return bool(torch.equal(out, torch.tensor([[6.0, 22.0, 38.0]])))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def fbgemm_batch_invariant() -> bool:
    """Whether FBGEMM's fp16 linear gives each row the same bits alone and among any number of rows (up to
    two blocks of its 120-row partition, split over this process's threads)."""
    if not fbgemm_available():
        return False
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 64, generator=generator).half().float(), torch.randn(250, 64, generator=generator)
    packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
    together = torch.ops.quantized.linear_dynamic_fp16(x, packed)
    return all(torch.equal(torch.ops.quantized.linear_dynamic_fp16(x[:rows], packed), together[:rows])
               for rows in range(1, len(x)))


PACK_SLICE_BYTES = 1 << 30  # fp32 bytes FBGEMM packs at a time: under 10% of ChatGLM-6B's fp16 weights


class OwnFp16(WeightMethod):
    """A weight [out, in] rounded to fp16 in row_kernel.pack_half's layout, bias kept apart in fp32."""

    name = "fp16"
    table_dtype = torch.float16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.out_features = weight.shape[0]
        self.packed = row_kernel.pack_half(weight.detach())
        self.bias = None if bias is None else bias.detach().float()

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype == torch.float32 and row_kernel.available()

    @classmethod
    def batch_invariant(cls) -> bool:
        return True  # by construction: see the module docstring

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return row_kernel.rows_times_half(x, self.packed, self.bias, self.out_features)

    def weight(self) -> torch.Tensor:
        return row_kernel.unpack_half(self.packed, self.out_features)

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.packed,)


class FbgemmFp16(WeightMethod):
    """A weight [out, in] rounded to fp16 in FBGEMM's packed form (opaque objects holding the bias), in
    slices of rows (see the module docstring)."""

    name = "fbgemm-fp16"
    table_dtype = torch.float16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.out_features, in_features = weight.shape
        rows = max(1, PACK_SLICE_BYTES // (4 * in_features))
        bias = None if bias is None else bias.detach().float()
        widened = torch.empty(min(rows, self.out_features), in_features)  # one buffer: no heap holes
        self.slices = []
        for start in range(0, self.out_features, rows):
            part = widened[:min(rows, self.out_features - start)]
            part.copy_(weight[start:start + rows])
            self.slices.append(torch.ops.quantized.linear_prepack_fp16(
                part, None if bias is None else bias[start:start + rows]))

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype == torch.float32 and fbgemm_batch_invariant()

    @classmethod
    def batch_invariant(cls) -> bool:
        return fbgemm_batch_invariant()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        parts = [torch.ops.quantized.linear_dynamic_fp16(rows, packed) for packed in self.slices]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.view(*x.shape[:-1], self.out_features)

    def weight(self) -> torch.Tensor:
        return torch.cat([torch.ops.quantized.linear_unpack_fp16(packed)[0] for packed in self.slices])

    @classmethod
    def packing_bytes(cls, out_features: int, in_features: int) -> int:
        return min(out_features * in_features * 4, PACK_SLICE_BYTES)
