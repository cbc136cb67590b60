"""The supervisor: owns the spool, claims requests, feeds one worker process per device, keeps them alive.

Shaped like gunicorn's arbiter: signal handlers only enqueue; one loop manages everything:
collect worker messages, reap dead workers, murder hung ones, spawn replacements after a capped
exponential backoff, look at the flags, claim and dispatch requests, renew leases, publish status.
Worker states follow supervisord: STARTING -> RUNNING, BACKOFF after a crash, FATAL when a device keeps
failing to start (the other workers keep serving), or a GPU missing at start. The supervisor never
imports torch; what it knows of the GPUs comes from NVML (gpus.py).
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import signal
import stat
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, gpus, spool
from .claims import Claim, Claims, main_input
from .config import Config
from .watch import DirWatch
from .worker import WorkerSpec

log = logging.getLogger("glmpool")

MAX_ATTEMPTS = 3  # a request that crashed workers this often fails
MAX_START_FAILURES = 3  # a device that failed to start this often in a row becomes FATAL
BACKOFF_CAP = 30.0
PUBLISH_RETRY_FIRST, PUBLISH_RETRY_CAP = 0.5, 10.0  # backoff for a result the spool refused (full disk)
HOST_BEAT_SECONDS = spool.HOST_BEAT_SECONDS
LOOP_SECONDS = 0.1  # longest sleep of the main loop: flags and signals are seen within this


class StartupError(Exception):
    """Bad setup detected before any worker starts (e.g. a GPU index that does not exist)."""


@dataclass
class Job:
    claim: Claim
    request: spool.Request
    claimed: float = 0.0
    deadline: float | None = None
    worker: int | None = None
    started: float = 0.0  # when it was given to a worker
    text: str = ""
    tokens: int = 0
    cancelling: bool = False


@dataclass
class Slot:
    """One worker's place: its spec, current process and pipes, state and lifetime counters."""
    spec: WorkerSpec
    # STARTING (without a process: waiting its turn to load) -> RUNNING; BACKOFF after a death; FATAL;
    # EXITED while stopping
    state: str = "STARTING"
    process: object = None
    tasks: object = None  # queue to the worker
    inbox: object = None  # the read end of the worker's own pipe
    pid: int | None = None
    jobs: dict = field(default_factory=dict)  # claim token -> Job
    served: int = 0
    failed: int = 0
    restarts: int = 0
    deaths_in_a_row: int = 0  # drives the backoff
    start_failures: int = 0
    last_error: str | None = None
    retry_at: float = 0.0
    last_seen: float = 0.0
    tokens: int = 0
    rate: float = 0.0
    stats: dict = field(default_factory=dict)
    out_of_memory: int = 0  # steps that ran out of device memory (the worker survived them)
    gpu: str | None = None  # its physical GPU (gpus.Placement.key); None for a cpu worker

    @property
    def isolating(self) -> bool:
        """Running a requeued job, alone: it may be what killed a worker, and must not take others with it."""
        return any(job.claim.attempts for job in self.jobs.values())


def place_workers(gpus_setting: str, nvml: gpus.Nvml | None, environ=os.environ) -> list[gpus.Placement]:
    """Where each worker runs (gpus.place_workers), a layout that cannot serve at all a StartupError."""
    try:
        return gpus.place_workers(gpus_setting, environ, nvml)
    except gpus.DeviceError as error:
        raise StartupError(str(error)) from None


class Supervisor:
    def __init__(self, config: Config):
        self.config = config
        self.root = Path(config.dir).resolve()
        self.requests = self.root / "requests"
        self.flags = self.root / "flags"
        self.claims = Claims(self.requests, config.host_id, config.lease_seconds)
        self.status = "starting"
        self.started = time.time()
        self.exit_code = 0
        self.signals: deque = deque()
        self.pending: deque[Job] = deque()  # claimed, waiting for a worker (requeued or adopted)
        self.backlog: deque = deque()  # (id, names) from the last scan, in dispatch order, not yet looked at
        self.priorities: dict[str, tuple] = {}  # id -> (mtime_ns, size, priority) of .json inputs seen by scan
        self.dirty = True  # something may have arrived since the last scan
        self.cancels_due = True  # a .cancel may have appeared since watch_cancels() last looked
        self.slots: list[Slot] = []
        self.context = None
        self.stop_deadline: float | None = None
        self.served = self.failed = 0
        self.timers: dict[str, float] = {}
        self.tick_hooks: list = []  # callables(status dict, event=...): "ready", "tick" (every second), "stopping"
        self.watch: DirWatch | None = None
        self.unpublished: list = []  # [due, delay, claim, what, action]: results the spool refused, retried
        self.answers: list = []  # (slot, job, text, meta) read from a worker, to publish together
        self.nvml: gpus.Nvml | None = None
        self.status_owed: float | None = None  # when a status.flag taken may next be answered (after a refusal)
        self.status_delay = PUBLISH_RETRY_FIRST
        self.not_flags: dict[str, tuple] = {}  # flag name -> (st_dev, st_ino) of the directory there, logged once

    # --- life cycle ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; the exit code (0, or 1 when no worker could start)."""
        os.umask(self.config.umask)
        self.nvml = gpus.Nvml.open()
        placements = place_workers(self.config.gpus, self.nvml)
        try:
            self.claims.ensure_dirs()
        except NotADirectoryError as error:
            raise StartupError(error.strerror) from None
        try:
            (self.flags / ".hosts").mkdir(parents=True, exist_ok=True)
        except OSError as error:  # e.g. flags/ is a file
            raise StartupError(f"cannot use {self.flags / '.hosts'} as a directory: {error.strerror}") from None
        self.guarded(self.clear_stale_quit_flag)
        import multiprocess
        self.context = multiprocess.get_context("spawn")
        self.slots = [self.slot(i, placement, placements) for i, placement in enumerate(placements)]
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        self.watch = DirWatch(self.requests, self.flags, suffixes=spool.INPUT_SUFFIXES + (".cancel", ".flag"))
        self.queue_pending(self.claims_to_jobs(self.claims.orphans()))
        self.respawn()  # STARTING without a process: each starts when it may load (see respawn)
        log.info("supervisor %d on %s: %d worker(s) on %s, spool %s", os.getpid(), self.config.host_id,
                 len(self.slots), ",".join(s.spec.label for s in self.slots), self.root)
        if sum(s.spec.loads_on_host for s in self.slots) > 1:
            log.info("workers whose model passes through host memory (cpu, or quantized at load) load one at a time")
        try:
            while not self.manage():
                pass
        finally:
            self.shutdown()
        return self.exit_code

    def slot(self, wid: int, placement: gpus.Placement, placements: list[gpus.Placement]) -> Slot:
        """A worker's slot; one on a GPU missing at start is FATAL from the outset, as after its GPU died."""
        c = self.config
        threads = c.worker_threads
        if not threads and placement.device == "cpu":  # cpu workers share the cores instead of fighting over them
            threads = max(1, len(os.sched_getaffinity(0)) // sum(p.device == "cpu" for p in placements))
        slot = Slot(WorkerSpec(wid, placement.device, c.model, c.dtype, c.quantize, c.cache_dir, c.max_batch,
                               c.kv_cache_gb, threads, c.partial_seconds, c.partial_tokens, c.matmul,
                               placement.visible, placement.sharing, c.compile == "on", revision=c.revision,
                               quantized_activations=c.quantized_activations,
                               log_level=c.log_level, log_format=c.log_format))
        slot.gpu = None if placement.device == "cpu" or placement.missing else placement.key
        if placement.missing:
            slot.state, slot.last_error = "FATAL", placement.missing
            log.error("worker %d (%s): %s; the other workers serve", wid, slot.spec.label, placement.missing)
        elif placement.sharing > 1:
            log.info("worker %d (%s) shares its GPU with %d other worker(s): it takes 1/%d of its free memory for "
                     "KV caches", wid, slot.spec.label, placement.sharing - 1, placement.sharing)
        return slot

    def manage(self) -> bool:
        """One round of the main loop; True when it is time to exit."""
        self.collect(timeout=LOOP_SECONDS)
        changed = self.watch.changed()
        self.dirty |= changed
        self.cancels_due |= changed
        self.handle_signals()
        self.reap()
        self.murder()
        self.respawn()
        self.guarded(self.check_flags)
        if self.status == "running":
            self.guarded(self.dispatch)
        elif self.status == "starting" and self.all_started():
            self.announce()
        self.retry_publish()
        self.every("renew", max(0.5, self.config.lease_seconds / 4), self.claims.renew)
        self.every("orphans", max(1.0, self.config.lease_seconds / 2), self.adopt_orphans)
        self.every("host", HOST_BEAT_SECONDS, self.beat)
        if all(s.state == "FATAL" for s in self.slots):
            errors = "; ".join(sorted({s.last_error for s in self.slots if s.last_error})) or "see the log"
            log.error("no worker could start, giving up: %s", errors)
            self.exit_code = 1
            return True
        return self.status == "stopping" and self.drained()

    def every(self, name: str, seconds: float, action, due: bool = False) -> None:
        """Run `action` (guarded) once `seconds` have passed since it last ran, or now if `due`."""
        now = time.monotonic()
        if due or now >= self.timers.get(name, 0.0):
            self.timers[name] = now + seconds
            self.guarded(action)

    @staticmethod
    def guarded(action) -> None:
        """Spool work: a hiccup (full disk, NFS, a directory deleted under us) is logged and retried by
        the next round, never allowed to stop the pool."""
        try:
            action()
        except OSError as error:
            log.error("%s failed, will retry: %s", action.__name__, error)

    def all_started(self) -> bool:
        return all(s.state in ("RUNNING", "FATAL") for s in self.slots) and any(s.state == "RUNNING" for s in self.slots)

    def announce(self) -> None:
        log.info("Loaded.")  # the original server's two console lines
        self.status = "running"
        log.info("Running...")
        self.run_hooks("ready")

    def run_hooks(self, event: str, status: dict | None = None) -> None:
        status = status or self.status_dict()
        for hook in self.tick_hooks:
            try:
                hook(status, event=event)
            except Exception:  # metrics or notify trouble must never stop the pool
                log.exception("status hook %r failed", hook)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            log.info("received %s", signal.Signals(signum).name)
            self.begin_stop()

    def begin_stop(self) -> None:
        if self.status != "stopping":
            self.status = "stopping"
            self.stop_deadline = time.monotonic() + self.config.grace_seconds
            for job in self.pending:
                self.claims.release(job.claim)
            self.pending.clear()
            log.info("stopping: no new requests; %d in flight may finish within %.0fs",
                     sum(len(s.jobs) for s in self.slots), self.config.grace_seconds)
            self.run_hooks("stopping")

    def drained(self) -> bool:
        if not any(s.jobs for s in self.slots):
            return True
        return time.monotonic() >= (self.stop_deadline or 0)

    def shutdown(self) -> None:
        for slot in self.slots:
            for job in slot.jobs.values():
                log.info("releasing %s unanswered (cut by the stop)", job.request.id)
                self.claims.release(job.claim)
            slot.jobs.clear()
            if slot.process is not None and slot.process.is_alive():
                slot.tasks.put(("stop",))
        deadline = time.monotonic() + 10
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(max(0.1, deadline - time.monotonic()))
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join(5)
        if self.nvml is not None:
            self.nvml.close()
        for job in self.pending:
            self.claims.release(job.claim)
        for _, _, claim, what, action in self.unpublished:  # a last try; else the request runs again later
            try:
                action()
            except OSError as error:
                log.error("cannot publish %s, giving the request back: %s", what, error)
                self.guarded(lambda: self.claims.release(claim))
        self.guarded(self.leave_spool)
        log.info("stopped")

    def leave_spool(self) -> None:
        spool.remove(self.host_file())
        self.clear_stale_quit_flag()  # the last one to leave removes it

    # --- workers ---------------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        from . import worker
        slot.tasks = self.context.Queue()
        slot.inbox, outbox = self.context.Pipe(duplex=False)
        slot.process = self.context.Process(target=worker.main, args=(slot.spec, slot.tasks, outbox),
                                            name=f"glmpool-worker-{slot.spec.wid}", daemon=True)
        slot.process.start()
        outbox.close()
        slot.pid = slot.process.pid
        slot.state = "STARTING"
        slot.last_seen = time.monotonic()
        log.info("worker %d (%s) starting, pid %d", slot.spec.wid, slot.spec.label, slot.pid)

    def reap(self) -> None:
        for slot in self.slots:
            if slot.process is None or slot.process.is_alive():
                continue
            if slot.inbox is not None:  # what it said before dying (a "done" must not be run again)
                self.read_inbox(slot)
            if slot.inbox is not None:
                slot.inbox.close()
                slot.inbox = None
            slot.tasks.close()  # whatever was still queued for it goes nowhere
            slot.tasks.cancel_join_thread()
            code = slot.process.exitcode
            slot.process.join(0)
            slot.process = None
            slot.tokens += slot.stats.pop("tokens", 0)  # lifetime counters survive restarts
            slot.stats.pop("beat_at", None)
            slot.stats.pop("gpu_memory_reserved", None)  # a dead worker holds no GPU memory
            died = exit_text(code)
            self.requeue(slot, f"worker {slot.spec.wid} exited with {died}")
            if slot.state == "STARTING":
                slot.start_failures += 1
                died += " while loading the model"
                if not slot.last_error:  # killed without a word from it or from murder(): the OOM killer?
                    died += " (out of memory?)" if code == -signal.SIGKILL else ""
                    slot.last_error = f"exited with {died}"
                if slot.start_failures >= MAX_START_FAILURES:
                    slot.state = "FATAL"
                    log.error("worker %d (%s) failed to start %d times: FATAL (%s); other workers keep serving",
                              slot.spec.wid, slot.spec.label, slot.start_failures, slot.last_error)
                    continue
            if self.status == "stopping":
                slot.state = "EXITED"
                continue
            slot.restarts += 1
            slot.deaths_in_a_row += 1
            delay = min(BACKOFF_CAP, 0.5 * 2.0 ** min(slot.deaths_in_a_row - 1, 10))
            slot.state, slot.retry_at = "BACKOFF", time.monotonic() + delay
            log.warning("worker %d (%s) exited with %s; restart in %.1fs", slot.spec.wid, slot.spec.label,
                        died, delay)

    def requeue(self, slot: Slot, reason: str) -> None:
        """The in-flight requests of a dead worker: back to the queue, to be run alone (one of them may
        be what killed it), or failed once they have been running at MAX_ATTEMPTS deaths."""
        for job in slot.jobs.values():
            job.claim.attempts += 1
            job.worker, job.text, job.tokens, job.cancelling = None, "", 0, False
            if job.claim.attempts >= MAX_ATTEMPTS:
                self.fail(job, f"the request crashed workers {job.claim.attempts} times and was given up",
                          {"reason": "worker crash", "last": reason})
            elif self.status == "stopping":
                self.claims.release(job.claim)
            else:
                log.info("requeueing %s (attempt %d, alone)", job.request.id, job.claim.attempts + 1)
                self.claims.update(job.claim)  # an adopter would continue the count
                self.queue_pending([job])
        if slot.jobs:
            self.dirty = True
        slot.jobs.clear()

    def murder(self) -> None:
        """SIGKILL a worker that holds requests but has been silent past the heartbeat timeout, or that
        is still loading past the load timeout (a hung read of the model: reap() counts a failed start)."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None:
                continue
            silent = now - slot.last_seen
            if slot.state == "RUNNING" and slot.jobs and silent > self.config.heartbeat_timeout:
                log.error("worker %d silent for %.0fs with %d request(s): killing it", slot.spec.wid, silent,
                          len(slot.jobs))
                slot.process.kill()
            elif slot.state == "STARTING" and self.config.load_timeout and silent > self.config.load_timeout:
                slot.last_error = f"the model did not load within --load-timeout {self.config.load_timeout:g}s"
                log.error("worker %d (%s): %s; killing it", slot.spec.wid, slot.spec.label, slot.last_error)
                slot.process.kill()

    def respawn(self) -> None:
        """Start the workers due to (re)start. Those loading through host memory go one at a time, and so do
        those sharing a GPU: each one's memory check then counts what the others took."""
        if self.status == "stopping":
            return
        now = time.monotonic()
        for slot in self.slots:
            waiting = slot.state == "STARTING" and slot.process is None
            due = waiting or (slot.state == "BACKOFF" and now >= slot.retry_at)
            if due and not self.loading_beside(slot):
                self.spawn(slot)

    def loading_beside(self, slot: Slot) -> bool:
        """Another worker is loading into memory this one's model would take too."""
        return any(s.state == "STARTING" and s.process is not None and
                   (s.spec.loads_on_host and slot.spec.loads_on_host or s.gpu is not None and s.gpu == slot.gpu)
                   for s in self.slots)

    def collect(self, timeout: float) -> None:
        """Handle every message the workers sent, waiting up to `timeout` for one (or for the spool to change)."""
        from multiprocess.connection import wait
        inboxes = {s.inbox: s for s in self.slots if s.inbox is not None}
        watched = [self.watch.fileno()] if self.watch and self.watch.fileno() is not None else []
        if not inboxes and not watched:
            time.sleep(timeout)
            return
        for ready in wait(list(inboxes) + watched, timeout):
            if ready in inboxes:
                self.read_inbox(inboxes[ready])

    def read_inbox(self, slot: Slot) -> None:
        """Handle every message waiting in a worker's pipe; at EOF (the worker is gone) close it."""
        try:
            while slot.inbox.poll():
                self.on_message(slot.inbox.recv())
        except (EOFError, OSError, ValueError):  # possibly mid-message
            slot.inbox.close()
            slot.inbox = None
        self.publish_answers()

    def on_message(self, message: tuple) -> None:
        kind, wid = message[0], message[1]
        slot = self.slots[wid]
        slot.last_seen = time.monotonic()
        if kind == "ready":
            slot.state, slot.start_failures, slot.last_error = "RUNNING", 0, None
            slot.stats.update(message[2])
            log.info("worker %d (%s) ready", wid, slot.spec.label)
        elif kind == "fatal":  # the worker exits next; reap() counts the failed start
            slot.last_error = message[2]
            log.error("worker %d (%s) cannot load the model: %s", wid, slot.spec.label, message[2])
        elif kind == "beat":
            stats = message[2]
            if "beat_at" in slot.stats:
                elapsed = max(1e-6, time.monotonic() - slot.stats["beat_at"])
                slot.rate = max(0.0, (stats["tokens"] - slot.stats.get("tokens", 0)) / elapsed)
            slot.stats.update(stats, beat_at=time.monotonic())
        elif kind == "token":
            job = slot.jobs.get(message[2])
            if job is not None:
                job.text, job.tokens = message[3], message[4]
                self.write_partial(job)
        elif kind == "oom":
            self.out_of_memory(slot, message[2])
        elif kind in ("done", "error"):
            self.dirty = True  # room for the next request: look at the spool now
            job = slot.jobs.pop(message[2], None)
            if job is None:
                return
            # A result the spool refuses is kept and retried by publish(), never generated again.
            if kind == "done":
                slot.deaths_in_a_row = 0  # it works: the next death starts the backoff over
                self.complete(slot, job, message[3], message[4])
            else:
                slot.failed += 1
                self.fail(job, message[3], {"reason": "rejected by the model"})

    def out_of_memory(self, slot: Slot, report: dict) -> None:
        """A worker's step ran out of device memory and the worker lives on, admitting fewer requests: those
        it handed back run on any worker, charged no attempt (see worker.Loop.recover)."""
        slot.out_of_memory += 1
        slot.stats["max_batch"] = report["max_batch"]
        log.warning("worker %d (%s) ran out of memory in a step of %d request(s) (%s): it now admits %d; "
                    "%d handed back", slot.spec.wid, slot.spec.label, report["batch"], report["error"],
                    report["max_batch"], len(report["shed"]))
        shed = [slot.jobs.pop(key) for key in report["shed"] if key in slot.jobs]
        for job in shed:
            job.worker, job.text, job.tokens, job.cancelling = None, "", 0, False
        self.queue_pending(shed)
        self.dirty = True

    def capacity(self, slot: Slot) -> int:
        """Requests a worker is given at most: --max-batch, or less after it ran out of memory."""
        return min(self.config.max_batch, slot.stats.get("max_batch", self.config.max_batch))

    # --- requests --------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Give workers what they have room for, claiming new requests only then (the rest stays for
        other supervisors). Claimed jobs waiting for a worker go first; a new scan happens when the
        spool changed and the last scan's backlog is used up, and every poll_interval regardless."""
        self.every("cancels", self.config.poll_interval, self.watch_cancels, due=self.cancels_due)
        while self.pending:
            job = self.pending[0]
            slot = self.pick_slot(alone=job.claim.attempts > 0)
            if slot is None:  # a requeued job waits for an idle worker; nothing new is claimed meanwhile
                return
            self.assign(self.pending.popleft(), slot)
        now = time.monotonic()
        if (self.dirty and not self.backlog) or now >= self.timers.get("scan", 0.0):
            if self.pick_slot(alone=False) is None:
                return  # no room: look again once a worker has some
            self.dirty = False
            self.timers["scan"] = now + self.config.poll_interval
            self.check_spool()
            self.backlog = deque(self.scan())
            # A scan costs a stat per waiting request: behind a deep queue, rescan on the timer only so often
            # that scanning takes at most a fifth of the time, so a claim costs the same at any depth.
            self.timers["scan"] = max(self.timers["scan"], now + 4 * (time.monotonic() - now))
        while self.backlog:
            room = sum(self.capacity(s) - len(s.jobs) for s in self.usable_slots())
            if room <= 0:
                return
            for job in self.take([self.backlog.popleft() for _ in range(min(room, len(self.backlog)))]):
                self.assign(job, self.pick_slot(alone=False))

    def usable_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.state == "RUNNING" and s.process is not None and not s.isolating]

    def pick_slot(self, alone: bool) -> Slot | None:
        """The least busy running worker with room; alone=True: only an idle one (for a requeued job)."""
        usable = self.usable_slots()
        if alone:
            return next((s for s in usable if not s.jobs), None)
        usable = [s for s in usable if len(s.jobs) < self.capacity(s)]
        return min(usable, key=lambda s: len(s.jobs)) if usable else None

    def scan(self) -> list[tuple[str, dict]]:
        """Ready-looking request ids in dispatch order: higher `priority` first, then oldest first (FIFO by
        the main input's mtime, across both forms). Only .json inputs carry a priority (seed form: 0); it is
        read once per (id, mtime, size), so a rescan of a deep queue costs a stat per request."""
        groups: dict[str, dict] = {}
        try:
            entries = list(os.scandir(self.requests))
        except FileNotFoundError:  # requests/ deleted while running: recreate it
            self.claims.ensure_dirs()
            self.watch.rearm()
            return []
        for entry in entries:
            parts = spool.split_name(entry.name)
            if parts and parts[1] in spool.INPUT_SUFFIXES + (".cancel",):
                groups.setdefault(parts[0], {})[parts[1]] = entry
        ready, priorities = [], {}
        for request_id, names in groups.items():
            main = ".json" if ".json" in names else ".request" if ".request" in names else None
            if main is None:
                continue
            try:
                info = names[main].stat(follow_symlinks=False)
            except OSError:
                continue
            priority = 0
            if main == ".json":
                known = self.priorities.get(request_id)
                if known is None or known[:2] != (info.st_mtime_ns, info.st_size):
                    known = (info.st_mtime_ns, info.st_size, read_priority(names[main].path, info))
                priorities[request_id] = known
                priority = known[2]
            ready.append((-priority, info.st_mtime, request_id, names))
        self.priorities = priorities  # forget requests that are gone
        ready.sort(key=lambda item: item[:3])
        return [(rid, names) for _, _, rid, names in ready]

    def check_spool(self) -> None:
        """Before a scan: a client may have deleted requests/ and created it again (without our
        subdirectories, and inotify still watching the deleted one); and a subdirectory swapped for a
        symlink stops all claiming (OSError, logged by guarded()) until it is fixed."""
        self.claims.ensure_dirs()
        try:  # every time: a new directory can reuse the old inode number, so nothing simpler tells them apart
            self.watch.rearm()
        except OSError as error:  # e.g. flags/ deleted: polling still works
            log.warning("cannot watch the spool: %s", error)

    def take(self, candidates: list[tuple[str, dict]]) -> list[Job]:
        """Check requests in place (complete? valid?), claim them (together: one group of fsyncs), then
        read what was claimed: that is what gets answered, even if a client rewrote a file in between.
        Bad requests are failed."""
        wanted = []  # (id, main, names, the sentence of a RequestError or None)
        for request_id, names in candidates:
            main, _ = main_input(names)
            try:
                if spool.read_request(request_id, self.requests / f"{request_id}{main}",
                                      self.requests / f"{request_id}.history", time.time()) is not None:
                    wanted.append((request_id, main, names, None))
            except (spool.NotReady, FileNotFoundError):  # still being written, or another supervisor took it
                pass
            except spool.RequestError as error:
                wanted.append((request_id, main, names, str(error)))
        claims = self.claims.claim_many([(request_id, main, (".history",) if main == ".request" else ())
                                         for request_id, main, _, _ in wanted])
        jobs = []
        for (_, _, names, invalid), claim in zip(wanted, claims):
            if claim is None:
                continue
            refused = main_input(names)[1]
            if refused:  # only now: the claim just made removed the id's older outputs, not this .error
                self.refuse(claim.id, refused)
            if invalid:
                self.publish_error(claim, invalid, {"reason": "invalid request"})
            elif (job := self.job_from_claim(claim)) is None:
                continue
            elif ".cancel" in names and self.claims.cancel_applies(claim.id, job.request.arrived):
                self.publish_error(claim, "the request was cancelled", {"reason": "cancelled", "partial": ""})
            else:
                jobs.append(job)
        return jobs

    def refuse(self, request_id: str, suffix: str) -> None:
        """The .json beside the seed-form request of its id being answered fails (claims.main_input)."""
        sentence = (f"{request_id}{suffix} was not answered: {request_id}.request was waiting under the same id, "
                    f"and it is the one answered (in {request_id}.back)")
        log.warning("request %s: %s", request_id, sentence)
        try:
            self.claims.reject(request_id, suffix, sentence, {"id": request_id, "reason": "id conflict",
                                                              "answered": f"{request_id}.request",
                                                              "host": self.config.host_id})
            self.failed += 1
        except OSError as error:  # it waits, and runs after the request of its id in flight
            log.error("cannot refuse %s%s: %s", request_id, suffix, error)

    def job_from_claim(self, claim: Claim, settled: bool = False) -> Job | None:
        """A job from a claim's own files; settled: inputs are old (adopted), complete whatever they end in."""
        now = time.time() + (spool.SETTLE_SECONDS if settled else 0.0)
        try:
            request = spool.read_request(claim.id, claim.inputs[claim.main], claim.inputs.get(".history"), now,
                                         history_grace=False)
        except spool.NotReady:  # changed since we looked: put it back and look again later
            self.claims.release(claim)
            return None
        except (spool.RequestError, OSError) as error:
            self.publish_error(claim, str(error), {"reason": "invalid request"})
            return None
        timeout = request.timeout or self.config.request_timeout or None
        return Job(claim, request, claimed=time.time(), deadline=time.time() + timeout if timeout else None)

    def claims_to_jobs(self, claims: list[Claim]) -> list[Job]:
        return [job for job in (self.job_from_claim(claim, settled=True) for claim in claims) if job is not None]

    def adopt_orphans(self) -> None:
        if self.status != "stopping":
            self.queue_pending(self.claims_to_jobs(self.claims.orphans()))

    def queue_pending(self, jobs: list[Job]) -> None:
        """Claimed jobs waiting for a worker (requeued, adopted, or to run again): they go before anything
        unclaimed, among themselves by priority, then oldest first."""
        if jobs:
            self.pending = deque(sorted([*self.pending, *jobs], key=lambda j: (-j.request.priority, j.request.arrived)))

    def assign(self, job: Job, slot: Slot) -> None:
        params = {"max_length": self.config.max_length, "do_sample": True, "top_p": 0.7, "temperature": 0.95,
                  **job.request.params}
        job.worker, job.started = slot.spec.wid, time.time()
        slot.jobs[job.claim.token] = job
        slot.tasks.put(("run", job.claim.token, job.request.query, job.request.history, params, job.deadline))

    def watch_cancels(self) -> None:
        """Pass new .cancel files on to the workers. One lexists per request in flight, each possibly a round
        trip on NFS: dispatch() looks when the spool's watch saw a change, and every poll_interval anyway
        (a cancel written on another host makes no inotify event here), not on every loop."""
        self.cancels_due = False
        for slot in self.slots:
            for job in slot.jobs.values():
                if not job.cancelling and self.claims.cancel_applies(job.request.id, job.request.arrived):
                    job.cancelling = True
                    slot.tasks.put(("cancel", job.claim.token))

    def complete(self, slot: Slot, job: Job, text: str, detail: dict) -> None:
        reason = detail.get("finish_reason")
        if reason in ("cancelled", "timeout"):
            slot.failed += 1
            sentence = "the request was cancelled" if reason == "cancelled" else "the request timed out"
            self.fail(job, sentence, {"reason": reason, "partial": text, **detail})
            return
        if self.claims.take_late_history(job.claim):  # answered as if it had none: withheld
            request_id = job.request.id
            self.fail(job, f"{request_id}.history came after {request_id}.request had been taken without a "
                      f"history (a missing .history counts as empty {spool.HISTORY_GRACE_SECONDS:g} s after its "
                      "request): the answer is withheld, send the request again",
                      {"reason": "late history", "answer": text})
            return
        finished = time.time()
        received = detail.pop("received", job.started)
        meta = {"id": job.request.id, "history": job.request.history + [[job.request.query, text]], **detail,
                "worker": slot.spec.wid, "device": slot.spec.label, "host": self.config.host_id,
                "claim": job.claim.origin, "attempts": job.claim.attempts + 1,
                "seconds": round(finished - received, 3),
                "timings": {"arrived": job.request.arrived, "claimed": job.claimed, "dispatched": job.started,
                            "received": received, "finished": finished}}
        self.answers.append((slot, job, text, meta))

    def publish_answers(self) -> None:
        """Publish the answers just read from a worker together (their files made durable in one group of
        fsyncs); one the spool refuses is retried alone later, with backoff (see publish())."""
        answers, self.answers = self.answers, []
        for answer, error in self.publish_together(answers):
            job = answer[1]
            self.defer(f"the answer of {job.request.id}", job.claim,
                       functools.partial(self.publish_alone, answer), PUBLISH_RETRY_FIRST, error)

    def publish_alone(self, answer: tuple) -> None:
        """A retry of one answer: raises the OSError the spool raised, as publish() expects."""
        for _, error in self.publish_together([answer]):
            raise error

    def publish_together(self, answers: list[tuple]) -> list[tuple[tuple, OSError]]:
        """(slot, job, text, meta) answers published in one group; returns those the spool refused."""
        refused = []
        outcomes = self.claims.finish_many([(job.claim, text, meta) for _, job, text, meta in answers])
        for answer, outcome in zip(answers, outcomes):
            if isinstance(outcome, OSError):
                refused.append((answer, outcome))
            elif outcome:
                answer[0].served += 1
                self.served += 1
        return refused

    def fail(self, job: Job, sentence: str, detail: dict) -> None:
        self.publish_error(job.claim, sentence, {"id": job.request.id, **detail})

    def publish_error(self, claim: Claim, sentence: str, detail: dict) -> None:
        log.warning("request %s failed: %s", claim.id, sentence)

        def publish() -> None:
            self.claims.fail(claim, sentence, {"host": self.config.host_id, **detail})
            self.failed += 1
        self.publish(f"the error of {claim.id}", claim, publish)

    def publish(self, what: str, claim: Claim, action, delay: float = PUBLISH_RETRY_FIRST) -> None:
        """Run `action`, which publishes a result. If the spool refuses (a full disk, NFS trouble), the
        finished result is kept, still claimed, and published later with backoff: running the request
        again would redo the work and could fail the same way at the end."""
        try:
            action()
        except OSError as error:
            self.defer(what, claim, action, delay, error)

    def defer(self, what: str, claim: Claim, action, delay: float, error: OSError) -> None:
        log.error("cannot publish %s, retrying in %.1fs: %s", what, delay, error)
        self.unpublished.append([time.monotonic() + delay, min(PUBLISH_RETRY_CAP, 2 * delay), claim, what, action])

    def retry_publish(self) -> None:
        now = time.monotonic()
        if not any(entry[0] <= now for entry in self.unpublished):
            return
        due = [entry for entry in self.unpublished if entry[0] <= now]
        self.unpublished = [entry for entry in self.unpublished if entry[0] > now]
        for _, delay, claim, what, action in due:
            self.publish(what, claim, action, delay)

    def write_partial(self, job: Job) -> None:
        try:
            spool.atomic_write(self.requests / f"{job.request.id}.partial", job.text, sync=False)  # ephemeral
        except OSError as error:
            log.warning("cannot write %s.partial: %s", job.request.id, error.strerror)

    # --- flags and status ------------------------------------------------------------------------

    def check_flags(self) -> None:
        if self.status != "stopping" and self.flag_set("quit.flag"):
            log.info("quit.flag found")
            self.begin_stop()
        if self.status_owed is None and self.flag_set("status.flag"):
            taken = self.flags / f".status.{self.config.host_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                os.rename(self.flags / "status.flag", taken)  # one supervisor answers each status request
            except OSError:
                if not os.path.lexists(taken):  # NFS: a retransmitted rename reports its success as an error
                    return
            self.status_owed = 0.0
            spool.remove(taken)  # a file or an empty directory; sweep() takes what a crash leaves
        if self.status_owed is not None and time.monotonic() >= self.status_owed:
            self.answer_status()

    def answer_status(self) -> None:
        """Write flags/status.back for the status.flag taken. The spool may refuse (a full disk): the flag
        stays owed and is answered later, with backoff, never dropped; a directory holding files in the
        way is permanent, and the log says why there is no answer."""
        status = self.status_dict()
        status["hosts"] = [status.copy()] + [peer for peer in self.peer_statuses()
                                             if (peer.get("host"), peer.get("pid")) != (status["host"], status["pid"])]
        back = self.flags / "status.back"
        try:
            if os.path.isdir(back) and not os.path.islink(back):
                os.rmdir(back)  # an empty one; one holding files raises (ENOTEMPTY): never deleted
            spool.atomic_write(back, json.dumps(status, ensure_ascii=False, indent=1), sync=False)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EISDIR, errno.EEXIST):
                log.error("cannot answer status.flag: flags/status.back is a directory that is not empty")
            else:
                log.error("cannot write flags/status.back, retrying in %.1fs: %s", self.status_delay, error)
                self.status_owed = time.monotonic() + self.status_delay
                self.status_delay = min(PUBLISH_RETRY_CAP, 2 * self.status_delay)
                return
        self.status_owed, self.status_delay = None, PUBLISH_RETRY_FIRST

    def flag_set(self, name: str) -> bool:
        """Whether flags/<name> is set (spool.flag_set). What is not a flag there never counts: a symlink,
        fifo or socket is removed (unlinked: never followed or opened), a directory holding files is left
        alone (glmpool never deletes what it holds); the log says so, once for each thing found."""
        path = self.flags / name
        try:
            return spool.flag_set(path)
        except spool.NotAFlag as refusal:
            try:
                info = os.lstat(path)
                if not stat.S_ISDIR(info.st_mode):
                    spool.remove(path)
                    log.error("flags/%s; removed", refusal)
                elif self.not_flags.get(name) != (info.st_dev, info.st_ino):
                    self.not_flags[name] = (info.st_dev, info.st_ino)
                    log.error("flags/%s: it does not count as the flag until it is removed", refusal)
            except OSError:
                pass
            return False

    def clear_stale_quit_flag(self) -> None:
        """Remove quit.flag when no other supervisor is live (at start: one left from before)."""
        if self.flag_set("quit.flag") and not self.live_peers():
            log.info("removing quit.flag: no other supervisor is running on this directory")
            spool.remove(self.flags / "quit.flag")

    def host_file(self) -> Path:
        return self.flags / ".hosts" / f"{self.config.host_id}.{os.getpid()}.json"

    def beat(self) -> None:
        status = self.status_dict()
        try:
            spool.atomic_write(self.host_file(), json.dumps(status, ensure_ascii=False), sync=False)
        except OSError as error:
            log.warning("cannot write host heartbeat: %s", error.strerror)
        self.run_hooks("tick", status)

    def peer_files(self) -> list[Path]:
        """Heartbeat files of supervisors (any host) seen alive within a few beats, by the filesystem clock."""
        return spool.live_heartbeats(self.flags, self.config.host_id)

    def live_peers(self) -> list[Path]:
        own = self.host_file()
        return [p for p in self.peer_files() if p != own]

    def peer_statuses(self) -> list[dict]:
        statuses = []
        for path in self.peer_files():
            try:
                statuses.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass
        return statuses

    def status_dict(self) -> dict:
        from .status import gpu_status, process_rss
        in_progress = sum(len(s.jobs) for s in self.slots)
        devices, process_gpu_memory = gpu_status(self.nvml, self.slots)
        return {
            "status": self.status, "host": self.config.host_id, "pid": os.getpid(),
            "started": self.started, "version": __version__, "model": self.config.model,
            "queue": {"pending": self.count_pending() + len(self.pending), "in_progress": in_progress},
            "served": self.served, "failed": self.failed,
            "gpus": devices,
            "workers": [{
                "id": s.spec.wid, "device": s.spec.label, "pid": s.pid if s.process is not None else None,
                "state": s.state, "in_flight": len(s.jobs), "served": s.served, "failed": s.failed,
                "restarts": s.restarts, "last_error": s.last_error, "tokens_per_s": round(s.rate, 2),
                "tokens_generated": s.stats.get("tokens", 0) + s.tokens,
                "rss_bytes": process_rss(s.pid) if s.process is not None else None,
                "gpu_memory_bytes": process_gpu_memory.get(s.spec.wid),
                "max_batch": self.capacity(s), "kv_tokens": s.stats.get("kv_tokens"), "out_of_memory": s.out_of_memory,
                "compile_seconds": s.stats.get("compile_seconds"),
            } for s in self.slots],
        }

    def count_pending(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.requests) if e.name.endswith((".request", ".json"))
                       and not e.name.startswith("."))
        except OSError:
            return 0


def read_priority(path: str, info: os.stat_result) -> int:
    """The `priority` of a .json request, for ordering only: 0 for anything unreadable or invalid (take()
    judges validity, and fails bad requests properly). Never follows a symlink or blocks on a fifo."""
    if not stat.S_ISREG(info.st_mode) or info.st_size > spool.MAX_INPUT_BYTES:
        return 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            data = os.read(fd, spool.MAX_INPUT_BYTES + 1)
        finally:
            os.close(fd)
        value = json.loads(data).get("priority", 0)
    except (OSError, ValueError, RecursionError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def exit_text(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
