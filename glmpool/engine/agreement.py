"""How close a model (e.g. quantized) stays to its reference in greedy decoding: an evaluation helper
for tests and bench/decode.py, not used in serving."""
from __future__ import annotations

import torch
from torch import nn

@torch.no_grad()
def _greedy_tokens(model: nn.Module, prompt: list[int], new_tokens: int, special: tuple[int, int, int],
                   forced: list[int] | None = None) -> list[int]:
    """Greedy continuation of `prompt` (no stop token); with `forced`, feed those tokens instead of its own."""
    from .model import prefix_attention_mask, prompt_positions

    device = model.device
    position, block, context_length, mask_position = prompt_positions(prompt, *special)
    cache = model.new_cache(len(prompt) + new_tokens)
    logits = model(torch.tensor([prompt], device=device), torch.tensor([[position, block]], device=device),
                   [cache], prefix_attention_mask(len(prompt), context_length, device))
    out: list[int] = []
    for i in range(new_tokens):
        out.append(int(logits[0].float().argmax()))
        if i + 1 == new_tokens:
            break
        feed = forced[i] if forced is not None else out[-1]
        index = len(prompt) + i  # the fed token's index in the sequence
        positions = torch.tensor([[[mask_position], [index - context_length + 1]]], device=device)
        logits = model(torch.tensor([[feed]], device=device), positions, [cache])
    return out


def greedy_agreement(reference: nn.Module, candidate: nn.Module, prompts: list[list[int]], new_tokens: int,
                     bos_id: int, mask_id: int, gmask_id: int) -> dict[str, float]:
    """Compare greedy decoding of `candidate` (e.g. quantized) with `reference` (e.g. fp32) on `prompts`.

    teacher_forced: fraction of steps where the candidate's next token equals the reference's, both fed
        the reference's tokens (agreement per token, without one early divergence deciding the rest);
    prefix: mean fraction of the free-running continuation identical to the reference's before the
        first difference; exact: fraction of prompts whose whole continuation is identical.
    """
    special = (bos_id, mask_id, gmask_id)
    forced_hits = prefix = exact = 0
    for prompt in prompts:
        ref = _greedy_tokens(reference, prompt, new_tokens, special)
        free = _greedy_tokens(candidate, prompt, new_tokens, special)
        forced = _greedy_tokens(candidate, prompt, new_tokens, special, forced=ref)
        forced_hits += sum(a == b for a, b in zip(forced, ref))
        common = next((i for i, (a, b) in enumerate(zip(free, ref)) if a != b), new_tokens)
        prefix += common / new_tokens
        exact += common == new_tokens
    n = len(prompts)
    return {"teacher_forced": forced_hits / (n * new_tokens), "prefix": prefix / n, "exact": exact / n}
