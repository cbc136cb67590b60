"""Claims on a real directory: exclusive between supervisors, answers published once, nothing lost."""
import json
import multiprocessing
import os
import time

from glmpool import claims as claims_module
from glmpool.claims import Claims


def new_claims(tmp_path, host="hostA", lease=60.0) -> Claims:
    c = Claims(tmp_path / "requests", host, lease)
    c.ensure_dirs()
    return c


def write_request(requests, rid, question="q", history=""):
    (requests / f"{rid}.history").write_text(history + "\n")
    (requests / f"{rid}.request").write_text(question + "\n")


def leftovers(requests):
    return sorted(p.name for p in (requests / ".claims").iterdir() if not p.name.startswith("."))


def test_claim_moves_inputs_and_clears_old_outputs(tmp_path):
    c = new_claims(tmp_path)
    requests = c.requests
    (requests / "1.back").write_text("stale answer of an earlier request under this id")
    write_request(requests, "1")
    claim = c.claim("1", ".request", (".history",))
    assert claim is not None and set(claim.inputs) == {".request", ".history"}
    assert not (requests / "1.request").exists() and not (requests / "1.back").exists()
    record = json.loads(c.record_path(claim.token).read_text())
    assert (record["id"], record["host"], record["pid"]) == ("1", "hostA", os.getpid())
    assert c.claim("1", ".request") is None  # nothing left to take


def test_finish_publishes_once_and_cleans_up(tmp_path):
    c = new_claims(tmp_path)
    write_request(c.requests, "1")
    claim = c.claim("1", ".request", (".history",))
    assert c.finish(claim, "answer", {"claim": claim.token})
    assert (c.requests / "1.back").read_text() == "answer"
    assert json.loads((c.requests / "1.meta").read_text()) == {"claim": claim.token}
    assert leftovers(c.requests) == [] and not (c.requests / "1.request").exists()
    assert not c.finish(claim, "again", {})  # no longer held: a late duplicate is dropped
    assert (c.requests / "1.back").read_text() == "answer"


def test_fail_keeps_inputs_in_failed(tmp_path):
    c = new_claims(tmp_path)
    write_request(c.requests, "1", "bad")
    claim = c.claim("1", ".request", (".history",))
    c.fail(claim, "it is bad", {"reason": "test"})
    assert (c.requests / "1.error").read_text().startswith("it is bad.\n")
    assert (c.requests / "failed" / "1.request").read_text() == "bad\n"
    assert (c.requests / "failed" / "1.history").exists() and leftovers(c.requests) == []


def test_release_puts_the_request_back_but_never_over_a_new_one(tmp_path):
    c = new_claims(tmp_path)
    write_request(c.requests, "1", "old")
    claim = c.claim("1", ".request", (".history",))
    c.release(claim)
    assert (c.requests / "1.request").read_text() == "old\n" and leftovers(c.requests) == []
    claim = c.claim("1", ".request", (".history",))
    write_request(c.requests, "1", "new")  # the client reused the id meanwhile
    c.release(claim)
    assert (c.requests / "1.request").read_text() == "new\n"
    assert any(name.endswith(".request") for name in leftovers(c.requests))  # the old one is kept, not lost


def test_orphans_of_a_dead_supervisor_on_this_host_are_adopted_with_their_attempts(tmp_path):
    dead = new_claims(tmp_path)
    write_request(dead.requests, "1")
    claim = dead.claim("1", ".request", (".history",))
    claim.attempts = 2
    dead.update(claim)
    record = dead.record_path(claim.token)
    info = json.loads(record.read_text())
    record.write_text(json.dumps({**info, "pid": 2 ** 22 + 12345}))  # a pid that is not running
    successor = new_claims(tmp_path)
    adopted = successor.orphans()
    assert [(a.id, a.attempts, sorted(a.inputs)) for a in adopted] == [("1", 2, [".history", ".request"])]
    assert not record.exists() and successor.holds(adopted[0])
    assert successor.orphans() == []  # already ours


def test_live_claims_are_left_alone_until_their_lease_expires(tmp_path):
    owner = new_claims(tmp_path, "hostA", lease=30)
    write_request(owner.requests, "1")
    claim = owner.claim("1", ".request", (".history",))
    other = new_claims(tmp_path, "hostB", lease=30)
    assert other.orphans() == []  # fresh lease
    old = time.time() - 31
    os.utime(owner.record_path(claim.token), (old, old))  # the owner stopped renewing
    adopted = other.orphans()
    assert [a.id for a in adopted] == ["1"]
    assert not owner.holds(claim) and not owner.finish(claim, "late", {})  # the old owner's answer is dropped
    assert not (owner.requests / "1.back").exists()


def test_lock_files_stay_few(tmp_path):
    c = new_claims(tmp_path)
    for i in range(300):
        (c.requests / f"id{i}.request").write_text("q\n")
        c.drop(c.claim(f"id{i}", ".request"))
    assert len(list(c.locks.iterdir())) <= claims_module.LOCK_STRIPES


def _race(root, host, ids, results):
    c = Claims(root, host)
    won = []
    for rid in ids:
        claim = c.claim(rid, ".request", (".history",))
        if claim is not None:
            won.append(rid)
    results.put((host, won))


def test_racing_processes_claim_each_request_exactly_once(tmp_path):
    c = new_claims(tmp_path)
    ids = [f"r{i}" for i in range(150)]
    for rid in ids:
        write_request(c.requests, rid)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    racers = [context.Process(target=_race, args=(c.requests, f"host{n}", ids[n % 2::1] if n % 2 else ids[::-1],
                                                  results)) for n in range(4)]
    for p in racers:
        p.start()
    won = [results.get(timeout=60) for _ in racers]
    for p in racers:
        p.join(10)
    taken = [rid for _, rids in won for rid in rids]
    assert sorted(taken) == sorted(ids)  # every request once, none twice
    assert sum(1 for _, rids in won if rids) >= 2  # a real race, not one process taking everything


def test_an_orphan_record_without_inputs_is_cleaned_up(tmp_path):
    c = new_claims(tmp_path)
    # a supervisor that died between writing its record and renaming the input: the request is unclaimed
    (c.dir / "deadbeef.claim").write_text(json.dumps({"id": "1", "host": "hostA", "pid": 2 ** 22 + 12345}))
    write_request(c.requests, "1")
    assert c.orphans() == [] and leftovers(c.requests) == []
    assert c.claim("1", ".request") is not None


def test_temp_files_of_killed_writers_are_swept_after_the_lease(tmp_path):
    # found by bench/faults.py: a supervisor SIGKILLed inside spool.atomic_write leaves `.<name>.<rand>.tmp`
    c = new_claims(tmp_path, lease=30)
    flags = tmp_path / "flags" / ".hosts"
    flags.mkdir(parents=True)
    stale = [c.requests / ".1.meta.abc123.tmp", c.dir / ".0123abcd.claim.x1.tmp", flags / ".h0.1.json.q.tmp"]
    fresh = c.requests / ".2.back.def456.tmp"  # a live writer's, about to be renamed
    for path in stale + [fresh]:
        path.write_text("partial")
    old = time.time() - 31
    for path in stale:
        os.utime(path, (old, old))
    (flags / "h0.4242.json").write_text("{}")  # the heartbeat of a supervisor killed long ago
    os.utime(flags / "h0.4242.json", (old, old))
    (flags / "h1.4343.json").write_text("{}")  # a live one's
    stale.append(flags / "h0.4242.json")
    (c.requests / "keep.tmp").write_text("not ours: no leading dot")
    os.utime(c.requests / "keep.tmp", (old, old))
    assert c.orphans() == []
    assert not any(p.exists() for p in stale) and fresh.exists() and (c.requests / "keep.tmp").exists()
    assert (flags / "h1.4343.json").exists()


def _published_then_killed(tmp_path):
    """A supervisor published .meta and .back, then was killed before dropping its claim: its successor
    adopts the claim and runs the request again."""
    dead = new_claims(tmp_path)
    write_request(dead.requests, "1")
    claim = dead.claim("1", ".request", (".history",))
    first = {"id": "1", "claim": claim.token, "history": [["q", "first answer"]]}
    from glmpool import spool
    spool.atomic_write(dead.requests / "1.meta", json.dumps(first))
    spool.atomic_write(dead.requests / "1.back", "first answer", exclusive=True)
    record = dead.record_path(claim.token)
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": 2 ** 22 + 12345}))
    successor = new_claims(tmp_path)
    [adopted] = successor.orphans()
    return successor, adopted, first


def test_a_rerun_of_an_answered_claim_changes_neither_back_nor_meta(tmp_path):
    # found by reasoning about bench/faults.py's kills: .meta used to be rewritten before .back was refused
    successor, adopted, first = _published_then_killed(tmp_path)
    assert not successor.finish(adopted, "second answer", {"id": "1", "history": [["q", "second answer"]]})
    assert (successor.requests / "1.back").read_text() == "first answer"
    assert json.loads((successor.requests / "1.meta").read_text()) == first
    assert leftovers(successor.requests) == []


def test_a_rerun_of_an_answered_claim_never_adds_an_error(tmp_path):
    successor, adopted, _ = _published_then_killed(tmp_path)
    successor.fail(adopted, "the request timed out", {"reason": "timeout"})
    assert not (successor.requests / "1.error").exists()
    assert (successor.requests / "1.back").read_text() == "first answer"
    assert leftovers(successor.requests) == []


def test_an_adopter_takes_the_history_its_dead_claimer_had_not_moved_yet(tmp_path):
    # found by bench/faults.py: a supervisor SIGKILLed between renaming x.request and x.history into its
    # claim left x.history in requests/; the adopter answered without that history, and the stray file
    # would have become the history of the next request reusing the id
    dead = new_claims(tmp_path)
    write_request(dead.requests, "1", history='[["earlier", "turn"]]')
    claim = dead.claim("1", ".request")  # the main input only: killed before the extras
    record = dead.record_path(claim.token)
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": 2 ** 22 + 12345}))
    [adopted] = new_claims(tmp_path).orphans()
    assert sorted(adopted.inputs) == [".history", ".request"]
    assert adopted.inputs[".history"].read_text() == '[["earlier", "turn"]]\n'
    assert not (dead.requests / "1.history").exists()


def test_an_error_published_by_a_killed_owner_is_its_outcome(tmp_path):
    # fail() used to move the inputs into failed/ before writing .error: an owner killed in between left
    # a claim record without inputs, cleaned up as an orphan, and the request had no outcome at all
    dead = new_claims(tmp_path)
    write_request(dead.requests, "1", "bad")
    claim = dead.claim("1", ".request", (".history",))
    from glmpool import spool
    spool.atomic_write(dead.requests / "1.error", spool.error_text("it is bad", {"reason": "test", "claim": claim.token}))
    record = dead.record_path(claim.token)
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": 2 ** 22 + 12345}))
    successor = new_claims(tmp_path)
    [adopted] = successor.orphans()
    assert not successor.finish(adopted, "a rerun's answer", {})
    assert not (successor.requests / "1.back").exists()
    assert (successor.requests / "1.error").read_text().startswith("it is bad.\n")
    assert (successor.requests / "failed" / "1.request").read_text() == "bad\n"
    assert leftovers(successor.requests) == []


def test_claim_many_takes_each_request_once_even_two_of_one_lock_stripe(tmp_path):
    import zlib
    c, other = new_claims(tmp_path), new_claims(tmp_path, "hostB")
    stripe = [zlib.crc32(str(n).encode()) % claims_module.LOCK_STRIPES for n in range(10000)]
    twin = next(n for n in range(1, 10000) if stripe[n] == stripe[0])  # shares request 0's lock file
    ids = ["0", str(twin), "x", "gone"]
    for rid in ids[:3]:
        write_request(c.requests, rid)
    claimed = c.claim_many([(rid, ".request", (".history",)) for rid in ids])
    assert [cl.id if cl else None for cl in claimed] == ["0", str(twin), "x", None]
    assert all(set(cl.inputs) == {".request", ".history"} for cl in claimed[:3])
    assert all(json.loads(c.record_path(cl.token).read_text())["id"] == cl.id for cl in claimed[:3])
    assert other.claim_many([(rid, ".request", ()) for rid in ids]) == [None] * 4
    assert not list(c.requests.glob(".*.tmp")) and not list((c.requests / ".claims").glob(".*.tmp"))


def test_finish_many_publishes_the_others_when_one_cannot_be_written(tmp_path, monkeypatch):
    c = new_claims(tmp_path)
    for rid in "abc":
        write_request(c.requests, rid)
    claimed = [c.claim(rid, ".request", (".history",)) for rid in "abc"]
    stage = claims_module.spool.stage

    def full_for_b(path, data):
        if path.name == "b.back":
            raise OSError(28, "No space left on device")
        return stage(path, data)
    monkeypatch.setattr(claims_module.spool, "stage", full_for_b)
    outcomes = c.finish_many([(cl, f"answer {cl.id}", {"id": cl.id}) for cl in claimed])
    assert outcomes[0] is True and outcomes[2] is True and isinstance(outcomes[1], OSError)
    assert (c.requests / "a.back").read_text() == "answer a" and (c.requests / "c.back").read_text() == "answer c"
    assert not (c.requests / "b.back").exists() and not (c.requests / "b.meta").exists()
    assert not list(c.requests.glob(".*.tmp")) and c.holds(claimed[1])  # nothing of b was published
    monkeypatch.setattr(claims_module.spool, "stage", stage)
    assert c.finish(claimed[1], "answer b", {"id": "b"})  # the retry
    assert (c.requests / "b.back").read_text() == "answer b" and leftovers(c.requests) == []


def test_a_rename_reported_failed_but_done_is_a_claim(tmp_path, monkeypatch):
    """NFS: a retransmitted rename can report the first one's success as ENOENT (or another error)."""
    import errno
    c = new_claims(tmp_path)
    real_rename = os.rename

    def rename_then_fail(error):
        def rename(source, target):
            real_rename(source, target)
            raise OSError(error, os.strerror(error))
        return rename
    for n, error in enumerate((errno.ENOENT, errno.EIO)):
        write_request(c.requests, f"r{n}")
        monkeypatch.setattr(claims_module.os, "rename", rename_then_fail(error))
        claim = c.claim(f"r{n}", ".request", (".history",))
        assert claim is not None and set(claim.inputs) == {".request", ".history"} and c.holds(claim)

    def fail(source, target):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(claims_module.os, "rename", fail)
    write_request(c.requests, "r2")
    assert c.claim("r2", ".request", (".history",)) is None
    # r0 and r1's record, inputs and owner link only
    assert (c.requests / "r2.request").exists() and len(leftovers(c.requests)) == 2 * 4
    assert not (c.dir / "r2.owner").exists()
