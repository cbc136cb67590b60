"""Fault injection (bench/faults.py): a short randomized run, and the checks themselves shown to catch
what they look for (a checker that cannot fail would prove nothing)."""
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pooltools import REPO


def _load_faults():
    spec = importlib.util.spec_from_file_location("glmpool_bench_faults", Path(REPO) / "bench" / "faults.py")
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


faults = _load_faults()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from glmpool.engine.tiny import cached_tiny_checkpoint
    path = tmp_path_factory.mktemp("cache")
    cached_tiny_checkpoint(path)
    return path


def _answer(requests: Path, rid: str, text: str = "an answer", meta_text: str | None = None) -> None:
    (requests / f"{rid}.meta").write_text(json.dumps({"id": rid, "history": [["q", meta_text or text]]}))
    (requests / f"{rid}.back").write_text(text)


def test_the_checks_catch_lost_duplicated_and_leftover_work(tmp_path):
    requests = tmp_path / "requests"
    (requests / ".claims").mkdir(parents=True)
    (requests / "failed").mkdir()
    counter = faults.CreateCounter(requests, faults.OUTCOMES)
    _answer(requests, "good")
    _answer(requests, "twice")
    (requests / "twice.back").unlink()  # deleted and written again: one file at the end, two writes
    _answer(requests, "twice")
    _answer(requests, "both")
    (requests / "both.error").write_text("failed too\n{}\n")
    _answer(requests, "mixed", "first answer", meta_text="a later duplicate's answer")
    (requests / "failed" / "good.request").write_text("q\n")
    (requests / "left.request").write_text("q\n")
    (requests / ".claims" / "0123abcd.claim").write_text("{}")
    (requests / ".x.back.abc.tmp").write_text("")
    time.sleep(0.3)  # let the watcher drain
    creates = counter.close()
    assert creates["twice.back"] == 2 and creates["good.back"] == 1
    violations, failed = faults.verify(tmp_path, ["good", "twice", "both", "mixed", "lost"], creates)
    text = "\n".join(violations)
    assert "twice.back written 2 times" in text
    assert "both: outcomes ['.back', '.error']" in text and "lost: outcomes none" in text
    assert "mixed.meta" in text and "disagrees" in text
    assert "left.request" in text and "0123abcd.claim" in text and ".x.back.abc.tmp" in text
    assert "failed/ inputs of answered requests: ['good']" in text
    assert not any(v.startswith("good") for v in violations) and failed == {"both"}
    assert faults.verify(tmp_path, ["good"], Counter({"good.back": 1}))[0] != []  # the leftovers still count


def test_short_randomized_fault_run(tmp_path, cache_dir):
    """3 supervisors x 2 cpu workers, requests arriving while workers and supervisors are SIGKILLed and
    restarted: every request answered exactly once, nothing left behind. (bench/faults.py runs it long.)
    A new schedule of faults each run; a failure prints its seed, and FAULTS_SEED=<seed> replays it."""
    seed = int(os.environ.get("FAULTS_SEED", time.time_ns() % 10000))
    print(f"fault schedule: FAULTS_SEED={seed}")
    result = faults.run_trial(tmp_path / "spool", cache_dir, requests=60, supervisors=3, workers=2, interval=0.5,
                              submit_seconds=10, lease=3.0, seed=seed, timeout=280, min_kills=4)
    print(json.dumps(result))
    assert result["violations"] == [], result
    assert result["kills"] >= 4, result  # faults really happened
    assert result["answered"] + sum(result["errors"].values()) == 60
