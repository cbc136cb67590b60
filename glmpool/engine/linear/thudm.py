"""THUDM's stored int8/int4 format for ChatGLM-6B, so their pre-quantized checkpoints load unchanged:
the arithmetic of the format and nothing that multiplies (the routes that do are int8.py, int4.py,
cuda.py and dequant.py, chosen per call by quantized.py).

Per output row n of a weight W [N, K]:
    scale[n] = max_k |W[n, k]| / (2^(bits-1) - 1)          stored float16, `weight_scale` [N]
    q[n, k]  = round(W[n, k] / scale[n])                    in [-127, 127] or [-7, 7]
8 bits: `weight` is q as int8 [N, K]. 4 bits: two signed nibbles per byte, the even column in the high
nibble and the odd column in the low nibble: `weight` int8 [N, K/2]. W ~ scale[:, None] * q.
chatglm-6b-int4 (`quantization_bit`) stores every Linear of the layers this way (weight, weight_scale,
bias); with `quantization_embeddings` (chatglm-6b-int4-qe) the word embedding matrix as well, with the
same number of bits, and the output projection (lm_head) is that same quantized matrix.
"""
from __future__ import annotations

import torch

from ..errors import EngineError

SUPPORTED_BITS = (4, 8)
LINEAR_NAMES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


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
