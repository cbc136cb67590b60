"""Weight-only int8/int4 quantization in THUDM's ChatGLM-6B format, with fast CPU and CUDA matmuls.

## The stored format (THUDM's, so their pre-quantized checkpoints load unchanged)
Per output row n of a weight W [N, K]:
    scale[n] = max_k |W[n, k]| / (2^(bits-1) - 1)          stored float16, `weight_scale` [N]
    q[n, k]  = round(W[n, k] / scale[n])                    in [-127, 127] or [-7, 7]
8 bits: `weight` is q as int8 [N, K]. 4 bits: two signed nibbles per byte, the even column in the high
nibble and the odd column in the low nibble: `weight` int8 [N, K/2]. W ~ scale[:, None] * q.
chatglm-6b-int4 (`quantization_bit`) stores every Linear of the layers this way (weight, weight_scale,
bias); with `quantization_embeddings` (chatglm-6b-int4-qe) the word embedding matrix as well, with the
same number of bits, and the output projection (lm_head) is that same quantized matrix.

## Kernels (chosen per call by the tokens per sequence T, never by how many sequences share it)
On the CPU a sequence's decode steps and output projection (T = 1) and its prompt, if of at most
PROMPT_KERNEL_MAX_TOKENS tokens, take the first path below; a longer prompt the second. generate.py
prefills the two kinds of prompt apart, so the path is a function of the sequence alone, and batching
changes no bits.
- CPU, up to PROMPT_KERNEL_MAX_TOKENS tokens per sequence: torch's own weight-only kernels, which read
  the int8/int4 weights directly (fewer bytes per token is the whole point, decoding being memory-bound)
  and need no C compiler:
  8 bits `aten._weight_int8pack_mm` on the stored int8 matrix as it is; 4 bits
  `aten._weight_int4pack_mm_for_cpu`, whose weights are unsigned nibbles (q + 8) in a blocked layout
  (32-row blocks). The int4 matrix is re-laid out **in place** (same bytes, same [N, K/2] shape) on the
  first CPU matmul, so memory holds one copy; `state_dict()` converts back to THUDM's layout, and a
  checkpoint copied into `weight` in place (which bumps its version counter) is re-laid out again.
  Both kernels are fast only with bfloat16 activations on CPUs without native fp16/bf16 math, so the
  input is rounded to bfloat16 (8-bit mantissa: 0.4% per element, less than the int8 weights' own
  rounding); they run with unit scales and the fp16 row scales are applied in the model's dtype
  afterwards, so the scales lose nothing. A lone row (one sequence decoding) goes through glmpool's own
  kernels instead where they are built (row_kernel.py): the same bits as torch's, int8 1.1-1.9x and
  int4 ~1.3x as fast; so do more than 4 int8 rows and, with AVX-512, any number of int4 rows (a batch's
  decode step, short prompts): the same bits again, 1.2-1.5x and 1.1-1.3x as fast.
- CPU, longer prompts: dequantize blocks of rows to the model's dtype and multiply with a GEMM, whose
  cost is then amortized over the rows (the weight-only kernels are slower than fp32 there); oneDNN's
  for fp32, which sums a row the same way among 2 or 2000 others (and runs faster than MKL's here),
  F.linear otherwise.
- CUDA before Ampere (sm53 to sm75: T4, V100, RTX 20xx), fp16 models: glmpool's own kernels launched
  through cpm_kernels, THUDM's package (cpm_cuda.py): a fused int8/int4 product reading THUDM's layout as
  stored for decode steps of up to 8 rows, a one-pass dequantization + cuBLAS above. Checked at load.
- CUDA, 4 bits, the layers: torch's own int4 kernel (`aten._weight_int4pack_mm`, "tinygemm", Ampere or
  newer), which reads the 4-bit weights as they are: a decode step then reads a quarter of fp16's bytes.
  Its layout is made at load (`prepare`) **in place** from THUDM's bytes (unsigned nibbles q + 8, the even
  column still in the high nibble: THUDM's byte XOR 0x88), after checking on the device that the kernel
  multiplies like the dequantized matrix; a GPU where it does not (another torch) keeps THUDM's layout
  and the path below, with a warning. A matrix in that layout cannot be turned back: saving or moving the
  model then is an error (load the checkpoint again instead). bf16 in and out, unit scales: the row
  scales are applied after, in fp32 for an fp16 model (the unscaled sums exceed fp16's range).
- CUDA, 8 bits, few rows: torch's own int8 kernel (`aten._weight_int8pack_mm`) on the stored matrix, with
  the row scales inside it (it sums in fp32 and scales before rounding), where it is faster. Its speed
  differs between torch versions (some run one thread per output, which cuBLAS beats by far), so at load
  it is timed against the path below on one layer matrix, at 1 and 16 rows, after checking its results
  on activations with ChatGLM-like outliers (|x| up to 1000), and used up to the largest of those where
  it won (`cuda_int8_rows`).
- CUDA otherwise (int8 where its kernel lost, the int4 -qe embeddings, a GPU without any kernel here):
  dequantize to the activation dtype with a few torch element-wise kernels and multiply with cuBLAS.
  Saves GPU memory, not time.
The CUDA paths do not run on this project's CPU-only test machines; bench/gpu.py --cpu-dry-run runs
what of them has a CPU implementation.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpm_cuda, row_kernel
from .errors import EngineError

log = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)
# Prompts up to this long go through the CPU weight-only kernels, which beat dequantize + GEMM for up to
# ~64 rows (bench/kernels.py); longer ones dequantize. Per prompt, not per call: see the docstring.
PROMPT_KERNEL_MAX_TOKENS = 64
LINEAR_NAMES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

INT4_BLOCK_CANDIDATES = (64, 32)  # output rows per block of the CPU int4 layout: 64 with AVX-512, else 32
INT4_GROUP_SIZES = (256, 128, 64, 32)  # allowed by the int4 kernels, CPU and CUDA (all groups share the row scale)
KERNEL_K_MULTIPLE = 32  # the CPU kernels misbehave (garbage, crashes) unless K is a multiple of 8; be safe
CUDA_INT4_INNER_K_TILES = 8  # the CUDA int4 layout's k-tiles per load (its widest): K % (8 * 16) == 0
DEQUANT_CHUNK_BYTES = 8 << 20  # dequantized block size on CPU (fits in L2/L3 next to its GEMM)
CUDA_DEQUANT_CHUNK_BYTES = 256 << 20  # bounds the temporary fp16 copy of a huge matrix (the -qe lm_head)


def parse_quantize(quantize: int | str | None) -> tuple[int | None, bool]:
    """4, 8, "4-qe" or "8-qe" (None: as stored) -> (bits, whether the word embeddings are quantized too).

    "-qe" is THUDM's name (chatglm-6b-int4-qe): the embedding matrix, which is also the output
    projection, is quantized like the layers. On a 6B model it is 5% of the weights; on small
    vocabulary-heavy models it is most of what a decode step reads.
    """
    if quantize is None or quantize == "":
        return None, False
    text = str(quantize).lower().removeprefix("int")
    bits, embeddings = (text[:-3], True) if text.endswith("-qe") else (text, False)
    if bits not in ("4", "8"):
        raise EngineError(f"quantize must be 4, 8, 4-qe or 8-qe, got {quantize!r}")
    return int(bits), embeddings


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization bits must be 4 or 8, got {bits!r}")


# --------------------------------------------------------------------------------------------------
# THUDM's format: quantize, pack, unpack, dequantize
# --------------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] values in [-8, 7] -> int8 [N, K/2]: even column in the high nibble, odd in the low."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    pairs = q.view(*q.shape[:-1], q.shape[-1] // 2, 2).to(torch.int16)  # [N, K/2, 2]
    packed = (pairs[..., 0] << 4) | (pairs[..., 1] & 0x0F)  # [N, K/2] in 0..255 (high nibble signed)
    return packed.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] packed by THUDM -> signed int8 [N, K] (sign-extending both nibbles)."""
    packed = packed.view(torch.int8)
    high = packed >> 4  # arithmetic shift: the even column, sign included
    low = (packed << 4) >> 4  # the odd column, sign-extended (int8 arithmetic wraps as in C)
    return torch.stack((high, low), dim=-1).view(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_weight(w: torch.Tensor, bits: int, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (qweight int8 [N, K * bits / 8], scale float16 [N]), THUDM's per-row symmetric format.

    The scale is rounded to fp16 first (as stored) and q computed against the rounded scale in fp32, so
    dequantizing reproduces W as closely as the format allows; rows are processed in chunks to bound
    the temporary fp32 copies. An all-zero row gets scale 0 and q 0.
    """
    _check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    if bits == 4 and K % 2:
        raise ValueError(f"int4 needs an even number of input features, got {K}")
    qmax = 2 ** (bits - 1) - 1
    qweight = torch.empty(N, K * bits // 8, dtype=torch.int8, device=w.device)
    scale = torch.empty(N, dtype=torch.float16, device=w.device)
    with torch.no_grad():
        for start in range(0, N, chunk_rows):
            rows = w[start:start + chunk_rows].float()  # [R, K]
            s = (rows.abs().amax(dim=1) / qmax).half()  # [R]
            divisor = s.float().masked_fill(s == 0, 1.0)[:, None]
            q = torch.round(rows / divisor).clamp_(-qmax, qmax).to(torch.int8)  # [R, K]
            qweight[start:start + chunk_rows] = pack_int4(q) if bits == 4 else q
            scale[start:start + chunk_rows] = s
    return qweight, scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(qweight int8 [N, K * bits / 8], scale [N]) in THUDM's layout -> W [N, K] in `dtype`."""
    _check_bits(bits)
    q = unpack_int4(qweight) if bits == 4 else qweight  # [N, K] int8
    return q.to(dtype) * scale.to(dtype)[:, None]


# --------------------------------------------------------------------------------------------------
# The CPU int4 kernel's layout: for every block of B output rows (B = 64 with AVX-512, else 32; see
# int4_block_rows) and every column k, B/2 bytes; byte j holds row j's nibble low and row j + B/2's
# nibble high, unsigned (q + 8). Same byte count as THUDM's.
# --------------------------------------------------------------------------------------------------

def _cpu_int4_pack(q: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """signed int8 [R, K] (R a multiple of the block) -> uint8 [R, K/2] in the CPU int4 kernel's layout:
    per block of B output rows, for each k, B/2 bytes holding row j in the low and row j + B/2 in the
    high nibble."""
    R, K = q.shape
    B = block or int4_block_rows()
    u = (q + 8).to(torch.uint8).view(R // B, 2, B // 2, K)  # [R/B, 2, B/2, K]
    packed = u[:, 0] | (u[:, 1] << 4)  # [R/B, B/2, K]
    return packed.transpose(1, 2).contiguous().view(R, K // 2)  # [R/B, K, B/2] flattened


def _cpu_int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] in the CPU int4 kernel's layout -> signed int8 [R, K]."""
    R, half = packed.shape
    K, B = half * 2, int4_block_rows()
    blocks = packed.view(torch.uint8).reshape(R // B, K, B // 2).transpose(1, 2)
    q = torch.stack((blocks & 0x0F, blocks >> 4), dim=1)  # [R/B, 2, B/2, K]
    return (q.view(torch.int8) - 8).reshape(R, K)


@functools.cache
def int4_block_rows() -> int:
    """The block size of this torch's CPU int4 layout (it depends on the CPU), or 0 if none is known."""
    try:
        q = torch.randint(-8, 8, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).to(torch.int32), 1).view(torch.uint8)
    except (RuntimeError, AttributeError):
        return 0
    return next((b for b in INT4_BLOCK_CANDIDATES if torch.equal(_cpu_int4_pack(q, b), theirs)), 0)


def _kernel_check(kind: str, probe: Callable[[torch.Generator], bool]) -> bool:
    """Run `probe` (does torch's CPU `kind` kernel compute what we expect?), warning when it does not."""
    try:
        ok = probe(torch.Generator().manual_seed(0))
    except (RuntimeError, AttributeError) as error:
        log.warning("torch's CPU %s kernel is unavailable (%s); %s uses dequantize + matmul", kind, error, kind)
        return False
    if not ok:
        log.warning("torch's CPU %s kernel does not give the expected results; %s uses dequantize + matmul",
                    kind, kind)
    return ok


@functools.cache
def _cpu_int4_layout_ok() -> bool:
    """Whether this torch's CPU int4 kernel uses the layout above (checked once against torch's packer)."""
    def probe(g: torch.Generator) -> bool:
        q = torch.randint(-8, 8, (128, 128), generator=g, dtype=torch.int8)
        reference = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).to(torch.int32), 1)
        x = torch.randn(3, 128, generator=g).bfloat16()
        ones = torch.ones(1, 128, 2, dtype=torch.bfloat16)
        ones[..., 1] = 0
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, reference, 128, ones)
        return int4_block_rows() > 0 and torch.equal(reference.view(torch.uint8), _cpu_int4_pack(q)) \
            and torch.allclose(out.float(), x.float() @ q.float().t(), rtol=2e-2, atol=0.5)
    return _kernel_check("int4", probe)


@functools.cache
def _cpu_int8_kernel_ok() -> bool:
    def probe(g: torch.Generator) -> bool:
        q = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
        x = torch.randn(3, 64, generator=g).bfloat16()
        out = torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=torch.bfloat16))
        return torch.allclose(out.float(), x.float() @ q.float().t(), rtol=2e-2, atol=0.5)
    return _kernel_check("int8", probe)


_constants: dict[tuple, torch.Tensor] = {}


def _unit_scales(kind: str, shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Shared read-only tensors: ones [N] (int8 kernel), or (scale 1, zero 0) pairs [G, N, 2] (int4)."""
    key = (kind, shape, str(device), dtype)
    tensor = _constants.get(key)
    if tensor is None:
        tensor = torch.ones(shape, dtype=dtype, device=device)
        if kind == "int4":
            tensor[..., 1] = 0
        _constants[key] = tensor
    return tensor


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------

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
        self.cpm = False  # on a GPU before Ampere, multiplied by cpm_cuda's kernels (see prepare)
        self.own_kernels = False  # on the CPU glmpool's kernels give torch's bits here (row_kernel.py, prepare)
        self.own_int4_rows = False  # and take several int4 rows too (AVX-512)
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
        """Lay `weight` out in place for torch's CUDA int4 kernel, once its results on this device have been
        checked against the dequantized matrix; False (THUDM's layout kept) where it cannot be used."""
        if self._current_layout() == self.LAYOUT_CUDA_INT4:
            return True
        N, K, w = self.out_features, self.in_features, self.weight
        if self.bits != 4 or w.device.type != "cuda" or N % 8 or K % (CUDA_INT4_INNER_K_TILES * 16):
            return False
        with torch.no_grad():
            packed = torch.ops.aten._convert_weight_to_int4pack(cuda_int4_input(w), CUDA_INT4_INNER_K_TILES)
            x = probe_activations(2, K).to(w.device, torch.bfloat16)
            got = self._int4_cuda(x, packed).float()  # [2, N] = x @ q^T
            columns = torch.cat((torch.arange(0, N, max(1, N // 256)), torch.tensor([N - 1]))).to(w.device)
            _check_like_dequantized(got[:, columns], x.float() @ unpack_int4(w[columns]).float().t())
            w.view(torch.int32).view(packed.shape).copy_(packed)
        self._layout, self._layout_key, self._cuda_shape = self.LAYOUT_CUDA_INT4, _tensor_key(w), packed.shape
        return True

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
        """Which implementation `matmul` uses for `rows` input rows, `tokens` of them per sequence (1 in a
        decode step): "int8-cpu", "int4-cpu", "int8-cuda", "int4-cuda", "cpm-cuda", "dequant"."""
        if self._current_layout() == self.LAYOUT_CUDA_INT4:
            return "int4-cuda"  # every size of input: the matrix is in no other layout
        if device.type == "cuda" and self.cpm:
            return "cpm-cuda"
        if device.type == "cuda" and self.bits == 8 and rows <= self.cuda_int8_rows:
            return "int8-cuda"
        if device.type != "cpu" or tokens > PROMPT_KERNEL_MAX_TOKENS or self.in_features % KERNEL_K_MULTIPLE:
            return "dequant"
        if self.bits == 8:
            return "int8-cpu" if _cpu_int8_kernel_ok() else "dequant"
        return "int4-cpu" if self._cpu_int4_ready() else "dequant"

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, path: str | None = None) -> torch.Tensor:
        """x [..., K] -> x @ W^T + bias [..., N] in x's dtype; x [B, T, K]: T tokens of each of B sequences
        (see kernel_path), any other shape one row per sequence. `path` forces an implementation (tests)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        path = path or self.kernel_path(x2.shape[0], x.device, tokens=shape[-2] if x.dim() >= 3 else 1)
        if path in ("int8-cpu", "int4-cpu") and self.in_features % KERNEL_K_MULTIPLE:
            raise RuntimeError(f"the CPU kernels need in_features % {KERNEL_K_MULTIPLE} == 0")
        if path == "int8-cpu":
            out = self._int8_cpu(x2)
        elif path == "int4-cpu":
            if not self._cpu_int4_ready():
                raise RuntimeError("the CPU int4 kernel cannot be used for this matrix")
            out = self._int4_cpu(x2)
        elif path == "int4-cuda":
            out = self._int4_cuda(x2.to(torch.bfloat16).contiguous())
        elif path == "int8-cuda":
            # x's dtype [M, K] x int8 [N, K]^T -> [M, N] with the row scales inside the kernel, which sums in
            # fp32 and scales before rounding: an unscaled fp16 sum (|q| up to 127) would pass 65504
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self._scale(x2.dtype))
        elif path == "cpm-cuda":  # scaled by the kernels
            out = cpm_cuda.matmul(self.weight, self.weight_scale, self.bits, x2)
        elif path == "dequant":
            out = self._dequant_matmul(x2)
        else:
            raise ValueError(f"unknown kernel path {path!r}")
        if path in ("int8-cpu", "int4-cpu", "int4-cuda"):
            out = apply_row_scales(out, self._scale(scaling_dtype(x.dtype)), bias, x.dtype)
        elif bias is not None:
            out = out + bias
        return out.view(*shape[:-1], self.out_features)

    def _int8_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        return _int8_times(x2.to(torch.bfloat16).contiguous(), self.weight, self.own_kernels)

    def _int4_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        # bf16 [M, K] x int4 (q + 8, blocked) [N, K/2] -> bf16 [M, N], unit scales and zero points
        head, block = self._blocked_rows(), int4_block_rows()
        x_bf16 = x2.to(torch.bfloat16).contiguous()
        if self.own_kernels and (x2.shape[0] == 1 or self.own_int4_rows):  # the same bits, faster
            out = row_kernel.int4_times(x_bf16, self.weight, head, block)
        else:
            group, scales_zeros = self._int4_unit_groups(head, x2.device)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, self.weight[:head].view(torch.uint8), group,
                                                             scales_zeros)
        if head == self.out_features:
            return out
        # The rows past the last block, as int8: like every path here, the same bits alone and batched.
        tail = _int8_times(x_bf16, unpack_int4(self.weight[head:]), row_kernel.int8_matches_torch())
        return torch.cat((out, tail), dim=1)

    def _int4_cuda(self, x_bf16: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
        # bf16 [M, K] x int4 (CUDA layout) -> bf16 [M, N], unit scales and zero points
        group, scales_zeros = self._int4_unit_groups(self.out_features, x_bf16.device)
        packed = packed if packed is not None else self.weight.view(torch.int32).view(self._cuda_shape)
        return torch.ops.aten._weight_int4pack_mm(x_bf16, packed, group, scales_zeros)

    def _int4_unit_groups(self, rows: int, device: torch.device) -> tuple[int, torch.Tensor]:
        """The int4 kernels' group size along K (the largest they take: all groups share the row scale) and
        unit (scale 1, zero 0) pairs [K / group, rows, 2]; the row scales are applied after the product."""
        group = next(g for g in INT4_GROUP_SIZES if self.in_features % g == 0)
        return group, _unit_scales("int4", (self.in_features // group, rows, 2), device)

    def _dequant_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """Dequantize blocks of rows to x's dtype and multiply: [M, K] -> [M, N] (no bias)."""
        dtype, N, K = x2.dtype, self.out_features, self.in_features
        limit = CUDA_DEQUANT_CHUNK_BYTES if x2.device.type == "cuda" else DEQUANT_CHUNK_BYTES
        align = max(INT4_BLOCK_CANDIDATES)  # a multiple of every int4 layout block
        rows = max(align, limit // (K * x2.element_size()) // align * align)
        if rows >= N:
            return _gemm(x2, self._dequant_rows(0, N, dtype))
        out = torch.empty(x2.shape[0], N, dtype=dtype, device=x2.device)
        for start in range(0, N, rows):
            stop = min(N, start + rows)
            out[:, start:stop] = _gemm(x2, self._dequant_rows(start, stop, dtype))
        return out


def scaling_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where a kernel's unscaled sums are scaled: fp16 cannot hold them (|q| up to 127 times the true
    |y|: a row whose largest |W| is 0.1 overflows once |y| passes ~64), bf16 and fp32 can."""
    return torch.float32 if dtype == torch.float16 else dtype


def apply_row_scales(unscaled: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """A unit-scale kernel's [M, N] sums -> sums x row scales (+ bias) in `dtype`, computed in scale's dtype
    (see scaling_dtype) and rounded to `dtype` once."""
    out = unscaled.to(scale.dtype)
    out = torch.addcmul(bias.to(scale.dtype), out, scale) if bias is not None else out * scale
    return out.to(dtype)


def cuda_int4_input(qweight: torch.Tensor) -> torch.Tensor:
    """THUDM's int4 bytes [N, K/2] (signed nibbles, even column high) -> what torch's CUDA int4 packer
    takes: uint8 [N, K/2] of unsigned nibbles q + 8, even column high. Adding 8 to a 4-bit two's
    complement value flips its top bit, so that is each byte XOR 0x88."""
    return (qweight.view(torch.uint8) ^ 0x88).contiguous()


def _gemm(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ weight [N, K]^T. On the CPU in fp32 through oneDNN, which sums each row alike for any
    M >= 2 (the prompts that come here are long), so a prompt's numbers do not depend on the others
    prefilled with it; MKL's (F.linear) change with M."""
    from . import onednn  # onednn imports this module
    if x2.device.type == "cpu" and x2.dtype == torch.float32 and x2.shape[0] > 1 and onednn.available():
        return onednn.linear(x2, weight, None)
    return F.linear(x2, weight)


OWN_INT8_ROWS_FROM = 5  # from 2 to 4 rows torch's int8 kernel is as fast (its tiles hold 4)


def _int8_times(x_bf16: torch.Tensor, weight: torch.Tensor, own_kernels: bool) -> torch.Tensor:
    """bf16 [M, K] x int8 [N, K]^T -> bf16 [M, N], unit scales; through glmpool's kernels if asked (the same
    bits): a lone row ~2x faster on short rows, OWN_INT8_ROWS_FROM rows or more 1.2-1.5x."""
    if own_kernels and (x_bf16.shape[0] == 1 or x_bf16.shape[0] >= OWN_INT8_ROWS_FROM):
        return row_kernel.int8_times(x_bf16, weight)
    return torch.ops.aten._weight_int8pack_mm(x_bf16, weight, _unit_scales("int8", (weight.shape[0],)))


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


# --------------------------------------------------------------------------------------------------
# Whole models and state dicts
# --------------------------------------------------------------------------------------------------

def replace_module(parent: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put `new` where `parent.<dotted>` is (e.g. "attention.dense")."""
    *path, name = dotted.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, name, new)


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


def _is_layer_linear(name: str) -> bool:
    return name.startswith("transformer.layers.") and name.endswith(".weight") \
        and any(f".{kind}.weight" in name for kind in LINEAR_NAMES)


def quantize_state_dict(sd: dict[str, torch.Tensor], bits: int, embeddings: bool = False) -> dict[str, torch.Tensor]:
    """A THUDM-named fp state dict -> the same in THUDM's stored quantized layout (a new dict).

    Each layer Linear's `weight` becomes int8 [N, K * bits / 8] and gains `weight_scale` fp16 [N];
    biases and everything else are kept. With `embeddings` (chatglm-6b-int4-qe) the word embeddings are
    quantized the same way and `lm_head.weight` (if present) becomes the same quantized tensor, with
    `lm_head.weight_scale`.
    """
    _check_bits(bits)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if _is_layer_linear(name) or (embeddings and name == "transformer.word_embeddings.weight"):
            qweight, scale = quantize_weight(tensor, bits)
            out[name] = qweight
            out[name[:-len("weight")] + "weight_scale"] = scale
        elif embeddings and name in ("lm_head.weight", "lm_head.weight_scale"):
            continue
        else:
            out[name] = tensor
    if embeddings and "lm_head.weight" in sd:
        if "transformer.word_embeddings.weight" in out:
            out["lm_head.weight"] = out["transformer.word_embeddings.weight"]
            out["lm_head.weight_scale"] = out["transformer.word_embeddings.weight_scale"]
        else:
            out["lm_head.weight"], out["lm_head.weight_scale"] = quantize_weight(sd["lm_head.weight"], bits)
    return out


def quantized_modules(model: nn.Module) -> Iterable[tuple[str, QuantizedMatrix]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, QuantizedMatrix))


def prepare(model: nn.Module) -> nn.Module:
    """Build the kernel layouts now (right after loading): CPU int4 on the first forward otherwise; CUDA int4
    (the layers' matrices: a lookup table must stay in THUDM's layout) only here. On CUDA, also decide
    where torch's int8 kernel is used; on the CPU, whether glmpool's kernels may stand in for torch's."""
    dtype = getattr(model, "dtype", torch.float16)
    for _, module in quantized_modules(model):  # a GPU before Ampere: cpm_cuda's kernels, if they work there
        device = module.weight.device
        module.cpm = device.type == "cuda" and cpm_cuda.takes(module.bits, module.in_features, dtype) \
            and cpm_cuda.usable(device)
    int8_cuda = [m for _, m in quantized_modules(model)
                 if m.bits == 8 and m.weight.device.type == "cuda" and not m.cpm]
    if int8_cuda:
        judged = next((m for m in int8_cuda if isinstance(m, QuantizedLinear)), int8_cuda[0])
        rows = cuda_int8_rows(judged, dtype)
        for module in int8_cuda:
            module.cuda_int8_rows = rows
    broken = None
    for name, module in quantized_modules(model):
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


OUTLIER = 1000.0  # the largest |activation| a kernel trial feeds: ChatGLM's outlier channels reach hundreds


def probe_activations(rows: int, features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 [rows, features] like ChatGLM's hidden states: randn, except a few outlier channels (one in 256,
    at least two) whose values reach +-OUTLIER; kernels are tried on these, since randn alone never
    reaches the magnitudes where a product leaves fp16's range."""
    generator = generator or torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=generator)
    channels = torch.randperm(features, generator=generator)[:max(2, features // 256)]
    magnitudes = OUTLIER * (0.2 + 0.8 * torch.rand(rows, len(channels), generator=generator))
    signs = torch.randint(0, 2, (rows, len(channels)), generator=generator) * 2 - 1
    x[:, channels] = magnitudes * signs
    x[:, channels[0]] = OUTLIER  # the extreme itself, in every row
    return x


def _check_like_dequantized(got: torch.Tensor, want: torch.Tensor, kernel: str = "its") -> None:
    """A kernel on trial (on the device, at load) must give finite results and match the dequantized
    product within 1%."""
    if not bool(torch.isfinite(got).all()):
        raise RuntimeError(f"{kernel} results overflow {got.dtype} for activations up to |x| = {OUTLIER:g}")
    got, want = got.float(), want.float()
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
        raise RuntimeError(f"{kernel} results differ from the dequantized matrix's")


KERNEL_TRIAL_ROWS = (1, 16)  # input rows (a lone sequence, a batch) at which a kernel is timed against dequantizing


def cuda_int8_rows(module: QuantizedMatrix, dtype: torch.dtype) -> int:
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


def kernel_rows(module: QuantizedMatrix, path: str, dtype: torch.dtype,
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


# --------------------------------------------------------------------------------------------------
# How close a quantized model stays to its reference
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def _greedy_tokens(model: nn.Module, prompt: list[int], new_tokens: int, special: tuple[int, int, int],
                   forced: list[int] | None = None) -> list[int]:
    """Greedy continuation of `prompt` (no stop token); with `forced`, feed those tokens instead of its own."""
    from .model import prefix_attention_mask, prompt_positions

    device = model.device
    position, block, context_length, mask_position = prompt_positions(prompt, *special)
    cache = model.new_cache(len(prompt) + new_tokens)
    logits = model(torch.tensor([prompt], device=device), torch.tensor([[position, block]], device=device),
                   [cache], prefix_attention_mask(len(prompt), context_length, device))
    out: list[int] = []
    for i in range(new_tokens):
        out.append(int(logits[0].float().argmax()))
        if i + 1 == new_tokens:
            break
        feed = forced[i] if forced is not None else out[-1]
        index = len(prompt) + i  # the fed token's index in the sequence
        positions = torch.tensor([[[mask_position], [index - context_length + 1]]], device=device)
        logits = model(torch.tensor([[feed]], device=device), positions, [cache])
    return out


def greedy_agreement(reference: nn.Module, candidate: nn.Module, prompts: list[list[int]], new_tokens: int,
                     bos_id: int, mask_id: int, gmask_id: int) -> dict[str, float]:
    """Compare greedy decoding of `candidate` (e.g. quantized) with `reference` (e.g. fp32) on `prompts`.

    teacher_forced: fraction of steps where the candidate's next token equals the reference's, both fed
        the reference's tokens (agreement per token, without one early divergence deciding the rest);
    prefix: mean fraction of the free-running continuation identical to the reference's before the
        first difference; exact: fraction of prompts whose whole continuation is identical.
    """
    special = (bos_id, mask_id, gmask_id)
    forced_hits = prefix = exact = 0
    for prompt in prompts:
        ref = _greedy_tokens(reference, prompt, new_tokens, special)
        free = _greedy_tokens(candidate, prompt, new_tokens, special)
        forced = _greedy_tokens(candidate, prompt, new_tokens, special, forced=ref)
        forced_hits += sum(a == b for a, b in zip(forced, ref))
        common = next((i for i, (a, b) in enumerate(zip(free, ref)) if a != b), new_tokens)
        prefix += common / new_tokens
        exact += common == new_tokens
    n = len(prompts)
    return {"teacher_forced": forced_hits / (n * new_tokens), "prefix": prefix / n, "exact": exact / n}
