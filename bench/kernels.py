"""Micro-benchmark of the quantized matmul paths against fp32, per matrix shape and input rows M.

    python bench/kernels.py [--shapes 3072x1024,1024x4096,...] [--rows 1,4,16,32,64] [--rounds 9]

The variants run interleaved (round-robin, several rounds) so a noisy neighbour slows them alike;
the table gives each variant's speed relative to fp32 in the same run (min over rounds, and median),
which is how the kernels compare with dequantize + GEMM as rows grow (glmpool/engine/linear/quantized.py uses the
kernels for one row per sequence at any count and dequantize + GEMM for prompts, so that batching does
not change results).
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from glmpool.engine.linear.quantized import QuantizedLinear
from harness import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="3072x1024,1024x1024,4096x1024,1024x4096,130528x1024",
                        help="NxK (out x in) matrices; the defaults are the medium bench model's")
    parser.add_argument("--rows", default="1,4,16,32,64")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; speed relative to fp32 "
          f"(min-time ratio / median-time ratio)\n")
    print("| N x K | M | fp32 ms | int8 kernel | int8 dequant | int4 kernel | int4 dequant |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        linear = torch.nn.Linear(K, N)
        q8 = QuantizedLinear.from_linear(linear, 8)
        q4 = QuantizedLinear.from_linear(linear, 4)
        weight, bias = linear.weight.detach(), linear.bias.detach()
        for M in map(int, args.rows.split(",")):
            x = torch.randn(M, K)
            fns = {"fp32": (lambda: F.linear(x, weight, bias)) if M == 1
                   else (lambda: (weight @ x.t()).t() + bias) if M <= 16 else (lambda: F.linear(x, weight, bias)),
                   "i8k": lambda: q8.matmul(x, q8.bias, path="int8"),
                   "i8d": lambda: q8.matmul(x, q8.bias, path="dequant"),
                   "i4k": lambda: q4.matmul(x, q4.bias, path="int4"),
                   "i4d": lambda: q4.matmul(x, q4.bias, path="dequant")}
            big = N * K > 50e6
            with torch.no_grad():
                t = interleaved(fns, max(3, args.rounds // 3) if big else args.rounds, 1 if big else 3)
            base_min, base_med = min(t["fp32"]), statistics.median(t["fp32"])
            cells = [f"{base_min / min(v):.2f} / {base_med / statistics.median(v):.2f}"
                     for k, v in t.items() if k != "fp32"]
            print(f"| {N}x{K} | {M} | {base_min * 1e3:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
