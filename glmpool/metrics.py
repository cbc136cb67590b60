"""Prometheus metrics from the supervisor's status dict, through prometheus_client.

prometheus_client gives the exposition format (escaping, name checks), the textfile for node_exporter's
textfile collector written atomically (``write_to_textfile``: a temp file beside it, whose name does not
end in ``.prom``, renamed over it) and the HTTP endpoint; this module only says which metric families a
status dict makes. Two outlets for the same numbers: ``metrics_file`` (e.g.
``/var/lib/prometheus/node-exporter/glmpool.prom``) and ``metrics_port`` (on 127.0.0.1).

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
import os
import re
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, generate_latest, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

WORKER_STATES = ("starting", "running", "backoff", "fatal", "stopped")
SUPERVISOR_STATES = ("starting", "running", "stopping")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

__all__ = ["render", "Metrics"]


def _number(value: Any) -> float | None:
    # bool is an int subclass, but True is not a count of anything: treat it as missing.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


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
    """One metric family being filled: samples whose value is unknown are left out, a repeated label
    set (which would fail the whole scrape) is dropped."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: dict[tuple[tuple[str, str], ...], float] = {}

    def add(self, labels: Mapping[str, Any], value: Any) -> None:
        v = _number(value)
        key = tuple((k, str(val)) for k, val in labels.items())
        if v is not None and key not in self.samples:
            self.samples[key] = v

    def metric(self) -> Metric | None:
        """The prometheus_client family (every sample of one family has the same label names)."""
        if not self.samples:
            return None
        kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = kind(self.name, self.help, labels=[k for k, _ in next(iter(self.samples))])
        for key, value in self.samples.items():
            family.add_metric([v for _, v in key], value)
        return family


def _sum(workers: list[Mapping[str, Any]], key: str) -> float | None:
    values = [_number(w.get(key)) for w in workers]
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def families(status: Mapping[str, Any], extra_labels: Mapping[str, str] | None = None) -> list[Metric]:
    """The metric families of a status dict."""
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
    made: list[_Family] = []

    def family(name: str, kind: str, help_text: str) -> _Family:
        f = _Family("glmpool_" + name, kind, help_text)
        made.append(f)
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
    return [metric for metric in (f.metric() for f in made) if metric is not None]



class StatusCollector:
    """A prometheus_client collector of the latest status dict."""

    def __init__(self, extra_labels: Mapping[str, str] | None = None) -> None:
        self.status: Mapping[str, Any] = {}
        self.extra_labels = dict(extra_labels or {})

    def collect(self):
        return families(self.status, self.extra_labels)


def _registry(collector: StatusCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(status: Mapping[str, Any], extra_labels: Mapping[str, str] | None = None) -> str:
    """The status dict in Prometheus text exposition format."""
    collector = StatusCollector(extra_labels)
    collector.status = status
    return generate_latest(_registry(collector)).decode("utf-8")


class Metrics:
    """What the supervisor holds: ``update(status)`` every few seconds, ``close()`` at exit.

    Failures (unwritable directory, full disk, port in use) are logged, never raised: metrics must
    not stop the serving of requests.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, port: int | None = None,
                 bind: str = "127.0.0.1", extra_labels: Mapping[str, str] | None = None) -> None:
        self.path = os.fspath(path) if path else None
        self.collector = StatusCollector(extra_labels)
        self.registry = _registry(self.collector)
        self.server = None
        self.port: int | None = None
        self._last_error: str | None = None
        if port is not None:
            try:
                self.server, _ = start_http_server(port, addr=bind, registry=self.registry)
                self.port = self.server.server_address[1]
                log.info("metrics on http://%s:%d/metrics", bind, self.port)
            except OSError as exc:
                log.error("metrics endpoint on %s:%s not started: %s", bind, port, exc)

    def update(self, status: Mapping[str, Any]) -> None:
        """Take a new status: the endpoint serves it from now on, and the file is rewritten."""
        self.collector.status = status
        if not self.path:
            return
        try:
            write_to_textfile(self.path, self.registry)
            self._last_error = None
        except OSError as exc:
            # Log once per distinct error, not every few seconds (errno and reason only: the message
            # names a temp file).
            reason = f"[Errno {exc.errno}] {exc.strerror}"
            if reason != self._last_error:
                log.warning("metrics file %s not written: %s", self.path, reason)
                self._last_error = reason

    def close(self, remove_file: bool = False) -> None:
        """Stop the endpoint; optionally remove the file so stale numbers are not scraped."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if remove_file and self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
