"""CUDA routes for THUDM-format matrices on Ampere or newer: torch's int4 kernel ("tinygemm") and its int8
kernel. (Older GPUs: cpm.py.)

- int4, the layers: `aten._weight_int4pack_mm` reads the 4-bit weights as they are, so a decode step
  reads a quarter of fp16's bytes. The layout is made at load (quantized.prepare) **in place** from
  THUDM's bytes (unsigned nibbles q + 8, the even column still high: THUDM's byte XOR 0x88), after
  checking on the device that the kernel multiplies like the dequantized matrix; a GPU where it does not
  keeps THUDM's layout and dequant.py, with a warning. That layout cannot be turned back: saving or
  moving the model is then an error (load the checkpoint again instead). bf16 in and out with unit
  scales; the matrix applies the row scales after it, in fp32 for an fp16 model (the unscaled sums, up to
  7 / 0.1 times the true result, would leave fp16's range).
- int8, few rows: `aten._weight_int8pack_mm` on the stored matrix, the row scales passed into it (it sums
  in fp32 and scales before rounding; unit scales and scaling after overflowed fp16 once the true |y|
  passed ~64 for a row whose largest |W| is 0.1). Its speed differs between torch versions (some run one
  thread per output, which cuBLAS beats by far), so at load it is timed against dequant.py on one layer
  matrix, at 1 and 16 rows, and used up to the largest of those where it won (`cuda_int8_rows`).
The load-time checks feed activations with ChatGLM-like outliers (base.probe_activations, |x| up to 1000)
and refuse non-finite results. These routes do not run on this project's CPU-only test machines;
bench/gpu.py --cpu-dry-run runs what of them has a CPU implementation.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from .base import OUTLIER, QuantizedRoute, int4_unit_groups, probe_activations
from .thudm import unpack_int4

log = logging.getLogger(__name__)

CUDA_INT4_INNER_K_TILES = 8  # the CUDA int4 layout's k-tiles per load (its widest): K % (8 * 16) == 0
KERNEL_TRIAL_ROWS = (1, 16)  # input rows (a lone sequence, a batch) at which a kernel is timed against dequantizing


def cuda_int4_input(qweight: torch.Tensor) -> torch.Tensor:
    """THUDM's int4 bytes [N, K/2] (signed nibbles, even column high) -> what torch's CUDA int4 packer
    takes: uint8 [N, K/2] of unsigned nibbles q + 8, even column high. Adding 8 to a 4-bit two's
    complement value flips its top bit, so that is each byte XOR 0x88."""
    return (qweight.view(torch.uint8) ^ 0x88).contiguous()


def _check_like_dequantized(got: torch.Tensor, want: torch.Tensor, kernel: str = "its") -> None:
    """A kernel on trial (on the device, at load, fed probe_activations) must give finite results and match
    the dequantized product within 1%."""
    if not bool(torch.isfinite(got).all()):
        raise RuntimeError(f"{kernel} results overflow {got.dtype} for activations up to |x| = {OUTLIER:g}")
    got, want = got.float(), want.float()
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
        raise RuntimeError(f"{kernel} results differ from the dequantized matrix's")


def to_cuda_int4_layout(matrix) -> bool:
    """Lay `matrix.weight` out in place for torch's CUDA int4 kernel, once its results on this device have
    been checked against the dequantized matrix; False (THUDM's layout kept) where it cannot be used."""
    if matrix._current_layout() == matrix.LAYOUT_CUDA_INT4:
        return True
    N, K, w = matrix.out_features, matrix.in_features, matrix.weight
    if matrix.bits != 4 or w.device.type != "cuda" or N % 8 or K % (CUDA_INT4_INNER_K_TILES * 16):
        return False
    with torch.no_grad():
        packed = torch.ops.aten._convert_weight_to_int4pack(cuda_int4_input(w), CUDA_INT4_INNER_K_TILES)
        x = probe_activations(2, K).to(w.device, torch.bfloat16)
        got = _int4_cuda(matrix, x, packed).float()  # [2, N] = x @ q^T
        columns = torch.cat((torch.arange(0, N, max(1, N // 256)), torch.tensor([N - 1]))).to(w.device)
        _check_like_dequantized(got[:, columns], x.float() @ unpack_int4(w[columns]).float().t())
        w.view(torch.int32).view(packed.shape).copy_(packed)
    matrix._set_layout(matrix.LAYOUT_CUDA_INT4, packed.shape)
    return True


def _int4_cuda(matrix, x_bf16: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    # bf16 [M, K] x int4 (CUDA layout) -> bf16 [M, N], unit scales and zero points
    group, scales_zeros = int4_unit_groups(matrix.in_features, matrix.out_features, x_bf16.device)
    packed = packed if packed is not None else matrix.weight.view(torch.int32).view(matrix._cuda_shape)
    return torch.ops.aten._weight_int4pack_mm(x_bf16, packed, group, scales_zeros)


class Int4Cuda(QuantizedRoute):
    name = "int4-cuda"

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and torch.cuda.is_available() and hasattr(torch.ops.aten, "_weight_int4pack_mm")

    @classmethod
    def takes(cls, matrix, rows: int, tokens: int, device: torch.device) -> bool:
        return matrix._current_layout() == matrix.LAYOUT_CUDA_INT4  # every input: the matrix is in no other layout

    @classmethod
    def apply(cls, matrix, x2: torch.Tensor) -> torch.Tensor:
        return _int4_cuda(matrix, x2.to(torch.bfloat16).contiguous())


class Int8Cuda(QuantizedRoute):
    name = "int8-cuda"
    scaled = True

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and torch.cuda.is_available() and hasattr(torch.ops.aten, "_weight_int8pack_mm")

    @classmethod
    def takes(cls, matrix, rows: int, tokens: int, device: torch.device) -> bool:
        return device.type == "cuda" and matrix.bits == 8 and rows <= matrix.cuda_int8_rows

    @classmethod
    def apply(cls, matrix, x2: torch.Tensor) -> torch.Tensor:
        # x's dtype [M, K] x int8 [N, K]^T -> [M, N] with the row scales inside the kernel, which sums in fp32
        # and scales before rounding: unit scales would leave an fp16 sum (|q| up to 127) past 65504
        return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), matrix.weight, matrix._scale(x2.dtype))


def cuda_int8_rows(module, dtype: torch.dtype) -> int:
    """Up to how many input rows torch's CUDA int8 kernel (`aten._weight_int8pack_mm`) should replace
    dequantize + cuBLAS, judged on this matrix and GPU: the kernel must give the dequantized product's
    results and take less time. Its speed is not known in advance: some torch versions run one thread per
    output, reading each weight row on its own, far slower than cuBLAS. 0 where it loses or fails.
    dtype: the activations'."""
    try:
        rows = kernel_rows(module, "int8-cuda", dtype, torch.cuda.synchronize)
    except (RuntimeError, AttributeError, NotImplementedError) as error:  # no such kernel here, wrong results
        log.warning("torch's CUDA int8 kernel cannot be used (%s); int8 matrices are dequantized for every "
                    "product instead", error)
        return 0
    log.info("int8 on CUDA: torch's int8 kernel for up to %d rows, dequantize + cuBLAS %s", rows,
             "above" if rows else "always (the kernel was slower)")
    return rows


def kernel_rows(module, path: str, dtype: torch.dtype,
                synchronize: Callable[[], None] = lambda: None, repeats: int = 5) -> int:
    """The largest of KERNEL_TRIAL_ROWS (all smaller ones included) at which matmul `path` beats "dequant"
    on `module` (medians of `repeats` timings of 4 calls each); RuntimeError if it computes anything else."""
    import statistics
    import time

    def seconds(x: torch.Tensor, how: str) -> float:
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            for _ in range(4):
                module.matmul(x, path=how)
            synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    weight = module.weight
    generator = torch.Generator().manual_seed(0)
    best = 0
    with torch.no_grad():
        for rows in KERNEL_TRIAL_ROWS:
            x = probe_activations(rows, module.in_features, generator).to(weight.device, dtype)
            _check_like_dequantized(module.matmul(x, path=path), module.matmul(x, path="dequant"), f"{path}: its")
            if seconds(x, path) >= seconds(x, "dequant"):
                break
            best = rows
    return best
