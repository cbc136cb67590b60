"""THUDM's own arithmetic: the layers the model is built from, and the method every other falls back to.

A single sequence (a prompt, or decoding alone) goes through F.linear exactly as THUDM's code does, so
greedy output is bit-identical to theirs. One decode step of several sequences takes another route:
MKL's GEMM repacks the whole weight on every call for a handful of rows, so (W @ x^T)^T, which streams W
once, is used instead; its sums differ from F.linear's, so here batching changes a sequence's numbers
(not its greedy tokens, in the tests). The other methods are built to avoid exactly that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import WeightMethod


def several_sequences_one_token(x: torch.Tensor) -> bool:
    """x [B, T, in] with T = 1 and B > 1 (a batch's decode step), or [B, H] with B > 1 (its output projection)."""
    return x.shape[0] > 1 and (x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1))


def multiply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight^T + bias, as THUDM's code computes it for one sequence (see the docstring)."""
    if several_sequences_one_token(x):
        out = (weight @ x.reshape(x.shape[0], -1).t()).t()
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


class Reference(WeightMethod):
    name = "reference"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self._weight, self.bias = weight, bias

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return multiply(x, self._weight, self.bias)

    def weight(self) -> torch.Tensor:
        return self._weight


class Linear(nn.Linear):
    """The model's linear layer as the checkpoint fills it; pack_model swaps it for the chosen method."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multiply(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """The model's word embeddings, which are also its output projection (`project`)."""

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return multiply(hidden, self.weight, None)
