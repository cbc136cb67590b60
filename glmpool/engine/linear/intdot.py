"""CPU int8 and int4: THUDM's matrices as stored times activations quantized to int8 on the fly, multiplied
in integers by glmpool's kernel (int_dot.c, row_kernel.int_dot) — the `quantized_activations="int8"` route.

Each row of activations is quantized per block of 32 inputs (ggml's q8_0, as chatglm.cpp runs it):
scale = max|x| / 127, x / scale rounded to nearest. A block's products are summed exactly in integers;
each output adds its blocks' scaled sums in block order in fp32, then applies the fp16 row scale (and the
bias). So a row's bits depend on nothing but the row, whatever the rows around it: batch-invariant by
construction, without imitating torch's order. The price is precision: an activation is rounded to within
1/254 of its block's largest |x| (bf16: within 1/512 of its own magnitude), so an outlier channel flattens
its block's other 31 values; docs/benchmarks.md has the measured agreement.

Decode steps, the output projection and prompts of up to PROMPT_KERNEL_MAX_TOKENS tokens; longer prompts
are dequantized as on the other routes (dequant.py). int4 needs no re-layout: the activations are stored
in the nibbles' order instead, so a model on this route keeps THUDM's layout in memory.
"""
from __future__ import annotations

import torch

from .. import row_kernel
from .base import QuantizedRoute
from .registry import PROMPT_KERNEL_MAX_TOKENS

K_MULTIPLE = {8: 32, 4: 64}  # the kernel takes blocks of 32 inputs, int4 two at a time


class IntDot(QuantizedRoute):
    name = "int-dot"
    scaled = biased = True  # the kernel applies the row scales and the bias

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and row_kernel.available() and row_kernel.library().isa >= 256

    @classmethod
    def batch_invariant(cls) -> bool:
        return True

    @classmethod
    def takes(cls, matrix, rows: int, tokens: int, device: torch.device) -> bool:
        # int8_activations: set by quantized.prepare() where usable() and the matrix's K fits the kernel
        return (matrix.int8_activations and device.type == "cpu" and tokens <= PROMPT_KERNEL_MAX_TOKENS
                and matrix._current_layout() == matrix.LAYOUT_THUDM)

    @classmethod
    def apply(cls, matrix, x2: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x2 [M, K] -> [M, N] in x2's dtype, the row scales and bias applied in fp32
        out = row_kernel.int_dot(x2, matrix.weight, matrix._scale(torch.float32),
                                 None if bias is None else bias.float().contiguous(), matrix.bits)
        return out if x2.dtype == torch.float32 else out.to(x2.dtype)
