"""The worker loop's timing: how often it reports progress (the supervisor rewrites .partial: --partial-seconds /
--partial-tokens), and how an idle worker gathers a burst before its first step."""
import argparse

from glmpool import config
from glmpool.worker import Loop, Task, WorkerSpec


class Events:
    """A stand-in batch: one request that generates `length` tokens, one per step."""

    def __init__(self, length: int):
        self.length, self.generated = length, 0

    def __len__(self):
        return int(self.generated < self.length)

    def step(self):
        from glmpool.engine.generate import TokenEvent
        self.generated += 1
        done = self.generated == self.length
        return [TokenEvent("k", 7, lambda: "x" * self.generated, done, "length" if done else None, 3, self.generated)]


class Pipe(list):
    def send(self, message):
        self.append(message)


def progress(seconds: float, tokens: int, length: int = 10) -> list[int]:
    spec = WorkerSpec(0, "cpu", "m", None, None, "", 4, None, progress_seconds=seconds, progress_tokens=tokens)
    results = Pipe()
    loop = Loop(spec, None, Events(length), None, results)
    loop.active["k"] = Task("k", "q", [], {}, None)
    while len(loop.batch):
        loop.step()
    assert results[-1][0] == "done" and results[-1][3] == "x" * length
    return [m[4] for m in results if m[0] == "token"]


def test_progress_every_n_tokens_and_t_seconds():
    assert progress(0.0, 1) == list(range(1, 10))  # every token but the last (the answer itself)
    assert progress(0.0, 3) == [3, 6, 9]
    assert progress(0.0, 0) == []  # no .partial at all
    assert progress(3600.0, 1) == [1]  # the first token at once (time to first token), then not for an hour
    assert progress(3600.0, 4) == [4]


def test_partial_settings():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.resolve(parser.parse_args(["--partial-tokens", "8"]), {"GLMPOOL_PARTIAL_SECONDS": "1.5"})
    assert (settings.partial_tokens, settings.partial_seconds) == (8, 1.5)
    assert (config.BY_NAME["partial_tokens"].default, config.BY_NAME["partial_seconds"].default) == (1, 0.25)


class Recorder:
    """A stand-in batch that answers everything in one step and records how many sequences each step had."""

    def __init__(self):
        self.keys, self.steps = [], []

    def __len__(self):
        return len(self.keys)

    def add(self, key, query, history, params):
        self.keys.append(key)

    def step(self):
        from glmpool.engine.generate import TokenEvent
        self.steps.append(len(self.keys))
        events = [TokenEvent(key, 7, lambda: "x", True, "stop", 1, 1) for key in self.keys]
        self.keys = []
        return events


def test_idle_worker_gathers_a_burst_into_one_first_step(monkeypatch):
    """Requests arriving a little apart at an idle worker start together (one prefill), not one alone first."""
    import queue
    import threading
    import time

    from glmpool import worker
    monkeypatch.setattr(worker, "GATHER_SECONDS", 0.5)  # generous: the producer's 20 ms gaps fit on a busy machine
    monkeypatch.setattr(worker, "GATHER_MAX_SECONDS", 10.0)
    spec = WorkerSpec(0, "cpu", "m", None, None, "", 8, None)
    tasks, results, batch = queue.Queue(), Pipe(), Recorder()

    def produce():
        for i in range(4):
            tasks.put(("run", f"k{i}", "q", [], {}, None))
            time.sleep(0.02)
        deadline = time.monotonic() + 30
        while sum(m[0] == "done" for m in list(results)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        tasks.put(("stop",))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    Loop(spec, None, batch, tasks, results).run()
    producer.join(5)
    assert batch.steps == [4]
    assert sorted(m[2] for m in results if m[0] == "done") == ["k0", "k1", "k2", "k3"]


def test_idle_worker_stops_gathering_once_a_full_batch_waits(monkeypatch):
    """A burst of max_batch requests starts at once: waiting for a quiet moment could add nothing to it."""
    import queue
    import threading
    import time

    from glmpool import worker
    monkeypatch.setattr(worker, "GATHER_SECONDS", 60.0)  # longer than the stopper waits: only a full batch ends it
    monkeypatch.setattr(worker, "GATHER_MAX_SECONDS", 120.0)
    spec = WorkerSpec(0, "cpu", "m", None, None, "", 4, None)
    tasks, results, batch = queue.Queue(), Pipe(), Recorder()
    for i in range(4):
        tasks.put(("run", f"k{i}", "q", [], {}, None))

    def stop_when_answered():
        deadline = time.monotonic() + 20
        while sum(m[0] == "done" for m in list(results)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        tasks.put(("stop",))  # during a gather, this ends the loop before any step

    stopper = threading.Thread(target=stop_when_answered, daemon=True)
    stopper.start()
    Loop(spec, None, batch, tasks, results).run()
    stopper.join(5)
    assert batch.steps == [4]
