"""A decode step's attention for a batch in a KV slab, by glmpool's CPU kernel (decode_attention.c).

Per sequence and head, one pass: rotate the new query and key, store the key and value in the slab,
attend over the sequence's own positions. torch needs ~20 calls a layer for that (model.PaddedDecode)
and reads the cache through batched GEMVs at about half the memory's speed.

Every (sequence, head) is computed alone in a fixed order, so a sequence gets the same bits whatever it
is batched with, without padding and without the probe that padding needs (model.padded_attention_exact).
The arithmetic is its own (16-lane dot products, position-ordered sums, libm's expf), close to torch's but
not bit-equal to it: prompts still attend through torch, decode steps through this.
"""
from __future__ import annotations

import math

import torch

from . import row_kernel


def usable(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """fp32 on the CPU, heads a multiple of 16 wide, the kernels built for this CPU."""
    return device.type == "cpu" and dtype == torch.float32 and head_dim % 16 == 0 and row_kernel.available()


def attend(layer: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
           scores: torch.Tensor, layer_scale: float, parts: int, isa: int | None = None,
           longest: int | None = None) -> torch.Tensor:
    """layer: one layer of a slab [2, slots, n, capacity, d], sequence b in slot b (written at positions);
    qkv [B, n, 3, d] (THUDM's query_key_value rows); cos, sin [B, d] (model.rotary_tables at each
    sequence's position, sin signed; parts 2 with 2D positions); positions [B] int64, where each new key
    and value go; scores: scratch, [B * n, > positions.max()]. Returns the context [B, n, d].
    isa: 512, 256 or 0 (plain C) to pick a variant (the same bits; for tests); None: this CPU's.
    longest: positions.max(), where the caller knows it (the check reads it otherwise, every layer)."""
    B, n, _, d = qkv.shape
    _, slots, _, capacity, _ = layer.shape
    assert layer.is_contiguous() and layer.dtype == torch.float32 and B <= slots and layer.shape[2] == n
    assert positions.dtype == torch.int64 and positions.is_contiguous() and positions.numel() == B
    longest = int(positions.max()) if longest is None else longest
    assert longest < min(capacity, scores.shape[1]) and scores.shape[0] >= B * n
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    context = torch.empty(B, n, d)
    kernels = row_kernel.library()
    kernels.glmpool_decode_attention(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), layer.data_ptr(), positions.data_ptr(), scores.data_ptr(),
        context.data_ptr(), B, n, d, slots, capacity, scores.stride(0), parts, math.sqrt(d) * layer_scale,
        layer_scale, kernels.isa if isa is None else isa)
    return context
