"""Status helpers the supervisor can use without torch: GPU memory (NVML), process memory, a readable table."""
from __future__ import annotations

import psutil


def gpu_status(nvml, slots) -> tuple[list[dict], dict[int, int]]:
    """Each GPU the workers use, once, with its memory as NVML counts it (None without NVML); and
    per live worker on a GPU, what its process holds there: NVML's count where NVML sees the pid (not in a
    pid namespace), else what the worker's torch allocator reported."""
    devices: dict[str, dict] = {}
    held = {}
    for slot in slots:
        if slot.gpu is None:
            continue
        device = devices.get(slot.gpu)
        if device is None:
            used, total = (nvml.memory(slot.gpu) if nvml is not None else None) or (None, None)
            name = next((g.name for g in nvml.gpus() if g.uuid == slot.gpu), None) if nvml is not None else None
            device = devices[slot.gpu] = {"device": slot.gpu, "name": name, "memory_used": used,
                                          "memory_total": total, "workers": [],
                                          "processes": nvml.processes(slot.gpu) if nvml is not None else {}}
        device["workers"].append(slot.spec.wid)
        if slot.process is not None:
            held[slot.spec.wid] = device["processes"].get(slot.pid, slot.stats.get("gpu_memory_reserved"))
    for device in devices.values():
        del device["processes"]
    return list(devices.values()), held


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
        for gpu in host.get("gpus") or []:
            memory = "-" if gpu.get("memory_total") is None else \
                f"{_size(gpu.get('memory_used'))} / {_size(gpu.get('memory_total'))}"
            lines.append(f"  GPU {gpu.get('device')} {gpu.get('name') or ''}  memory {memory}  "
                         f"workers {', '.join(map(str, gpu.get('workers', [])))}")
        header = ("worker", "device", "pid", "state", "in flight", "served", "failed", "restarts", "tok/s", "RSS", "GPU memory")
        rows = [header]
        for w in host.get("workers", []):
            gpu = _size(w.get("gpu_memory_bytes"))
            rows.append((str(w.get("id")), str(w.get("device")), str(w.get("pid") or "-"), str(w.get("state")),
                         str(w.get("in_flight")), str(w.get("served")), str(w.get("failed")), str(w.get("restarts")),
                         str(w.get("tokens_per_s")), _size(w.get("rss_bytes")), gpu))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines += [f"  worker {w.get('id')}: {w['last_error']}" for w in host.get("workers", []) if w.get("last_error")]
    return "\n".join(lines)
