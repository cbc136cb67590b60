"""Files named by a request id outlive their request (clients reuse ids: the original ones ask every
question as `1`), and flags are files too: against a real pool, no file of one request acts on another,
and nothing but a flag counts as one (README: "Which request a file belongs to", "Flags").

One pool, one cpu worker with room for two requests: a test that must have several files seen at once
stops the worker (SIGSTOP) while two requests of its own fill it, so that nothing is claimed until it
resumes. A short lease makes the spool's housekeeping (stray files) run every second.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from contextlib import contextmanager

import pytest

from glmpool import spool
from glmpool.client import ClientError
from pooltools import Pool, json_request, meta, seed_request, wait_for


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from glmpool.engine.tiny import cached_tiny_checkpoint
    cache = tmp_path_factory.mktemp("cache")
    cached_tiny_checkpoint(cache)
    p = Pool(tmp_path_factory.mktemp("ids"), cache, "--gpus", "cpu", "--max-batch", "2", "--max-length", "96",
             "--lease-seconds", "2", "--heartbeat-timeout", "60").start()
    try:
        yield p.wait_running()
    finally:
        p.kill()


@contextmanager
def stopped_worker(pool: Pool, fill: bool = False):
    """The worker stopped (SIGSTOP) until the block ends; fill: with two requests of its own claimed, so
    that nothing else is claimed before it resumes, and files written meanwhile are seen together."""
    pid = wait_for(lambda: pool.status()["workers"][0]["pid"], 30, "the worker's pid")
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(2 if fill else 0):
            rid = f"holder-{uuid.uuid4().hex[:8]}"
            json_request(pool.root, rid, {"query": "hold", "max_new_tokens": 2})
            wait_for(lambda: not (pool.root / "requests" / f"{rid}.json").exists(), 10, "the holder claimed")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def answer_to(pool: Pool, rid: str, question: str, timeout: float = 60) -> tuple[str, dict]:
    """The .back of the request of `rid` that asked `question` (an older .back may still be there)."""
    requests = pool.root / "requests"

    def answered():
        try:
            info = meta(pool.root, rid)
            back = (requests / f"{rid}.back").read_text(encoding="utf-8")
        except (OSError, ValueError):
            return None
        return info["history"][-1][0] == question and (back, info)
    return wait_for(answered, timeout, f"the answer to {question!r}")


def no_reappearing_partial(pool: Pool, rid: str) -> None:
    """After the .back, the .partial goes and never comes back."""
    partial = pool.root / "requests" / f"{rid}.partial"
    wait_for(lambda: not partial.exists(), 5, "the .partial removed")
    with pytest.raises(AssertionError):
        wait_for(partial.exists, 1, "a .partial after the .back")


def test_a_late_cancel_never_cancels_the_next_request(pool):
    requests = pool.root / "requests"
    seed_request(pool.root, "1", "first question")
    answer_to(pool, "1", "first question")
    (requests / "1.cancel").touch()  # a cancel button pressed just after the answer came
    age(requests / "1.cancel", 1)  # before the next question, on a clock as coarse as a file's mtime may be
    seed_request(pool.root, "1", "second question")
    back, info = answer_to(pool, "1", "second question")
    assert info["finish_reason"] != "cancelled"
    assert not (requests / "1.cancel").exists()  # done with once its id had an outcome


def test_cancel_then_send_again_at_once(pool):
    """Cancelled while running, then the same id sent again at once: each has its own outcome; the new
    request waits for the old one's and is not cancelled."""
    requests = pool.root / "requests"
    cancelled = pool.output().count("request again failed: the request was cancelled")
    for n in range(3):
        with stopped_worker(pool):
            seed_request(pool.root, "again", f"a long answer please {n}")
            wait_for(lambda: not (requests / "again.request").exists(), 10, "the first one claimed")
            (requests / "again.cancel").touch()
            seed_request(pool.root, "again", f"never mind, this instead {n}")
        answer_to(pool, "again", f"never mind, this instead {n}")
        no_reappearing_partial(pool, "again")
    output = pool.output()
    assert output.count("request again failed: the request was cancelled") - cancelled == 3
    assert "dropping this rerun" not in output and "Traceback" not in output


def test_a_waiting_request_cancelled_fails_without_running(pool):
    requests = pool.root / "requests"
    with stopped_worker(pool, fill=True):
        json_request(pool.root, "waiting", {"query": "never mind"})
        (requests / "waiting.cancel").touch()
    wait_for(lambda: (requests / "waiting.error").exists(), 30, "the error")
    error = (requests / "waiting.error").read_text()
    assert error.startswith("the request was cancelled") and json.loads(error.split("\n", 1)[1])["partial"] == ""
    assert (requests / "failed" / "waiting.json").exists() and not (requests / "waiting.cancel").exists()


def test_both_forms_of_one_id_at_once(pool):
    """x.request (with x.history) and x.json at once: the seed form is answered with its history, the
    .json fails with an .error saying why, its input kept in failed/."""
    requests = pool.root / "requests"
    with stopped_worker(pool, fill=True):
        spool.atomic_write(requests / "both.history", '[["earlier question", "earlier answer"]]\n')
        spool.atomic_write(requests / "both.request", "the seed question\n")
        json_request(pool.root, "both", {"query": "the json question"})
    back, info = answer_to(pool, "both", "the seed question")
    assert info["history"] == [["earlier question", "earlier answer"], ["the seed question", back]]
    error = (requests / "both.error").read_text()
    assert error.startswith("both.json was not answered: both.request was waiting under the same id")
    assert json.loads(error.split("\n", 1)[1])["reason"] == "id conflict"
    assert json.loads((requests / "failed" / "both.json").read_text())["query"] == "the json question"
    assert not [p.name for p in requests.iterdir() if p.suffix in spool.INPUT_SUFFIXES and p.stem == "both"]
    no_reappearing_partial(pool, "both")


def test_a_history_later_than_its_request_fails_it_and_never_reaches_the_next(pool):
    requests = pool.root / "requests"
    with stopped_worker(pool):
        (requests / "late.request").write_text("a question whose history is late\n")  # no .history yet
        wait_for(lambda: not (requests / "late.request").exists(), 10, "claimed after the 1 s grace")
        (requests / "late.history").write_text('[["too", "late"]]\n')
    wait_for(lambda: (requests / "late.error").exists(), 30, "the error")
    error = (requests / "late.error").read_text()
    assert error.startswith("late.history came after late.request had been taken without a history")
    assert not (requests / "late.back").exists() and not (requests / "late.history").exists()
    assert (requests / "failed" / "late.history").read_text() == '[["too", "late"]]\n'
    assert (requests / "failed" / "late.request").exists()
    seed_request(pool.root, "late", "next question", history='[["its own", "history"]]')
    back, info = answer_to(pool, "late", "next question")
    assert info["history"] == [["its own", "history"], ["next question", back]]


def age(path, seconds: float) -> None:
    old = path.stat().st_mtime - seconds
    os.utime(path, (old, old))


def test_stray_files_are_cleared_and_act_on_nothing(pool):
    """A .history after its request's outcome, a .cancel for no request: cleared once STRAY_SECONDS old
    (the test ages them), the .history into failed/."""
    requests = pool.root / "requests"
    seed_request(pool.root, "stray", "first")
    answer_to(pool, "stray", "first")
    (requests / "stray.history").write_text('[["not", "mine"]]\n')
    (requests / "nobody.cancel").touch()
    age(requests / "stray.history", spool.STRAY_SECONDS + 1)
    age(requests / "nobody.cancel", spool.STRAY_SECONDS + 1)
    wait_for(lambda: not (requests / "stray.history").exists() and not (requests / "nobody.cancel").exists(),
             10, "the strays cleared")
    assert (requests / "failed" / "stray.history").read_text() == '[["not", "mine"]]\n'
    assert "moved stray.history into failed/" in pool.output()
    (requests / "stray.request").write_text("second\n")  # no history: after the grace, none
    back, info = answer_to(pool, "stray", "second")
    assert info["history"] == [["second", back]]


def test_empty_and_blank_requests(pool):
    """0 bytes is what a failed `echo >` leaves: an error. A blank line is a question like any other."""
    requests = pool.root / "requests"
    (requests / "empty.request").write_bytes(b"")
    (requests / "blank.request").write_text("\n")
    wait_for(lambda: (requests / "empty.error").exists(), 30, "the error")
    assert (requests / "empty.error").read_text().startswith("empty.request is empty (0 bytes)")
    assert (requests / "failed" / "empty.request").stat().st_size == 0
    back, info = answer_to(pool, "blank", "")
    assert info["history"] == [["", back]]


def refused_flag(pool: Pool, make, name: str, kept: bool) -> None:
    flags = pool.root / "flags"
    path = flags / name
    before = pool.output().count(f"flags/{name} is")
    make(path)
    wait_for(lambda: pool.output().count(f"flags/{name} is") > before, 10, "the refusal in the log")
    assert os.path.lexists(path) == kept and pool.process.poll() is None
    if not kept:
        assert pool.status()["status"] == "running"


def full_directory(path) -> None:
    """A directory holding a file, put in place at once (an empty directory is a flag)."""
    staging = path.with_name(".staging")
    staging.mkdir()
    (staging / "keep").write_text("mine\n")
    os.rename(staging, path)


def test_things_that_are_not_flags(pool, tmp_path):
    flags = pool.root / "flags"
    target = tmp_path / "target"
    target.write_text("untouched\n")
    for name in ("quit.flag", "status.flag"):
        (flags / "status.back").unlink(missing_ok=True)
        refused_flag(pool, lambda p: os.symlink(target, p), name, kept=False)
        refused_flag(pool, lambda p: os.symlink(tmp_path / "nothing", p), name, kept=False)
        refused_flag(pool, os.mkfifo, name, kept=False)
        assert target.read_text() == "untouched\n" and not (tmp_path / "nothing").exists()
    full = flags / "status.flag"
    refused_flag(pool, full_directory, "status.flag", kept=True)
    with pytest.raises(ClientError):
        pool.status(timeout=2)  # `touch` on the directory asks nothing
    assert pool.output().count("flags/status.flag is a directory that is not empty") == 1  # logged once
    (full / "keep").unlink()
    full.rmdir()
    assert pool.status()["status"] == "running"  # status works again once it is gone


def test_a_quit_flag_that_is_a_full_directory_neither_stops_nor_breaks_the_exit(pool):
    """Found: it used to stop the pool, then fail to remove it at exit: a traceback and exit code 1."""
    flags = pool.root / "flags"
    refused_flag(pool, full_directory, "quit.flag", kept=True)
    pool.signal(signal.SIGTERM)
    assert pool.wait_exit(60) == 0
    assert (flags / "quit.flag" / "keep").read_text() == "mine\n"
    assert "Traceback" not in pool.output()
