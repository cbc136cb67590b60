"""The timing harness the bench/ scripts share: interleaved rounds, percentiles, the machine's description,
the medium random checkpoint and a pool run as a bounded subprocess.

Run the scripts with glmpool importable (installed, or PYTHONPATH at the checkout): they import the
package and this module, never each other. The machines are shared and noisy, so every bench interleaves
its variants round by round and reports medians of per-round figures and ratios (docs/benchmarks.md).
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# children import glmpool from this checkout, and spool.py's instant server from here
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, one list entry per round; every round runs each function `inner`
    times in turn, so a noisy neighbour slows them alike. Each runs once first (warm-up)."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                f()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bar_chart(bars: list[tuple[str, float]], number: str) -> None:
    """Print labelled ASCII bars scaled to the largest value (the README's charts)."""
    top = max(value for _, value in bars)
    width = max(len(label) for label, _ in bars)
    for label, value in bars:
        print(f"    {label:<{width}} {'#' * max(1, round(40 * value / top)):<40} {number.format(value)}")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end")


MEDIUM = dict(layers=8, hidden=1024, heads=16, inner=4096, vocab=130528, seed=0)


def medium_checkpoint(cache: Path) -> Path:
    """The medium random checkpoint (MEDIUM, fp16 like THUDM's), built once into `cache`."""
    from glmpool.engine.tiny import write_tiny_checkpoint

    target = cache / "bench-medium-v1"
    if not (target / "config.json").is_file():
        print(f"building the medium random checkpoint in {target} ...", file=sys.stderr)
        write_tiny_checkpoint(target, **MEDIUM)
    return target


class Server:
    """A pool process in its own session (killpg by its pid reaches its workers), bounded and cleaned up."""

    def __init__(self, root: Path, args: list[str], instant: bool = True, env: dict | None = None):
        self.root = root
        if instant:
            code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import spool; sys.exit(spool.serve_instant(sys.argv[1:]))"
        else:
            code = "import sys; from glmpool.cli import main; sys.exit(main())"
        self.cmd = [sys.executable, "-c", code, "--dir", str(root), "--log-level", "WARNING", *args]
        self.env = {**ENV, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.log_path = root / "server.log"

    def __enter__(self) -> "Server":
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.root, start_new_session=True)
        return self

    def wait_running(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while "Running..." not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pool did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        (self.root / "flags").mkdir(parents=True, exist_ok=True)
        (self.root / "flags" / "quit.flag").touch()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of this pool, by its session id
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.log.close()


def write_request(requests: Path, rid: str, body: dict) -> None:
    """Atomically, as new clients should: temp file in requests/, then rename."""
    temp = requests / f".{rid}.tmp"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(json.dumps(body) + "\n")
    os.rename(temp, requests / f"{rid}.json")
