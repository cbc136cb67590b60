"""The pool end to end: real supervisor and worker processes, real files, real signals, tiny model.

One two-worker pool is shared by the tests that leave it serving; tests that stop or break a pool
start their own. Tests that must catch a generation in the middle use `long_body`: a question that the
tiny model answers (greedily) with exactly LONG_TOKENS tokens, a few seconds of work.
"""
import json
import os
import re
import signal
import sys

import pytest

from pooltools import ENV, Pool, glmpool, json_request, meta, outcome, seed_request, wait_for

CRASH_MARKER = "POISON-PILL"


@pytest.fixture(scope="module")
def pool(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("spool")
    p = Pool(root, cache_dir, "--gpus", "cpu,cpu", "--max-length", "96", "--heartbeat-timeout", "4",
             env={"GLMPOOL_TEST_CRASH_ON": CRASH_MARKER}).start()
    try:
        yield p.wait_running()
    finally:
        p.kill()


def all_running(pool) -> dict:
    """A status in which every worker is RUNNING (after a restart, a worker is STARTING for seconds)."""
    return wait_for(lambda: (s := pool.status()) and all(w["state"] == "RUNNING" for w in s["workers"]) and s,
                    60, "every worker running")


def busy_workers(pool, count: int, in_progress: int = 0) -> dict:
    """A status in which `count` workers have requests in flight, `in_progress` of them at least."""
    return wait_for(lambda: (s := pool.status()) and sum(1 for w in s["workers"] if w["in_flight"]) >= count
                    and s["queue"]["in_progress"] >= in_progress and s, 30, f"{count} busy worker(s)")


def test_original_readme_flow(pool):
    root, requests = pool.root, pool.root / "requests"
    seed_request(root, "1", "我喜欢吃橘子，你呢？")
    kind, answer = outcome(root, "1")
    assert kind == "back" and answer.strip()
    wait_for(lambda: not (requests / "1.request").exists() and not (requests / "1.history").exists(), 5, "inputs gone")
    assert meta(root, "1")["history"] == [["我喜欢吃橘子，你呢？", answer]]
    # the original clients reuse ids: a new 1.request is a new request with its own answer
    (requests / "1.back").unlink()
    seed_request(root, "1", "hello", history='[["我喜欢吃橘子，你呢？", "我也喜欢"]]')
    kind, second = outcome(root, "1")
    assert kind == "back"
    assert meta(root, "1")["history"] == [["我喜欢吃橘子，你呢？", "我也喜欢"], ["hello", second]]


def test_console_lines_and_no_torch_in_the_supervisor(pool):
    out = pool.output()
    assert out.index("]: Loaded.") < out.index("]: Running...")
    assert out.count("]: Loaded.") == 1 and "Traceback" not in out
    maps = lambda pid: open(f"/proc/{pid}/maps").read()  # noqa: E731 - what the process really loaded
    assert "libtorch" not in maps(pool.process.pid)
    assert all("libtorch" in maps(w["pid"]) for w in pool.status()["workers"])


def test_json_form_parameters_and_fast_dispatch(pool):
    body = {"query": "greedy", "do_sample": False, "max_new_tokens": 5}
    json_request(pool.root, "j1", body)
    json_request(pool.root, "j2", body)
    assert outcome(pool.root, "j1")[0] == "back" and outcome(pool.root, "j2")[0] == "back"
    first, second = meta(pool.root, "j1"), meta(pool.root, "j2")
    assert first["generated_tokens"] <= 5 and first["history"] == second["history"]  # greedy: same answer
    # an atomically written .json is taken at once (it parses), not after the 0.5 s settling time
    timings = first["timings"]
    assert timings["received"] - timings["arrived"] < 0.4, timings


def test_status_while_both_workers_busy_then_cancel(pool, long_body):
    for i in range(4):
        json_request(pool.root, f"busy{i}", long_body)
    status = busy_workers(pool, 2, in_progress=4)
    assert status["status"] == "running" and status["version"] and status["model"] == "tiny-random"
    assert len(status["workers"]) == 2 and status["queue"]["in_progress"] == 4
    for worker in status["workers"]:
        assert worker["state"] == "RUNNING" and worker["device"] == "cpu" and worker["rss_bytes"] > 0
        assert worker["in_flight"] == 2  # spread evenly
        assert worker["gpu_memory_bytes"] is None and worker["max_batch"] == 16 and worker["out_of_memory"] == 0
        assert worker["kv_tokens"] > 0
    assert status["gpus"] == []
    assert [h["pid"] for h in status["hosts"]] == [pool.process.pid]
    assert not (pool.root / "flags" / "status.flag").exists()
    for i in range(4):
        (pool.root / "requests" / f"busy{i}.cancel").touch()
    for i in range(4):
        kind, text = outcome(pool.root, f"busy{i}", 30)
        assert kind == "error" and text.startswith("the request was cancelled")
        assert not (pool.root / "requests" / f"busy{i}.cancel").exists()


def test_a_cancel_written_before_its_request_does_not_apply(pool):
    """A .cancel acts only on a request written before it: one left from earlier (here, written before
    the request) never cancels a request that comes after it, and goes with that request's outcome."""
    cancel = pool.root / "requests" / "early.cancel"
    cancel.touch()
    os.utime(cancel, (cancel.stat().st_mtime - 5,) * 2)  # a file's mtime may be as coarse as a clock tick
    json_request(pool.root, "early", {"query": "never mind", "max_new_tokens": 4})
    kind, text = outcome(pool.root, "early")
    assert kind == "back", text
    assert not (pool.root / "requests" / "early.cancel").exists()


def test_sigkill_worker_mid_generation(pool, long_body):
    all_running(pool)
    json_request(pool.root, "victim", long_body)
    wait_for(lambda: (pool.root / "requests" / "victim.partial").exists(), 30, "generation under way")
    status = pool.status()
    busy = [w for w in status["workers"] if w["in_flight"]]
    restarts_before = sum(w["restarts"] for w in status["workers"])
    os.kill(busy[0]["pid"], signal.SIGKILL)
    kind, _ = outcome(pool.root, "victim", 120)
    assert kind == "back"
    assert meta(pool.root, "victim")["attempts"] == 2
    assert sum(w["restarts"] for w in all_running(pool)["workers"]) == restarts_before + 1


def test_hung_worker_is_killed_and_its_request_answered_elsewhere(pool, long_body):
    all_running(pool)
    json_request(pool.root, "stuck", long_body)
    wait_for(lambda: (pool.root / "requests" / "stuck.partial").exists(), 30, "generation under way")
    status = pool.status()
    hung = next(w for w in status["workers"] if w["in_flight"])
    restarts_before = sum(w["restarts"] for w in status["workers"])
    os.kill(hung["pid"], signal.SIGSTOP)  # alive, but silent: only the heartbeat timeout can tell
    try:
        assert outcome(pool.root, "stuck", 90)[0] == "back"
    finally:
        try:
            os.kill(hung["pid"], signal.SIGCONT)  # only matters if the test failed before the murder
        except ProcessLookupError:
            pass
    assert meta(pool.root, "stuck")["attempts"] == 2 and meta(pool.root, "stuck")["worker"] != hung["id"]
    assert f"worker {hung['id']} silent for" in pool.output()
    assert sum(w["restarts"] for w in all_running(pool)["workers"]) == restarts_before + 1


def test_request_timeout_ends_with_an_error(pool, long_body):
    json_request(pool.root, "slow", {**long_body, "timeout": 0.5})
    kind, text = outcome(pool.root, "slow", 30)
    assert kind == "error" and text.startswith("the request timed out")
    assert json.loads(text.split("\n", 1)[1])["reason"] == "timeout"


def test_poison_request_fails_after_three_attempts_and_spares_its_batch(pool, long_body):
    root = pool.root
    all_running(pool)
    json_request(root, "neighbour", long_body)
    json_request(root, "other", long_body)
    busy_workers(pool, 2)
    seed_request(root, "poison", CRASH_MARKER)  # joins a worker that is generating for a neighbour
    kind, text = outcome(root, "poison", 180)
    assert kind == "error" and "crashed workers 3 times" in text.splitlines()[0]
    assert (root / "requests" / "failed" / "poison.request").exists()
    # the request batched with it died with the worker once, then ran alone and was answered
    assert outcome(root, "neighbour", 120)[0] == "back" and outcome(root, "other", 120)[0] == "back"
    assert sorted([meta(root, "neighbour")["attempts"], meta(root, "other")["attempts"]]) == [1, 2]
    seed_request(root, "after", "still serving?")
    assert outcome(root, "after", 60)[0] == "back"


@pytest.mark.parametrize("name, make, message", [
    ("badutf8", lambda r: (r / "badutf8.request").write_bytes(b"\xff\xfe bad\n"), "not valid UTF-8"),
    ("nul", lambda r: (r / "nul.request").write_bytes(b"a\0b\n"), "NUL"),
    ("badhist", lambda r: ((r / "badhist.history").write_text("[[1, 2]]\n"),
                           (r / "badhist.request").write_text("q\n")), "pairs"),
    ("notjson", lambda r: ((r / "notjson.history").write_text("{oops\n"),
                           (r / "notjson.request").write_text("q\n")), "not valid JSON"),
    ("brokenjson", lambda r: (r / "brokenjson.json").write_text('{"query": "q"'), "not valid JSON"),
    ("notobject", lambda r: (r / "notobject.json").write_text('["q"]\n'), "one JSON object"),
    ("noquery", lambda r: (r / "noquery.json").write_text('{"history": []}\n'), "query"),
    ("unknown", lambda r: (r / "unknown.json").write_text('{"query": "q", "colour": 1}'), "unknown keys"),
    ("badparam", lambda r: (r / "badparam.json").write_text('{"query": "q", "top_p": -1}'), "top_p"),
    ("badtype", lambda r: (r / "badtype.json").write_text('{"query": "q", "max_length": "long"}'), "max_length"),
    ("nan", lambda r: (r / "nan.json").write_text('{"query": "q", "temperature": NaN}'), "temperature"),
    ("toolong", lambda r: (r / "toolong.request").write_text("橘子" * 3000 + "\n"), "window"),
    ("huge", lambda r: (r / "huge.request").write_bytes(b"x" * (2 << 20) + b"\n"), "limit"),
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
    kept = [p.name for p in (requests / "failed").iterdir() if p.name.startswith(name + ".")]
    assert kept and not any(p.name.startswith(name + ".") and p.suffix in (".request", ".json", ".history")
                            for p in requests.iterdir())


def test_cli_ask_status_then_quit_during_generation(tmp_path, cache_dir, long_body):
    # A KV budget of ~2000 tokens (tiny model, fp32: 1 KiB a token) fits one long request (~1520 tokens),
    # not two: the second one dispatched waits inside the worker until the first finishes.
    p = Pool(tmp_path, cache_dir, "--gpus", "cpu", "--max-length", "64", "--max-batch", "2",
             "--kv-cache-gb", "0.002").start()
    try:
        p.wait_running()
        asked = glmpool("ask", "你好", "--dir", str(tmp_path), "--timeout", "60")
        assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
        table = glmpool("status", "--dir", str(tmp_path))
        assert table.returncode == 0 and "RUNNING" in table.stdout and "served 1" in table.stdout
        as_json = glmpool("status", "--json", "--dir", str(tmp_path))
        assert json.loads(as_json.stdout)["workers"][0]["served"] == 1
        failing = glmpool("ask", "x", "--dir", str(tmp_path), "--param", "top_p=5")
        assert failing.returncode == 1 and "top_p" in failing.stderr and "Traceback" not in failing.stderr
        for i in range(4):  # a few seconds each, well within the default grace time
            json_request(tmp_path, f"q{i}", long_body)
        wait_for(lambda: p.status()["queue"]["in_progress"] == 2, 30, "two requests in the worker")
        assert glmpool("quit", "--dir", str(tmp_path)).returncode == 0
        assert p.wait_exit(60) == 0
    finally:
        p.kill()
    requests = tmp_path / "requests"
    finished = [i for i in range(4) if (requests / f"q{i}.back").exists()]
    put_back = [i for i in range(4) if (requests / f"q{i}.json").exists()]
    assert len(finished) == 2 and sorted(finished + put_back) == [0, 1, 2, 3]  # in flight finished, rest queued
    first, second = sorted((meta(tmp_path, f"q{i}")["timings"] for i in finished), key=lambda t: t["finished"])
    assert second["received"] < first["finished"]  # the worker held it while the first one generated
    assert not list((requests / ".claims").glob("[!.]*")) and not list(requests.glob("*.partial"))
    assert not (tmp_path / "flags" / "quit.flag").exists()


def test_sigterm_during_generation_puts_cut_requests_back(tmp_path, cache_dir, long_body):
    p = Pool(tmp_path, cache_dir, "--gpus", "cpu", "--max-batch", "2", "--grace-seconds", "0.05").start()
    bodies = {f"r{i}": {**long_body, "seed": i} for i in range(4)}  # distinct files, same greedy work
    try:
        p.wait_running()
        for rid, body in bodies.items():
            json_request(tmp_path, rid, body)
        wait_for(lambda: any((tmp_path / "requests").glob("*.partial")), 30, "generation under way")
        p.signal(signal.SIGTERM)
        assert p.wait_exit(30) == 0
    finally:
        p.kill()
    assert "stopping" in p.output() and "releasing" in p.output()
    requests = tmp_path / "requests"
    for rid, body in bodies.items():  # cut by the grace time: back in the queue, unchanged, unclaimed
        assert json.loads((requests / f"{rid}.json").read_text()) == body
        assert not (requests / f"{rid}.back").exists()
    assert not list((requests / ".claims").glob("[!.]*")), "claims left behind"


def test_killed_supervisor_workers_exit_and_its_successor_answers_its_claims(tmp_path, cache_dir, long_body):
    import psutil
    args = ("--gpus", "cpu", "--max-batch", "2")
    first = Pool(tmp_path, cache_dir, *args, env={"GLMPOOL_HOST_ID": "same"}, name="first").start()
    try:
        first.wait_running()
        for i in range(2):
            json_request(tmp_path, f"k{i}", long_body)
        wait_for(lambda: len(list((tmp_path / "requests").glob("*.partial"))) == 2, 30, "both generating")
        worker = first.status()["workers"][0]["pid"]
        os.kill(first.process.pid, signal.SIGKILL)  # the supervisor alone, mid-generation
        first.wait_exit(10)

        def gone():
            try:
                return psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        wait_for(gone, 10, "the orphaned worker to exit by itself")
        assert len(list((tmp_path / "requests" / ".claims").glob("*.claim"))) == 2  # claims outlive it
    finally:
        first.kill()
    second = Pool(tmp_path, cache_dir, *args, env={"GLMPOOL_HOST_ID": "same"}, name="second").start()
    try:
        for i in range(2):  # adopted at start: its predecessor on this host is dead
            assert outcome(tmp_path, f"k{i}", 60)[0] == "back"
        assert "adopted k0" in second.output() and "adopted k1" in second.output()
        # the claim is dropped just after its .back is published
        wait_for(lambda: not list((tmp_path / "requests" / ".claims").glob("[!.]*")), 10, "claims dropped")
    finally:
        second.kill()


def test_two_supervisors_answer_each_request_once(tmp_path, cache_dir):
    pools = [Pool(tmp_path, cache_dir, "--gpus", "cpu", "--max-length", "40", "--max-batch", "4", name=f"s{i}",
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
        hosts = [meta(tmp_path, f"m{i}")["host"] for i in range(50)]
        assert set(hosts) == {"host0", "host1"}  # both did work
        # peers' figures come from their heartbeat files, at most a beat old
        status = wait_for(lambda: (s := pools[0].status()) and sum(h["served"] for h in s["hosts"]) >= 50 and s,
                          10, "both hosts' counts")
        assert {h["host"] for h in status["hosts"]} == {"host0", "host1"}
        assert sum(h["served"] for h in status["hosts"]) == 50  # exactly once: no duplicate answers
        assert sorted(h["served"] for h in status["hosts"]) == sorted(hosts.count(h) for h in ("host0", "host1"))
        (tmp_path / "flags" / "quit.flag").touch()  # stops every supervisor on the directory
        assert [p.wait_exit(30) for p in pools] == [0, 0]
    finally:
        for p in pools:
            p.kill()
    assert not any("already exists" in p.output() for p in pools)
    assert not list((tmp_path / "requests" / ".claims").glob("[!.]*"))


def test_unknown_gpu_is_a_clear_error(tmp_path, cache_dir):
    p = Pool(tmp_path, cache_dir, "--gpus", "7", env={"CUDA_VISIBLE_DEVICES": ""}).start()
    try:
        assert p.wait_exit(60) == 2
        assert "GPU 7 does not exist" in p.output() and "Traceback" not in p.output()
    finally:
        p.kill()


def test_model_that_cannot_load_is_fatal_not_a_crash_loop(tmp_path, cache_dir):
    p = Pool(tmp_path, cache_dir, "--gpus", "cpu", "--model", str(tmp_path / "no-such-model")).start()
    try:
        assert p.wait_exit(90) == 1
    finally:
        p.kill()
    out = p.output()
    assert out.count("cannot load the model") == 3 and "FATAL" in out
    assert "no worker could start" in out and "Running..." not in out


def test_worker_hung_while_loading_is_killed_after_the_load_timeout(tmp_path, cache_dir):
    # SIGSTOP the first worker while it loads (as a read hung on a dead NFS server would stop it).
    p = Pool(tmp_path, cache_dir, "--gpus", "cpu", "--load-timeout", "10").start()
    try:
        first = re.compile(r"worker 0 \(cpu\) starting, pid (\d+)")
        wait_for(lambda: first.search(p.output()), 30, "the first worker's pid")
        os.kill(int(first.search(p.output()).group(1)), signal.SIGSTOP)
        p.wait_running(120)  # killed after 10 s, restarted, and the new one loads
        out = p.output()
        assert "did not load within --load-timeout 10s; killing it" in out
        # a restart that also loads too slowly (a loaded machine) is killed and restarted in turn
        assert out.count("starting, pid") >= 2
    finally:
        p.kill()


def test_worker_killed_while_loading_is_restarted_and_the_log_says_out_of_memory(tmp_path, cache_dir):
    # The kernel's OOM killer sends SIGKILL without a word: the pool says what it most likely was.
    p = Pool(tmp_path, cache_dir, "--gpus", "cpu").start()
    try:
        first = re.compile(r"worker 0 \(cpu\) starting, pid (\d+)")
        wait_for(lambda: first.search(p.output()), 30, "the first worker's pid")
        pid = int(first.search(p.output()).group(1))
        os.kill(pid, signal.SIGSTOP)  # still loading, surely, when the SIGKILL comes
        os.kill(pid, signal.SIGKILL)
        p.wait_running(120)
        assert "exited with signal SIGKILL while loading the model (out of memory?); restart in" in p.output()
    finally:
        p.kill()


def test_pool_modules_do_not_import_torch():
    code = ("import sys; import glmpool.cli, glmpool.supervisor, glmpool.claims, glmpool.spool, glmpool.status, "
            "glmpool.client, glmpool.config, glmpool.watch, glmpool.worker; "
            "sys.exit('torch' in sys.modules)")
    assert os.spawnve(os.P_WAIT, sys.executable, [sys.executable, "-c", code], ENV) == 0


def test_cpu_workers_load_one_at_a_time(pool):
    """Both load into the host's memory: the second starts once the first is ready, so that its memory
    check sees what the first took."""
    out = pool.output()
    first = min((0, 1), key=lambda w: out.index(f"worker {w} (cpu) starting"))
    assert out.index(f"worker {first} (cpu) ready") < out.index(f"worker {1 - first} (cpu) starting")


def alone_then_as_a_burst(root, bodies: list[dict]) -> tuple[list, list]:
    """Each request sent alone, one after another, then all of them at once: both lists of outcomes."""
    alone = []
    for i, body in enumerate(bodies):
        json_request(root, f"alone{i}", body)
        alone.append(outcome(root, f"alone{i}"))
    for i, body in enumerate(bodies):
        json_request(root, f"burst{i}", body)
    return alone, [outcome(root, f"burst{i}") for i in range(len(bodies))]


def test_a_burst_through_a_shared_kv_slab_answers_as_one_at_a_time(tmp_path, cache_dir):
    """Heads of 64 dims with `--matmul onednn`: the worker decodes a burst through one KV slab (glmpool's
    attention kernel, or torch's with its padding checked exact at load), the requests leaving at different
    steps; each answer is the one the same request gets alone."""
    from glmpool.engine import load
    from glmpool.engine.tiny import write_tiny_checkpoint
    model = write_tiny_checkpoint(tmp_path / "wide", hidden=128, heads=2, seed=2)
    if not load(model, progress=False, matmul="onednn").model.slab_is_exact:
        pytest.skip("no attention kernel, and padded decode attention is not exact here: no slab on the CPU")
    pool = Pool(tmp_path / "spool", cache_dir, "--gpus", "cpu", "--model", str(model), "--matmul", "onednn",
                "--max-batch", "8").start()
    try:
        pool.wait_running()
        bodies = [{"query": q, "do_sample": False, "max_new_tokens": n}
                  for q, n in (("你好", 4), ("hello there, how are you?", 9), ("橘子", 14), ("what is the time", 20))]
        alone, burst = alone_then_as_a_burst(pool.root, bodies)
        assert burst == alone
        assert {meta(pool.root, f"burst{i}")["generated_tokens"] for i in range(len(bodies))} != {4}
    finally:
        pool.kill()


def test_the_gpu_path_in_a_pool_answers_a_burst_as_one_at_a_time(tmp_path, cache_dir):
    """A cpu worker on the GPU path (engine.static_decode, eagerly: --compile off), as GPU workers run: it
    warms every bucket before it is ready, says how long in its log and the status, and answers each
    request of a burst (sampled with seeds, or greedy; leaving at different steps) as alone."""
    pool = Pool(tmp_path / "spool", cache_dir, "--gpus", "cpu", "--max-batch", "4", "--compile", "off",
                "--kv-cache-gb", "0.05", env={"GLMPOOL_TEST_STATIC": "1"}).start()
    try:
        pool.wait_running()
        assert "decode step warmed up in" in pool.output()
        assert isinstance(pool.status()["workers"][0]["compile_seconds"], float)
        bodies = [{"query": "你好", "do_sample": False, "max_new_tokens": 4},
                  {"query": "hello there, how are you?", "seed": 7, "max_new_tokens": 9},
                  {"query": "what is the time", "seed": 8, "top_k": 3, "max_new_tokens": 14}]
        alone, burst = alone_then_as_a_burst(pool.root, bodies)
        assert burst == alone
    finally:
        pool.kill()


def test_the_gpu_path_survives_running_out_of_memory_mid_step(tmp_path, cache_dir):
    """The static decode path (as on GPUs, eagerly) loses a step to out-of-memory while batching: the worker
    lives on, its batcher is reset in place, and every request is answered at its first attempt."""
    pool = Pool(tmp_path / "spool", cache_dir, "--gpus", "cpu", "--max-batch", "4", "--compile", "off",
                "--kv-cache-gb", "0.05", env={"GLMPOOL_TEST_STATIC": "1", "GLMPOOL_TEST_OOM_ON": "OOM-HERE"}).start()
    try:
        pool.wait_running()
        pid = pool.status()["workers"][0]["pid"]
        for i in range(4):
            json_request(pool.root, f"r{i}", {"query": "OOM-HERE" if i == 1 else f"question {i}",
                                              "do_sample": False, "max_new_tokens": 6})
        outcomes = [outcome(pool.root, f"r{i}") for i in range(4)]
        worker = pool.status()["workers"][0]
        assert worker["pid"] == pid and worker["restarts"] == 0 and worker["out_of_memory"] >= 1
        assert worker["max_batch"] < 4
        attempts = [json.loads((pool.root / "requests" / f"r{i}.meta").read_text())["attempts"] for i in range(4)]
        assert attempts == [1, 1, 1, 1], (outcomes, pool.output())
    finally:
        pool.kill()
