#!/usr/bin/env python3
"""Randomized fault injection: several supervisors share one spool while workers and supervisors are
SIGKILLed, supervisors are restarted (as systemd would), and gracefully restarted at random.

A trial starts `--supervisors` supervisors (host ids h0, h1, ...) with `--workers` cpu workers each on one
directory, writes `--requests` requests over time (old-client seed form, written non-atomically, and JSON
written atomically), and meanwhile, every `--interval` seconds on average (exponential), does one of:
  worker      SIGKILL one RUNNING worker (pids from the supervisors' heartbeat files in flags/.hosts/)
  supervisor  SIGKILL one supervisor alone (its workers notice and exit); restarted after 0.2-1.5 s, or
              sometimes only after the lease has expired, so another host has to take its claims over
  host        SIGKILL a supervisor's whole process group (supervisor and workers at once)
  restart     SIGTERM (graceful stop with a short grace time), then start again
When every request has its answer, the supervisors are stopped and the trial checks:
  - every request has exactly one outcome: a .back or an .error, never both, never neither;
  - no .back/.error was written twice: an inotify watcher counts every creation of (and rename onto)
    each outcome name in requests/ while the trial runs, so an answer deleted and written again, or
    replaced, is seen even though only one file is left at the end (queue overflows are reported);
  - each .back agrees with its .meta (the last history turn is the .back text, same id): a duplicate
    publication that overwrote .meta next to an older .back shows up here;
  - nothing is left behind: no inputs in requests/, no claim records or claimed inputs in .claims/, no
    temp files (.*.tmp) anywhere in the spool, no heartbeat files in flags/.hosts/ (every supervisor is
    stopped by then), and failed/ holds inputs only of requests that failed.

    python bench/faults.py --trials 10 --requests 300          # prints one JSON line per trial and a total
    python bench/faults.py --until-kills 1000 --json-out faults.json

Everything started here runs in its own session and is killed by process group at the end of a trial.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from glmpool import spool  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
GLMPOOL = [sys.executable, "-c", "import sys; from glmpool.cli import main; sys.exit(main())"]
OUTCOMES = (".back", ".error")
IN_CREATE, IN_MOVED_TO, IN_MOVED_FROM, IN_DELETE, IN_Q_OVERFLOW = 0x100, 0x80, 0x40, 0x200, 0x4000
EVENT = struct.Struct("iIII")


class CreateCounter:
    """Counts, per name, how often a file was created in (or renamed into) one directory, via inotify.
    A hard link (how .back is published) is an IN_CREATE; os.replace (how .error is) an IN_MOVED_TO.
    Deletions are watched too, though not counted: the kernel merges an event identical to the last one
    still queued, so create, delete, create of one name would otherwise read as a single creation."""

    def __init__(self, directory: Path, suffixes: tuple[str, ...]):
        self.suffixes = suffixes
        self.counts: Counter = Counter()
        self.overflows = 0
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, os.fsencode(directory),
                                                     IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {directory}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="create-counter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                self._drain()
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                _, mask, _, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size: offset + EVENT.size + length].rstrip(b"\0").decode("utf-8", "replace")
                offset += EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    self.overflows += 1
                elif mask & (IN_CREATE | IN_MOVED_TO) and name.endswith(self.suffixes) and not name.startswith("."):
                    self.counts[name] += 1

    def close(self) -> Counter:
        self._stop.set()
        self._thread.join(5)
        os.close(self.fd)
        return self.counts


@dataclass
class Host:
    """One supervisor of the trial, as systemd would run it: restarted whenever it is down."""
    name: str
    cmd: list
    log_path: Path
    process: subprocess.Popen | None = None
    groups: list = field(default_factory=list)  # every process group ever started (for the final kill)
    down_until: float = 0.0  # when down: restart at this time
    stopping_since: float | None = None  # SIGTERM sent at
    starts: int = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts} at {time.time():.3f}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**ENV, "GLMPOOL_HOST_ID": self.name}, cwd=self.log_path.parent)
        self.groups.append(self.process.pid)
        self.starts += 1
        self.stopping_since = None

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def killpg_all(self) -> None:
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def heartbeat(root: Path, host: Host) -> dict | None:
    """The supervisor's own status from its heartbeat file (at most a second old)."""
    if not host.up:
        return None
    try:
        return json.loads((root / "flags" / ".hosts" / f"{host.name}.{host.process.pid}.json").read_text())
    except (OSError, ValueError):
        return None


def write_request(requests: Path, rid: str, rng: random.Random) -> None:
    if rng.random() < 0.5:  # what old clients do: history first, then the question, neither atomically
        (requests / f"{rid}.history").write_text("\n" if rng.random() < 0.7 else '[["hi", "hello"]]\n')
        (requests / f"{rid}.request").write_text(f"question {rid}, tell me something\n")
    else:
        body = {"query": f"question {rid}", "max_new_tokens": rng.randint(4, 64), "seed": rng.randint(0, 1 << 30)}
        if rng.random() < 0.3:
            body["history"] = [["a", "b"]]
        spool.atomic_write(requests / f"{rid}.json", json.dumps(body))


def outcomes(requests: Path) -> dict[str, set]:
    found: dict[str, set] = {}
    for entry in os.scandir(requests):
        parts = spool.split_name(entry.name)
        if parts and parts[1] in OUTCOMES:
            found.setdefault(parts[0], set()).add(parts[1])
    return found


def temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp"))


def verify(root: Path, ids: list[str], creates: Counter, overflows: int = 0) -> tuple[list[str], set]:
    """The end-of-trial checks on a stopped spool: (violations, ids that ended in an .error)."""
    req_dir = root / "requests"
    violations: list[str] = []
    done = outcomes(req_dir)
    failed_ids = set()
    for rid in ids:
        kinds = done.get(rid, set())
        if len(kinds) != 1:
            violations.append(f"{rid}: outcomes {sorted(kinds) or 'none'}")
        for suffix in OUTCOMES:
            if creates[rid + suffix] > 1:
                violations.append(f"{rid}{suffix} written {creates[rid + suffix]} times")
        if ".error" in kinds:
            failed_ids.add(rid)
        if kinds == {".back"}:
            back = (req_dir / f"{rid}.back").read_text(encoding="utf-8")
            try:
                meta = json.loads((req_dir / f"{rid}.meta").read_text(encoding="utf-8"))
                if meta.get("id") != rid or meta["history"][-1][1] != back:
                    violations.append(f"{rid}.meta (claim {meta.get('claim')}) disagrees with {rid}.back")
            except (OSError, ValueError, KeyError, IndexError) as error:
                violations.append(f"{rid}.meta unreadable: {error}")
    left = [p.name for p in req_dir.iterdir() if p.is_file() and p.suffix in spool.INPUT_SUFFIXES + (".partial",)
            and not p.name.startswith(".")]
    claims_left = [p.name for p in (req_dir / ".claims").iterdir() if not p.name.startswith(".")] \
        if (req_dir / ".claims").is_dir() else []
    stray_failed = sorted({p.name.split(".", 1)[0] for p in (req_dir / "failed").iterdir()} - failed_ids) \
        if (req_dir / "failed").is_dir() else []
    beats = [p.name for p in (root / "flags" / ".hosts").glob("*.json")] if (root / "flags" / ".hosts").is_dir() else []
    for what, names in (("inputs or partials left in requests/", left), ("claims left", claims_left),
                        ("heartbeat files of dead supervisors left", beats),
                        ("temp files left", temp_files(root)), ("failed/ inputs of answered requests", stray_failed)):
        if names:
            violations.append(f"{what}: {names[:10]}{' ...' if len(names) > 10 else ''}")
    if overflows:
        violations.append(f"inotify queue overflowed {overflows} times: duplicate count incomplete")
    return violations, failed_ids


def run_trial(root: Path, cache_dir: Path, *, requests: int = 300, supervisors: int = 3, workers: int = 2,
              interval: float = 1.0, submit_seconds: float = 20.0, lease: float = 5.0, max_length: int = 160,
              seed: int = 0, timeout: float = 600.0, weights: dict | None = None, long_down: float = 0.15,
              min_kills: int = 0, min_serving: float = 0.5, progress=None) -> dict:
    """One trial in `root` (created); returns counts and the list of `violations` (empty: all good).
    Faults go on until every request is answered and at least `min_kills` kills were made."""
    rng = random.Random(seed)
    weights = weights or {"worker": 75, "supervisor": 12, "host": 5, "restart": 8}
    root.mkdir(parents=True, exist_ok=True)
    req_dir = root / "requests"
    req_dir.mkdir(exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    cmd = GLMPOOL + ["serve", "--gpus", ",".join(["cpu"] * workers), "--model", "tiny-random",
                     "--cache-dir", str(cache_dir), "--dir", str(root), "--worker-threads", "1",
                     "--max-length", str(max_length), "--max-batch", "8", "--poll-interval", "0.2",
                     "--lease-seconds", str(lease), "--grace-seconds", "1", "--heartbeat-timeout", "20",
                     "--log-level", "INFO"]
    hosts = [Host(f"h{i}", cmd, logs / f"h{i}.log") for i in range(supervisors)]
    counter = CreateCounter(req_dir, OUTCOMES)
    ids = [f"r{seed}-{i}" for i in range(requests)]
    submit_at = sorted(rng.uniform(0, submit_seconds) for _ in ids)
    kills: Counter = Counter()
    started = time.monotonic()
    deadline = started + timeout
    next_fault = started + rng.expovariate(1 / interval)
    submitted = 0
    shown = started
    settle_until = None
    result: dict = {"seed": seed, "requests": requests, "supervisors": supervisors, "workers": workers}
    try:
        for host in hosts:
            host.start()
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError("trial timed out")
            while submitted < len(ids) and now - started >= submit_at[submitted]:
                write_request(req_dir, ids[submitted], rng)
                submitted += 1
            for host in hosts:  # systemd: restart whatever is down
                if host.stopping_since is not None:
                    if host.up and now - host.stopping_since > 30:
                        os.killpg(host.process.pid, signal.SIGKILL)  # the stop timeout
                    if not host.up:
                        host.stopping_since = None
                        host.down_until = now + rng.uniform(0.1, 0.5)
                elif not host.up:
                    if host.down_until == 0.0:  # exited by itself (e.g. every worker FATAL)
                        host.down_until = now + 1.0
                    elif now >= host.down_until:
                        host.start()
                        host.down_until = 0.0
            done = outcomes(req_dir)
            if settle_until is None and submitted == len(ids) and all(rid in done for rid in ids) \
                    and sum(v for k, v in kills.items() if k != "restart") >= min_kills:
                result["seconds_to_answer"] = round(now - started, 1)
                settle_until = now + max(3 * lease + 5, 30)  # quiet: orphans, temp and heartbeat files get cleaned up
            if settle_until is not None:
                # heartbeat files named <host>.<pid>.json of supervisors that are gone (by pid, not by count: a
                # host just restarted may not have written its own yet)
                live = {str(h.process.pid) for h in hosts if h.up}
                stale = [b for b in (root / "flags" / ".hosts").glob("*.json") if b.stem.rsplit(".", 1)[-1] not in live]
                if now >= settle_until or not (temp_files(root) or any((req_dir / ".claims").glob("[!.]*"))
                                               or stale):
                    break
            elif now >= next_fault:
                next_fault = now + rng.expovariate(1 / interval)
                kind = inject(rng, weights, hosts, root, lease, long_down, supervisors * workers, min_serving)
                if kind:
                    kills[kind] += 1
            if progress and now >= shown + 10:
                shown = now
                progress(f"t={now - started:.0f}s submitted={submitted} answered={len(done)} kills={dict(kills)}")
            time.sleep(0.05)
        for host in hosts:  # a clean stop: nothing may be left behind
            if host.up:
                host.process.send_signal(signal.SIGTERM)
        for host in hosts:
            if host.process is not None:
                try:
                    host.process.wait(60)
                except subprocess.TimeoutExpired:
                    result.setdefault("violations", []).append(f"{host.name} did not stop within 60 s")
    finally:
        for host in hosts:
            host.killpg_all()
        creates = counter.close()
    violations, failed_ids = verify(root, ids, creates, counter.overflows)
    result.setdefault("violations", []).extend(violations)
    violations = result["violations"]
    logs_text = "".join(h.log_path.read_text(errors="replace") for h in hosts)
    errors = Counter()
    for rid in failed_ids:
        text = (req_dir / f"{rid}.error").read_text(encoding="utf-8", errors="replace")
        errors[text.splitlines()[0][:60]] += 1
    result.update({
        "kills": sum(v for k, v in kills.items() if k != "restart"), "faults": dict(kills),
        "starts": sum(h.starts for h in hosts), "answered": len(ids) - len(failed_ids), "errors": dict(errors),
        "late_answers_dropped": logs_text.count("dropping this late answer"),
        "duplicates_refused": logs_text.count("already exists; not replacing"),
        "reruns_dropped": logs_text.count("dropping this rerun"),
        "adopted": logs_text.count("adopted "),
        # a worker still loading when its supervisor was killed dies on its first send: not a pool error
        "tracebacks": logs_text.count("Traceback") - logs_text.count("\nBrokenPipeError: [Errno 32] Broken pipe"),
    })
    if result["tracebacks"]:
        violations.append(f"{result['tracebacks']} tracebacks in the supervisor logs")
    return result


def inject(rng: random.Random, weights: dict, hosts: list[Host], root: Path, lease: float, long_down: float,
           total_workers: int, min_serving: float = 0.5):
    """One fault; returns its kind, or None when nothing suitable was running."""
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    live = [h for h in hosts if h.up and h.stopping_since is None]
    if not live:
        return None
    # Faults wait while fewer than half of all workers serve: the kill rate then follows how fast this
    # machine restarts workers, and requests keep flowing in between (else every worker would be killed
    # the moment it loads and the trial would only measure torch imports).
    serving = sum(1 for h in live for w in (heartbeat(root, h) or {}).get("workers", []) if w.get("state") == "RUNNING")
    if serving < min_serving * total_workers:
        return None
    if kind != "worker":  # a supervisor holding claims, when there is one: that is where it matters
        busy = [h for h in live if ((heartbeat(root, h) or {}).get("queue") or {}).get("in_progress")]
        live = busy if busy and rng.random() < 0.8 else live
    host = rng.choice(live)
    status = heartbeat(root, host)
    if kind == "worker":
        running = [w for w in (status or {}).get("workers", []) if w.get("state") == "RUNNING" and w.get("pid")]
        busy = [w for w in running if w.get("in_flight")]
        if not running:
            return None
        victim = rng.choice(busy if busy and rng.random() < 0.8 else running)
        if parent_pid(victim["pid"]) != host.process.pid:  # gone since the heartbeat (never kill a reused pid)
            return None
        os.kill(victim["pid"], signal.SIGKILL)
        return kind
    # Supervisors are hit once they serve: on a loaded 2-core machine, killing them while their workers
    # still load torch would only ever test startup (and starve the run).
    if (status or {}).get("status") != "running":
        return None
    now = time.monotonic()
    if kind == "supervisor":
        host.process.kill()  # the supervisor alone; its workers see the pipe close and exit
    elif kind == "host":
        os.killpg(host.process.pid, signal.SIGKILL)
    else:
        host.process.send_signal(signal.SIGTERM)
        host.stopping_since = now
        return kind
    host.process.wait(10)
    # systemd's RestartSec; sometimes the host stays down past the lease, so another one must adopt
    host.down_until = now + (lease + rng.uniform(1, 3) if rng.random() < long_down else rng.uniform(0.2, 1.5))
    return kind


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/glmpool-faults"), help="trials run in DIR/trial-N")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "glmpool")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--until-kills", type=int, default=0, help="keep running trials until this many kills")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--supervisors", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=1.0, help="mean seconds between faults")
    parser.add_argument("--submit-seconds", type=float, default=60.0, help="requests are written over this long")
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--min-serving", type=float, default=0.5,
                        help="inject only while at least this fraction of all workers is RUNNING")
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--timeout", type=float, default=1200.0, help="a trial not done by then is a failure")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the spools of good trials too")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # clean up the trial's processes too
    from glmpool.engine.tiny import cached_tiny_checkpoint
    cached_tiny_checkpoint(args.cache_dir)
    totals: Counter = Counter()
    trials = []
    n = 0
    begun = time.time()
    while n < args.trials or totals["kills"] < args.until_kills:
        root = args.dir / f"trial-{args.seed + n}"
        if root.exists():
            subprocess.run(["rm", "-rf", str(root)], check=True)
        progress = (lambda m: print("   ", m, file=sys.stderr, flush=True)) if args.verbose else None
        try:
            result = run_trial(root, args.cache_dir, requests=args.requests, supervisors=args.supervisors,
                               workers=args.workers, interval=args.interval, submit_seconds=args.submit_seconds,
                               lease=args.lease, max_length=args.max_length, seed=args.seed + n,
                               timeout=args.timeout, min_serving=args.min_serving, progress=progress)
        except TimeoutError as error:
            result = {"seed": args.seed + n, "violations": [str(error)], "kills": 0, "requests": args.requests}
        trials.append(result)
        print(json.dumps(result), flush=True)
        for key in ("requests", "kills", "answered", "starts", "late_answers_dropped", "duplicates_refused",
                    "reruns_dropped", "adopted"):
            totals[key] += result.get(key, 0)
        for key, value in result.get("faults", {}).items():
            totals["fault_" + key] += value
        totals["errors"] += sum(result.get("errors", {}).values())
        totals["violations"] += len(result["violations"])
        if not result["violations"] and not args.keep:
            subprocess.run(["rm", "-rf", str(root)], check=True)
        n += 1
    summary = {"trials": n, **totals, "minutes": round((time.time() - begun) / 60, 1)}
    print(json.dumps({"total": summary}), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"total": summary, "trials": trials}, indent=1))
    return 1 if totals["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
