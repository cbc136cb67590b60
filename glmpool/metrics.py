"""Prometheus metrics: text exposition format from the supervisor's status dict.

Two outlets for the same text:
- a file for node_exporter's textfile collector (``metrics_file``, e.g.
  ``/var/lib/prometheus/node-exporter/glmpool.prom``), replaced atomically: written to a hidden temp
  file in the same directory (the collector only reads ``*.prom``) and renamed over the old one;
- optionally an HTTP endpoint on localhost (``metrics_port``), served from a daemon thread.

Status dict assumed (the ``flags/status.back`` document of the pool; every key optional: a missing
key or a null / non-numeric value omits that metric, it never fails)::

    {
      "status": "starting" | "running" | "stopping",
      "host": "gpu01",                      # host id; the `host` label on every series
      "pid": 1234,
      "started": 1700000000.0,              # supervisor start, unix seconds (or an ISO-8601 string)
      "version": "0.1.0",
      "model": "THUDM/chatglm-6b-int4",
      "queue": {"pending": 3, "in_progress": 2},
      "served": 10, "failed": 1,            # optional totals; else summed over workers
      "tokens_generated": 12345,            # optional total; else summed over workers
      "workers": [
        {"id": 0, "device": "cuda:0", "pid": 1240,
         "state": "RUNNING",                # STARTING / RUNNING / BACKOFF / FATAL / STOPPED (any case)
         "in_flight": 2, "served": 10, "failed": 1, "restarts": 0,
         "tokens_per_s": 35.2, "tokens_generated": 12345,
         "rss_bytes": 1234567, "gpu_memory_bytes": 123}   # bytes; GPU: what its process holds, null on cpu
      ],
      "gpus": [{"device": "GPU-...", "memory_used": 123, "memory_total": 456, "workers": [0]}]   # once per GPU
    }

Counters (``*_total``) must be cumulative for the supervisor's lifetime (a worker restart must not
reset its slot's served count), otherwise ``rate()`` sees spurious resets.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKER_STATES = ("starting", "running", "backoff", "fatal", "stopped")
SUPERVISOR_STATES = ("starting", "running", "stopping")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

__all__ = ["render", "write_textfile", "MetricsServer", "Metrics", "CONTENT_TYPE"]


def _number(value: Any) -> float | None:
    # bool is an int subclass, but True is not a count of anything: treat it as missing.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _timestamp(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:  # a naive time is the supervisor's local time
            parsed = parsed.astimezone()
        return parsed.timestamp()
    return _number(value)


class _Family:
    """One metric family: HELP/TYPE once, then one sample per distinct label set."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: dict[tuple[tuple[str, str], ...], float] = {}

    def add(self, labels: Mapping[str, Any], value: Any) -> None:
        v = _number(value)
        if v is None:
            return
        key = tuple((k, str(val)) for k, val in labels.items())
        if key in self.samples:  # an invalid scrape otherwise; render() dedupes workers first
            log.debug("duplicate series %s%s dropped", self.name, key)
            return
        self.samples[key] = v

    def lines(self) -> Iterable[str]:
        if not self.samples:
            return
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, v in self.samples.items():
            label_text = ",".join(f'{k}="{_escape_label(val)}"' for k, val in key)
            yield f"{self.name}{{{label_text}}} {_format_value(v)}" if key else f"{self.name} {_format_value(v)}"


def _sum(workers: list[Mapping[str, Any]], key: str) -> float | None:
    values = [_number(w.get(key)) for w in workers]
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def render(status: Mapping[str, Any], extra_labels: Mapping[str, str] | None = None) -> str:
    """Render the status dict as Prometheus text exposition format (ends with a newline)."""
    base: dict[str, str] = {}
    for name, value in (extra_labels or {}).items():
        # An invalid label name would make the whole scrape fail: drop it, loudly.
        if _LABEL_NAME.fullmatch(name) and not name.startswith("__"):
            base[name] = str(value)
        else:
            log.warning("metrics: invalid label name %r ignored", name)
    if isinstance(status.get("host"), str):
        base["host"] = status["host"]
    workers: list[Mapping[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for w in status.get("workers") or []:
        if not isinstance(w, Mapping):
            continue
        ident = (str(w.get("id", "")), str(w.get("device", "")))
        if ident in seen:
            # Two entries for one worker slot would make duplicate series, which fails the whole
            # scrape, and would be counted twice in the totals: keep the first.
            log.debug("metrics: duplicate worker %s dropped", ident)
            continue
        seen.add(ident)
        workers.append(w)
    queue = status.get("queue") if isinstance(status.get("queue"), Mapping) else {}
    families: list[_Family] = []

    def family(name: str, kind: str, help_text: str) -> _Family:
        f = _Family("glmpool_" + name, kind, help_text)
        families.append(f)
        return f

    family("up", "gauge", "1 while the glmpool supervisor is running.").add(base, 1)
    info = {**base}
    for key in ("version", "model"):
        if isinstance(status.get(key), str):
            info[key] = status[key]
    family("info", "gauge", "Supervisor build and model; always 1.").add(info, 1)
    family("start_time_seconds", "gauge", "Supervisor start time, unix seconds.").add(
        base, _timestamp(status.get("started")))
    family("supervisor_pid", "gauge", "Supervisor process id.").add(base, status.get("pid"))
    state = status.get("status")
    if isinstance(state, str):
        f = family("status", "gauge", "Supervisor status: 1 for the current one.")
        for s in dict.fromkeys((*SUPERVISOR_STATES, state.lower())):
            f.add({**base, "status": s}, 1 if s == state.lower() else 0)

    family("queue_pending", "gauge", "Requests waiting in the spool, not yet claimed.").add(
        base, queue.get("pending"))
    family("queue_in_progress", "gauge", "Requests claimed by this supervisor.").add(
        base, queue.get("in_progress"))
    family("requests_in_flight", "gauge", "Requests being generated by this host's workers.").add(
        base, _sum(workers, "in_flight"))
    for key, help_text in (("served", "Requests answered with a .back file."),
                           ("failed", "Requests answered with an .error file.")):
        total = status.get(key) if _number(status.get(key)) is not None else _sum(workers, key)
        family(f"requests_{key}_total", "counter", help_text).add(base, total)
    tokens = status.get("tokens_generated")
    if _number(tokens) is None:
        tokens = _sum(workers, "tokens_generated")
    family("tokens_generated_total", "counter", "Tokens generated by this host's workers.").add(base, tokens)

    per_worker = [
        ("in_flight", "worker_requests_in_flight", "gauge", "Requests being generated by the worker."),
        ("served", "worker_requests_served_total", "counter", "Requests answered by the worker slot."),
        ("failed", "worker_requests_failed_total", "counter", "Requests failed on the worker slot."),
        ("restarts", "worker_restarts_total", "counter", "Restarts of the worker slot."),
        ("tokens_generated", "worker_tokens_generated_total", "counter", "Tokens generated by the worker slot."),
        ("tokens_per_s", "worker_tokens_per_second", "gauge", "Recent generation speed of the worker."),
        ("rss_bytes", "worker_resident_memory_bytes", "gauge", "Resident memory of the worker process."),
        ("gpu_memory_bytes", "worker_gpu_memory_bytes", "gauge", "GPU memory held by the worker process."),
        ("pid", "worker_pid", "gauge", "Worker process id."),
    ]
    wfam = {key: family(name, kind, h) for key, name, kind, h in per_worker}
    wstate = family("worker_state", "gauge", "Worker state: 1 for the current one.")
    for w in workers:
        labels = {**base, "worker": str(w.get("id", "")), "device": str(w.get("device", ""))}
        for key, f in wfam.items():
            f.add(labels, w.get(key))
        if isinstance(w.get("state"), str):
            current = w["state"].lower()
            for s in dict.fromkeys((*WORKER_STATES, current)):
                wstate.add({**labels, "state": s}, 1 if s == current else 0)

    used = family("gpu_memory_used_bytes", "gauge", "Memory in use on a GPU the workers run on (NVML), once per GPU.")
    total = family("gpu_memory_total_bytes", "gauge", "Memory of a GPU the workers run on (NVML).")
    for gpu in status.get("gpus") or []:
        if isinstance(gpu, Mapping):
            labels = {**base, "gpu": str(gpu.get("device", ""))}
            used.add(labels, gpu.get("memory_used"))
            total.add(labels, gpu.get("memory_total"))

    lines = [line for f in families for line in f.lines()]
    return "\n".join(lines) + "\n"


def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """Atomically replace ``path`` with ``text``; raises OSError on failure (temp file removed)."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    # Hidden, non-.prom name: node_exporter must never read the half-written temp file.
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp creates 0600; node_exporter runs as another user and must be able to read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class MetricsServer:
    """``GET /metrics`` (and ``/``) on ``host:port`` from a daemon thread; port 0 picks a free one."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self._text = "# glmpool: no status yet\n"
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                if self.path.split("?", 1)[0] not in ("/", "/metrics"):
                    self.send_error(404)
                    return
                body = owner.text.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("metrics http: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="glmpool-metrics",
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def text(self) -> str:
        with self._lock:
            return self._text

    def set_text(self, text: str) -> None:
        with self._lock:
            self._text = text

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Metrics:
    """What the supervisor holds: ``update(status)`` every few seconds, ``close()`` at exit.

    Failures (unwritable directory, full disk, port in use) are logged, never raised: metrics must
    not stop the serving of requests.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, port: int | None = None,
                 bind: str = "127.0.0.1", extra_labels: Mapping[str, str] | None = None) -> None:
        self.path = os.fspath(path) if path else None
        self.extra_labels = dict(extra_labels or {})
        self.server: MetricsServer | None = None
        self._last_error: str | None = None
        if port is not None:
            try:
                self.server = MetricsServer(port, bind).start()
                log.info("metrics on http://%s:%d/metrics", bind, self.server.port)
            except OSError as exc:
                log.error("metrics endpoint on %s:%s not started: %s", bind, port, exc)

    def update(self, status: Mapping[str, Any]) -> str:
        """Render, publish to the HTTP endpoint and the file; returns the text."""
        text = render(status, self.extra_labels)
        if self.server is not None:
            self.server.set_text(text)
        if self.path:
            try:
                write_textfile(self.path, text)
                self._last_error = None
            except OSError as exc:
                # Log once per distinct error, not every few seconds.
                # (errno and reason only: the message names a random temp file.)
                reason = f"[Errno {exc.errno}] {exc.strerror}"
                if reason != self._last_error:
                    log.warning("metrics file %s not written: %s", self.path, reason)
                    self._last_error = reason
        return text

    def close(self, remove_file: bool = False) -> None:
        """Stop the endpoint; optionally remove the file so stale numbers are not scraped."""
        if self.server is not None:
            self.server.close()
            self.server = None
        if remove_file and self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
