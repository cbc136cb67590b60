"""fp16 weights, fp32 arithmetic, on the CPU through FBGEMM (bundled with torch's x86 builds).

Decoding one sequence reads every weight once per token, so bytes per weight set its speed. THUDM
publishes ChatGLM-6B in fp16: held as fp16, the weights lose nothing, take half the memory of fp32 (~13 GB
instead of ~25 GB for the 6B model), and FBGEMM's fp16 GEMM converts them to fp32 in registers as it
streams them: measured on this project's 2-core machine, 2.2-3.2x oneDNN's fp32 speed for one row,
1.2-1.3x for 16 rows, even at 64 (activations, sums and everything outside the matmuls stay fp32).
Like onednn.py it is batch-invariant: a row's result does not depend on the rows multiplied with it
(tests/test_onednn.py checks every logit, batched and alone).

The tied embedding table is kept twice in fp16: plain for the lookup and packed for the output
projection (together the size of one fp32 copy).
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import replace_module


@functools.cache
def available() -> bool:
    """FBGEMM's fp16 linear is present (x86 builds) and computes a known product right."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.arange(12.0).view(3, 4), None)
        out = torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 4), packed)
        return bool(torch.equal(out, torch.tensor([[6.0, 22.0, 38.0]])))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and available()


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.ScriptObject:
    """weight [out, in] rounded to fp16 in FBGEMM's layout (bias, if any, kept in fp32 and added)."""
    return torch.ops.quantized.linear_prepack_fp16(weight.detach().float(),
                                                   None if bias is None else bias.detach().float())


def linear(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """x [..., in] (fp32) @ weight^T (+ bias) -> [..., out] (fp32)."""
    out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]), packed)
    return out.view(*x.shape[:-1], out.shape[-1])


class HalfLinear(nn.Module):
    """An nn.Linear whose weight lives only in FBGEMM's packed fp16 layout (left out of the state_dict)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = pack(weight, bias)

    @property
    def weight(self) -> torch.Tensor:
        """A plain fp32 copy of the (fp16-rounded) weight."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weights (FBGEMM)"


class HalfEmbedding(nn.Module):
    """The tied word embeddings in fp16: rows looked up and widened to fp32, and the output projection
    `project` [B, H] -> [B, vocab] through FBGEMM. CPU only; casts (.float(), .to()) leave it as it is."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.table = weight.detach().half()  # a plain attribute: no module cast may widen it
        self.packed = pack(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).float()

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.packed)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fp16 (FBGEMM projection)"


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps them, and a packed copy, a little larger than its
    original, does not fit the hole the original leaves: without this, a packed model keeps its own size
    again in free pages."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def pack_model(model: nn.Module) -> int:
    """Replace every nn.Linear and nn.Embedding of a model by its fp16 FBGEMM form, one matrix at a time
    (memory holds at most one matrix twice), and make the layer norms fp32 (a model may be loaded in fp16
    to spare memory). Returns how many matrices were packed."""
    names = [name for name, module in model.named_modules() if type(module) in (nn.Linear, nn.Embedding)]
    for name in names:
        source = model.get_submodule(name)
        embedding = isinstance(source, nn.Embedding)
        weight = source.weight.detach().float()
        bias = None if embedding or source.bias is None else source.bias.detach().float()
        # The original goes before its packed copy is made, and its pages back to the OS after: packing a
        # model loaded in fp16 peaks near its fp16 size (tests/test_engine.py measures it).
        replace_module(model, name, nn.Identity())
        del source
        replace_module(model, name, HalfEmbedding(weight) if embedding else HalfLinear(weight, bias))
        del weight, bias
        release_free_memory()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    return len(names)
