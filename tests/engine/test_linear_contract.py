"""The contract every way of multiplying a weight keeps (glmpool/engine/linear/registry.py), tested for each
registered method: a new one is held to it by registering.

- usable() tells the truth: where a method says it runs on this CPU in fp32, it multiplies, and agrees
  with the plain product of the weight it was given within a tolerance stated per kind below;
- where it promises batch invariance here (batch_invariant(), per the load-time probes), a sequence's
  output has the same bits alone and among any others;
- a method says it cannot run on a CUDA device where there is none.
"""
import pytest
import torch
import torch.nn.functional as F

from glmpool.engine.linear import base, registry
from glmpool.engine.linear.quantized import QuantizedLinear, prepare
from glmpool.engine.linear.thudm import dequantize_weight

CPU = torch.device("cpu")
SHAPES = [(1024, 4096), (130, 1024), (192, 64)]  # [out, in]: wide rows; a partial 64-row block; tiny
# How far a method may be from the plain fp32 product of the weight it holds: fp32 sums in another order;
# for the quantized routes, activations rounded to bf16 (0.4% each) or to int8 per block of 32 (to 1/254 of
# the block's largest), relative to the output's largest value.
TOLERANCE = {"fp32": dict(rtol=1e-4, atol=1e-3), "bf16": dict(rtol=0, atol=2e-2), "int8": dict(rtol=0, atol=2e-2)}


def method_params(quantized: bool):
    return [pytest.param(m.name, id=m.name) for m in registry.METHODS if m.quantized == quantized]


def usable_here(name: str):
    method = base.method_class(name)
    if not method.usable(CPU, torch.float32):
        pytest.skip(f"{name} says it cannot run here ({registry.BY_NAME[name].summary})")
    return method


def check_batches(multiply, x: torch.Tensor) -> None:
    """multiply(x[:b]) gives the first b sequences of multiply(x) bit for bit, for batches of 1 to 17
    (tiles of 1-6 rows in the kernels, a lone row apart), and a sequence alone its own bits at any place."""
    together = multiply(x)
    for b in (1, 2, 3, 6, 7, 16, 17):
        assert torch.equal(multiply(x[:b]), together[:b]), b
        assert torch.equal(multiply(x[b:b + 1]), together[b:b + 1]), b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", method_params(quantized=False))
def test_matmul_method(name, shape):
    method = usable_here(name)
    torch.manual_seed(0)
    weight, bias = torch.randn(shape).half().float(), torch.randn(shape[0])  # fp16 values, as THUDM ships them
    if method.table_dtype == torch.float16:
        weight = weight.half()  # as such a method's loads read the checkpoint
    packed = method(weight, bias)
    assert torch.equal(packed.weight(), weight.float())
    x = torch.randn(33, shape[1])
    out = packed.apply(x)
    assert out.shape == (33, shape[0]) and out.dtype == torch.float32
    assert torch.allclose(out, F.linear(x, weight.float(), bias), **TOLERANCE["fp32"])
    if method.batch_invariant():
        check_batches(packed.apply, x)
        assert torch.equal(packed.apply(x.view(3, 11, -1)), out.view(3, 11, -1))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", method_params(quantized=True))
def test_quantized_route(name, shape, bits):
    route = usable_here(name)
    torch.manual_seed(0)
    linear = QuantizedLinear.from_linear(torch.nn.Linear(shape[1], shape[0]), bits)
    activations = "int8" if name == "int-dot" else "bf16"  # the setting that lets the route take calls
    prepare(linear, activations)
    long = registry.PROMPT_KERNEL_MAX_TOKENS + 1  # a decode step's token, or a long prompt's
    tokens = next((t for t in (1, long) if linear.kernel_path(33 * t, CPU, tokens=t) == name), None)
    if tokens is None:
        pytest.skip(f"the registry's order sends no call on this matrix to {name} ({bits} bits, {shape})")
    x = torch.randn(33, tokens, shape[1])  # 33 sequences of the tokens the route is given
    multiply = lambda rows: linear.matmul(rows, linear.bias, path=name)  # noqa: E731
    out = multiply(x)
    want = F.linear(x, dequantize_weight(linear.thudm_weight(), linear.weight_scale, bits), linear.bias)
    assert torch.allclose(out, want, atol=TOLERANCE[activations]["atol"] * float(want.abs().max()))
    if route.batch_invariant():
        check_batches(multiply, x)


@pytest.mark.parametrize("name", [m.name for m in registry.METHODS])
def test_no_method_claims_a_gpu_that_is_not_there(name):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    method = base.method_class(name)
    assert not method.usable(torch.device("cuda"), torch.float16) or name in ("reference", "dequant")


def test_every_fallback_chain_ends_in_a_method_usable_everywhere():
    for name in registry.MATMULS:
        last = registry.fallbacks(name)[-1]
        assert base.method_class(last).usable(torch.device("meta"), torch.bfloat16), name
    assert registry.DEFAULT_MATMUL in registry.MATMULS
    assert base.method_class(registry.QUANTIZED_ORDER[-1]).takes(None, 1, 10 ** 6, torch.device("meta"))
