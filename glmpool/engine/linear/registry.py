"""Every way glmpool multiplies a weight matrix, declared once: the one place to read which code
multiplies a weight, and what it falls back to where it cannot run.

Torch-free on purpose, like gunicorn's worker names: the supervisor, `config.py` and `cli.py` import it
for the names and their help (the supervisor never imports torch), and the engine imports each scheme's
module by the dotted name given here only when that scheme is asked for. The command line's choices,
the configuration's help, deploy/glmpool.toml's comments and the README derive from these entries.

Two kinds of entry:
- `--matmul` methods, for the float weights (every matrix when the model is not quantized; the tied
  word embeddings = output projection when only the layers are). One is chosen per model at load: the
  asked one, or where it is not usable here (device, dtype, CPU features, kernel built, a probe of its
  promises) the first usable one of its `fallbacks`. `reference` is always usable.
- quantized routes, for matrices stored in THUDM's int8/int4 format (`quantize`): one is chosen per call
  by the shape of the input (tokens per sequence, rows) and the device, in the order `QUANTIZED_ORDER`
  gives; `dequant` is always usable.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    implementation: str  # "module:Class" under glmpool.engine.linear: the file that multiplies, and why so
    summary: str  # one line: what it does and what it is for (help texts, docs)
    fallbacks: tuple[str, ...] = ()  # where this one is not usable here, the first of these that is
    quantized: bool = False  # a route over THUDM's stored int8/int4 format, chosen per call


METHODS = (
    Method("fp16", "fp16:OwnFp16", "weights kept in fp16 as THUDM ships them, fp32 arithmetic by glmpool's kernel "
           "(AVX-512 or AVX2): half the memory of fp32 and the fastest; batching never changes a sequence's numbers",
           fallbacks=("fbgemm-fp16", "onednn", "reference")),
    Method("fbgemm-fp16", "fp16:FbgemmFp16", "the same fp16 weights multiplied by FBGEMM (torch's x86 builds), "
           "where a load-time probe finds it batch-invariant (with AVX-512, not AVX2)",
           fallbacks=("fp16", "onednn", "reference")),
    Method("onednn", "onednn:OneDNN", "fp32 weights reordered once for oneDNN; a lone row by glmpool's row kernel "
           "in oneDNN's summation order, so batching changes no result", fallbacks=("reference",)),
    Method("reference", "reference:Reference", "THUDM's own F.linear: greedy output bit-identical to their code when a "
           "sequence runs alone"),
    Method("int-dot", "intdot:IntDot", "CPU, int8 and int4 weights read as stored times activations quantized to "
           "int8 per block of 32 inputs (ggml's q8_0 scheme), integer dot products by glmpool's kernel (AVX2): "
           "the fastest, batch-invariant by construction; decode steps and prompts of up to 64 tokens, where "
           "quantized_activations is int8", fallbacks=("int8", "int4", "dequant"), quantized=True),
    Method("int4-cuda", "cuda:Int4Cuda", "CUDA, int4 layers by torch's tinygemm kernel (Ampere or newer), in place",
           fallbacks=("dequant",), quantized=True),
    Method("int8-cuda", "cuda:Int8Cuda", "CUDA, int8 by torch's weight-only kernel up to the rows where a load-time "
           "trial found it faster than dequantizing", fallbacks=("dequant",), quantized=True),
    Method("cpm-cuda", "cpm:CpmCuda", "CUDA before Ampere (sm53-sm75: T4, V100, RTX 20xx), fp16: glmpool's own "
           "int8/int4 kernels on THUDM's layout as stored, NVRTC-compiled and launched through THUDM's cpm_kernels; "
           "up to 8 rows one fused product, more dequantized in one pass then cuBLAS", fallbacks=("dequant",),
           quantized=True),
    Method("int8", "int8:Int8", "CPU, int8 weights read as stored by torch's weight-only kernel or glmpool's "
           "(the same bits), bf16 activations; decode steps and prompts of up to 64 tokens",
           fallbacks=("dequant",), quantized=True),
    Method("int4", "int4:Int4", "CPU, int4 weights re-laid out in place for torch's weight-only kernel or "
           "glmpool's (the same bits), bf16 activations; decode steps and prompts of up to 64 tokens",
           fallbacks=("dequant",), quantized=True),
    Method("dequant", "dequant:Dequant", "dequantize blocks of rows and multiply by a GEMM (oneDNN's for fp32 on the "
           "CPU): long prompts, and wherever no kernel reads the quantized weights", quantized=True),
)
BY_NAME = {m.name: m for m in METHODS}
MATMULS = tuple(m.name for m in METHODS if not m.quantized)
DEFAULT_MATMUL = "fp16"
QUANTIZED_ORDER = tuple(m.name for m in METHODS if m.quantized)  # tried per call, the first that takes it wins
QUANTIZE_CHOICES = (4, 8, "4-qe", "8-qe")  # "-qe": the word embeddings (= output projection) too
# What the CPU's quantized routes multiply the int8/int4 weights with (quantized_activations): "int8", the
# activations quantized per block of 32 and integer products (int-dot, as ggml/chatglm.cpp do), or "bf16",
# the activations rounded to bf16 and fp32 products in torch's order (int8, int4). Either is batch-invariant.
QUANTIZED_ACTIVATIONS = ("int8", "bf16")
DEFAULT_QUANTIZED_ACTIVATIONS = "int8"
# On the CPU the quantized kernels take a prompt of up to this many tokens, which beat dequantize + GEMM up to
# ~64 rows; longer ones are dequantized. Per prompt, not per call, so that batching changes no bit:
# generate.py prefills the two kinds of prompt apart.
PROMPT_KERNEL_MAX_TOKENS = 64


def fallbacks(name: str) -> tuple[str, ...]:
    """`name` and the methods it falls back to, in order."""
    return (name, *BY_NAME[name].fallbacks)


def matmul_comment(width: int = 100) -> str:
    """deploy/glmpool.toml's comment on `matmul` (tests/pool/test_imports.py holds the template to it)."""
    import textwrap

    lines = ["Matrix products on cpu workers (fp32 arithmetic); where one cannot run, the first of its fallbacks:"]
    for m in METHODS:
        if not m.quantized:
            text = f'"{m.name}"{" (default)" if m.name == DEFAULT_MATMUL else ""}: {m.summary}' + \
                (f"; else {', '.join(m.fallbacks)}" if m.fallbacks else "")
            lines += textwrap.wrap(text, width - 2, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join("# " + line for line in lines)


def quantized_activations_comment(width: int = 100) -> str:
    """deploy/glmpool.toml's comment on `quantized_activations` (tests/pool/test_imports.py holds the template
    to it)."""
    import textwrap

    text = quantized_activations_help()
    text = text[0].upper() + text[1:] + f' (default "{DEFAULT_QUANTIZED_ACTIVATIONS}").'
    return "\n".join("# " + line for line in textwrap.wrap(text, width - 2, break_on_hyphens=False))


def quantized_activations_help() -> str:
    """The --quantized-activations help (config.py)."""
    return ("the activations' precision against quantized weights (--quantize, -int4 checkpoints) on cpu workers: "
            "'int8' quantizes each row to int8 per block of 32 inputs and multiplies in integers (route int-dot, "
            "ggml's scheme: the fastest); 'bf16' rounds it to bf16 and multiplies in fp32 (routes int8, int4: "
            "torch's weight-only kernels' bits); both batch-invariant, and prompts over "
            f"{PROMPT_KERNEL_MAX_TOKENS} tokens are dequantized either way")


def matmul_help() -> str:
    """The --matmul help: every choice with its summary (config.py; the TOML template says the same)."""
    return "fp32 on CPU (elsewhere it changes nothing): " + "; ".join(
        f"'{m.name}' ({m.summary}{'; else ' + ', '.join(m.fallbacks) if m.fallbacks else ''})"
        for m in METHODS if not m.quantized)
