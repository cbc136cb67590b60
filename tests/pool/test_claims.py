"""Claims on a real directory: exclusive between supervisors, answers published once, nothing lost."""
import json
import multiprocessing
import os
import time

from glmpool import claims as claims_module, spool
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


def age(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def test_one_request_of_an_id_is_claimed_at_a_time_on_every_host(tmp_path):
    c, other = new_claims(tmp_path), new_claims(tmp_path, "hostB")
    write_request(c.requests, "1", "first")
    first = c.claim("1", ".request", (".history",))
    assert os.path.samestat(os.lstat(c.dir / "1.owner"), os.lstat(c.record_path(first.token)))
    write_request(c.requests, "1", "second")  # reused before the first has its outcome
    (c.requests / "2.json").write_text('{"query": "q"}')
    assert c.claim("1", ".request", (".history",)) is None and other.claim("1", ".request") is None
    assert other.claim("2", ".json") is not None  # other ids are not held up
    assert c.finish(first, "first answer", {"claim": first.origin})
    assert not (c.dir / "1.owner").exists()
    second = other.claim("1", ".request", (".history",))
    assert second is not None and second.inputs[".request"].read_text() == "second\n"
    assert not (c.requests / "1.back").exists()  # the first answer was the first request's


def test_the_owner_link_follows_an_adopted_claim_and_goes_with_it(tmp_path):
    dead = new_claims(tmp_path)
    write_request(dead.requests, "1")
    claim = dead.claim("1", ".request", (".history",))
    record = dead.record_path(claim.token)
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": 2 ** 22 + 12345}))
    successor = new_claims(tmp_path)
    [adopted] = successor.orphans()
    assert adopted.origin == claim.token != adopted.token
    assert os.path.samestat(os.lstat(successor.dir / "1.owner"), os.lstat(successor.record_path(adopted.token)))
    write_request(successor.requests, "1", "next")
    assert successor.claim("1", ".request") is None  # still in flight, under its new claim
    successor.fail(adopted, "it broke", {"reason": "test"})
    assert json.loads((successor.requests / "1.error").read_text().split("\n", 1)[1])["claim"] == claim.token
    assert successor.claim("1", ".request") is not None


def test_an_owner_link_that_no_claim_names_is_cleared_after_the_lease(tmp_path):
    c = new_claims(tmp_path, lease=30)
    write_request(c.requests, "1")
    claim = c.claim("1", ".request", (".history",))
    for path in claim.inputs.values():  # damage: the claim's files deleted by hand, its owner link left
        path.unlink()
    c.record_path(claim.token).unlink()
    c.mine.clear()
    write_request(c.requests, "1", "next")
    assert c.orphans() == [] and (c.dir / "1.owner").exists()  # young: it might be a claim being made
    assert c.claim("1", ".request") is None
    age(c.dir / "1.owner", 31)
    c.orphans()
    assert not (c.dir / "1.owner").exists() and c.claim("1", ".request") is not None


def test_an_outcome_of_another_request_under_the_id_is_not_this_ones(tmp_path):
    c = new_claims(tmp_path)
    write_request(c.requests, "1")
    (c.requests / "1.json").write_text('{"query": "q"}')
    claim = c.claim("1", ".request", (".history",))
    c.reject("1", ".json", "refused", {"reason": "id conflict"})
    assert c.finish(claim, "answer", {"claim": claim.origin})  # the .json's .error is not an earlier outcome
    assert (c.requests / "1.back").read_text() == "answer" and (c.requests / "failed" / "1.json").exists()


def test_a_cancel_applies_only_to_requests_written_before_it(tmp_path):
    c = new_claims(tmp_path)
    request, cancel = c.requests / "1.request", c.requests / "1.cancel"
    request.write_text("q\n")
    cancel.touch()
    age(request, 10)
    arrived = request.stat().st_mtime
    assert c.cancel_applies("1", arrived)
    age(cancel, 20)  # left from before the request was written
    assert not c.cancel_applies("1", arrived) and not c.cancel_applies("2", arrived)
    c.clear_cancel("1")  # the waiting request is newer: the .cancel applies to nothing waiting
    assert not cancel.exists()
    cancel.touch()
    c.clear_cancel("1")  # the waiting request is older: it stays for that one
    assert cancel.exists()


def test_a_history_that_comes_after_its_request_was_claimed_joins_it_into_failed(tmp_path):
    c = new_claims(tmp_path)
    (c.requests / "1.request").write_text("q\n")
    claim = c.claim("1", ".request", (".history",))
    assert not c.take_late_history(claim)
    (c.requests / "1.history").write_text('[["a", "b"]]\n')
    (c.requests / "1.request").write_text("the next question\n")
    assert not c.take_late_history(claim)  # a new request beside it: the history is that one's
    (c.requests / "1.request").unlink()
    assert c.take_late_history(claim)
    c.fail(claim, "late", {"reason": "late history"})
    assert (c.requests / "failed" / "1.history").read_text() == '[["a", "b"]]\n'
    assert (c.requests / "failed" / "1.request").exists() and not (c.requests / "1.history").exists()


def test_stray_cancels_and_histories_are_cleared_once_old(tmp_path):
    c = new_claims(tmp_path)
    r = c.requests
    for name in ("old.cancel", "old.history", "fresh.cancel", "fresh.history", "held.cancel", "waits.cancel",
                 "waits.json", "seed.history", "seed.request", "other.history", "other.json"):
        (r / name).write_text("x\n")
    for name in ("old.cancel", "old.history", "held.cancel", "waits.cancel", "seed.history", "other.history"):
        age(r / name, spool.STRAY_SECONDS + 5)
    age(r / "waits.json", spool.STRAY_SECONDS + 10)  # older than its .cancel: the cancel applies to it
    (c.dir / "held.owner").write_text("{}")  # the id is in flight: its outcome settles its .cancel
    (c.requests / "failed" / "old.history").write_text("an earlier failure's\n")
    c.orphans()
    left = sorted(p.name for p in r.iterdir() if p.is_file())
    assert left == ["fresh.cancel", "fresh.history", "held.cancel", "other.json", "seed.history", "seed.request",
                    "waits.cancel", "waits.json"]
    failed = sorted(p.name for p in (r / "failed").iterdir())
    assert failed[0] == "old.history" and failed[1].startswith("old.history.") and failed[2] == "other.history"
    assert (r / "failed" / "old.history").read_text() == "an earlier failure's\n"


def test_a_claimer_killed_before_taking_the_input_leaves_no_owner_behind(tmp_path):
    dead = new_claims(tmp_path)
    write_request(dead.requests, "1")
    claim = dead.claim("1", ".request")
    os.rename(claim.inputs[".request"], dead.requests / "1.request")  # as if killed before the rename
    record = dead.record_path(claim.token)
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": 2 ** 22 + 12345}))
    successor = new_claims(tmp_path)
    assert successor.orphans() == [] and leftovers(successor.requests) == []
    assert successor.claim("1", ".request", (".history",)) is not None
