"""``glmpool selftest``: the first thing to run after installing.

On any machine, without a download or a GPU: builds the tiny random model, starts a real pool
(``glmpool serve``, two cpu workers) on a temporary spool, answers requests in both protocol forms,
reads the status, SIGKILLs a worker in the middle of a generation and checks that the request is
still answered and the restart counted, then stops the pool with SIGTERM and checks nothing is left
behind. Prints one line per check and a verdict; exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

log = logging.getLogger(__name__)

QUESTION = "我喜欢吃橘子，你呢？"  # the original README's example


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


class SelftestError(Exception):
    """A check failed in a way that makes the following ones meaningless."""


class _Pool:
    """One ``glmpool serve`` subprocess on a spool, its console captured."""

    def __init__(self, spool: Path, model: Path, timeout: float) -> None:
        self.spool, self.timeout = spool, timeout
        cmd = [sys.executable, "-c", "import sys; from glmpool.cli import main; sys.exit(main())",
               "serve", "--gpus", "cpu,cpu", "--model", str(model), "--dir", str(spool),
               "--cache-dir", str(spool.parent / "cache"), "--poll-interval", "0.2",
               # Short default answers (the seed form has no parameters): the tiny model rambles.
               "--max-length", "64",
               "--log-level", "INFO", "--log-format", "plain", "--metrics-file", "",
               "--metrics-port", "0"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(var, None)  # a selftest run under systemd must not report for the pool
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=spool, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str) -> None:
        wait_for(lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
              self.timeout, f"console line {text!r}")
        if not any(text in line for line in self.lines):
            raise SelftestError(f"pool exited ({self.proc.returncode}) before {text!r}")

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, error: type = None) -> Any:
    """The predicate's first truthy value, polled every 50 ms; `error` (SelftestError) after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise (error or SelftestError)(f"timed out after {timeout:.0f}s waiting for {what}")


def _send_seed(requests: Path, rid: str, question: str) -> None:
    # The way the original clients do it: history first, then the request, not atomically.
    (requests / f"{rid}.history").write_text("\n", encoding="utf-8")
    (requests / f"{rid}.request").write_text(question + "\n", encoding="utf-8")


def _answer(spool: Path, rid: str, timeout: float) -> str:
    from . import client
    try:
        return client.wait(spool, rid, timeout)
    except client.ClientError as exc:
        raise SelftestError(f"request {rid}: {exc}") from None


def _status(spool: Path, timeout: float) -> dict[str, Any]:
    from . import client
    return client.status(spool, timeout)


def _workers(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in status.get("workers") or [] if isinstance(w, dict)]


def run(workdir: Path | None = None, timeout: float = 120.0, out: TextIO = sys.stdout,
        keep: bool = False) -> Report:
    """Run every check, writing one line per check to ``out``; returns the report."""
    report = Report()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="glmpool-selftest-"))
    spool, model = root / "spool", root / "tiny-model"
    spool.mkdir(parents=True, exist_ok=True)
    pool: _Pool | None = None

    def check(name: str, fn: Callable[[], str]) -> None:
        start = time.monotonic()
        try:
            detail, ok = fn(), True
        except Exception as exc:  # every failure becomes a report line, not a traceback
            detail, ok = f"{type(exc).__name__}: {exc}", False
        c = Check(name, ok, detail, time.monotonic() - start)
        report.checks.append(c)
        out.write(f"{'PASS' if ok else 'FAIL'}  {name:<48} {c.seconds:6.1f}s  {detail}\n")
        out.flush()
        if not ok:
            raise SelftestError(name)

    try:
        def build() -> str:
            from glmpool.engine.tiny import write_tiny_checkpoint
            write_tiny_checkpoint(model, seed=7)
            return str(model)
        check("build the tiny random model", build)

        def start() -> str:
            nonlocal pool
            pool = _Pool(spool, model, timeout)
            pool.wait_for_line("Loaded.")
            pool.wait_for_line("Running...")
            return f"pid {pool.proc.pid}"
        check("start a pool with two cpu workers", start)
        requests = spool / "requests"

        def seed_form() -> str:
            _send_seed(requests, "1", QUESTION)
            answer = _answer(spool, "1", timeout)
            wait_for(lambda: not (requests / "1.request").exists()
                  and not (requests / "1.history").exists(), timeout, "inputs removed")
            return f"{len(answer)} characters, inputs removed"
        check("seed protocol: 1.history + 1.request -> 1.back", seed_form)

        def json_form() -> str:
            from . import client
            ids = [client.submit(spool, f"{QUESTION} {i}", params={"max_new_tokens": 8, "seed": i})
                   for i in range(6)]
            for rid in ids:
                _answer(spool, rid, timeout)
            return f"{len(ids)} answered"
        check("JSON protocol: 6 requests at once", json_form)

        def status() -> str:
            st = _status(spool, timeout)
            running = [w for w in _workers(st) if str(w.get("state", "")).lower() == "running"]
            if st.get("status") != "running" or len(running) != 2:
                raise SelftestError(f"status {st.get('status')!r}, {len(running)} running workers")
            return f"running, 2 workers, {st.get('served')} served"
        check("status flag -> status.back", status)

        def kill_worker() -> str:
            from . import client
            # Long generations on both workers, so the kill lands in the middle of one.
            ids = [client.submit(spool, f"{QUESTION} long {i}",
                                 params={"max_length": 2048, "max_new_tokens": 120,
                                         "do_sample": False}) for i in range(4)]

            def busy_worker() -> dict[str, Any] | None:
                return next((w for w in _workers(_status(spool, timeout))
                             if int(w.get("in_flight") or 0) > 0 and w.get("pid")), None)
            victim = wait_for(busy_worker, timeout, "a worker generating")
            os.kill(int(victim["pid"]), signal.SIGKILL)
            for rid in ids:
                _answer(spool, rid, timeout)

            def recovered() -> dict[str, Any] | None:
                same = [w for w in _workers(_status(spool, timeout)) if w.get("id") == victim.get("id")]
                if same and int(same[0].get("restarts") or 0) >= 1 \
                        and str(same[0].get("state", "")).lower() == "running":
                    return same[0]
                return None
            w = wait_for(recovered, timeout, "the killed worker restarted")
            return (f"worker {victim.get('id')} killed with {victim.get('in_flight')} in flight; "
                    f"all {len(ids)} answered; restarts={w.get('restarts')}")
        check("SIGKILL a worker mid-generation", kill_worker)

        def stop() -> str:
            assert pool is not None
            code = pool.stop()
            if code != 0:
                raise SelftestError(f"exit status {code}")
            left = sorted(p.name for p in requests.iterdir()
                          if p.is_file() and p.suffix not in (".back", ".meta"))
            claims = requests / ".claims"
            # (dot files there are the lease clock probe, not claims)
            left += sorted(".claims/" + p.name for p in claims.iterdir()
                           if not p.name.startswith(".")) if claims.is_dir() else []
            if left:
                raise SelftestError(f"left in requests/: {left}")
            return "exit 0; only answers left in requests/"
        check("SIGTERM: clean stop", stop)
    except SelftestError:
        if pool is not None and pool.lines:
            out.write("---- pool console (last lines) ----\n" + pool.tail() + "\n")
    finally:
        if pool is not None:
            pool.stop()
        if keep or not report.ok:
            out.write(f"work directory kept: {root}\n")
        elif workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    out.write(f"selftest {'PASSED' if report.ok else 'FAILED'}: "
              f"{sum(c.ok for c in report.checks)}/{len(report.checks)} checks\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """``glmpool selftest [--timeout S] [--keep] [--workdir DIR]``; exit 0 on pass."""
    parser = argparse.ArgumentParser(prog="glmpool selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per step")
    parser.add_argument("--workdir", type=Path, help="use this directory instead of a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    args = parser.parse_args(argv)
    return 0 if run(args.workdir, args.timeout, keep=args.keep).ok else 1


if __name__ == "__main__":
    sys.exit(main())
