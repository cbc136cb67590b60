"""fp16 weights with fp32 arithmetic (glmpool.engine.linear.fp16): glmpool's kernel (`matmul="fp16"`) and
FBGEMM's (`matmul="fbgemm-fp16"`). The contract every method keeps is tested in test_linear_contract.py."""
import logging

import pytest
import torch
import torch.nn.functional as F

from glmpool.engine import row_kernel
from glmpool.engine.linear import fp16, layers, reference

NO_KERNEL = "glmpool's fp16 kernel is not built or this CPU has neither AVX-512 nor AVX2"
OWN_KERNEL = fp16.OwnFp16.usable(torch.device("cpu"), torch.float32)
KERNELS = [pytest.param(fp16.OwnFp16, id="own-kernel", marks=pytest.mark.skipif(not OWN_KERNEL, reason=NO_KERNEL)),
           pytest.param(fp16.FbgemmFp16, id="fbgemm", marks=pytest.mark.skipif(
               not fp16.fbgemm_available(), reason="this torch has no FBGEMM fp16 linear (not x86?)"))]


@pytest.mark.parametrize("shape", [(4096, 1024), (192, 64), (130, 1100)])
def test_fbgemm_batch_invariant_tells_the_truth(shape):
    """FBGEMM's AVX2 micro-kernels for tiles of 1 and 2 rows sum in another order than those for 3-6 (with
    AVX-512 all alike): fbgemm-fp16 is usable exactly where its probe finds a row's bits the same in any batch."""
    if not fp16.fbgemm_available():
        pytest.skip("this torch has no FBGEMM fp16 linear (not x86?)")
    torch.manual_seed(0)
    matrix = fp16.FbgemmFp16(torch.randn(shape).half(), torch.randn(shape[0]))
    x = torch.randn(33, shape[1])
    together = matrix.apply(x)
    same = [torch.equal(matrix.apply(x[:rows]), together[:rows]) for rows in range(1, 33)]  # tiles of any height
    same += [torch.equal(matrix.apply(x[row:row + 1]), together[row:row + 1]) for row in range(33)]
    assert all(same) == fp16.fbgemm_batch_invariant() == fp16.FbgemmFp16.usable(torch.device("cpu"), torch.float32)


def test_fbgemm_packs_a_large_matrix_in_slices_and_gives_the_whole_matrixs_bits(monkeypatch):
    if not fp16.fbgemm_available():
        pytest.skip("this torch has no FBGEMM fp16 linear (not x86?)")
    torch.manual_seed(0)
    weight, bias, x = torch.randn(5000, 1024).half(), torch.randn(5000), torch.randn(7, 1024)
    whole = torch.ops.quantized.linear_dynamic_fp16(x, torch.ops.quantized.linear_prepack_fp16(weight.float(), bias))
    monkeypatch.setattr(fp16, "PACK_SLICE_BYTES", 1 << 20)
    sliced = fp16.FbgemmFp16(weight, bias)
    assert len(sliced.slices) == 20
    assert torch.equal(sliced.apply(x), whole) and torch.equal(sliced.weight(), weight.float())


@pytest.mark.skipif(not OWN_KERNEL, reason=NO_KERNEL)
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
        got = fp16.OwnFp16(weight, None).apply(x)
        assert torch.equal(got, torch.full((7, 70), 2.0 ** 24 + 2))
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not OWN_KERNEL, reason=NO_KERNEL)
def test_pack_half_lays_out_blocks_of_64_outputs_input_major():
    weight = torch.arange(130 * 3, dtype=torch.float32).view(130, 3)
    packed = row_kernel.pack_half(weight)
    assert packed.shape == (3, 3, 64) and packed.dtype == torch.float16
    assert torch.equal(packed[1, 2, :5].float(), weight[64:69, 2])
    assert torch.equal(packed[2, :, 2:].float(), torch.zeros(3, 62))  # padding
    assert torch.equal(row_kernel.unpack_half(packed, 130), weight)


@pytest.mark.parametrize("method", KERNELS)
def test_pack_model_swaps_linears_and_embeddings_and_keeps_what_they_compute(method):
    torch.manual_seed(1)
    model = torch.nn.ModuleDict({"embed": reference.Embedding(50, 64), "proj": reference.Linear(64, 32),
                                 "norm": torch.nn.LayerNorm(32)}).half()
    ids, x = torch.tensor([[3, 7, 49]]), torch.randn(5, 64)
    expected_rows = model["embed"](ids).float()
    weight = model["proj"].weight.float()
    expected = F.linear(x, weight, model["proj"].bias.float())
    assert layers.pack_model(model, method) == 2
    assert {type(m).__name__ for m in model.values()} == {"TiedEmbedding", "PackedLinear", "LayerNorm"}
    assert model["norm"].weight.dtype == torch.float32  # loaded in fp16 to spare memory, computed in fp32
    assert torch.equal(model["embed"](ids), expected_rows) and model["embed"](ids).dtype == torch.float32
    assert torch.allclose(model["proj"](x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model["proj"].weight, weight)  # unpacks to the same values, in fp32
    assert model["embed"].project(x).shape == (5, 50)
    model.float()  # a cast of the whole model leaves the fp16 tables alone
    assert model["embed"].table.dtype == torch.float16
    assert torch.allclose(model["proj"](x), expected, rtol=1e-5, atol=1e-5)
    assert len(model["proj"].held_tensors()) == int(method is fp16.OwnFp16)  # what hugepages moves


@pytest.mark.parametrize("method", KERNELS)
def test_loaded_model_keeps_fp16_weights_and_matches_fp32(tiny_dir, method):
    """The tiny checkpoint is stored in fp16 (as THUDM's): fp16 weights lose nothing, only the order of
    the fp32 sums differs from the reference's."""
    from glmpool.engine import load
    from glmpool.engine.model import prompt_positions

    usable = method.usable(torch.device("cpu"), torch.float32)  # fbgemm-fp16 only where batch-invariant
    if not usable and not OWN_KERNEL:
        pytest.skip("FBGEMM is not batch-invariant here and glmpool's kernel is missing: oneDNN (the next test)")
    reference = load(tiny_dir, progress=False)
    engine = load(tiny_dir, progress=False, matmul=method.name)
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert {"PackedLinear", "TiedEmbedding"} <= kinds and not kinds & {"Linear", "Embedding"}
    assert engine.model.dtype == torch.float32 and engine.model.word_embeddings.table.dtype == torch.float16
    assert type(engine.model.word_embeddings.method) is (method if method.usable(torch.device("cpu"), torch.float32)
                                                         else fp16.OwnFp16)

    def logits(e):
        ids = e.tokenizer.build_prompt("hello there, how are you?", [])
        position, block, _, _ = prompt_positions(ids, e.tokenizer.bos_id, e.tokenizer.mask_id, e.tokenizer.gmask_id)
        cache = e.model.new_cache(len(ids))
        return e.model(torch.tensor([ids]), torch.tensor([[position, block]]), [cache])

    with torch.inference_mode():
        assert torch.allclose(logits(engine), logits(reference), rtol=1e-4, atol=1e-4)

    bf16 = load(tiny_dir, dtype="bfloat16", progress=False, matmul="fp16")  # fp32 on the CPU only
    assert "PackedLinear" not in {type(m).__name__ for m in bf16.model.modules()}


def test_without_the_kernel_fp16_goes_through_fbgemm_and_without_either_through_onednn(tiny_dir, caplog,
                                                                                     monkeypatch):
    from glmpool.engine import load
    from glmpool.engine.linear import onednn

    monkeypatch.setattr(fp16.OwnFp16, "usable", classmethod(lambda cls, *a: False))  # no C compiler, an old CPU
    if fp16.fbgemm_batch_invariant():
        with caplog.at_level(logging.INFO):
            engine = load(tiny_dir, progress=False, matmul="fp16")
        assert type(engine.model.word_embeddings.method) is fp16.FbgemmFp16
        assert "matmul fp16 cannot run here" in caplog.text and "using fbgemm-fp16" in caplog.text
    elif fp16.fbgemm_available():  # FBGEMM here gives a row other bits in a batch: oneDNN, fp32
        with caplog.at_level(logging.INFO):
            engine = load(tiny_dir, progress=False, matmul="fp16")
        assert "PackedLinear" not in {type(m).__name__ for m in engine.model.modules()} or \
            isinstance(engine.model.word_embeddings.method, onednn.OneDNN)
        assert "using onednn" in caplog.text
    monkeypatch.setattr(fp16, "fbgemm_available", lambda: False)  # as on an ARM build of torch
    monkeypatch.setattr(fp16, "fbgemm_batch_invariant", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        engine = load(tiny_dir, progress=False, matmul="fp16")
    assert "using onednn" in caplog.text or not onednn.available()
    assert isinstance(getattr(engine.model.word_embeddings, "method", None), onednn.OneDNN) == onednn.available()
