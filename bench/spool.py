"""Protocol benchmark: the spool alone, claim -> dispatch -> .back, with workers that answer instantly.

    python bench/spool.py [--rounds 3] [--requests 2000] [--workers 1,4] [--paced 200] [--pending 100,1000,10000]
                          [--profile FILE]

The pool is the real one (`glmpool serve`: supervisor, claims, worker processes, pipes, the worker's
batching loop), except that each worker's engine is replaced by `InstantBatch`, a stand-in defined here
that answers every admitted request at the next step. It is installed only in the bench's own server
process (`python bench/spool.py --serve ...` swaps `glmpool.worker.main` for `instant_worker` before the
supervisor spawns anything); the product has no such hook.

Measured, from the `.meta` timings of every answer (arrived = the request file's mtime, i.e. its close;
received = the worker took the task off its queue; finished = the supervisor had its answer):
  - burst: M requests written at once (atomically, JSON form) into a running pool of 1 and of 4 workers:
    requests/s end to end (first arrival to last answer published);
  - paced: one request at a time (the next one written when the previous answer appears): dispatch
    latency (received - arrived), median and p95;
  - claim cost: N requests (100, 1000, 10000) written while no pool runs, then a pool of 1 worker
    started: how fast it drains them (requests/s from the first claim to the last answer), plus, in this
    process, one directory scan's cost and the cost of one claim (`Supervisor.take`) at that depth;
  - beside them, the spool's filesystem and what one file create costs in requests/ just before each
    burst: every request creates several files, and on some filesystems that cost swings widely.

The machine is shared and noisy: each figure is the median of --rounds rounds. Not a test: targets are
reported (median dispatch latency < 20 ms, >= 500 requests/s, flat claim cost), never asserted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ENV, Server, bar_chart, machine, percentile, write_request  # bench/harness.py


# --- the engine stand-in (runs inside the bench's own server and its worker processes) -------------

class InstantBatch:
    """Takes the place of the engine's Batcher in a worker: every request added is answered ("ok", one
    token) at the next step, so what is measured is the protocol and the processes around it."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.keys: list = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key, query, history, params) -> int:
        from glmpool.engine import AdmissionError
        if len(self.keys) >= self.max_batch:
            raise AdmissionError("batch full")
        self.keys.append(key)
        return 1

    def cancel(self, key):
        from glmpool.engine.generate import TokenEvent
        if key not in self.keys:
            return None
        self.keys.remove(key)
        return TokenEvent(key, 0, lambda: "", True, "cancelled", 1, 0)

    def step(self) -> list:
        from glmpool.engine.generate import TokenEvent
        events = [TokenEvent(key, 0, lambda: "ok", True, "stop", 1, 1) for key in self.keys]
        self.keys = []
        return events


def instant_worker(spec, tasks, results) -> None:
    """What the bench's server spawns instead of glmpool.worker.main: the real worker loop, no model."""
    from glmpool import worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"[%(levelname)s instant worker {spec.wid}]: %(message)s")
    import glmpool.engine  # noqa: F401 - what the real worker has imported before it is ready (torch)
    results.send(("ready", spec.wid, {"pid": os.getpid(), "kv_tokens": 0}))
    try:
        worker.Loop(spec, None, InstantBatch(spec.max_batch), tasks, results).run()
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass


def serve_instant(argv: list[str]) -> int:
    """`glmpool serve` with instant workers (this process only). With GLMPOOL_BENCH_PROFILE=FILE, the
    supervisor runs under cProfile and writes its stats there at exit."""
    import glmpool.worker
    from glmpool.cli import main
    glmpool.worker.main = instant_worker  # the supervisor spawns worker.main: this one, pickled by name
    if os.environ.get("GLMPOOL_BENCH_NO_FSYNC"):  # what-if only: how much of the cost is the disk's fsync
        os.fsync = lambda fd: None
    profile = os.environ.get("GLMPOOL_BENCH_PROFILE")
    if not profile:
        return main(["serve", *argv])
    import cProfile
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(main, ["serve", *argv])
    finally:
        profiler.dump_stats(profile)


# --- driving a pool from the outside -------------------------------------------------------------

def wait_answers(requests: Path, ids: list[str], timeout: float, poll: float = 0.02) -> None:
    wanted = {f"{rid}.back" for rid in ids}
    deadline = time.monotonic() + timeout
    while True:
        names = set(os.listdir(requests))
        missing = [name for name in wanted if name not in names]
        if not missing:
            return
        errors = [name for name in names if name.endswith(".error")]
        if errors:
            raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {(requests / errors[0]).read_text()[:300]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(missing)} of {len(ids)} answers missing after {timeout:.0f}s")
        time.sleep(poll)


def timings(requests: Path, ids: list[str]) -> list[dict]:
    return [json.loads((requests / f"{rid}.meta").read_text())["timings"] for rid in ids]


def clear_outputs(requests: Path) -> None:
    for entry in os.scandir(requests):
        if entry.name.endswith((".back", ".meta")):
            os.unlink(entry.path)


def burst(server: Server, count: int, tag: str) -> dict:
    requests = server.root / "requests"
    ids = [f"{tag}-{i}" for i in range(count)]
    for rid in ids:
        write_request(requests, rid, {"query": "q"})
    wait_answers(requests, ids, timeout=max(60, count / 20))
    t = timings(requests, ids)
    elapsed = max(x["finished"] for x in t) - min(x["arrived"] for x in t)
    clear_outputs(requests)
    return {"requests_per_s": count / elapsed, "latency_p50": statistics.median(x["received"] - x["arrived"] for x in t)}


def paced(server: Server, count: int, tag: str) -> dict:
    requests = server.root / "requests"
    ids = [f"{tag}-{i}" for i in range(count)]
    for rid in ids:
        write_request(requests, rid, {"query": "q"})
        back = requests / f"{rid}.back"
        deadline = time.monotonic() + 30
        while not os.path.exists(back):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer to {rid}")
            time.sleep(0.001)
    t = timings(requests, ids)
    clear_outputs(requests)
    latencies = [1e3 * (x["received"] - x["arrived"]) for x in t]
    return {"dispatch_ms_p50": statistics.median(latencies), "dispatch_ms_p95": percentile(latencies, 0.95),
            "roundtrip_ms_p50": statistics.median(1e3 * (x["finished"] - x["arrived"]) for x in t)}


def in_process_claim_cost(root: Path) -> dict:
    """One scan of the queue as it is, and the cost per request of taking (checking, claiming, reading) 48
    requests, here, in groups of 16 as one worker's dispatch does."""
    import argparse as _argparse

    from glmpool import config
    from glmpool.supervisor import Supervisor
    s = Supervisor(config.resolve(_argparse.Namespace(dir=str(root)), environ={}))
    s.claims.ensure_dirs()
    start = time.perf_counter()
    backlog = s.scan()
    scan = time.perf_counter() - start
    start = time.perf_counter()
    jobs = [job for first in range(0, 48, 16) for job in s.take(backlog[first:first + 16])]
    take = (time.perf_counter() - start) / 48
    assert len(jobs) == 48, "a take failed"
    for job in jobs:  # give them back, as they were
        s.claims.release(job.claim)
    return {"scan_ms": scan * 1e3, "scan_us_per_file": scan * 1e6 / max(1, len(backlog)), "take_ms": take * 1e3}


def drain(base: Path, pending: int, tag: str, args: list[str]) -> dict:
    root = base / f"drain-{tag}"
    requests = root / "requests"
    requests.mkdir(parents=True)
    ids = [f"{tag}-{i}" for i in range(pending)]
    now = time.time()
    for i, rid in enumerate(ids):
        write_request(requests, rid, {"query": "q"})
        os.utime(requests / f"{rid}.json", (now - pending + i,) * 2)  # distinct ages: a real FIFO
    cost = in_process_claim_cost(root)
    with Server(root, ["--gpus", "cpu", *args]) as server:
        server.wait_running()
        wait_answers(requests, ids, timeout=max(120, pending / 20), poll=0.2)
    t = timings(requests, ids)
    elapsed = max(x["finished"] for x in t) - min(x["claimed"] for x in t)
    shutil.rmtree(root, ignore_errors=True)
    return {"drain_per_s": pending / elapsed, **cost}


def filesystem(path: Path) -> str:
    """The filesystem type under `path`, and for ext4 whether it has a journal: without one, ext4 skips
    recently deleted inodes when it allocates a new one, so in a spool that deletes thousands of files a
    create can cost 20x more (seen on this project's VMs, whose root is ext4 without a journal)."""
    path = path.resolve()
    mounts = [line.split() for line in open("/proc/mounts")]
    device, _, kind = max(((m[0], m[1], m[2]) for m in mounts if path.is_relative_to(m[1])),
                          key=lambda m: len(m[1]))
    if kind != "ext4":
        return kind
    journals = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
    name = os.path.basename(os.path.realpath(device))
    return "ext4 (journal)" if any(j.rsplit("-", 1)[0] == name for j in journals) else "ext4 (no journal)"


def create_cost(directory: Path, files: int = 300) -> float:
    """µs to create (and write 50 bytes to) a file in `directory`, the median of `files` creates."""
    probe = directory / "create-probe"
    probe.mkdir()
    costs = []
    for i in range(files):
        start = time.perf_counter()
        with open(probe / f"f{i}", "xb") as f:
            f.write(b"x" * 50)
        costs.append(time.perf_counter() - start)
    shutil.rmtree(probe)
    return statistics.median(costs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="burst size")
    parser.add_argument("--paced", type=int, default=200, help="requests sent one at a time")
    parser.add_argument("--workers", default="1,4")
    parser.add_argument("--pending", default="100,1000,10000")
    parser.add_argument("--dir", type=Path, default=None, help="where the spools go (default: a temp dir under /tmp)")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="run the 1-worker pool's supervisor under cProfile, stats to FILE (pstats)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="what-if: the server's os.fsync does nothing (shows what the disk's fsyncs cost)")
    parser.add_argument("pool_args", nargs="*", help="extra `glmpool serve` arguments (after --)")
    args = parser.parse_args()
    if args.no_fsync:
        ENV["GLMPOOL_BENCH_NO_FSYNC"] = "1"
        os.fsync = lambda fd: None  # the in-process claim cost too
    base = Path(tempfile.mkdtemp(prefix="glmpool-bench-spool-", dir=args.dir))
    workers = [int(w) for w in args.workers.split(",") if w]
    depths = [int(n) for n in args.pending.split(",") if n]
    results: dict = {}
    try:
        for round_ in range(args.rounds):
            for count in workers:
                env = {"GLMPOOL_BENCH_PROFILE": args.profile} if args.profile and count == 1 and round_ == 0 else {}
                with Server(base / f"w{count}-r{round_}", ["--gpus", ",".join(["cpu"] * count), *args.pool_args],
                            env=env) as server:
                    server.wait_running()
                    burst(server, 50, f"warm{round_}")
                    results.setdefault((count, "create_us"), []).append(create_cost(server.root / "requests"))
                    for key, value in {**burst(server, args.requests, f"b{round_}"),
                                       **paced(server, args.paced, f"p{round_}")}.items():
                        results.setdefault((count, key), []).append(value)
                print(f"round {round_ + 1}: {count} worker(s): " + ", ".join(
                    f"{k} {v[-1]:.1f}" for (c, k), v in results.items() if c == count), file=sys.stderr, flush=True)
            for depth in depths:
                for key, value in drain(base, depth, f"d{depth}r{round_}", args.pool_args).items():
                    results.setdefault((f"pending {depth}", key), []).append(value)
                print(f"round {round_ + 1}: {depth} pending: " + ", ".join(
                    f"{k} {v[-1]:.2f}" for (d, k), v in results.items() if d == f"pending {depth}"),
                    file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {key: statistics.median(values) for key, values in results.items()}
    print(f"\nMachine: {machine()}. Spool on {filesystem(base)}. Medians of {args.rounds} rounds.\n")
    print(f"| workers | burst of {args.requests}: requests/s | burst: dispatch latency p50 (queueing included) | "
          f"paced: dispatch latency p50 | paced p95 | paced: close to answer published p50 | one file create |")
    print("|---|---|---|---|---|---|---|")
    for count in workers:
        m = lambda key: med[(count, key)]  # noqa: E731
        print(f"| {count} | {m('requests_per_s'):.0f} | {1e3 * m('latency_p50'):.0f} ms | "
              f"{m('dispatch_ms_p50'):.1f} ms | {m('dispatch_ms_p95'):.1f} ms | {m('roundtrip_ms_p50'):.1f} ms | "
              f"{m('create_us'):.0f} µs |")
    print("\n| pending files | drain (1 worker), requests/s | one scan | scan per file | one claim (take) |")
    print("|---|---|---|---|---|")
    for depth in depths:
        m = lambda key: med[(f"pending {depth}", key)]  # noqa: E731
        print(f"| {depth} | {m('drain_per_s'):.0f} | {m('scan_ms'):.1f} ms | {m('scan_us_per_file'):.1f} µs | "
              f"{m('take_ms'):.2f} ms |")
    print("\nTargets: median dispatch latency < 20 ms (paced), >= 500 requests/s end to end, claim cost flat "
          "from 100 to 10,000 pending.")
    print("\nChart (requests/s):")
    bars = [(f"burst, {c} worker(s)", med[(c, "requests_per_s")]) for c in workers] + \
           [(f"drain, {d} pending", med[(f"pending {d}", "drain_per_s")]) for d in depths]
    bar_chart(bars, "{:.0f}")


if __name__ == "__main__":
    main()
