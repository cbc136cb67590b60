"""CPU int4: torch's weight-only int4 kernel, or glmpool's where it gives the same bits (row_kernel.py),
on the matrix re-laid out in place for them.

torch's kernel (`aten._weight_int4pack_mm_for_cpu`) reads unsigned nibbles (q + 8) in a blocked layout:
for every block of B output rows (B = 64 with AVX-512, else 32; int4_block_rows) and every column k, B/2
bytes; byte j holds row j's nibble low and row j + B/2's high. Same byte count as THUDM's, so quantized.py
re-lays the matrix out **in place** on its first CPU product (memory holds one copy) and back for a
state_dict. The kernel runs with unit scales (the fp16 row scales are applied after, in the model's
dtype, so they lose nothing) on bf16 activations: on CPUs without native bf16 math it is fast only so,
and bf16's 0.4% per element is less than the int4 weights' own rounding.
"""
from __future__ import annotations

import functools

import torch

from .. import row_kernel
from .base import QuantizedRoute, int4_unit_groups, kernel_check
from .int8 import KERNEL_K_MULTIPLE, int8_times
from .registry import PROMPT_KERNEL_MAX_TOKENS
from .thudm import unpack_int4

INT4_BLOCK_CANDIDATES = (64, 32)  # output rows per block of the CPU int4 layout: 64 with AVX-512, else 32


def _cpu_int4_pack(q: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """signed int8 [R, K] (R a multiple of the block) -> uint8 [R, K/2] in the CPU int4 kernel's layout:
    per block of B output rows, for each k, B/2 bytes holding row j in the low and row j + B/2 in the
    high nibble."""
    R, K = q.shape
    B = block or int4_block_rows()
    u = (q + 8).to(torch.uint8).view(R // B, 2, B // 2, K)  # [R/B, 2, B/2, K]
    packed = u[:, 0] | (u[:, 1] << 4)  # [R/B, B/2, K]
    return packed.transpose(1, 2).contiguous().view(R, K // 2)  # [R/B, K, B/2] flattened


def _cpu_int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] in the CPU int4 kernel's layout -> signed int8 [R, K]."""
    R, half = packed.shape
    K, B = half * 2, int4_block_rows()
    blocks = packed.view(torch.uint8).reshape(R // B, K, B // 2).transpose(1, 2)
    q = torch.stack((blocks & 0x0F, blocks >> 4), dim=1)  # [R/B, 2, B/2, K]
    return (q.view(torch.int8) - 8).reshape(R, K)


@functools.cache
def int4_block_rows() -> int:
    """The block size of this torch's CPU int4 layout (it depends on the CPU), or 0 if none is known."""
    try:
        q = torch.randint(-8, 8, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).to(torch.int32), 1).view(torch.uint8)
    except (RuntimeError, AttributeError):
        return 0
    return next((b for b in INT4_BLOCK_CANDIDATES if torch.equal(_cpu_int4_pack(q, b), theirs)), 0)


@functools.cache
def _cpu_int4_layout_ok() -> bool:
    """Whether this torch's CPU int4 kernel uses the layout above (checked once against torch's packer)."""
    def probe(g: torch.Generator) -> bool:
        q = torch.randint(-8, 8, (128, 128), generator=g, dtype=torch.int8)
        reference = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).to(torch.int32), 1)
        x = torch.randn(3, 128, generator=g).bfloat16()
        ones = torch.ones(1, 128, 2, dtype=torch.bfloat16)
        ones[..., 1] = 0
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, reference, 128, ones)
        return int4_block_rows() > 0 and torch.equal(reference.view(torch.uint8), _cpu_int4_pack(q)) \
            and torch.allclose(out.float(), x.float() @ q.float().t(), rtol=2e-2, atol=0.5)
    return kernel_check("int4", probe)


class Int4(QuantizedRoute):
    name = "int4"

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and _cpu_int4_layout_ok()

    @classmethod
    def batch_invariant(cls) -> bool:
        return True

    @classmethod
    def takes(cls, matrix, rows: int, tokens: int, device: torch.device) -> bool:
        return (device.type == "cpu" and matrix.bits == 4 and tokens <= PROMPT_KERNEL_MAX_TOKENS
                and matrix.in_features % KERNEL_K_MULTIPLE == 0 and matrix._cpu_int4_ready())

    @classmethod
    def apply(cls, matrix, x2: torch.Tensor) -> torch.Tensor:
        # bf16 [M, K] x int4 (q + 8, blocked) [N, K/2] -> bf16 [M, N], unit scales and zero points
        if not matrix._cpu_int4_ready():
            raise RuntimeError("the CPU int4 kernel cannot be used for this matrix")
        head, block = matrix._blocked_rows(), int4_block_rows()
        x_bf16 = x2.to(torch.bfloat16).contiguous()
        if matrix.own_kernels and (x2.shape[0] == 1 or matrix.own_int4_rows):  # the same bits, faster
            out = row_kernel.int4_times(x_bf16, matrix.weight, head, block)
        else:
            group, scales_zeros = int4_unit_groups(matrix.in_features, head, x2.device)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, matrix.weight[:head].view(torch.uint8),
                                                             group, scales_zeros)
        if head == matrix.out_features:
            return out
        # The rows past the last block, as int8: like every route here, the same bits alone and batched.
        tail = int8_times(x_bf16, unpack_int4(matrix.weight[head:]), row_kernel.int8_matches_torch())
        return torch.cat((out, tail), dim=1)
