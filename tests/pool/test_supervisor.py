"""Supervisor decisions that need no worker processes: devices, scan order, where a job may go."""
import argparse
import dataclasses
import json
import os
import uuid

import pytest

from glmpool import config
from glmpool.claims import Claim
from glmpool.supervisor import Job, Slot, StartupError, Supervisor, place_workers
from glmpool.worker import WorkerSpec


def supervisor(tmp_path, **settings) -> Supervisor:
    return Supervisor(config.resolve(argparse.Namespace(dir=str(tmp_path), **settings), environ={}))


def test_worker_placement_and_missing_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert [p.visible for p in place_workers("", None)] == ["0", "1"]
    with pytest.raises(StartupError, match="neither"):
        place_workers("gpu0", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(StartupError, match="no GPU is visible"):
        place_workers("all", None)
    placements = place_workers("cpu,3", None)
    s = supervisor(tmp_path)
    slots = [s.slot(i, p, placements) for i, p in enumerate(placements)]
    assert [(slot.state, slot.gpu) for slot in slots] == [("STARTING", None), ("FATAL", None)]
    assert slots[1].last_error.startswith("GPU 3 does not exist") and slots[1].spec.label == "cuda:3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,5")
    placements = place_workers("0,1", None)
    assert [(slot.spec.visible, slot.spec.sharing, slot.gpu) for slot in
            (s.slot(i, p, placements) for i, p in enumerate(placements))] == [("5", 2, "5"), ("5", 2, "5")]


def test_the_engine_settings_reach_the_workers_spec(tmp_path):
    placements = place_workers("cpu", None)
    s = supervisor(tmp_path, quantize="4-qe", matmul="onednn", quantized_activations="bf16", compile="off")
    spec = s.slot(0, placements[0], placements).spec
    assert (spec.quantize, spec.matmul, spec.quantized_activations, spec.compile, spec.visible) == \
        ("4-qe", "onednn", "bf16", False, "")
    assert supervisor(tmp_path).slot(0, placements[0], placements).spec.quantized_activations == "int8"


def test_workers_sharing_a_gpu_load_one_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    placements = place_workers("0,0,1", None)
    s = supervisor(tmp_path)
    s.slots = [s.slot(i, p, placements) for i, p in enumerate(placements)]
    s.slots[0].process = object()  # loading
    assert [s.loading_beside(slot) for slot in s.slots[1:]] == [True, False]
    s.slots[0].state = "RUNNING"
    assert not s.loading_beside(s.slots[1])


def test_scan_is_fifo_across_both_forms_and_groups_files(tmp_path):
    s = supervisor(tmp_path)
    requests = s.requests
    requests.mkdir()
    for age, name in [(30, "old.request"), (30, "old.history"), (20, "mid.json"), (10, "new.request"),
                      (5, "lonely.history"), (5, ".hidden.request"), (5, "x.back")]:
        path = requests / name
        path.write_text("q\n")
        os.utime(path, (path.stat().st_mtime - age,) * 2)
    order = s.scan()
    assert [rid for rid, _ in order] == ["old", "mid", "new"]  # no main input, dot files, outputs: ignored
    assert set(order[0][1]) == {".request", ".history"}


def job(attempts: int) -> Job:
    return Job(Claim(uuid.uuid4().hex, "id", attempts=attempts), None)


def test_requeued_jobs_run_alone(tmp_path):
    s = supervisor(tmp_path, max_batch="4")
    spec = WorkerSpec(0, "cpu", "m", None, None, "", 4, None)
    s.slots = [Slot(spec, state="RUNNING", process=object()), Slot(spec, state="RUNNING", process=object())]
    s.slots[0].jobs = {"a": job(0)}
    assert s.pick_slot(alone=False) is s.slots[1]  # least busy
    assert s.pick_slot(alone=True) is s.slots[1]  # the idle one
    s.slots[1].jobs = {"b": job(1)}  # a suspect runs there now
    assert s.slots[1].isolating
    assert s.pick_slot(alone=False) is s.slots[0]  # nothing joins the suspect
    assert s.pick_slot(alone=True) is None  # no idle worker for another suspect
    s.slots[0].jobs = {str(i): job(0) for i in range(4)}
    assert s.pick_slot(alone=False) is None  # full
    s.slots[1].state = "BACKOFF"
    s.slots[1].jobs = {}
    assert s.pick_slot(alone=True) is None  # only running workers take work


def one_worker_pool(tmp_path, requests: int, tasks: list) -> Supervisor:
    """A supervisor with `requests` JSON requests waiting and one running worker (max_batch 4) whose
    task queue is `tasks`; no processes."""
    from glmpool import spool
    from glmpool.watch import DirWatch
    s = supervisor(tmp_path, max_batch="4")
    s.claims.ensure_dirs()
    s.flags.mkdir(exist_ok=True)
    s.watch = DirWatch(s.requests, s.flags, suffixes=spool.INPUT_SUFFIXES)
    for n in range(requests):
        spool.atomic_write(s.requests / f"r{n}.json", '{"query": "q"}\n')
    spec = WorkerSpec(0, "cpu", "m", None, None, "", 4, None)
    s.slots = [Slot(spec, state="RUNNING", process=object(), tasks=type("Q", (), {"put": tasks.append})())]
    return s


def test_dispatch_claims_a_round_together_and_answers_are_published_together(tmp_path, monkeypatch):
    """One group of fsyncs per dispatch round (the claim records) and per worker read (.meta + .back)."""
    from glmpool import spool
    groups = []
    sync_all = spool.sync_all
    monkeypatch.setattr(spool, "sync_all", lambda files: (groups.append(len(files)), sync_all(files)))
    tasks = []
    s = one_worker_pool(tmp_path, requests=6, tasks=tasks)
    s.dispatch()
    assert groups == [4] and len(tasks) == 4  # room for 4: four claimed, in one group
    for key in list(s.slots[0].jobs):
        s.on_message(("done", 0, key, f"answer {s.slots[0].jobs[key].request.id}", {"finish_reason": "stop"}))
    s.publish_answers()
    assert groups == [4, 8] and sorted(p.name for p in s.requests.glob("*.back")) == [f"r{n}.back" for n in range(4)]
    assert (s.requests / "r2.back").read_text() == "answer r2" and s.served == 4
    s.watch.close()


class Queue(list):
    """A worker's task queue, as the supervisor uses it."""
    put = list.append

    def close(self):
        pass

    def cancel_join_thread(self):
        pass


class DeadProcess:
    exitcode = -9  # SIGKILL

    def is_alive(self):
        return False

    def join(self, timeout=None):
        pass


def test_a_dead_workers_requests_stay_claimed_and_run_again_one_at_a_time(tmp_path):
    """The unit behind tests/system/test_pool.py's SIGKILL cases: a worker's death puts its requests back in the
    queue, still claimed (no other supervisor may take them), each to run again alone on the next worker;
    nothing new is claimed meanwhile."""
    s = one_worker_pool(tmp_path, requests=4, tasks=[])
    s.slots[0].tasks = Queue()
    s.dispatch()
    assert len(s.slots[0].tasks) == 4
    s.slots[0].process = DeadProcess()
    s.reap()
    assert s.slots[0].state == "BACKOFF" and not s.slots[0].jobs
    assert sorted(job.request.id for job in s.pending) == ["r0", "r1", "r2", "r3"]
    assert all(job.claim.attempts == 1 and s.claims.holds(job.claim) for job in s.pending)
    s.slots[0].state, s.slots[0].process, s.slots[0].tasks = "RUNNING", object(), Queue()  # restarted
    (s.requests / "new.json").write_text('{"query": "q"}\n')
    s.dispatch()
    assert len(s.slots[0].tasks) == 1 and s.slots[0].isolating  # one, alone
    assert len(s.pending) == 3 and (s.requests / "new.json").exists()  # nothing new claimed before them
    s.watch.close()


def test_an_answer_the_spool_refuses_is_kept_and_published_alone_later(tmp_path, monkeypatch):
    """Of three answers read together, the one whose files the disk refuses is retried alone with backoff;
    the others are published at once, and nothing is run again."""
    import errno
    import time

    from glmpool import spool
    from glmpool.supervisor import PUBLISH_RETRY_CAP, PUBLISH_RETRY_FIRST
    s = one_worker_pool(tmp_path, requests=3, tasks=[])
    s.dispatch()
    stage, full = spool.stage, [True]

    def refusing(path, data):
        if full[0] and path.name == "r1.back":
            raise OSError(errno.ENOSPC, "No space left on device")
        return stage(path, data)
    monkeypatch.setattr(spool, "stage", refusing)
    for key in list(s.slots[0].jobs):
        s.on_message(("done", 0, key, f"answer {s.slots[0].jobs[key].request.id}", {"finish_reason": "stop"}))
    s.publish_answers()
    assert sorted(p.name for p in s.requests.glob("*.back")) == ["r0.back", "r2.back"] and s.served == 2
    assert len(s.unpublished) == 1 and s.claims.holds(s.unpublished[0][2])  # still claimed, kept for later
    s.retry_publish()  # not due yet
    assert len(s.unpublished) == 1
    s.unpublished[0][0] = time.monotonic()  # due now, but the disk is still full: backoff doubles
    s.retry_publish()
    assert len(s.unpublished) == 1 and s.unpublished[0][1] == min(PUBLISH_RETRY_CAP, 4 * PUBLISH_RETRY_FIRST)
    full[0] = False
    s.unpublished[0][0] = time.monotonic()
    s.retry_publish()
    assert not s.unpublished and (s.requests / "r1.back").read_text() == "answer r1" and s.served == 3
    assert not list(s.requests.glob(".*.tmp"))
    s.watch.close()


def test_cancels_are_looked_for_on_a_change_and_every_poll_interval(tmp_path):
    """A .cancel is passed on at once when the spool's watch saw a change; one the watch cannot see (written
    on another NFS host) within poll_interval. In between, dispatch rounds do not stat every request."""
    import time

    tasks = []
    s = one_worker_pool(tmp_path, requests=2, tasks=tasks)  # its watch ignores .cancel names, like a remote write
    s.dispatch()
    assert [t[0] for t in tasks] == ["run", "run"]
    (s.requests / "r0.cancel").touch()
    s.dispatch()
    assert [t[0] for t in tasks] == ["run", "run"]  # not looked for: no change seen, poll_interval not over
    s.timers["cancels"] = time.monotonic()
    s.dispatch()
    assert tasks[2:] == [("cancel", next(k for k, j in s.slots[0].jobs.items() if j.request.id == "r0"))]
    (s.requests / "r1.cancel").touch()
    s.cancels_due = True  # what manage() sets when the watch reports a change
    s.dispatch()
    assert len(tasks) == 4 and tasks[3][0] == "cancel"
    s.watch.close()


@pytest.mark.parametrize("first", ["hostA", "hostB"])
def test_both_forms_of_one_id_are_decided_the_same_on_every_host(tmp_path, first):
    """x.request (with x.history) and x.json waiting at once, seen by two supervisors' scans: whichever
    claims first, the seed form is the one answered and the .json fails once, with its input in failed/."""
    from glmpool import spool
    hosts = {}
    for host in ("hostA", "hostB"):
        s = one_worker_pool(tmp_path, requests=0, tasks=[])
        s.config = dataclasses.replace(s.config, host_id=host)
        s.claims.host = host
        hosts[host] = s
    spool.atomic_write(hosts["hostA"].requests / "x.history", '[["earlier", "turn"]]\n')
    spool.atomic_write(hosts["hostA"].requests / "x.request", "the seed question\n")
    spool.atomic_write(hosts["hostA"].requests / "x.json", '{"query": "the json question"}\n')
    scans = {host: s.scan() for host, s in hosts.items()}
    second = "hostB" if first == "hostA" else "hostA"
    jobs = hosts[first].take(scans[first]) + hosts[second].take(scans[second])
    assert [(j.request.query, j.request.history, j.claim.main) for j in jobs] == \
        [("the seed question", [["earlier", "turn"]], ".request")]
    requests = hosts[first].requests
    error = (requests / "x.error").read_text()
    assert error.startswith("x.json was not answered: x.request was waiting under the same id")
    assert json.loads(error.split("\n", 1)[1])["host"] == first
    assert sorted(p.name for p in (requests / "failed").iterdir()) == ["x.json"]
    assert not [p for p in requests.iterdir() if p.name.startswith("x.") and p.name != "x.error"]
    for s in hosts.values():
        s.watch.close()
