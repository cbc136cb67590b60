"""Logs as journald sees them: one format for the supervisor and its workers, on standard error, with a
`<N>` priority on every line under systemd and no second timestamp; tracebacks kept in JSON; the
original server's console lines unchanged elsewhere."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

from pooltools import ENV, FAST, GLMPOOL, wait_for


def journal_env(stream) -> dict:
    """$JOURNAL_STREAM as systemd sets it: the device and inode of the service's standard error."""
    info = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def listen(sock, got: list) -> None:
    """Read datagrams as systemd does, promptly, until the socket is closed."""
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except OSError:
            return


def test_the_pool_under_systemd(tmp_path, cache_dir):
    """Every line the supervisor and its worker write carries a priority; warnings are <4>; systemd's
    start timeout is extended while the model loads, then READY=1."""
    spool = tmp_path / "spool"
    short = tempfile.mkdtemp(prefix="gp", dir="/tmp")  # AF_UNIX paths are limited to 108 bytes
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(short, "notify"))
    sent: list[str] = []
    listener = threading.Thread(target=listen, args=(notify, sent), daemon=True)
    listener.start()
    journal, stdout = open(tmp_path / "journal", "w+b"), open(tmp_path / "stdout", "w+b")
    env = {**ENV, **journal_env(journal), "NOTIFY_SOCKET": os.path.join(short, "notify")}
    serve = subprocess.Popen(GLMPOOL + [*FAST, "--cache-dir", str(cache_dir), "--dir", str(spool), "--gpus", "cpu"],
                             stdout=stdout, stderr=journal, env=env, start_new_session=True)
    text = lambda: (tmp_path / "journal").read_text()  # noqa: E731
    try:
        wait_for(lambda: "Running..." in text() or serve.poll() is not None, 90, "Running...")
        (spool / "requests" / "bad.json").write_text("{not json\n")
        wait_for(lambda: (spool / "requests" / "bad.error").exists(), 30, "the bad request failed")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
        notify.shutdown(socket.SHUT_RDWR)
        notify.close()
        listener.join(5)
        shutil.rmtree(short)
        journal.close()
        stdout.close()
    lines = text().splitlines()
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), text()
    assert "<6>Loaded." in lines and "<6>Running..." in lines  # journald stamps them: no second time
    assert not any("[Info" in line or "[Warning" in line for line in lines)
    assert any(line.startswith("<4>worker 0: model tiny-random has random weights") for line in lines)
    assert any(line.startswith("<4>request bad failed") for line in lines)
    assert (tmp_path / "stdout").read_text() == ""  # everything on standard error
    ready = next(i for i, d in enumerate(sent) if d.startswith("READY=1"))
    assert any(d.startswith("EXTEND_TIMEOUT_USEC=") for d in sent[:ready]), sent


SCRIPT = """
import logging, sys
from glmpool import logs
logs.setup("INFO", sys.argv[1], worker=int(sys.argv[2]) if len(sys.argv) > 2 else None)
log = logging.getLogger("glmpool")
log.info("Loaded.")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("it broke")
"""


def log_lines(tmp_path, *args, journal: bool) -> list[str]:
    with open(tmp_path / "stderr", "w+b") as stderr:
        subprocess.run([sys.executable, "-c", SCRIPT, *args], stderr=stderr, timeout=60, check=True,
                       env={**ENV, **(journal_env(stderr) if journal else {})})
    return (tmp_path / "stderr").read_text().splitlines()


def test_json_keeps_the_traceback_and_the_priority(tmp_path):
    lines = log_lines(tmp_path, "json", "3", journal=True)
    assert [line[:3] for line in lines] == ["<6>", "<3>"]
    loaded, broke = (json.loads(line[3:]) for line in lines)
    assert loaded["message"] == "Loaded." and loaded["worker"] == 3 and loaded["level"] == "info"
    assert broke["message"] == "it broke" and broke["level"] == "error"
    assert broke["exception"].startswith("Traceback") and "ZeroDivisionError" in broke["exception"]
    off_journal = log_lines(tmp_path, "json", journal=False)
    assert [json.loads(line)["message"] for line in off_journal] == ["Loaded.", "it broke"]


def test_plain_lines_off_systemd_are_the_original_servers(tmp_path):
    lines = log_lines(tmp_path, "plain", journal=False)
    assert re.fullmatch(r"\[Info \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]: Loaded\.", lines[0]), lines
    assert re.fullmatch(r"\[Error [-\d: ]+\]: it broke", lines[1]) and lines[2] == "Traceback (most recent call last):"
    journal = log_lines(tmp_path, "plain", journal=True)
    assert journal[0] == "<6>Loaded." and all(line.startswith("<3>") for line in journal[1:])
    assert journal[-1] == "<3>ZeroDivisionError: division by zero"


def test_a_journal_stream_that_is_not_standard_error_is_ignored(tmp_path):
    with open(tmp_path / "other", "wb") as other:
        env = journal_env(other)
    with open(tmp_path / "stderr", "w+b") as stderr:
        subprocess.run([sys.executable, "-c", SCRIPT, "plain"], stderr=stderr, timeout=60, check=True, env={**ENV, **env})
    assert (tmp_path / "stderr").read_text().startswith("[Info ")  # a terminal under systemd-run, say
