"""Route int-dot (glmpool/engine/int_dot.c, linear/intdot.py): THUDM's int8/int4 matrices as stored times
activations quantized to int8 per block of 32, in integers. Its arithmetic is reproduced exactly in torch
(exact integer block sums, then the fp32 operations in the kernel's order), a row's bits are checked alone
against batches of 2-64 rows with 1 and 2 threads, and the route's selection (and its fallback where the
kernel is switched off) in a child process."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from glmpool.engine import row_kernel
from glmpool.engine.linear import base, registry
from glmpool.engine.linear.quantized import QuantizedLinear, prepare
from glmpool.engine.linear.thudm import dequantize_weight, pack_int4, quantize_weight, unpack_int4

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(not base.method_class("int-dot").usable(CPU, torch.float32),
                                  reason="glmpool's kernels are not built, this CPU has no AVX2, or GLMPOOL_KERNEL_ISA=none")


def expected_int_dot(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     bits: int) -> torch.Tensor:
    """The kernel's result built in torch: x [M, K] quantized per block of 32 (scale max|x| / 127, x * (127 /
    max|x|) rounded to nearest even), each block's dot product in int64 (exact), then per output
    acc = acc + xs[b] * dot[b] in block order, acc * scale + bias: the same fp32 operations, so the same bits."""
    M, K = x.shape
    blocks = x.view(M, K // 32, 32)
    top = blocks.abs().amax(-1)  # [M, K/32]
    all_127 = torch.full_like(top, 127)  # not 127 / top: torch computes that as top.reciprocal() * 127
    inverse = all_127 / top
    inverse = torch.where((top > 0) & inverse.isfinite(), inverse, torch.zeros_like(top))  # below 127 / FLT_MAX: 0
    xq = torch.round(blocks * inverse[..., None]).to(torch.int64)
    xs = top / all_127
    q = (unpack_int4(weight) if bits == 4 else weight).to(torch.int64).view(-1, K // 32, 32)  # [N, K/32, 32]
    dots = torch.einsum("mbk,nbk->mnb", xq, q).float()  # [M, N, K/32], exact: |dot| < 2^24
    acc = torch.zeros(M, q.shape[0])
    for b in range(K // 32):
        acc = acc + xs[:, b, None] * dots[:, :, b]
    out = acc * scale
    return out + bias if bias is not None else out


def quantized_matrix(out_features: int, in_features: int, bits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_weight(torch.randn(out_features, in_features, generator=g), bits)
    return q, scale.float()


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(130, 1024), (64, 64), (1000, 4096)])  # [out, in]: 130 leaves a partial tile
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernel_computes_exactly_its_stated_arithmetic(bits, shape, with_bias):
    weight, scale = quantized_matrix(*shape, bits)
    g = torch.Generator().manual_seed(1)
    x = base.probe_activations(33, shape[1], g)  # outlier channels: blocks of very different scales
    x[0, :32] = 0  # a block of zeros (scale 0)
    x[1, 32:64] *= 1e-30  # and of tiny values
    x[2] = 0
    x[2, 32:64] = 1e-39 * x[3, 32:64]  # alone, so tiny (subnormal) that 127 / max|x| overflows: quantized to 0
    bias = torch.randn(shape[0], generator=g) if with_bias else None
    assert torch.equal(row_kernel.int_dot(x, weight, scale, bias, bits), expected_int_dot(x, weight, scale, bias, bits))


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_the_extreme_integers_neither_saturate_nor_overflow(bits):
    """The largest block sums the format allows, over K = 16384: int8 weights of -128 and 127 (THUDM never
    stores -128; the kernel takes it anyway), int4 of -8 and 7, activations all at +-127 after quantizing."""
    K = 16384
    low, high = (-128, 127) if bits == 8 else (-8, 7)
    q = torch.full((16, K), high, dtype=torch.int8)
    q[::2] = low  # every other output: all -128 (or -8)
    q[3, ::2] = low  # and one alternating
    weight = pack_int4(q) if bits == 4 else q
    x = torch.ones(3, K)
    x[1] = -1
    x[2, ::3] = -1
    scale = torch.full((16,), 0.5)
    out = row_kernel.int_dot(x, weight, scale, None, bits)
    assert torch.equal(out, expected_int_dot(x, weight, scale, None, bits))
    assert out[0, 0] == 0.5 * K * low and out[1, 1] == -0.5 * K * high  # x quantizes to 127 / 127 exactly


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_the_result_is_close_to_the_dequantized_product(bits):
    """Only the activations' rounding differs from the fp32 product of the dequantized matrix: within 1% of
    the output's largest value on randn activations (bf16's rounding gives ~0.3% here)."""
    weight, scale = quantized_matrix(512, 4096, bits)
    x = torch.randn(8, 4096, generator=torch.Generator().manual_seed(2))
    want = x @ dequantize_weight(weight, scale, bits).T
    error = (row_kernel.int_dot(x, weight, scale, None, bits) - want).abs().max() / want.abs().max()
    assert error < 1e-2, float(error)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(bits, threads):
    """Batches of 2-64 rows (the kernel's groups of 16 rows, a lone row's own path), 1 and 2 threads."""
    weight, scale = quantized_matrix(200, 1024, bits)
    x = base.probe_activations(64, 1024, torch.Generator().manual_seed(3))
    bias = torch.randn(200)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = row_kernel.int_dot(x, weight, scale, bias, bits)
        for i in range(64):
            assert torch.equal(row_kernel.int_dot(x[i:i + 1], weight, scale, bias, bits), together[i:i + 1]), i
        for rows in (2, 3, 8, 15, 16, 17, 33, 63):
            assert torch.equal(row_kernel.int_dot(x[64 - rows:], weight, scale, bias, bits), together[64 - rows:]), rows
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_inf_and_nan_reach_the_outputs_of_their_row_only():
    weight, scale = quantized_matrix(24, 128, 8)
    x = torch.randn(4, 128)
    x[1, 5], x[2, 100] = float("nan"), float("inf")
    out = row_kernel.int_dot(x, weight, scale, None, 8)
    assert out[1:3].isnan().all() and out[[0, 3]].isfinite().all()


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_a_matrix_takes_the_route_by_the_setting_keeping_thudms_layout(bits):
    """int8 activations: route int-dot for decode steps and prompts up to PROMPT_KERNEL_MAX_TOKENS, THUDM's
    layout as stored (int4 is not re-laid out), the bias added by the kernel; longer prompts dequantized.
    bf16: the weight-only routes, as before."""
    linear = QuantizedLinear.from_linear(torch.nn.Linear(256, 96), bits)
    stored = linear.weight.clone()
    prepare(linear, "int8")
    limit = registry.PROMPT_KERNEL_MAX_TOKENS
    assert linear.kernel_path(1, CPU) == linear.kernel_path(3 * limit, CPU, tokens=limit) == "int-dot"
    assert linear.kernel_path(limit + 1, CPU, tokens=limit + 1) == "dequant"
    x = torch.randn(2, 5, 256)
    out = linear(x)
    assert torch.equal(linear.weight, stored) and linear._current_layout() == linear.LAYOUT_THUDM
    assert torch.equal(out, expected_int_dot(x.view(10, 256), stored, linear.weight_scale.float(), linear.bias,
                                             bits).view(2, 5, 96))
    prepare(linear, "bf16")
    assert linear.kernel_path(1, CPU) == f"int{bits}"
    linear(x)  # int4: now in torch's layout, until prepared for int8 again
    prepare(linear, "int8")
    assert linear.kernel_path(1, CPU) == "int-dot" and torch.equal(linear(x), out)


CHILD = textwrap.dedent("""
    import torch
    from glmpool.engine import load, tiny
    from glmpool.engine.linear import quantized
    import sys
    engine = load(tiny.write_tiny_checkpoint(sys.argv[1]), quantize="4-qe", progress=False)
    paths = {m.kernel_path(1, torch.device("cpu")) for _, m in quantized.quantized_modules(engine.model)}
    layouts = {m._current_layout() for _, m in quantized.quantized_modules(engine.model)}
    print(",".join(sorted(paths)), ",".join(sorted(layouts)))
""")


@pytest.mark.skipif(not row_kernel.available(), reason="glmpool's kernels are not built or this CPU has no AVX2")
@pytest.mark.parametrize("isa,paths,layout", [("avx2", "int-dot", "thudm"), ("none", "int4", "cpu-int4")])
def test_the_isa_switch_selects_the_route_or_its_fallback(tmp_path, isa, paths, layout):
    """GLMPOOL_KERNEL_ISA=avx2: the AVX2 kernel (any x86 CPU with AVX2, AVX-512 ones included); none: the
    default int8 activations cannot run, and the int4 matrices take torch's layout and route as with bf16."""
    env = dict(os.environ, GLMPOOL_KERNEL_ISA=isa)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "tiny")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.split() == [paths, layout], out.stderr[-3000:]
