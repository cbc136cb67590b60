"""Request `priority`: the scan's order and its cache of priorities, claimed jobs waiting, and a real pool."""
import argparse
import json
import os
import uuid

from glmpool import config, spool, supervisor
from glmpool.claims import Claim
from glmpool.supervisor import Job, Supervisor

from pooltools import Pool, json_request, meta, outcome, seed_request


def make_supervisor(tmp_path, **settings) -> Supervisor:
    s = Supervisor(config.resolve(argparse.Namespace(dir=str(tmp_path), **settings), environ={}))
    s.requests.mkdir(parents=True, exist_ok=True)
    return s


def put(requests, name: str, text: str, age: float) -> None:
    path = requests / name
    path.write_text(text)
    os.utime(path, (path.stat().st_mtime - age,) * 2)


def test_scan_orders_by_priority_then_arrival(tmp_path):
    s = make_supervisor(tmp_path)
    r = s.requests
    put(r, "seed_old.request", "q\n", 50)  # seed form: priority 0
    put(r, "low.json", json.dumps({"query": "q", "priority": -3}) + "\n", 45)
    put(r, "zero_json.json", json.dumps({"query": "q"}) + "\n", 40)
    put(r, "seed_new.request", "q\n", 30)
    put(r, "high_new.json", json.dumps({"query": "q", "priority": 5}) + "\n", 10)
    put(r, "high_old.json", json.dumps({"query": "q", "priority": 5}) + "\n", 20)
    put(r, "mid.json", json.dumps({"query": "q", "priority": 1}) + "\n", 5)
    put(r, "bad.json", '{"query": "q", "priority": "urgent"}\n', 35)  # invalid: ordered as 0, failed by take()
    put(r, "cut.json", '{"query": "q", "priority": 9', 34)  # still being written: 0 until it parses
    put(r, "flag.json", '{"query": "q", "priority": true}\n', 33)
    os.symlink(r / "high_new.json", r / "link.json")  # never followed: 0
    order = [rid for rid, _ in s.scan()]  # the symlink's own mtime is now: last among priority 0
    assert order == ["high_old", "high_new", "mid", "seed_old", "zero_json", "bad", "cut", "flag", "seed_new",
                     "link", "low"], order


def test_priorities_are_read_once_per_file_version(tmp_path, monkeypatch):
    s = make_supervisor(tmp_path)
    reads = []
    real = supervisor.read_priority
    monkeypatch.setattr(supervisor, "read_priority", lambda path, info: reads.append(path) or real(path, info))
    for i in range(20):
        put(s.requests, f"r{i}.json", json.dumps({"query": "q", "priority": i % 3}) + "\n", 100 - i)
    put(s.requests, "seed.request", "q\n", 200)
    first = s.scan()
    assert len(reads) == 20  # .json only
    assert [rid for rid, _ in s.scan()] == [rid for rid, _ in first] and len(reads) == 20  # from the cache
    spool.atomic_write(s.requests / "r0.json", json.dumps({"query": "q", "priority": 7}))  # rewritten
    (s.requests / "r1.json").unlink()
    order = [rid for rid, _ in s.scan()]
    assert len(reads) == 21 and order[0] == "r0" and "r1" not in order
    assert "r1" not in s.priorities and len(s.priorities) == 19  # the cache holds only what is pending


def job(rid: str, priority: int, arrived: float, attempts: int = 0) -> Job:
    request = spool.Request(rid, "q", priority=priority, arrived=arrived)
    return Job(Claim(uuid.uuid4().hex, rid, attempts=attempts), request)


def test_claimed_jobs_wait_by_priority_then_arrival(tmp_path):
    s = make_supervisor(tmp_path)
    s.queue_pending([job("late", 0, 30.0), job("early", 0, 10.0)])
    s.queue_pending([job("urgent", 2, 40.0), job("requeued", 0, 20.0, attempts=1)])
    assert [j.request.id for j in s.pending] == ["urgent", "early", "requeued", "late"]


def test_pool_answers_higher_priority_first(tmp_path):
    """One worker generating one request at a time, a queue written before it starts: low priorities and
    seed-form requests first (older), a high-priority one last; the high one is answered first, then the
    rest by priority and, within a priority, oldest first."""
    from glmpool.engine.tiny import cached_tiny_checkpoint
    cache = tmp_path / "cache"
    cached_tiny_checkpoint(cache)
    body = {"query": "hello", "do_sample": False, "max_new_tokens": 8}
    json_request(tmp_path, "low1", {**body, "priority": -1})
    seed_request(tmp_path, "seed1", "hello")
    json_request(tmp_path, "zero1", body)
    json_request(tmp_path, "low2", {**body, "priority": -1})
    json_request(tmp_path, "high", {**body, "priority": 10})
    for rid, age in [("low1", 5), ("seed1", 4), ("zero1", 3), ("low2", 2), ("high", 1)]:
        for path in (tmp_path / "requests").glob(f"{rid}.*"):
            os.utime(path, (path.stat().st_mtime - age,) * 2)
    p = Pool(tmp_path, cache, "--gpus", "cpu", "--max-batch", "1", "--max-length", "64").start()
    try:
        p.wait_running()
        for rid in ("high", "seed1", "zero1", "low1", "low2"):
            assert outcome(tmp_path, rid, 60)[0] == "back"
    finally:
        p.kill()
    received = {rid: meta(tmp_path, rid)["timings"]["received"] for rid in ("high", "seed1", "zero1", "low1", "low2")}
    assert sorted(received, key=received.get) == ["high", "seed1", "zero1", "low1", "low2"], received
