"""glmpool's CPU decode attention kernel (decode_attention.c) against torch's path through a KV slab."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from glmpool.engine import decode_attention, row_kernel
from glmpool.engine.config import ModelConfig
from glmpool.engine.model import KVSlab, PaddedDecode, rotary_tables

pytestmark = pytest.mark.skipif(not decode_attention.usable(torch.float32, torch.device("cpu"), 16),
                                reason="glmpool's CPU kernels are not built here")


def slab_with(config: ModelConfig, cached: list[int], seed: int = 0) -> KVSlab:
    """A one-layer slab holding random keys and values for sequences of `cached` lengths, in slots 0..B-1."""
    slab = KVSlab(dataclasses.replace(config, num_layers=1), torch.float32, torch.device("cpu"))
    slab.fit(len(cached), max(cached) + 1, max(cached) + 40)
    generator = torch.Generator().manual_seed(seed)
    for length in cached:
        cache = slab.attach()
        cache.length = length
        slab.layers[0][:, cache.slot, :, :length] = torch.randn(2, config.num_attention_heads, length,
                                                                config.head_dim, generator=generator)
    return slab


def step_inputs(config: ModelConfig, cached: list[int], seed: int = 1):
    """One decode step's qkv [B, 1, n, 3, d] and rotary cos, sin [B, 1, 1, 1, d] at each sequence's next position."""
    B, n, d = len(cached), config.num_attention_heads, config.head_dim
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, n, 3, d, generator=generator)
    ids = torch.tensor([[[length], [length % 7]] for length in cached])  # position, block position
    if not config.position_encoding_2d:
        ids = ids[:, :1]
    tables = rotary_tables(config, max(cached) + 8, torch.float32, "cpu")
    cos, sin = (F.embedding(ids, table).transpose(1, 2).reshape(B, 1, 1, 1, -1) for table in tables)
    return qkv, cos, sin


def kernel_step(slab: KVSlab, qkv, cos, sin, parts: int, isa: int | None = None) -> torch.Tensor:
    B, lengths = qkv.shape[0], [o.length + 1 for o in slab.occupants]
    positions = torch.tensor(lengths) - 1
    scores = torch.empty(B * slab.config.num_attention_heads, max(lengths))
    return decode_attention.attend(slab.layers[0], qkv[:, 0], cos.view(B, -1), sin.view(B, -1), positions, scores,
                                   3.0, parts, isa)


@pytest.mark.parametrize("heads,head_dim,two_d", [(4, 16, True), (16, 64, True), (2, 128, True), (4, 64, False)])
def test_the_kernel_attends_as_torch_does(heads, head_dim, two_d):
    """Same keys and values stored (bit for bit: the rotation rounds as torch's), and the same context up
    to rounding, for sequences of different lengths (the shortest attending over one position)."""
    config = ModelConfig(vocab_size=100, hidden_size=heads * head_dim, num_layers=1, num_attention_heads=heads,
                         inner_hidden_size=64, position_encoding_2d=two_d)
    cached = [0, 5, 33, 130, 17]
    qkv, cos, sin = step_inputs(config, cached)
    theirs, ours = slab_with(config, cached), slab_with(config, cached)
    expected = PaddedDecode(theirs, [c + 1 for c in cached], math.inf).attend(0, qkv, cos, sin, 2 if two_d else 1)
    context = kernel_step(ours, qkv, cos, sin, 2 if two_d else 1)
    assert torch.equal(ours.layers[0], theirs.layers[0])
    torch.testing.assert_close(context, expected.view_as(context), rtol=1e-5, atol=1e-6)
    assert not torch.equal(context, expected.view_as(context))  # its own arithmetic: close, not the same


def test_a_sequence_gets_the_same_bits_alone_batched_and_on_any_thread_count():
    config = ModelConfig(vocab_size=100, hidden_size=1024, num_layers=1, num_attention_heads=16, inner_hidden_size=64)
    cached = [40, 3, 250, 41]
    qkv, cos, sin = step_inputs(config, cached)
    together = kernel_step(slab_with(config, cached), qkv, cos, sin, 2)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for i, length in enumerate(cached):  # sequence i alone, with the same cache
                alone = slab_with(config, [length])
                alone.layers[0][:, 0] = slab_with(config, cached).layers[0][:, i, :, :alone.capacity]
                assert torch.equal(kernel_step(alone, qkv[i:i + 1], cos[i:i + 1], sin[i:i + 1], 2)[0], together[i])
    finally:
        torch.set_num_threads(threads)


def test_every_vector_width_gives_the_plain_c_bits():
    """The AVX-512 and AVX2 variants sum as the plain C definition does (16 lanes, a fixed tree, fused
    multiply-adds over positions in order)."""
    config = ModelConfig(vocab_size=100, hidden_size=256, num_layers=1, num_attention_heads=2, inner_hidden_size=64)
    cached = [77, 1, 300]
    qkv, cos, sin = step_inputs(config, cached)
    widths = [0, 256] + ([512] if row_kernel.library().isa == 512 else [])
    results = [kernel_step(slab_with(config, cached), qkv, cos, sin, 2, isa) for isa in widths]
    assert all(torch.equal(results[0], r) for r in results[1:])
