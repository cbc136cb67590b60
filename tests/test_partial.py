"""How often a worker reports progress (and the supervisor rewrites .partial): --partial-seconds / --partial-tokens."""
import argparse
import time

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
        return [TokenEvent("k", 7, "x" * self.generated, done, "length" if done else None, 3, self.generated)]


class Pipe(list):
    def send(self, message):
        self.append(message)


def progress(seconds: float, tokens: int, length: int = 10) -> list[int]:
    spec = WorkerSpec(0, "cpu", "m", None, None, "", 4, None, progress_seconds=seconds, progress_tokens=tokens)
    results = Pipe()
    loop = Loop(spec, None, Events(length), None, results)
    loop.active["k"] = Task("k", "q", [], {}, None, reported=time.monotonic())
    while len(loop.batch):
        loop.step()
    assert results[-1][0] == "done" and results[-1][3] == "x" * length
    return [m[4] for m in results if m[0] == "token"]


def test_progress_every_n_tokens_and_t_seconds():
    assert progress(0.0, 1) == list(range(1, 10))  # every token but the last (the answer itself)
    assert progress(0.0, 3) == [3, 6, 9]
    assert progress(0.0, 0) == []  # no .partial at all
    assert progress(3600.0, 1) == []  # not an hour yet


def test_partial_settings():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.resolve(parser.parse_args(["--partial-tokens", "8"]), {"GLMPOOL_PARTIAL_SECONDS": "1.5"})
    assert (settings.partial_tokens, settings.partial_seconds) == (8, 1.5)
    assert (config.BY_NAME["partial_tokens"].default, config.BY_NAME["partial_seconds"].default) == (1, 0.25)
