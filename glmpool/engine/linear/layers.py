"""The modules that carry a packed weight in a model, and the packing of a loaded model into them.

The model is built from plain layers (reference.Linear and reference.Embedding: THUDM's arithmetic) and
never names a kernel; after the checkpoint is read, pack_model() swaps each float matrix, one at a time,
for a PackedLinear or TiedEmbedding holding the chosen method's packed form of it (quantized matrices
are already QuantizedLinear / QuantizedEmbedding, which choose their route per call).
"""
from __future__ import annotations

import copy
import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from .. import hugepages
from .base import WeightMethod
from .reference import Embedding, Linear


def replace_module(parent: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put `new` where `parent.<dotted>` is (e.g. "attention.dense")."""
    *path, name = dotted.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, name, new)


class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives only in its method's packed form (left out of the state_dict).
    Inference only: load the checkpoint first, then pack."""

    def __init__(self, method: WeightMethod, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method

    @property
    def weight(self) -> torch.Tensor:
        return self.method.weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(x)

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.method.held_tensors()

    def __deepcopy__(self, memo: dict) -> PackedLinear:  # a packed form may be opaque: pack a copy anew
        bias = getattr(self.method, "bias", None)
        method = type(self.method)(self.weight, copy.deepcopy(bias, memo))
        return PackedLinear(method, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method.name}"


class TiedEmbedding(nn.Module):
    """The word embeddings: rows looked up in a plain table (in the method's table_dtype), widened to the
    method's fp32, and the tied output projection `project` [..., H] -> [..., vocab] by the method on its
    packed copy. The table is a plain attribute: no cast of the model may widen it."""

    def __init__(self, weight: torch.Tensor, method_class: type[WeightMethod]):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.table = weight.detach().to(method_class.table_dtype or weight.dtype)
        self.method = method_class(weight.detach(), None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).float()

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.method.apply(hidden)

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.table, *self.method.held_tensors())

    def __deepcopy__(self, memo: dict) -> TiedEmbedding:
        return TiedEmbedding(copy.deepcopy(self.table, memo), type(self.method))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, projection by {self.method.name}"


def release_free_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps them, and a packed copy, a little larger than its
    original, does not fit the hole the original leaves: without this, a packed model keeps its own size
    again in free pages."""
    trim = hugepages.libc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is not None:
        trim(0)


def pack_model(model: nn.Module, method: type[WeightMethod]) -> int:
    """Replace every float Linear and the word Embedding (reference.Linear / reference.Embedding; what is
    quantized stays so) by its form packed for `method`, one matrix at a time: each original is dropped
    from the model before its packed copy is made and its pages given back after, so memory holds at most
    one matrix twice. Layer norms become fp32 (a model may be loaded in fp16 to spare memory). Returns how
    many matrices were packed."""
    names = [name for name, module in model.named_modules() if type(module) in (Linear, Embedding)]
    for name in names:
        source = model.get_submodule(name)
        weight = source.weight.detach()
        bias = None if isinstance(source, Embedding) or source.bias is None else source.bias.detach()
        replace_module(model, name, nn.Identity())
        packed = TiedEmbedding(weight, method) if isinstance(source, Embedding) else \
            PackedLinear(method(weight, bias), source.in_features, source.out_features)
        del source, weight, bias
        replace_module(model, name, packed)
        release_free_memory()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    return len(names)
