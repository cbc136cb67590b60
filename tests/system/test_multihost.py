"""Several hosts on one shared directory, simulated on one machine.

Each "host" is a supervisor in its own UTS and mount namespace (`unshare -u -m`): its own hostname (so
its default host id is that name, as on a real host) and the shared directory bind-mounted at a path of
its own (so no host sees the spool under the path another one uses). For locks that do not exclude
across hosts (NFS with local locks), two sshfs mounts of one directory through an sshd on 127.0.0.1:
flock() on a FUSE mount is the local kernel's own, so a lock taken through one mount is invisible
through the other.
"""
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from pooltools import ENV, FAST, GLMPOOL, REPO, Pool, json_request, meta, outcome, wait_for


def _load_faults():
    spec = importlib.util.spec_from_file_location("glmpool_bench_faults", Path(REPO) / "bench" / "faults.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


CreateCounter = _load_faults().CreateCounter


def skip_loudly(reason: str):
    warnings.warn(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from glmpool.engine.tiny import cached_tiny_checkpoint
    path = tmp_path_factory.mktemp("cache")
    cached_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory):
    """unshare -u -m works here (root, or user namespaces allowed), bind mounts included."""
    probe = tmp_path_factory.mktemp("nsprobe")
    (probe / "a").mkdir()
    (probe / "b").mkdir()
    (probe / "a" / "seen").touch()
    if shutil.which("unshare") is None:
        skip_loudly("NAMESPACE TESTS SKIPPED: no unshare(1) (util-linux) on this machine")
    script = 'hostname ns-probe && mount --bind "$0/a" "$0/b" && test -e "$0/b/seen" && hostname'
    done = subprocess.run(["unshare", "-u", "-m", "sh", "-c", script, str(probe)], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0 or done.stdout.strip() != "ns-probe":
        skip_loudly(f"NAMESPACE TESTS SKIPPED: the kernel refuses UTS/mount namespaces here: {done.stderr.strip()}")
    assert not (probe / "b" / "seen").exists()  # the bind mount stayed inside the namespace


class NsHost(Pool):
    """`glmpool serve` as host `hostname`: own UTS + mount namespace, the spool bind-mounted at its own path."""

    def __init__(self, shared: Path, cache_dir: Path, hostname: str, *args: str):
        super().__init__(shared, cache_dir, *args, name=hostname)
        self.hostname = hostname
        self.mount = shared.parent / "mnt" / hostname
        self.mount.mkdir(parents=True, exist_ok=True)
        serve = GLMPOOL + ["serve", *FAST, "--cache-dir", str(cache_dir), "--dir", str(self.mount), *args]
        # the bind mount disappears with the namespace when the supervisor (its only process tree) exits
        self.cmd = ["unshare", "-u", "-m", "--propagation", "private", "sh", "-c",
                    'hostname "$0" && mount --bind "$1" "$2" && shift 2 && exec "$@"',
                    hostname, str(shared), str(self.mount), *serve]
        self.env = {k: v for k, v in self.env.items() if k != "GLMPOOL_HOST_ID"}  # the hostname decides

    def worker_pid(self) -> int:
        entry = wait_for(lambda: next((h for h in self.status()["hosts"] if h["host"] == self.hostname
                                       and h["workers"][0]["pid"]), None), 30, f"{self.hostname}'s worker")
        return entry["workers"][0]["pid"]


def stop_all(hosts):
    for host in hosts:
        host.kill()


def claim_records(shared: Path) -> list[dict]:
    records = []
    for path in (shared / "requests" / ".claims").glob("*.claim"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return records


def test_three_hosts_answer_each_request_once_and_share_status_and_quit(tmp_path, cache_dir, namespaces):
    shared = tmp_path / "shared"
    names = ["host-a", "host-b", "host-c"]
    hosts = [NsHost(shared, cache_dir, name, "--gpus", "cpu", "--max-length", "40", "--max-batch", "4")
             for name in names]
    requests = shared / "requests"
    requests.mkdir(parents=True)
    counter = CreateCounter(requests, (".back", ".error"))
    try:
        for host in hosts:
            host.start()
        for host in hosts:
            host.wait_running(180)
        assert socket.gethostname() not in names
        count = 45
        for i in range(count):  # the old clients' way: not atomic, history first
            (requests / f"m{i}.history").write_text("\n")
            (requests / f"m{i}.request").write_text(f"question number {i}\n")
        assert all(outcome(shared, f"m{i}", 180)[0] == "back" for i in range(count))
        served_by = [meta(shared, f"m{i}")["host"] for i in range(count)]
        assert set(served_by) <= set(names) and len(set(served_by)) >= 2, served_by
        beats = sorted(p.name.split(".")[0] for p in (shared / "flags" / ".hosts").glob("*.json"))
        assert beats == names  # heartbeat files carry each namespace's hostname
        status = wait_for(lambda: (s := hosts[0].status()) and sum(h["served"] for h in s["hosts"]) >= count and s,
                          15, "every host's count in the status")
        assert status["host"] in names and sorted(h["host"] for h in status["hosts"]) == names
        assert sum(h["served"] for h in status["hosts"]) == count
        for entry in status["hosts"]:
            assert entry["status"] == "running" and entry["served"] == served_by.count(entry["host"])
        (shared / "flags" / "quit.flag").touch()  # one flag stops every host
        assert [host.wait_exit(60) for host in hosts] == [0, 0, 0]
    finally:
        stop_all(hosts)
        creates = counter.close()
    assert not counter.overflows
    assert all(creates[f"m{i}.back"] == 1 for i in range(count)), creates
    assert not any(name.endswith(".error") for name in creates)
    assert not (shared / "flags" / "quit.flag").exists()  # the last one out removed it
    assert not list((shared / "flags" / ".hosts").glob("*.json"))
    assert not list((requests / ".claims").glob("[!.]*"))
    assert not any("already exists" in host.output() for host in hosts)


def hold_claims(shared: Path, host: NsHost, count: int, prefix: str) -> int:
    """Make `host` claim `count` requests that stay in flight: its only worker is stopped (SIGSTOP)
    before they arrive. Returns the stopped worker's pid."""
    worker = host.worker_pid()
    os.kill(worker, signal.SIGSTOP)
    for i in range(count):
        json_request(shared, f"{prefix}{i}", {"query": f"held {i}", "max_new_tokens": 8})
    wait_for(lambda: sum(1 for r in claim_records(shared) if r["host"] == host.hostname) == count, 30,
             f"{count} claims held by {host.hostname}")
    return worker


def test_a_crashed_host_restarting_reclaims_its_own_claims_at_once(tmp_path, cache_dir, namespaces):
    shared = tmp_path / "shared"
    args = ("--gpus", "cpu", "--lease-seconds", "300")  # far longer than this test: only the restart can adopt
    first = NsHost(shared, cache_dir, "host-a", *args).start()
    try:
        first.wait_running(180)
        hold_claims(shared, first, 3, "own")
        first.kill()  # the whole host: supervisor and worker, SIGKILL
        assert len(claim_records(shared)) == 3
        crashed_at = time.time()
    finally:
        first.kill()
    again = NsHost(shared, cache_dir, "host-a", *args).start()
    try:
        for i in range(3):
            assert outcome(shared, f"own{i}", 120)[0] == "back"
            answer = meta(shared, f"own{i}")
            assert answer["host"] == "host-a" and answer["attempts"] == 1
            assert answer["timings"]["claimed"] - crashed_at < 120  # not after a 300 s lease
        assert again.output().count("adopted own") == 3 and "of host host-a" in again.output()
        again.signal(signal.SIGTERM)  # a clean stop (a SIGKILL right after a .back may precede its drop)
        assert again.wait_exit(60) == 0
    finally:
        again.kill()
    assert not list((shared / "requests" / ".claims").glob("[!.]*"))


def test_a_dead_hosts_claims_are_taken_over_by_another_after_the_lease(tmp_path, cache_dir, namespaces):
    shared = tmp_path / "shared"
    lease = 3.0
    args = ("--gpus", "cpu", "--lease-seconds", str(lease))
    owner = NsHost(shared, cache_dir, "host-a", *args).start()
    other = NsHost(shared, cache_dir, "host-b", *args)
    try:
        owner.wait_running(180)
        worker = hold_claims(shared, owner, 3, "held")
        other.start().wait_running(180)
        time.sleep(2 * lease)  # the owner is alive and renews: its claims are not taken
        assert sorted(r["host"] for r in claim_records(shared)) == ["host-a"] * 3
        assert "adopted" not in other.output()
        os.killpg(owner.process.pid, signal.SIGKILL)  # the owner host dies (its stopped worker with it)
        killed_at = time.time()
        owner.wait_exit(10)
        for i in range(3):
            assert outcome(shared, f"held{i}", 120)[0] == "back"
            answer = meta(shared, f"held{i}")
            assert answer["host"] == "host-b"
            # taken over only once the record went unrenewed for a lease (renewed every lease / 4)
            assert answer["timings"]["claimed"] >= killed_at + 0.7 * lease
        assert other.output().count("of host host-a") == 3
        other.signal(signal.SIGTERM)
        assert other.wait_exit(60) == 0
    finally:
        try:
            os.kill(worker, signal.SIGCONT)
        except (ProcessLookupError, UnboundLocalError):
            pass
        stop_all([owner, other])
    assert not list((shared / "requests" / ".claims").glob("[!.]*"))


# --- incoherent locks: two sshfs mounts of one directory ----------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    if process is not None:
        process.wait(10)


@pytest.fixture
def sshfs_mounts(tmp_path):
    """(backing directory, [mount 1, mount 2]): two sshfs mounts of it through an sshd on 127.0.0.1,
    without attribute or name caching (as NFS with `actimeo=0`; NFS caches by default, which only
    widens the windows the claims must survive)."""
    sshd, fusermount = "/usr/sbin/sshd", shutil.which("fusermount3") or shutil.which("fusermount")
    missing = [tool for tool, path in (("sshfs", shutil.which("sshfs")), ("sshd", os.path.exists(sshd) and sshd),
                                       ("ssh-keygen", shutil.which("ssh-keygen")), ("fusermount", fusermount),
                                       ("/dev/fuse", os.path.exists("/dev/fuse") and "/dev/fuse")) if not path]
    if missing:
        skip_loudly(f"SSHFS TESTS SKIPPED: missing {', '.join(missing)} (apt-get install sshfs openssh-server)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True, timeout=30)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = _free_port()
    (keys / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {keys / 'host'}",
        f"AuthorizedKeysFile {keys / 'authorized_keys'}", "PidFile none", "UsePAM no", "StrictModes no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp", ""]))
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    backing = tmp_path / "shared"
    backing.mkdir()
    mounts = [tmp_path / "sshfs1", tmp_path / "sshfs2"]
    daemon, clients = None, []
    try:
        with open(keys / "sshd.log", "wb") as log:
            daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(keys / "sshd_config")], stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(lambda: listening() or daemon.poll() is not None, 20, "sshd listening")
        if daemon.poll() is not None:
            skip_loudly(f"SSHFS TESTS SKIPPED: sshd would not start: {(keys / 'sshd.log').read_text()[-500:]}")
        options = ",".join([f"port={port}", f"IdentityFile={keys / 'user'}", "StrictHostKeyChecking=no",
                            "UserKnownHostsFile=/dev/null", "BatchMode=yes", "cache=no", "attr_timeout=0",
                            "entry_timeout=0", "negative_timeout=0"])
        user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        for mount in mounts:
            mount.mkdir()
            with open(f"{mount}.log", "wb") as log:
                clients.append(subprocess.Popen(["sshfs", "-f", "-o", options, f"{user}@127.0.0.1:{backing}",
                                                 str(mount)], stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True))
        for mount, client in zip(mounts, clients):
            wait_for(lambda: os.path.ismount(mount) or client.poll() is not None, 30, f"{mount} mounted")
            if client.poll() is not None:
                skip_loudly(f"SSHFS TESTS SKIPPED: sshfs failed: {Path(f'{mount}.log').read_text()[-500:]}")
        yield backing, mounts
    finally:
        for mount in mounts:
            if os.path.ismount(mount):
                subprocess.run([fusermount, "-u", "-z", str(mount)], capture_output=True, timeout=30)
        for process in clients + [daemon]:
            _stop(process)


def _lock_probe(lock_file: Path) -> str:
    code = ("import sys, filelock\n"
            "try:\n    filelock.FileLock(sys.argv[1], timeout=0).acquire(); print('acquired')\n"
            "except filelock.Timeout:\n    print('refused')\n")
    return subprocess.run([sys.executable, "-c", code, str(lock_file)], capture_output=True, text=True,
                          timeout=60, env=ENV).stdout.strip()


def _race_through(requests: Path, host: str, ids: list, results) -> None:
    from glmpool.claims import Claims
    c = Claims(requests, host)
    results.put((host, [rid for rid in ids if c.claim(rid, ".request", (".history",)) is not None]))


def test_sshfs_locks_do_not_exclude_but_claims_stay_exclusive(sshfs_mounts):
    import multiprocessing

    import filelock

    from glmpool.claims import Claims
    backing, mounts = sshfs_mounts
    Claims(mounts[0] / "requests", "setup").ensure_dirs()
    held = filelock.FileLock(str(mounts[0] / "requests" / ".locks" / "0.lock"), timeout=0)
    held.acquire()
    try:
        assert _lock_probe(mounts[0] / "requests" / ".locks" / "0.lock") == "refused"  # one mount: excludes
        assert _lock_probe(mounts[1] / "requests" / ".locks" / "0.lock") == "acquired"  # across: does not
    finally:
        held.release()
    ids = [f"r{i}" for i in range(120)]
    for rid in ids:
        (backing / "requests" / f"{rid}.history").write_text("\n")
        (backing / "requests" / f"{rid}.request").write_text("q\n")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    racers = [context.Process(target=_race_through, args=(mounts[n % 2] / "requests", f"host{n}",
                                                           ids if n < 2 else ids[::-1], results)) for n in range(4)]
    for p in racers:
        p.start()
    won = [results.get(timeout=120) for _ in racers]
    for p in racers:
        p.join(10)
    taken = sorted(rid for _, rids in won for rid in rids)
    assert taken == sorted(ids)  # every request claimed once, none twice, though the locks never excluded
    assert sum(1 for _, rids in won if rids) >= 2
    claimed = list((backing / "requests" / ".claims").glob("*.request"))
    assert len(claimed) == len(ids) and len(list((backing / "requests" / ".claims").glob("*.claim"))) == len(ids)


def test_two_supervisors_on_two_sshfs_mounts_answer_each_request_once(sshfs_mounts, cache_dir):
    backing, mounts = sshfs_mounts
    requests = backing / "requests"
    requests.mkdir()
    counter = CreateCounter(requests, (".back", ".error"))
    pools = [Pool(mount, cache_dir, "--gpus", "cpu", "--max-length", "40", "--max-batch", "4",
                  env={"GLMPOOL_HOST_ID": f"sshfs{i}"}, name=f"sshfs{i}") for i, mount in enumerate(mounts)]
    count = 80
    try:
        for p in pools:
            p.start()
        for p in pools:
            p.wait_running(180)
        for i in range(count):
            if i % 2:
                (requests / f"s{i}.history").write_text("\n")
                (requests / f"s{i}.request").write_text(f"question number {i}\n")
            else:
                json_request(backing, f"s{i}", {"query": f"question number {i}", "max_new_tokens": 6})
        assert all(outcome(backing, f"s{i}", 240)[0] == "back" for i in range(count))
        hosts = [meta(backing, f"s{i}")["host"] for i in range(count)]
        assert set(hosts) == {"sshfs0", "sshfs1"}, hosts  # both took part
        (backing / "flags" / "quit.flag").touch()
        assert [p.wait_exit(60) for p in pools] == [0, 0]
    finally:
        for p in pools:
            p.kill()
        creates = counter.close()
    assert not counter.overflows
    assert [creates[f"s{i}.back"] for i in range(count)] == [1] * count, creates
    assert not any(name.endswith(".error") for name in creates)
    for p in pools:
        assert "already exists" not in p.output() and "dropping this late answer" not in p.output()
        assert "Traceback" not in p.output()
    assert not list((requests / ".claims").glob("[!.]*"))
