"""Decode benchmark of the linear methods (glmpool/engine/linear/registry.py's names: onednn, reference,
fp16) and of int8 / int4 (and -qe: embeddings quantized too) on the medium random model.

    python bench/decode.py [--rounds 3] [--batches 4,16,64] [--agreement] [--model DIR] [--device cuda]
                           [--prompt-tokens 32] [--decode-steps 16] [--chatglm-cpp PYTHON [--cpp-tokens N]]
                           [--shared-cache auto|on|off]
                           [--variants onednn,reference,fp16,int8,int4,int8-qe,int4-qe]

Medium config (as the issue specifies): hidden 1024, 16 heads, inner 4096, 8 layers, vocab 130528, tied
embeddings, ~234 M parameters (0.94 GB in fp32), random weights from `glmpool.engine.tiny`, built once
into .cache/ (bench/harness.py). onednn, reference and fp16 run load(matmul=) with that name: fp32 weights
through oneDNN; THUDM's own F.linear, for comparison; fp16 weights with fp32 arithmetic (the pool's
default, by glmpool's kernel; the checkpoint is stored in fp16 as THUDM's are, so it loses
nothing), and the quantized variants run with that default too (for int8/int4 it holds the unquantized
embeddings = output projection in fp16). The quantized variants multiply int8-quantized activations (the
default quantized_activations, route int-dot); + "-bf16" (int8-qe-bf16, ...) bf16 ones through torch's
weight-only kernels' arithmetic (routes int8, int4), as before that route. For every variant: prompt ms
(one 32-token prompt), decode tokens/s of one sequence, aggregate tokens/s of batches through
`engine.batcher` (greedy), next to this machine's memory read bandwidth measured in the same run and the
bound it implies (bandwidth / weight bytes read per token).

The machine is shared and noisy: the variants run round-robin, several rounds, and the table shows
medians plus ratios against onednn measured in the same rounds (variant names before issue 20: fp32 =
onednn, fp32-reference = reference, fp16w = fp16). Not a test: no targets are asserted.
Any variant's name + "-no-row-kernel" runs it with lone rows through torch's kernels instead of glmpool's
(glmpool/engine/row_kernel.py); + "-torch-rows" with several rows through torch's kernels (oneDNN,
FBGEMM for every row of fp16, torch's int4 kernel) instead of glmpool's tiled ones; + "-torch-attention" with decode attention
through torch instead of glmpool's kernel (decode_attention.py); + "-4k-pages" with its weights left on
4 KB pages (hugepages.py): list those first, since memory that held weights moved onto huge pages stays
advised when it is reused.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from glmpool.engine import SamplingParams, load
from glmpool.engine import agreement, decode_attention, hugepages, row_kernel
from glmpool.engine.linear import layers, registry
from harness import ROOT, medium_checkpoint

PROMPT_TOKENS = 32  # default of --prompt-tokens


def read_bandwidth(device: str = "cpu", rounds: int = 7, megabytes: int = 1024) -> float:
    """GB/s of a large fp32 tensor sum on `device` (on the CPU: torch's threads), median of rounds."""
    data = torch.ones(megabytes * (1 << 20) // 4, device=device)
    float(data.sum())
    speeds = []
    for _ in range(rounds):
        start = time.perf_counter()
        float(data.sum())  # waits for the device
        speeds.append(data.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return statistics.median(speeds)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage once (the tied matrix is read once, as the output
    projection; the embedding lookup reads one row). That is what one decode step streams from memory."""
    seen, total = set(), 0
    for module in model.modules():  # packed matrices are no parameters (a lookup table is not read)
        if isinstance(module, (layers.PackedLinear, layers.TiedEmbedding)):
            seen.update(t.untyped_storage().data_ptr() for t in module.held_tensors() if not t.is_mkldnn)
            weight = module.method.weight()  # its size as packed: the bytes a product streams
            total += weight.numel() * (2 if type(module.method).table_dtype == torch.float16 else 4)
            total += 4 * module.out_features if getattr(module.method, "bias", None) is not None else 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def make_prompt(config, rng: random.Random, prompt_tokens: int = PROMPT_TOKENS) -> list[int]:
    return [rng.randrange(6, min(1000, config.mask_token_id)) for _ in range(prompt_tokens - 2)] \
        + [config.gmask_token_id, config.bos_token_id]


def measure(engine, batch: int, decode_steps: int, rng: random.Random,
            shared_cache: bool | None = None, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, float]:
    """One measurement of a variant: (prompt ms and decode tok/s) at batch 1, or aggregate tok/s at `batch`."""
    params = SamplingParams(do_sample=False, max_new_tokens=decode_steps + 8, max_length=4096)
    batcher = engine.batcher(max_batch=batch, shared_cache=shared_cache)
    for i in range(batch):
        batcher.add_prompt(i, make_prompt(engine.config, rng, prompt_tokens), params)
    start = time.perf_counter()
    batcher.step()  # prefill (the prompts together, one pass) and each sequence's first token
    prefill = time.perf_counter() - start
    tokens, start = 0, time.perf_counter()
    for _ in range(decode_steps):
        tokens += len(batcher.step())
        if not len(batcher):
            break
    elapsed = time.perf_counter() - start
    return {"prompt_ms": prefill * 1e3 / batch, "tokens_per_s": tokens / elapsed}


def prepare_chatglm_cpp(model_dir: Path, cache: Path) -> dict[str, Path]:
    import subprocess

    files = {}
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        path = cache / f"{model_dir.name}-ggml-{kind}.bin"
        if not path.is_file():
            subprocess.run([sys.executable, str(ROOT / "bench" / "vs_chatglm_cpp.py"), "convert", str(model_dir),
                            str(path), "--type", kind], check=True)
        files[kind] = path
    return files


def run_chatglm_cpp(python: str, path: Path, prompt_tokens: int, tokens: int) -> float:
    import json
    import subprocess

    command = [python, str(ROOT / "bench" / "vs_chatglm_cpp.py"), "run", str(path), "--prompt-tokens",
               str(prompt_tokens), "--tokens", str(tokens)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def build_variants(model_dir: Path, names: list[str], device: str = "cpu") -> dict:
    """The engines to compare. On a GPU `matmul` changes nothing: fp32 is fp32, the others run in the
    device's default dtype (fp16), the int4 layers through torch's CUDA int4 kernel where it works.
    A name may end in -no-row-kernel, -torch-attention or -4k-pages: that variant without glmpool's row
    kernels, its attention kernel or huge pages."""
    engines = {}
    for name in names:
        on = dict(device=device, progress=False)
        variant = name
        for suffix in ("-no-row-kernel", "-torch-rows", "-torch-attention", "-4k-pages"):
            name = name.removesuffix(suffix)
        with contextlib.ExitStack() as patches:
            if variant.endswith("-no-row-kernel"):  # lone rows through torch's kernels, as before row_kernel.c
                patches.enter_context(mock.patch.object(row_kernel, "probe", lambda *args: None))
                patches.enter_context(mock.patch.object(row_kernel, "int8_matches_torch", lambda: False))
                patches.enter_context(mock.patch.object(row_kernel, "int4_matches_torch", lambda block: False))
            if variant.endswith("-torch-rows"):  # several rows through oneDNN / FBGEMM, as before rows_times_*
                patches.enter_context(mock.patch.object(row_kernel, "several_rows_available", lambda: False))
            if variant.endswith("-torch-attention"):  # as before decode_attention.c
                patches.enter_context(mock.patch.object(decode_attention, "usable", lambda *args: False))
            if variant.endswith("-4k-pages"):  # the weights left on 4 KB pages, as before hugepages.py
                patches.enter_context(mock.patch.object(hugepages, "weights_on_huge_pages", lambda net: 0))
            engines[variant] = build_variant(model_dir, name, on)
        gc.collect()
    return engines


def build_variant(model_dir: Path, name: str, on: dict):
    if name in ("dtype-bf16", "dtype-fp16"):  # the whole model in that dtype: yardsticks for --agreement
        engine = load(model_dir, dtype={"dtype-bf16": "bfloat16", "dtype-fp16": "float16"}[name], **on)
    elif name in registry.MATMULS:  # fp32 activations on the CPU, the weights as the method keeps them
        engine = load(model_dir, dtype=None if name == "fp16" else "float32", matmul=name, **on)
    else:  # quantized: what the pool runs (its default matmul; the -qe variants have no float matrix left)
        activations = "bf16" if name.endswith("-bf16") else registry.DEFAULT_QUANTIZED_ACTIVATIONS
        engine = load(model_dir, quantize=name.removeprefix("int").removesuffix("-bf16"), matmul="fp16",
                      quantized_activations=activations, **on)
    # Random weights may well predict <eop>; the bench wants every sequence decoding every step.
    engine.model.config = dataclasses.replace(engine.model.config, eos_token_id=-1)
    return engine


def agreement_table(engines: dict, reference: str, prompts: int, new_tokens: int, rng: random.Random):
    """The agreement table's rows, one variant at a time (each takes minutes on the CPU)."""
    ref = engines[reference]
    c = ref.config
    sample = [[rng.randrange(6, min(1000, c.mask_token_id)) for _ in range(rng.randint(4, 24))] + [c.gmask_token_id, c.bos_token_id]
              for _ in range(prompts)]
    for name, engine in engines.items():
        if name == reference:
            continue
        s = agreement.greedy_agreement(ref.model, engine.model, sample, new_tokens, c.bos_token_id, c.mask_token_id,
                               c.gmask_token_id)
        yield f"| {name} | {s['teacher_forced']:.3f} | {s['prefix']:.3f} | {s['exact']:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the medium random one)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--variants", default="onednn,reference,fp16,int8,int4,int8-qe,int4-qe")
    parser.add_argument("--batches", default="4,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--cpp-tokens", type=int, default=None,
                        help="tokens chatglm.cpp decodes per round (default: twice --decode-steps)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU (then leave out --chatglm-cpp)")
    parser.add_argument("--shared-cache", choices=("auto", "on", "off"), default="auto",
                        help="KV caches in one slab with batched decode attention (auto: on a GPU, and "
                             "on the CPU where load() found the padding exact)")
    parser.add_argument("--agreement", action="store_true", help="also greedy token agreement against onednn")
    parser.add_argument("--agreement-prompts", type=int, default=8)
    parser.add_argument("--agreement-tokens", type=int, default=16)
    parser.add_argument("--chatglm-cpp", metavar="PYTHON", default=None,
                        help="a python with chatglm-cpp installed (separate venv): also time its f32/f16/q8_0/q4_0 "
                             "decoding of the same checkpoint in the same rounds (see bench/vs_chatglm_cpp.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or medium_checkpoint(args.cache)
    names = args.variants.split(",")
    if "onednn" not in names:  # every ratio is to onednn (fp32 weights) of the same round
        names.insert(0, "onednn")
    batches = [int(b) for b in args.batches.split(",") if b]
    engines = build_variants(model_dir, names, args.device)
    config = engines["onednn"].config
    model = engines["onednn"].model
    params = sum(t.numel() for t in model.parameters()) + sum(
        m.method.weight().numel() for m in model.modules() if isinstance(m, (layers.PackedLinear, layers.TiedEmbedding)))
    print(f"model {model_dir.name}: {params / 1e6:.0f} M parameters, hidden {config.hidden_size}, "
          f"{config.num_layers} layers, vocab {config.vocab_size}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}", file=sys.stderr)

    cpp_files = prepare_chatglm_cpp(model_dir, args.cache) if args.chatglm_cpp else {}
    cpp = {kind: [] for kind in cpp_files}
    rng = random.Random(0)
    shared_cache = {"auto": None, "on": True, "off": False}[args.shared_cache]
    bandwidths = []
    results = {name: {"prompt_ms": [], "tokens_per_s": [], **{f"b{b}": [] for b in batches}} for name in names}
    for round_ in range(args.rounds):
        bandwidths.append(read_bandwidth(args.device))
        for name, engine in engines.items():
            one = measure(engine, 1, args.decode_steps, rng, shared_cache, args.prompt_tokens)
            results[name]["prompt_ms"].append(one["prompt_ms"])
            results[name]["tokens_per_s"].append(one["tokens_per_s"])
            for b in batches:
                steps = max(4, args.decode_steps // max(1, b // 8))
                results[name][f"b{b}"].append(measure(engine, b, steps, rng, shared_cache)["tokens_per_s"])
            print(f"round {round_ + 1}/{args.rounds} {name}: " + ", ".join(
                f"{k} {v[-1]:.1f}" for k, v in results[name].items()), file=sys.stderr, flush=True)
        for kind, path in cpp_files.items():
            cpp[kind].append(run_chatglm_cpp(args.chatglm_cpp, path, args.prompt_tokens,
                                             args.cpp_tokens or args.decode_steps * 2))
            print(f"round {round_ + 1}/{args.rounds} chatglm.cpp {kind}: {cpp[kind][-1]:.1f} tok/s",
                  file=sys.stderr, flush=True)
        bandwidths.append(read_bandwidth(args.device))

    bandwidth = statistics.median(bandwidths)
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    # ratios per round against fp32 of the same round, then the median
    ratio = {name: {k: statistics.median(a / b for a, b in zip(v, results["onednn"][k])) for k, v in r.items()}
             for name, r in results.items()}
    where = f"{torch.get_num_threads()} threads" if args.device == "cpu" else args.device
    print(f"\nMemory read bandwidth (fp32 sum of 1 GiB, {where}, median of "
          f"{len(bandwidths)}): **{bandwidth:.1f} GB/s** (min {min(bandwidths):.1f}, max {max(bandwidths):.1f}).\n")
    header = (f"| variant | weight bytes/token | bound tok/s | prompt ms ({args.prompt_tokens} tok) "
              "| decode tok/s (batch 1) | % of bound |")
    header += "".join(f" batch {b} tok/s |" for b in batches)
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, engine in engines.items():
        nbytes = weight_bytes_per_token(engine.model)
        bound = bandwidth * 1e9 / nbytes
        m, r = med[name], ratio[name]
        cells = [f"{nbytes / 1e6:.0f} MB", f"{bound:.1f}",
                 f"{m['prompt_ms']:.0f} ({r['prompt_ms']:.2f}x)",
                 f"{m['tokens_per_s']:.1f} ({r['tokens_per_s']:.2f}x)",
                 f"{100 * m['tokens_per_s'] / bound:.0f}%"]
        cells += [f"{m[f'b{b}']:.1f} ({r[f'b{b}']:.2f}x)" for b in batches]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n(x): ratio to onednn measured in the same rounds (prompt: time ratio, lower is faster; "
          "tokens/s: speed ratio).")
    if batches:
        print("Batch scaling (aggregate tokens/s at batch b / decode tokens/s at batch 1): " + "; ".join(
            f"{name} " + ", ".join(f"b{b} {med[name][f'b{b}'] / med[name]['tokens_per_s']:.1f}x" for b in batches)
            for name in names))

    if cpp:
        print("\nchatglm.cpp (C++/ggml; its q8_0/q4_0 quantize the embeddings too, so compare with -qe), batch-1 "
              "decode in the same rounds:\n")
        print("| chatglm.cpp | tok/s | glmpool counterpart | glmpool tok/s | glmpool / chatglm.cpp (per round, median) |")
        print("|---|---|---|---|---|")
        for kind, ours in (("f32", "onednn"), ("f16", "fp16"), ("q8_0", "int8-qe"), ("q4_0", "int4-qe"),
                           ("q8_0", "int8-qe-bf16"), ("q4_0", "int4-qe-bf16")):
            if kind in cpp and ours in results:
                per_round = statistics.median(a / b for a, b in zip(results[ours]["tokens_per_s"], cpp[kind]))
                print(f"| {kind} | {statistics.median(cpp[kind]):.1f} | {ours} | {med[ours]['tokens_per_s']:.1f} | "
                      f"{per_round:.2f} |")

    if args.agreement:
        print(f"\nGreedy agreement with onednn ({args.agreement_prompts} prompts x {args.agreement_tokens} tokens):\n")
        print("| variant | teacher-forced token agreement | identical prefix (fraction) | identical continuations |")
        print("|---|---|---|---|")
        agreement_engines = dict(engines)
        for dtype in ("dtype-bf16", "dtype-fp16"):
            if dtype not in agreement_engines:
                agreement_engines[f"{dtype} (yardstick)"] = build_variants(model_dir, [dtype])[dtype]
        for row in agreement_table(agreement_engines, "onednn", args.agreement_prompts, args.agreement_tokens,
                                   random.Random(1)):
            print(row, flush=True)


if __name__ == "__main__":
    main()
