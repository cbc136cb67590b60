"""Continuous-batching generation: sequences join and leave between steps.

Each step prefills the sequences added since the last step (together, right-padded to the longest
prompt, up to PREFILL_TOKENS padded tokens per forward pass; prompts of up to and of over
linear/registry.py's PROMPT_KERNEL_MAX_TOKENS tokens apart, since a quantized model multiplies them differently)
and advances every running sequence by one token in a single batched forward pass: the weights are
read once for the whole batch, which is what makes batching nearly free while decoding is bound by
memory bandwidth. Each sequence keeps its own sampling parameters and random generator, and its KV
cache, freed the moment it finishes: a slot of one slab shared by the batch (model.KVSlab), whose
decode attention then runs for all sequences at once, or, where that would change a sequence's results
(see Batcher), a cache of its own.

Admission is bounded by `max_batch` sequences and `max_kv_tokens` cached tokens, counted at the worst
case (prompt + longest possible answer; in a slab, every slot at the longest, rounded up to a multiple of
model.SPAN_BLOCK), so a full batch can never run the device out of memory.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from . import row_kernel
from .errors import AdmissionError, PromptTooLongError
from .model import ChatGLM, KVCache, SlotCache, prefix_attention_mask, prompt_positions, round_up
from .linear.registry import PROMPT_KERNEL_MAX_TOKENS
from .tokenizer import ChatGLMTokenizer, process_response

INVALID_SCORE_TOKEN = 5  # where the reference puts all probability when logits are NaN/inf
PREFILL_TOKENS = 2048  # padded prompt tokens one prefill pass may take: bounds its activations


@dataclass(frozen=True)
class SamplingParams:
    """THUDM chat()'s defaults; top_k=50 is transformers' default that the reference inherits."""
    do_sample: bool = True
    top_p: float = 0.7
    temperature: float = 0.95
    top_k: int = 50
    max_length: int = 2048  # prompt + answer tokens
    max_new_tokens: int | None = None
    seed: int | None = None

    def __post_init__(self):
        def number(name, value, low, high, low_open=False):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or value > high or (low_open and value == low):
                raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        number("temperature", self.temperature, 0.0, 100.0, low_open=True)
        for name in ("top_k", "max_length", "max_new_tokens", "seed"):
            value = getattr(self, name)
            if value is None and name in ("max_new_tokens", "seed"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in ("top_k", "seed") else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name in ('top_k', 'seed') else 'positive'} "
                                 f"integer, got {value!r}")


@dataclass
class TokenEvent:
    key: Hashable
    token_id: int
    render: Callable[[], str] = field(repr=False)  # makes `text`, only when someone asks for it
    finished: bool
    finish_reason: str | None  # None while running; "stop", "length" or "cancelled"
    prompt_tokens: int
    generated_tokens: int

    @functools.cached_property
    def text(self) -> str:
        """The post-processed answer up to this event (while running: never ending in a cut character).
        Decoding every sequence's answer after every step would cost a batch-16 step several percent; a
        server reads it every few hundred milliseconds and at the end."""
        return self.render()


@dataclass
class Sequence:
    key: Hashable
    prompt: list[int]
    params: SamplingParams
    stop_length: int  # total length (prompt + answer) at which it ends
    generator: torch.Generator | None
    cache: KVCache | SlotCache | None = None
    generated: list[int] = field(default_factory=list)
    shown: tuple[int, str] = (0, "")  # (generated tokens, text) of the latest text without a cut character
    mask_position: int = 0
    context_length: int = 0
    seed: int = 0  # the generator's seed: the GPU path draws from it by a hash (static_decode.sample_tokens)

    def next_position(self) -> tuple[int, int]:
        """(position, block position) of the token about to be fed (the last generated one)."""
        index = len(self.prompt) + len(self.generated) - 1
        return self.mask_position, index - self.context_length + 1


def next_tokens(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [B, vocab] (float32), each row with its own parameters and generator.

    Greedy rows come from one argmax; sampled rows go temperature -> top-k -> top-p -> draw, all rows
    sharing a top_k filtered together (one top-k over [rows, vocab] costs half as much as a top-k per
    row) and each drawn with its own generator, so a row's token does not depend on its neighbours.
    A row with NaN/inf anywhere puts all its probability on INVALID_SCORE_TOKEN, as the reference does.
    On the CPU, glmpool's kernel finds both the greedy tokens and that every row is valid in one pass where
    it can (row_kernel.greedy), else the rows are checked and searched as here.
    """
    greedy = row_kernel.greedy(logits) if _greedy_kernel_takes(logits) else None
    if greedy is None:
        finite = torch.isfinite(logits.sum(-1))  # one reduction per row
        if not bool(finite.all()):
            logits = logits.clone()
            logits[~finite] = 0.0
            logits[~finite, INVALID_SCORE_TOKEN] = 5e4
    tokens = [0] * len(params)
    if not all(p.do_sample for p in params):
        tokens = greedy if greedy is not None else argmax(logits).tolist()
    by_top_k: dict[int, list[int]] = {}
    for row, p in enumerate(params):
        if p.do_sample:
            by_top_k.setdefault(_effective_top_k(p, logits.shape[-1]), []).append(row)
    for rows in by_top_k.values():
        chosen = logits if len(rows) == len(params) else logits[rows]  # all rows: no 8 MB copy at batch 16
        indices, probs = candidates(chosen, [params[row] for row in rows])  # [R, k] each
        draws = torch.cat([torch.multinomial(probs[i], 1, generator=generators[row])
                           for i, row in enumerate(rows)])
        for row, token in zip(rows, indices.gather(1, draws[:, None]).view(-1).tolist()):
            tokens[row] = token
    return tokens


def _greedy_kernel_takes(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[1] > 0 and logits.is_contiguous() and row_kernel.available())


def argmax(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """logits [B, V] (finite) -> [B]: each row's first maximum, as torch.argmax gives it, 2.5x (one row) to
    7x (16 rows) faster.

    torch's argmax tracks indices without vector instructions (~1 ms for 16 rows of 130528); max without
    an index is vectorized. So: the maximum of every chunk of columns, the first chunk holding the row's
    maximum (argmax of the few chunk maxima), then the first maximum inside that chunk.
    """
    B, V = logits.shape
    whole = V // chunk * chunk
    if whole == 0:
        return logits.argmax(-1)
    maxima = logits[:, :whole].view(B, -1, chunk).amax(-1)  # [B, V / chunk]
    if whole < V:
        maxima = torch.cat((maxima, logits[:, whole:].amax(-1, keepdim=True)), dim=1)
    first = maxima.argmax(-1)  # [B]
    # that chunk's columns [B, chunk]; the last chunk is short: repeating its last column changes no first maximum
    columns = (first[:, None] * chunk + torch.arange(chunk, device=logits.device)).clamp_(max=V - 1)
    return columns.gather(1, logits.gather(1, columns).argmax(-1, keepdim=True)).squeeze(1)


def top_k_of(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores, k) for rows [R, V]: values descending and their indices, ~4x faster for 16 rows
    of 130528 (torch's topk takes ~2.6 ms of a ~45 ms sampled batch-16 step here).

    Each of the k largest values lies in one of the k chunks with the largest maxima, so torch.topk runs
    on those k chunks only (chunks of 16-128 columns, a power of two dividing V). Where several elements
    tie with the k-th value, which of them are kept may differ from torch.topk over the whole row (both
    are a top k). Every row alone, as torch.topk."""
    rows, vocab = scores.shape
    chunk = math.gcd(vocab, 128)
    if chunk < 16 or vocab // chunk < 4 * k or not scores.is_contiguous():
        return torch.topk(scores, k)
    chunks = scores.view(rows, -1, chunk)  # [R, V / chunk, chunk]
    best = chunks.amax(-1).topk(k).indices  # [R, k]
    picked = chunks.gather(1, best[..., None].expand(-1, -1, chunk)).view(rows, -1)  # [R, k * chunk]
    values, where = picked.topk(k)
    columns = (best[..., None] * chunk + torch.arange(chunk, device=scores.device)).view(rows, -1)
    return values, columns.gather(1, where)


def _effective_top_k(params: SamplingParams, vocab: int) -> int:
    return params.top_k if 0 < params.top_k < vocab else vocab


def candidates(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [R, k] and their (unnormalised) probabilities [R, k] after temperature, top-k and top-p,
    for logits [R, vocab] whose rows share one top_k.

    Top-p is applied within the top-k candidates only, which is the same distribution as filtering
    the whole vocabulary (everything outside the top k already has probability zero) without
    sorting 130k logits per token.
    """
    vocab, device = logits.shape[-1], logits.device
    top_k = _effective_top_k(params[0], vocab)
    temperature = torch.tensor([[p.temperature] for p in params], dtype=logits.dtype, device=device)
    # dividing by a temperature keeps the order: the top k of the logits, then only they are divided
    values, indices = top_k_of(logits, top_k)  # descending
    values = values / temperature
    probs = values.softmax(-1)
    # top_p 1 keeps everything (a cumulative sum in fp32 may reach 1 before the last candidate)
    top_p = torch.tensor([[p.top_p if p.top_p < 1.0 else math.inf] for p in params], dtype=probs.dtype,
                         device=device)
    mass_before = probs.cumsum(-1) - probs  # probability of the more likely candidates
    return indices, probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely always stays


class Batcher:
    """Runs many sequences together; see the module docstring. Not thread-safe: one per worker."""

    def __init__(self, model: ChatGLM, tokenizer: ChatGLMTokenizer, max_batch: int = 16,
                 max_kv_tokens: int | None = None, shared_cache: bool | None = None):
        """shared_cache: keep the batch's KV caches in one slab and attend for all sequences at once while
        decoding (model.KVSlab); None = off the CPU (thousands of kernel launches a step fewer; batching
        was never bit-exact there), and on the CPU where the model says a slab keeps a sequence's bits
        (model.slab_is_exact: glmpool's attention kernel, or padding checked exact): there batching must not
        change a sequence's results."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_kv_tokens = max_kv_tokens
        if shared_cache is None:
            shared_cache = model.device.type != "cpu" or model.slab_is_exact
        self.slab = model.new_slab() if shared_cache else None
        self.pending: dict[Hashable, Sequence] = {}  # added, not yet prefilled
        self.running: dict[Hashable, Sequence] = {}

    def __len__(self) -> int:
        return len(self.pending) + len(self.running)

    def keys(self) -> list[Hashable]:
        return [*self.running, *self.pending]

    @property
    def reserved_tokens(self) -> int:
        return self._footprint(self._stop_lengths())

    def _stop_lengths(self) -> list[int]:
        return [s.stop_length for s in (*self.pending.values(), *self.running.values())]

    def _footprint(self, stop_lengths: list[int]) -> int:
        """KV tokens the batch may come to hold: each sequence its own worst case, or, in a shared slab
        whose slots all have one length, every slot the longest worst case."""
        if self.slab is None:
            return sum(stop_lengths)
        return len(stop_lengths) * round_up(max(stop_lengths, default=0))

    def stop_length(self, prompt_tokens: int, params: SamplingParams) -> int:
        """Validate a prompt's length against the window and `max_length`; return its final length bound."""
        window = self.model.config.max_sequence_length
        if prompt_tokens > window:
            raise PromptTooLongError(f"prompt is {prompt_tokens} tokens, the model window is {window}")
        if prompt_tokens >= params.max_length:
            raise PromptTooLongError(f"prompt is {prompt_tokens} tokens, max_length {params.max_length} "
                                     f"leaves no room for an answer")
        stop = params.max_length
        if params.max_new_tokens is not None:
            stop = min(stop, prompt_tokens + params.max_new_tokens)
        if self.max_kv_tokens is not None and stop > self.max_kv_tokens:
            raise PromptTooLongError(f"request may need {stop} tokens of KV cache, this worker holds "
                                     f"{self.max_kv_tokens}: lower max_length or max_new_tokens")
        return stop

    def has_room(self, prompt_tokens: int, params: SamplingParams) -> bool:
        if len(self) >= self.max_batch:
            return False
        stop = self.stop_length(prompt_tokens, params)
        return self.max_kv_tokens is None or self._footprint([*self._stop_lengths(), stop]) <= self.max_kv_tokens

    def add(self, key: Hashable, query: str, history: list | None = None,
            params: SamplingParams | None = None) -> int:
        """Queue a chat turn for the next step; returns its prompt length in tokens."""
        return self.add_prompt(key, self.tokenizer.build_prompt(query, history), params)

    def add_prompt(self, key: Hashable, prompt: list[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        if key in self.pending or key in self.running:
            raise ValueError(f"sequence {key!r} is already in the batch")
        if not self.has_room(len(prompt), params):
            raise AdmissionError(f"batch full ({len(self)} sequences, {self.reserved_tokens} KV tokens reserved)")
        generator = None
        if params.do_sample:
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        _, _, context_length, mask_position = prompt_positions(
            prompt, self.tokenizer.bos_id, self.tokenizer.mask_id, self.tokenizer.gmask_id)
        self.pending[key] = Sequence(key, list(prompt), params, self.stop_length(len(prompt), params), generator,
                                     mask_position=mask_position, context_length=context_length)
        return len(prompt)

    @torch.inference_mode()  # a shared cache moves another sequence into the freed slot
    def cancel(self, key: Hashable) -> TokenEvent | None:
        sequence = self.pending.pop(key, None) or self.running.pop(key, None)
        if sequence is None:
            return None
        self._free(sequence)
        last = sequence.generated[-1] if sequence.generated else -1
        return self._event(sequence, last, "cancelled")

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Prefill what was added, advance everything running by one token; one event per sequence."""
        events = []
        decoding = list(self.running.values())
        if decoding and self.slab is not None:  # in slot order, and room for one more token each
            decoding.sort(key=lambda s: s.cache.slot)
            self.slab.fit(len(decoding), max(s.cache.length for s in decoding) + 1,
                          max(s.stop_length for s in decoding))
        if decoding:
            tokens = torch.tensor([[s.generated[-1]] for s in decoding], device=self.model.device)
            positions = torch.tensor([[[p], [b]] for p, b in (s.next_position() for s in decoding)],
                                     device=self.model.device)
            events += self._advance_all(decoding, self.model(tokens, positions, [s.cache for s in decoding]))
        while self.pending:  # in arrival order, as many at once as PREFILL_TOKENS allows
            group = [self.pending.pop(next(iter(self.pending)))]
            longest = len(group[0].prompt)
            short = longest <= PROMPT_KERNEL_MAX_TOKENS
            while self.pending:
                candidate = next(iter(self.pending.values()))
                if ((len(group) + 1) * max(longest, len(candidate.prompt)) > PREFILL_TOKENS
                        or (len(candidate.prompt) <= PROMPT_KERNEL_MAX_TOKENS) != short):
                    break
                group.append(self.pending.pop(candidate.key))
                longest = max(longest, len(candidate.prompt))
            events += self._prefill(group)
        return events

    def _prefill(self, group: list[Sequence]) -> list[TokenEvent]:
        """One forward pass over the prompts of `group`, right-padded to the longest."""
        device = self.model.device
        lengths = [len(s.prompt) for s in group]
        tokens = torch.zeros(len(group), max(lengths), dtype=torch.long)
        positions = torch.zeros(len(group), 2, max(lengths), dtype=torch.long)
        masks = []
        for i, sequence in enumerate(group):
            position, block, context_length, _ = prompt_positions(
                sequence.prompt, self.tokenizer.bos_id, self.tokenizer.mask_id, self.tokenizer.gmask_id)
            tokens[i, :lengths[i]] = torch.tensor(sequence.prompt)
            positions[i, :, :lengths[i]] = torch.tensor([position, block])
            masks.append(prefix_attention_mask(lengths[i], context_length, device))
            if self.slab is None:
                sequence.cache = self.model.new_cache(min(sequence.stop_length, lengths[i] + 64))
        if self.slab is not None:
            members = [*self.running.values(), *group]
            self.slab.fit(len(members), max(lengths), max(s.stop_length for s in members))
            for sequence in group:
                sequence.cache = self.slab.attach()
        logits = self.model(tokens.to(device), positions.to(device), [s.cache for s in group], masks, lengths)
        for sequence in group:
            self.running[sequence.key] = sequence
        return self._advance_all(group, logits)

    def _advance_all(self, sequences: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        tokens = next_tokens(logits.float(), [s.params for s in sequences], [s.generator for s in sequences])
        return [self._advance(s, token) for s, token in zip(sequences, tokens)]

    def _advance(self, sequence: Sequence, token: int) -> TokenEvent:
        sequence.generated.append(token)
        reason = None
        if token == self.model.config.eos_token_id:
            reason = "stop"
        elif len(sequence.prompt) + len(sequence.generated) >= sequence.stop_length:
            reason = "length"
        if reason:
            del self.running[sequence.key]
            self._free(sequence)
        return self._event(sequence, token, reason)

    def _free(self, sequence: Sequence) -> None:
        if self.slab is not None and sequence.cache is not None:
            self.slab.detach(sequence.cache)
        sequence.cache = None

    def _event(self, sequence: Sequence, token: int, reason: str | None) -> TokenEvent:
        count = len(sequence.generated)
        # Cut at the length limit, the answer may end inside a character: that stays out, as while streaming.
        render = functools.partial(self._text, sequence, count, final=reason == "stop")
        return TokenEvent(sequence.key, token, render, reason is not None, reason, len(sequence.prompt), count)

    def _text(self, sequence: Sequence, count: int, final: bool) -> str:
        """The answer after `count` generated tokens. Unless final, a trailing cut multi-byte character
        is left out by falling back to the longest prefix that decodes whole (THUDM's stream_chat shows
        nothing new until the character is complete)."""
        if final:
            return process_response(self.tokenizer.decode(sequence.generated[:count]))
        shown_count, shown = sequence.shown if count >= sequence.shown[0] else (0, "")
        for n in range(count, shown_count, -1):
            text = self.tokenizer.decode(sequence.generated[:n])
            if text and not text.endswith("\ufffd"):
                sequence.shown = (n, process_response(text))
                return sequence.shown[1]
        return shown
