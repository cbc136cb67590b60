"""The GPUs as the supervisor sees them, without torch and without a CUDA context: the device each worker
gets, those missing, and their memory (NVML through nvidia-ml-py, when a driver is there).

The supervisor's own CUDA_VISIBLE_DEVICES (a scheduler's or an operator's choice) lists what the pool may
use: --gpus indices count in that list, and a worker is given the entry itself (an index, a GPU-... or
MIG-... UUID), so that it sees exactly that device, as its cuda:0. Workers number the GPUs in PCI bus order
(CUDA_DEVICE_ORDER=PCI_BUS_ID unless set otherwise), as nvidia-smi and NVML do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

DEVICE_ORDER = "PCI_BUS_ID"


class DeviceError(Exception):
    """No device of --gpus can be used; str() says why."""


@dataclass(frozen=True)
class Gpu:
    uuid: str  # GPU-... or, for a MIG instance, MIG-...
    index: int | None  # NVML's, in PCI bus order; None for a MIG instance
    name: str


@dataclass(frozen=True)
class Placement:
    """Where one worker runs."""
    device: str  # "cpu", or the --gpus index (counted in the supervisor's CUDA_VISIBLE_DEVICES)
    visible: str = ""  # the worker's CUDA_VISIBLE_DEVICES
    key: str = "cpu"  # the physical device: a GPU's UUID when NVML knows it, else `visible`
    missing: str | None = None  # why it cannot be used at all
    sharing: int = 1  # workers on the same physical device (they split its memory)


def visible_entries(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: None when unset (every GPU); else the entries before the
    first that is neither an index nor a GPU-/MIG- UUID, since CUDA ignores that one and all after it
    ("0,-1,1" is GPU 0 alone)."""
    if value is None:
        return None
    entries = []
    for entry in (e.strip() for e in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    return entries


class Nvml:
    """What NVML says about this host's GPUs. open() returns None without nvidia-ml-py or a driver; a
    query that fails later (a GPU fallen off the bus) answers None or nothing, never raises."""

    def __init__(self, pynvml):
        self.nvml = pynvml
        self.handles: dict[str, object] = {}
        self.devices: list[Gpu] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.add(Gpu(pynvml.nvmlDeviceGetUUID(handle), index, pynvml.nvmlDeviceGetName(handle)), handle)
            for instance in self.mig_instances(handle):
                self.add(Gpu(pynvml.nvmlDeviceGetUUID(instance), None, pynvml.nvmlDeviceGetName(instance)), instance)

    @classmethod
    def open(cls) -> Nvml | None:
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:  # no driver: a CPU host
            return None
        try:
            return cls(pynvml)
        except pynvml.NVMLError as error:
            log.warning("NVML cannot list the GPUs: %s", error)
            pynvml.nvmlShutdown()
            return None

    def close(self) -> None:
        self.nvml.nvmlShutdown()

    def add(self, gpu: Gpu, handle) -> None:
        self.devices.append(gpu)
        self.handles[gpu.uuid] = handle

    def mig_instances(self, handle) -> list:
        try:
            if self.nvml.nvmlDeviceGetMigMode(handle)[0] != self.nvml.NVML_DEVICE_MIG_ENABLE:
                return []
            count = self.nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except self.nvml.NVMLError:  # not a MIG-capable GPU
            return []
        instances = []
        for i in range(count):
            try:
                instances.append(self.nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i))
            except self.nvml.NVMLError:  # an empty slot
                pass
        return instances

    def gpus(self) -> list[Gpu]:
        return self.devices

    def memory(self, uuid: str) -> tuple[int, int] | None:
        """(used, total) bytes of a device."""
        try:
            info = self.nvml.nvmlDeviceGetMemoryInfo(self.handles[uuid])
        except (KeyError, self.nvml.NVMLError):
            return None
        return info.used, info.total

    def processes(self, uuid: str) -> dict[int, int]:
        """pid -> GPU bytes of the compute processes on a device (host pids: none match in a pid namespace)."""
        try:
            found = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handles[uuid])
        except (KeyError, self.nvml.NVMLError):
            return {}
        return {p.pid: p.usedGpuMemory for p in found if isinstance(p.usedGpuMemory, int)}


def physical_gpu(entry: str, gpus: list[Gpu]) -> Gpu | None:
    """The device a CUDA_VISIBLE_DEVICES entry names (UUIDs may be abbreviated, as CUDA allows), in PCI
    bus order; a legacy MIG-GPU-<uuid>/<gi>/<ci> entry is resolved to its GPU."""
    if entry.isdigit():
        return next((g for g in gpus if g.index == int(entry)), None)
    if entry.startswith("MIG-GPU-"):
        entry = entry.removeprefix("MIG-").split("/")[0]
    found = [g for g in gpus if g.uuid.startswith(entry)]
    return found[0] if len(found) == 1 else None


def place_workers(gpus: str, environ, nvml: Nvml | None) -> list[Placement]:
    """Each worker's placement from --gpus. A GPU that is not there is kept as missing (the others
    serve); DeviceError when no worker could run at all."""
    parent = visible_entries(environ.get("CUDA_VISIBLE_DEVICES"))
    known = nvml.gpus() if nvml is not None else None
    if parent is not None:
        entries = parent
    else:  # every GPU, in PCI bus order
        entries = [str(g.index) for g in known or [] if g.index is not None]
    order = environ.get("CUDA_DEVICE_ORDER", DEVICE_ORDER)
    requested = [e.strip() for e in gpus.split(",") if e.strip()] if gpus else []
    if parent is not None:
        value = environ["CUDA_VISIBLE_DEVICES"] or "(empty)"
        visible_text = f"CUDA_VISIBLE_DEVICES={value} makes {len(entries)} visible"
    elif known is not None:
        visible_text = f"{len(entries)} visible"
    else:
        visible_text = "no NVIDIA driver, or no nvidia-ml-py to ask it"
    if not requested:
        requested = [str(i) for i in range(len(entries))] or ["cpu"]
    placements = []
    for entry in requested:
        if entry == "all":
            if not entries:
                raise DeviceError(f"--gpus {gpus}: no GPU is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
                                  "is empty)")
            placements += [placement(str(i), entries[i], known, order) for i in range(len(entries))]
        elif entry == "cpu":
            placements.append(Placement("cpu"))
        elif entry.isdigit():
            index = int(entry)
            if index < len(entries):
                placements.append(placement(entry, entries[index], known, order))
            else:
                placements.append(Placement(entry, missing=(
                    f"GPU {entry} does not exist ({visible_text}{'' if entries else '; use cpu workers'})")))
        else:
            raise DeviceError(f"--gpus {gpus}: {entry!r} is neither a GPU index, 'cpu' nor 'all'")
    usable = [p for p in placements if not p.missing]
    if not usable:
        raise DeviceError(f"--gpus {gpus}: " + "; ".join(dict.fromkeys(p.missing for p in placements)))
    keys = [p.key for p in usable]
    return [p if p.missing else replace(p, sharing=keys.count(p.key)) for p in placements]


def placement(device: str, entry: str, known: list[Gpu] | None, order: str) -> Placement:
    if known is None:  # no NVML: trust the entry (a wrong one fails the worker's start)
        return Placement(device, entry, entry)
    if entry.isdigit() and order != DEVICE_ORDER:  # CUDA's own order: which GPU that is only CUDA knows
        return Placement(device, entry, entry)
    gpu = physical_gpu(entry, known)
    if gpu is None:
        return Placement(device, entry, entry, missing=f"GPU {device} (CUDA_VISIBLE_DEVICES entry {entry}) is not "
                                                       f"present: NVML lists {len(known)} device(s)")
    # Each legacy MIG-GPU-<uuid>/<gi>/<ci> entry is a device of its own, though NVML knows only its GPU here.
    return Placement(device, entry, entry if entry.startswith("MIG-GPU-") else gpu.uuid)

