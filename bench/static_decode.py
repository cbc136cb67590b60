"""The GPU path's generation (glmpool/engine/static_decode.py): checks that run anywhere, and the timing
of its decode step that bench/gpu.py runs on a GPU.

    python bench/static_decode.py --cpu-dry-run    # the checks on the tiny model's CPU tensors (JSON)
    python bench/gpu.py [--cpu-dry-run]            # runs them too, and times the step on a GPU

The checks (importable; tests/engine/test_static_decode.py runs each, and bench/gpu.py --cpu-dry-run):
- `check_fullgraph(batcher)`: every batch bucket's decode step is one graph, no break
  (torch._dynamo.explain on the eager step);
- `check_compiled_matches_eager(engine, backend)`: the same greedy tokens from compiled and eager steps;
- `check_host_syncs(engine)`: operators dispatched a step (TorchDispatchMode), and how many of them wait
  for the device: at most one;
- `check_mixed_lengths(engine)`: one sequence of 2,000 tokens among 63 of 100 against 64 of 100: the
  operators of a step, and the KV blocks its attention reads (from its block mask), each within 1.3x;
- `check_mixed_lengths_time()`: the same two batches' attention, compiled (inductor's C++ on the CPU),
  timed: mixed within 1.3x of uniform (and the span-bucket design it replaced, timed beside it);
- `check_prefill_burst(engine)`: a decoding stream gains a token every step while a burst of long and short
  prompts is prefilled, and no step does more than a chunk's worth of prompt work;
- `check_prefill_packing(engine)`: a burst of short prompts is prefilled in one pass: the operators of the
  step that prefills 8 stay under twice those of one;
- `check_inductor(engine)` (`--inductor`, minutes): inductor's generated code gives the eager tokens.
Each returns a dict of what it found and raises AssertionError where the property fails.

Timings: `time_decode(model, lengths, steps, compile)`, the median ms of a step of sequences holding
`lengths` tokens; `memory_bound_ms(model, lengths, GB/s)`, the step's bytes (weights + KV) over a
bandwidth; `time_mixed_attention(...)`, the decode attention alone for uniform and mixed lengths.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmpool.engine import SamplingParams, load  # noqa: E402
from glmpool.engine.static_decode import ATTENTION_BLOCK, StaticBatcher, attention_mask  # noqa: E402


# operators that make the host wait for the device: a scalar read, data-dependent shapes, a copy to the host
WAITING_OPERATORS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
                     "aten._unique2", "aten.equal", "aten.is_nonzero", "aten.item")
GREEDY = SamplingParams(do_sample=False, max_new_tokens=8)


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it, and those that wait for the device."""

    def __init__(self):
        super().__init__()
        self.operators = collections.Counter()
        self.waits = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.operators[name] += 1
        if name in WAITING_OPERATORS or copies_to_host(name, args, kwargs):
            self.waits[name] += 1
        return func(*args, **kwargs)


def copies_to_host(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether an operator copies a device's tensor to the host. With CPU tensors (the dry run), a copy to
    the CPU asked for explicitly (static_decode.read_back's copy=True) stands for it."""
    if name not in ("aten.to", "aten._to_copy"):
        return False
    device = kwargs.get("device") or next((a for a in args if isinstance(a, torch.device)), None)
    if device is None or torch.device(device).type != "cpu":
        return False
    copy = kwargs.get("copy") or (name == "aten.to" and len(args) > 4 and args[4] is True)
    return args[0].device.type != "cpu" or bool(copy)


def prompt(batcher: StaticBatcher, length: int, seed: int = 0) -> list[int]:
    """A prompt of `length` tokens ending as ChatGLM's do ([gMASK] <sop>), random text before."""
    tokenizer = batcher.tokenizer
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 200, (length - 2,), generator=generator).tolist()
    return text + [tokenizer.gmask_id, tokenizer.bos_id]


def run(batcher, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = GREEDY) -> dict:
    """Every prompt to the end (with its own params where a list is given), each admitted as soon as there is
    room; key -> its tokens."""
    every = params if isinstance(params, list) else [params] * len(prompts)
    waiting = list(enumerate(prompts))
    tokens = collections.defaultdict(list)
    while waiting or len(batcher):
        while waiting and batcher.has_room(len(waiting[0][1]), every[waiting[0][0]]):
            key, ids = waiting.pop(0)
            batcher.add_prompt(key, ids, every[key])
        for event in batcher.step():
            tokens[event.key].append(event.token_id)
    return dict(tokens)


def check_fullgraph(batcher: StaticBatcher) -> dict:
    """batcher: built with compile=False (its decode step is then the plain function)."""
    device, found = batcher.model.device, {}
    for rows in batcher.batch_buckets:
        inputs = torch.zeros(4, rows, dtype=torch.long, device=device)
        inputs[3] = batcher.cache.capacity
        with torch.inference_mode():
            explained = torch._dynamo.explain(batcher.decode)(inputs)
        found[rows] = explained.graph_break_count
        assert explained.graph_count == 1 and explained.graph_break_count == 0, \
            f"batch {rows}: {explained.graph_count} graphs, breaks: {explained.break_reasons}"
    return {"buckets": len(found), "graph_breaks": sum(found.values())}


def check_compiled_matches_eager(engine, backend: str = "aot_eager", max_batch: int = 2) -> dict:
    prompts = [prompt(engine.batcher(1, static=True, compile=False), n, seed) for seed, n in enumerate((9, 30, 5))]
    eager = run(engine.batcher(max_batch, static=True, compile=False), prompts)
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = run(engine.batcher(max_batch, static=True, compile=True, backend=backend), prompts)
    graphs = counters["stats"]["unique_graphs"] - graphs_before  # decode steps and samplers
    assert graphs > 0, "nothing was compiled"
    assert compiled == eager, f"compiled {compiled} != eager {eager}"
    return {"sequences": len(eager), "tokens": sum(map(len, eager.values())), "graphs": graphs}


def check_inductor(engine) -> dict:
    """Inductor's own code (C++ on the CPU, its FlexAttention kernel) for one bucket gives the eager step's
    greedy tokens, the second prompt's crossing a block of the attention. Minutes on 2 cores: not in the
    suite; `--cpu-dry-run --inductor`."""
    prompts = [prompt(engine.batcher(1, static=True, compile=False), n, 0) for n in (9, ATTENTION_BLOCK - 2)]
    eager = run(StaticBatcher(engine.model, engine.tokenizer, 1, compile=False, capacity=256), prompts)
    start = time.monotonic()
    compiled = run(StaticBatcher(engine.model, engine.tokenizer, 1, compile=True, capacity=256), prompts)
    assert compiled == eager, f"inductor {compiled} != eager {eager}"
    return {"tokens": sum(map(len, eager.values())), "seconds": round(time.monotonic() - start)}


def count_decode_step(engine, lengths: list[int], max_batch: int) -> tuple[OperatorCounter, int]:
    """The operators of one decode step (sampling and read-back included) of sequences holding `lengths`
    tokens, and the KV blocks its attention reads in each layer: those of the block mask
    (static_decode.attention_mask) of the lengths the step passes."""
    batcher = engine.batcher(max_batch, static=True, compile=False)
    occupy(batcher, lengths, 1, SamplingParams(do_sample=True, seed=3))
    passed = []
    decode = batcher.decode
    batcher.decode = lambda inputs, columns: passed.append(inputs[3]) or decode(inputs, columns)
    counter = OperatorCounter()
    with counter:
        batcher.step()
    return counter, blocks_read(attention_mask(passed[0], batcher.cache.capacity))


def blocks_read(mask) -> int:
    """The KV blocks a block mask makes the attention read, whole and partial, over its rows."""
    return int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())


def check_host_syncs(engine) -> dict:
    counter, _ = count_decode_step(engine, [12, 40, 7], max_batch=4)
    waits = sum(counter.waits.values())
    assert waits <= 1, f"{waits} host synchronisations in a decode step: {dict(counter.waits)}"
    return {"operators": sum(counter.operators.values()), "host_syncs": waits}


def check_mixed_lengths(engine, batch: int = 64, short: int = 100, long: int = 2000) -> dict:
    """One long sequence among short ones against all short (the issue's case: one of 2,000 among 63 of
    100): a step's operators (the same: fixed shapes) and the KV blocks its attention reads (following the
    lengths), each within 1.3x. The engine's window must hold `long` tokens."""
    uniform, uniform_blocks = count_decode_step(engine, [short] * batch, batch)
    mixed, mixed_blocks = count_decode_step(engine, [long] + [short] * (batch - 1), batch)
    uniform, mixed = sum(uniform.operators.values()), sum(mixed.operators.values())
    assert mixed <= 1.3 * uniform, f"mixed lengths: {mixed} operators a step, uniform {uniform}"
    assert mixed_blocks <= 1.3 * uniform_blocks, \
        f"mixed lengths: {mixed_blocks} KV blocks read, uniform {uniform_blocks}"
    return {"uniform_operators": uniform, "mixed_operators": mixed, "operator_ratio": round(mixed / uniform, 3),
            "uniform_blocks": uniform_blocks, "mixed_blocks": mixed_blocks,
            "block_ratio": round(mixed_blocks / uniform_blocks, 3)}


def prefill_step_operators(engine, prompts: list[list[int]]) -> int:
    """The operators of the step that prefills `prompts` (sampling their first tokens and read-back included);
    it waits for the device once."""
    batcher = StaticBatcher(engine.model, engine.tokenizer, len(prompts), compile=False)
    for key, ids in enumerate(prompts):
        batcher.add_prompt(key, ids, GREEDY)
    counter = OperatorCounter()
    with counter:
        events = batcher.step()
    assert len(events) == len(prompts), f"{len(events)} of {len(prompts)} prompts prefilled in a step"
    assert sum(counter.waits.values()) <= 1, f"a prefill step waits for the device: {dict(counter.waits)}"
    return sum(counter.operators.values())


def check_prefill_packing(engine, prompts: int = 8, prompt_tokens: int = 12) -> dict:
    """A burst of short prompts that fit in a chunk together is prefilled in one pass: the step costs less
    than twice the operators of one prompt's (one prompt at a time would cost `prompts` times)."""
    batcher = StaticBatcher(engine.model, engine.tokenizer, 1, compile=False)
    burst = [prompt(batcher, prompt_tokens, seed) for seed in range(prompts)]
    one, many = prefill_step_operators(engine, burst[:1]), prefill_step_operators(engine, burst)
    assert many < 2 * one, f"{prompts} short prompts: {many} operators, one alone {one}"
    return {"operators_one_prompt": one, f"operators_{prompts}_prompts": many, "ratio": round(many / one, 2)}


def check_prefill_burst(engine, chunk: int = 16, prompts: int = 3, prompt_tokens: int = 80) -> dict:
    """A stream decodes; then long prompts arrive at once, each followed by two short ones (prefilled
    together). Each step must still give the stream its token and do at most `chunk` tokens' worth of prompt
    work."""
    batcher = StaticBatcher(engine.model, engine.tokenizer, 3 * prompts + 1, compile=False, prefill_chunk=chunk)
    batcher.add_prompt("stream", prompt(batcher, 6), SamplingParams(do_sample=False, max_new_tokens=200))
    batcher.step()
    short = max(3, chunk // 3)
    for i in range(prompts):
        for key, length in ((i, prompt_tokens), (f"{i}a", short), (f"{i}b", short)):
            batcher.add_prompt(key, prompt(batcher, length, i + 1), SamplingParams(do_sample=False, max_new_tokens=2))
    budget = 4 * chunk * engine.config.num_layers
    steps = most = 0
    while batcher.pending or batcher.prefilling:
        events = batcher.step()
        steps += 1
        most = max(most, batcher.stats.prefill_cost)
        assert any(e.key == "stream" for e in events), f"step {steps}: the decoding stream got no token"
        assert batcher.stats.prefill_cost <= budget, f"step {steps}: {batcher.stats.prefill_cost} > budget {budget}"
    assert steps >= prompts * prompt_tokens // chunk, f"{prompts} prompts of {prompt_tokens} in {steps} steps"
    return {"steps_with_prompts": steps, "largest_step_work": most, "budget": budget}


def check_mixed_lengths_time(device: str = "cpu", **shape) -> dict:
    """time_mixed_attention's ratio of mixed to uniform lengths within 1.3x (a timing: on a busy machine
    compare it with the span-bucket design's ratio measured beside it)."""
    found = time_mixed_attention(device=device, **shape)
    assert found["ratio"] <= 1.3, f"mixed lengths take {found['ratio']}x the time of uniform ones: {found}"
    return found


def dry_run(model_dir: str | None = None, inductor: bool = False) -> dict:
    """Every check on the tiny model's CPU tensors (with `inductor`, check_inductor too)."""
    if model_dir is None:
        from glmpool.engine.tiny import cached_tiny_checkpoint
        model_dir = cached_tiny_checkpoint(Path(tempfile.gettempdir()) / "glmpool-gpucheck")  # as bench/gpu.py's
    engine = load(model_dir, progress=False)
    found = {
        "fullgraph": check_fullgraph(engine.batcher(4, static=True, compile=False)),
        "compiled_matches_eager": check_compiled_matches_eager(engine),
        "host_syncs": check_host_syncs(engine),
        "mixed_lengths": check_mixed_lengths(engine),
        "mixed_lengths_time": check_mixed_lengths_time(heads=8),  # a quarter of ChatGLM-6B's: the CPU's memory
        "prefill_burst": check_prefill_burst(engine),
        "prefill_packing": check_prefill_packing(engine),
    }
    if inductor:
        found["inductor"] = check_inductor(engine)
    return found


# --- timings (bench/gpu.py runs them on its random ChatGLM-6B) ---

def occupy(batcher: StaticBatcher, lengths: list[int], steps: int,
           params: SamplingParams = SamplingParams(do_sample=False)) -> None:
    """Running sequences holding `lengths` tokens each (their cache as it is: counts and timings only),
    drawing by `params`, with room for `steps` more."""
    config = batcher.model.config
    for key, length in enumerate(lengths):
        room = dataclasses.replace(params, max_length=min(batcher.cache.capacity, length + steps + 8))
        batcher.add_prompt(key, [config.gmask_token_id, config.bos_token_id], room)
        sequence = batcher.pending.pop(key)
        batcher._attach([sequence])
        sequence.cache.length = length
        sequence.prompt = [config.gmask_token_id] * (length - 1) + [config.bos_token_id]
        sequence.context_length = sequence.mask_position = length - 1
        sequence.generated = [5]
        batcher.running[key] = sequence


def memory_bound_ms(model, lengths: list[int], gigabytes_per_second: float) -> float:
    """A decode step's bytes (every weight once, and each sequence's KV cache) over the bandwidth."""
    c = model.config
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    kv = sum(lengths) * c.num_layers * 2 * c.hidden_size * torch.finfo(model.dtype).bits // 8
    return (weights + kv) / (gigabytes_per_second * 1e6)


def time_decode(model, lengths: list[int], steps: int, compile: bool) -> dict:
    """Median ms of a StaticBatcher step (sampling and read-back included) of sequences at `lengths`,
    after compiling (and recording) the buckets it meets; the compile seconds."""
    from types import SimpleNamespace
    c = model.config
    tokenizer = SimpleNamespace(bos_id=c.bos_token_id, mask_id=c.mask_token_id, gmask_id=c.gmask_token_id)
    batcher = StaticBatcher(model, tokenizer, len(lengths), compile=compile, capacity=max(lengths) + steps + 8)
    compile_seconds = batcher.warm_up([batcher.batch_buckets[-1]])
    occupy(batcher, lengths, steps)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batcher.step()  # ends reading its tokens back: the device is done
        times.append(time.perf_counter() - start)
    del batcher
    torch._dynamo.reset()  # the compiled step and its CUDA graphs let go of this case's KV cache
    return {"ms": 1e3 * statistics.median(times), "compile_seconds": compile_seconds}


def time_mixed_attention(batch: int = 64, short: int = 100, long: int = 2000, capacity: int = 2048, heads: int = 32,
                         head_dim: int = 128, rounds: int = 7, device: str = "cpu") -> dict:
    """The decode step's attention alone (attention_mask and flex_attention, as decode_logits runs them;
    ChatGLM-6B's heads by default), compiled (inductor: C++ on the CPU in fp32, Triton on a GPU in fp16 and
    CUDA graphs), one query a row over a cache of `capacity` columns: the median ms of a call for uniform
    rows (all `short`) and mixed ones (one `long`), interleaved round by round in one process, and the
    median of the per-round ratios. Beside it, the design it replaced: a masked
    scaled_dot_product_attention over the span bucket of the longest row (the capacity / 8, / 4, / 2, / 1)."""
    cuda = torch.device(device).type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator, device=device).to(dtype)
    keys, values = (torch.randn(batch, heads, capacity + 1, head_dim, generator=generator, device=device).to(dtype)
                    for _ in range(2))
    attention = torch.compile(lambda q, k, v, write_at: flex_attention(
        q, k, v, block_mask=attention_mask(write_at, capacity), scale=2.0), fullgraph=True, dynamic=False,
        mode="reduce-overhead" if cuda else None)

    def sparse(write_at):
        def run():
            if cuda:  # each call a new step of the CUDA graph trees: the last output may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return attention(q, keys, values, write_at)
        return run

    def spans(write_at):
        span = min(s for s in (capacity // d for d in (8, 4, 2, 1)) if s > int(write_at.max()))
        mask = (torch.arange(span, device=device) <= write_at[:, None])[:, None, None, :]
        return lambda: F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=mask,
                                                      scale=2.0)
    cases = {"uniform": [short] * batch, "mixed": [long] + [short] * (batch - 1)}
    runs = {}
    for name, lengths in cases.items():
        write_at = torch.tensor(lengths, device=device)
        runs[name] = sparse(write_at)
        runs[f"{name}, span buckets"] = spans(write_at)
    with torch.inference_mode():
        started = time.monotonic()
        for run in runs.values():
            for _ in range(3):  # CUDA graphs are recorded on a later call
                run()
        compile_seconds = time.monotonic() - started
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(milliseconds(run, device, inner=5))
    found = {name: round(statistics.median(ms), 3) for name, ms in times.items()}
    for design in ("", ", span buckets"):
        ratios = [m / u for m, u in zip(times[f"mixed{design}"], times[f"uniform{design}"])]
        found[f"ratio{design}"] = round(statistics.median(ratios), 2)
    found["compile_seconds"] = round(compile_seconds)
    return found


def milliseconds(run, device: str, inner: int) -> float:
    """Mean ms of `inner` calls of run(), the device's queue drained before and after."""
    drain = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda device: None
    drain(device)
    start = time.perf_counter()
    for _ in range(inner):
        run()
    drain(device)
    return (time.perf_counter() - start) / inner * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the checks on CPU tensors")
    parser.add_argument("--model", help="checkpoint directory for the checks (default: a tiny random one)")
    parser.add_argument("--inductor", action="store_true", help="also compile one bucket with inductor (minutes)")
    args = parser.parse_args()
    if not args.cpu_dry_run:
        sys.exit("the timings are in bench/gpu.py; here: --cpu-dry-run")
    print(json.dumps(dry_run(args.model, args.inductor), indent=2))


if __name__ == "__main__":
    main()
