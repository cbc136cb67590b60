"""fp16 weights, fp32 arithmetic, on the CPU: by glmpool's kernel where it is built (AVX-512 or AVX2), else
through FBGEMM (bundled with torch's x86 builds) where it is batch-invariant.

Decoding one sequence reads every weight once per token, so bytes per weight set its speed. THUDM
publishes ChatGLM-6B in fp16: held as fp16, the weights lose nothing and take half the memory of fp32
(~13 GB instead of ~25 GB for the 6B model); both kernels widen them to fp32 in registers as they stream
them, and everything outside the matmuls stays fp32.

glmpool's kernel (row_kernel.rows_times_half; `matmul="fp16"`) multiplies any number of rows: one
sequence's decode step, a batch's, a prompt. Each output is summed in the same order whatever the rows,
so batching cannot change a result by construction. Measured on this project's 2-core machine against
FBGEMM: 1.3-1.9x for one row on the layers' shapes (1.06x on the output projection, where both stream at
memory speed), 1.1-1.25x at 16 rows (~210 against ~150-190 GFLOP/s), 1.04-1.07x for a 944-row prefill.
FBGEMM (`matmul="fbgemm-fp16"`, and wherever the kernel is missing) splits the rows into tiles of 1-6
(AVX2) or 1-14 (AVX-512) and picks one micro-kernel per tile height: with AVX-512 they all sum alike, but
its AVX2 kernels for tiles of 1 and 2 rows sum in another order than those for 3-6, so there a row's bits
depend on how many rows go with it. fbgemm_batch_invariant() finds that out once per process, and the
engine uses FBGEMM only where it holds (tests/test_half.py checks the kernels; tests/test_onednn.py every
logit, batched and alone). FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes FBGEMM use its AVX2 kernels on an AVX-512
CPU (.ci/run's second pass).

The tied embedding table is kept twice in fp16: plain for the lookup and packed for the output
projection (together the size of one fp32 copy).
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import hugepages, row_kernel
from .quantize import replace_module


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


def kernel_available() -> bool:
    return row_kernel.available()


def usable(device: torch.device, dtype: torch.dtype, own_kernel: bool) -> bool:
    """Whether fp16 weights can be multiplied here, batch-invariant, by glmpool's kernel (own_kernel) or FBGEMM."""
    ready = kernel_available() if own_kernel else fbgemm_batch_invariant()
    return device.type == "cpu" and dtype == torch.float32 and ready


class HalfMatrix:
    """A weight [out, in] (+ bias) rounded to fp16, in the layout of the kernel that multiplies it: glmpool's
    (row_kernel.pack_half; bias kept apart in fp32) or FBGEMM's (an opaque object holding the bias)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, own_kernel: bool):
        self.out_features = weight.shape[0]
        self.own_kernel = own_kernel
        bias = None if bias is None else bias.detach().float()
        if own_kernel:
            self.packed, self.bias = row_kernel.pack_half(weight.detach()), bias
        else:
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (fp32) @ weight^T (+ bias) -> [..., out] (fp32)."""
        rows = x.reshape(-1, x.shape[-1])
        if self.own_kernel:
            out = row_kernel.rows_times_half(rows, self.packed, self.bias, self.out_features)
        else:
            out = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
        return out.view(*x.shape[:-1], self.out_features)

    def weight(self) -> torch.Tensor:
        """A plain fp32 copy of the (fp16-rounded) weight."""
        if self.own_kernel:
            return row_kernel.unpack_half(self.packed, self.out_features)
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        """The packed weight where it is a tensor (for hugepages.weights_on_huge_pages)."""
        return (self.packed,) if self.own_kernel else ()

    def describe(self) -> str:
        return "fp16 weights (" + ("glmpool's kernel" if self.own_kernel else "FBGEMM") + ")"


class HalfLinear(nn.Module):
    """An nn.Linear whose weight lives only as a HalfMatrix (left out of the state_dict)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, own_kernel: bool):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.matrix = HalfMatrix(weight, bias, own_kernel)

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix.weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix.times(x)

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.matrix.held_tensors()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.matrix.describe()}"


class HalfEmbedding(nn.Module):
    """The tied word embeddings in fp16: rows looked up and widened to fp32, and the output projection
    `project` [B, H] -> [B, vocab] as a HalfMatrix. CPU only; casts (.float(), .to()) leave it as it is."""

    def __init__(self, weight: torch.Tensor, own_kernel: bool):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.table = weight.detach().half()  # a plain attribute: no module cast may widen it
        self.matrix = HalfMatrix(weight, None, own_kernel)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).float()

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.matrix.times(hidden)

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.matrix.held_tensors()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, projection by {self.matrix.describe()}"


def release_free_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps them, and a packed copy, a little larger than its
    original, does not fit the hole the original leaves: without this, a packed model keeps its own size
    again in free pages."""
    trim = hugepages.libc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is not None:
        trim(0)


def pack_model(model: nn.Module, own_kernel: bool) -> int:
    """Replace every nn.Linear and nn.Embedding of a model by its fp16 form, one matrix at a time
    (memory holds at most one matrix twice), and make the layer norms fp32 (a model may be loaded in fp16
    to spare memory). Returns how many matrices were packed."""
    names = [name for name, module in model.named_modules() if type(module) in (nn.Linear, nn.Embedding)]
    for name in names:
        source = model.get_submodule(name)
        embedding = isinstance(source, nn.Embedding)
        weight = source.weight.detach()  # as loaded (fp16 from THUDM's checkpoints); HalfMatrix rounds to fp16
        bias = None if embedding or source.bias is None else source.bias.detach()
        # The original goes before its packed copy is made, and its pages back to the OS after: packing a
        # model loaded in fp16 peaks near its fp16 size (tests/test_engine.py measures it).
        replace_module(model, name, nn.Identity())
        del source
        replace_module(model, name, HalfEmbedding(weight, own_kernel) if embedding
                       else HalfLinear(weight, bias, own_kernel))
        del weight, bias
        release_free_memory()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    return len(names)
