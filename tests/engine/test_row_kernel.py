"""glmpool's row kernels on a CPU without AVX-512: their AVX2 variants, run in a child process with torch,
oneDNN and glmpool all made to use their AVX2 kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
GLMPOOL_KERNEL_ISA): on an AVX2 CPU what runs anyway, on an AVX-512 one the same paths."""
import os
import subprocess
import sys
import textwrap

import pytest

from glmpool.engine import row_kernel

CHILD = textwrap.dedent("""
    import torch
    from glmpool.engine import row_kernel
    from glmpool.engine.linear import fp16, int4, onednn, quantized
    assert row_kernel.library().isa == 256 and row_kernel.torch_isa() == 256 and int4.int4_block_rows() == 32
    assert row_kernel.int8_matches_torch() and row_kernel.int4_matches_torch(32)
    torch.manual_seed(0)
    x = torch.randn(9, 1024)
    weight, bias = torch.randn(1000, 1024), torch.randn(1000)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    route = onednn.lone_row_route(packed, bias)
    assert route.chunk, route
    together = onednn.linear(x, packed, bias, route)
    assert all(torch.equal(onednn.linear(x[i:i + 1], packed, bias, route), together[i:i + 1]) for i in range(9))
    for bits in (8, 4):
        module = quantized.QuantizedLinear.from_linear(torch.nn.Linear(1024, 4128), bits)  # 4128: a partial int4 block
        quantized.prepare(module, "bf16")
        assert module.own_kernels, bits
        together = module.matmul(x, module.bias)
        assert all(torch.equal(module.matmul(x[i:i + 1], module.bias), together[i:i + 1]) for i in range(9)), bits
    matrix = fp16.OwnFp16(weight.half(), bias)  # the fp16 kernel's AVX2 variant
    together = matrix.apply(x)
    assert all(torch.equal(matrix.apply(x[:i]), together[:i]) for i in range(1, 9))
    print("ok")
""")


@pytest.mark.skipif(not row_kernel.available(), reason="glmpool's kernels are not built or this CPU has no AVX2")
def test_the_avx2_variants_give_torchs_avx2_kernels_bits():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", GLMPOOL_KERNEL_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_isa_switch_is_read_and_a_bad_value_is_ignored(monkeypatch):
    for value, cap in (("avx2", 256), ("AVX512", 512), ("none", 0), ("sse", 512)):
        monkeypatch.setenv(row_kernel.ISA_ENV, value)
        assert row_kernel.isa_cap() == cap, value
