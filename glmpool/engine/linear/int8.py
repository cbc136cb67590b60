"""CPU int8: torch's weight-only int8 kernel on THUDM's int8 matrix as stored, or glmpool's where it
gives the same bits (row_kernel.py).

Decoding is bound by memory, and these read one byte per weight. The kernels run with unit scales (the
fp16 row scales are applied after, in the model's dtype) on bf16 activations, as int4.py's do. They take
a sequence's decode steps and output projection and its prompt up to PROMPT_KERNEL_MAX_TOKENS tokens;
longer prompts are dequantized (dequant.py), where a GEMM amortizes the weights over the rows.
"""
from __future__ import annotations

import functools

import torch

from .. import row_kernel
from .base import QuantizedRoute, kernel_check, unit_scales
from .registry import PROMPT_KERNEL_MAX_TOKENS

KERNEL_K_MULTIPLE = 32  # the CPU kernels misbehave (garbage, crashes) unless K is a multiple of 8; be safe
OWN_INT8_ROWS_FROM = 5  # from 2 to 4 rows torch's int8 kernel is as fast (its tiles hold 4)


@functools.cache
def _cpu_int8_kernel_ok() -> bool:
    def probe(g: torch.Generator) -> bool:
        q = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
        x = torch.randn(3, 64, generator=g).bfloat16()
        out = torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=torch.bfloat16))
        return torch.allclose(out.float(), x.float() @ q.float().t(), rtol=2e-2, atol=0.5)
    return kernel_check("int8", probe)


def int8_times(x_bf16: torch.Tensor, weight: torch.Tensor, own_kernels: bool) -> torch.Tensor:
    """bf16 [M, K] x int8 [N, K]^T -> bf16 [M, N], unit scales; through glmpool's kernels if asked (the same
    bits, faster for a lone row and from OWN_INT8_ROWS_FROM rows)."""
    if own_kernels and (x_bf16.shape[0] == 1 or x_bf16.shape[0] >= OWN_INT8_ROWS_FROM):
        return row_kernel.int8_times(x_bf16, weight)
    return torch.ops.aten._weight_int8pack_mm(x_bf16, weight, unit_scales("int8", (weight.shape[0],)))


class Int8(QuantizedRoute):
    name = "int8"

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and _cpu_int8_kernel_ok()

    @classmethod
    def batch_invariant(cls) -> bool:
        return True

    @classmethod
    def takes(cls, matrix, rows: int, tokens: int, device: torch.device) -> bool:
        return (device.type == "cpu" and matrix.bits == 8 and tokens <= PROMPT_KERNEL_MAX_TOKENS
                and matrix.in_features % KERNEL_K_MULTIPLE == 0 and _cpu_int8_kernel_ok())

    @classmethod
    def apply(cls, matrix, x2: torch.Tensor) -> torch.Tensor:
        if matrix.in_features % KERNEL_K_MULTIPLE:
            raise RuntimeError(f"the CPU kernels need in_features % {KERNEL_K_MULTIPLE} == 0")
        return int8_times(x2.to(torch.bfloat16).contiguous(), matrix.weight, matrix.own_kernels)
