"""The file protocol's pure parts and its small read/write helpers (no processes)."""
import json
import os
import time

import pytest

from glmpool import spool


@pytest.mark.parametrize("suffix, data, age, complete", [
    (".request", b"question\n", 0.0, True),  # what echo writes
    (".request", b"question", 0.0, False),  # may still be being written
    (".request", b"question", spool.SETTLE_SECONDS + 0.1, True),  # unchanged long enough
    (".json", b'{"query": "q"}', 0.0, True),  # a whole JSON object parses
    (".json", b'{"query": "q", "history": [["a", "b"]]', 0.0, False),  # a cut one never does
    (".json", b'{"query": "q", "history": []', spool.SETTLE_SECONDS + 0.1, True),  # then it is an error
])
def test_completeness_rule(suffix, data, age, complete):
    assert spool.looks_complete(suffix, data, age) is complete


def test_read_input_refuses_what_is_not_a_complete_regular_file(tmp_path):
    now = time.time()
    (tmp_path / "ok.request").write_bytes("橘子\n".encode())
    assert spool.read_input(tmp_path / "ok.request", now) == "橘子\n"
    (tmp_path / "half.request").write_bytes(b"no newline yet")
    with pytest.raises(spool.NotReady):
        spool.read_input(tmp_path / "half.request", now)
    os.symlink(tmp_path / "ok.request", tmp_path / "link.request")
    os.mkfifo(tmp_path / "fifo.request")
    (tmp_path / "big.request").write_bytes(b"x" * (spool.MAX_INPUT_BYTES + 1))
    (tmp_path / "bad.request").write_bytes(b"\xc3\x28\n")
    for name, message in [("link", "symlink"), ("fifo", "not a regular file"), ("big", "limit"),
                          ("bad", "not valid UTF-8")]:
        with pytest.raises(spool.RequestError, match=message) as error:
            spool.read_input(tmp_path / f"{name}.request", now, name=f"{name}.request")
        assert str(error.value).startswith(f"{name}.request ")
    with pytest.raises(FileNotFoundError):  # taken by someone else meanwhile: not an error of the request
        spool.read_input(tmp_path / "gone.request", now)


def test_seed_form_history_rules(tmp_path):
    request, history = tmp_path / "1.request", tmp_path / "1.history"
    request.write_text("q\n")
    now = time.time()
    assert spool.read_request("1", request, history, now) is None  # the client may still write .history
    assert spool.read_request("1", request, history, now + spool.HISTORY_GRACE_SECONDS).history == []
    history.write_text(" \n")
    got = spool.read_request("1", request, history, now)
    assert (got.query, got.history) == ("q", [])
    history.write_text('[["q0", "a0"]]\n')
    assert spool.read_request("1", request, history, now).history == [["q0", "a0"]]
    for bad in ('[["q0"]]', '{"q": "a"}', '[[1, "a"]]', "[[", "[" * 100000):
        history.write_text(bad + "\n")
        with pytest.raises(spool.RequestError):
            spool.read_request("1", request, history, now)


@pytest.mark.parametrize("body, message", [
    ([], "one JSON object"),
    ({"history": []}, "query"),
    ({"query": "q", "extra": 1}, "unknown keys: extra"),
    ({"query": "q", "max_length": True}, "max_length"),  # bool is not an int here
    ({"query": "q", "max_length": 1.5}, "max_length"),
    ({"query": "q", "do_sample": 1}, "do_sample"),
    ({"query": "q", "top_p": "0.7"}, "top_p"),
    ({"query": "q", "timeout": -1}, "timeout"),
    ({"query": "q", "history": [["a"]]}, "history"),
])
def test_json_form_errors(body, message):
    with pytest.raises(spool.RequestError, match=message):
        spool.parse_json_request("x", json.dumps(body))


def test_json_form_parameters():
    request = spool.parse_json_request("x", json.dumps({
        "query": "q", "history": [["a", "b"]], "max_new_tokens": 8, "top_p": 1, "do_sample": False, "seed": 3,
        "priority": 5, "timeout": 2.5}))
    assert (request.query, request.history, request.priority, request.timeout) == ("q", [["a", "b"]], 5, 2.5)
    assert request.params == {"max_new_tokens": 8, "top_p": 1, "do_sample": False, "seed": 3}


def test_atomic_write_exclusive_never_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "1.back"
    assert spool.atomic_write(target, "first", exclusive=True)
    assert not spool.atomic_write(target, "second", exclusive=True)
    assert spool.atomic_write(tmp_path / "2.back", "x")
    assert target.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["1.back", "2.back"]


def test_error_text_is_a_sentence_then_json():
    first, rest = spool.error_text("it broke.", {"a": 1}).split("\n", 1)
    assert first == "it broke." and json.loads(rest) == {"a": 1}


def test_names():
    assert spool.split_name("1.request") == ("1", ".request")
    assert spool.split_name("a.b.json") == ("a.b", ".json")
    assert spool.split_name(".1.back.x.tmp") is None and spool.split_name("noext") is None


def test_touch_never_writes_through_a_symlink(tmp_path):
    real, elsewhere = tmp_path / "real", tmp_path / "elsewhere"
    real.mkdir()
    elsewhere.mkdir()
    assert abs(spool.touch(real, ".probe") - (real / ".probe").stat().st_mtime) < 1e-6
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(OSError):  # the directory itself is a symlink
        spool.touch(tmp_path / "link", ".probe")
    (real / ".other").symlink_to(elsewhere / "target")
    with pytest.raises(OSError):  # the name is a symlink
        spool.touch(real, ".other")
    assert list(elsewhere.iterdir()) == []


def test_sync_all_syncs_every_staged_file_and_place_publishes_it(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    files = [spool.stage(tmp_path / f"{n}.back", f"answer {n}") for n in range(20)]
    assert not list(tmp_path.glob("*.back"))  # staged: under temp names only
    spool.sync_all(files)
    assert sorted(synced) == sorted(f.temp for f in files)
    assert [f.place(exclusive=True) for f in files] == [True] * 20
    assert (tmp_path / "7.back").read_text() == "answer 7" and not list(tmp_path.glob(".*.tmp"))
    again = spool.stage(tmp_path / "7.back", "a duplicate")
    assert not again.place(exclusive=True) and (tmp_path / "7.back").read_text() == "answer 7"
    assert not list(tmp_path.glob(".*.tmp"))


def test_duplicate_json_keys_are_an_error():
    with pytest.raises(spool.RequestError, match='x.json has the key "max_new_tokens" twice'):
        spool.parse_json_request("x", '{"query": "q", "max_new_tokens": -1, "max_new_tokens": 3}')
    with pytest.raises(spool.RequestError, match='has the key "a" twice'):  # at any depth
        spool.parse_json_request("x", '{"query": "q", "history": [{"a": 1, "a": 2}]}')
    with pytest.raises(spool.RequestError, match="twice"):
        spool.parse_history('{"q": 1, "q": 2}', "x.history")


def test_an_empty_request_is_an_error_and_whitespace_is_a_question(tmp_path):
    now = time.time() + spool.HISTORY_GRACE_SECONDS + spool.SETTLE_SECONDS
    (tmp_path / "e.request").write_bytes(b"")
    with pytest.raises(spool.NotReady):  # 0 bytes may be a write about to happen
        spool.read_request("e", tmp_path / "e.request", None, time.time())
    with pytest.raises(spool.RequestError, match=r"e.request is empty \(0 bytes\)"):
        spool.read_request("e", tmp_path / "e.request", None, now)
    (tmp_path / "j.json").write_bytes(b"")
    with pytest.raises(spool.RequestError, match=r"j.json is empty"):
        spool.read_request("j", tmp_path / "j.json", None, now)
    (tmp_path / "w.request").write_bytes(b" \n")
    assert spool.read_request("w", tmp_path / "w.request", None, now).query == " "


def test_what_counts_as_a_flag(tmp_path):
    assert not spool.flag_set(tmp_path / "none.flag")
    (tmp_path / "file.flag").touch()
    (tmp_path / "empty.flag").mkdir()
    assert spool.flag_set(tmp_path / "file.flag") and spool.flag_set(tmp_path / "empty.flag")
    (tmp_path / "full.flag").mkdir()
    (tmp_path / "full.flag" / "x").touch()
    os.symlink(tmp_path / "file.flag", tmp_path / "link.flag")
    os.symlink(tmp_path / "nothing", tmp_path / "dangling.flag")
    os.mkfifo(tmp_path / "fifo.flag")
    for name, what in [("full", "a directory that is not empty"), ("link", "a symlink"),
                       ("dangling", "a symlink"), ("fifo", "a fifo")]:
        with pytest.raises(spool.NotAFlag, match=f"{name}.flag is {what}"):
            spool.flag_set(tmp_path / f"{name}.flag")
