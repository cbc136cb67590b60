"""Status helpers the supervisor can use without torch: GPU count (NVML), process memory, a readable table."""
from __future__ import annotations

import ctypes
import os

import psutil


def visible_gpu_count() -> int:
    """GPUs a worker could use: CUDA_VISIBLE_DEVICES if set, else what NVML counts (0 without a driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def process_rss(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _size(value) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def render_table(status: dict) -> str:
    """status.back as a human table: one block per host, one row per worker."""
    hosts = status.get("hosts") or [status]
    lines = []
    for host in hosts:
        queue = host.get("queue", {})
        lines.append(f"{host.get('host')} pid {host.get('pid')}  {host.get('status')}  model {host.get('model')}  "
                     f"pending {queue.get('pending')}  in progress {queue.get('in_progress')}  "
                     f"served {host.get('served')}  failed {host.get('failed')}")
        header = ("worker", "device", "pid", "state", "in flight", "served", "failed", "restarts", "tok/s", "RSS", "GPU memory")
        rows = [header]
        for w in host.get("workers", []):
            gpu = "-" if w.get("gpu_memory_total") is None else f"{_size(w.get('gpu_memory_used'))} / {_size(w.get('gpu_memory_total'))}"
            rows.append((str(w.get("id")), str(w.get("device")), str(w.get("pid") or "-"), str(w.get("state")),
                         str(w.get("in_flight")), str(w.get("served")), str(w.get("failed")), str(w.get("restarts")),
                         str(w.get("tokens_per_s")), _size(w.get("rss_bytes")), gpu))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines += [f"  worker {w.get('id')}: {w['last_error']}" for w in host.get("workers", []) if w.get("last_error")]
    return "\n".join(lines)
