"""One quantized matrix at a time: route int-dot (int8 activations, glmpool/engine/int_dot.c) against the
bf16 routes (int8, int4: torch's weight-only kernels' bits, glmpool's kernels where they give them), on the
medium model's shapes, a lone row and a few rows.

    python bench/int_dot.py [--threads 1] [--rows 1,16] [--rounds 31]

Each call goes through QuantizedLinear.matmul as the model's does (route choice, conversions, scales and
bias included); the time is the median of --rounds calls, the two routes alternating. GB/s: the weight's
bytes per call's time. Not a test: no targets are asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from glmpool.engine.linear.quantized import QuantizedLinear, prepare

SHAPES = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096), (130528, 1024)]  # [out, in]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), median of {args.rounds} calls\n")
    print("| matrix | bits | rows | int-dot ms | bf16 route ms | speed-up | int-dot GB/s |")
    print("|---|---|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        for bits in (8, 4):
            torch.manual_seed(0)
            ours = QuantizedLinear.from_linear(torch.nn.Linear(in_features, out_features), bits)
            theirs = QuantizedLinear.from_linear(torch.nn.Linear(in_features, out_features), bits)
            prepare(ours, "int8")
            prepare(theirs, "bf16")
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, 1, in_features)  # rows sequences' decode steps
                new, old = [], []
                for _ in range(args.rounds + 1):
                    new.append(timed(lambda: ours(x)))
                    old.append(timed(lambda: theirs(x)))
                new_ms, old_ms = statistics.median(new[1:]) * 1e3, statistics.median(old[1:]) * 1e3
                gbs = ours.weight.numel() / new_ms / 1e6
                print(f"| {out_features}x{in_features} | {bits} | {rows} | {new_ms:.3f} | {old_ms:.3f} | "
                      f"{old_ms / new_ms:.2f}x | {gbs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
