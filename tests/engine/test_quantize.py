"""Quantization: THUDM's int8/int4 format, the CPU kernel paths, modules, whole models and checkpoints."""
import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

from glmpool.engine import agreement
from glmpool.engine.linear import base, cuda, dequant, int4, int8, quantized, registry, thudm
from glmpool.engine import row_kernel
from glmpool.engine.config import ModelConfig
from glmpool.engine.model import ChatGLM, prefix_attention_mask, prompt_positions
from glmpool.engine.linear.quantized import QuantizedEmbedding, QuantizedLinear, quantize_model
from glmpool.engine.linear.thudm import dequantize_weight, pack_int4, quantize_state_dict, quantize_weight, unpack_int4

KERNEL = {8: "int8", 4: "int4"}


def thudm_dequantize_reference(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Element by element, as THUDM's CPU extraction kernel reads the bytes (signed char shifts)."""
    rows = []
    for n in range(qweight.shape[0]):
        row = []
        for byte in qweight[n].tolist():  # int8 values
            if bits == 8:
                row.append(byte)
                continue
            high = byte >> 4  # Python's >> on a negative int is arithmetic, like C's on signed char
            low = ((byte << 4) & 0xFF)
            low = (low - 256 if low >= 128 else low) >> 4  # (signed char)(byte << 4) >> 4
            row += [high, low]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32) * scale.float()[:, None]


def test_int4_nibble_order_and_signs():
    q = torch.tensor([[1, -2, 7, -8, -1, 0, 0, -1]], dtype=torch.int8)
    packed = pack_int4(q)
    # even column high nibble, odd column low nibble, two's complement nibbles
    assert packed.view(torch.uint8).tolist() == [[0x1E, 0x78, 0xF0, 0x0F]]
    assert torch.equal(unpack_int4(packed), q)


def test_int4_pack_round_trip_every_value_in_both_positions():
    values = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.cartesian_prod(values, values).to(torch.int8).view(1, -1).repeat(3, 1)  # [3, 512]: all pairs
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (3, 256)
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float16)
    assert torch.equal(dequantize_weight(packed, scale, 4), thudm_dequantize_reference(packed, scale, 4))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_format_and_error_bound(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 64, generator=g) * torch.logspace(-3, 2, 37)[:, None]  # rows of very different scales
    w[5] = 0  # an all-zero row
    qweight, scale = quantize_weight(w, bits, chunk_rows=10)
    qmax = 2 ** (bits - 1) - 1
    assert qweight.dtype == torch.int8 and qweight.shape == (37, 64 * bits // 8)
    assert scale.dtype == torch.float16 and scale.shape == (37,)
    assert torch.equal(scale, (w.abs().amax(1) / qmax).half())
    q = unpack_int4(qweight) if bits == 4 else qweight
    assert int(q.abs().max()) <= qmax
    assert torch.equal(q, torch.round(w / scale.float().clamp_min(1e-30)[:, None]).clamp(-qmax, qmax).to(torch.int8))
    restored = dequantize_weight(qweight, scale, bits)
    assert torch.equal(restored, thudm_dequantize_reference(qweight, scale, bits))
    error = (restored - w).abs().amax(1)
    assert bool((error <= scale.float() / 2 * (1 + 1e-3) + 1e-12).all())  # at most half a step per row
    assert bool((restored[5] == 0).all())


def test_cpu_int4_layout_matches_torchs_packer_blockwise():
    block = int4.int4_block_rows()
    assert block in int4.INT4_BLOCK_CANDIDATES  # 64 on AVX-512 machines, 32 on AVX2 ones
    q = torch.randint(-8, 8, (192, 256), dtype=torch.int8)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).to(torch.int32), 1).view(torch.uint8)
    assert torch.equal(int4._cpu_int4_pack(q), theirs)
    assert torch.equal(int4._cpu_int4_pack(q[block:2 * block]), theirs[block:2 * block])  # blocks are independent
    assert torch.equal(int4._cpu_int4_unpack(theirs), q)
    assert int4._cpu_int4_layout_ok() and int8._cpu_int8_kernel_ok()


def reference_linear(module: QuantizedLinear, x: torch.Tensor, path: str) -> torch.Tensor:
    weight = dequantize_weight(module.thudm_weight(), module.weight_scale, module.bits)
    if path != "dequant":
        x = x.bfloat16().float()  # the CPU kernels take bf16 activations
    return F.linear(x, weight, module.bias)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 16, 33, 70])
def test_quantized_linear_paths_equal_dequantize_then_linear(bits, rows):
    torch.manual_seed(rows)
    module = QuantizedLinear.from_linear(torch.nn.Linear(128, 192), bits)
    x = torch.randn(rows, 128)
    for path in (KERNEL[bits], "dequant"):
        expected = reference_linear(module, x, path)
        out = module.matmul(x, module.bias, path=path)
        assert out.dtype == torch.float32 and out.shape == (rows, 192)
        # kernels: bf16 output rounding of the unscaled sums (relative 2^-9); dequant: fp32 summation order
        tolerance = 1e-2 * float(expected.abs().max()) if path != "dequant" else 1e-5
        assert float((out - expected).abs().max()) <= tolerance, path
    assert module(x.view(1, rows, 128)).shape == (1, rows, 192)  # any leading shape
    assert module.kernel_path(rows, x.device) == KERNEL[bits]  # decode rows: the kernel, at any count
    assert module.kernel_path(rows, x.device, tokens=registry.PROMPT_KERNEL_MAX_TOKENS) == KERNEL[bits]
    assert module.kernel_path(rows, x.device, tokens=registry.PROMPT_KERNEL_MAX_TOKENS + 1) == "dequant"


@pytest.mark.skipif(not row_kernel.available(), reason="glmpool's row kernel is not built or this CPU lacks AVX-512")
@pytest.mark.parametrize("bits,shape", [(8, (4099, 1024)), (8, (50, 4096)), (4, (4160, 1024)), (4, (130, 4096))])
def test_a_lone_row_goes_through_glmpools_kernel_with_the_bits_it_gets_in_a_batch(bits, shape, monkeypatch):
    torch.manual_seed(4)
    module = QuantizedLinear.from_linear(torch.nn.Linear(shape[1], shape[0]), bits)
    quantized.prepare(module, "bf16")  # as load() does: it decides
    assert module.own_kernels
    x = torch.randn(17, shape[1])
    together = module.matmul(x, module.bias)
    name = {8: "int8_times", 4: "int4_times"}[bits]
    calls, kernel = [], getattr(row_kernel, name)
    monkeypatch.setattr(row_kernel, name, lambda *a: calls.append(1) or kernel(*a))
    for row in (0, 7, 16):
        assert torch.equal(module.matmul(x[row:row + 1], module.bias), together[row:row + 1]), row
    assert len(calls) == 3


@pytest.mark.skipif(not row_kernel.available(), reason="glmpool's row kernel is not built or this CPU lacks AVX-512")
@pytest.mark.parametrize("shape", [(4099, 1024), (50, 4096)])
def test_several_int8_rows_go_through_glmpools_kernel_with_torchs_bits(shape, monkeypatch):
    """More than 4 rows (a batch's decode step): glmpool's multi-row int8 kernel, the bits of torch's."""
    torch.manual_seed(5)
    module = QuantizedLinear.from_linear(torch.nn.Linear(shape[1], shape[0]), 8)
    quantized.prepare(module, "bf16")
    calls, kernel = [], row_kernel.int8_times
    monkeypatch.setattr(row_kernel, "int8_times", lambda *a: calls.append(1) or kernel(*a))
    for rows in (4, 5, 16, 37):
        x = torch.randn(rows, shape[1])
        theirs = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), module.weight,
                                                    torch.ones(shape[0], dtype=torch.bfloat16))
        assert torch.equal(int8.int8_times(x.to(torch.bfloat16), module.weight, module.own_kernels), theirs), rows
    assert len(calls) == 3  # not for 4 rows: torch's kernel is as fast there


@pytest.mark.skipif(not row_kernel.int4_rows_available(int4.int4_block_rows()),
                    reason="glmpool's kernels are not built or this CPU lacks AVX-512")
@pytest.mark.parametrize("shape", [(4160, 1024), (128, 4096)])
def test_several_int4_rows_go_through_glmpools_kernel_with_torchs_bits(shape, monkeypatch):
    """A batch's decode step, a short prompt: glmpool's tiled int4 kernel, the bits of torch's."""
    torch.manual_seed(6)
    module = QuantizedLinear.from_linear(torch.nn.Linear(shape[1], shape[0]), 4)
    quantized.prepare(module, "bf16")
    assert module.own_kernels and module.own_int4_rows
    calls, kernel = [], row_kernel.int4_times
    monkeypatch.setattr(row_kernel, "int4_times", lambda *a: calls.append(1) or kernel(*a))
    head = module._blocked_rows()
    group, unit = module._int4_unit_groups(head, "cpu")
    for rows in (2, 5, 16, 37):
        x = torch.randn(rows, shape[1]).to(torch.bfloat16)
        theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, module.weight[:head].view(torch.uint8), group, unit)
        assert torch.equal(module._int4_cpu(x.float())[:, :head], theirs), rows
    assert len(calls) == 4


def test_dequant_path_in_chunks_and_without_bias(monkeypatch):
    monkeypatch.setattr(dequant, "DEQUANT_CHUNK_BYTES", 128 * 128 * 4)  # 128 rows per chunk
    for bits in (8, 4):
        module = QuantizedLinear.from_linear(torch.nn.Linear(128, 320, bias=False), bits)
        assert module.bias is None
        x = torch.randn(5, 128)
        expected = F.linear(x, module.dequantize())
        assert torch.allclose(module.matmul(x, path="dequant"), expected, atol=1e-5)
        module.matmul(x, path=KERNEL[bits])  # now in the kernel's layout (int4)
        assert torch.allclose(module.matmul(x, path="dequant"), expected, atol=1e-5)


def test_shapes_the_kernels_cannot_take_fall_back():
    odd = QuantizedLinear.from_linear(torch.nn.Linear(40, 48), 4)  # K % 32 off: no kernel takes it
    assert odd.kernel_path(1, torch.device("cpu")) == "dequant"
    x = torch.randn(2, 40)
    assert torch.allclose(odd(x), F.linear(x, odd.dequantize(), odd.bias), atol=1e-5)
    with pytest.raises(RuntimeError):
        odd.matmul(x, path="int4")


def test_int4_rows_past_the_last_layout_block_are_multiplied_apart():
    # The 130528-row embedding table is not a multiple of the 64-row blocks of AVX-512 machines: the
    # kernel takes the whole blocks, the last rows stay in THUDM's layout (here 8 of them, on any machine).
    if not int4._cpu_int4_layout_ok():
        pytest.skip("this torch has no usable CPU int4 kernel")
    torch.manual_seed(2)
    block = int4.int4_block_rows()
    embedding = QuantizedEmbedding.from_embedding(torch.nn.Embedding(2 * block + 8, 128), 4)
    original = embedding.weight.clone()
    table = embedding.dequantize()
    hidden = torch.randn(3, 128)
    expected = F.linear(hidden.bfloat16().float(), table)
    assert embedding.kernel_path(3, hidden.device) == "int4"
    assert torch.allclose(embedding.project(hidden), expected, rtol=1e-2, atol=1e-2)
    assert embedding._current_layout() == embedding.LAYOUT_CPU_INT4
    assert torch.equal(embedding.weight[-8:], original[-8:])  # the tail kept THUDM's layout
    ids = torch.tensor([[0, block - 1, 2 * block + 7], [2 * block, 5, 2 * block + 3]])
    assert torch.equal(embedding(ids), table[ids])
    assert torch.equal(embedding(torch.arange(2 * block + 8)), table)  # every row, both nibbles of a byte
    assert torch.equal(embedding.dequantize(), table)
    assert torch.equal(embedding.state_dict()["weight"], original)
    many = torch.randn(1, 80, 128)  # a long prompt's rows: the dequantize path across the boundary
    assert torch.allclose(embedding.matmul(many), F.linear(many, table), atol=1e-4)


def test_int4_kernel_layout_in_place_keeps_state_dict_and_reloads():
    torch.manual_seed(0)
    module = QuantizedLinear.from_linear(torch.nn.Linear(256, 64), 4)
    original = {k: v.clone() for k, v in module.state_dict().items()}
    storage = module.weight.data_ptr()
    x = torch.randn(1, 256)
    before = module.matmul(x, module.bias, path="dequant")
    module(x)  # the first kernel call re-lays out the weight, in place
    assert module._layout == module.LAYOUT_CPU_INT4 and module.weight.data_ptr() == storage
    assert not torch.equal(module.weight, original["weight"])
    state = module.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert torch.equal(module.thudm_weight(), original["weight"])

    fresh = QuantizedLinear(256, 64, 4)
    fresh.load_state_dict(state)
    assert torch.allclose(fresh(x), module(x), atol=1e-6)

    # a checkpoint copied into the buffer in place (as the loader does) is THUDM's layout again
    other = QuantizedLinear.from_linear(torch.nn.Linear(256, 64), 4)
    with torch.no_grad():
        module.weight.copy_(other.weight)
        module.weight_scale.copy_(other.weight_scale)
        module.bias.copy_(other.bias)
    assert module._current_layout() == module.LAYOUT_THUDM
    assert torch.allclose(module(x), other(x), atol=1e-6)

    # load_state_dict over the kernel layout
    module(x)
    module.load_state_dict(original)
    assert torch.allclose(module.matmul(x, module.bias, path="dequant"), before, atol=1e-6)

    # casting/moving hands over THUDM's layout
    module(x)
    module.to(torch.float64)
    assert module._layout == module.LAYOUT_THUDM and torch.equal(module.weight, original["weight"])
    assert module.bias.dtype == torch.float64


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding_lookup_and_projection(bits):
    torch.manual_seed(1)
    embedding = torch.nn.Embedding(192, 64)
    module = QuantizedEmbedding.from_embedding(embedding, bits)
    table = dequantize_weight(module.weight, module.weight_scale, bits)
    ids = torch.tensor([[0, 5, 191], [33, 33, 64]])
    assert torch.equal(module(ids), table[ids])
    hidden = torch.randn(3, 64)
    assert torch.allclose(module.project(hidden), F.linear(hidden.bfloat16().float(), table), rtol=1e-2, atol=1e-2)
    assert torch.equal(module(ids), table[ids])  # also in the kernel layout (int4)
    many = torch.randn(1, 80, 64)  # a long prompt's rows: the dequant path
    assert torch.allclose(module.matmul(many), F.linear(many, table), atol=1e-5)
    assert (module.num_embeddings, module.embedding_dim) == (192, 64)


def small_config(**changes) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256,
                mask_token_id=500, gmask_token_id=501, bos_token_id=504, eos_token_id=505)
    base.update(changes)
    return ModelConfig(**base)


def small_model(seed: int = 0) -> ChatGLM:
    torch.manual_seed(seed)
    model = ChatGLM(small_config()).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return model


def last_logits(model: ChatGLM, prompt: list[int]) -> torch.Tensor:
    c = model.config
    position, block, context_length, _ = prompt_positions(prompt, c.bos_token_id, c.mask_token_id, c.gmask_token_id)
    with torch.no_grad():
        return model(torch.tensor([prompt]), torch.tensor([[position, block]]), [model.new_cache(len(prompt))],
                     prefix_attention_mask(len(prompt), context_length))[0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("embeddings", [False, True])
def test_quantize_model_matches_dequantized_weights(bits, embeddings):
    model = small_model()
    reference = copy.deepcopy(model)
    quantize_model(model, bits, embeddings=embeddings)
    for i, layer in enumerate(model.layers):
        for name in thudm.LINEAR_NAMES:
            assert isinstance(layer.get_submodule(name), QuantizedLinear)
            reference.layers[i].get_submodule(name).weight.data = layer.get_submodule(name).dequantize()
    if embeddings:
        assert isinstance(model.word_embeddings, QuantizedEmbedding)
        reference.word_embeddings.weight.data = model.word_embeddings.dequantize()
    prompt = [7, 8, 9, 10, 11, 501, 504]
    expected = last_logits(reference, prompt)
    got = last_logits(model, prompt)  # a short prompt: the bf16-activation kernels
    assert float((got - expected).abs().max()) <= 0.05 * float(expected.abs().max())
    with pytest.raises(ValueError):
        quantize_model(model, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_empty_model_loads_quantized_state_dict(bits):
    model = small_model()
    thudm = {"transformer." + k: v for k, v in model.state_dict().items()}
    stored = quantize_state_dict(thudm, bits, embeddings=True)
    assert stored["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape == (256, 64 * bits // 8)
    assert stored["transformer.layers.1.attention.dense.weight_scale"].dtype == torch.float16
    assert stored["transformer.word_embeddings.weight"].dtype == torch.int8
    assert stored["transformer.final_layernorm.weight"] is thudm["transformer.final_layernorm.weight"]

    quantized = copy.deepcopy(model)
    quantize_model(quantized, bits, embeddings=True)
    with torch.device("meta"):
        empty = ChatGLM(model.config)
    quantize_model(empty, bits, embeddings=True, empty=True)
    empty = empty.to_empty(device="cpu").eval()
    empty._rotary = None
    missing, unexpected = empty.load_state_dict({k.removeprefix("transformer."): v for k, v in stored.items()},
                                                strict=False)
    assert not unexpected and all(name.endswith("inv_freq") for name in missing), missing
    prompt = [3, 30, 300, 501, 504]
    assert torch.equal(last_logits(empty, prompt), last_logits(quantized, prompt))
    state = quantized.state_dict()  # round trip after the kernels re-laid out the int4 weights
    for name, tensor in stored.items():
        if name.startswith("transformer.") and "inv_freq" not in name:
            assert torch.equal(state[name.removeprefix("transformer.")], tensor), name


@pytest.mark.parametrize("spec", [8, 4, "8-qe", "4-qe"])
def test_prequantized_checkpoint_loads_and_matches_quantize_at_load(tiny_dir, tmp_path, spec):
    from glmpool.cli import main
    from glmpool.engine import load

    assert main(["tiny-model", str(tmp_path / "q"), "--seed", "1", "--quantize", str(spec)]) == 0
    stored = load(tmp_path / "q", progress=False)
    at_load = load(tiny_dir, quantize=spec, progress=False)
    bits, embeddings = thudm.parse_quantize(spec)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (config["quantization_bit"], config["quantization_embeddings"]) == (bits, embeddings)
    for engine in (stored, at_load):
        assert isinstance(engine.model.word_embeddings, QuantizedEmbedding) == embeddings
        assert all(isinstance(layer.mlp.dense_h_to_4h, QuantizedLinear) for layer in engine.model.layers)
        linear = engine.model.layers[0].mlp.dense_h_to_4h  # the format's fp16 scales, the rest in the model's dtype
        assert (linear.weight_scale.dtype, linear.bias.dtype, engine.model.final_layernorm.weight.dtype) == \
            (torch.float16, torch.float32, torch.float32)
    prompt = stored.tokenizer.build_prompt("hello", [])
    assert torch.equal(last_logits(stored.model, prompt), last_logits(at_load.model, prompt))
    assert stored.chat("hello", do_sample=False, max_length=40) == at_load.chat("hello", do_sample=False, max_length=40)


def test_quantize_spec_errors_and_mismatches(tiny_dir, tmp_path):
    from glmpool.engine import EngineError, load
    from glmpool.engine.tiny import write_tiny_checkpoint

    assert thudm.parse_quantize("int4-qe") == (4, True) and thudm.parse_quantize(None) == (None, False)
    for bad in (3, "16", "4qe", "qe"):
        with pytest.raises(EngineError, match="4, 8, 4-qe or 8-qe"):
            load(tiny_dir, quantize=bad, progress=False)
    int8 = write_tiny_checkpoint(tmp_path / "int8", seed=1, quantize=8)
    with pytest.raises(EngineError, match="stored quantized to 8 bits"):
        load(int8, quantize=4, progress=False)


def test_embeddings_quantized_at_load_on_a_layers_only_checkpoint(tiny_dir, tmp_path):
    """chatglm-6b-int4 loaded with "4-qe" == chatglm-6b-int4-qe: the embeddings are quantized at load."""
    from glmpool.engine import load
    from glmpool.engine.tiny import write_tiny_checkpoint

    upgraded = load(write_tiny_checkpoint(tmp_path / "int4", seed=1, quantize=4), quantize="4-qe", progress=False)
    qe = load(write_tiny_checkpoint(tmp_path / "int4-qe", seed=1, quantize="4-qe"), progress=False)
    assert isinstance(upgraded.model.word_embeddings, QuantizedEmbedding)
    prompt = qe.tokenizer.build_prompt("hello", [])
    assert torch.equal(last_logits(upgraded.model, prompt), last_logits(qe.model, prompt))


@pytest.mark.parametrize("activations", registry.QUANTIZED_ACTIVATIONS)
def test_int4_weights_are_laid_out_for_the_cpu_kernel_at_load(tiny_dir, activations):
    """bf16 activations: torch's CPU int4 layout, made in place at load; int8 (route int-dot): THUDM's as stored."""
    from glmpool.engine import load

    int_dot = activations == "int8" and base.method_class("int-dot").usable(torch.device("cpu"), torch.float32)
    if not int_dot and not int4._cpu_int4_layout_ok():
        pytest.skip("this torch has no usable CPU int4 kernel: int4 runs dequantize + matmul")
    model = load(tiny_dir, quantize="4-qe", progress=False, quantized_activations=activations).model
    layouts = {name: m._current_layout() for name, m in quantized.quantized_modules(model)}
    expected = quantized.QuantizedMatrix.LAYOUT_THUDM if int_dot else quantized.QuantizedMatrix.LAYOUT_CPU_INT4
    assert set(layouts.values()) == {expected}, layouts
    assert {m.kernel_path(1, torch.device("cpu")) for _, m in quantized.quantized_modules(model)} == \
        {"int-dot" if int_dot else "int4"}


@pytest.mark.parametrize("stored_as", ["both", "lm_head only"])
def test_int4_qe_checkpoint_layout_loads(tiny_dir, tmp_path, stored_as):
    """chatglm-6b-int4-qe: embeddings stored quantized, lm_head the same tensor (or the only copy)."""
    import shutil
    from glmpool.engine import load

    target = tmp_path / "qe"
    shutil.copytree(tiny_dir, target)
    sd = torch.load(target / "pytorch_model.bin", weights_only=True)
    sd = quantize_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, 4, embeddings=True)
    assert "lm_head.weight_scale" in sd
    if stored_as == "lm_head only":
        del sd["transformer.word_embeddings.weight"], sd["transformer.word_embeddings.weight_scale"]
    torch.save({k: v.clone() for k, v in sd.items()}, target / "pytorch_model.bin")
    config = json.loads((target / "config.json").read_text())
    config.update(quantization_bit=4, quantization_embeddings=True)
    (target / "config.json").write_text(json.dumps(config))
    engine = load(target, progress=False)
    assert isinstance(engine.model.word_embeddings, QuantizedEmbedding)
    reference = load(tiny_dir, progress=False)
    quantized.prepare(quantize_model(reference.model, 4, embeddings=True))  # as load() does
    prompt = engine.tokenizer.build_prompt("hi", [])
    assert torch.equal(last_logits(engine.model, prompt), last_logits(reference.model, prompt))


def test_greedy_agreement_on_the_tiny_model(tiny_engine):
    """Quantized greedy decoding against fp32 (random weights make this model unusually sensitive)."""
    reference = tiny_engine.model
    c = tiny_engine.config
    rng = random.Random(0)
    prompts = [[rng.randrange(6, c.mask_token_id) for _ in range(rng.randint(4, 20))]
               + [c.gmask_token_id, c.bos_token_id] for _ in range(4)]
    args = (prompts, 12, c.bos_token_id, c.mask_token_id, c.gmask_token_id)
    assert agreement.greedy_agreement(reference, reference, *args) == {"teacher_forced": 1.0, "prefix": 1.0, "exact": 1.0}
    int8 = quantize_model(copy.deepcopy(reference), 8)
    scores = agreement.greedy_agreement(reference, int8, *args)
    assert scores["teacher_forced"] >= 0.5, scores  # measured ~0.85 on this model; README has the figures


def test_cuda_int4_input_is_unsigned_nibbles_even_column_high():
    """torch's CUDA int4 packer takes q + 8 in each nibble, the even column in the high one; THUDM's bytes
    hold signed q the same way round, so XOR 0x88 converts them."""
    q = torch.randint(-8, 8, (16, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    unsigned = (q + 8).to(torch.uint8)
    expected = (unsigned[:, 0::2] << 4) | unsigned[:, 1::2]
    assert torch.equal(cuda.cuda_int4_input(thudm.pack_int4(q)), expected)


def test_a_matrix_in_the_cuda_int4_layout_refuses_what_it_cannot_do():
    """The CUDA int4 layout (made in place at load on a GPU) has no way back: the kernel is its only reader,
    and saving or moving the model is a clear error, not THUDM-named garbage. Simulated on the CPU by marking
    a matrix as laid out so; the CPU itself never lays one out."""
    from glmpool.engine import EngineError
    linear = QuantizedLinear.from_linear(torch.nn.Linear(128, 64), 4)
    assert not linear.to_cuda_int4_layout()  # not on a GPU
    quantized.prepare(torch.nn.Sequential(linear), "bf16")
    assert linear._current_layout() == linear.LAYOUT_CPU_INT4  # what a CPU lays out instead
    linear._layout, linear._layout_key = linear.LAYOUT_CUDA_INT4, quantized._tensor_key(linear.weight)
    assert linear.kernel_path(1, torch.device("cpu")) == linear.kernel_path(500, torch.device("cpu")) == "int4-cuda"
    for action in (linear.state_dict, linear.float, linear.cpu, linear.dequantize):
        with pytest.raises(EngineError, match="cannot be saved or moved"):
            action()
    with torch.no_grad():
        linear.weight.copy_(thudm.pack_int4(torch.zeros(64, 128, dtype=torch.int8)))  # a checkpoint copied in
    assert linear.kernel_path(1, torch.device("cpu")) == "int4" and "weight" in linear.state_dict()


def test_a_kernel_is_chosen_only_where_it_is_right_and_faster(monkeypatch):
    """How CUDA decides between torch's int8 kernel and dequantize + cuBLAS (`kernel_rows`), run here with
    the CPU int8 kernel and a clock made to favour one side: the kernel is taken up to the largest trial
    size where it wins, and refused outright when its products are wrong."""
    import time
    module = QuantizedLinear.from_linear(torch.nn.Linear(128, 192), 8)
    matmul = module.matmul
    clock = [0.0]  # kernel_rows' clock: each product takes 1 ms, a slowed one 20 ms, whatever the machine's load
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def slowed(*slow):  # (path, rows) pairs made slower
        def run(x, bias=None, path=None):
            clock[0] += 0.02 if (path, x.shape[0]) in slow else 0.001
            return matmul(x, bias, path)
        return run

    for slow, rows in (([("int8", 1), ("int8", 16)], 0), ([("dequant", 1), ("dequant", 16)], 16),
                       ([("dequant", 1), ("int8", 16)], 1), ([("int8", 1), ("dequant", 16)], 0)):
        monkeypatch.setattr(module, "matmul", slowed(*slow))
        assert cuda.kernel_rows(module, "int8", torch.float32, repeats=3) == rows, slow
    monkeypatch.setattr(int8.Int8, "apply", classmethod(lambda cls, matrix, x2: torch.zeros(x2.shape[0], 192,
                                                                                               dtype=torch.bfloat16)))
    with pytest.raises(RuntimeError, match="differ"):
        cuda.kernel_rows(module, "int8", torch.float32)
