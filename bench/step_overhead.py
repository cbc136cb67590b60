"""What a batch-1 CPU decode step costs besides its matrix products: torch operators per step, and the
step's CPU time with every product replaced by zero-filling its output (so only the rest is timed).

    python bench/step_overhead.py [--variants fp16,onednn] [--steps 64] [--rounds 10] [--threads 1]
                                  [--model DIR]

The medium model (bench/harness.py). Each round prefills a 36-token prompt and times `--steps` greedy
steps one by one by the main thread's CPU time (time.thread_time: a busy machine inflates it far less than
wall time); printed: the 10th percentile and the median over all rounds' steps. With `--threads 1` no
parallel region waits for a thread another process holds. The operators are counted by torch's profiler
over 20 steps: top-level ones (called from Python) and all (with those they call). Not a test.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import random
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from glmpool.engine import SamplingParams, load, row_kernel
from harness import ROOT, medium_checkpoint

FLOAT_PRODUCTS = ("glmpool_rows_times_half", "glmpool_rows_times_half_avx2", "glmpool_rows_times_packed",
                  "glmpool_rows_times_packed_avx2")  # (weight, x, bias, y, rows, out, ...): y fp32
BF16_PRODUCTS = ("glmpool_rows_times_int8", "glmpool_rows_times_int4_bf16")  # (weight, x, y, scratch, rows, out, ...)


def load_variant(model_dir: Path, name: str):
    if name.startswith("int"):
        return load(model_dir, quantize=name.removeprefix("int"), matmul="fp16", progress=False)
    return load(model_dir, dtype=None if name == "fp16" else "float32", matmul=name, progress=False)


def new_step_source(engine, prompt: list[int]):
    batcher = engine.batcher(max_batch=1)
    batcher.add_prompt(0, prompt, SamplingParams(do_sample=False, max_new_tokens=10 ** 6, max_length=2048))
    batcher.step()
    return batcher


def operator_counts(engine, prompt: list[int], steps: int = 20) -> tuple[float, float, list[tuple[str, float]]]:
    batcher = new_step_source(engine, prompt)
    for _ in range(3):
        batcher.step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            batcher.step()
    top, every = collections.Counter(), collections.Counter()
    for event in profiler.events():
        if event.name.startswith("aten::"):
            every[event.name] += 1
            if event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"):
                top[event.name.removeprefix("aten::")] += 1
    return sum(top.values()) / steps, sum(every.values()) / steps, [(k, v / steps) for k, v in top.most_common(12)]


def stub_products() -> None:
    """Every product only zero-fills its output (same shapes, finite logits: the rest of the step unchanged)."""
    kernels = row_kernel.library()
    for name in FLOAT_PRODUCTS:
        setattr(kernels, name, lambda *a: ctypes.memset(a[3], 0, a[4] * a[5] * 4))
    for name in BF16_PRODUCTS:
        setattr(kernels, name, lambda *a: ctypes.memset(a[2], 0, a[4] * a[5] * 2))


def step_cpu_times(engine, prompt: list[int], steps: int, rounds: int) -> list[float]:
    times = []
    for round_ in range(rounds + 1):  # the first warms up
        batcher = new_step_source(engine, prompt)
        for _ in range(steps):
            start = time.thread_time()
            batcher.step()
            if round_:
                times.append(time.thread_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp16,onednn")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or medium_checkpoint(ROOT / ".cache")
    rng = random.Random(0)
    engines = {name: load_variant(model_dir, name) for name in args.variants.split(",")}
    prompt = [rng.randrange(6, 1000) for _ in range(34)]
    prompt += [next(iter(engines.values())).config.gmask_token_id, next(iter(engines.values())).config.bos_token_id]
    counts = {name: operator_counts(engine, prompt) for name, engine in engines.items()}
    stub_products()
    for name, engine in engines.items():
        times = sorted(step_cpu_times(engine, prompt, args.steps, args.rounds))
        top, every, most = counts[name]
        print(f"{name}: {top:.0f} top-level aten operators a step ({every:.0f} in all), "
              f"outside the products {times[len(times) // 10] * 1e3:.2f} ms CPU a step "
              f"(median {statistics.median(times) * 1e3:.2f}; {args.threads} thread(s))")
        print("    most called: " + ", ".join(f"{k} {v:g}" for k, v in most))


if __name__ == "__main__":
    main()
