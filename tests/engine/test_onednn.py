"""oneDNN fp32 matmuls (glmpool.engine.linear.onednn): the same numbers for a row however many rows go with it.
The contract every method keeps is tested in test_linear_contract.py; here what is oneDNN's own."""
import copy
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from glmpool.engine import row_kernel
from glmpool.engine.linear import fp16, layers, onednn, reference

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch has no usable oneDNN linear")


@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 4096), (192, 64), (100, 48)])  # medium MLP; tiny qkv
@pytest.mark.parametrize("packed,kernel", [(True, False), (False, True), (False, False)],
                         ids=["packed-onednn-only", "plain", "plain-onednn-only"])  # packed + kernel: the contract test
def test_lone_row_route_keeps_a_rows_bits_on_plain_weights_and_without_the_kernel(shape, packed, kernel, monkeypatch):
    if not kernel:  # as where glmpool's row kernel is not built: lone rows through oneDNN
        monkeypatch.setattr(row_kernel, "available", lambda: False)
    torch.manual_seed(0)
    weight, bias = torch.randn(shape), torch.randn(shape[0])
    operand = torch.ops.mkldnn._reorder_linear_weight(weight) if packed else weight
    x = torch.randn(33, shape[1])
    lone_row = onednn.lone_row_route(operand, bias)
    assert packed and row_kernel.available() or not lone_row.chunk  # the kernel reads packed weights only
    assert lone_row.several == (bool(lone_row.chunk) and row_kernel.several_rows_available())  # 2-128 rows too
    if not lone_row.chunk:  # padded exactly where oneDNN sums a lone row otherwise (its GEMV, on plain weights)
        assert lone_row.pad == (not torch.equal(onednn._matmul(x[:1], operand, bias), onednn._matmul(x[:2], operand,
                                                                                                      bias)[:1]))
    together = onednn.linear(x, operand, bias, lone_row)
    for rows in (1, 2, 3, 16, 17):
        assert torch.equal(onednn.linear(x[:rows], operand, bias, lone_row), together[:rows]), rows
    assert torch.equal(onednn.linear(x.view(3, 11, -1), operand, bias), together.view(3, 11, -1))
    assert torch.allclose(together, F.linear(x, weight, bias), rtol=1e-4, atol=1e-3)


needs_row_kernel = pytest.mark.skipif(not row_kernel.available(), reason="glmpool's row kernel is not built "
                                      "or this CPU has neither AVX-512 nor AVX2")


def test_row_kernel_is_built_where_a_c_compiler_is():
    if platform.machine() != "x86_64" or not shutil.which("cc"):
        pytest.skip("no C compiler on an x86-64 machine: glmpool installs without its kernel")
    assert row_kernel.library_path() is not None, "setup.py did not build glmpool/engine/row_kernel.c"


@needs_row_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_row_kernel_sums_as_onednn_does_among_other_rows_and_only_with_its_chunk(threads):
    """Where the probe finds the kernel's chunk, every row count gets oneDNN's bits (the AVX-512 or the AVX2
    variant, whichever runs here). Where it finds none (oneDNN's AVX2 kernels with 2 threads sum an odd
    number of 64-output blocks otherwise), a lone row goes through oneDNN, which gave it those bits."""
    torch.manual_seed(3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out, inner in [(4096, 1024), (1000, 4096), (130, 2048)]:  # outputs not a multiple of 64 too
            weight, bias = torch.randn(out, inner), torch.randn(out)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            x = torch.randn(17, inner)
            among_others = onednn._matmul(x, packed, bias)  # oneDNN itself
            route = onednn.lone_row_route(packed, bias)
            chunk = route.chunk
            assert chunk or out != 4096, "the kernel never sums as oneDNN does here: it would never be used"
            if not chunk:
                assert torch.equal(onednn.linear(x[:1], packed, bias, route), among_others[:1])
                continue
            for row in (0, 16):
                assert torch.equal(row_kernel.row_times_packed(x[row], packed, bias, out, chunk), among_others[row])
            for rows in (2, 5, 7, 16, 17):  # tiles of 1-6 rows (AVX-512) or 1-3 (AVX2), all sums as oneDNN's
                got = row_kernel.rows_times_packed(x[:rows], packed, bias, out, chunk)
                assert torch.equal(got, among_others[:rows]), (out, inner, rows)
            assert row_kernel.rows_times_packed(x[:0], packed, bias, out, chunk).shape == (0, out)
            others = [c for c in (inner, inner // 2, inner // 4) if c != chunk]
            assert not torch.equal(row_kernel.row_times_packed(x[0], packed, bias, out, others[0]), among_others[0])
    finally:
        torch.set_num_threads(old)


@needs_row_kernel
def test_row_kernel_refuses_what_it_cannot_read():
    weight = torch.randn(128, 40)  # 40 inputs: not in 16-input sub-blocks
    assert not row_kernel.fits(torch.ops.mkldnn._reorder_linear_weight(weight), 128, 40)
    assert not row_kernel.fits(torch.randn(128, 64), 128, 64)  # a plain tensor
    assert onednn.lone_row_route(torch.ops.mkldnn._reorder_linear_weight(weight), None).chunk is None


def test_pack_model_swaps_every_linear_and_keeps_what_it_computes():
    torch.manual_seed(1)
    model = torch.nn.Sequential(reference.Linear(64, 128), torch.nn.GELU(), reference.Linear(128, 32, bias=False))
    x = torch.randn(5, 64)
    expected = model(x)
    assert layers.pack_model(model, onednn.OneDNN) == 2
    assert all(type(m) is not reference.Linear for m in model)
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    assert not model.state_dict()  # opaque: never saved as if it were a checkpoint tensor
    assert torch.equal(model[2].weight, model[2].method.packed.to_dense())
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))


def test_tied_embedding_looks_up_the_plain_table_and_projects_through_a_packed_copy():
    torch.manual_seed(2)
    embedding = reference.Embedding(300, 64)
    tied = layers.TiedEmbedding(embedding.weight, onednn.OneDNN)
    ids, hidden = torch.tensor([[0, 7, 299]]), torch.randn(5, 64)
    assert tied.table.data_ptr() == embedding.weight.data_ptr() and torch.equal(tied(ids), embedding(ids))
    projected = tied.project(hidden)
    assert torch.allclose(projected, hidden @ embedding.weight.detach().T, rtol=1e-4, atol=1e-4)
    for rows in (1, 2, 3):
        assert torch.equal(tied.project(hidden[:rows]), projected[:rows]), rows
    clone = copy.deepcopy(tied)
    assert clone.table.data_ptr() != tied.table.data_ptr() and torch.equal(clone.project(hidden), projected)


def test_loaded_fp32_model_is_packed_on_request(tiny_dir):
    from glmpool.engine import load

    onednn_output = lambda e: isinstance(getattr(e.model.word_embeddings, "method", None), onednn.OneDNN)  # noqa: E731
    assert not onednn_output(load(tiny_dir, progress=False))  # "reference" is the engine's default
    engine = load(tiny_dir, progress=False, matmul="onednn")
    assert onednn_output(engine)
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert "PackedLinear" in kinds and "Linear" not in kinds and engine.model.layers[0].mlp.dense_h_to_4h.method.name == "onednn"
    half = load(tiny_dir, dtype="bfloat16", progress=False, matmul="onednn")  # oneDNN: fp32 only
    assert not onednn_output(half)
    assert "PackedLinear" not in {type(m).__name__ for m in half.model.modules()}


@pytest.fixture(scope="module")
def wide_head_dir(tmp_path_factory):
    """Heads of 64 dims, as the medium model's (ChatGLM-6B's are 128; the tiny model's 16)."""
    from glmpool.engine.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "ckpt", hidden=128, heads=2, seed=2)


@pytest.mark.parametrize("attention", [pytest.param("kernel", marks=needs_row_kernel), "torch"])
@pytest.mark.parametrize("head", ["tiny", "wide"])
@pytest.mark.parametrize("matmul", ["onednn", "reference", pytest.param("fp16", marks=pytest.mark.skipif(
    not fp16.OwnFp16.usable(torch.device("cpu"), torch.float32), reason="glmpool's fp16 kernel is not built or this CPU has no AVX2")),
    pytest.param("fbgemm-fp16", marks=pytest.mark.skipif(not fp16.fbgemm_available(), reason="no FBGEMM fp16 linear")),
    "int8-qe", "int4-qe", "int8-qe-bf16", "int4-qe-bf16"])
def test_batching_keeps_every_logit_bit_for_bit_with_onednn(tiny_dir, wide_head_dir, matmul, head, attention,
                                                             monkeypatch):
    """With matmul="onednn" (or "fp16", "fbgemm-fp16") a sequence's logits are the same bits alone or batched, at
    every step. Decode attention: glmpool's kernel, each sequence over its own span in one KV slab for the
    batch; or, torch's, one KV cache per sequence (the tiny model's 16-dim heads) or, where padding was
    found exact at load (64-dim heads, on the machines this was written on), one slab with decode
    attention padded to the longest sequence (or, beside a much longer prompt, sequence by sequence over
    each one's own span). Sequences leave early, and the last slot's moves into the freed one. With the
    reference's matmuls (F.linear alone, W @ x^T batched) they are not, only the greedy tokens. int8-qe,
    int4-qe: every matrix quantized (prompts through dequantized matrices, decode steps through route
    int-dot where built, else as -bf16), the rest as with onednn; -bf16: decode steps through the
    weight-only kernels, a lone row and several int8 rows through glmpool's where built."""
    from glmpool.engine import SamplingParams, decode_attention, load

    if attention == "torch":
        monkeypatch.setattr(decode_attention, "usable", lambda *args: False)
    activations = "bf16" if matmul.endswith("-bf16") else "int8"
    quantize = matmul.removeprefix("int").removesuffix("-bf16") if "-qe" in matmul else None
    engine = load(tiny_dir if head == "tiny" else wide_head_dir, progress=False,
                  matmul="onednn" if quantize else matmul, quantize=quantize, quantized_activations=activations)
    if matmul == "fbgemm-fp16":  # where FBGEMM would change bits with the batch: glmpool's kernel, else oneDNN
        through = type(getattr(engine.model.word_embeddings, "method", None))
        assert (through is fp16.FbgemmFp16) == fp16.fbgemm_batch_invariant()
    slab = engine.model.slab_is_exact
    padded = slab and attention == "torch"
    if attention == "kernel":
        assert slab == (matmul != "reference")
    else:
        assert not (slab and head == "tiny")  # 16-dim heads: padding is not exact
    if head == "wide" and matmul != "reference" and not slab:
        pytest.skip("padded decode attention is not exact on this machine: one cache per sequence, as for tiny")
    long = "please tell me everything about the model server and its many requests " * 10
    queries = ["你好", "hello there, how are you?", "橘子", "what is the time", long]
    params = {q: SamplingParams(do_sample=False, max_new_tokens={"你好": 3, long: 4}.get(q, 8)) for q in queries}
    from glmpool.engine import model
    groups = []  # per decode step through the slab: 1 (all at once) or one group per sequence
    init = model.PaddedDecode.__init__
    record = lambda self, *a: (init(self, *a), groups.append(len(self.groups)))[0]

    def logits_of(batch) -> dict:
        seen = {}
        advance_all = batch._advance_all
        def recording(sequences, logits):
            for sequence, row in zip(sequences, logits):
                seen.setdefault(sequence.key, []).append(row.clone())
            return advance_all(sequences, logits)
        batch._advance_all = recording
        while len(batch):
            batch.step()
        return seen

    alone = {}
    for q in queries:
        batch = engine.batcher(max_batch=1)
        batch.add(q, q, None, params[q])
        alone.update(logits_of(batch))
    batch = engine.batcher(max_batch=8)
    assert (batch.slab is not None) == slab and (batch.slab is None or batch.slab.kernel == (attention == "kernel"))
    for q in queries:
        batch.add(q, q, None, params[q])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.PaddedDecode, "__init__", record)
        together = logits_of(batch)
    if padded:  # the long prompt: sequence by sequence (padding would read 3x the cache); once it left, at once
        assert groups[0] == len(queries) and groups[-1] == 1
    identical = all(len(together[q]) == len(alone[q]) and all(map(torch.equal, together[q], alone[q]))
                    for q in queries)
    assert identical == (matmul != "reference")


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=needs_row_kernel)], ids=["torch", "glmpool"])
def test_gelu_gives_an_element_the_same_bits_wherever_it_sits(kernel):
    """Batching must not change bits, and an element-wise kernel's threads split a call at places that
    depend on its size: the activation must round an element alike in a vector loop's body and in its
    scalar tail (F.gelu(approximate="tanh") does not: 77 of the 2016 tail elements here differ)."""
    from glmpool.engine import model
    gelu = row_kernel.gelu if kernel else model.gelu
    torch.manual_seed(0)
    x = torch.randn(4096) * 3
    whole = gelu(x)
    assert all(torch.equal(gelu(x[:n].clone()), whole[:n]) for n in range(1, 64))
