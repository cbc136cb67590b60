"""Matrices stored in THUDM's int8/int4 format (thudm.py) as model modules, multiplied by the route
registry.QUANTIZED_ORDER picks per call.

The route is a function of the tokens per sequence and the device, never of how many sequences share a
call: on the CPU a sequence's decode steps and output projection, and its prompt up to
PROMPT_KERNEL_MAX_TOKENS tokens, take the weight-only kernels (int8.py, int4.py), a longer prompt
dequant.py, and generate.py prefills the two kinds of prompt apart, so batching changes no bits. On CUDA:
cuda.py where its kernels passed their load-time checks, else dequant.py.

A QuantizedMatrix keeps THUDM's buffers and names (its state_dict is the checkpoint's) and tracks the
layout a route gave `weight` in place: the CPU int4 kernel's (made on the first CPU product, undone for
a state_dict or a move) or the CUDA int4 kernel's (made in prepare(), irreversible).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from .. import row_kernel
from ..errors import EngineError
from . import cpm, cuda, registry
from .base import apply_row_scales, method_class, scaling_dtype
from .layers import replace_module
from .int4 import _cpu_int4_layout_ok, _cpu_int4_pack, _cpu_int4_unpack, int4_block_rows
from .int8 import KERNEL_K_MULTIPLE
from .intdot import K_MULTIPLE as INT_DOT_K_MULTIPLE
from .dequant import DEQUANT_CHUNK_BYTES
from .thudm import LINEAR_NAMES, _check_bits, pack_int4, quantize_weight, unpack_int4

log = logging.getLogger(__name__)


class QuantizedMatrix(nn.Module):
    """A quantized [N, K] matrix in THUDM's format with `matmul(x) = x @ W^T` on the fastest path.

    Buffers (the state_dict, THUDM's names): `weight` int8 [N, K * bits / 8], `weight_scale` fp16 [N].
    """

    LAYOUT_THUDM, LAYOUT_CPU_INT4, LAYOUT_CUDA_INT4 = "thudm", "cpu-int4", "cuda-int4"

    def __init__(self, out_features: int, in_features: int, bits: int, device=None):
        super().__init__()
        _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 needs an even number of input features, got {in_features}")
        self.out_features, self.in_features, self.bits = out_features, in_features, bits
        self.register_buffer("weight", torch.empty(out_features, in_features * bits // 8, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float16, device=device))
        # What `weight` holds now; for the in-place CPU int4 layout, the (tensor, version) it was made for.
        self._layout = self.LAYOUT_THUDM
        self._layout_key: tuple | None = None
        self._scale_cache: tuple | None = None  # (weight_scale version key, dtype, scale in dtype)
        self._cuda_shape: torch.Size | None = None  # of `weight` seen as int32 in the CUDA int4 layout
        self.cuda_int8_rows = 0  # input rows up to which torch's CUDA int8 kernel is used (see prepare)
        self.cpm = False  # on a GPU before Ampere, multiplied by cpm.py's kernels (see prepare)
        self.own_kernels = False  # on the CPU glmpool's kernels give torch's bits here (row_kernel.py, prepare)
        self.own_int4_rows = False  # and take several int4 rows too (AVX-512)
        self.int8_activations = False  # on the CPU, route int-dot (quantized_activations="int8"; see prepare)
        self._register_state_dict_hook(_thudm_layout_state_dict_hook)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"

    def set_quantized(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        """Take (qweight, scale) in THUDM's layout as this matrix's content (no copy when possible)."""
        self.weight = qweight
        self.weight_scale = scale
        self._layout, self._layout_key, self._scale_cache = self.LAYOUT_THUDM, None, None

    # --- layouts ---------------------------------------------------------------------------------

    def _current_layout(self) -> str:
        if self._layout != self.LAYOUT_THUDM and self._layout_key != _tensor_key(self.weight):
            # overwritten in place since (a checkpoint copied in): the content is THUDM's again
            self._layout, self._layout_key = self.LAYOUT_THUDM, None
        return self._layout

    def _cpu_int4_ready(self) -> bool:
        """Lay `weight` out for the CPU int4 kernel (once, in place); False if the kernel can't be used."""
        if self._current_layout() == self.LAYOUT_CPU_INT4:
            return True
        if self.weight.device.type != "cpu" or not _cpu_int4_layout_ok() \
                or self.out_features < int4_block_rows() or self.in_features % KERNEL_K_MULTIPLE:
            return False
        w = self.weight
        with torch.no_grad():
            for start, rows in self._block_chunks():
                block = w[start:start + rows]  # a block of rows occupies the same bytes in both layouts
                block.copy_(_cpu_int4_pack(unpack_int4(block)).view(torch.int8))
        self._layout, self._layout_key = self.LAYOUT_CPU_INT4, _tensor_key(w)
        return True

    def to_cuda_int4_layout(self) -> bool:
        """See cuda.to_cuda_int4_layout."""
        return cuda.to_cuda_int4_layout(self)

    def _set_layout(self, layout: str, cuda_shape: torch.Size | None = None) -> None:
        """`weight` was just re-laid out in place as `layout` (by a route's module)."""
        self._layout, self._layout_key, self._cuda_shape = layout, _tensor_key(self.weight), cuda_shape

    def _to_thudm_layout_(self) -> None:
        if self._current_layout() == self.LAYOUT_CUDA_INT4:
            raise EngineError("int4 weights laid out for the CUDA kernel cannot be saved or moved: load the "
                              "checkpoint again instead")
        if self._current_layout() != self.LAYOUT_CPU_INT4:
            return
        w = self.weight
        with torch.no_grad():
            for start, rows in self._block_chunks():
                block = w[start:start + rows]
                block.copy_(pack_int4(_cpu_int4_unpack(block)))
        self._layout, self._layout_key = self.LAYOUT_THUDM, None

    def _blocked_rows(self) -> int:
        """How many leading rows the CPU int4 layout covers: whole blocks. The rest (fewer than a block,
        e.g. the last 32 of the 130528-row embedding table where blocks are 64 rows) stay in THUDM's
        layout and are multiplied apart."""
        return self.out_features // int4_block_rows() * int4_block_rows()

    def _block_chunks(self) -> Iterable[tuple[int, int]]:
        """(start, rows) covering the blocked rows in whole blocks of about DEQUANT_CHUNK_BYTES each."""
        B, head = int4_block_rows(), self._blocked_rows()
        rows = max(B, (DEQUANT_CHUNK_BYTES // max(1, self.weight.shape[1])) // B * B)
        return ((start, min(rows, head - start)) for start in range(0, head, rows))

    def thudm_weight(self) -> torch.Tensor:
        """`weight` in THUDM's layout (a converted copy while the CPU int4 layout is in place)."""
        if self._current_layout() == self.LAYOUT_CUDA_INT4:
            self._to_thudm_layout_()  # raises: there is no way back
        if self._current_layout() == self.LAYOUT_CPU_INT4:
            head = self._blocked_rows()
            return torch.cat((pack_int4(_cpu_int4_unpack(self.weight[:head])), self.weight[head:]))
        return self.weight

    def _apply(self, fn, recurse=True):
        # Moving or casting: hand over THUDM's layout, which every device understands. A cast of the model
        # (.float(), .to(dtype)) leaves the scales in fp16, as the format stores them (bf16 would round them).
        self._to_thudm_layout_()
        self._scale_cache = None
        scale = self.weight_scale
        result = super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return result

    # --- dequantization ----------------------------------------------------------------------------

    def _dequant_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start..stop of W [stop-start, K] in `dtype` (block-aligned while the CPU int4 layout is in place).

        Written straight into the float output (int8 * float promotes in one kernel), which matters on
        CPU where each pass over the matrix costs about as much as a small GEMM.
        """
        if self._current_layout() == self.LAYOUT_CUDA_INT4:
            self._to_thudm_layout_()  # raises: only the kernel reads that layout
        head = self._blocked_rows() if self.bits == 4 and self._current_layout() == self.LAYOUT_CPU_INT4 else 0
        if start < head < stop:
            return torch.cat((self._dequant_rows(start, head, dtype), self._dequant_rows(head, stop, dtype)))
        blocked = stop <= head
        block = self.weight[start:stop]  # [R, K * bits / 8]
        scale = self._scale(dtype)[start:stop]  # [R]
        R, K = block.shape[0], self.in_features
        if self.bits == 8:
            return torch.mul(block, scale[:, None])
        out = torch.empty(R, K, dtype=dtype, device=block.device)
        if blocked:
            B = int4_block_rows()
            bytes_ = block.view(torch.uint8).reshape(R // B, K, B // 2).transpose(1, 2).contiguous()  # [R/B, B/2, K]
            halves = out.view(R // B, 2, B // 2, K)  # rows j (low nibble), j + B/2 (high)
            row_scale = scale.view(R // B, 2, B // 2, 1)
            torch.mul((bytes_ & 0x0F).view(torch.int8) - 8, row_scale[:, 0], out=halves[:, 0])
            torch.mul((bytes_ >> 4).view(torch.int8) - 8, row_scale[:, 1], out=halves[:, 1])
        else:
            pairs = out.view(R, K // 2, 2)  # (even column: high nibble, odd column: low nibble)
            torch.mul(block >> 4, scale[:, None], out=pairs[..., 0])
            torch.mul((block << 4) >> 4, scale[:, None], out=pairs[..., 1])
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole matrix W [N, K] in `dtype`."""
        return self._dequant_rows(0, self.out_features, dtype)

    def _scale(self, dtype: torch.dtype) -> torch.Tensor:
        key = _tensor_key(self.weight_scale)
        cached = self._scale_cache
        if cached is None or cached[0] != key or cached[1] != dtype:
            cached = (key, dtype, self.weight_scale.to(dtype))
            self._scale_cache = cached
        return cached[2]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` [...] of W, dequantized: [..., K] (the embedding lookup)."""
        flat = ids.reshape(-1)
        if self.bits == 4 and self._current_layout() == self.LAYOUT_CPU_INT4:
            # row j of a block: the low nibbles of its byte column j, or the high ones of column j - B/2
            B, head = int4_block_rows(), self._blocked_rows()
            blocks = self.weight[:head].view(torch.uint8).view(head // B, self.in_features, B // 2)
            inside = flat.clamp(max=head - 1)  # the rows past the last block are read apart below
            bytes_ = blocks[inside // B, :, inside % (B // 2)]  # [T, K]
            high = (inside % B >= B // 2)[:, None]
            q = torch.where(high, bytes_ >> 4, bytes_ & 0x0F).view(torch.int8) - 8
            past = flat >= head
            if bool(past.any()):
                q[past] = unpack_int4(self.weight[flat[past]])
        else:
            q = self.weight[flat]
            if self.bits == 4:
                q = unpack_int4(q)
        out = q.to(dtype) * self.weight_scale[flat].to(dtype)[:, None]
        return out.view(*ids.shape, self.in_features)

    # --- matmul ---------------------------------------------------------------------------------

    def kernel_path(self, rows: int, device: torch.device, tokens: int = 1) -> str:
        """The route (registry.QUANTIZED_ORDER) `matmul` takes for `rows` input rows, `tokens` of them per
        sequence (1 in a decode step): the first that takes the call."""
        return next(name for name in registry.QUANTIZED_ORDER
                    if method_class(name).takes(self, rows, tokens, device))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, path: str | None = None) -> torch.Tensor:
        """x [..., K] -> x @ W^T + bias [..., N] in x's dtype; x [B, T, K]: T tokens of each of B sequences
        (see kernel_path), any other shape one row per sequence. `path` forces a route (tests, trials)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        path = path or self.kernel_path(x2.shape[0], x.device, tokens=shape[-2] if x.dim() >= 3 else 1)
        route = method_class(path)
        if route.biased:
            return route.apply(self, x2, bias).view(*shape[:-1], self.out_features)
        out = route.apply(self, x2)
        if not route.scaled:  # the kernel ran with unit scales: apply the row scales (and bias), in fp32 for fp16
            out = apply_row_scales(out, self._scale(scaling_dtype(x.dtype)), bias, x.dtype)
        elif bias is not None:
            out = out + bias
        return out.view(*shape[:-1], self.out_features)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (id(t), t.data_ptr(), t._version)


def _thudm_layout_state_dict_hook(module: QuantizedMatrix, state_dict: dict, prefix: str, local_metadata) -> None:
    if module._current_layout() != QuantizedMatrix.LAYOUT_THUDM:
        state_dict[prefix + "weight"] = module.thudm_weight()  # raises for the CUDA int4 layout


class QuantizedLinear(QuantizedMatrix):
    """nn.Linear's drop-in with a quantized weight: buffers `weight`, `weight_scale`, `bias` (THUDM's names)."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(out_features, in_features, bits, device)
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, empty: bool = False) -> "QuantizedLinear":
        """Quantize `linear` (empty=True: same shapes, uninitialized, for loading a quantized checkpoint)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        if not empty:
            module.set_quantized(*quantize_weight(weight.detach(), bits))
            if linear.bias is not None:
                module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class QuantizedEmbedding(QuantizedMatrix):
    """nn.Embedding's drop-in with a quantized table; `project` is the tied output projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, bits, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype  # what lookups return

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, empty: bool = False) -> "QuantizedEmbedding":
        weight = embedding.weight
        module = cls(embedding.num_embeddings, embedding.embedding_dim, bits, device=weight.device,
                     dtype=weight.dtype)
        if not empty:
            module.set_quantized(*quantize_weight(weight.detach(), bits))
        return module

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.dtype))  # follow the model's casts (.half(), .to(dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return result

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids, self.dtype)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., vocab] through the same quantized matrix."""
        return self.matmul(hidden)


def quantize_model(model: nn.Module, bits: int, embeddings: bool = False, empty: bool = False,
                   layers: bool = True) -> nn.Module:
    """Swap the four Linear kinds of every layer (and with `embeddings` the word embeddings, which also
    serve as the output projection) for quantized modules, in place; return the model.

    empty=True allocates uninitialized quantized buffers of the right shapes on the model's device (meta
    included) for a pre-quantized checkpoint to be copied into; otherwise the existing weights are
    quantized one matrix at a time and each fp matrix is released as soon as it is replaced, so the peak
    is the fp model plus one quantized matrix. layers=False leaves the layers as they are (e.g. a
    checkpoint stored quantized without its embeddings).
    """
    _check_bits(bits)
    for layer in model.layers if layers else ():
        for name in LINEAR_NAMES:
            linear = layer.get_submodule(name)
            if isinstance(linear, QuantizedMatrix):
                raise ValueError(f"{name} is already quantized")
            replace_module(layer, name, QuantizedLinear.from_linear(linear, bits, empty=empty))
            del linear
    if embeddings:
        embedding = model.word_embeddings
        if isinstance(embedding, QuantizedMatrix):
            raise ValueError("word_embeddings is already quantized")
        # also the output projection: ChatGLM.output_logits uses its `project`
        model.word_embeddings = QuantizedEmbedding.from_embedding(embedding, bits, empty=empty)
        del embedding
    log.info("quantized %s to int%d%s", "the layers" if layers else "nothing in the layers", bits,
             " and the embeddings" if embeddings else "")
    return model


def quantized_modules(model: nn.Module) -> Iterable[tuple[str, QuantizedMatrix]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, QuantizedMatrix))


def prepare(model: nn.Module, quantized_activations: str = registry.DEFAULT_QUANTIZED_ACTIVATIONS) -> nn.Module:
    """Build the kernel layouts now (right after loading): CPU int4 on the first forward otherwise; CUDA int4
    (the layers' matrices: a lookup table must stay in THUDM's layout) only here. On CUDA, also decide
    whether cpm.py's kernels take every matrix (a GPU before Ampere) and else where torch's int8 kernel is
    used; on the CPU, whether route int-dot takes a matrix (`quantized_activations` "int8", where its kernel
    runs: THUDM's layout is kept) and else whether glmpool's kernels may stand in for torch's."""
    if quantized_activations not in registry.QUANTIZED_ACTIVATIONS:  # load() said so to its caller already
        raise ValueError(f"quantized_activations must be one of {registry.QUANTIZED_ACTIVATIONS}")
    dtype = getattr(model, "dtype", torch.float16)
    cpu = torch.device("cpu")
    int_dot = quantized_activations == "int8" and method_class("int-dot").usable(cpu, torch.float32)
    if quantized_activations == "int8" and not int_dot and any(
            m.weight.device.type == "cpu" for _, m in quantized_modules(model)):
        log.info("glmpool's int8-activation kernel cannot run here (not built, no AVX2, or %s=none): quantized "
                 "matrices multiply bf16 activations instead", row_kernel.ISA_ENV)
    for _, module in quantized_modules(model):  # a GPU before Ampere: cpm.py's kernels, where they work
        device = module.weight.device
        module.cpm = device.type == "cuda" and cpm.fits(module.bits, module.in_features, dtype) \
            and method_class("cpm-cuda").usable(device, dtype)
    int8_cuda = [m for _, m in quantized_modules(model)
                 if m.bits == 8 and m.weight.device.type == "cuda" and not m.cpm]
    if int8_cuda:
        judged = next((m for m in int8_cuda if isinstance(m, QuantizedLinear)), int8_cuda[0])
        rows = cuda.cuda_int8_rows(judged, dtype)
        for module in int8_cuda:
            module.cuda_int8_rows = rows
    broken = None
    for name, module in quantized_modules(model):
        module.int8_activations = int_dot and module.weight.device.type == "cpu" \
            and module.in_features % INT_DOT_K_MULTIPLE[module.bits] == 0
        if module.int8_activations:
            module._to_thudm_layout_()  # the kernel reads THUDM's layout (a no-op unless prepared for bf16 before)
            continue
        if module.bits == 8 and module.weight.device.type == "cpu":
            module.own_kernels = row_kernel.int8_matches_torch()
        if module.bits != 4:
            continue
        if module.weight.device.type == "cpu":
            module.own_kernels = module._cpu_int4_ready() and row_kernel.int4_matches_torch(int4_block_rows())
            module.own_int4_rows = module.own_kernels and row_kernel.int4_rows_available(int4_block_rows())
        elif module.weight.device.type == "cuda" and isinstance(module, QuantizedLinear) and broken is None \
                and not module.cpm:
            try:
                module.to_cuda_int4_layout()  # False for a shape it does not take: that matrix is dequantized
            except (RuntimeError, NotImplementedError) as error:  # no such kernel, a GPU before Ampere, wrong results
                broken = f"{name}: {error}"
    if broken:
        log.warning("torch's CUDA int4 kernel cannot be used (%s); int4 matrices are dequantized for every "
                    "product instead, which is slower than fp16", broken)
    return model
