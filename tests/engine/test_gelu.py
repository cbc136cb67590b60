"""glmpool's GELU kernel (gelu.c, row_kernel.gelu): the reference's formula in one pass, its own tanh."""
import pytest
import torch

from glmpool.engine import model, row_kernel

pytestmark = pytest.mark.skipif(not row_kernel.available(), reason="glmpool's kernels are not built for this CPU")

SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.3, -0.3, 0.29999998, 40.0, -40.0, 3.4e38, -3.4e38,
           float("inf"), float("-inf"), float("nan")]


def values() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([torch.randn(100_000) * 3, torch.linspace(-12, 12, 50_001), torch.randn(1000) * 1e-3,
                      torch.tensor(SPECIAL)])


def kernel(x: torch.Tensor, isa: int) -> torch.Tensor:
    out = torch.empty_like(x)
    row_kernel.library().glmpool_gelu(x.data_ptr(), out.data_ptr(), x.numel(), isa)
    return out


def test_every_width_gives_the_same_bits():
    x = values()
    widest = kernel(x, row_kernel.library().isa)
    for isa in (256, 0):  # AVX2 runs wherever AVX-512 does; 0 is the plain C definition
        assert torch.equal(kernel(x, isa).nan_to_num(7.0), widest.nan_to_num(7.0)), isa


def test_close_to_the_reference_formula():
    x = values()
    ours, exact = row_kernel.gelu(x).double(), model.gelu(x.double())
    finite = torch.isfinite(exact)
    assert torch.allclose(ours[finite], exact[finite], rtol=1e-6, atol=1e-6)
    # within a few ulp of the float result where nothing cancels (x > 0: 1 + tanh >= 1)
    positive = (x > 1e-3) & finite
    assert ((ours - exact).abs() / exact.abs())[positive].max() < 4e-7
    specials = row_kernel.gelu(torch.tensor(SPECIAL))
    assert torch.equal(specials.nan_to_num(7.0), model.gelu(torch.tensor(SPECIAL)).nan_to_num(7.0))


@pytest.mark.parametrize("threads", [1, 2])
def test_an_element_gets_the_same_bits_in_any_call(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(20_000) * 3
        whole = row_kernel.gelu(x)
        for start in (1, 7, 15, 4095, 4097):  # past vector widths and a thread's piece
            assert torch.equal(row_kernel.gelu(x[start:].clone()), whole[start:]), start
        assert torch.equal(row_kernel.gelu(x.view(16, -1)).view(-1), whole)
    finally:
        torch.set_num_threads(old)


def test_batch_invariant_models_use_it_and_the_reference_does_not(tiny_dir):
    from glmpool.engine import load
    assert load(tiny_dir, progress=False, matmul="onednn").model.layers[0].mlp.gelu is row_kernel.gelu
    assert load(tiny_dir, progress=False).model.layers[0].mlp.gelu is model.gelu  # matmul="reference"
