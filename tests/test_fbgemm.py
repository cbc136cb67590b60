"""fp16 weights with fp32 arithmetic through FBGEMM (glmpool.engine.fbgemm, `matmul="fbgemm-fp16"`)."""
import logging

import pytest
import torch
import torch.nn.functional as F

from glmpool.engine import fbgemm

pytestmark = pytest.mark.skipif(not fbgemm.available(), reason="this torch has no FBGEMM fp16 linear (not x86?)")


@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 4096), (192, 64)])  # medium model's MLP; tiny's qkv
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(shape):
    torch.manual_seed(0)
    weight, bias = torch.randn(shape).half().float(), torch.randn(shape[0])  # fp16 values, as THUDM ships them
    packed = fbgemm.pack(weight, bias)
    x = torch.randn(33, shape[1])
    together = fbgemm.linear(x, packed)
    for rows in (1, 2, 3, 16, 17):
        assert torch.equal(fbgemm.linear(x[:rows], packed), together[:rows]), rows
    assert torch.equal(fbgemm.linear(x.view(3, 11, -1), packed), together.view(3, 11, -1))
    assert torch.allclose(together, F.linear(x, weight, bias), rtol=1e-4, atol=1e-3)  # fp32 sums, fp16-exact weights


def test_pack_model_swaps_linears_and_embeddings_and_keeps_what_they_compute():
    torch.manual_seed(1)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(50, 64), "proj": torch.nn.Linear(64, 32),
                                 "norm": torch.nn.LayerNorm(32)}).half()
    ids, x = torch.tensor([[3, 7, 49]]), torch.randn(5, 64)
    expected_rows = model["embed"](ids).float()
    weight = model["proj"].weight.float()
    expected = F.linear(x, weight, model["proj"].bias.float())
    assert fbgemm.pack_model(model) == 2
    assert {type(m).__name__ for m in model.values()} == {"HalfEmbedding", "HalfLinear", "LayerNorm"}
    assert model["norm"].weight.dtype == torch.float32  # loaded in fp16 to spare memory, computed in fp32
    assert torch.equal(model["embed"](ids), expected_rows) and model["embed"](ids).dtype == torch.float32
    assert torch.allclose(model["proj"](x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model["proj"].weight, weight)  # unpacks to the same values, in fp32
    assert model["embed"].project(x).shape == (5, 50)
    model.float()  # a cast of the whole model leaves the fp16 table alone
    assert model["embed"].table.dtype == torch.float16


def test_loaded_model_keeps_fp16_weights_and_matches_fp32(tiny_dir):
    """The tiny checkpoint is stored in fp16 (as THUDM's): fp16 weights lose nothing, only the order of
    the fp32 sums differs from the reference's."""
    from glmpool.engine import load
    from glmpool.engine.model import prompt_positions

    reference = load(tiny_dir, progress=False)
    engine = load(tiny_dir, progress=False, matmul="fbgemm-fp16")
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert {"HalfLinear", "HalfEmbedding"} <= kinds and not kinds & {"Linear", "Embedding"}
    assert engine.model.dtype == torch.float32

    def logits(e):
        ids = e.tokenizer.build_prompt("hello there, how are you?", [])
        position, block, _, _ = prompt_positions(ids, e.tokenizer.bos_id, e.tokenizer.mask_id, e.tokenizer.gmask_id)
        cache = e.model.new_cache(len(ids))
        return e.model(torch.tensor([ids]), torch.tensor([[position, block]]), [cache])

    with torch.inference_mode():
        assert torch.allclose(logits(engine), logits(reference), rtol=1e-4, atol=1e-4)

    bf16 = load(tiny_dir, dtype="bfloat16", progress=False, matmul="fbgemm-fp16")  # fp32 on the CPU only
    assert "HalfLinear" not in {type(m).__name__ for m in bf16.model.modules()}


def test_without_fbgemm_the_cpu_falls_back_to_onednn(tiny_dir, caplog, monkeypatch):
    from glmpool.engine import load, onednn

    monkeypatch.setattr(fbgemm, "available", lambda: False)  # as on an ARM build of torch
    with caplog.at_level(logging.WARNING):
        engine = load(tiny_dir, progress=False, matmul="fbgemm-fp16")
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert "HalfLinear" not in kinds and ("PackedLinear" in kinds) == onednn.available()
    assert "no FBGEMM" in caplog.text
