"""Hostile and broken input against a real pool: every bad input is answered by an `.error` (a sentence,
then JSON detail) with its files kept in `requests/failed/`, and the supervisor keeps serving.

Two pools: `pool`, shared by most cases (root, umask 027), and `jail`, an unprivileged one (uid nobody,
its `requests/` and `flags/` 1 MiB tmpfs each in a private mount namespace) for unreadable files and a full disk. The
tests reach the jail's `requests/` through /proc/<pid>/root, which resolves in the pool's namespace.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from glmpool import client
from pooltools import FAST, Pool, glmpool, json_request, meta, outcome, wait_for

MB = 1 << 20


@pytest.fixture(scope="module")
def public_dir():
    """A directory an unprivileged user can traverse (pytest's own tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="glmpool-hostile-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cache(public_dir):
    from glmpool.engine.tiny import cached_tiny_checkpoint
    path = public_dir / "cache"
    cached_tiny_checkpoint(path)
    for d, _, files in os.walk(path):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory, cache):
    # A long poll interval, so that a request claimed within milliseconds was seen through inotify;
    # a short lease, so that orphaned claim records are looked at every second.
    p = Pool(tmp_path_factory.mktemp("hostile"), cache, "--gpus", "cpu", "--max-length", "96",
             "--umask", "027", "--poll-interval", "5", "--lease-seconds", "2", "--heartbeat-timeout", "60").start()
    try:
        yield p.wait_running()
    finally:
        p.kill()


def still_serving(p: Pool, root: Path | None = None, rid: str = "alive") -> None:
    root = root or p.root
    json_request(root, rid, {"query": "still serving?", "max_new_tokens": 4})
    assert outcome(root, rid, 30)[0] == "back", p.output()[-3000:]
    assert p.process.poll() is None


def write(requests: Path, name: str, data: str | bytes) -> None:
    (requests / name).write_bytes(data.encode() if isinstance(data, str) else data)


def assert_error(root: Path, rid: str, message: str, timeout: float = 30) -> str:
    """`rid` failed with `message` in the first line of its .error, its inputs all in failed/."""
    requests = root / "requests"
    kind, text = outcome(root, rid, timeout)
    assert kind == "error", text
    assert message in text.splitlines()[0], text
    json.loads(text.split("\n", 1)[1])
    assert any(p.name.startswith(rid + ".") for p in (requests / "failed").iterdir())
    left = [p.name for p in requests.iterdir() if p.name.startswith(rid + ".")
            and p.suffix in (".request", ".history", ".json")]
    assert not left, left
    return text


DEEP = "[" * 100000
NESTED = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize("rid, make, message", [
    ("shadow", lambda r: os.symlink("/etc/shadow", r / "shadow.request"), "symlink"),
    ("todir", lambda r: os.symlink("/etc", r / "todir.request"), "symlink"),
    ("dangling", lambda r: os.symlink("/nonexistent/x", r / "dangling.request"), "symlink"),
    ("jsonlink", lambda r: os.symlink("/etc/passwd", r / "jsonlink.json"), "symlink"),
    ("histlink", lambda r: (os.symlink("/etc/shadow", r / "histlink.history"),
                            write(r, "histlink.request", "q\n")), "histlink.history is a symlink"),
    ("histdir", lambda r: (os.mkdir(r / "histdir.history"), write(r, "histdir.request", "q\n")),
     "histdir.history is not a regular file"),
    ("deep", lambda r: (write(r, "deep.history", DEEP + "\n"), write(r, "deep.request", "q\n")), "not valid JSON"),
    ("nested", lambda r: (write(r, "nested.history", NESTED + "\n"), write(r, "nested.request", "q\n")),
     "not valid JSON"),
    ("deepjson", lambda r: write(r, "deepjson.json", '{"query": "q", "history": ' + NESTED + "}\n"), "not valid JSON"),
    ("hugehist", lambda r: (write(r, "hugehist.history", json.dumps([["q" * 1000, "a" * 1000]] * 600) + "\n"),
                            write(r, "hugehist.request", "q\n")), "limit"),
    ("longhist", lambda r: (write(r, "longhist.history", json.dumps([["问题", "回答"]] * 20000) + "\n"),
                            write(r, "longhist.request", "q\n")), "window"),
    ("intitem", lambda r: (write(r, "intitem.history", '[["q", 1]]\n'), write(r, "intitem.request", "q\n")), "pairs"),
    ("nullitem", lambda r: (write(r, "nullitem.history", '[[null, "a"]]\n'), write(r, "nullitem.request", "q\n")),
     "pairs"),
    ("triple", lambda r: (write(r, "triple.history", '[["q", "a", "b"]]\n'), write(r, "triple.request", "q\n")),
     "pairs"),
    ("dictitem", lambda r: (write(r, "dictitem.history", '[{"q": "a"}]\n'), write(r, "dictitem.request", "q\n")),
     "pairs"),
    ("listitem", lambda r: write(r, "listitem.json", '{"query": "q", "history": [[["q"], "a"]]}'), "pairs"),
    ("strhist", lambda r: (write(r, "strhist.history", '"hello"\n'), write(r, "strhist.request", "q\n")), "pairs"),
    ("neglen", lambda r: write(r, "neglen.json", '{"query": "q", "max_length": -1}'), "max_length"),
    ("zeronew", lambda r: write(r, "zeronew.json", '{"query": "q", "max_new_tokens": 0}'), "max_new_tokens"),
    ("negtemp", lambda r: write(r, "negtemp.json", '{"query": "q", "temperature": -0.5}'), "temperature"),
    ("inftemp", lambda r: write(r, "inftemp.json", '{"query": "q", "temperature": Infinity}'), "temperature"),
    ("ninftopp", lambda r: write(r, "ninftopp.json", '{"query": "q", "top_p": -Infinity}'), "top_p"),
    ("nantopp", lambda r: write(r, "nantopp.json", '{"query": "q", "top_p": NaN}'), "top_p"),
    ("negtopk", lambda r: write(r, "negtopk.json", '{"query": "q", "top_k": -3}'), "top_k"),
    ("negseed", lambda r: write(r, "negseed.json", '{"query": "q", "seed": -1}'), "seed"),
    ("hugeseed", lambda r: write(r, "hugeseed.json", '{"query": "q", "seed": %d}' % 2 ** 70), "seed"),
    ("hugelen", lambda r: write(r, "hugelen.json", '{"query": "q", "max_length": %d}' % 10 ** 30), "max_length"),
    ("negtimeout", lambda r: write(r, "negtimeout.json", '{"query": "q", "timeout": -1}'), "timeout"),
    ("nantimeout", lambda r: write(r, "nantimeout.json", '{"query": "q", "timeout": NaN}'), "timeout"),
    ("floatprio", lambda r: write(r, "floatprio.json", '{"query": "q", "priority": 1.5}'), "priority"),
    ("dupkey", lambda r: write(r, "dupkey.json", '{"query": "q", "max_new_tokens": -1, "max_new_tokens": 3}'),
     'the key "max_new_tokens" twice'),
    ("empty", lambda r: write(r, "empty.request", b""), "is empty (0 bytes)"),
])
def test_hostile_input_is_an_error(pool, rid, make, message):
    make(pool.root / "requests")
    assert_error(pool.root, rid, message)


def test_supervisor_survives_the_hostile_inputs(pool):
    still_serving(pool)
    assert "Traceback" not in pool.output()


def test_growing_file_is_taken_whole(pool):
    """A writer that appends slowly without a final newline: taken only once it ends in one."""
    requests = pool.root / "requests"
    question = "".join(f"part{i} " for i in range(20)).strip()
    (requests / "growing.history").write_text("\n")

    def writer():
        with open(requests / "growing.request", "w") as f:
            for word in question.split(" "):
                f.write(word + " ")
                f.flush()
                time.sleep(0.1)
            f.seek(f.tell() - 1)  # the last space becomes the final newline
            f.write("\n")
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        kind, text = outcome(pool.root, "growing", 30)
    finally:
        thread.join()
    assert kind == "back", text
    assert meta(pool.root, "growing")["history"][0][0] == question


def test_100_mb_request_is_refused_without_reading_it(pool):
    supervisor = psutil.Process(pool.process.pid)
    before, read_before = supervisor.memory_info().rss, supervisor.io_counters().read_chars
    chunk = b"x" * MB
    with open(pool.root / "requests" / ".big.tmp", "wb") as f:
        for _ in range(100):
            f.write(chunk)
        f.write(b"\n")
    os.rename(pool.root / "requests" / ".big.tmp", pool.root / "requests" / "big.request")
    text = assert_error(pool.root, "big", "over the 1048576-byte limit", 10)
    assert "104857601 bytes" in text.splitlines()[0]
    assert supervisor.io_counters().read_chars - read_before < 10 * MB  # judged by its size, not read
    assert supervisor.memory_info().rss - before < 20 * MB
    assert (pool.root / "requests" / "failed" / "big.request").stat().st_size == 100 * MB + 1
    (pool.root / "requests" / "failed" / "big.request").unlink()


def seed(requests: Path, rid: str, question: str) -> None:
    (requests / f"{rid}.history").write_text("\n")
    (requests / f"{rid}.request").write_text(question + "\n")


@pytest.mark.parametrize("rid", ["with space", "你好", "a.b.c", "-dash", "tab\tid", "x" * 247, "名" * 82])
def test_unusual_ids_are_answered(pool, rid):
    seed(pool.root / "requests", rid, "hello")
    kind, text = outcome(pool.root, rid, 30)
    assert kind == "back", text
    assert meta(pool.root, rid)["id"] == rid


def test_undecodable_id_is_answered_under_its_own_bytes(pool):
    requests = os.fsencode(pool.root / "requests")
    with open(requests + b"/\xff\xfe.history", "wb") as f:
        f.write(b"\n")
    with open(requests + b"/\xff\xfe.request", "wb") as f:
        f.write(b"hello\n")
    wait_for(lambda: os.path.exists(requests + b"/\xff\xfe.back"), 30, "the answer of an undecodable id")
    with open(requests + b"/\xff\xfe.meta", "rb") as f:
        assert json.loads(f.read().decode("utf-8", "surrogateescape"))["id"] == os.fsdecode(b"\xff\xfe")
    still_serving(pool, rid="alive-undecodable")


def test_ids_too_long_for_every_result_name(pool):
    """Ids are limited to 247 bytes, the longest a `<id>.request` name allows, so that every result
    name fits in NAME_MAX (255). A longer id (only the JSON form allows one) fails in place: with an
    `.error` under its own name when that name fits, else only in the log."""
    requests = pool.root / "requests"
    rid = "y" * 248
    json_request(pool.root, rid, {"query": "q"})
    assert_error(pool.root, rid, "247-byte limit")
    rid = "z" * 250  # z*250.json is 255 bytes: no .error (256) can be named after it
    json_request(pool.root, rid, {"query": "q"})
    wait_for(lambda: (requests / "failed" / f"{rid}.json").exists(), 30, "the input kept in failed/")
    assert not (requests / f"{rid}.json").exists()
    wait_for(lambda: "no .error can be named after it" in pool.output(), 5, "the reason in the log")
    still_serving(pool, rid="alive-after-long-ids")


def test_results_blocked_by_directories(pool):
    """A directory under a result name: removed when empty (the answer takes its place); when it holds
    something, never deleted: the request fails with an .error, or only in the log if .error is blocked."""
    requests = pool.root / "requests"
    (requests / "emptydir.back").mkdir()
    seed(requests, "emptydir", "hello")
    wait_for(lambda: (requests / "emptydir.back").is_file(), 30, "the answer in the directory's place")
    assert meta(pool.root, "emptydir")["id"] == "emptydir"
    (requests / "fulldir.back").mkdir()
    (requests / "fulldir.back" / "keep").write_text("client data\n")
    seed(requests, "fulldir", "hello")
    error = wait_for(lambda: (requests / "fulldir.error").is_file(), 30, "the error") and \
        (requests / "fulldir.error").read_text()
    assert "fulldir.back cannot be written" in error.splitlines()[0]
    assert (requests / "failed" / "fulldir.request").exists() and not (requests / "fulldir.request").exists()
    assert (requests / "fulldir.back" / "keep").exists()
    (requests / "blocked.error").mkdir()
    (requests / "blocked.error" / "keep").write_text("client data\n")
    write(requests, "blocked.request", b"nul\0\n")
    wait_for(lambda: (requests / "failed" / "blocked.request").exists(), 30, "the input kept in failed/")
    wait_for(lambda: "blocked failed" in pool.output(), 5, "the reason in the log")
    assert (requests / "blocked.error" / "keep").exists()
    still_serving(pool, rid="alive-after-blocked")


def test_status_flag_as_a_directory(pool):
    flags = pool.root / "flags"
    (flags / "status.back").unlink(missing_ok=True)
    (flags / "status.flag").mkdir()
    wait_for(lambda: (flags / "status.back").exists(), 10, "the status")
    assert json.loads((flags / "status.back").read_text())["status"] == "running"
    wait_for(lambda: not (flags / "status.flag").exists() and not list(flags.glob(".status.*")), 5, "the flag gone")
    assert pool.status()["status"] == "running"


def test_dot_files_are_never_taken(pool):
    """Names beginning with a dot are temp files of writers (and ours): never requests."""
    requests = pool.root / "requests"
    seed(requests, ".hidden", "hello")
    json_request(pool.root, ".dotjson", {"query": "q"})
    still_serving(pool, rid="alive-after-dots")
    time.sleep(0.5)
    assert (requests / ".hidden.request").exists() and (requests / ".dotjson.json").exists()
    assert not any(p.name.startswith((".hidden.", ".dotjson.")) and p.suffix in (".back", ".error")
                   for p in requests.iterdir())


def test_requests_dir_deleted_and_recreated(pool):
    requests = pool.root / "requests"
    for case in ("client-first", "server-first"):
        still_serving(pool, rid=f"before-{case}")
        shutil.rmtree(requests)
        if case == "server-first":
            wait_for(lambda: (requests / ".claims").is_dir(), 5, "the supervisor recreating requests/")
        requests.mkdir(exist_ok=True)  # what a client does
        for n in range(3):
            rid = f"{case}-{n}"
            json_request(pool.root, rid, {"query": "q", "max_new_tokens": 4})
            assert outcome(pool.root, rid, 30)[0] == "back"
        assert requests.stat().st_ino in inotify_watches(pool.process.pid)  # the new directory, not the deleted one


def inotify_watches(pid: int) -> set[int]:
    """The inode numbers a process watches through inotify (its /proc fdinfo: "inotify wd:1 ino:1a2b ...")."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if os.readlink(fd) == "anon_inode:inotify":
            for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                if line.startswith("inotify "):
                    inodes.add(int(dict(f.split(":", 1) for f in line.split()[1:])["ino"], 16))
    return inodes


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def stopped_worker(p: Pool) -> int:
    pid = wait_for(lambda: p.status()["workers"][0]["pid"], 30, "the worker's pid")
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_umask_applies_to_results_and_claims(pool):
    requests = pool.root / "requests"
    worker = stopped_worker(pool)
    try:
        json_request(pool.root, "umask", {"query": "q", "max_new_tokens": 4})
        record = wait_for(lambda: next((requests / ".claims").glob("*.claim"), None), 10, "a claim record")
        assert mode(record) == 0o640
    finally:
        os.kill(worker, signal.SIGCONT)
    assert outcome(pool.root, "umask")[0] == "back"
    assert mode(requests / "umask.back") == 0o640 and mode(requests / "umask.meta") == 0o640
    write(requests, "umaskbad.request", b"\0\n")
    assert_error(pool.root, "umaskbad", "NUL")
    assert mode(requests / "umaskbad.error") == 0o640
    assert mode(requests / ".claims") == 0o750
    assert all(mode(p) == 0o640 for p in (requests / ".locks").iterdir())


@pytest.mark.parametrize("name", [".claims", ".locks", "failed"])
def test_spool_dirs_replaced_by_symlinks_are_not_written_through(pool, tmp_path, name):
    requests = pool.root / "requests"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = requests / f".{name}.real"
    os.rename(requests / name, real)
    os.symlink(elsewhere, requests / name)
    try:
        write(requests, f"sym{name}.request", b"nul\0\n")  # a bad request: would go to failed/
        json_request(pool.root, f"ok{name}", {"query": "q", "max_new_tokens": 4})
        wait_for(lambda: f"requests/{name} is not a directory" in pool.output(), 10, "the refusal in the log")
        time.sleep(1)
        assert list(elsewhere.iterdir()) == []
        assert (requests / f"sym{name}.request").exists() and (requests / f"ok{name}.json").exists()
        assert pool.process.poll() is None
    finally:
        os.unlink(requests / name)
        os.rename(real, requests / name)
    still_serving(pool, rid=f"poke{name}")  # a new request: the waiting ones are looked at again too
    assert_error(pool.root, f"sym{name}", "NUL")
    assert outcome(pool.root, f"ok{name}")[0] == "back"


def test_forged_claim_record_cannot_escape_the_spool(pool, tmp_path):
    """An orphaned claim record names its id; an id that is not a plain name is never adopted."""
    claims = pool.root / "requests" / ".claims"
    target = pool.root / "escaped"
    (claims / "0123456789abcdef.request").write_text("q\n")
    (claims / "0123456789abcdef.claim").write_text(json.dumps(
        {"id": "../../escaped", "host": "elsewhere", "pid": 1, "time": 0, "attempts": 0, "inputs": [".request"]}))
    os.utime(claims / "0123456789abcdef.claim", (0, 0))
    wait_for(lambda: "0123456789abcdef" in pool.output(), 10, "the refusal in the log")
    time.sleep(1.5)
    assert not any(p.name.startswith("escaped") for p in pool.root.iterdir())
    assert not target.exists() and pool.process.poll() is None
    (claims / "0123456789abcdef.request").unlink()
    (claims / "0123456789abcdef.claim").unlink()


# --- the jail: an unprivileged pool whose requests/ is a small tmpfs ---------------------------------

def jail_script() -> str:
    """sh -c script: $1 is the spool root, then the command, run as nobody in a private mount namespace."""
    lines = ["set -e"]
    # Python may live where nobody cannot enter (root's home): open up only its trees. A venv's interpreter,
    # which its pool spawns again for the workers and multiprocess's resource tracker, is the base one.
    places = (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable))
    trees = sorted({"/root/" + parts[2] for parts in (Path(p).resolve().parts for p in places)
                    if parts[:2] == ("/", "root") and len(parts) > 2})
    if trees:
        for n, tree in enumerate(trees):
            lines += [f'mkdir -p "$1/.stage{n}"', f'mount --bind {tree} "$1/.stage{n}"']
        lines.append("mount -t tmpfs -o mode=0755 tmpfs /root")
        for n, tree in enumerate(trees):
            lines += [f"mkdir -p {tree}", f'mount --move "$1/.stage{n}" {tree}']
    lines += ['mount -t tmpfs -o size=1m,mode=0777 tmpfs "$1/requests"',
              'mount -t tmpfs -o size=1m,mode=0777 tmpfs "$1/flags"', "shift",
              'exec setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"']
    return "\n".join(lines)


@pytest.fixture(scope="module")
def jail(public_dir, cache):
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: the unprivileged/full-disk pool needs root to mount tmpfs in a namespace")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"LOUD SKIP: the kernel refuses mount namespaces: {probe.stderr.decode()[:200]}")
    root = public_dir / "jail"
    for d in (root / "requests", root / "flags"):
        d.mkdir(parents=True)
        shutil.chown(d, "nobody", "nogroup")
    shutil.chown(root, "nobody", "nogroup")
    # The checkout may sit in a directory only root can enter (a `mktemp -d` clone is 0700): give nobody
    # its own readable copy of the package.
    source = public_dir / "src"
    shutil.copytree(Path(__file__).resolve().parents[2] / "glmpool", source / "glmpool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for d, _, files in os.walk(source):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    p = Pool(root, cache, "--gpus", "cpu", "--max-length", "96", "--heartbeat-timeout", "60",
             env={"HOME": str(root), "PYTHONPATH": str(source)}, name="jail")
    p.cmd = ["unshare", "-m", "sh", "-c", jail_script(), "jail", str(root)] + p.cmd
    p.start()
    try:
        p.wait_running()
        p.view = Path(f"/proc/{p.process.pid}/root{root}")  # the pool's requests/ is only visible from inside
        p.status = lambda timeout=15: client.status(p.view, timeout)  # and its flags/
        yield p
    finally:
        p.kill()


def test_jail_runs_unprivileged(jail):
    assert psutil.Process(jail.process.pid).uids().real == 65534
    still_serving(jail, jail.view, rid="jail-alive")
    assert mode(jail.view / "requests" / "jail-alive.back") == 0o644  # the default umask 022


def test_unreadable_files_are_an_error(jail):
    requests = jail.view / "requests"
    write(requests, "secret.request", "q\n")
    os.chmod(requests / "secret.request", 0)
    assert_error(jail.view, "secret", "cannot be read: Permission denied")
    write(requests, "secrethist.history", "\n")
    os.chmod(requests / "secrethist.history", 0)
    write(requests, "secrethist.request", "q\n")
    assert_error(jail.view, "secrethist", "secrethist.history cannot be read")
    still_serving(jail, jail.view, rid="jail-after-unreadable")


def fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:  # unbuffered: nothing left over for close() to fail on
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_full_disk_while_writing_back_keeps_the_answer_and_retries(jail):
    requests = jail.view / "requests"
    time.sleep(1.5)  # a worker heartbeat: its token count so far
    tokens = jail.status()["workers"][0]["tokens_generated"]
    worker = stopped_worker(jail)  # it takes the request, then the disk fills, then it answers
    ballast = requests / "ballast"
    try:
        json_request(jail.view, "full", {"query": "fill", "max_new_tokens": 24, "do_sample": False})
        wait_for(lambda: not (requests / "full.json").exists(), 10, "the request claimed")
        fill(ballast)
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for(lambda: "cannot publish" in jail.output(), 20, "the failed publication in the log")
    time.sleep(2)
    assert not (requests / "full.back").exists()
    held = list((requests / ".claims").glob("*.json"))
    assert len(held) == 1, "the request must still be claimed"
    ballast.unlink()
    freed = time.time()
    assert outcome(jail.view, "full", 30)[0] == "back"
    info = meta(jail.view, "full")
    assert info["timings"]["received"] < freed, "the answer was generated again instead of kept"
    assert info["attempts"] == 1
    time.sleep(1.5)  # a worker heartbeat: its token count
    assert jail.status()["workers"][0]["tokens_generated"] - tokens == info["generated_tokens"]
    leftovers = [p.name for p in requests.iterdir() if p.name.endswith(".tmp")] + \
        [p.name for p in (requests / ".claims").iterdir() if not p.name.startswith(".probe")]
    assert not leftovers
    still_serving(jail, jail.view, rid="jail-after-full")


def test_full_disk_while_writing_an_error_keeps_it_and_retries(jail):
    requests = jail.view / "requests"
    worker = stopped_worker(jail)
    ballast = requests / "ballast"
    try:
        json_request(jail.view, "fullerr", {"query": "q", "timeout": 0.5})
        wait_for(lambda: not (requests / "fullerr.json").exists(), 10, "the request claimed")
        fill(ballast)
        time.sleep(0.6)  # past its deadline: the worker ends it as soon as it runs again
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for(lambda: "cannot publish the error of fullerr" in jail.output(), 20, "the failed publication")
    time.sleep(1)
    assert not (requests / "fullerr.error").exists()
    ballast.unlink()
    assert_error(jail.view, "fullerr", "timed out")
    assert not list((requests / ".claims").glob("*.claim"))
    still_serving(jail, jail.view, rid="jail-after-fullerr")


def test_symlinked_spool_dir_at_start_is_a_setup_error(tmp_path):
    (tmp_path / "requests").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "requests" / ".claims")
    done = glmpool("serve", *FAST, "--cache-dir", str(tmp_path / "cache"), "--dir", str(tmp_path), "--gpus", "cpu",
                   timeout=60)  # refused before any worker starts: no model needed
    assert done.returncode == 2, done.stdout + done.stderr
    assert "requests/.claims is not a directory" in done.stdout + done.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_full_disk_while_answering_a_status_keeps_it_owed_and_retries(jail):
    """Found: the status.flag was taken, status.back could not be written, and no answer ever came."""
    flags = jail.view / "flags"
    (flags / "status.back").unlink(missing_ok=True)
    ballast = flags / "ballast"
    (flags / ".asking").touch()  # a full tmpfs refuses even an empty new file: made before, renamed after
    try:
        fill(ballast)
        os.rename(flags / ".asking", flags / "status.flag")
        wait_for(lambda: "cannot write flags/status.back, retrying" in jail.output(), 10, "the refusal in the log")
        assert not (flags / "status.flag").exists()  # taken: one supervisor answers it
        time.sleep(1)
        assert not (flags / "status.back").exists()
    finally:
        ballast.unlink()
    wait_for(lambda: (flags / "status.back").exists(), 30, "the status once there is room")
    assert json.loads((flags / "status.back").read_text())["status"] == "running"
