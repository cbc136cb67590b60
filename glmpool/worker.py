"""One worker process per device: holds a model, runs the continuous-batching loop. Compute only.

The worker never touches the spool. It talks to the supervisor through a queue and a pipe of its own
(a shared queue would stay locked forever if a worker were killed while writing to it):
  tasks   (supervisor -> worker): ("run", key, query, history, params, deadline) | ("cancel", key) | ("stop",)
  results (worker -> supervisor): ("ready", wid, info) | ("fatal", wid, message) | ("beat", wid, stats)
                                  | ("token", wid, key, text, n) | ("done", wid, key, text, detail)
                                  | ("error", wid, key, message)
                                  | ("oom", wid, {"max_batch", "batch", "error", "shed": [key, ...]})
A worker holds any number of requests at once (up to max_batch generate together, the rest wait in
arrival order). The key is the claim's token, unique even when a client reuses a request id.
A step that runs out of device memory costs no request anything: see Loop.recover().
"token" messages are sent at most every progress_seconds and every progress_tokens per request (0 tokens:
never), the first as soon as progress_tokens exist: enough for .partial files, without streaming the
growing text through the pipe after every step.
This module imports no torch at module level: the process is spawned, sets CUDA_VISIBLE_DEVICES,
and only then imports the engine, so CUDA initialises on the right device.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import time
from collections import deque
from dataclasses import dataclass, field

from .config import BY_NAME

log = logging.getLogger(__name__)

BEAT_SECONDS = 1.0
# An idle worker woken by a request waits this long for more (up to GATHER_MAX_SECONDS in all) before its
# first step: a burst arrives one claim (~1 ms) apart, and prompts admitted together share one prefill.
GATHER_SECONDS = 0.005
GATHER_MAX_SECONDS = 0.05
TEST_CRASH_ENV = "GLMPOOL_TEST_CRASH_ON"  # test-only: a worker exits abruptly on a query containing this
# test-only: a step of a batch of two or more that holds a query containing this runs out of memory
TEST_OOM_ENV = "GLMPOOL_TEST_OOM_ON"
TEST_STATIC_ENV = "GLMPOOL_TEST_STATIC"  # test-only: cpu workers take the GPU path (engine.static_decode)


@dataclass(frozen=True)
class WorkerSpec:
    wid: int
    device: str  # "cpu" or the --gpus index, as a string
    model: str
    dtype: str | None
    quantize: int | str | None
    cache_dir: str | None
    max_batch: int
    kv_cache_gb: float | None
    threads: int = 0  # torch intra-op threads (0: torch's default)
    progress_seconds: float = BY_NAME["partial_seconds"].default
    progress_tokens: int = BY_NAME["partial_tokens"].default
    matmul: str = BY_NAME["matmul"].default
    visible: str = ""  # the worker's CUDA_VISIBLE_DEVICES: the entry of the supervisor's that `device` counts to
    sharing: int = 1  # workers on the same physical device: they split its free memory for KV caches
    compile: bool = BY_NAME["compile"].default == "on"  # GPU workers: the decode step compiled (engine.static_decode)
    revision: str | None = None
    log_level: str = BY_NAME["log_level"].default
    log_format: str = BY_NAME["log_format"].default
    quantized_activations: str = BY_NAME["quantized_activations"].default

    @property
    def label(self) -> str:
        return "cpu" if self.device == "cpu" else f"cuda:{self.device}"

    @property
    def loads_on_host(self) -> bool:
        """Its model passes through host memory while loading: a cpu worker's stays there, and quantizing
        at load holds the unquantized matrices on the host. Such workers load one at a time, so that each
        one's memory check (engine.api.check_memory) sees what the others took."""
        return self.device == "cpu" or bool(self.quantize)


def main(spec: WorkerSpec, tasks, results) -> None:
    """Entry point of the spawned process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    set_device_environment(spec)
    # torch then allocates tensors of 2 MB and more on huge pages, so the weights load straight onto them
    # instead of being moved there afterwards (engine/hugepages.py); read once, before torch allocates.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from . import logs
    logs.setup(spec.log_level, spec.log_format, worker=spec.wid)
    from .engine import EngineError, hugepages, load
    from .engine.api import free_memory, parse_device
    if spec.threads:
        import torch
        torch.set_num_threads(spec.threads)  # cpu workers share the cores instead of fighting over them
    try:
        device = parse_device("cpu" if spec.device == "cpu" else "cuda")
        free_before = free_memory(device) if spec.sharing > 1 else 0  # the model's footprint, counted below
        engine = load(spec.model, device=device, dtype=spec.dtype,
                      cache_dir=spec.cache_dir, quantize=spec.quantize, progress=True,  # bars only on a tty
                      matmul=spec.matmul, revision=spec.revision,
                      quantized_activations=spec.quantized_activations)
    except EngineError as error:
        results.send(("fatal", spec.wid, str(error)))
        return
    except Exception as error:  # a model that cannot load is reported, not a crash loop of tracebacks
        results.send(("fatal", spec.wid, f"{type(error).__name__}: {error}"))
        return
    hugepages.reuse_freed_memory()  # after loading, whose temporary copies may go back to the system
    if spec.kv_cache_gb:
        kv_tokens = int(spec.kv_cache_gb * (1 << 30)) // engine.kv_bytes_per_token()
    else:  # workers sharing the device: each counts the others' copies of the model as its own takes
        model_bytes = max(0, free_before - free_memory(device)) if spec.sharing > 1 else None
        kv_tokens = engine.default_kv_tokens(sharing=spec.sharing, model_bytes=model_bytes)
    # GPU workers compile every decode-step bucket now, while the supervisor counts it as loading (load_timeout),
    # not as a busy worker's silence (heartbeat_timeout)
    static = True if os.environ.get(TEST_STATIC_ENV) else None  # None: the GPU path on GPUs only
    batch = engine.batcher(spec.max_batch, kv_tokens, static=static, compile=spec.compile)
    compile_seconds = None
    if hasattr(batch, "warm_up"):
        try:
            compile_seconds = round(batch.warm_up(), 1)
        except Exception as error:  # a compiler that fails here: the same steps, eagerly
            log.warning("compiling the decode step failed (%s: %s): running it eagerly (--compile off)",
                        type(error).__name__, error)
            import torch
            batch = None
            torch._dynamo.reset()  # its compiled steps hold the first cache
            batch = engine.batcher(spec.max_batch, kv_tokens, static=static, compile=False)
        else:
            log.warning("decode step %s in %.1f s", "compiled" if spec.compile else "warmed up", compile_seconds)
    results.send(("ready", spec.wid, {"pid": os.getpid(), "kv_tokens": kv_tokens, "max_batch": batch.max_batch,
                                      "compile_seconds": compile_seconds}))
    try:
        Loop(spec, engine, batch, tasks, results).run()
    except (BrokenPipeError, ConnectionResetError, EOFError):  # the supervisor is gone: so are we
        pass


def set_device_environment(spec: WorkerSpec) -> None:
    """Before CUDA initialises: the one device this worker may see, numbered as the supervisor numbers it."""
    from .gpus import DEVICE_ORDER
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if spec.device == "cpu" else spec.visible or spec.device
    os.environ.setdefault("CUDA_DEVICE_ORDER", DEVICE_ORDER)


@dataclass
class Task:
    key: str
    query: str
    history: list
    params: dict
    deadline: float | None  # wall clock
    received: float = field(default_factory=time.time)
    reported: float = float("-inf")  # monotonic time of the last progress message (the first goes at once)
    reported_tokens: int = 0  # generated tokens at the last progress message


class Loop:
    def __init__(self, spec, engine, batch, tasks, results):
        self.spec, self.engine, self.batch = spec, engine, batch
        self.tasks, self.results = tasks, results
        self.waiting: deque[Task] = deque()  # dispatched here, not yet admitted (batch or KV budget full)
        self.active: dict[str, Task] = {}  # in the batch
        self.tokens = 0
        # lowered after running out of memory (see recover); the GPU path may hold fewer slots (its KV budget)
        self.max_batch = getattr(batch, "max_batch", spec.max_batch)
        self.last_beat = 0.0
        self.crash_marker = os.environ.get(TEST_CRASH_ENV)
        self.oom_marker = os.environ.get(TEST_OOM_ENV)
        if self.oom_marker and engine is not None:  # the last layer's MLP: mid-step, on either decode path
            engine.model.layers[-1].mlp.register_forward_pre_hook(self.simulate_out_of_memory)

    def run(self) -> None:
        while True:
            idle = not len(self.batch) and not self.waiting
            if not self.receive(BEAT_SECONDS if idle else 0.0):
                return
            if idle and self.waiting and not self.gather():
                return
            self.admit()
            self.expire()
            if len(self.batch):
                self.step()
            self.beat()

    def gather(self) -> bool:
        """Receive until no request came for GATHER_SECONDS, GATHER_MAX_SECONDS passed or a full batch is
        waiting; False on stop."""
        deadline = time.monotonic() + GATHER_MAX_SECONDS
        waiting = 0
        while waiting < len(self.waiting) < self.spec.max_batch and time.monotonic() < deadline:
            waiting = len(self.waiting)
            if not self.receive(GATHER_SECONDS):
                return False
        return True

    def receive(self, timeout: float) -> bool:
        """Take every pending message, waiting up to `timeout` for the first; False when told to stop."""
        while True:
            try:
                message = self.tasks.get(timeout=timeout) if timeout else self.tasks.get_nowait()
            except queue.Empty:
                return True
            timeout = 0.0
            kind = message[0]
            if kind == "stop":
                return False
            if kind == "cancel":
                self.cancel(message[1], "cancelled")
            elif kind == "run":
                self.waiting.append(Task(*message[1:]))

    def admit(self) -> None:
        from .engine import AdmissionError, EngineError, SamplingParams
        while self.waiting:
            task = self.waiting[0]
            if self.crash_marker and self.crash_marker in task.query:
                os._exit(99)
            try:
                self.batch.add(task.key, task.query, task.history, SamplingParams(**task.params))
            except AdmissionError:  # no room until something finishes: it waits at the head of the line
                return
            except (EngineError, ValueError, TypeError) as error:  # this request can never run
                self.results.send(("error", self.spec.wid, task.key, str(error)))
            else:
                self.active[task.key] = task
            self.waiting.popleft()

    def expire(self) -> None:
        now = time.time()
        for task in [*self.waiting, *self.active.values()]:
            if task.deadline and now >= task.deadline:
                self.cancel(task.key, "timeout")

    def cancel(self, key: str, reason: str) -> None:
        for task in self.waiting:
            if task.key == key:
                self.waiting.remove(task)
                self.send_done(task, "", {"finish_reason": reason, "generated_tokens": 0})
                return
        event = self.batch.cancel(key)
        if event is not None:
            self.finish(event, reason)

    def step(self) -> None:
        try:
            events = self.batch.step()
        except Exception as error:
            if not out_of_memory(error):
                raise
            events, failure = None, str(error).splitlines()[0]
        if events is None:  # out of the except clause: its traceback holds the step's tensors
            self.recover(failure)
            return
        now = time.monotonic()  # after the step: a first token goes out as soon as it exists
        for event in events:
            self.tokens += 1
            task = self.active.get(event.key)
            if event.finished:
                self.finish(event, event.finish_reason)
            elif task is not None and self.spec.progress_tokens \
                    and event.generated_tokens - task.reported_tokens >= self.spec.progress_tokens \
                    and now - task.reported >= self.spec.progress_seconds:
                task.reported, task.reported_tokens = now, event.generated_tokens
                self.results.send(("token", self.spec.wid, event.key, event.text, event.generated_tokens))

    def recover(self, failure: str) -> None:
        """A step ran out of device memory: a fact about capacity, not a fault of the requests. The batch
        goes (its KV caches and the step's activations with it); of the requests held, the oldest half run
        again from their start, those after are handed back to the supervisor for any worker, charged no
        attempt; and this worker admits that half at most from now on. A request that fails so alone is
        answered with the error."""
        in_batch = list(self.active.values())
        held = sorted([*in_batch, *self.waiting], key=lambda task: task.received)
        self.active.clear()
        self.waiting.clear()
        kv_tokens, static, self.batch = self.batch.max_kv_tokens, self.batch if hasattr(self.batch, "reset") else None, None
        release_device_memory()
        if len(in_batch) == 1:
            held.remove(in_batch[0])
            self.results.send(("error", self.spec.wid, in_batch[0].key,
                               f"out of device memory even alone ({failure}): lower max_length or max_new_tokens"))
        else:
            self.max_batch = max(1, len(in_batch) // 2)
        if static is not None:  # its KV cache and compiled steps stay (a new one would compile again)
            self.batch = static.reset(self.max_batch)
        else:
            self.batch = self.engine.batcher(self.max_batch, kv_tokens)
        kept, shed = held[:self.max_batch], held[self.max_batch:]
        for task in kept:
            task.reported, task.reported_tokens = float("-inf"), 0
        self.waiting.extend(kept)
        self.results.send(("oom", self.spec.wid, {"max_batch": self.max_batch, "error": failure, "batch": len(in_batch),
                                                  "shed": [task.key for task in shed]}))

    def simulate_out_of_memory(self, module, args) -> None:
        """Test-only (TEST_OOM_ENV): a forward pass in the middle of a step fails as CUDA's allocator does."""
        if len(self.batch) > 1 and any(self.oom_marker in task.query for task in self.active.values()):
            import torch
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by {TEST_OOM_ENV})")

    def finish(self, event, reason: str) -> None:
        task = self.active.pop(event.key)
        self.send_done(task, event.text, {"finish_reason": reason, "prompt_tokens": event.prompt_tokens,
                                          "generated_tokens": event.generated_tokens})

    def send_done(self, task: Task, text: str, detail: dict) -> None:
        self.results.send(("done", self.spec.wid, task.key, text, {**detail, "received": task.received}))

    def beat(self) -> None:
        now = time.time()
        if now - self.last_beat < BEAT_SECONDS:
            return
        self.last_beat = now
        self.results.send(("beat", self.spec.wid, {"tokens": self.tokens, "in_flight": len(self.batch),
                                                  "waiting": len(self.waiting), "max_batch": self.max_batch,
                                                  "gpu_memory_reserved": gpu_memory_reserved()}))


def gpu_memory_reserved() -> int | None:
    """What torch's allocator holds on this worker's GPU (the CUDA context not counted), None without one.
    The supervisor prefers NVML's count for the whole process where NVML can see it."""
    import torch
    return torch.cuda.memory_reserved() if torch.cuda.is_initialized() else None


def out_of_memory(error: Exception) -> bool:
    import torch
    return isinstance(error, torch.OutOfMemoryError)


def release_device_memory() -> None:
    import gc

    import torch
    gc.collect()  # a failed step can leave reference cycles holding tensors
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
