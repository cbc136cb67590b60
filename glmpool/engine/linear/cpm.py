"""int8/int4 matrices in THUDM's format on GPUs without torch's weight-only kernels (before Ampere: T4, V100,
RTX 20xx, where most int4 ChatGLM-6B users are), through cpm_kernels, as THUDM's own code does.

THUDM's quantization.py ships its compiled extraction kernels inside itself and uses cpm_kernels, their
package, only to load and launch them. glmpool does the same with kernels of its own (cpm.cu): NVRTC
compiles them at first use for the device (torch's CUDA wheels bring NVRTC), and cpm_kernels loads the
result and launches it on torch's stream. THUDM's stored layout is read as it is, nothing is re-laid
out, so the matrix stays saveable and movable.

- up to MAX_ROWS input rows (decode steps of up to 8 sequences): `quant_gemv`, which reads every quantized
  weight once and never widens the matrix: an int4 step reads a quarter of fp16's bytes;
- more rows (prompts, big batches): `quant_dequant` to fp16 in one pass, then cuBLAS (THUDM's scheme).
Sums are in fp32 and scaled before the one rounding to fp16, so outlier activations cannot overflow them.

Chosen by compute capability (`wanted`): sm80 and newer have torch's own kernels (cuda.py; int4
"tinygemm" reads 4 bits as well). Activations must be fp16 (these GPUs have no fast bf16). Checked on the
device with outlier activations against the dequantized matrix before use (CpmCuda.usable, at
quantized.prepare); where that fails, dequant.py with a warning. This project's machines have no GPU:
the tests check the selection, that NVRTC compiles the source for sm61/70/75, and the kernels'
arithmetic through `emulate` (the same word, byte and nibble reads, on the CPU); `bench/gpu.py` runs
the kernels themselves.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import QuantizedRoute, probe_activations

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpm.cu")
MAX_ROWS = 8  # as in cpm.cu
WARPS_PER_BLOCK = 4  # quant_gemv: one output row per warp
DEQUANT_THREADS, DEQUANT_BLOCKS = 256, 1024  # quant_dequant: a grid-stride loop
TORCH_KERNELS_FROM = (8, 0)  # compute capability of torch's int4/int8 weight-only CUDA kernels (Ampere)
K_MULTIPLE = 8  # whole 32-bit words of weights per row, aligned fp16 pairs of x


def wanted(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability should multiply quantized matrices by this module's
    kernels: one without torch's (see TORCH_KERNELS_FROM), but new enough for fp16 arithmetic (sm53)."""
    return (5, 3) <= tuple(capability) < TORCH_KERNELS_FROM


def fits(bits: int, in_features: int, dtype: torch.dtype) -> bool:
    return bits in (4, 8) and in_features % K_MULTIPLE == 0 and dtype == torch.float16


# --------------------------------------------------------------------------------------------------
# Compiling (NVRTC) and loading (cpm_kernels)
# --------------------------------------------------------------------------------------------------

def _pip_library(name: str) -> str | None:
    """lib<name>.so.* from NVIDIA's pip packages (torch's CUDA wheels depend on them), the CUDA major
    version torch was built with first."""
    major = (torch.version.cuda or "").split(".")[0]
    found = sorted({hit for entry in sys.path for hit in glob.glob(os.path.join(entry, "nvidia", "*", "lib",
                                                                                f"lib{name}.so.*"))})
    found = [path for path in found if ".alt." not in path and "builtins" not in path]
    return next((path for path in found if major and path.endswith(f".so.{major}")), found[0] if found else None)


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    """NVRTC: torch's (NVIDIA's pip package), else the system's. OSError if there is none."""
    path = _pip_library("nvrtc") or ctypes.util.find_library("nvrtc")
    if path is None:
        raise OSError("NVRTC (libnvrtc.so) not found: install nvidia-cuda-nvrtc-cu12, or CUDA")
    return ctypes.CDLL(path)


def compile_source(arch: str) -> bytes:
    """cpm.cu compiled by NVRTC for `arch`: machine code (CUBIN) for a real architecture ("sm_75"),
    PTX, NUL-ended as the CUDA driver loads it, for a virtual one ("compute_75"). RuntimeError with
    NVRTC's log if it does not compile."""
    nvrtc = _nvrtc()
    program = ctypes.c_void_p()

    def check(status: int, what: str) -> None:
        if status:
            nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
            message = nvrtc.nvrtcGetErrorString(status).decode()
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            text = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, text)
            raise RuntimeError(f"NVRTC {what}: {message}\n{text.value.decode(errors='replace')}")

    check(nvrtc.nvrtcCreateProgram(ctypes.byref(program), SOURCE.read_bytes(), SOURCE.name.encode(), 0, None, None),
          "create")
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"--std=c++14"]
        check(nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options)),
              "compile")
        kind = "CUBIN" if arch.startswith("sm_") else "PTX"
        size = ctypes.c_size_t()
        check(getattr(nvrtc, f"nvrtcGet{kind}Size")(program, ctypes.byref(size)), f"{kind} size")
        code = ctypes.create_string_buffer(size.value)
        check(getattr(nvrtc, f"nvrtcGet{kind}")(program, code), kind)
        return code.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


@contextlib.contextmanager
def _torch_cuda_libraries_for_cpm_kernels():
    """cpm_kernels looks for CUDA's runtime libraries (cudart, cublasLt) in $CUDA_PATH/lib64, then
    /usr/local/cuda/lib64, then through ldconfig, and binds them at import; torch's pip wheels keep theirs
    in site-packages/nvidia/*/lib. For the import, CUDA_PATH points at links to torch's own, so that
    cpm_kernels shares torch's CUDA runtime (the same files, loaded once) instead of another version's."""
    libraries = {name: _pip_library(name) for name in ("cudart", "cublasLt", "nvrtc")}
    if os.environ.get("CUDA_PATH") or not libraries["cudart"]:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="glmpool-cuda-") as root:
        os.mkdir(os.path.join(root, "lib64"))
        for name, path in libraries.items():
            if path:
                os.symlink(path, os.path.join(root, "lib64", f"lib{name}.so"))
        os.environ["CUDA_PATH"] = root
        try:
            yield
        finally:
            del os.environ["CUDA_PATH"]


@functools.cache
def _kernels(capability: tuple[int, int]) -> dict:
    """The entry points of cpm.cu for GPUs of `capability`, as cpm_kernels KernelFunctions (loaded into
    the current device's context on first launch). Machine code where this NVRTC knows the GPU: PTX would
    need the driver to be as new as NVRTC to compile it; PTX for the newest virtual architecture it knows
    below otherwise."""
    with _torch_cuda_libraries_for_cpm_kernels():
        from cpm_kernels.kernels.base import KernelFunction, LazyKernelCModule
    try:
        code = compile_source("sm_%d%d" % capability)
    except RuntimeError:
        code = compile_source("compute_%d%d" % capability)
    module = LazyKernelCModule(code)
    return {f"{kind}{bits}": KernelFunction(module, f"quant_{kind}_int{bits}")
            for kind in ("gemv", "dequant") for bits in (4, 8)}


def _launch(device: torch.device, name: str, grid: int, threads: int, *arguments) -> None:
    kernel = _kernels(torch.cuda.get_device_capability(device))[name]
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int32(a) for a in arguments]
    with torch.cuda.device(device):
        kernel((grid, 1, 1), (threads, 1, 1), 0, torch.cuda.current_stream(device).cuda_stream, values)


# --------------------------------------------------------------------------------------------------
# Products
# --------------------------------------------------------------------------------------------------

def matmul(weight: torch.Tensor, scale: torch.Tensor, bits: int, x2: torch.Tensor,
           chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """x2 fp16 [M, K] @ W^T -> fp16 [M, N], W = THUDM's (weight int8 [N, K * bits / 8], scale fp16 [N]),
    row scales applied; no bias. On the GPU."""
    M, K = x2.shape
    N = weight.shape[0]
    x2 = x2.contiguous()
    if x2.data_ptr() % 16:  # a view at an odd offset: the kernels read x in aligned 32-bit pairs
        x2 = x2.clone()
    words = weight.view(torch.int32)
    if M <= MAX_ROWS:
        out = torch.empty(M, N, dtype=torch.float16, device=x2.device)
        _launch(x2.device, f"gemv{bits}", -(-N // WARPS_PER_BLOCK), 32 * WARPS_PER_BLOCK, words, scale, x2, out,
                M, N, K)
        return out
    rows = max(1, min(N, chunk_bytes // (2 * K)))  # bounds the fp16 copy of a huge matrix (the -qe lm_head)
    out = torch.empty(M, N, dtype=torch.float16, device=x2.device) if rows < N else None
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        w16 = torch.empty(stop - start, K, dtype=torch.float16, device=x2.device)
        _launch(x2.device, f"dequant{bits}", DEQUANT_BLOCKS, DEQUANT_THREADS, words[start:stop], scale[start:stop],
                w16, stop - start, K)
        if out is None:
            return F.linear(x2, w16)
        out[:, start:stop] = F.linear(x2, w16)
    return out


def emulate(weight: torch.Tensor, scale: torch.Tensor, bits: int, x2: torch.Tensor) -> torch.Tensor:
    """What quant_gemv computes, on the CPU: the weights read as the kernel reads them (little-endian 32-bit
    words, bytes by shifts, the even column's nibble high, signs extended), summed in fp32 (in another
    order), scaled in fp32 and rounded once to fp16."""
    words = weight.contiguous().view(torch.int32).to(torch.int64)  # [N, K * bits / 32]
    sign = lambda v, width: ((v & ((1 << width) - 1)) ^ (1 << (width - 1))) - (1 << (width - 1))  # noqa: E731
    columns = []
    for j in range(4):
        byte = sign(words >> (8 * j), 8)
        columns += [byte] if bits == 8 else [byte >> 4, sign(byte, 4)]  # even column high, odd low
    q = torch.stack(columns, dim=-1).flatten(1).float()  # [N, K] in column order
    return ((x2.float() @ q.t()) * scale.float()).half()


def check_on_device(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    """The kernels on this matrix's GPU against the dequantized product, for a lone row and a prompt's worth,
    fed outlier activations (base.probe_activations): RuntimeError where they differ or overflow."""
    from .cuda import _check_like_dequantized
    from .thudm import dequantize_weight
    K = weight.shape[1] * 8 // bits
    reference = dequantize_weight(weight, scale, bits, torch.float32)
    for rows in (1, MAX_ROWS, MAX_ROWS + 1):
        x = probe_activations(rows, K)
        got = matmul(weight, scale, bits, x.to(weight.device, torch.float16))
        _check_like_dequantized(got, x.to(weight.device) @ reference.t(), f"cpm_kernels int{bits} ({rows} rows)")


@functools.cache
def _works_on(device: torch.device) -> bool:
    """Whether the kernels compile, load and multiply right on this GPU (logged once where not)."""
    from .thudm import quantize_weight
    try:
        generator = torch.Generator().manual_seed(0)
        for bits in (8, 4):
            weight, scale = quantize_weight(torch.randn(72, 256, generator=generator) * 0.05, bits)
            check_on_device(weight.to(device), scale.to(device), bits)
    except (OSError, RuntimeError, ImportError, AttributeError) as error:
        log.warning("%s has no int4/int8 kernel in torch, and glmpool's for it (cpm_kernels) cannot be used "
                    "(%s): quantized matrices are dequantized for every product", device, error)
        return False
    return True


class CpmCuda(QuantizedRoute):
    """Every product of a matrix that quantized.prepare gave to these kernels (`matrix.cpm`)."""

    name = "cpm-cuda"
    scaled = True

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return (device.type == "cuda" and dtype == torch.float16 and torch.cuda.is_available()
                and wanted(torch.cuda.get_device_capability(device)) and _works_on(torch.device(device)))

    @classmethod
    def takes(cls, matrix, rows: int, tokens: int, device: torch.device) -> bool:
        return device.type == "cuda" and matrix.cpm

    @classmethod
    def apply(cls, matrix, x2: torch.Tensor) -> torch.Tensor:
        return matmul(matrix.weight, matrix.weight_scale, matrix.bits, x2)
