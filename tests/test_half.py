"""fp16 weights with fp32 arithmetic (glmpool.engine.half): glmpool's kernel (`matmul="fp16"`) and FBGEMM's
(`matmul="fbgemm-fp16"`)."""
import logging

import pytest
import torch
import torch.nn.functional as F

from glmpool.engine import half, row_kernel

NO_KERNEL = "glmpool's fp16 kernel is not built or this CPU has neither AVX-512 nor AVX2"
KERNELS = [pytest.param(True, id="own-kernel", marks=pytest.mark.skipif(not half.kernel_available(), reason=NO_KERNEL)),
           pytest.param(False, id="fbgemm", marks=pytest.mark.skipif(
               not half.fbgemm_available(), reason="this torch has no FBGEMM fp16 linear (not x86?)"))]


# the medium model's MLP; tiny's qkv; outputs not a multiple of 64 with inputs in three chunks (512, 512, 76)
@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 4096), (192, 64), (130, 1100)])
@pytest.mark.parametrize("own_kernel", KERNELS)
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(shape, own_kernel):
    """glmpool's kernel always; FBGEMM exactly where fbgemm_batch_invariant() says so (with AVX-512, not with
    AVX2), the engine's test before it uses FBGEMM."""
    torch.manual_seed(0)
    weight, bias = torch.randn(shape).half().float(), torch.randn(shape[0])  # fp16 values, as THUDM ships them
    matrix = half.HalfMatrix(weight, bias, own_kernel)
    x = torch.randn(33, shape[1])
    together = matrix.times(x)
    same = [torch.equal(matrix.times(x[:rows]), together[:rows]) for rows in range(1, 33)]  # tiles of any height
    same += [torch.equal(matrix.times(x[row:row + 1]), together[row:row + 1]) for row in range(33)]
    assert all(same) == (own_kernel or half.fbgemm_batch_invariant()), same
    assert torch.equal(matrix.times(x.view(3, 11, -1)), together.view(3, 11, -1))
    assert torch.allclose(together, F.linear(x, weight, bias), rtol=1e-4, atol=1e-3)  # fp32 sums, fp16-exact weights
    assert torch.equal(matrix.weight(), weight)
    if own_kernel:  # no rows: an empty result (the kernel once divided by its zero tiles)
        assert matrix.times(x[:0]).shape == (0, shape[0])


@pytest.mark.skipif(not half.kernel_available(), reason=NO_KERNEL)
@pytest.mark.parametrize("threads", [1, 2])
def test_own_kernel_sums_each_output_in_chunks_in_input_order(threads):
    """Terms that give other bits in another order: in the first chunk 2, 2**33, -2**33, 2**24 (in input
    order the 2 is lost: 2**24; backwards it is not: 2**24 + 2); in the second 1, 1, summed from zero (2; added
    one by one to 2**24 each 1 would be lost). Any output of any row: 2**24 + 2."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunk = row_kernel.HALF_CHUNK
        terms = {0: 2.0, 1: 2.0 ** 33, 2: -2.0 ** 33, 3: 2.0 ** 24, chunk: 1.0, chunk + 1: 1.0}
        x = torch.zeros(7, 2 * chunk)
        x[:, list(terms)] = torch.tensor(list(terms.values()))
        weight = torch.zeros(70, 2 * chunk)
        weight[:, list(terms)] = 1.0
        got = half.HalfMatrix(weight, None, own_kernel=True).times(x)
        assert torch.equal(got, torch.full((7, 70), 2.0 ** 24 + 2))
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not half.kernel_available(), reason=NO_KERNEL)
def test_pack_half_lays_out_blocks_of_64_outputs_input_major():
    weight = torch.arange(130 * 3, dtype=torch.float32).view(130, 3)
    packed = row_kernel.pack_half(weight)
    assert packed.shape == (3, 3, 64) and packed.dtype == torch.float16
    assert torch.equal(packed[1, 2, :5].float(), weight[64:69, 2])
    assert torch.equal(packed[2, :, 2:].float(), torch.zeros(3, 62))  # padding
    assert torch.equal(row_kernel.unpack_half(packed, 130), weight)


@pytest.mark.parametrize("own_kernel", KERNELS)
def test_pack_model_swaps_linears_and_embeddings_and_keeps_what_they_compute(own_kernel):
    torch.manual_seed(1)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(50, 64), "proj": torch.nn.Linear(64, 32),
                                 "norm": torch.nn.LayerNorm(32)}).half()
    ids, x = torch.tensor([[3, 7, 49]]), torch.randn(5, 64)
    expected_rows = model["embed"](ids).float()
    weight = model["proj"].weight.float()
    expected = F.linear(x, weight, model["proj"].bias.float())
    assert half.pack_model(model, own_kernel) == 2
    assert {type(m).__name__ for m in model.values()} == {"HalfEmbedding", "HalfLinear", "LayerNorm"}
    assert model["norm"].weight.dtype == torch.float32  # loaded in fp16 to spare memory, computed in fp32
    assert torch.equal(model["embed"](ids), expected_rows) and model["embed"](ids).dtype == torch.float32
    assert torch.allclose(model["proj"](x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model["proj"].weight, weight)  # unpacks to the same values, in fp32
    assert model["embed"].project(x).shape == (5, 50)
    model.float()  # a cast of the whole model leaves the fp16 tables alone
    assert model["embed"].table.dtype == torch.float16
    assert torch.allclose(model["proj"](x), expected, rtol=1e-5, atol=1e-5)
    assert len(model["proj"].held_tensors()) == int(own_kernel)  # what hugepages moves


@pytest.mark.parametrize("own_kernel", KERNELS)
def test_loaded_model_keeps_fp16_weights_and_matches_fp32(tiny_dir, own_kernel):
    """The tiny checkpoint is stored in fp16 (as THUDM's): fp16 weights lose nothing, only the order of
    the fp32 sums differs from the reference's."""
    from glmpool.engine import load
    from glmpool.engine.model import prompt_positions

    by_own_kernel = own_kernel or not half.fbgemm_batch_invariant()  # fbgemm-fp16 only where batch-invariant
    if by_own_kernel and not half.kernel_available():
        pytest.skip("FBGEMM is not batch-invariant here and glmpool's kernel is missing: oneDNN (the next test)")
    reference = load(tiny_dir, progress=False)
    engine = load(tiny_dir, progress=False, matmul="fp16" if own_kernel else "fbgemm-fp16")
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert {"HalfLinear", "HalfEmbedding"} <= kinds and not kinds & {"Linear", "Embedding"}
    assert engine.model.dtype == torch.float32
    assert engine.model.word_embeddings.matrix.own_kernel == by_own_kernel

    def logits(e):
        ids = e.tokenizer.build_prompt("hello there, how are you?", [])
        position, block, _, _ = prompt_positions(ids, e.tokenizer.bos_id, e.tokenizer.mask_id, e.tokenizer.gmask_id)
        cache = e.model.new_cache(len(ids))
        return e.model(torch.tensor([ids]), torch.tensor([[position, block]]), [cache])

    with torch.inference_mode():
        assert torch.allclose(logits(engine), logits(reference), rtol=1e-4, atol=1e-4)

    bf16 = load(tiny_dir, dtype="bfloat16", progress=False, matmul="fp16")  # fp32 on the CPU only
    assert "HalfLinear" not in {type(m).__name__ for m in bf16.model.modules()}


def test_without_the_kernel_fp16_goes_through_fbgemm_and_without_either_through_onednn(tiny_dir, caplog,
                                                                                     monkeypatch):
    from glmpool.engine import load, onednn

    monkeypatch.setattr(half, "kernel_available", lambda: False)  # no C compiler at install, or an old CPU
    if half.fbgemm_batch_invariant():
        with caplog.at_level(logging.INFO):
            engine = load(tiny_dir, progress=False, matmul="fp16")
        assert not engine.model.word_embeddings.matrix.own_kernel
        assert "using FBGEMM" in caplog.text
    elif half.fbgemm_available():  # FBGEMM here gives a row other bits in a batch: oneDNN, fp32
        with caplog.at_level(logging.WARNING):
            engine = load(tiny_dir, progress=False, matmul="fp16")
        assert "HalfLinear" not in {type(m).__name__ for m in engine.model.modules()}
        assert "other bits alone than in a batch" in caplog.text and "using onednn" in caplog.text
    monkeypatch.setattr(half, "fbgemm_available", lambda: False)  # as on an ARM build of torch
    monkeypatch.setattr(half, "fbgemm_batch_invariant", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine = load(tiny_dir, progress=False, matmul="fp16")
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert "HalfLinear" not in kinds and ("PackedLinear" in kinds) == onednn.available()
    assert "no FBGEMM" in caplog.text
