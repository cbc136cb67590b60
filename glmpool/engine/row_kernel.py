"""Rows times a weight, by glmpool's own kernels (row_kernel.c), where torch's are slow; the ctypes
binding every linear method that uses them goes through (linear/onednn.py, fp16.py, int8.py, int4.py).

Decoding one sequence multiplies one row by every weight, and streaming the weights is its speed; torch's
kernels for a lone row stream well below the memory's bandwidth (docs/benchmarks.md has the figures):
- fp32: row_times_packed reads the buffer oneDNN reordered the weight into (no second copy) and sums in
  the order oneDNN's multi-row matmul does; linear/onednn.py checks that per weight before using it.
- int8 (THUDM's row-major bytes): int8_times; for several rows (a batch's decode step) it widens each
  block of weights once for 4 or 8 rows.
- int4 (torch's CPU layout): int4_times leaves out the scale-and-zero multiply-add, which unit scales
  make exact anyway (bound by decoding the nibbles, not by the memory).
  Both sum as torch's kernels do, which int8_matches_torch() and int4_matches_torch() check once per
  process on inputs built to expose any other order.
- int8 and int4 in THUDM's layout times activations quantized to int8 on the fly: int_dot (int_dot.c,
  linear/intdot.py), integer products and sums of its own, AVX2 only (it runs on AVX-512 CPUs too).
Either way a row gets the same bits alone as among others, so batching still changes no result.
Each kernel has an AVX2 variant for CPUs without AVX-512, which mirrors torch's AVX2 kernels (8 lanes for
int8, 32-row blocks for int4; fp32 sums the same either way).

A batch's decode step multiplies a few rows by every weight and is bound by arithmetic instead. With
AVX-512, rows_times_packed (fp32), rows_times_half (fp16 weights in glmpool's layout, linear/fp16.py) and
int4_times take tiles of up to 6 rows, each 64 weights loaded once per tile, every output summed as for a
lone row. The fp32 and fp16 ones have AVX2 variants (tiles of 1-3 rows) that sum alike: fp16 weights go
through them on AVX2 CPUs, where FBGEMM is not batch-invariant (linear/fp16.py).

The kernels are compiled when glmpool is installed (setup.py; an optional extension needing a C compiler
with OpenMP, and an x86-64 CPU with AVX-512 or AVX2 to run). Where they are missing, available() says so, and
rows go through torch's kernels as before.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

BLOCK = 64  # outputs per block of oneDNN's AB16b64a layout, which the kernel reads
C_NAME = "_kernels"  # row_kernel.c, decode_attention.c, gelu.c and int_dot.c, built by setup.py


def library_path() -> Path | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / (C_NAME + suffix)).is_file():
            return here / (C_NAME + suffix)
    return None


ISA_ENV = "GLMPOOL_KERNEL_ISA"  # avx512 (the default: the CPU's best), avx2 or none, as ATEN_CPU_CAPABILITY
ISA_NAMES = {"avx512": 512, "avx2": 256, "none": 0}


def isa_cap() -> int:
    """The widest variant of glmpool's kernels that $GLMPOOL_KERNEL_ISA lets run (to run and test the AVX2
    variants on a CPU with AVX-512; none: torch's kernels only)."""
    name = os.environ.get(ISA_ENV, "avx512").strip().lower()
    if name not in ISA_NAMES:
        log.warning("%s=%s is none of %s: ignored", ISA_ENV, name, ", ".join(ISA_NAMES))
        return 512
    return ISA_NAMES[name]


@functools.cache
def library() -> ctypes.CDLL | None:
    path = library_path()
    if path is None:
        log.info("glmpool's CPU kernels are not built (no C compiler at install?): torch's kernels are used")
        return None
    kernels = ctypes.CDLL(str(path))  # after torch: it shares torch's OpenMP runtime (same soname)
    kernels.isa = min(kernels.glmpool_isa(), isa_cap())
    if not kernels.isa:
        log.info("this CPU has neither AVX-512 nor AVX2 with FMA (or %s=none): glmpool's CPU kernels are not used",
                 ISA_ENV)
        return None
    for rows_times in (kernels.glmpool_rows_times_packed, kernels.glmpool_rows_times_packed_avx2,  # one signature
                       kernels.glmpool_rows_times_half, kernels.glmpool_rows_times_half_avx2,
                       kernels.glmpool_rows_times_int4, kernels.glmpool_row_times_int4):  # (int4: bench only)
        rows_times.restype = None
        rows_times.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    for bf16_times in (kernels.glmpool_rows_times_int8, kernels.glmpool_rows_times_int4_bf16):  # bf16 in and out
        bf16_times.restype = None
        bf16_times.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    kernels.glmpool_gelu.restype = None  # gelu()
    kernels.glmpool_gelu.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_int]
    kernels.glmpool_int_dot.restype = ctypes.c_int  # int_dot()
    kernels.glmpool_int_dot.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    kernels.glmpool_greedy.restype = None  # greedy()
    kernels.glmpool_greedy.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
    kernels.glmpool_decode_attention.restype = None  # decode_attention.py
    kernels.glmpool_decode_attention.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6
                                                 + [ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_int])
    return kernels


def available() -> bool:
    return library() is not None


@functools.cache
def torch_isa() -> int:
    """The vector width of torch's own CPU kernels (512 for AVX-512, 256 for AVX2, else 0), which the
    int8/int4 kernels must mirror: it sets their lanes and torch's int4 layout. Capped by this CPU's."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    width = 512 if capability.startswith("AVX512") else 256 if capability == "AVX2" else 0
    return min(width, library().isa) if available() else 0


def fits(packed: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether `packed` is an fp32 oneDNN tensor laid out as the kernel reads it (AB16b64a): checked by
    size, so the kernel never reads past its end; probe() then checks the bits."""
    if not (packed.is_mkldnn and packed.dtype == torch.float32 and in_features % 16 == 0):
        return False
    try:  # torch's accessors of an opaque oneDNN tensor: a torch without them keeps its own kernels
        size = torch.ops.mkldnn._nbytes(packed)
        torch.ops.mkldnn.data_ptr(packed)
    except (AttributeError, RuntimeError):
        return False
    return size == -(-out_features // BLOCK) * BLOCK * in_features * 4


def several_rows_available() -> bool:
    """Whether glmpool's kernels beat torch's for several fp32 or int4 rows here (rows_times_packed, int4_times
    of 64-row blocks): AVX-512 only."""
    return available() and library().isa == 512


def _rows_times(entry: Callable, x: torch.Tensor, weight_address: int, bias: torch.Tensor | None,
                out_features: int, chunk: int) -> torch.Tensor:
    """x [..., in] -> [..., out] in fp32 by `entry`. Called for every matrix of every step: the inputs are
    converted only where they must be (each torch call here costs as much as a small kernel's work)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    in_features = x.shape[-1]
    out = torch.empty(x.shape[:-1] + (out_features,))
    entry(weight_address, x.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
          x.numel() // in_features if in_features else 0, out_features, in_features, chunk)
    return out


def rows_times_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                      chunk: int, address: int | None = None) -> torch.Tensor:
    """x [..., in] (fp32) @ weight^T + bias -> [..., out], each row summed as oneDNN's multi-row matmul sums
    it, with this chunk (row_kernel.c; the AVX-512 and AVX2 variants alike); `packed` must pass fits().
    address: packed's, where the caller keeps it (torch's accessor is an operator call)."""
    kernels = library()
    entry = kernels.glmpool_rows_times_packed if kernels.isa == 512 else kernels.glmpool_rows_times_packed_avx2
    return _rows_times(entry, x, address or torch.ops.mkldnn.data_ptr(packed), bias, out_features, chunk)


def row_times_packed(row: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                     out_features: int, chunk: int) -> torch.Tensor:
    """row [in] -> [out], as rows_times_packed."""
    return rows_times_packed(row, packed, bias, out_features, chunk)


HALF_CHUNK = 512  # inputs per chunk of the fp16 kernel's sums: 64 KB of a block, L2-resident


def pack_half(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> fp16 [blocks, in, 64], the layout rows_times_half reads: blocks of 64 outputs,
    input-major, the last block padded with zeros. Copied block-wise (no temporary of the whole matrix)."""
    out_features, in_features = weight.shape
    full = out_features // BLOCK
    packed = torch.empty(-(-out_features // BLOCK), in_features, BLOCK, dtype=torch.float16)
    packed[:full].copy_(weight[:full * BLOCK].view(full, BLOCK, in_features).transpose(1, 2))
    if full < packed.shape[0]:
        packed[full].zero_()
        packed[full, :, :out_features - full * BLOCK].copy_(weight[full * BLOCK:].T)
    return packed


def unpack_half(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """pack_half's inverse, in fp32."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:out_features].float()


def rows_times_half(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                    out_features: int) -> torch.Tensor:
    """x [..., in] (fp32) @ weight^T + bias -> [..., out] in fp32, the weight fp16 from pack_half: each output
    summed in chunks of HALF_CHUNK inputs (fused multiply-adds in input order, chunk sums in order), the
    same for any number of rows and on any CPU (the AVX-512 and AVX2 variants alike). Needs available()."""
    assert packed.dtype == torch.float16 and packed.is_contiguous() and packed.shape[2] == BLOCK
    assert packed.shape[0] * BLOCK >= out_features and x.shape[-1] == packed.shape[1]
    kernels = library()
    entry = kernels.glmpool_rows_times_half if kernels.isa == 512 else kernels.glmpool_rows_times_half_avx2
    return _rows_times(entry, x, packed.data_ptr(), bias, out_features, HALF_CHUNK)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """model.gelu's formula by glmpool's kernel (gelu.c): one pass instead of seven, its own tanh, the same
    bits for an element wherever it sits (fp32, CPU)."""
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    x = x.contiguous()
    out = torch.empty_like(x)
    library().glmpool_gelu(x.data_ptr(), out.data_ptr(), x.numel(), library().isa)
    return out


def greedy(logits: torch.Tensor) -> list[int] | None:
    """Each row's first maximum for logits [B, vocab] (fp32, CPU, contiguous) by one pass of greedy.c, where
    every row is surely valid (finite, and its sum cannot overflow: greedy.c); else None (check as before)."""
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.is_contiguous()
    rows, vocab = logits.shape
    index, valid = (ctypes.c_int64 * rows)(), (ctypes.c_uint8 * rows)()
    library().glmpool_greedy(logits.data_ptr(), rows, vocab, index, valid, library().isa)
    return list(index) if all(valid) else None


_last_chunk: dict[int, int] = {}  # in_features -> the chunk that matched last: try it first


def probe(packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int,
          row: torch.Tensor, among_others: torch.Tensor) -> int | None:
    """The chunk length with which the kernel gives `row` exactly `among_others` (oneDNN's result for
    that row in a multi-row product), or None where none does or the kernel cannot run."""
    if not available() or not fits(packed, out_features, in_features):
        return None
    candidates = dict.fromkeys([_last_chunk.get(in_features), in_features, 1024, 512, 256, 2048, 4096])
    for chunk in (c for c in candidates if c and c <= in_features):
        if torch.equal(row_times_packed(row, packed, bias, out_features, chunk), among_others):
            _last_chunk[in_features] = chunk
            return chunk
    return None


def int8_times(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, in] (bf16) @ weight [out, in]^T (int8, unit scales) -> [M, out] in bf16, each row as
    torch.ops.aten._weight_int8pack_mm computes it (16 or 8 lanes, as torch_isa()); in % 16 == 0. Several
    rows share each read of the weight."""
    assert weight.dtype == torch.int8 and weight.is_contiguous() and weight.shape[1] % 16 == 0 and torch_isa()
    assert x.dim() == 2 and x.shape[1] == weight.shape[1]
    x = x.to(torch.bfloat16).contiguous()  # the kernel widens it and rounds its sums to bf16 itself
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    scratch = torch.empty(x.shape[0] * (x.shape[1] + weight.shape[0]), dtype=torch.float32)
    library().glmpool_rows_times_int8(weight.data_ptr(), x.data_ptr(), out.data_ptr(), scratch.data_ptr(), x.shape[0],
                                      *weight.shape, torch_isa() // 32)
    return out


INT4_BLOCKS = {64: 512, 32: 256}  # output rows per block of torch's CPU int4 layout -> the width that reads it


def int4_rows_available(block: int) -> bool:
    """Whether int4_times takes several rows for torch's layout of `block`-row blocks (64: AVX-512)."""
    return block == 64 and several_rows_available()


def int4_times(x: torch.Tensor, packed: torch.Tensor, out_features: int, block: int) -> torch.Tensor:
    """x [M, in] (bf16) @ weight^T -> [M, out] in bf16, as torch.ops.aten._weight_int4pack_mm_for_cpu
    computes it with unit scales and zeros: each output one chain of fused multiply-adds in input order.
    `packed`: torch's CPU int4 layout of `block`-row blocks (64 with its AVX-512 kernels, read by the tiled
    kernel, any M; 32 with AVX2, read by the lone-row kernel: M = 1), out a multiple of it."""
    rows, in_features = x.shape
    assert INT4_BLOCKS[block] <= library().isa and out_features % block == 0
    assert packed.numel() * packed.element_size() >= out_features * in_features // 2  # never read past it
    assert block == 64 or rows == 1
    x = x.to(torch.bfloat16).contiguous()
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    scratch = torch.empty(rows * (in_features + out_features), dtype=torch.float32)
    library().glmpool_rows_times_int4_bf16(packed.data_ptr(), x.data_ptr(), out.data_ptr(), scratch.data_ptr(), rows,
                                           out_features, in_features, block == 64)
    return out


def int_dot(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
            bits: int) -> torch.Tensor:
    """x [M, K] (fp32) @ W^T * scale + bias -> [M, N] in fp32, W THUDM's int8 [N, K] or int4 [N, K/2] as stored,
    by int_dot.c: x quantized to int8 per block of 32 inputs, integer dot products per block, each output
    summing its blocks' scaled products in block order (the same bits for any M). scale, bias: fp32 [N].
    K % 32 == 0 (int8) or K % 64 == 0 (int4). Needs available()."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    assert weight.dtype == torch.int8 and weight.is_contiguous() and weight.shape[1] * 8 == in_features * bits \
        and in_features % (32 if bits == 8 else 64) == 0 and scale.dtype == torch.float32 \
        and scale.is_contiguous() and scale.numel() == out_features and (bias is None or (
            bias.dtype == torch.float32 and bias.is_contiguous() and bias.numel() == out_features))
    x = x.float().contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    if library().glmpool_int_dot(weight.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                                 x.data_ptr(), out.data_ptr(), rows, out_features, in_features, bits):
        raise MemoryError(f"no memory for {rows} x {in_features} quantized activations")
    return out


def _cancelling_probe(out_features: int, in_features: int, generator: torch.Generator, low: int = -127,
                      high: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights q in [low, high] and 5 bf16 rows whose products include pairs of huge terms that cancel
    exactly: the small terms' low bits then depend on where in the sum they ran, so a different order of
    summation changes the bf16 results (most of them) instead of hiding under their rounding."""
    weight = torch.randint(low, high + 1, (out_features, in_features), dtype=torch.int8, generator=generator)
    x = torch.randn(5, in_features, generator=generator)
    pairs = torch.randperm(in_features, generator=generator)[:16].view(8, 2)
    x[:, pairs[:, 0]], x[:, pairs[:, 1]] = 2.0 ** 24, -2.0 ** 24
    weight[:, pairs.flatten()] = 1
    return weight, x.to(torch.bfloat16)


def _same_bits_as_torch(what: str, shapes: tuple, low: int, high: int, ours: Callable, theirs: Callable,
                        rows_at_once: bool = False) -> bool:
    """Whether ours(rows, q) gives each row alone theirs(rows, q)'s result for that row, bit for bit, on
    cancelling probes of weights q in [low, high] of each shape (out, in); and, if rows_at_once, all rows
    together too."""
    generator = torch.Generator().manual_seed(0)
    try:
        for out_features, in_features in shapes:
            q, x = _cancelling_probe(out_features, in_features, generator, low, high)
            among_others = theirs(x, q)
            if not all(torch.equal(ours(x[i:i + 1], q), among_others[i:i + 1]) for i in range(len(x))) or (
                    rows_at_once and not torch.equal(ours(x, q), among_others)):
                log.info("glmpool's %s row kernel does not sum as this torch's %s kernel: not used", what, what)
                return False
    except (RuntimeError, AttributeError, NotImplementedError):  # a torch without that kernel
        return False
    return True


@functools.cache
def int8_matches_torch() -> bool:
    """Whether int8_times gives the bits of torch's int8 kernel here, for one row and several (checked once:
    both sum each output in an order that does not depend on the matrix's shape)."""
    ones = lambda q: torch.ones(q.shape[0], dtype=torch.bfloat16)  # noqa: E731
    return bool(torch_isa()) and _same_bits_as_torch(
        "int8", ((100, 64), (37, 1024), (8, 4096)), -127, 127, ours=int8_times,
        theirs=lambda x, q: torch.ops.aten._weight_int8pack_mm(x, q, ones(q)), rows_at_once=True)


@functools.cache
def int4_matches_torch(block: int) -> bool:
    """Whether int4_times gives the bits of torch's int4 kernel here, its layout of `block`-row blocks, for
    one row and (where it takes them) several (checked once, as int8's)."""
    if not available() or INT4_BLOCKS.get(block, 1024) > library().isa:
        return False
    pack = lambda q: torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).to(torch.int32), 1)  # noqa: E731

    def theirs(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # unit scales and zeros, groups of <= 256
        group = min(q.shape[1], 256)
        unit = torch.zeros(q.shape[1] // group, q.shape[0], 2, dtype=torch.bfloat16)
        unit[..., 0] = 1
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, pack(q), group, unit)

    return _same_bits_as_torch("int4", ((128, 64), (64, 1024), (192, 4096)), -8, 7,
                               ours=lambda x, q: int4_times(x, pack(q), q.shape[0], block),
                               theirs=theirs, rows_at_once=int4_rows_available(block))
