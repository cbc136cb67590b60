"""The engine's GPU-only branches, proven on the CPU: every check of `bench/gpu.py --cpu-dry-run`'s engine
part (glmpool.engine.gpucheck), and the pieces under them."""
import pytest
import torch

from glmpool.engine import gpucheck
from glmpool.engine.linear import cpm
from glmpool.engine.linear.base import OUTLIER, probe_activations
from glmpool.engine.linear.thudm import pack_int4
from glmpool.engine.model import gelu, gelu_fp32, rotary_tables, rotate
from glmpool.engine.config import ModelConfig

CHECKS = {
    "int8-cuda": gpucheck.check_int8_cuda,
    "int4-cuda": gpucheck.check_int4_cuda,
    "cpm-int8": lambda: gpucheck.check_cpm(8),
    "cpm-int4": lambda: gpucheck.check_cpm(4),
    "selection": gpucheck.check_selection,
    "trial": gpucheck.check_trial_refuses_overflow,
}


@pytest.mark.parametrize("name", CHECKS)
def test_dry_run_check(name):
    check = gpucheck.run_check(name, CHECKS[name])
    assert check.ok, check.detail


def test_the_outlier_case_overflowed_the_routes_as_they_were():
    """The checks above are not vacuous: on their inputs, both routes' old unit-scale fp16 sums are inf."""
    for bits in (8, 4):
        layer, x = gpucheck.outlier_case(bits)
        assert gpucheck.unit_scale_sums_overflow(layer, x), bits


def test_probe_activations_have_chatglm_like_outliers():
    x = probe_activations(3, 4096)
    assert float(x.abs().max()) == OUTLIER
    assert int((x.abs() > 100).sum(dim=1).min()) == 4096 // 256  # the outlier channels, in every row
    assert float(x.abs().median()) < 1  # the rest is randn


def test_the_cpm_route_is_wired_like_the_dequantized_product(monkeypatch):
    """A matrix set to cpm_kernels (prepare, on an old GPU) multiplies through cpm.matmul with its bias;
    here with the kernels' CPU emulation standing in for the launch."""
    monkeypatch.setattr(cpm, "matmul", cpm.emulate)
    for bits in (8, 4):
        layer, x = gpucheck.outlier_case(bits, rows=3)
        layer.cpm = True
        assert layer.kernel_path(3, torch.device("cuda")) == "cpm-cuda"
        got = layer.matmul(x.half(), layer.bias, path="cpm-cuda")
        want = x @ layer.dequantize(torch.float32).t() + layer.bias.float()
        assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_emulated_kernel_reads_thudms_bytes():
    """linear.cpm.emulate reads each 32-bit word as the kernel does; for every int4 value in both nibbles and
    every int8 value it gives THUDM's dequantized matrix."""
    q4 = torch.arange(-8, 8, dtype=torch.int8).repeat(8, 2)[:, torch.randperm(32)]  # [8, 32]
    q8 = torch.arange(-128, 128, dtype=torch.int16).view(8, 32).to(torch.int8)
    for bits, q in ((4, q4), (8, q8)):
        weight = pack_int4(q) if bits == 4 else q
        scale = torch.full((8,), 0.5, dtype=torch.float16)
        read = cpm.emulate(weight, scale, bits, torch.eye(32)).float().t()
        assert torch.equal(read, q.float() * 0.5)


def test_cpm_kernels_source_compiles_for_pre_ampere_gpus():
    try:
        cpm._nvrtc()
    except OSError:
        pytest.skip("no NVRTC here (pip install nvidia-cuda-nvrtc-cu12)")
    for arch in ("61", "70", "75"):
        ptx = cpm.compile_source(f"compute_{arch}")
        assert ptx.endswith(b"\0") and all(f".entry quant_{k}_int{b}".encode() in ptx
                                           for k in ("gemv", "dequant") for b in (4, 8))
        assert b"ld.local" not in ptx  # the per-row sums stay in registers
        assert cpm.compile_source(f"sm_{arch}").startswith(b"\x7fELF")  # machine code
    with pytest.raises(RuntimeError, match="compile"):
        cpm.compile_source("compute_10")


def test_fp32_pointwise_rounds_once():
    """The GPU path's GELU and rotary: computed in fp32, rounded once to fp16, which op-by-op fp16 is not."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).half() * 3
    assert torch.equal(gelu_fp32(x), gelu(x.float()).half())
    assert not torch.equal(gelu_fp32(x), gelu(x))
    config = ModelConfig(hidden_size=64, num_attention_heads=2)
    cos, sin = (torch.cat((t, t.flip(0)), dim=-1) for t in rotary_tables(config, 50, torch.float16, "cpu"))
    q = torch.randn(50, 32).half()
    fused = rotate(q, cos.float(), sin.float(), 2)
    assert fused.dtype == torch.float16
    assert torch.equal(fused, rotate(q.float(), cos.float(), sin.float(), 2).half())
    assert not torch.equal(fused, rotate(q, cos, sin, 2))


def test_fp16_gpu_path_agrees_with_the_fp32_reference(tiny_dir):
    """Greedy decoding of the fp16 model as load() sets it up on a GPU, run on CPU tensors, against the fp32
    reference on the tiny test model (hidden 64). Measured: 100% of tokens teacher-forced, all 4
    continuations identical (op by op in fp16: 98%, 3 of 4); 16 prompts x 32 tokens: 99.0% / 69% of
    continuations, op by op 98.4% / 56% (hidden 128: 98.2% / 62% op by op)."""
    check = gpucheck.run_check("fp16", lambda: gpucheck.check_fp16_numerics(tiny_dir))
    assert check.ok, check.detail


def test_bench_gpu_run_at_toy_size_on_the_cpu(monkeypatch):
    """bench/gpu.py's GPU report (every method, both random models, every decode case) runs on CPU tensors."""
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclass looks itself up there
    spec.loader.exec_module(bench)
    ok, detail = bench.check_gpu_run_at_toy_size()
    assert ok, detail
