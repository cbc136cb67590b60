"""glmpool's row kernels on a CPU without AVX-512: their AVX2 variants, run here by making torch and
oneDNN use their own AVX2 kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) in a child process."""
import os
import subprocess
import sys
import textwrap

import pytest

from glmpool.engine import row_kernel

CHILD = textwrap.dedent("""
    import torch
    from glmpool.engine import row_kernel
    from glmpool.engine.linear import int4, onednn, quantized
    row_kernel.library().isa = 256  # as on a CPU without AVX-512: the fp32 kernel's AVX2 variant
    assert row_kernel.torch_isa() == 256 and int4.int4_block_rows() == 32
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
        quantized.prepare(module)
        assert module.own_kernels, bits
        together = module.matmul(x, module.bias)
        assert all(torch.equal(module.matmul(x[i:i + 1], module.bias), together[i:i + 1]) for i in range(9)), bits
    print("ok")
""")


@pytest.mark.skipif(not row_kernel.available() or row_kernel.library().isa != 512,
                    reason="needs the kernels built, on an AVX-512 CPU that also runs their AVX2 variants")
def test_the_avx2_variants_give_torchs_avx2_kernels_bits():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]
