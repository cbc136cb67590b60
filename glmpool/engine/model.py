"""ChatGLM-6B (GLM-130B family) in plain PyTorch.

Shapes: B sequences, T new tokens each, L cached + new tokens, H hidden, n heads, d head dim.
The arithmetic follows THUDM's reference operation by operation (order of scaling, fp32 softmax, the
tanh GELU written the same way) so greedy decoding reproduces it token for token:
- post-LayerNorm residuals scaled by alpha = sqrt(2 * num_layers) (DeepNorm), where the reference
  never passes its config's layer count and always uses its default of 28 layers;
- each head's q/k/v interleaved in `query_key_value` rows: [head0 q|k|v, head1 q|k|v, ...];
- 2D rotary encoding: the first half of every head rotates by the position id, the second half by
  the block position id; inverse frequencies rounded to fp16 as the reference computes them;
- attention scores scaled down by sqrt(d) * (layer + 1) and back up by (layer + 1) in fp32;
- the output projection is the word embedding matrix (tied);
- on a GPU, GELU and the rotation in fp32, rounded once (use_fp32_pointwise), as TorchScript fuses the
  reference's scripted functions there.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_attention, row_kernel
from .config import ModelConfig
from .linear.reference import Embedding, Linear


class KVCache:
    """One sequence's keys and values for every layer: [layers, 2, n, capacity, d], grown on demand.

    Heads come before positions so that each head's keys and values are one contiguous [L, d] block:
    attention then streams them (at long contexts reading the cache costs as much as the weights).
    """

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        self.shape = (config.num_layers, 2, config.num_attention_heads, config.head_dim)
        self.data = torch.empty(self._full_shape(capacity), dtype=dtype, device=device)
        self.length = 0  # tokens already stored (in every layer)

    def _full_shape(self, capacity: int) -> tuple:
        layers, kv, heads, head_dim = self.shape
        return (layers, kv, heads, capacity, head_dim)

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    def reserve(self, new_tokens: int) -> None:
        needed = self.length + new_tokens
        if needed > self.capacity:
            grown = torch.empty(self._full_shape(max(needed, 2 * self.capacity)), dtype=self.data.dtype,
                                device=self.data.device)
            grown[..., :self.length, :] = self.data[..., :self.length, :]
            self.data = grown

    def store(self, layer: int, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values [2, n, T, d] after the cached ones; return all of both [n, L, d]."""
        end = self.length + key_value.shape[2]
        self.data[layer, :, :, self.length:end] = key_value
        return self.data[layer, 0, :, :end], self.data[layer, 1, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


SPAN_BLOCK = 16  # padded decode attention spans a multiple of this many positions (see padded_attention_exact)


def round_up(n: int) -> int:
    return -(-n // SPAN_BLOCK) * SPAN_BLOCK


class KVSlab:
    """The keys and values of a whole batch, one tensor per layer [2, slots, n, capacity, d], the batch's
    sequences in slots 0..B-1 (see SlotCache). One decode step's attention is then one call per layer for
    the whole batch instead of ~8 per sequence and layer: on the CPU glmpool's kernel (decode_attention.py,
    each sequence over its own span), elsewhere ~8 torch calls padded to the longest sequence and masked
    (PaddedDecode; on a GPU ~3600 kernel launches a step fewer for ChatGLM-6B at batch 16). Capacities
    are multiples of SPAN_BLOCK.

    A position past its sequence's length holds zero: padding gets probability exactly 0, and 0 x a stale
    NaN would still be NaN. Grown one layer at a time, so growing briefly needs one layer's worth more.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, kernel: bool = False):
        self.config, self.dtype, self.device = config, dtype, device
        self.kernel = kernel  # decode attention by KernelDecode (where decode_attention.usable()), else PaddedDecode
        self.layers: list[torch.Tensor] = []  # per layer [2, slots, n, capacity, d]
        self.occupants: list[SlotCache] = []  # slot i's cache

    @property
    def slots(self) -> int:
        return self.layers[0].shape[1] if self.layers else 0

    @property
    def capacity(self) -> int:
        return self.layers[0].shape[3] if self.layers else 0

    def _empty_layer(self, slots: int, capacity: int) -> torch.Tensor:
        c = self.config
        return torch.zeros(2, slots, c.num_attention_heads, capacity, c.head_dim, dtype=self.dtype, device=self.device)

    def fit(self, slots: int, capacity: int, limit: int) -> None:
        """Make room for `slots` sequences of up to `capacity` tokens. Reallocating, it takes exactly the
        slots asked for and grows the capacity (by doubling) no further than `limit`, the longest any of the
        sequences may become: the slab never holds more than slots x limit tokens, which is how the
        Batcher's admission counts it."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        longest = round_up(max([capacity, *(o.length for o in self.occupants)]))
        grown = max(longest + 64, 2 * self.capacity) if capacity > self.capacity else self.capacity
        new_capacity = max(longest, min(round_up(limit), grown))
        kept, copied = len(self.occupants), min(self.capacity, new_capacity)
        for i in range(self.config.num_layers):
            layer = self._empty_layer(max(slots, kept), new_capacity)
            if kept:
                layer[:, :kept, :, :copied] = self.layers[i][:, :kept, :, :copied]
            if i < len(self.layers):
                self.layers[i] = layer
            else:
                self.layers.append(layer)

    def attach(self) -> SlotCache:
        slot = len(self.occupants)
        if slot >= self.slots:
            raise RuntimeError(f"KV slab has {self.slots} slots, all taken: fit() it first")
        for layer in self.layers:
            layer[:, slot].zero_()  # a former occupant's values
        self.occupants.append(SlotCache(self, slot))
        return self.occupants[-1]

    def detach(self, cache: SlotCache) -> None:
        """Free a cache's slot; the last slot's sequence moves into it, so the batch stays in 0..B-1."""
        last = self.occupants.pop()
        if last is not cache:
            for layer in self.layers:
                layer[:, cache.slot] = layer[:, last.slot]
            last.slot = cache.slot
            self.occupants[cache.slot] = last
        cache.slab = None

    def decode_step(self, caches: list) -> KernelDecode | PaddedDecode | None:
        """The decode attention of one new token for each of `caches`, if they are this slab's occupants in
        slot order (as the Batcher passes them); otherwise None."""
        if len(caches) != len(self.occupants) or any(c is not o for c, o in zip(caches, self.occupants)):
            return None
        return (KernelDecode if self.kernel else PaddedDecode)(self, [c.length + 1 for c in caches])


class SlotCache:
    """One sequence's cache inside a KVSlab: KVCache's interface, its storage the slab's slot."""

    def __init__(self, slab: KVSlab, slot: int):
        self.slab, self.slot = slab, slot
        self.length = 0

    def reserve(self, new_tokens: int) -> None:
        if round_up(self.length + new_tokens) > self.slab.capacity:
            raise RuntimeError(f"KV slab holds {self.slab.capacity} tokens a sequence: fit() it first")

    def store(self, layer: int, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_value.shape[2]
        data = self.slab.layers[layer][:, self.slot]  # [2, n, capacity, d]
        data[:, :, self.length:end] = key_value
        return data[0, :, :end], data[1, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


PADDING_WASTE = 2.0  # attend sequence by sequence where padding would read more than this many times the cache


class PaddedDecode:
    """One decode step's attention for slots 0..B-1 of a slab: each sequence's new key and value written
    at its own position, then the whole batch attends at once over the longest span, the rest masked.

    Where the lengths differ so much that padding would read more than PADDING_WASTE times what the
    sequences hold (one long conversation among short ones), each sequence attends alone over its own
    span instead: more calls, no wasted reads. Either way a sequence gets the same bits where the padding
    is exact (padded_attention_exact compares exactly these two)."""

    def __init__(self, slab: KVSlab, lengths: list[int], padding_waste: float = PADDING_WASTE):
        device = slab.device
        self.slab = slab
        self.rows = torch.arange(len(lengths), device=device)  # [B] slot of each sequence
        self.positions = torch.tensor(lengths, device=device) - 1  # [B] where its new key and value go
        spans = [round_up(length) for length in lengths]
        if len(lengths) * max(spans) <= padding_waste * sum(spans):
            self.groups = [(0, len(lengths), max(spans))]  # (first slot, end, span)
        else:
            self.groups = [(i, i + 1, span) for i, span in enumerate(spans)]
        # per group [rows, 1, 1, span] bool, True past a sequence's length
        self.paddings = [torch.arange(span, device=device) >= self.positions[start:end, None, None, None] + 1
                         for start, end, span in self.groups]

    def attend(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, parts: int) -> torch.Tensor:
        """qkv [B, 1, n, 3, d] as projected, cos and sin [B, 1, 1, 1, d] -> context [B, n, 1, d]."""
        return self.attend_rotated(layer, *queries_keys_values(qkv, cos, sin, parts, layer))

    def attend_rotated(self, layer: int, q: torch.Tensor, key_value: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, n, 1, d] (already divided by sqrt(d) * scale), key_value [B, 2, n, 1, d] -> context [B, n, 1, d]."""
        data = self.slab.layers[layer]  # [2, slots, n, capacity, d]
        data[:, self.rows, :, self.positions] = key_value[:, :, :, 0]  # indexed dims first: [B, 2, n, d]
        contexts = [self._attend(data[:, start:end, :, :span], q[start:end], padding, scale)
                    for (start, end, span), padding in zip(self.groups, self.paddings)]
        return contexts[0] if len(contexts) == 1 else torch.cat(contexts)

    @staticmethod
    def _attend(data: torch.Tensor, q: torch.Tensor, padding: torch.Tensor, scale: float) -> torch.Tensor:
        """data [2, R, n, span, d], q [R, n, 1, d], padding [R, 1, 1, span] -> context [R, n, 1, d]."""
        R, n, _, d = q.shape
        span = data.shape[3]
        keys, values = data.flatten(1, 2)  # [R * n, span, d] each, views of the slab
        scores = torch.bmm(q.reshape(R * n, 1, d), keys.transpose(1, 2)).float() * scale  # [R * n, 1, span]
        scores.view(R, n, 1, span).masked_fill_(padding, -math.inf)
        return torch.bmm(F.softmax(scores, dim=-1).type(q.dtype), values).view(R, n, 1, d)


class KernelDecode:
    """One decode step's attention for slots 0..B-1 of a slab by glmpool's CPU kernel (decode_attention.py):
    each sequence over its own span, nothing padded, a sequence's bits the same whatever its neighbours."""

    def __init__(self, slab: KVSlab, lengths: list[int]):
        self.slab = slab
        self.positions = torch.tensor([length - 1 for length in lengths])  # [B] where each new key and value go
        self.longest = max(lengths) - 1
        self.scores = torch.empty(len(lengths) * slab.config.num_attention_heads, max(lengths))  # scratch

    def attend(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, parts: int) -> torch.Tensor:
        """As PaddedDecode.attend."""
        B = qkv.shape[0]
        return decode_attention.attend(self.slab.layers[layer], qkv[:, 0], cos.view(B, -1), sin.view(B, -1),
                                       self.positions, self.scores, float(layer + 1), parts,
                                       longest=self.longest).unsqueeze(2)


@torch.inference_mode()
def padded_attention_exact(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether padded decode attention gives a sequence the same bits alone as next to longer neighbours,
    for this model's head shape and dtype on this machine, probed on random data.

    Padding adds zero probabilities and zero values, which change no sum, and more score columns, which
    need not: in the sweeps made for this (CPU, fp32, head dims 64 and 128, spans up to 3000), every
    result was the same once spans are multiples of 16 (SPAN_BLOCK), and not always otherwise (the
    kernels treat a last partial block of columns apart). Head dim 16 was not exact. So it is checked
    for each model at load, where batching must not change results (45 ms for 64-dim heads, 170 ms for
    ChatGLM-6B's 32 x 128; a few MB)."""
    n, d = config.num_attention_heads, config.head_dim
    generator = torch.Generator(device=device).manual_seed(0)
    random = lambda *shape: torch.randn(*shape, generator=generator, device=device).to(dtype)  # noqa: E731
    one_layer = dataclasses.replace(config, num_layers=1)
    for length, longer in ((1, 40), (5, 9), (15, 17), (23, 60), (37, 100), (49, 50), (64, 65), (77, 300), (257, 400)):
        keys_values, q, new_key_value = random(2, n, length, d), random(3, n, 1, d), random(3, 2, n, 1, d)
        results = []
        for lengths in ([length], [length, longer, length // 2]):  # alone, then among neighbours
            slab = KVSlab(one_layer, dtype, device)
            slab.fit(len(lengths), max(lengths) + 1, max(lengths) + 1)
            for cache_length in lengths:
                cache = slab.attach()
                cache.length = cache_length
                slab.layers[0][:, cache.slot, :, :cache_length] = (random(2, n, cache_length, d) if cache.slot
                                                                   else keys_values)
            rows, step = len(lengths), PaddedDecode(slab, [c.length + 1 for c in slab.occupants], math.inf)
            results.append(step.attend_rotated(0, q[:rows], new_key_value[:rows], 3.0)[0])  # at once: padded
        if not torch.equal(*results):
            return False
    return True


def rotary_tables(config: ModelConfig, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [length, r] for positions 0..length-1, r the rotary dim (d/2 when 2D, else d).

    The reference builds its inverse frequencies in fp32, stores them as fp16, and multiplies in the
    model's dtype; bfloat16 is computed in fp32 instead (bf16 cannot even count past 256 exactly).
    The sin table's first half is negated: rotate_half(x) * sin == swap_halves(x) * signed_sin bit for
    bit (negation is exact), which lets `rotate` skip the negation and the concatenation.
    """
    rotary_dim = config.head_dim // 2 if config.position_encoding_2d else config.head_dim
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))).half()
    compute_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    inv_freq = inv_freq.to(device=device, dtype=compute_dtype)
    t = torch.arange(length, device=device, dtype=compute_dtype)
    freqs = torch.outer(t, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    sin = angles.sin()
    sin[:, :rotary_dim // 2].neg_()
    return angles.cos().to(dtype), sin.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, parts: int) -> torch.Tensor:
    """The reference's x * cos + rotate_half(x) * sin on each of the `parts` rotary parts of the last dim (two
    with 2D positions: position, then block position), all parts in one pass, bit for bit the same.
    x [..., d]; cos and signed_sin [..., d] (see rotary_tables) broadcast to it."""
    swapped = x.unflatten(-1, (parts, 2, -1)).flip(-2).flatten(-3)  # each part's halves swapped
    out = x * cos
    out += swapped * signed_sin
    return out.to(x.dtype)  # fp32 tables (ChatGLM.use_fp32_pointwise): computed in fp32, rounded once


def queries_keys_values(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, parts: int,
                        layer: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """qkv [B, T, n, 3, d] as projected -> the queries rotated and divided by sqrt(d) * scale [B, n, T, d],
    the keys (rotated) and values [B, 2, n, T, d], and scale, the layer's attention scaling (layer + 1)."""
    q, k = rotate(qkv[:, :, :, :2], cos, sin, parts).unbind(3)  # [B, T, n, d]
    v = qkv[:, :, :, 2]
    scale = float(layer + 1)
    q = (q / (math.sqrt(qkv.shape[-1]) * scale)).transpose(1, 2)
    return q, torch.stack((k, v), dim=1).transpose(2, 3), scale


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The reference's tanh approximation, 0.5 * x * (1 + tanh(0.7978845608028654 * x * (1 + 0.044715 * x * x))),
    operation for operation (the float rounding matters), computed in place on two temporaries: a
    prompt's [T, 4H] activations cost tens of MB per temporary to allocate and write.

    Not F.gelu(approximate="tanh"), though it is 2.4-3.7x faster: its scalar loop for a run's last
    elements rounds differently from its vector loop, and where a thread's run ends depends on how many
    rows share the call (on 3 or more threads), so batching would change bits. Each step here rounds the
    same in either loop."""
    inner = x * 0.044715
    inner.mul_(x).add_(1.0)
    outer = x * 0.7978845608028654
    outer.mul_(inner).tanh_().add_(1.0)
    return inner.copy_(x).mul_(0.5).mul_(outer)


def gelu_fp32(x: torch.Tensor) -> torch.Tensor:
    """gelu computed in fp32 and rounded once to x's dtype, as THUDM's TorchScript-fused GELU runs on a GPU."""
    return gelu(x.float()).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.position_encoding_2d = config.position_encoding_2d
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache],
                prefix_masks: list[torch.Tensor | None], lengths: list[int],
                decode: KernelDecode | PaddedDecode | None = None) -> torch.Tensor:
        B, T, H = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n_heads, 3, self.head_dim)
        parts = 2 if self.position_encoding_2d else 1
        if decode is not None:  # a decode step of the sequences in a slab
            return self.dense(decode.attend(self.layer_id, qkv, cos, sin, parts).view(B, T, H))
        q, key_value, scale = queries_keys_values(qkv, cos, sin, parts, self.layer_id)
        # Prompts, and decode steps without a shared slab: attention per sequence, each over its own
        # cache length (the loop body is kept to a few calls).
        # Sequences of a batched prefill are right-padded to T: sequence b has lengths[b] real tokens, and
        # its padding gets a zero context (it is never read).
        context = x.new_zeros(B, self.n_heads, T, self.head_dim)
        for b, (cache, t) in enumerate(zip(caches, lengths)):
            keys, values = cache.store(self.layer_id, key_value[b, :, :, :t])  # [n, L, d] each
            scores = torch.bmm(q[b, :, :t], keys.transpose(1, 2))  # [n, t, L]
            if prefix_masks[b] is not None:
                scores.masked_fill_(prefix_masks[b], -10000.0)
            probs = F.softmax(scores.float() * scale, dim=-1).type(scores.dtype)
            context[b, :, :t] = torch.bmm(probs, values)  # [n, t, d]
        context = context.permute(0, 2, 1, 3).reshape(B, T, H)
        return self.dense(context)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = Linear(config.inner_hidden_size, config.hidden_size)
        self.gelu = gelu  # the reference's rounding; ChatGLM.use_gelu_kernel swaps in glmpool's kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.gelu(self.dense_h_to_4h(x)))


ALPHA_LAYERS = 28  # the reference's GLMBlock(num_layers=28) default, whatever config.json says


class GLMBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.alpha = (2 * ALPHA_LAYERS) ** 0.5
        # alpha as an fp32 scalar tensor: the same factor in the same kernel as `x * self.alpha` (which rounds
        # the Python float to fp32 first), without wrapping and converting the float on every call. Not a
        # buffer, so that no cast of the model rounds it to the model's dtype.
        self.alpha_scalar = torch.tensor(self.alpha, dtype=torch.float32, device="cpu")

    def scaled_residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x * alpha + out, rounded as the reference rounds it (the product, then the sum)."""
        return torch.mul(x, self.alpha_scalar).add_(out)

    def forward(self, x, cos, sin, caches, prefix_masks, lengths, decode=None):
        attention_input = self.input_layernorm(x)
        x = self.scaled_residual(attention_input, self.attention(attention_input, cos, sin, caches, prefix_masks,
                                                                 lengths, decode))
        mlp_input = self.post_attention_layernorm(x)
        return self.scaled_residual(mlp_input, self.mlp(mlp_input))


class ChatGLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.attention_kernel = False  # a slab's decode attention by glmpool's CPU kernel (set by load())
        # decoding through one KV slab gives a sequence its bits alone: the CPU kernel, or padding checked exact
        # (padded_attention_exact); set by load() for a batch-invariant model
        self.slab_is_exact = False
        self.fp32_pointwise = False  # GELU and rotary in fp32 as THUDM's fused GPU kernels (use_fp32_pointwise)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layernorm.weight.device

    def use_gelu_kernel(self) -> None:
        """Every layer's GELU by glmpool's CPU kernel (row_kernel.gelu): not the reference's rounding, but
        element by element the same wherever an element sits, so batching still changes nothing."""
        for layer in self.layers:
            layer.mlp.gelu = row_kernel.gelu

    def use_fp32_pointwise(self) -> None:
        """GELU and the rotary encoding in fp32, each rounded once to the model's dtype: what THUDM's code
        computes on a GPU, where TorchScript fuses both functions into one kernel each that works in fp32
        (on a CPU its functions run unfused, op by op in the model's dtype, as glmpool does by default).
        Set by load() for fp16 and bf16 on CUDA; the rotary tables keep their fp16/bf16 values."""
        self.fp32_pointwise = True
        self._rotary = None
        for layer in self.layers:
            layer.mlp.gelu = gelu_fp32

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity, self.dtype, self.device)

    def new_slab(self) -> KVSlab:
        return KVSlab(self.config, self.dtype, self.device, self.attention_kernel)

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rotary is None or self._rotary[0].shape[0] < length:
            size = max(length, self.config.max_sequence_length)
            tables = rotary_tables(self.config, size, self.dtype, self.device)
            self._rotary = tuple(t.float() for t in tables) if self.fp32_pointwise else tables
        return self._rotary

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied output projection: [B, H] -> [B, vocab]."""
        return self.word_embeddings.project(hidden)  # whatever multiplies it (linear/base.py)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[KVCache],
                prefix_mask: torch.Tensor | list | None = None, lengths: list[int] | None = None) -> torch.Tensor:
        """Run T new tokens of B sequences; return the logits of each sequence's last token [B, vocab].

        tokens [B, T]; positions [B, 2, T] (position id, block position id); caches: one per sequence,
        extended in place; prefix_mask [T, L] bool, True = masked (prompt prefill only; None = attend all),
        or one such mask per sequence. lengths: real tokens per sequence when prompts of different lengths
        are prefilled together, right-padded to T (the padding's positions and tokens are arbitrary).
        """
        B, T = tokens.shape
        masks = prefix_mask if isinstance(prefix_mask, list) else [prefix_mask] * B
        lengths = lengths or [T] * B
        for cache, t in zip(caches, lengths):
            cache.reserve(t)
        cos_table, sin_table = self.rotary(int(positions.max()) + 1)
        # [B, T, 1, 1, d]: the angles of the position, then of the block position when 2D (for q and k, all heads)
        ids = positions if self.config.position_encoding_2d else positions[:, :1]
        cos, sin = (F.embedding(ids, table).transpose(1, 2).reshape(B, T, 1, 1, -1)
                    for table in (cos_table, sin_table))
        decode = caches[0].slab.decode_step(caches) if T == 1 and isinstance(caches[0], SlotCache) else None
        x = self.word_embeddings(tokens)  # [B, T, H]
        for layer in self.layers:
            x = layer(x, cos, sin, caches, masks, lengths, decode)
        for cache, t in zip(caches, lengths):
            cache.advance(t)
        # [B, H]: each sequence's last real token
        last = x[:, 0] if T == 1 else x[torch.arange(B), torch.tensor(lengths) - 1]
        return self.output_logits(self.final_layernorm(last))


def prompt_positions(ids: list[int], bos_id: int, mask_id: int, gmask_id: int) -> tuple[list[int], list[int], int, int]:
    """Position ids, block position ids, context length and mask position of a prompt, as THUDM builds them.

    The context ends at the first `<sop>`; the mask position is the first `[gMASK]` (the one appended to
    every prompt), or the first `[MASK]` in a prompt without `[gMASK]`. Tokens from the context end on
    sit at the mask position and count block positions 1, 2, ...
    """
    length = len(ids)
    context_length = ids.index(bos_id) if bos_id in ids else length
    mask_token = gmask_id if gmask_id in ids else mask_id
    mask_position = ids.index(mask_token) if mask_token in ids else length - 1
    position = [i if i < context_length else mask_position for i in range(length)]
    block = [0] * context_length + list(range(1, length - context_length + 1))
    return position, block, context_length, mask_position


def prefix_attention_mask(length: int, context_length: int, device=None) -> torch.Tensor | None:
    """[T, T] bool, True = masked: the context attends both ways, the rest causally. None if nothing is masked."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed[:, :context_length] = True
    masked = ~allowed
    return masked if bool(masked.any()) else None
