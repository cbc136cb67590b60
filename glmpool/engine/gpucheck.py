"""The engine's GPU-only branches, run on CPU tensors: what `bench/gpu.py --cpu-dry-run` reports and
tests/engine/test_gpu_engine.py asserts, one check each (name, ok, one-line detail).

Each route runs on the CPU where its operator has a CPU implementation, with small shapes:
- int8-cuda: `aten._weight_int8pack_mm` has one, with the same arguments (fp16 activations, fp16 scales);
- int4-cuda: tinygemm (`aten._weight_int4pack_mm`) has none; its CPU twin `_weight_int4pack_mm_for_cpu`
  takes another layout (blocks of 32 or 64 output rows instead of tinygemm's tiles) and the same unit
  scales, and the route's code after the kernel (the row scales, in fp32 for fp16) is the same;
- cpm-cuda (GPUs before Ampere): the kernels themselves need a GPU; NVRTC compiles their source here
  (where NVRTC is installed), and linear.cpm.emulate reads THUDM's bytes as they do;
- the fp16 model as load() sets it up on a GPU (fp32 GELU and rotary), against the fp32 reference.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .agreement import greedy_agreement
from .linear import cpm
from .linear.base import OUTLIER, probe_activations
from .linear.cuda import _check_like_dequantized
from .linear.int4 import Int4
from .linear.quantized import QuantizedLinear


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


def run_check(name: str, run) -> Check:
    """run() -> (ok, detail); an exception is a failed check, not a crashed run."""
    started = time.monotonic()
    try:
        ok, detail = run()
    except Exception as error:  # noqa: BLE001 -- reported as the check's failure
        ok, detail = False, f"{type(error).__name__}: {error}"
    return Check(name, bool(ok), detail, time.monotonic() - started)


def outlier_case(bits: int, rows: int = 4, out_features: int = 64, in_features: int = 4096,
                 seed: int = 0) -> tuple[QuantizedLinear, torch.Tensor]:
    """A quantized fp16 layer of ChatGLM-6B's width whose rows' largest |W| is 0.1, as ChatGLM-6B's are, and
    activations up to |x| = 1000 (base.probe_activations); row 0 of W has the signs of x's row 0, so
    its true |y| reaches ~1300: past fp16's range once multiplied by 127 / 0.1 (int8) or 7 / 0.1 (int4)."""
    generator = torch.Generator().manual_seed(seed)
    x = probe_activations(rows, in_features, generator)
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_((torch.rand(out_features, in_features, generator=generator) * 2 - 1) * 0.1)
        linear.weight[0] = 0.1 * x[0].sign()
        linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.1)
    return QuantizedLinear.from_linear(linear, bits).half(), x


def unit_scale_sums_overflow(layer: QuantizedLinear, x: torch.Tensor) -> bool:
    """Whether the kernel's unscaled sums, rounded to fp16 as both routes did before scaling, overflow."""
    x16 = x.half()
    if layer.bits == 8:
        sums = torch.ops.aten._weight_int8pack_mm(x16, layer.weight, torch.ones(layer.out_features, dtype=x16.dtype))
    else:
        sums = Int4.apply(layer, x16).half()
    return not bool(torch.isfinite(sums).all())


def route_on_outliers(bits: int, path: str) -> tuple[bool, str]:
    """Route `path` of an fp16 layer on outlier_case: finite, and within 1% of the fp32 product of the same
    quantized matrix; and whether the unit-scale sums the route used to round to fp16 overflow there."""
    layer, x = outlier_case(bits)
    want = x @ layer.dequantize(torch.float32).t() + layer.bias.float()
    got = layer.matmul(x.half(), layer.bias, path=path)
    error = float((got.float() - want).abs().max() / want.abs().max())
    finite = bool(torch.isfinite(got).all())
    before = "inf" if unit_scale_sums_overflow(layer, x) else "finite"
    return finite and error < 1e-2, (f"|x| up to {OUTLIER:g}, |y| up to {float(want.abs().max()):.0f}: "
                                     f"{'finite' if finite else 'NOT FINITE'}, max error {error:.2%} of max |y| "
                                     f"(unit-scale sums in fp16, as before: {before})")


def check_int8_cuda() -> tuple[bool, str]:
    return route_on_outliers(8, "int8-cuda")


def check_int4_cuda() -> tuple[bool, str]:
    ok, detail = route_on_outliers(4, "int4")
    return ok, f"{detail}; tinygemm's CPU twin in the CPU layout, the route's row scaling"


def check_cpm(bits: int) -> tuple[bool, str]:
    """The cpm route's arithmetic (cpm.emulate) on THUDM's bytes: finite on outliers and like the
    dequantized product, and its reads of the words give THUDM's dequantized matrix exactly."""
    layer, x = outlier_case(bits, rows=cpm.MAX_ROWS)
    reference = layer.dequantize(torch.float32)
    want = x @ reference.t()
    got = cpm.emulate(layer.weight, layer.weight_scale, bits, x.half())
    read = cpm.emulate(layer.weight, layer.weight_scale, bits, torch.eye(layer.in_features)).float().t()
    error = float((got.float() - want).abs().max() / want.abs().max())
    finite, layout = bool(torch.isfinite(got).all()), torch.equal(read, reference.half().float())
    return finite and layout and error < 1e-2, (f"THUDM's int{bits} bytes read {'right' if layout else 'WRONG'}; "
                                                f"{'finite' if finite else 'NOT FINITE'} on outliers, "
                                                f"max error {error:.2%}")


def check_cpm_compiles() -> tuple[bool, str]:
    try:
        cpm._nvrtc()
    except OSError as error:
        return True, f"not run: {error}"
    built = [f"{kind}{arch}" for arch in ("61", "70", "75") for kind in ("sm_", "compute_")
             if cpm.compile_source(f"{kind}{arch}")]
    return True, f"CUBIN and PTX for sm61, sm70, sm75 ({len(built)} builds)"


def check_selection() -> tuple[bool, str]:
    cases = {(5, 2): False, (6, 1): True, (7, 0): True, (7, 5): True, (8, 0): False, (8, 6): False, (9, 0): False}
    chosen = {c: cpm.wanted(c) for c in cases}
    layer = outlier_case(4)[0]
    layer.cpm = True
    paths = {layer.kernel_path(rows, torch.device("cuda")) for rows in (1, 8, 300)}
    ok = chosen == cases and paths == {"cpm-cuda"}
    return ok, (f"cpm_kernels route for sm{', sm'.join(f'{a}{b}' for (a, b), v in chosen.items() if v)}; "
                f"torch's kernels from sm80; a chosen matrix takes {sorted(paths)} for 1 to 300 rows")


def check_trial_refuses_overflow() -> tuple[bool, str]:
    """The load-time trial (cuda._check_like_dequantized on probe_activations) refuses a route whose fp16
    results overflow."""
    layer, x = outlier_case(8)
    x = x.half()
    ones = torch.ones(layer.out_features, dtype=torch.float16)
    overflowing = torch.ops.aten._weight_int8pack_mm(x, layer.weight, ones) * layer.weight_scale
    try:
        _check_like_dequantized(overflowing, layer.matmul(x, path="dequant"), "unit-scale int8")
    except RuntimeError as error:
        return True, f"refused: {error}"
    return False, "an overflowing kernel passed the trial"


def greedy_agreement_fp16(model_dir: Path, prompts: int = 4, new_tokens: int = 12) -> dict[str, dict[str, float]]:
    """Greedy decoding of the fp16 model, as load() sets it up on a GPU (fp32 GELU and rotary) and without
    that (op by op in fp16), against the fp32 reference: agreement.greedy_agreement's scores for each."""
    from .api import load
    engine = load(model_dir, progress=False)
    reference, c = engine.model, engine.config
    rng = random.Random(0)
    cases = [[rng.randrange(6, c.mask_token_id) for _ in range(rng.randint(4, 24))]
             + [c.gmask_token_id, c.bos_token_id] for _ in range(prompts)]
    args = (cases, new_tokens, c.bos_token_id, c.mask_token_id, c.gmask_token_id)
    gpu_path, plain = copy.deepcopy(reference).half(), copy.deepcopy(reference).half()
    gpu_path.use_fp32_pointwise()
    plain._rotary = None
    return {"fp32 pointwise": greedy_agreement(reference, gpu_path, *args),
            "op by op": greedy_agreement(reference, plain, *args)}


AGREEMENT_FLOOR = 0.9  # teacher-forced, fp16 GPU path vs fp32; measured 0.99 on the tiny models (docs/engine.md)


def check_fp16_numerics(model_dir: Path) -> tuple[bool, str]:
    scores = greedy_agreement_fp16(model_dir)
    ours = scores["fp32 pointwise"]
    return ours["teacher_forced"] >= AGREEMENT_FLOOR, "; ".join(
        f"{name}: {s['teacher_forced']:.0%} of tokens, {s['exact']:.0%} of continuations" for name, s in scores.items())


def run_all(model_dir: Path) -> list[Check]:
    """Every engine check; model_dir: a small checkpoint (the tiny model) for the fp16 numerics."""
    return [
        run_check("int8-cuda route, outlier activations", check_int8_cuda),
        run_check("int4-cuda route, outlier activations", check_int4_cuda),
        run_check("cpm_kernels int8 route (emulated), outliers and layout", lambda: check_cpm(8)),
        run_check("cpm_kernels int4 route (emulated), outliers and layout", lambda: check_cpm(4)),
        run_check("cpm_kernels source compiles (NVRTC)", check_cpm_compiles),
        run_check("quantized route chosen by compute capability", check_selection),
        run_check("load-time kernel trial refuses an overflowing route", check_trial_refuses_overflow),
        run_check("fp16 GPU numerics vs fp32 reference (greedy)", lambda: check_fp16_numerics(model_dir)),
    ]
