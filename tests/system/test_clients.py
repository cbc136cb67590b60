"""The client commands find the pool as `serve` does (GLMPOOL_DIR, the config file), clean up after
themselves, cancel what they give up on, and tell a dead pool from a busy one."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from pooltools import ENV, GLMPOOL, Pool, wait_for


@pytest.fixture(scope="module")
def pool(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("spool")
    p = Pool(root, cache_dir, "--gpus", "cpu", "--max-batch", "2").start()
    try:
        yield p.wait_running()
    finally:
        p.kill()


def client(*args, env=None, cwd, stdin=None, timeout=60):
    """A client command run from `cwd`, with no GLMPOOL_* setting but those in `env`."""
    base = {k: v for k, v in ENV.items() if not k.startswith("GLMPOOL_")}
    return subprocess.run(GLMPOOL + list(args), capture_output=True, text=True, timeout=timeout, input=stdin,
                          env={**base, **(env or {})}, cwd=cwd)


def leftovers(root):
    return sorted(p.name for p in (root / "requests").glob("ask-*"))


def test_clients_find_the_pool_through_GLMPOOL_DIR_and_the_config_file(pool, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_env = {"GLMPOOL_DIR": str(pool.root)}
    asked = client("ask", "你好", "--param", "max_new_tokens=4", env=by_env, cwd=elsewhere)
    assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
    assert not list(elsewhere.iterdir())  # nothing written where the client runs
    assert leftovers(pool.root) == []  # its answer's files removed once printed

    toml = tmp_path / "glmpool.toml"
    toml.write_text(f'dir = "{pool.root}"\n')
    from_stdin = client("ask", "-", "--param", "max_new_tokens=4", "--keep", env={"GLMPOOL_CONFIG": str(toml)},
                        cwd=elsewhere, stdin="多行的\n问题\n")
    assert from_stdin.returncode == 0 and from_stdin.stdout.strip(), from_stdin.stderr
    kept = leftovers(pool.root)
    assert [name.rsplit(".", 1)[1] for name in kept] == ["back", "meta"]
    meta = json.loads((pool.root / "requests" / kept[1]).read_text())
    assert meta["history"][-1][0] == "多行的\n问题"  # the whole of standard input, final newline dropped
    for name in kept:
        (pool.root / "requests" / name).unlink()

    status = client("status", "--config", str(toml), cwd=elsewhere)
    assert status.returncode == 0 and "RUNNING" in status.stdout, status.stderr
    assert not list(elsewhere.iterdir())


def test_chat_keeps_the_conversation_until_cleared(pool, tmp_path):
    chat = client("chat", "--dir", str(pool.root), "--keep", "--param", "max_new_tokens=3", cwd=tmp_path,
                  stdin="你好\n再说一遍\nclear\n新话题\nstop\n")
    assert chat.returncode == 0 and chat.stdout.count("ChatGLM-6B：") == 3, chat.stderr
    metas = [json.loads(p.read_text()) for p in (pool.root / "requests").glob("ask-*.meta")]
    for p in (pool.root / "requests").glob("ask-*"):
        p.unlink()
    histories = {m["history"][-1][0]: [q for q, _ in m["history"]] for m in metas}
    assert histories == {"你好": ["你好"], "再说一遍": ["你好", "再说一遍"], "新话题": ["新话题"]}


def test_ask_cancels_what_it_gives_up_on(pool, tmp_path, long_body):
    params = [arg for key in ("max_new_tokens", "max_length", "do_sample")
              for arg in ("--param", f"{key}={json.dumps(long_body[key])}")]
    # SIGTERM mid-generation: the request is cancelled (the worker stops), its files are removed.
    asking = subprocess.Popen(GLMPOOL + ["ask", long_body["query"], "--dir", str(pool.root), *params],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=tmp_path)
    try:
        wait_for(lambda: list((pool.root / "requests").glob("ask-*.partial")), 30, "generation under way")
        rid = next((pool.root / "requests").glob("ask-*.partial")).name.split(".")[0]
        asking.send_signal(signal.SIGTERM)
        assert asking.wait(30) == 130
    finally:
        asking.kill()
    wait_for(lambda: f"request {rid} failed: the request was cancelled" in pool.output(), 30, "the cancel")
    assert leftovers(pool.root) == []
    assert pool.status()["queue"]["in_progress"] == 0

    # --timeout while the pool is busy: cancelled too, and the message says the pool is busy, not gone.
    timed_out = client("ask", long_body["query"], "--dir", str(pool.root), "--timeout", "0.3", *params,
                       cwd=tmp_path)
    assert timed_out.returncode == 1 and "alive and busy" in timed_out.stderr, timed_out.stderr
    assert "is glmpool running" not in timed_out.stderr
    assert leftovers(pool.root) == []


def test_without_a_pool_ask_withdraws_and_quit_fails(tmp_path):
    empty = tmp_path / "empty"
    asked = client("ask", "hi", "--dir", str(empty), "--timeout", "0.3", cwd=tmp_path)
    assert asked.returncode == 1 and "is glmpool running" in asked.stderr, asked.stderr
    assert leftovers(empty) == []  # the unclaimed request withdrawn
    quit_ = client("quit", "--dir", str(empty), cwd=tmp_path)
    assert quit_.returncode == 1 and "no pool is running" in quit_.stderr
    assert not (empty / "flags" / "quit.flag").exists()


def test_quit_stops_the_running_pool(pool, tmp_path):
    assert client("quit", env={"GLMPOOL_DIR": str(pool.root)}, cwd=tmp_path).returncode == 0
    assert pool.wait_exit(60) == 0
