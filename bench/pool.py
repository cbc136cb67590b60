"""Pool benchmark: a real pool (cpu worker, medium random model), N requests dropped at once against the
same kind of requests sent one at a time (what the original one-request-at-a-time server gives).

    python bench/pool.py [--rounds 3] [--concurrency 1,4,16,64] [--sequential 6] [--max-new-tokens 32]
                         [--max-batch 16] [--sweep 8,16,32,64] [--workers 1] [--matmul KIND] [--quantize Q]
                         [--sample]

Medium config (hidden 1024, 16 heads, 8 layers, vocab 130528; bench/decode.py builds it into .cache/).
Random weights often predict <eop> early; like bench/decode.py the bench wants every request to do the
same work, so the pool loads a view of that checkpoint whose config.json names an end token that never
comes (weights and tokenizer are symlinks): every request generates exactly --max-new-tokens tokens,
greedily (do_sample false; --sample: THUDM's default sampling, seeded per request), from distinct prompts
of about the same length.

Per round, on one pool: the sequential baseline (--sequential requests, each written when the previous
answer appeared; half of them before the bursts and half after, so the host's drift within a round
favours neither side), and for every N a burst of N requests written at once. Reported per N (medians
of the rounds): aggregate generated tokens/s (all tokens / first arrival to last answer), time to first
token (the request's first .partial seen by the bench, polling every 1% of the wait, 10-100 ms; the pool
writes a first .partial as soon as the first token exists, then at its default pacing) and end-to-end
latency (arrival -> answer published) p50/p95, and the speed-up over the sequential baseline of the
same round.
--sweep: one more pool per --max-batch value, each running the largest N once per round (the default
--max-batch is chosen from this). The machine is shared and noisy: ratios are per round, then medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, Server, bar_chart, machine, medium_checkpoint, percentile, write_request

END_NEVER = -1  # an end-of-answer token id no model produces


def medium_view(cache: Path) -> Path:
    """The medium checkpoint (built by bench/decode.py if missing) as a directory whose config.json has no
    reachable end token; everything else is a symlink to the real files."""
    source = medium_checkpoint(cache)
    view = cache / f"{source.name}-no-eos"
    view.mkdir(exist_ok=True)
    for item in source.iterdir():
        target = view / item.name
        if item.name == "config.json":
            config = json.loads(item.read_text())
            config["eos_token_id"] = END_NEVER
            target.write_text(json.dumps(config, indent=1))
        elif not target.exists():
            target.symlink_to(item.resolve())
    return view


def prompt(i: int) -> str:
    return f"Request {i:04d}: please write a short story about a lighthouse keeper and the sea."


class Watcher:
    """Polls requests/: when each id's .partial and .back first appeared. While first tokens are awaited,
    every 1% of the time waited so far (10-100 ms: a first token is timed to ~1%), then every 100 ms (the
    answers' times come from .meta; a client scanning the directory 100 times a second takes CPU from the
    worker it measures)."""

    def __init__(self, requests: Path, ids: list[str]):
        self.requests, self.ids = requests, set(ids)
        self.first_partial: dict[str, float] = {}
        self.done: set[str] = set()

    def run(self, timeout: float) -> None:
        start = time.monotonic()
        deadline = start + timeout
        while self.done != self.ids:
            now = time.time()
            for entry in os.scandir(self.requests):
                rid, _, suffix = entry.name.rpartition(".")
                if rid not in self.ids:
                    continue
                if suffix == "partial":
                    self.first_partial.setdefault(rid, now)
                elif suffix == "back":
                    self.done.add(rid)
                elif suffix == "error":
                    raise RuntimeError(f"{rid} failed: {(self.requests / entry.name).read_text()[:300]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.ids - self.done)} answers missing after {timeout:.0f}s")
            waiting_first = len(self.first_partial.keys() | self.done) < len(self.ids)
            time.sleep(min(0.1, max(0.01, (time.monotonic() - start) / 100)) if waiting_first else 0.1)


def results(requests: Path, ids: list[str], watcher: Watcher) -> list[dict]:
    out = []
    for rid in ids:
        meta = json.loads((requests / f"{rid}.meta").read_text())
        t = meta["timings"]
        first = watcher.first_partial.get(rid, t["finished"])  # no .partial seen: the answer was the first sight
        out.append({"tokens": meta["generated_tokens"], "arrived": t["arrived"], "finished": t["finished"],
                    "ttft": first - t["arrived"], "latency": t["finished"] - t["arrived"],
                    "service": t["finished"] - t["received"]})
        for suffix in ("back", "meta"):
            os.unlink(requests / f"{rid}.{suffix}")
    return out


SAMPLE = False  # --sample


def body(i: int, new_tokens: int) -> dict:
    how = {"seed": i} if SAMPLE else {"do_sample": False}  # sampled: the server's defaults (top_p 0.7, ...)
    return {"query": prompt(i), **how, "max_new_tokens": new_tokens, "max_length": 2048}


def burst(server: Server, count: int, tag: str, new_tokens: int) -> dict:
    requests = server.root / "requests"
    ids = [f"{tag}-{i}" for i in range(count)]
    watcher = Watcher(requests, ids)
    for i, rid in enumerate(ids):
        write_request(requests, rid, body(i, new_tokens))
    watcher.run(timeout=600 + 10 * count)
    r = results(requests, ids, watcher)
    assert all(x["tokens"] == new_tokens for x in r), [x["tokens"] for x in r]
    elapsed = max(x["finished"] for x in r) - min(x["arrived"] for x in r)
    return summary(r, sum(x["tokens"] for x in r) / elapsed)


def one_at_a_time(server: Server, count: int, tag: str, new_tokens: int) -> list[dict]:
    requests = server.root / "requests"
    r = []
    for i in range(count):
        rid = f"{tag}-{i}"
        watcher = Watcher(requests, [rid])
        write_request(requests, rid, body(i, new_tokens))
        watcher.run(timeout=600)
        r += results(requests, [rid], watcher)
    return r


def sequential(r: list[dict]) -> dict:
    busy = sum(x["latency"] for x in r)  # one at a time: the pool works only while a request is in it
    out = summary(r, sum(x["tokens"] for x in r) / busy)
    out["mean_latency"] = busy / len(r)
    return out


def summary(r: list[dict], tokens_per_s: float) -> dict:
    return {"tokens_per_s": tokens_per_s,
            "ttft_p50": statistics.median(x["ttft"] for x in r), "ttft_p95": percentile([x["ttft"] for x in r], 0.95),
            "latency_p50": statistics.median(x["latency"] for x in r),
            "latency_p95": percentile([x["latency"] for x in r], 0.95)}


def pool_args(model: Path, args, max_batch: int) -> list[str]:
    return ["--model", str(model), "--gpus", ",".join(["cpu"] * args.workers), "--max-batch", str(max_batch),
            "--max-length", "2048", "--cache-dir", str(args.cache),
            *(["--worker-threads", str(args.threads)] if args.threads else []),
            *(["--matmul", args.matmul] if args.matmul else []),
            *(["--quantize", args.quantize] if args.quantize else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--sequential", type=int, default=6, help="requests of the one-at-a-time baseline")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--sweep", default="", help="--max-batch values to compare at the largest N, e.g. 8,16,32,64")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="--worker-threads (0: the pool's default)")
    parser.add_argument("--matmul", default=None, help="--matmul of the pool (default: the pool's default)")
    parser.add_argument("--quantize", default=None, help="--quantize of the pool: 4, 8, 4-qe or 8-qe")
    parser.add_argument("--sample", action="store_true", help="requests sample (server defaults) instead of greedy")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the medium view)")
    global SAMPLE
    args = parser.parse_args()
    SAMPLE = args.sample
    model = args.model or medium_view(args.cache)
    counts = [int(n) for n in args.concurrency.split(",") if n]
    sweep = [int(b) for b in args.sweep.split(",") if b]
    base = Path(tempfile.mkdtemp(prefix="glmpool-bench-pool-"))
    runs: dict = {}  # (label, key) -> [per round]
    new = args.max_new_tokens

    def record(label, values: dict, baseline: dict | None = None) -> None:
        for key, value in values.items():
            runs.setdefault((label, key), []).append(value)
        if baseline:
            runs.setdefault((label, "speedup"), []).append(values["tokens_per_s"] / baseline["tokens_per_s"])
        print(f"  {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()), file=sys.stderr, flush=True)

    try:
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
            with Server(base / f"r{round_}", pool_args(model, args, args.max_batch), instant=False) as server:
                server.wait_running()
                burst(server, 2, f"warm{round_}", 4)
                before = one_at_a_time(server, (args.sequential + 1) // 2, f"s{round_}a", new)
                bursts = {n: burst(server, n, f"n{n}r{round_}", new) for n in counts}
                seq = sequential(before + one_at_a_time(server, args.sequential // 2, f"s{round_}b", new))
                record("sequential", seq)
                for n in counts:
                    record(n, bursts[n], seq)
            for batch in sweep:
                with Server(base / f"r{round_}b{batch}", pool_args(model, args, batch), instant=False) as server:
                    server.wait_running()
                    burst(server, 2, f"warm{round_}", 4)
                    seq = sequential(one_at_a_time(server, 2, f"s{round_}", new))
                    record(f"max-batch {batch}", burst(server, max(counts), f"b{batch}r{round_}", new), seq)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    med = {key: statistics.median(values) for key, values in runs.items()}
    import torch
    print(f"\nMachine: {machine()}; torch {torch.__version__}. Model {model.name}: 1 worker x "
          f"{args.threads or 'default'} threads, --matmul {args.matmul or 'default'}"
          f"{', --quantize ' + args.quantize if args.quantize else ''}, --max-batch {args.max_batch}, "
          f"{new} new tokens per request ({'sampled' if SAMPLE else 'greedy'}), medians of {args.rounds} rounds.\n")
    print("| requests at once | aggregate tokens/s | x one at a time (same round) | TTFT p50 | TTFT p95 | "
          "latency p50 | latency p95 |")
    print("|---|---|---|---|---|---|---|")
    s = lambda key: med[("sequential", key)]  # noqa: E731
    print(f"| one at a time ({args.sequential}) | {s('tokens_per_s'):.1f} | 1.00x | {s('ttft_p50'):.2f} s | "
          f"{s('ttft_p95'):.2f} s | {s('latency_p50'):.2f} s | {s('latency_p95'):.2f} s |")
    for n in counts:
        m = lambda key: med[(n, key)]  # noqa: E731
        print(f"| {n} | {m('tokens_per_s'):.1f} | {m('speedup'):.2f}x | {m('ttft_p50'):.2f} s | {m('ttft_p95'):.2f} s | "
              f"{m('latency_p50'):.2f} s | {m('latency_p95'):.2f} s |")
    mean = s("mean_latency")
    print(f"\nOne at a time, N requests dropped at once wait behind each other: the k-th is answered after about "
          f"k x {mean:.2f} s, so latency p50 ~ " + ", ".join(f"N={n}: {mean * (n + 1) / 2:.1f} s" for n in counts) + ".")
    if sweep:
        print(f"\n--max-batch sweep, {max(counts)} requests at once:\n")
        print("| --max-batch | aggregate tokens/s | x one at a time | TTFT p50 | latency p50 | latency p95 |")
        print("|---|---|---|---|---|---|")
        for batch in sweep:
            m = lambda key: med[(f"max-batch {batch}", key)]  # noqa: E731
            print(f"| {batch} | {m('tokens_per_s'):.1f} | {m('speedup'):.2f}x | {m('ttft_p50'):.2f} s | "
                  f"{m('latency_p50'):.2f} s | {m('latency_p95'):.2f} s |")
    print("\nChart (aggregate tokens/s):")
    bars = [("one at a time", s("tokens_per_s"))] + [(f"{n} at once", med[(n, "tokens_per_s")]) for n in counts]
    bar_chart(bars, "{:.1f}")
    target = med.get((16, "speedup"))
    if target is not None:
        print(f"\nTarget: 16 at once >= 8x one at a time: {target:.2f}x ({'met' if target >= 8 else 'missed'}).")


if __name__ == "__main__":
    main()
