"""The pool's GPU branches on the CPU (glmpool.gpucheck, also run by `bench/gpu.py --cpu-dry-run`): which device
each worker sees, GPUs missing at start, workers sharing a GPU, surviving an out-of-memory step, GPU status."""
import pytest

from glmpool import gpucheck, gpus
from glmpool.gpucheck import FOUR_GPUS, FakeNvml
from glmpool.gpus import DeviceError, place_workers, visible_entries
from glmpool.worker import Loop, Task, WorkerSpec


def test_cuda_visible_devices_read_as_cuda_reads_it():
    assert visible_entries(None) is None
    assert visible_entries("") == []
    assert visible_entries(" 2, 3 ") == ["2", "3"]
    assert visible_entries("0,-1,1") == ["0"]  # CUDA stops at the first invalid entry
    assert visible_entries("1,gpu0,2") == ["1"]
    assert visible_entries("GPU-ab12,MIG-cd34,MIG-GPU-ef56/1/0") == ["GPU-ab12", "MIG-cd34", "MIG-GPU-ef56/1/0"]


def visible(gpus_setting, parent=None, nvml=None, **environ):
    environ = {**environ, **({} if parent is None else {"CUDA_VISIBLE_DEVICES": parent})}
    return [(p.visible, p.sharing) if not p.missing else p.missing for p in place_workers(gpus_setting, environ, nvml)]


def test_workers_count_in_the_parents_list_and_get_its_entries():
    assert visible("0,1", "2,3") == [("2", 1), ("3", 1)]
    assert visible("", "2,3") == [("2", 1), ("3", 1)]
    assert visible("all,cpu", "2,3") == [("2", 1), ("3", 1), ("", 1)]
    uuids = [g.uuid for g in FOUR_GPUS.gpus()]
    assert visible("1,0", f"{uuids[2]},{uuids[4]}", FOUR_GPUS) == [(uuids[4], 1), (uuids[2], 1)]
    assert visible("0", uuids[1][:12], FOUR_GPUS) == [(uuids[1][:12], 1)]  # an abbreviated UUID, as CUDA takes it
    assert visible("0,1", None, FOUR_GPUS) == [("0", 1), ("1", 1)]  # no parent list: every GPU NVML counts


def test_a_missing_gpu_is_kept_as_missing_while_the_others_serve():
    assert visible("0,1", "0,-1,1")[1] == "GPU 1 does not exist (CUDA_VISIBLE_DEVICES=0,-1,1 makes 1 visible)"
    assert "GPU 1 does not exist (1 visible)" in visible("0,1", None, FakeNvml(("GPU-x", 0)))[1]
    # An entry of the parent's list that names no GPU NVML knows (one gone, or a typo)
    assert "entry 7) is not present" in visible("0,1", "1,7", FOUR_GPUS)[1]
    assert "entry GPU-ffff) is not present" in visible("0,1", "GPU-ffff,1", FOUR_GPUS)[0]
    assert visible("cpu,0", "")[1].startswith("GPU 0 does not exist (CUDA_VISIBLE_DEVICES=(empty) makes 0 visible")
    with pytest.raises(DeviceError, match="GPU 7 does not exist"):  # nothing at all to serve with
        visible("7", "")
    with pytest.raises(DeviceError, match=r"GPU 0 does not exist \(no NVIDIA driver, or no nvidia-ml-py to ask it"):
        visible("0")
    with pytest.raises(DeviceError, match="no GPU is visible"):
        visible("all", "")
    with pytest.raises(DeviceError, match="neither"):
        visible("gpu0", "0")


def test_workers_on_one_device_know_they_share_it():
    assert visible("0,0,1", "0,1") == [("0", 2), ("0", 2), ("1", 1)]
    assert visible("cpu,cpu,0", "0") == [("", 2), ("", 2), ("0", 1)]
    uuids = [g.uuid for g in FOUR_GPUS.gpus()]
    # One GPU under two names is one device; MIG instances are devices of their own.
    assert visible("0,1,2", f"3,{uuids[3]},{uuids[4]}", FOUR_GPUS) == [("3", 2), (uuids[3], 2), (uuids[4], 1)]
    # Without PCI bus order, which GPU an index is only CUDA knows: trusted as it is.
    assert visible("0,1", "0,1", FOUR_GPUS, CUDA_DEVICE_ORDER="FASTEST_FIRST") == [("0", 1), ("1", 1)]


def test_nvml_is_optional_and_absent_here():
    assert gpus.Nvml.open() is None  # no driver on this machine: the pool runs without GPU numbers


def test_gpu_status_counts_each_gpu_once_and_no_dead_process():
    from types import SimpleNamespace

    class Nvml(FakeNvml):
        def memory(self, uuid):
            return {"GPU-a": (5, 80)}.get(uuid)

        def processes(self, uuid):
            return {"GPU-a": {101: 3, 102: 2}}.get(uuid, {})

    def slot(wid, gpu, pid, alive=True, reserved=None):
        return SimpleNamespace(spec=SimpleNamespace(wid=wid), gpu=gpu, pid=pid, process=object() if alive else None,
                               stats={"gpu_memory_reserved": reserved} if reserved else {})
    slots = [slot(0, "GPU-a", 101), slot(1, "GPU-a", 102), slot(2, "GPU-b", 103, reserved=7),
             slot(3, "GPU-b", 104, alive=False), slot(4, None, 105)]
    from glmpool.status import gpu_status, render_table
    devices, held = gpu_status(Nvml(("GPU-a", 0), ("GPU-b", 1)), slots)
    assert [(d["device"], d["memory_used"], d["memory_total"], d["workers"]) for d in devices] == \
        [("GPU-a", 5, 80, [0, 1]), ("GPU-b", None, None, [2, 3])]
    assert held == {0: 3, 1: 2, 2: 7}  # NVML's count, else the worker's own; none for a dead worker
    table = render_table({"host": "h", "gpus": devices, "workers": []})
    assert "GPU GPU-a test GPU  memory 5 B / 80 B  workers 0, 1" in table


@pytest.mark.parametrize("mapping", gpucheck.MAPPINGS, ids=[m[0] for m in gpucheck.MAPPINGS])
def test_a_spawned_worker_sees_its_entry_of_the_parents_list(mapping):
    result = gpucheck.check_mapping(*mapping)
    assert result.ok, result.detail


def test_workers_sharing_a_device_split_its_kv_budget(tmp_path):
    from glmpool.engine.tiny import cached_tiny_checkpoint
    cached_tiny_checkpoint(tmp_path)
    result = gpucheck.check_budget_split(tmp_path)
    assert result.ok, result.detail


def test_a_pool_serves_with_a_gpu_missing_and_survives_an_out_of_memory_step(tmp_path):
    from glmpool.engine.tiny import cached_tiny_checkpoint
    cached_tiny_checkpoint(tmp_path / "cache")
    checks = gpucheck.out_of_memory_checks(tmp_path / "cache", tmp_path / "spool", timeout=120)
    assert [c.name for c in checks] == ["pool with a missing GPU", "worker survives an out-of-memory batch step"]
    assert all(c.ok for c in checks), [c.detail for c in checks]


class OutOfMemoryBatch:
    """A stand-in batch whose step runs out of memory with more than `fits` sequences; else answers all."""

    def __init__(self, max_batch, max_kv_tokens, fits):
        self.max_batch, self.max_kv_tokens, self.fits, self.keys = max_batch, max_kv_tokens, fits, []

    def __len__(self):
        return len(self.keys)

    def add(self, key, query, history, params):
        from glmpool.engine import AdmissionError
        if len(self.keys) >= self.max_batch:
            raise AdmissionError("full")
        self.keys.append(key)

    def step(self):
        import torch

        from glmpool.engine.generate import TokenEvent
        if len(self.keys) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
        events = [TokenEvent(key, 7, lambda: "answer", True, "stop", 3, 1) for key in self.keys]
        self.keys = []
        return events


class Pipe(list):
    def send(self, message):
        self.append(message)


def run_loop(count, fits):
    """A worker loop given `count` requests at once, on a device where `fits` sequences fit in a step."""
    class Engine:
        def batcher(self, max_batch, max_kv_tokens):
            return OutOfMemoryBatch(max_batch, max_kv_tokens, fits)
    loop = Loop(WorkerSpec(0, "cpu", "m", None, None, "", 4, None), Engine(), OutOfMemoryBatch(4, 1000, fits),
                None, Pipe())
    loop.waiting.extend(Task(f"k{i}", "q", [], {}, None, received=i) for i in range(count))
    for _ in range(10):
        loop.admit()
        if len(loop.batch):
            loop.step()
    return loop, loop.results


def test_an_out_of_memory_step_halves_the_batch_and_hands_back_the_rest():
    loop, results = run_loop(count=5, fits=2)
    ooms = [m[2] for m in results if m[0] == "oom"]
    assert ooms == [{"max_batch": 2, "error": "CUDA out of memory. Tried to allocate 2.00 GiB", "batch": 4,
                     "shed": ["k2", "k3", "k4"]}]  # the oldest two run again; the rest go back (k4 was waiting)
    assert sorted(m[2] for m in results if m[0] == "done") == ["k0", "k1"]
    assert loop.max_batch == 2 and loop.batch.max_batch == 2 and loop.batch.max_kv_tokens == 1000
    assert not [m for m in results if m[0] == "error"]


def test_an_out_of_memory_step_alone_answers_with_the_error():
    loop, results = run_loop(count=2, fits=0)
    errors = [m for m in results if m[0] == "error"]
    assert errors and errors[0][2] == "k0" and "out of device memory even alone" in errors[0][3]
    assert [m[2]["shed"] for m in results if m[0] == "oom"][0] == ["k1"]
