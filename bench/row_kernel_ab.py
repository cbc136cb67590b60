"""A/B of two builds of glmpool's kernel library (glmpool/engine/_kernels*.so) on one row, the decode step's
case: the variant this CPU runs of the int8, int4 and fp16-weight kernels, on the medium model's matrices,
both builds in the same process, interleaved over rounds; checks that both give the same bits.

    python setup.py build_ext --inplace && cp glmpool/engine/_kernels*.so /tmp/new.so   # and likewise /tmp/old.so
    python bench/row_kernel_ab.py /tmp/old.so /tmp/new.so [--kernels int4,int8,fp16] [--rounds 15] [--old-float-io]

Prints per kernel and shape: the weight GB/s each build streams (median over rounds) and new / old, the
median of the per-round ratios. One thread by default, timed by its CPU time (time.thread_time): on a
shared, loaded machine wall time mostly measures the scheduler; CPU time still counts stalls on memory.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from glmpool.engine import row_kernel

SHAPES = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096), (130528, 1024)]  # the medium model's (out, in)


def load(path: str, float_io: bool = False) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.float_io = float_io
    for entry in (lib.glmpool_rows_times_packed_avx2, lib.glmpool_rows_times_half_avx2, lib.glmpool_row_times_int4,
                  lib.glmpool_rows_times_packed, lib.glmpool_rows_times_half):
        entry.restype = None
        entry.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    lib.glmpool_rows_times_int8.restype = None
    lib.glmpool_rows_times_int8.argtypes = [ctypes.c_void_p] * (3 if float_io else 4) + [ctypes.c_int64] * 3 + [
        ctypes.c_int]
    if not float_io:
        lib.glmpool_rows_times_int4_bf16.restype = None
        lib.glmpool_rows_times_int4_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def calls(kernel: str, out_features: int, in_features: int, wide: bool):
    """(weight bytes, x, y, call(lib)) for one row on this kernel's layout."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_features, generator=generator).bfloat16().float()
    if kernel == "int8":  # as row_kernel.int8_times calls it, the conversions from and to bf16 included
        w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
        x16, y = x.bfloat16(), torch.empty(1, out_features, dtype=torch.bfloat16)
        lanes = 16 if wide else 8

        def call(lib):
            if lib.float_io:  # builds before bf16 in and out
                x32, y32 = x16.float(), torch.empty(1, out_features)
                lib.glmpool_rows_times_int8(w.data_ptr(), x32.data_ptr(), y32.data_ptr(), 1, out_features,
                                            in_features, lanes)
                y.copy_(y32.to(torch.bfloat16))
            else:
                scratch = torch.empty(in_features + out_features)
                lib.glmpool_rows_times_int8(w.data_ptr(), x16.data_ptr(), y.data_ptr(), scratch.data_ptr(), 1,
                                            out_features, in_features, lanes)
        return w.numel(), x, y, call
    if kernel == "int4":  # likewise
        q = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, generator=generator)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        x16, y = x.bfloat16(), torch.empty(1, out_features, dtype=torch.bfloat16)

        def call(lib):
            if lib.float_io:
                x32, y32 = x16.float(), torch.empty(1, out_features)
                getattr(lib, "glmpool_rows_times_int4" if wide else "glmpool_row_times_int4")(
                    w.data_ptr(), x32.data_ptr(), None, y32.data_ptr(), 1, out_features, in_features, in_features)
                y.copy_(y32.to(torch.bfloat16))
            else:
                scratch = torch.empty(in_features + out_features)
                lib.glmpool_rows_times_int4_bf16(w.data_ptr(), x16.data_ptr(), y.data_ptr(), scratch.data_ptr(), 1,
                                                 out_features, in_features, wide)
        return w.numel() * w.element_size(), x, y, call
    if kernel == "fp16":
        w = row_kernel.pack_half(torch.randn(out_features, in_features, generator=generator).half())
        y = torch.empty(1, w.shape[0] * 64)
        entry = "glmpool_rows_times_half" if wide else "glmpool_rows_times_half_avx2"
        return w.numel() * 2, x, y, lambda lib: getattr(lib, entry)(
            w.data_ptr(), x.data_ptr(), None, y.data_ptr(), 1, out_features, in_features, row_kernel.HALF_CHUNK)
    raise SystemExit(f"unknown kernel {kernel}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--kernels", default="int4,int8,fp16")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--old-float-io", action="store_true",
                        help="OLD's int8 and int4 take and give fp32 (builds before bf16 in and out)")
    parser.add_argument("--threads", type=int, default=1, help="more than 1: timed by wall time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    libs = {"old": load(args.old, args.old_float_io), "new": load(args.new)}
    wide = row_kernel.library().isa == 512 and row_kernel.torch_isa() == 512
    print(f"{'AVX-512' if wide else 'AVX2'} variants, {args.threads} thread(s), {args.rounds} rounds\n")
    print("| kernel | out x in | old GB/s | new GB/s | new / old (per round, median) | same bits |")
    print("|---|---|---|---|---|---|")
    for kernel in args.kernels.split(","):
        for shape in args.shapes.split(","):
            out_features, in_features = map(int, shape.split("x"))
            nbytes, x, y, call = calls(kernel, out_features, in_features, wide)
            results, speeds = {}, {name: [] for name in libs}
            for name, lib in libs.items():
                call(lib)
                results[name] = y.clone()
            for _ in range(args.rounds):
                for name, lib in libs.items():
                    start = clock()
                    call(lib)
                    speeds[name].append(nbytes / (clock() - start) / 1e9)
            ratio = statistics.median(n / o for n, o in zip(speeds["new"], speeds["old"]))
            same = torch.equal(results["old"], results["new"])
            print(f"| {kernel} | {shape} | {statistics.median(speeds['old']):.1f} | "
                  f"{statistics.median(speeds['new']):.1f} | {ratio:.2f} | {'yes' if same else '**no**'} |",
                  flush=True)


if __name__ == "__main__":
    main()
