"""Dequantize, then multiply: blocks of rows of a THUDM-format matrix widened to the activations' dtype
and multiplied by a GEMM, whose cost is then amortized over the rows.

On the CPU this takes prompts longer than PROMPT_KERNEL_MAX_TOKENS (the weight-only kernels lose to it
there) through oneDNN's fp32 GEMM, which sums a row the same way among 2 or 2000 others; elsewhere, and
for what no kernel reads (a GPU without the int4 kernel, int8 where its kernel lost the load-time trial,
the int4 -qe embeddings on CUDA), THUDM's own scheme. It saves memory, not time.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import onednn
from .base import QuantizedRoute
from .int4 import INT4_BLOCK_CANDIDATES
from .registry import PROMPT_KERNEL_MAX_TOKENS

DEQUANT_CHUNK_BYTES = 8 << 20  # dequantized block size on CPU (fits in L2/L3 next to its GEMM)
CUDA_DEQUANT_CHUNK_BYTES = 256 << 20  # bounds the temporary fp16 copy of a huge matrix (the -qe lm_head)


def _gemm(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ weight [N, K]^T. On the CPU in fp32 through oneDNN, which sums each row alike for any
    M >= 2 (the prompts that come here are long), so a prompt's numbers do not depend on the others
    prefilled with it; MKL's (F.linear) change with M."""
    if x2.device.type == "cpu" and x2.dtype == torch.float32 and x2.shape[0] > 1 and onednn.available():
        return onednn.linear(x2, weight, None)
    return F.linear(x2, weight)


@functools.cache
def gemm_batch_invariant() -> bool:
    """Whether _gemm gives a prompt's rows (of PROMPT_KERNEL_MAX_TOKENS + 1) the same bits alone as among
    other prompts', probed once on the CPU in fp32."""
    generator = torch.Generator().manual_seed(0)
    tokens = PROMPT_KERNEL_MAX_TOKENS + 1
    weight, x = torch.randn(192, 256, generator=generator), torch.randn(8 * tokens, 256, generator=generator)
    together = _gemm(x, weight)
    return all(torch.equal(_gemm(x[i * tokens:(i + 1) * tokens], weight), together[i * tokens:(i + 1) * tokens])
               for i in range(8))


class Dequant(QuantizedRoute):
    name = "dequant"
    scaled = True

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    @classmethod
    def batch_invariant(cls) -> bool:
        return gemm_batch_invariant()

    @classmethod
    def takes(cls, matrix, rows: int, tokens: int, device: torch.device) -> bool:
        return True

    @classmethod
    def apply(cls, matrix, x2: torch.Tensor) -> torch.Tensor:
        """Dequantize blocks of rows to x's dtype and multiply: [M, K] -> [M, N] (no bias)."""
        dtype, N, K = x2.dtype, matrix.out_features, matrix.in_features
        limit = CUDA_DEQUANT_CHUNK_BYTES if x2.device.type == "cuda" else DEQUANT_CHUNK_BYTES
        align = max(INT4_BLOCK_CANDIDATES)  # a multiple of every int4 layout block
        rows = max(align, limit // (K * x2.element_size()) // align * align)
        if rows >= N:
            return _gemm(x2, matrix._dequant_rows(0, N, dtype))
        out = torch.empty(x2.shape[0], N, dtype=dtype, device=x2.device)
        for start in range(0, N, rows):
            stop = min(N, start + rows)
            out[:, start:stop] = _gemm(x2, matrix._dequant_rows(start, stop, dtype))
        return out
