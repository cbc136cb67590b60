"""The GPU path's generation: static shapes, one compiled graph per batch bucket, chunked prefill.

A decode step on a GPU is bound by launches, not by arithmetic, when run op by op (~35 operators a layer,
~1,000 kernel launches a token for ChatGLM-6B). Here it is one function of fixed shapes, compiled with
torch.compile (fullgraph, on CUDA mode="reduce-overhead": replayed as a CUDA graph):
- the KV cache is allocated once, sized by the KV budget: [2, slots, n, capacity + 1, d] per layer, the
  running and prefilling sequences in slots 0..N-1 (a finished one's slot takes the last one's sequence);
  column `capacity` is scratch, where padding rows write;
- the batch is padded to a bucket (powers of two up to the slot count): one graph per bucket;
- attention is FlexAttention (flex_attention, on CUDA its decoding kernel) with a block mask that the step
  builds from each row's length (`attention_mask`, no host read): a row reads its own blocks of
  ATTENTION_BLOCK positions (a padding row one), so one long sequence among short ones costs its own
  blocks and not every row's, with the same operators whatever the lengths (no sequence-by-sequence
  fallback). Run eagerly (compile off, or where compiling fails), the step takes a masked
  scaled_dot_product_attention over the longest row's columns instead;
- sampling is on the device for the whole batch (`sample_tokens`): each row its own temperature, top-k,
  top-p, and random numbers from a counter-based hash of its seed and its token count, so a sequence
  draws the same tokens alone or batched; a row draws from its top 64 candidates (or, for a top_k above
  64 or 0, from the whole sorted vocabulary): two sampler graphs a batch bucket, both compiled before
  serving; one copy to the host a step (the tokens) is the only wait.

Prompts are prefilled in pieces of bounded work between decode steps (`PrefillJob`): ChatGLM's prompt
attends both ways, so a piece is a layer's projections or the rest of a layer for at most `chunk`
tokens, never a token range through all layers. A step runs at most `chunk` tokens' worth of a full
forward pass of prompts, so a burst of long prompts delays each decoding stream by one chunk a step.
Short prompts waiting together (up to `chunk` tokens in all) go through the model as one pass: their
tokens one after another, one projection and MLP a layer for all, one attention call with a
block-diagonal mask (each token sees its own prompt: the context both ways, the rest causally; the
wasted scores of S <= chunk tokens cost less than a call per prompt), their keys and values written to
their slots by one indexed copy, their first tokens projected in one call and sampled in another: a
burst of 20 short prompts costs about the operators of one.

The CPU path (generate.Batcher, model.forward) is unchanged: it keeps its kernels and its bits.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .errors import PromptTooLongError
from .generate import INVALID_SCORE_TOKEN, Batcher, SamplingParams, Sequence, TokenEvent
from .model import ChatGLM, prompt_positions, queries_keys_values

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # prompt tokens a step may push through the whole model (its prefill budget)
ATTENTION_BLOCK = 128  # cached positions a block of the decode step's block-sparse attention


def batch_buckets(slots: int) -> list[int]:
    """Padded batch sizes: powers of two below `slots`, and `slots`."""
    return [b for b in (1 << i for i in range(slots.bit_length())) if b < slots] + [slots]


def bucket(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


class StaticKV(torch.nn.Module):
    """The batch's keys and values, allocated once: one buffer per layer [2, slots, n, capacity + 1, d].
    Buffers at fixed addresses (marked static for the compiler), so a CUDA graph writes them in place."""

    def __init__(self, model: ChatGLM, slots: int, capacity: int):
        super().__init__()
        c = model.config
        self.slots, self.capacity = slots, capacity
        for i in range(c.num_layers):
            buffer = torch.zeros(2, slots, c.num_attention_heads, capacity + 1, c.head_dim, dtype=model.dtype,
                                 device=model.device)
            torch._dynamo.mark_static_address(buffer)
            self.register_buffer(f"layer{i}", buffer, persistent=False)
        self.layers = [getattr(self, f"layer{i}") for i in range(c.num_layers)]

    def clear(self, slot: int, count: int = 1) -> None:
        """Zero `count` slots from `slot` for new occupants: a masked position gets probability 0, and 0 x a
        stale NaN is NaN."""
        for layer in self.layers:
            layer[:, slot:slot + count].zero_()

    def move(self, source: int, target: int) -> None:
        for layer in self.layers:
            layer[:, target] = layer[:, source]


def visible(column: torch.Tensor, write_at: torch.Tensor, capacity: int) -> torch.Tensor:
    """Whether a decode row writing at write_at attends a slot's column: a sequence its columns 0..write_at,
    a padding row (write_at == capacity) the scratch column alone."""
    return (column <= write_at) & ((write_at < capacity) | (column == capacity))


def attention_mask(write_at: torch.Tensor, capacity: int) -> BlockMask:
    """`visible` as FlexAttention's block mask over a slot's capacity + 1 columns: a sequence reads its first
    write_at // ATTENTION_BLOCK + 1 blocks (those before the block of write_at whole, that one masked
    within), a padding row one block. Made of tensors on the device with fixed shapes: built inside the
    compiled step, no host read.

    write_at [B] -> blocks [B, 1, 1] and their indices [B, 1, 1, blocks] (one query block, every head alike),
    for the whole blocks and for the partial one."""
    B, columns = write_at.shape[0], capacity + 1
    blocks = -(-columns // ATTENTION_BLOCK)
    padding = write_at == capacity
    ends = write_at + 1  # a sequence attends columns [0, ends)
    whole = torch.where(padding, 0, ends // ATTENTION_BLOCK)
    partial = torch.where(padding, 1, (ends % ATTENTION_BLOCK != 0).long())
    partial_first = torch.where(padding, capacity // ATTENTION_BLOCK, ends // ATTENTION_BLOCK)
    in_order = torch.arange(blocks, device=write_at.device).expand(B, blocks)
    partial_indices = (partial_first[:, None] + in_order).clamp(max=blocks - 1)  # only the first is read
    return BlockMask.from_kv_blocks(
        partial.int().view(B, 1, 1), partial_indices.int().view(B, 1, 1, blocks),
        whole.int().view(B, 1, 1), in_order.int().reshape(B, 1, 1, blocks), BLOCK_SIZE=ATTENTION_BLOCK,
        # (write_at alone: inductor's CPU kernel takes no tensor computed in the graph here)
        mask_mod=lambda b, h, q, column: visible(column, write_at[b], capacity),
        seq_lengths=(1, columns), compute_q_blocks=False)


def decode_logits(model: ChatGLM, cache: StaticKV, tokens: torch.Tensor, positions: torch.Tensor,
                  write_at: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """One new token for each of slots 0..B-1 -> logits [B, vocab] in fp32. Fixed shapes for a fixed B.

    tokens [B]; positions [B, 2] (position, block position); write_at [B]: where the row's key and value
    go, its cached length (a padding row: cache.capacity, the scratch column). Each row attends to
    positions 0..write_at of its slot: compiled (columns None), reading only the blocks that hold them
    (attention_mask); run eagerly, with a masked scaled_dot_product_attention over the first `columns`
    (the longest row's length + 1, which the host knows; padding rows attend them all, their results
    dropped). Eager flex_attention would run torch.compile all the same and upcast whole cache rows."""
    B = tokens.shape[0]
    c = model.config
    n, d, H = c.num_attention_heads, c.head_dim, c.hidden_size
    parts = 2 if c.position_encoding_2d else 1
    cos_table, sin_table = model._rotary
    ids = positions if c.position_encoding_2d else positions[:, :1]
    cos, sin = (F.embedding(ids, table).reshape(B, 1, 1, 1, -1) for table in (cos_table, sin_table))
    rows = torch.arange(B, device=tokens.device)
    if columns is None:
        attend = attention_mask(write_at, cache.capacity)
    else:
        attend = (torch.arange(columns, device=tokens.device) <= write_at[:, None])[:, None, None, :]  # [B, 1, 1, c]
    x = model.word_embeddings(tokens[:, None])  # [B, 1, H]
    for layer, data in zip(model.layers, cache.layers):
        attention_input = layer.input_layernorm(x)
        qkv = layer.attention.query_key_value(attention_input).view(B, 1, n, 3, d)
        q, key_value, scale = queries_keys_values(qkv, cos, sin, parts, layer.attention.layer_id)
        data[:, rows, :, write_at] = key_value[:, :, :, 0]  # indexed dims first: [B, 2, n, d]
        # q is already divided by sqrt(d) * scale; scaling the scores back by `scale` is the reference's order
        if columns is None:
            context = flex_attention(q, data[0, :B], data[1, :B], block_mask=attend, scale=scale)  # [B, n, 1, d]
        else:
            context = F.scaled_dot_product_attention(q, data[0, :B, :, :columns], data[1, :B, :, :columns],
                                                     attn_mask=attend, scale=scale)
        x = attention_input * layer.alpha + layer.attention.dense(context.transpose(1, 2).reshape(B, 1, H))
        mlp_input = layer.post_attention_layernorm(x)
        x = mlp_input * layer.alpha + layer.mlp(mlp_input)
    return model.output_logits(model.final_layernorm(x[:, 0])).float()


# --- sampling on the device ---

def _times(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x * constant mod 2^32 for x in [0, 2^32), in int64 without overflow (products stay below 2^49)."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, Murmur3's finaliser constants) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _times(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _times(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A number in [0, 1) for each (seed, counter) [B] (int64, seeds up to 2^63): the same on any device, in
    any batch, compiled or not (integer arithmetic only)."""
    x = _mix(seeds & 0xFFFFFFFF)
    x = _mix(x ^ ((seeds >> 32) & 0x7FFFFFFF))
    x = _mix(x ^ (counters & 0xFFFFFFFF))
    return (x >> 8).float() * (1.0 / (1 << 24))


SAMPLE_CANDIDATES = 64  # a sampled row with top_k up to this draws from the top 64; any other from the whole sort


def candidate_counts(vocab: int) -> list[int]:
    """The candidates counts sample_tokens is called with (one graph each per batch bucket)."""
    return sorted({min(SAMPLE_CANDIDATES, vocab), vocab})


def _draw(values: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
          numbers: torch.Tensor) -> torch.Tensor:
    """values [B, k]: each row's k largest logits, descending -> the rank [B] drawn at numbers [B] in [0, 1)."""
    k = values.shape[-1]
    ranks = torch.arange(k, device=values.device)
    values = (values / temperature[:, None]).masked_fill(ranks >= top_k[:, None], -math.inf)
    probs = values.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    cumulative = probs.cumsum(-1)
    threshold = numbers * cumulative[:, -1]
    return (cumulative <= threshold[:, None]).sum(-1).clamp(max=k - 1)


def sample_tokens(logits: torch.Tensor, greedy: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, candidates: int) -> torch.Tensor:
    """One token per row of logits [B, vocab] (float32), all on the device, each row alone.

    Per row [B]: greedy (bool), temperature, top_k (1..vocab), top_p (> 1: keep all), seed and counter (its
    generated tokens: a fresh number each step); candidates: one of candidate_counts(vocab), covering every
    sampled row's top_k. Sampling follows the CPU path's order (temperature, top-k, top-p within the top k,
    the most likely always kept), then draws by inverting the cumulative distribution at uniform(seed,
    counter). A row with top_k <= SAMPLE_CANDIDATES draws from its top 64 whatever `candidates` is, so its
    arithmetic, and its token, do not depend on its neighbours' top_k. A row with NaN/inf anywhere gets
    INVALID_SCORE_TOKEN, as the reference does."""
    finite = torch.isfinite(logits).all(-1)
    logits = torch.where(finite[:, None], logits, 0.0)
    values, indices = logits.topk(candidates)  # [B, candidates], descending
    numbers = uniform(seeds, counters)
    few = min(SAMPLE_CANDIDATES, candidates)
    pick = _draw(values[:, :few], temperature, top_k, top_p, numbers)
    if candidates > few:
        pick = torch.where(top_k <= few, pick, _draw(values, temperature, top_k, top_p, numbers))
    drawn = indices.gather(1, pick[:, None])[:, 0]
    chosen = torch.where(greedy, logits.argmax(-1), drawn)
    return torch.where(finite, chosen, INVALID_SCORE_TOKEN)


PADDING = SamplingParams(do_sample=False)  # a padding row's sampling: greedy


def sampling_rows(sequences: list[Sequence | None], vocab: int, device) -> tuple[list[torch.Tensor], int]:
    """The per-row tensors of sample_tokens for a row per sequence (None: a padding row, greedy), and the
    candidates count: SAMPLE_CANDIDATES, or the whole vocabulary where a sampled row's top_k is larger (or
    0). Two counts only, both compiled by warm_up: no request compiles a sampler while serving."""
    rows = [(s.params, s.seed, len(s.generated)) if s is not None else (PADDING, 0, 0) for s in sequences]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p, _, _ in rows]
    wanted = max([k for k, (p, _, _) in zip(top_k, rows) if p.do_sample], default=1)
    candidates = next(count for count in candidate_counts(vocab) if count >= wanted)
    floats = torch.tensor([[p.temperature, p.top_p if p.top_p < 1.0 else math.inf] for p, _, _ in rows])
    ints = torch.tensor([[not p.do_sample, k, seed, count] for (p, seed, count), k in zip(rows, top_k)])
    floats, ints = floats.to(device, non_blocking=True), ints.to(device, non_blocking=True)
    return [ints[:, 0].bool(), floats[:, 0], ints[:, 1], floats[:, 1], ints[:, 2], ints[:, 3]], candidates


def read_back(tokens: torch.Tensor) -> list[int]:
    """The step's one wait for the device: its tokens, copied to the host (copy=True: a copy the dispatcher
    sees even for CPU tensors, which is how bench/static_decode.py counts the host synchronisations)."""
    return tokens.to("cpu", copy=True).tolist()


# --- prefill in bounded pieces ---

@dataclass(eq=False)
class PrefillJob:
    """Prompts on their way through the model, a piece at a time (see the module docstring): one prompt
    longer than the chunk, or several whose tokens fit in one, packed one after another."""
    sequences: list[Sequence]
    hidden: torch.Tensor  # [S, H]: the prompts' activations between layers, S their tokens together
    pieces: Iterator[tuple[int, Callable[[], None]]] = None  # (cost, work); cost in quarter token-layers
    next_piece: tuple[int, Callable[[], None]] | None = None
    finished: list[Sequence] = field(default_factory=list)  # once done: the sequences not cancelled meanwhile
    last_hidden: torch.Tensor | None = None  # once done: their last tokens' final hidden states [len(finished), H]
    _places: tuple[list, torch.Tensor] | None = None

    def advance(self, budget: int, force: bool) -> int:
        """Run pieces while they fit in `budget` (with `force`, at least one); return the cost spent."""
        spent = 0
        while self.next_piece is not None and ((force and spent == 0) or spent + self.next_piece[0] <= budget):
            cost, work = self.next_piece
            work()
            spent += cost
            self.next_piece = next(self.pieces, None)
        return spent

    def places(self, scratch: int) -> torch.Tensor:
        """[2, S] on the device: each prompt token's slot and column in the StaticKV (a cancelled prompt's:
        slot 0's scratch column). Built again when a slot has moved (StaticBatcher._free) since the last call."""
        slots = [s.cache.slot if s.cache is not None else None for s in self.sequences]
        if self._places is None or self._places[0] != slots:
            places = [[], []]
            for sequence, slot in zip(self.sequences, slots):
                P = len(sequence.prompt)
                places[0] += [0 if slot is None else slot] * P
                places[1] += [scratch] * P if slot is None else range(P)
            self._places = slots, torch.tensor(places).to(self.hidden.device, non_blocking=True)
        return self._places[1]


def prefill_pieces(model: ChatGLM, cache: StaticKV, job: PrefillJob, chunk: int,
                   layout: torch.Tensor) -> Iterator[tuple[int, Callable[[], None]]]:
    """The pieces of job's prompts, layer by layer, then their last tokens' final states. S <= chunk tokens (one
    prompt or several packed): a layer for all of them is one piece (cost 4S), each token attending only
    within its own prompt. A longer prompt (alone) takes the layer's projections chunk by chunk (cost t
    each), then attention and the rest chunk by chunk (3t: three quarters of a layer's weights), as every
    query may attend every prompt key. layout [5, S] on the device: each token's position, block position,
    prompt (its index in job.sequences), index in its prompt, and its prompt's context length."""
    c = model.config
    n, d, H = c.num_attention_heads, c.head_dim, c.hidden_size
    parts = 2 if c.position_encoding_2d else 1
    S = job.hidden.shape[0]
    cos_table, sin_table = model._rotary
    ids = layout[:2] if c.position_encoding_2d else layout[:1]
    cos, sin = (F.embedding(ids, table).transpose(0, 1).reshape(1, S, 1, 1, -1) for table in (cos_table, sin_table))
    prompt, index, context_length = layout[2:]
    # [S, S] True = may attend: within a prompt, its context both ways, the rest causally
    allowed = (prompt[:, None] == prompt[None, :]) & ((index[None, :] < context_length[None, :])
                                                      | (index[None, :] <= index[:, None]))

    def project(layer, start, end):
        """The layer's input [1, t, H], queries [1, n, t, d], keys and values [1, 2, n, t, d] of tokens start..end."""
        attention_input = layer.input_layernorm(job.hidden[None, start:end])
        qkv = layer.attention.query_key_value(attention_input).view(1, end - start, n, 3, d)
        q, key_value, _ = queries_keys_values(qkv, cos[:, start:end], sin[:, start:end], parts,
                                              layer.attention.layer_id)
        return attention_input, q, key_value

    def finish(layer, attention_input, context):
        """The layer's output [t, H] from its input [1, t, H] and attention's context [1, n, t, d]."""
        t = attention_input.shape[1]
        x = attention_input * layer.alpha + layer.attention.dense(context.transpose(1, 2).reshape(1, t, H))
        mlp_input = layer.post_attention_layernorm(x)
        return (mlp_input * layer.alpha + layer.mlp(mlp_input))[0]

    def packed_layer(layer):
        attention_input, q, key_value = project(layer, 0, S)
        slots, columns = job.places(cache.capacity)
        cache.layers[layer.attention.layer_id][:, slots, :, columns] = key_value[0].permute(2, 0, 1, 3)  # [S, 2, n, d]
        context = F.scaled_dot_product_attention(q, key_value[:, 0], key_value[:, 1], attn_mask=allowed,
                                                 scale=float(layer.attention.layer_id + 1))
        job.hidden = finish(layer, attention_input, context)

    chunks = [(start, min(S, start + chunk)) for start in range(0, S, chunk)]
    if len(chunks) > 1:  # a long prompt's queries, a layer's at a time
        queries = torch.empty(1, n, S, d, dtype=model.dtype, device=job.hidden.device)

    def slot():  # the long prompt's: it moves when another sequence's slot is freed
        return job.sequences[0].cache.slot

    def project_chunk(layer, start, end):
        _, q, key_value = project(layer, start, end)
        cache.layers[layer.attention.layer_id][:, slot(), :, start:end] = key_value[0]
        queries[:, :, start:end] = q

    def finish_chunk(layer, start, end):
        data = cache.layers[layer.attention.layer_id][:, slot(), :, :S]
        context = F.scaled_dot_product_attention(queries[:, :, start:end], data[0][None], data[1][None],
                                                 attn_mask=allowed[start:end], scale=float(layer.attention.layer_id + 1))
        job.hidden[start:end] = finish(layer, layer.input_layernorm(job.hidden[None, start:end]), context)

    for layer in model.layers:
        if len(chunks) == 1:
            yield 4 * S, lambda layer=layer: packed_layer(layer)
            continue
        for start, end in chunks:
            yield end - start, lambda layer=layer, start=start, end=end: project_chunk(layer, start, end)
        for start, end in chunks:
            yield 3 * (end - start), lambda layer=layer, start=start, end=end: finish_chunk(layer, start, end)

    ends = list(itertools.accumulate(len(s.prompt) for s in job.sequences))

    def output():
        job.finished = [s for s in job.sequences if s.cache is not None]
        lasts = torch.tensor([end - 1 for s, end in zip(job.sequences, ends) if s.cache is not None])
        job.last_hidden = model.final_layernorm(job.hidden[lasts.to(job.hidden.device, non_blocking=True)])
    yield 0, output


@dataclass
class StaticSlot:
    """A sequence's place in the StaticKV (generate.Sequence.cache)."""
    slot: int
    length: int = 0


@dataclass
class StepStats:
    prefill_cost: int = 0  # quarter token-layers of prompt work done in the last step
    compile_seconds: float = 0.0
    graphs: set = field(default_factory=set)  # batch buckets compiled


class StaticBatcher(Batcher):
    """generate.Batcher's interface (add, step, cancel, admission) on the GPU path: see the module docstring.

    Slots: max_batch, fewer where the KV budget cannot give each `capacity` tokens (default the model's
    window: requests ask for up to max_length 2048; the whole budget for one slot when that is less)."""

    def __init__(self, model: ChatGLM, tokenizer, max_batch: int = 16, max_kv_tokens: int | None = None,
                 compile: bool = True, backend: str | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 capacity: int | None = None):
        window = model.config.max_sequence_length
        capacity = min(window, capacity or window, max_kv_tokens or window)
        slots = max_batch if max_kv_tokens is None else max(1, min(max_batch, max_kv_tokens // capacity))
        super().__init__(model, tokenizer, slots, max_kv_tokens, shared_cache=False)
        self.cache = StaticKV(model, slots, capacity)
        self.occupants: list[Sequence] = []  # slot i's sequence
        self.prefilling: dict[Hashable, PrefillJob] = {}
        self.prefill_chunk = prefill_chunk
        self.stats = StepStats()
        model.rotary(window)
        for table in model._rotary:
            torch._dynamo.mark_static_address(table)
        self.batch_buckets = batch_buckets(slots)
        self.decode, self.sample = self._compiled(compile, backend)

    def _compiled(self, compile: bool, backend: str | None):
        def decode(inputs, columns=None):  # inputs [4, B]: tokens, positions, block positions, write_at
            # (write_at a row of an input: inductor's CPU FlexAttention takes no other tensor in a mask)
            return decode_logits(self.model, self.cache, inputs[0], inputs[1:3].T, inputs[3], columns)
        self.compiled = compile
        if not compile:
            return decode, sample_tokens
        options = dict(fullgraph=True, dynamic=False, backend=backend or "inductor")
        if self.model.device.type == "cuda" and options["backend"] == "inductor":
            options["mode"] = "reduce-overhead"
            # CUDA graphs read weights and tables where they are: marked static, none is copied in a replay
            for tensor in (*self.model.parameters(), *self.model.buffers()):
                torch._dynamo.mark_static_address(tensor)
        graphs = len(self.batch_buckets) * 3  # the decode step, and the samplers' few shapes
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               4 * graphs)
        return torch.compile(decode, **options), torch.compile(sample_tokens, **options)

    # --- admission: a slot each, up to capacity tokens ---

    def _footprint(self, stop_lengths: list[int]) -> int:
        return len(stop_lengths) * self.cache.capacity

    def stop_length(self, prompt_tokens: int, params: SamplingParams) -> int:
        stop = super().stop_length(prompt_tokens, params)
        if stop > self.cache.capacity:
            raise PromptTooLongError(f"request may need {stop} tokens of KV cache, this worker holds "
                                     f"{self.cache.capacity} a sequence: lower max_length or max_new_tokens")
        return stop

    def add_prompt(self, key: Hashable, prompt: list[int], params: SamplingParams | None = None) -> int:
        length = super().add_prompt(key, prompt, params)
        sequence = self.pending[key]
        if sequence.generator is not None:  # draws come from sample_tokens' hash of the seed instead
            sequence.seed, sequence.generator = sequence.generator.initial_seed(), None
        return length

    def keys(self) -> list[Hashable]:
        return [*self.running, *self.prefilling, *self.pending]

    def __len__(self) -> int:
        return len(self.pending) + len(self.prefilling) + len(self.running)

    def reset(self, max_batch: int) -> "StaticBatcher":
        """Drop every sequence and admit at most `max_batch` from now on (after running out of memory: the
        cache and the compiled steps are kept); returns itself."""
        self.pending.clear()
        self.prefilling.clear()
        self.running.clear()
        self.occupants.clear()
        self.max_batch = min(self.max_batch, max_batch)
        return self

    # --- slots ---

    def _attach(self, sequences: list[Sequence]) -> None:
        """The next free slots to `sequences`, cleared together (an operator a layer, however many)."""
        self.cache.clear(len(self.occupants), len(sequences))
        for sequence in sequences:
            sequence.cache = StaticSlot(len(self.occupants))
            self.occupants.append(sequence)

    def _free(self, sequence: Sequence) -> None:
        if isinstance(sequence.cache, StaticSlot):
            last = self.occupants.pop()
            if last is not sequence:
                self.cache.move(last.cache.slot, sequence.cache.slot)
                last.cache.slot = sequence.cache.slot
                self.occupants[last.cache.slot] = last
        sequence.cache = None

    @torch.inference_mode()
    def cancel(self, key: Hashable) -> TokenEvent | None:
        job = self.prefilling.pop(key, None)
        if job is not None:  # freed the usual way; the job's other prompts go on (see PrefillJob.places)
            self.running[key] = next(s for s in job.sequences if s.key == key)
        return super().cancel(key)

    # --- steps ---

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Advance every running sequence by one token and the prompts by at most a chunk's worth."""
        if self.compiled:  # a new step: the graphs' outputs of the last one are dead (CUDA graph trees)
            torch.compiler.cudagraph_mark_step_begin()
        decoding = sorted(self.running.values(), key=lambda s: s.cache.slot)
        tokens = []  # on the device, read back together: the step's one wait
        if decoding:
            tokens.append(self._decode(decoding))
        prefilled = self._prefill()
        prompts = [s for job in prefilled for s in job.finished]
        if prompts:
            if tokens:  # out of the graphs' memory, so that the next sampler call replays as a root (see warm_up)
                tokens[0] = tokens[0].clone()
            logits = self._prompt_logits(torch.cat([job.last_hidden for job in prefilled]))
            padded = [*prompts, *[None] * (len(logits) - len(prompts))]
            sample_rows, candidates = sampling_rows(padded, self.model.config.vocab_size, self.model.device)
            tokens.append(self.sample(logits, *sample_rows, candidates)[:len(prompts)])
        if not tokens:
            return []
        chosen = read_back(torch.cat(tokens))
        events = [self._advance(s, token) for s, token in zip(decoding, chosen)]
        for sequence, token in zip(prompts, chosen[len(decoding):]):
            self.running[sequence.key] = sequence
            events.append(self._advance(sequence, token))
        return events

    def _decode(self, decoding: list[Sequence]) -> torch.Tensor:
        """Sampled tokens [B] of the decoding sequences (in slot order), by one decode step of every slot up
        to the batch bucket (prefilling slots and padding write to the scratch column; their tokens dropped)."""
        device = self.model.device
        rows = bucket(len(self.occupants), self.batch_buckets)
        by_slot: list[Sequence | None] = [None] * rows
        inputs = [[0, 0, 0, self.cache.capacity]] * rows  # token, position, block position, write_at
        for s in decoding:
            by_slot[s.cache.slot] = s
            inputs[s.cache.slot] = [s.generated[-1], *s.next_position(), s.cache.length]
            s.cache.length += 1
        columns = None if self.compiled else max(s.cache.length for s in decoding)  # eager: the longest row's
        columns_first = torch.tensor(list(zip(*inputs)))  # [4, rows], strides as warm_up's (.T.contiguous() keeps
        # a [4, 1] tensor's transposed strides, and the compiled step guards on strides)
        logits = self.decode(columns_first.to(device, non_blocking=True), columns)
        self.stats.graphs.add(rows)
        sample_rows, candidates = sampling_rows(by_slot, self.model.config.vocab_size, device)
        tokens = self.sample(logits, *sample_rows, candidates)
        if len(decoding) == rows or decoding[-1].cache.slot == len(decoding) - 1:
            return tokens[:len(decoding)]
        slots = torch.tensor([s.cache.slot for s in decoding]).to(device, non_blocking=True)
        return tokens[slots]

    def _prompt_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] (fp32) of prompts' last tokens from their final hidden states [m, H]: one output
        projection, padded to a batch bucket, so that the sampler meets a decode step's shape and layout (one
        compiled sampler each; logits padded after the projection may have other strides)."""
        rows = bucket(len(last_hidden), self.batch_buckets)
        return self.model.output_logits(F.pad(last_hidden, (0, 0, 0, rows - len(last_hidden)))).float()

    def _prefill(self) -> list[PrefillJob]:
        """Prompt work of one step (at most a chunk's worth through the whole model); the jobs finished."""
        budget = 4 * self.prefill_chunk * self.model.config.num_layers
        spent, finished = 0, []
        while self.prefilling or self.pending:  # one job at a time, in arrival order
            job = next(iter(self.prefilling.values()), None) or self._start(self._next_prompts())
            spent += job.advance(budget - spent, force=spent == 0)
            if job.next_piece is not None:  # the rest waits for the next step
                break
            for sequence in job.finished:
                del self.prefilling[sequence.key]
            finished.append(job)
        self.stats.prefill_cost = spent
        return finished

    def _next_prompts(self) -> list[Sequence]:
        """The oldest waiting prompt, and if it fits in a chunk, the prompts after it while all fit together."""
        group, tokens = [], 0
        for sequence in self.pending.values():
            tokens += len(sequence.prompt)
            if group and tokens > self.prefill_chunk:
                break
            group.append(sequence)
        for sequence in group:
            del self.pending[sequence.key]
        return group

    def _start(self, group: list[Sequence]) -> PrefillJob:
        """A PrefillJob for the prompts of `group`, each given a slot."""
        device = self.model.device
        self._attach(group)
        layout = [[], [], [], [], []]  # per token: position, block position, prompt, index in it, its context length
        for i, sequence in enumerate(group):
            position, block, context_length, _ = prompt_positions(
                sequence.prompt, self.tokenizer.bos_id, self.tokenizer.mask_id, self.tokenizer.gmask_id)
            P = sequence.cache.length = len(sequence.prompt)
            for row, values in zip(layout, (position, block, [i] * P, range(P), [context_length] * P)):
                row.extend(values)
        prompts = torch.tensor([t for s in group for t in s.prompt]).to(device, non_blocking=True)
        job = PrefillJob(group, self.model.word_embeddings(prompts))
        job.pieces = prefill_pieces(self.model, self.cache, job, self.prefill_chunk,
                                    torch.tensor(layout).to(device, non_blocking=True))
        job.next_piece = next(job.pieces)
        self.prefilling.update((s.key, job) for s in group)
        return job

    # --- compilation ---

    def warm_up(self, buckets: list[int] | None = None) -> float:
        """Compile (or, eager, just run) the decode step for every batch bucket (or those given), and the
        sampler for each of them and each of candidate_counts, now, writing only the scratch column, so no
        request waits for a compiler; returns the seconds it took. Run it before sequences are added."""
        start = time.monotonic()
        device, vocab = self.model.device, self.model.config.vocab_size
        runs = 3 if self.compiled and device.type == "cuda" else 1  # CUDA graphs are recorded on a later run
        counts = candidate_counts(vocab)
        with torch.inference_mode():
            buckets = buckets or self.batch_buckets
            for rows, candidates, _ in itertools.product(buckets, counts, range(runs)):
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                inputs = torch.zeros(4, rows, dtype=torch.long, device=device)
                inputs[3] = self.cache.capacity
                logits = self.decode(inputs, None if self.compiled else 1)
                self.stats.graphs.add(rows)
                sample_rows, _ = sampling_rows([None] * rows, vocab, device)
                self.sample(logits, *sample_rows, candidates)  # a decode step's sampler, after its graph
            for rows, candidates, _ in itertools.product(sorted(set(buckets)), counts, range(runs)):
                if self.compiled:  # prompts' first tokens: the sampler alone, with no live graph output (see step)
                    torch.compiler.cudagraph_mark_step_begin()
                sample_rows, _ = sampling_rows([None] * rows, vocab, device)
                hidden = torch.zeros(rows, self.model.config.hidden_size, dtype=self.model.dtype, device=device)
                self.sample(self._prompt_logits(hidden), *sample_rows, candidates)
        self.stats.compile_seconds = time.monotonic() - start
        log.info("decode step %s for %d buckets in %.1f s", "compiled" if self.compiled else "run",
                 len(self.stats.graphs), self.stats.compile_seconds)
        return self.stats.compile_seconds
