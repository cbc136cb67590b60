"""The pool's GPU-only branches, run on the CPU: what `bench/gpu.py --cpu-dry-run` reports and the test suite
asserts. Each check returns a selftest.Check: ok or not, with a one-line reason.

- device mapping: the CUDA_VISIBLE_DEVICES a real (spawned) worker process sets for itself, under a
  supervisor started with CUDA_VISIBLE_DEVICES of `2,3`, of GPU and MIG UUIDs, and of `0,-1,1`;
- budget split: workers placed on one GPU share it, and each takes its part of the KV-cache budget;
- pool: a real pool (`--model tiny-random`) survives a simulated CUDA out-of-memory in a batch step
  (worker.TEST_OOM_ENV) with every request answered at its first attempt, and serves with a GPU missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from . import gpus
from .selftest import Check, wait_for

OOM_MARKER = "OUT-OF-MEMORY-PLEASE"
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class FakeNvml:
    """NVML's view of a host with the given GPUs (uuid, index or None for a MIG instance)."""

    def __init__(self, *devices: tuple[str, int | None]):
        self.devices = [gpus.Gpu(uuid, index, "test GPU") for uuid, index in devices]

    def gpus(self) -> list[gpus.Gpu]:
        return self.devices

    def memory(self, uuid: str):
        return None

    def processes(self, uuid: str) -> dict:
        return {}


FOUR_GPUS = FakeNvml(*[(f"GPU-{i}aaaaaaa-0000-0000-0000-00000000000{i}", i) for i in range(4)],
                     ("MIG-5bbbbbbb-0000-0000-0000-000000000005", None))


def _report_environment(spec, conn) -> None:
    from .worker import set_device_environment
    set_device_environment(spec)
    conn.send((os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER")))


@contextmanager
def environment(**values: str | None):
    """These environment variables (None: unset) for the duration, as a supervisor started so would have them."""
    def apply(settings: dict) -> None:
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    saved = {name: os.environ.get(name) for name in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


def worker_sees(parent_visible: str, gpus_setting: str, nvml=None) -> list[str | None]:
    """What each worker's process sees as CUDA_VISIBLE_DEVICES (None: its GPU is missing, no process), placed
    by the supervisor's code under a parent CUDA_VISIBLE_DEVICES and started as the supervisor starts them."""
    import multiprocess

    from . import config
    from .supervisor import Supervisor, place_workers
    context = multiprocess.get_context("spawn")
    supervisor = Supervisor(config.resolve(argparse.Namespace(gpus=gpus_setting, dir=tempfile.gettempdir()),
                                           environ={}))
    seen = []
    with environment(CUDA_VISIBLE_DEVICES=parent_visible, CUDA_DEVICE_ORDER=None):
        placements = place_workers(gpus_setting, nvml, os.environ)
        for wid, placement in enumerate(placements):
            if placement.missing:
                seen.append(None)
                continue
            receive, send = context.Pipe(duplex=False)
            spec = supervisor.slot(wid, placement, placements).spec
            process = context.Process(target=_report_environment, args=(spec, send))
            process.start()
            try:
                visible, order = receive.recv() if receive.poll(60) else (None, None)
            finally:
                process.join(10)
                if process.is_alive():
                    process.kill()
            seen.append(visible if order == gpus.DEVICE_ORDER else f"{visible} (order {order})")
    return seen


def check_mapping(name: str, parent: str, gpus_setting: str, expected: list, nvml=None) -> Check:
    started = time.monotonic()
    try:
        seen = worker_sees(parent, gpus_setting, nvml)
    except Exception as error:  # a check reports, it does not crash the run
        seen = f"{type(error).__name__}: {error}"
    ok = seen == expected
    return Check(name, ok, f"CUDA_VISIBLE_DEVICES={parent} --gpus {gpus_setting}: workers see {seen}"
                           + ("" if ok else f", expected {expected}"), time.monotonic() - started)


_GPU, _MIG = FOUR_GPUS.devices[3].uuid, FOUR_GPUS.devices[4].uuid
MAPPINGS = [  # (name, the supervisor's CUDA_VISIBLE_DEVICES, --gpus, what each worker sees, NVML)
    ("device mapping, parent 2,3", "2,3", "0,1", ["2", "3"], None),
    ("device mapping, parent UUIDs", f"{_GPU},{_MIG}", "0,1", [_GPU, _MIG], FOUR_GPUS),
    ("device mapping, parent 0,-1,1", "0,-1,1", "0,1", ["0", None], None),
]


def mapping_checks() -> list[Check]:
    return [check_mapping(*mapping) for mapping in MAPPINGS]


def check_budget_split(cache_dir: Path) -> Check:
    """--gpus 0,0,1: the two workers of GPU 0 each take their part of its free memory for KV caches,
    together no more than one would alone, after both copies of the model."""
    started = time.monotonic()
    from .engine import api, load
    from .supervisor import place_workers
    with environment(CUDA_VISIBLE_DEVICES="0,1"):
        sharing = [p.sharing for p in place_workers("0,0,1", None, os.environ)]
    engine = load("tiny-random", cache_dir=cache_dir, progress=False)
    free, weights = 1 << 30, 300 << 20  # measured after this worker's load: free memory, its model's bytes
    with mock.patch.object(api, "free_memory", lambda device: free):
        alone = engine.default_kv_tokens()
        shared = engine.default_kv_tokens(sharing=2, model_bytes=weights)
    per_token = engine.kv_bytes_per_token()
    kv_room = free - weights  # once the second copy is loaded too
    ok = sharing == [2, 2, 1] and 2 * shared * per_token <= 0.8 * kv_room < 2 * (shared + 1) * per_token
    return Check("KV budget split on a shared GPU", ok,
                 f"workers per GPU {sharing}; KV tokens alone {alone}, each of two {shared}: together "
                 f"{2 * shared * per_token / kv_room:.0%} of what both models leave free", time.monotonic() - started)


class PoolRun:
    """`glmpool serve` in its own session on a temporary spool, killed (with its workers) at the end."""

    def __init__(self, root: Path, cache_dir: Path, *args: str, env: dict | None = None):
        self.root = root
        self.log_path = root / "pool.log"
        root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", "import sys; from glmpool.cli import main; sys.exit(main())", "serve",
                   "--model", "tiny-random", "--cache-dir", str(cache_dir), "--dir", str(root),
                   "--poll-interval", "0.2", "--worker-threads", "1", "--metrics-file", "", "--metrics-port", "0",
                   *args]
        path = os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
        environ = {**os.environ, "PYTHONPATH": path, **(env or {})}
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            environ.pop(name, None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=root,
                                            start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        from . import client
        return client.status(self.root, 30)

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)


def out_of_memory_checks(cache_dir: Path, workdir: Path | None = None, timeout: float = 180) -> list[Check]:
    """One pool, a cpu worker and a GPU that is not there (CUDA_VISIBLE_DEVICES empty): it serves, reports the
    missing GPU, and survives an out-of-memory in a batch step holding every request to its first attempt."""
    started = time.monotonic()
    root = Path(workdir or tempfile.mkdtemp(prefix="glmpool-gpucheck-"))
    checks = []
    pool = PoolRun(root, cache_dir, "--gpus", "cpu,1", "--max-batch", "4",
                   env={"CUDA_VISIBLE_DEVICES": "", "GLMPOOL_TEST_OOM_ON": OOM_MARKER})
    try:
        wait_for(lambda: "Running..." in pool.output() or pool.process.poll() is not None, timeout, "Running...")
        if pool.process.poll() is not None:
            reason = pool.output().strip().splitlines()[-1:] or ["no output"]
            return [Check("pool with a missing GPU", False, f"the pool exited: {reason[0]}")]
        before = pool.status()
        missing = before["workers"][1]
        checks += [Check("pool with a missing GPU", missing["state"] == "FATAL" and "does not exist" in
                        str(missing["last_error"]) and before["workers"][0]["state"] == "RUNNING",
                        f"worker 1 {missing['state']}: {missing['last_error']}", time.monotonic() - started)]
        started = time.monotonic()
        from .spool import atomic_write
        requests = root / "requests"
        ids = [f"oom{i}" for i in range(4)]
        for i, rid in enumerate(ids):  # together: the worker admits the four into one batch
            query = f"{OOM_MARKER} {i}" if i == 1 else f"question {i}"
            atomic_write(requests / f"{rid}.json", json.dumps({"query": query, "max_new_tokens": 8,
                                                               "do_sample": False}))
        wait_for(lambda: all((requests / f"{rid}.back").exists() or (requests / f"{rid}.error").exists()
                             for rid in ids), timeout, "the four answers")
        after = pool.status()["workers"][0]
        attempts = [json.loads((requests / f"{rid}.meta").read_text())["attempts"]
                    if (requests / f"{rid}.meta").exists() else "error" for rid in ids]
        ok = (attempts == [1] * 4 and after["pid"] == before["workers"][0]["pid"] and after["restarts"] == 0
              and after["out_of_memory"] >= 1 and after["max_batch"] < 4 and "ran out of memory" in pool.output())
        checks.append(Check("worker survives an out-of-memory batch step", ok,
                            f"{after['out_of_memory']} out-of-memory step(s), worker pid kept "
                            f"{after['pid'] == before['workers'][0]['pid']}, restarts {after['restarts']}, "
                            f"admits {after['max_batch']} of 4, attempts {attempts}", time.monotonic() - started))
    except Exception as error:
        checks.append(Check("pool checks", False, f"{type(error).__name__}: {error}"))
    finally:
        pool.kill()
    if workdir is None and all(check.ok for check in checks):
        shutil.rmtree(root, ignore_errors=True)
    elif not all(check.ok for check in checks):
        checks[-1].detail += f" (pool log: {pool.log_path})"
    return checks


def run_all(cache_dir: Path | None = None) -> list[Check]:
    """Every pool-level check; cache_dir holds the tiny model (built there if absent)."""
    from .engine.tiny import cached_tiny_checkpoint
    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "glmpool-gpucheck")
    cached_tiny_checkpoint(cache_dir)
    return [*mapping_checks(), check_budget_split(cache_dir), *out_of_memory_checks(cache_dir)]


def main() -> int:
    checks = run_all()
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
