"""The pool end to end: real supervisor and worker processes, real files, real signals, tiny model."""
import json
import os
import signal
import subprocess
import sys

import pytest

from pooltools import Pool, json_request, outcome, seed_request, wait_for

LONG = {"max_new_tokens": 1500, "max_length": 2048, "do_sample": False}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    from glmpool.engine.tiny import cached_tiny_checkpoint
    path = tmp_path_factory.mktemp("cache")
    cached_tiny_checkpoint(path)  # built once, before workers race for it
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("spool")
    p = Pool(root, cache_dir, "--gpus", "cpu,cpu", "--max-length", "96",
             env={"GLMPOOL_TEST_CRASH_ON": "POISON-PILL"}).start()
    try:
        yield p.wait_running()
    finally:
        p.kill()


def test_original_readme_flow(pool):
    root = pool.root
    seed_request(root, "1", "我喜欢吃橘子，你呢？")
    kind, answer = outcome(root, "1")
    assert kind == "back" and answer.strip()
    requests = root / "requests"
    wait_for(lambda: not (requests / "1.request").exists() and not (requests / "1.history").exists(), 5, "inputs gone")
    meta = json.loads((requests / "1.meta").read_text())
    assert meta["history"] == [["我喜欢吃橘子，你呢？", answer]]
    # the original clients reuse ids: a new 1.request is a new request with its own answer
    (requests / "1.back").unlink()
    seed_request(root, "1", "hello", history='[["我喜欢吃橘子，你呢？", "我也喜欢"]]')
    kind, second = outcome(root, "1")
    assert kind == "back"
    assert json.loads((requests / "1.meta").read_text())["history"] == [["我喜欢吃橘子，你呢？", "我也喜欢"],
                                                                        ["hello", second]]


def test_console_lines(pool):
    out = pool.output()
    assert out.index("]: Loaded.") < out.index("]: Running...")
    assert "[Info " in out


def test_status_while_both_workers_busy(pool):
    for i in range(4):
        json_request(pool.root, f"busy{i}", {"query": f"question {i}", **LONG})
    status = wait_for(lambda: (s := pool.status()) and all(w["in_flight"] for w in s["workers"]) and s, 30,
                      "both workers busy")
    assert status["status"] == "running" and status["version"]
    assert len(status["workers"]) == 2
    for worker in status["workers"]:
        assert worker["state"] == "RUNNING" and worker["device"] == "cpu" and worker["rss_bytes"] > 0
        assert worker["gpu_memory_used"] is None and worker["gpu_memory_total"] is None
    assert status["queue"]["in_progress"] >= 2
    assert not (pool.root / "flags" / "status.flag").exists()
    for i in range(4):
        assert outcome(pool.root, f"busy{i}", 120)[0] == "back"


def test_sigkill_worker_mid_generation(pool):
    json_request(pool.root, "victim", {"query": "a long answer please", **LONG})
    wait_for(lambda: (pool.root / "requests" / "victim.partial").exists(), 30, "generation under way")
    status = pool.status()
    busy = [w for w in status["workers"] if w["in_flight"]]
    restarts_before = sum(w["restarts"] for w in status["workers"])
    os.kill(busy[0]["pid"], signal.SIGKILL)
    kind, _ = outcome(pool.root, "victim", 120)
    assert kind == "back"
    meta = json.loads((pool.root / "requests" / "victim.meta").read_text())
    assert meta["attempts"] == 2
    status = wait_for(lambda: (s := pool.status()) and all(w["state"] == "RUNNING" for w in s["workers"]) and s,
                      60, "the worker restarted")
    assert sum(w["restarts"] for w in status["workers"]) == restarts_before + 1


def test_poison_request_fails_after_three_attempts(pool):
    seed_request(pool.root, "poison", "POISON-PILL")
    kind, text = outcome(pool.root, "poison", 180)
    assert kind == "error" and "crashed workers 3 times" in text.splitlines()[0]
    assert (pool.root / "requests" / "failed" / "poison.request").exists()
    seed_request(pool.root, "after", "still serving?")
    assert outcome(pool.root, "after", 60)[0] == "back"


@pytest.mark.parametrize("name, make, message", [
    ("badutf8", lambda r: (r / "badutf8.request").write_bytes(b"\xff\xfe bad\n"), "not valid UTF-8"),
    ("nul", lambda r: (r / "nul.request").write_bytes(b"a\0b\n"), "NUL"),
    ("badhist", lambda r: ((r / "badhist.history").write_text("[[1, 2]]\n"),
                           (r / "badhist.request").write_text("q\n")), "pairs"),
    ("notjson", lambda r: ((r / "notjson.history").write_text("{oops\n"),
                           (r / "notjson.request").write_text("q\n")), "not valid JSON"),
    ("unknown", lambda r: (r / "unknown.json").write_text('{"query": "q", "colour": 1}'), "unknown keys"),
    ("badparam", lambda r: (r / "badparam.json").write_text('{"query": "q", "top_p": -1}'), "top_p"),
    ("nan", lambda r: (r / "nan.json").write_text('{"query": "q", "temperature": NaN}'), "temperature"),
    ("toolong", lambda r: (r / "toolong.request").write_text("橘子" * 3000 + "\n"), "window"),
    ("link", lambda r: os.symlink("/etc/passwd", r / "link.request"), "symlink"),
    ("dir", lambda r: os.mkdir(r / "dir.request"), "not a regular file"),
    ("fifo", lambda r: os.mkfifo(r / "fifo.request"), "not a regular file"),
])
def test_malformed_input_is_an_error(pool, name, make, message):
    requests = pool.root / "requests"
    make(requests)
    kind, text = outcome(pool.root, name, 30)
    assert kind == "error"
    assert message in text.splitlines()[0]
    json.loads(text.split("\n", 1)[1])  # then JSON detail
    assert any(p.name.startswith(name + ".") for p in (requests / "failed").iterdir())


def test_cli_ask_status_quit(tmp_path, cache_dir):
    p = Pool(tmp_path, cache_dir, "--gpus", "cpu", "--max-length", "64").start()
    try:
        p.wait_running()
        cli = [sys.executable, "-c", "import sys; from glmpool.cli import main; sys.exit(main())"]
        asked = subprocess.run(cli + ["ask", "你好", "--dir", str(tmp_path), "--timeout", "60"],
                               capture_output=True, text=True, timeout=90)
        assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
        table = subprocess.run(cli + ["status", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
        assert table.returncode == 0 and "RUNNING" in table.stdout and "served 1" in table.stdout
        as_json = subprocess.run(cli + ["status", "--json", "--dir", str(tmp_path)], capture_output=True, text=True,
                                 timeout=30)
        assert json.loads(as_json.stdout)["workers"][0]["served"] == 1
        failing = subprocess.run(cli + ["ask", "x", "--dir", str(tmp_path), "--param", "top_p=5"],
                                 capture_output=True, text=True, timeout=60)
        assert failing.returncode == 1 and "top_p" in failing.stderr
        subprocess.run(cli + ["quit", "--dir", str(tmp_path)], check=True, timeout=30)
        assert p.wait_exit(60) == 0
        assert not (tmp_path / "flags" / "quit.flag").exists()
    finally:
        p.kill()


def test_unknown_gpu_is_a_clear_error(tmp_path, cache_dir):
    p = Pool(tmp_path, cache_dir, "--gpus", "7", env={"CUDA_VISIBLE_DEVICES": ""}).start()
    try:
        assert p.wait_exit(60) == 2
        assert "GPU 7 does not exist" in p.output() and "Traceback" not in p.output()
    finally:
        p.kill()


@pytest.mark.parametrize("stop", ["quit.flag", "SIGTERM"])
def test_stop_during_generation_loses_nothing(tmp_path, cache_dir, stop):
    p = Pool(tmp_path, cache_dir, "--gpus", "cpu", "--max-batch", "2", "--grace-seconds", "1").start()
    try:
        p.wait_running()
        for i in range(5):
            json_request(tmp_path, f"r{i}", {"query": f"q{i}", **LONG})
        wait_for(lambda: any((tmp_path / "requests").glob("*.partial")), 30, "generation under way")
        if stop == "SIGTERM":
            p.signal(signal.SIGTERM)
        else:
            (tmp_path / "flags" / "quit.flag").touch()
        assert p.wait_exit(60) == 0
    finally:
        p.kill()
    requests = tmp_path / "requests"
    for i in range(5):  # answered, or back in the queue unclaimed: never lost
        assert (requests / f"r{i}.back").exists() or (requests / f"r{i}.json").exists(), i
    assert not list((requests / ".claims").glob("[!.]*")), "claims left behind"
    assert not (tmp_path / "flags" / "quit.flag").exists()


def test_two_supervisors_answer_each_request_once(tmp_path, cache_dir):
    pools = [Pool(tmp_path, cache_dir, "--gpus", "cpu", "--max-length", "80", "--max-batch", "2", name=f"s{i}",
                  env={"GLMPOOL_HOST_ID": f"host{i}"}).start() for i in range(2)]
    try:
        for p in pools:
            p.wait_running()
        requests = tmp_path / "requests"
        for i in range(50):  # a burst, written the way old clients write: not atomically
            (requests / f"m{i}.history").write_text("\n")
            (requests / f"m{i}.request").write_text(f"question number {i}\n")
        answers = [outcome(tmp_path, f"m{i}", 120) for i in range(50)]
        assert all(kind == "back" for kind, _ in answers)
        hosts = {json.loads((tmp_path / "requests" / f"m{i}.meta").read_text())["host"] for i in range(50)}
        assert hosts == {"host0", "host1"}  # both did work
        # peers' figures come from their heartbeat files, at most a beat old
        status = wait_for(lambda: (s := pools[0].status()) and sum(h["served"] for h in s["hosts"]) >= 50 and s,
                          10, "both hosts' counts")
        assert {h["host"] for h in status["hosts"]} == {"host0", "host1"}
        assert sum(h["served"] for h in status["hosts"]) == 50  # exactly once: no duplicate answers
    finally:
        for p in pools:
            p.kill()
    assert not any("already exists" in p.output() for p in pools)
