"""The GPU path in one command, with no checkpoint and no network.

    python bench/gpu.py                 # on a GPU machine: minutes (a compile per decode case)
    python bench/gpu.py --cpu-dry-run   # anywhere: every GPU-only branch on CPU tensors, ok/FAIL per check

On a GPU it prints: the device; each linear method's availability here; each method's error against fp32
and its time at 1, 16 and 64 input rows on ChatGLM-6B's matrix shapes, fed activations with ChatGLM-like
outliers (|x| up to 1000); then a full-size ChatGLM-6B with random weights, in fp16 and in int4, as
load() sets it up on a GPU: memory after load, the KV-cache budget, and ms per decode step and tokens/s at
batch 1, 16 and 64 with 1,000 tokens of context each, batch 64 with lengths spread from 500 to 1,500 (the
same mean), batch 64 of 100 and one of 1,536 among 63 of 100, through the model's forward and through the
GPU path's compiled step (engine/static_decode.py, beside its memory bound: weights + KV read a step),
with the mixed batches' time over the uniform ones'; and the compiled step's attention alone for the
last two batches (bench/static_decode.py's time_mixed_attention).

--cpu-dry-run runs the engine's checks (glmpool.engine.gpucheck: the quantized CUDA routes through the
CPU implementations of their operators, the cpm_kernels route compiled and emulated, the fp16 GPU
numerics against fp32), this script's own GPU run at toy size on the CPU, the static decode step's
checks (bench/static_decode.py: one graph per bucket, compiled == eager, one host wait a step, mixed
lengths against uniform ones, chunked prefill, short prompts in one pass), and the pool's
(glmpool.gpucheck: device mapping under a parent CUDA_VISIBLE_DEVICES, a worker surviving an
out-of-memory step, the KV budget split between workers sharing a GPU). Exit status 1 if any fails.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glmpool.engine.api import Engine  # noqa: E402
from glmpool.engine.linear import cpm  # noqa: E402
from glmpool.engine.linear import registry  # noqa: E402
from glmpool.engine.linear.base import method_class, probe_activations  # noqa: E402
from glmpool.engine.linear.quantized import QuantizedLinear, prepare, quantize_model  # noqa: E402
from glmpool.engine.linear.thudm import quantize_weight  # noqa: E402
from glmpool.engine.config import ModelConfig  # noqa: E402
from glmpool.engine.model import ChatGLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import static_decode  # noqa: E402  (bench/static_decode.py: the GPU path's checks and timing)

CHATGLM_SHAPES = {  # N x K of each matrix a token passes through (the last: the tied output projection)
    "query_key_value": (12288, 4096), "attention.dense": (4096, 4096), "dense_h_to_4h": (16384, 4096),
    "dense_4h_to_h": (4096, 16384), "output (vocab)": (130528, 4096)}
ROWS = (1, 16, 64)
BATCHES = (1, 16, 64)
# tokens already in each sequence's cache, the mixed batches' too (a long one of 2,000 would need more KV
# cache at batch 64 than the budget beside fp16 weights on an 80 GB card)
CONTEXT, SHORT, LONG = 1000, 100, 1536


@dataclasses.dataclass
class Options:
    device: torch.device
    shapes: dict[str, tuple[int, int]]
    rows: tuple[int, ...]
    config: ModelConfig
    batches: tuple[int, ...]
    context: int
    short: int
    long: int
    steps: int  # decode steps timed per case
    repeats: int = 5  # timings per measurement (their median)
    bandwidth_gbs: float = 3350.0  # the memory bound's bandwidth (H100 SXM's HBM3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def milliseconds(run, device: torch.device, repeats: int = 5, inner: int = 5) -> float:
    """Median over `repeats` of the mean time of `inner` calls of run()."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            run()
        synchronize(device)
        times.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(times)


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device} (dry run at toy size), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name}, sm{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


# --------------------------------------------------------------------------------------------------
# Linear methods
# --------------------------------------------------------------------------------------------------

def random_weight(N: int, K: int, generator: torch.Generator) -> torch.Tensor:
    """fp32 [N, K] like ChatGLM-6B's, on the generator's device: std 0.02, clipped at 0.1."""
    return (torch.randn(N, K, generator=generator, device=generator.device) * 0.02).clamp_(-0.1, 0.1)


def quantized(weight: torch.Tensor, bits: int) -> QuantizedLinear:
    module = QuantizedLinear(weight.shape[1], weight.shape[0], bits, bias=False, device=weight.device)
    module.set_quantized(*quantize_weight(weight, bits))
    return module


def methods_for(weight: torch.Tensor, device: torch.device) -> dict[str, tuple[object, callable]]:
    """name -> (reference fp32 weight [N, K], x -> x @ W^T) for every method that can run here."""
    w16 = weight.half()
    q8, q4, q4_tinygemm = quantized(weight, 8), quantized(weight, 4), quantized(weight, 4)
    w8, w4 = q8.dequantize(), q4.dequantize()  # what each quantized method should multiply by, in fp32
    cuda = device.type == "cuda"
    out = {"fp16 (F.linear)": (w16.float(), lambda x: F.linear(x, w16))}
    if not cuda or hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        out["int8-cuda"] = (w8, lambda x: q8.matmul(x, path="int8-cuda"))
    out["int8 dequant"] = (w8, lambda x: q8.matmul(x, path="dequant"))
    laid_out = False
    if cuda:
        try:
            laid_out = q4_tinygemm.to_cuda_int4_layout()
        except (RuntimeError, NotImplementedError):
            pass
    if laid_out:
        out["int4-cuda"] = (w4, lambda x: q4_tinygemm.matmul(x, path="int4-cuda"))
    out["int4 dequant"] = (w4, lambda x: q4.matmul(x, path="dequant"))
    product = cpm.matmul if cuda else cpm.emulate
    if weight.shape[1] % cpm.K_MULTIPLE == 0:
        out["cpm int8"] = (w8, lambda x: product(q8.weight, q8.weight_scale, 8, x))
        out["cpm int4"] = (w4, lambda x: product(q4.weight, q4.weight_scale, 4, x))
    return out


def availability(device: torch.device) -> list[str]:
    """Every registered linear method: whether it says it runs here for fp16 activations (the GPU default),
    and on a GPU whether the cpm_kernels route's kernels work here even where they are not chosen."""
    lines = [f"{m.name}: {'usable' if method_class(m.name).usable(device, torch.float16) else 'not here'}"
             for m in registry.METHODS]
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        try:
            for bits in (8, 4):
                weight, scale = quantize_weight(torch.randn(72, 256) * 0.05, bits)
                cpm.check_on_device(weight.to(device), scale.to(device), bits)
            works = "compile, load and multiply right"
        except Exception as error:  # noqa: BLE001 -- reported
            works = f"FAIL: {type(error).__name__}: {error}"
        lines.append(f"cpm-cuda's kernels on sm{capability[0]}{capability[1]}: {works} "
                     f"({'chosen' if cpm.wanted(capability) else 'not chosen'} here)")
    return lines


def method_table(options: Options) -> list[str]:
    device = options.device
    generator, inputs = torch.Generator(device).manual_seed(0), torch.Generator().manual_seed(0)
    lines = ["| matrix (N x K) | method | " + " | ".join(f"{m} rows: err, ms" for m in options.rows) + " |",
             "|---|---|" + "---|" * len(options.rows)]
    for name, (N, K) in options.shapes.items():
        weight = random_weight(N, K, generator)
        for method, (reference, product) in methods_for(weight, device).items():
            cells = []
            for rows in options.rows:
                x = probe_activations(rows, K, inputs).to(device)
                want = x @ reference.t()
                x16 = x.half()
                try:
                    got = product(x16)
                    error = float((got.float() - want).abs().max() / want.abs().max())
                    finite = bool(torch.isfinite(got).all())
                    ms = milliseconds(lambda: product(x16), device, options.repeats, options.repeats)
                    cells.append(f"{error:.2%}{'' if finite else ' NOT FINITE'}, {ms:.3f}")
                except Exception as error:  # noqa: BLE001 -- one failing method must not end the run
                    cells.append(f"FAILED: {type(error).__name__}: {str(error)[:80]}")
            lines.append(f"| {name} ({N} x {K}) | {method} | " + " | ".join(cells) + " |")
            del reference, product
        del weight
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


# --------------------------------------------------------------------------------------------------
# A whole model with random weights
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def random_model(config: ModelConfig, device: torch.device, bits: int | None) -> ChatGLM:
    """ChatGLM with random weights made on the device in fp16 (int4: THUDM's format, weights std ~0.02),
    prepared as load() prepares a GPU model."""
    with torch.device("meta"):
        net = ChatGLM(config)
    net = net.half()
    if bits:
        quantize_model(net, bits, empty=True)
    net = net.to_empty(device=device)
    net._rotary = None
    generator = torch.Generator(device=device).manual_seed(0)
    qmax = 2 ** (bits - 1) - 1 if bits else 0
    for name, tensor in (*net.named_parameters(), *net.named_buffers()):
        if name.endswith("weight_scale"):
            tensor.fill_(0.02 / (qmax / math.sqrt(3)))  # uniform q in [-qmax, qmax]: std qmax / sqrt(3)
        elif tensor.dtype == torch.int8:
            # int8: q in [-128, 127]; int4: every byte is two valid nibbles
            tensor.copy_(torch.randint(-128, 128, tensor.shape, generator=generator, device=device,
                                       dtype=torch.int8))
        elif "layernorm" in name:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            tensor.normal_(0, 0.02, generator=generator)
    prepare(net)
    net.use_fp32_pointwise()  # what load() does for fp16 on a GPU
    return net.eval().requires_grad_(False)


@torch.no_grad()
def decode_ms(net: ChatGLM, lengths: list[int], steps: int, repeats: int) -> tuple[float, bool]:
    """ms per decode step of len(lengths) sequences holding `lengths` tokens each, through one KV slab (as
    the Batcher decodes off the CPU); and whether every logit stayed finite."""
    device, B = net.device, len(lengths)
    slab = net.new_slab()
    slab.fit(B, max(lengths) + steps + 8, max(lengths) + steps + 8)
    caches = [slab.attach() for _ in lengths]
    for cache, length in zip(caches, lengths):
        cache.length = length
    tokens = torch.randint(0, min(20000, net.config.vocab_size), (B, 1), device=device)
    finite = True

    def step() -> None:
        nonlocal finite
        positions = torch.tensor([[[min(c.length, 2000)], [2]] for c in caches], device=device)
        logits = net(tokens, positions, caches)
        finite = finite and bool(torch.isfinite(logits).all())

    ms = milliseconds(step, device, repeats, max(1, steps // repeats))
    for cache in caches:
        slab.detach(cache)
    return ms, finite


def decode_cases(options: Options) -> list[tuple[str, list[int]]]:
    """(name, tokens in each sequence's cache) of each batch measured: `batches` at `context` each; the
    largest batch spread from context / 2 to 3 context / 2; the largest batch at `short`, and one `long`
    among the others at `short`."""
    top = max(options.batches)
    spread = [options.context // 2 + options.context * i // (top - 1) for i in range(top)]
    return [*((f"batch {b}", [options.context] * b) for b in options.batches),
            (f"batch {top} mixed, {spread[0]} to {spread[-1]}", spread),
            (f"batch {top} of {options.short}", [options.short] * top),
            (f"1 of {options.long} among {top - 1} of {options.short}", [options.long] + [options.short] * (top - 1))]


def mixed_and_uniform(options: Options) -> list[tuple[str, str]]:
    """The mixed batches of decode_cases, each with the uniform one it is compared with."""
    names = [name for name, _ in decode_cases(options)]
    return [(names[-3], names[-4]), (names[-1], names[-2])]


def model_report(options: Options, bits: int | None) -> list[str]:
    device = options.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    net = random_model(options.config, device, bits)
    engine = Engine(net, tokenizer=None, name="random")
    label = f"int{bits}" if bits else "fp16"
    lines = [f"{label}: built in {time.perf_counter() - started:.0f} s"]
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        lines.append(f"  memory after load {allocated / 2**30:.2f} GiB allocated, peak "
                     f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB, "
                     f"free {torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB")
    budget = engine.default_kv_tokens()
    lines.append(f"  KV budget {budget} tokens ({engine.kv_bytes_per_token() / 1024:.0f} KiB per token)")
    static_ms = {}
    for name, lengths in decode_cases(options):
        needed = len(lengths) * (max(lengths) + options.steps + 64)
        if needed > budget:
            lines.append(f"  {name}: skipped, needs {needed} KV tokens")
            continue
        try:
            ms, finite = decode_ms(net, lengths, options.steps, min(3, options.repeats))
        except Exception as error:  # noqa: BLE001 -- reported, and the run goes on
            lines.append(f"  {name}: FAILED: {type(error).__name__}: {str(error)[:200]}")
            continue
        lines.append(f"  {name}: {ms:.2f} ms per step, {len(lengths) * 1e3 / ms:.0f} tokens/s"
                     + ("" if finite else ", LOGITS NOT FINITE"))
        # the GPU path's step (engine/static_decode.py): compiled into CUDA graphs on a GPU, eager in the dry run
        static = static_decode.time_decode(net, lengths, options.steps, compile=device.type == "cuda")
        bound = static_decode.memory_bound_ms(net, lengths, options.bandwidth_gbs)
        lines.append(f"  {name}, static step: {static['ms']:.2f} ms per step, {len(lengths) * 1e3 / static['ms']:.0f} "
                     f"tokens/s; memory bound {bound:.2f} ms at {options.bandwidth_gbs:.0f} GB/s, "
                     f"{bound / static['ms']:.0%} of it; compiled in {static['compile_seconds']:.0f} s")
        static_ms[name] = static["ms"]
    for mixed, uniform in mixed_and_uniform(options):
        if mixed in static_ms and uniform in static_ms:
            lines.append(f"  static step, {mixed} over {uniform}: {static_ms[mixed] / static_ms[uniform]:.2f}x "
                         f"(target <= 1.3x)")
    del engine, net
    return lines


def gpu_report(options: Options, out=print) -> None:
    out(f"device: {describe_device(options.device)}")
    out("\nlinear methods here:")
    for line in availability(options.device):
        out(f"  {line}")
    out("\nerror against fp32 (max |error| / max |y|, same weights; outlier activations) and ms per call:")
    for line in method_table(options):
        out(line)
    out("\nChatGLM-6B, random weights, as load() prepares it on this device:")
    for bits in (None, 4):
        for line in model_report(options, bits):
            out(line)
    if options.device.type == "cuda":  # (the dry run times it on the CPU in bench/static_decode.py's checks)
        found = static_decode.time_mixed_attention(short=options.short, long=options.long, device=str(options.device))
        out(f"\nthe compiled step's attention alone (32 heads of 128, fp16, 2,048 positions), batch 64 of "
            f"{options.short}: {found['uniform']:.3f} ms; one of {options.long} among 63 of {options.short}: "
            f"{found['mixed']:.3f} ms; {found['ratio']:.2f}x (spans of the longest row's bucket, the design "
            f"before: {found['ratio, span buckets']:.2f}x)")


# --------------------------------------------------------------------------------------------------
# The dry run
# --------------------------------------------------------------------------------------------------

TOY = ModelConfig(vocab_size=1024, hidden_size=128, num_layers=2, num_attention_heads=4, inner_hidden_size=512)


def toy_options() -> Options:
    return Options(torch.device("cpu"), {"toy qkv": (384, 128), "toy 4h_to_h": (128, 512)}, (1, 9), TOY,
                   (1, 4), 16, 4, 64, 1, repeats=1)


def check_gpu_run_at_toy_size():
    """This script's GPU run (methods, both models, every decode case) on CPU tensors at toy size: it
    completes, and every product and logit is finite."""
    text = io.StringIO()
    with torch.no_grad():
        gpu_report(toy_options(), out=lambda line: print(line, file=text))
    report = text.getvalue()
    cases = 2 * len(decode_cases(toy_options()))  # both models, each case through forward and the static step
    ok = "NOT FINITE" not in report and "FAIL" not in report and report.count("tokens/s") == 2 * cases
    rows = sum(line.startswith("| toy") for line in report.splitlines())
    return ok, f"{rows} method rows, {cases} decode cases, all finite" if ok else report.replace("\n", " / ")[-600:]


def check_static_decode():
    """The GPU path's properties on CPU tensors: one graph per bucket, compiled == eager, one host wait a
    step, mixed lengths within 1.3x of uniform ones (operators, KV blocks read, the compiled attention's
    time), a stream never stalled by a burst of prompts."""
    found = static_decode.dry_run()  # a failed property raises: run_check reports it
    return True, "; ".join(f"{name} {detail}" for name, detail in found.items())


def dry_run() -> int:
    from glmpool.engine import gpucheck as engine_checks
    from glmpool.engine.tiny import cached_tiny_checkpoint
    cache = Path(tempfile.gettempdir()) / "glmpool-gpucheck"
    checks = engine_checks.run_all(cached_tiny_checkpoint(cache))
    checks.append(engine_checks.run_check("bench/gpu.py's GPU run, toy size on the CPU", check_gpu_run_at_toy_size))
    checks.append(engine_checks.run_check("the static decode step (bench/static_decode.py)", check_static_decode))
    try:
        from glmpool import gpucheck as pool_checks
    except ImportError as error:
        checks.append(engine_checks.Check("pool checks (glmpool.gpucheck)", False, f"not available: {error}"))
    else:
        checks += pool_checks.run_all(cache)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail} ({check.seconds:.1f} s)", flush=True)
    failed = sum(not check.ok for check in checks)
    print(f"{len(checks) - failed} ok, {failed} failed")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="the GPU-only branches on CPU tensors")
    parser.add_argument("--device", default="cuda", help="the GPU to measure (default: cuda)")
    parser.add_argument("--context", type=int, default=CONTEXT,
                        help=f"tokens in each sequence's cache (default {CONTEXT}, the batch-64 target's)")
    parser.add_argument("--bandwidth-gbs", type=float, default=Options.bandwidth_gbs,
                        help="memory bandwidth of the bound, GB/s (default: H100 SXM's 3350)")
    args = parser.parse_args()
    if args.cpu_dry_run:
        return dry_run()
    if not torch.cuda.is_available():
        print("no CUDA device here: run with --cpu-dry-run", file=sys.stderr)
        return 2
    options = Options(torch.device(args.device), CHATGLM_SHAPES, ROWS, ModelConfig(), BATCHES, args.context, SHORT,
                      LONG, 12, bandwidth_gbs=args.bandwidth_gbs)
    started = time.perf_counter()
    with torch.no_grad():
        gpu_report(options)
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
