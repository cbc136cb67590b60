"""Deployment pieces: systemd units (systemd-analyze verify), sd_notify, Prometheus metrics."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from glmpool import metrics, notify

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = ["glmpool.service", "glmpool@.service"]
VENV_BIN = "/opt/glmpool/venv/bin/glmpool"


# ---------------------------------------------------------------- systemd units

def _directives(unit: Path) -> dict[str, list[str]]:
    """Section.Key -> values (systemd allows repeated keys, so configparser does not fit)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


@pytest.mark.parametrize("name", UNITS)
def test_unit_directives(name):
    d = _directives(DEPLOY / name)
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    assert one["Service.KillMode"] == "mixed"
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.User"] == "glmpool"
    assert one["Service.OOMPolicy"] == "continue"
    assert one["Service.ExecStart"].startswith(VENV_BIN + " serve --config /etc/glmpool/")
    if "@" in name:
        assert "/etc/glmpool/%i.toml" in one["Service.ExecStart"]
    for key in ("Unit.StartLimitIntervalSec", "Unit.StartLimitBurst", "Unit.RequiresMountsFor",
                "Service.WatchdogSec", "Service.TimeoutStartSec", "Service.TimeoutStopSec"):
        assert key in one, key
    # A configuration error (exit 2) is not retried; the start timeout is extended while loading (cli.py),
    # so it need not cover load_timeout, only the supervisor's own start.
    assert one["Service.RestartPreventExitStatus"] == "2"
    assert one["Service.TimeoutStartSec"] == "10min"
    assert one["Service.SystemCallFilter"] == "@system-service"
    assert one["Service.CacheDirectory"] == "glmpool"
    assert "HF_HOME=/var/cache/glmpool/huggingface" in d["Service.Environment"]  # inside CacheDirectory=
    # CUDA needs the device nodes: no PrivateDevices, a closed policy plus the NVIDIA devices.
    assert "Service.PrivateDevices" not in d
    assert "Service.MemoryDenyWriteExecute" not in d
    assert one["Service.DevicePolicy"] == "closed"
    allowed = {v.split()[0] for v in d["Service.DeviceAllow"]}
    assert {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset",
            "char-nvidia*"} <= allowed
    assert one["Service.ProtectSystem"] == "strict"
    assert "/srv/glmpool" in d["Service.ReadWritePaths"]
    assert one["Unit.RequiresMountsFor"] == "/srv/glmpool"
    for key in ("ProtectHome", "NoNewPrivileges", "PrivateTmp"):
        assert one[f"Service.{key}"] == "yes"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("LOUD SKIP: systemd-analyze is not installed, the units are NOT verified "
                    "(apt-get install systemd; .ci/run does this)")
    return tool


@pytest.mark.parametrize("name,load_as", [("glmpool.service", "glmpool.service"),
                                          ("glmpool@.service", "glmpool@gpu01.service"),
                                          ("glmpool-http.service", "glmpool-http.service")])
def test_systemd_analyze_verify(name, load_as, tmp_path):
    tool = _systemd_analyze()
    # verify insists that ExecStart exists: a temp copy runs a stub instead of the venv path.
    stub = tmp_path / "glmpool-stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (DEPLOY / name).read_text()
    assert text.count(VENV_BIN) == 1
    (tmp_path / name).write_text(text.replace(VENV_BIN, str(stub)))
    proc = subprocess.run([tool, "verify", "--man=no", load_as], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "Failed to initialize manager" in proc.stderr:
        pytest.skip(f"LOUD SKIP: systemd-analyze cannot run here: {proc.stderr.strip()}")
    # Unknown keys and unparsable values are only warnings (exit 0): fail on any mention of the unit.
    problems = [line for line in proc.stderr.splitlines() if "glmpool" in line]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_sysusers_file_creates_the_account_the_units_run_as(tmp_path):
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("LOUD SKIP: systemd-sysusers is not installed, deploy/glmpool.sysusers is NOT checked")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([tool, f"--root={tmp_path}", str(DEPLOY / "glmpool.sysusers")], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in proc.stderr.splitlines() if not line.startswith("Creating ")]
    assert proc.returncode == 0 and not complaints, proc.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert users["glmpool"][2:4] == ["970", "970"]  # the ids deploy/README.md asks for on every host
    assert "glmpool:x:970:" in (tmp_path / "etc" / "group").read_text()


def test_http_unit_runs_the_gateway_on_the_pools_config():
    d = _directives(DEPLOY / "glmpool-http.service")
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.ExecStart"] == VENV_BIN + " http --config /etc/glmpool/glmpool.toml"
    assert one["Service.Type"] == "notify" and one["Service.User"] == "glmpool"
    assert one["Unit.RequiresMountsFor"] == "/srv/glmpool" and "/srv/glmpool" in d["Service.ReadWritePaths"]
    assert one["Service.PrivateDevices"] == "yes"  # no GPU


# ---------------------------------------------------------------- sd_notify

NOTIFY_SCRIPT = """
import json, os
from glmpool import notify
out = {
    "enabled": notify.enabled(),
    "interval": notify.watchdog_interval(),
    "status": notify.status("loading model\\non 2 workers"),
    "ready": notify.ready("running: 2 workers"),
    "watchdog": notify.watchdog(),
    "extend": notify.extend_timeout(90),
    "stopping": notify.stopping(),
    "pid": os.getpid(),
}
if REPEAT:
    notify.SEND_TIMEOUT = 0.05
    out = {"sent": sum(notify.status(f"tick {i}") for i in range(REPEAT))}
print(json.dumps(out))
"""


def _run_notify(env_extra: dict[str, str], repeat: int = 0) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", f"REPEAT = {repeat}\n" + NOTIFY_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _datagrams(sock: socket.socket) -> list[list[str]]:
    sock.settimeout(0.2)
    got = []
    while True:
        try:
            got.append(sock.recv(4096).decode().split("\n"))
        except socket.timeout:
            return got


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_protocol_over_real_socket(abstract):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"glmpool-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            env_addr = "@" + name
            tmpdir = None
        else:
            # A short directory: AF_UNIX paths are limited to 108 bytes.
            tmpdir = tempfile.mkdtemp(prefix="gp", dir="/tmp")
            env_addr = os.path.join(tmpdir, "notify")
            sock.bind(env_addr)
        try:
            out = _run_notify({"NOTIFY_SOCKET": env_addr, "WATCHDOG_USEC": "4000000"})
            got = _datagrams(sock)
        finally:
            if tmpdir:
                shutil.rmtree(tmpdir)
    assert out["enabled"] is True
    assert out["interval"] == pytest.approx(2.0)  # half of WATCHDOG_USEC
    assert all(out[k] for k in ("status", "ready", "watchdog", "extend", "stopping"))
    assert got == [
        ["STATUS=loading model on 2 workers"],  # a newline in a value never starts a new field
        ["READY=1", "STATUS=running: 2 workers"],
        ["WATCHDOG=1"],
        ["EXTEND_TIMEOUT_USEC=90000000"],
        ["STOPPING=1"],
    ]


def test_notify_without_systemd_is_a_noop():
    out = _run_notify({})
    assert out["enabled"] is False and out["interval"] is None
    assert not any(out[k] for k in ("status", "ready", "watchdog", "extend", "stopping"))


def test_notify_never_raises_on_a_dead_socket(tmp_path):
    # Socket path with nobody listening, and an unsupported address form.
    for addr in (str(tmp_path / "gone"), "vsock:2:1234", "@"):
        out = _run_notify({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "nonsense"})
        assert not any(out[k] for k in ("status", "ready", "watchdog", "extend", "stopping"))
        assert out["interval"] is None


def test_notify_never_blocks_on_a_listener_that_stopped_reading():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"glmpool-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        out = _run_notify({"NOTIFY_SOCKET": "@" + name}, repeat=40)  # beyond the socket's queue (10)
    assert out["sent"] < 40  # the rest dropped after SEND_TIMEOUT each, not waited for forever


def test_watchdog_only_for_the_watched_pid(monkeypatch):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"glmpool-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        monkeypatch.setenv("WATCHDOG_USEC", "10000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert notify.watchdog_interval() == pytest.approx(5.0)
        # A spawned worker inherits the variables but is not the watched process.
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        assert notify.watchdog_interval() is None
        monkeypatch.setenv("WATCHDOG_USEC", "0")
        monkeypatch.delenv("WATCHDOG_PID")
        assert notify.watchdog_interval() is None


# ---------------------------------------------------------------- metrics

STATUS = {
    "status": "running", "host": 'gpu"01\\a\nb', "pid": 4321, "started": 1700000000.5,
    "version": "0.1.0", "model": "THUDM/chatglm-6b-int4",
    "queue": {"pending": 7, "in_progress": 3},
    "workers": [
        {"id": 0, "device": "cuda:0", "pid": 4400, "state": "RUNNING", "in_flight": 2, "served": 40,
         "failed": 1, "restarts": 0, "tokens_per_s": 31.25, "rss_bytes": 2_000_000_000,
         "gpu_memory_bytes": 6_000_000_000, "tokens_generated": 9000},
        {"id": 1, "device": "cuda:1", "pid": None, "state": "BACKOFF", "in_flight": 0, "served": 2,
         "failed": 0, "restarts": 3, "tokens_per_s": None, "rss_bytes": None,
         "gpu_memory_bytes": None, "tokens_generated": 100},
        {"id": 1, "device": "cuda:1", "state": "RUNNING", "served": 99},   # duplicate: dropped
    ],
    "gpus": [{"device": "GPU-0a", "memory_used": 7_000_000_000, "memory_total": 24_000_000_000, "workers": [0]},
             {"device": "GPU-1b", "memory_used": None, "memory_total": None, "workers": [1]}],
}

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_exposition(text: str) -> dict[tuple[str, tuple], float]:
    """Strict reader of the text format: returns {(name, labels): value}, asserting validity."""
    assert text.endswith("\n") and "\n\n" not in text
    helps, types, samples, done, current = set(), {}, {}, set(), None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps and name not in done, f"second HELP for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in types and name in helps
            types[name] = kind
            if current is not None:
                done.add(current)
            current = name
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, label_text, value = m.groups()
        assert name == current and name not in done, f"{name} not contiguous / lacks TYPE"
        if types[name] == "counter":
            assert name.endswith("_total")
        labels, pos = [], 0
        while label_text and pos < len(label_text):
            lm = _LABEL.match(label_text, pos)
            assert lm, f"bad labels in {line!r}"
            labels.append((lm.group(1), _unescape(lm.group(2))))
            pos = lm.end()
        assert len({k for k, _ in labels}) == len(labels)
        key = (name, tuple(sorted(labels)))
        assert key not in samples, f"duplicate series {key}"
        samples[key] = float(value)
    return samples


def test_render_is_valid_exposition():
    text = metrics.render(STATUS, {"pool": "gpu01"})
    samples = parse_exposition(text)
    host = STATUS["host"]

    def get(name, **labels):
        return samples[(name, tuple(sorted({"host": host, "pool": "gpu01", **labels}.items())))]

    assert get("glmpool_up") == 1
    assert get("glmpool_info", version="0.1.0", model="THUDM/chatglm-6b-int4") == 1
    assert get("glmpool_start_time_seconds") == 1700000000.5
    assert get("glmpool_status", status="running") == 1 and get("glmpool_status", status="stopping") == 0
    assert get("glmpool_queue_pending") == 7 and get("glmpool_queue_in_progress") == 3
    assert get("glmpool_requests_in_flight") == 2
    assert get("glmpool_requests_served_total") == 42  # the duplicate worker is dropped, not summed
    assert get("glmpool_requests_failed_total") == 1
    assert get("glmpool_tokens_generated_total") == 9100
    w0, w1 = {"worker": "0", "device": "cuda:0"}, {"worker": "1", "device": "cuda:1"}
    assert get("glmpool_worker_restarts_total", **w1) == 3
    assert get("glmpool_worker_state", state="backoff", **w1) == 1
    assert get("glmpool_worker_state", state="running", **w1) == 0
    assert get("glmpool_worker_gpu_memory_bytes", **w0) == 6e9
    assert get("glmpool_gpu_memory_used_bytes", gpu="GPU-0a") == 7e9
    assert get("glmpool_gpu_memory_total_bytes", gpu="GPU-0a") == 24e9
    assert not any(("gpu", "GPU-1b") in labels for _, labels in samples)  # a GPU NVML could not read
    assert get("glmpool_worker_resident_memory_bytes", **w0) == 2e9
    assert get("glmpool_worker_tokens_per_second", **w0) == 31.25
    assert get("glmpool_worker_requests_in_flight", **w0) == 2
    # Nulls (cpu-less numbers, a worker without a process) omit the series instead of failing.
    names_w1 = {n for (n, labels) in samples if ("worker", "1") in labels}
    assert "glmpool_worker_gpu_memory_bytes" not in names_w1
    assert "glmpool_worker_pid" not in names_w1


def test_render_is_defensive():
    assert parse_exposition(metrics.render({})) == {("glmpool_up", ()): 1, ("glmpool_info", ()): 1}
    odd = {"host": "h", "queue": None, "workers": [None, "x", {"served": "7", "in_flight": True,
                                                               "tokens_per_s": float("nan")}],
           "started": "2024-01-02T03:04:05+00:00", "pid": "12"}
    samples = parse_exposition(metrics.render(odd, {"bad-label": "x"}))
    assert samples[("glmpool_start_time_seconds", (("host", "h"),))] == 1704164645
    assert ("glmpool_supervisor_pid", (("host", "h"),)) not in samples
    assert ("glmpool_requests_served_total", (("host", "h"),)) not in samples
    nan = samples[("glmpool_worker_tokens_per_second",
                   (("device", ""), ("host", "h"), ("worker", "")))]
    assert math.isnan(nan)


def test_textfile_is_replaced_atomically(tmp_path, monkeypatch):
    target = tmp_path / "glmpool.prom"
    statuses = [STATUS, {**STATUS, "workers": STATUS["workers"] + [
        {"id": i, "device": f"cuda:{i}", "state": "RUNNING", "served": i} for i in range(2, 100)]}]
    texts = [metrics.render(status) for status in statuses]
    m = metrics.Metrics(path=target)
    m.update(statuses[0])
    assert target.read_text() == texts[0]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by node_exporter's user
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(target.read_text())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            m.update(statuses[i % 2])
    finally:
        stop.set()
        t.join()
    assert seen <= set(texts)  # never a partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glmpool.prom"]

    # A failed rename leaves the old file intact and no temp file behind, and is logged, not raised.
    def broken_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", broken_rename)
    m.update(statuses[0])
    assert target.read_text() == texts[1] and len(list(tmp_path.iterdir())) == 1


def test_metrics_update_never_raises_on_missing_dir(tmp_path, caplog):
    m = metrics.Metrics(path=tmp_path / "no" / "such" / "dir.prom")
    m.update(STATUS)
    m.update(STATUS)
    assert sum("not written" in r.message for r in caplog.records) == 1  # logged once


def test_http_endpoint(tmp_path):
    m = metrics.Metrics(path=tmp_path / "glmpool.prom", port=0)
    try:
        assert m.server is not None and m.port > 0
        m.update(STATUS)
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            body = r.read().decode()
        assert body == metrics.render(STATUS) == (tmp_path / "glmpool.prom").read_text()
        parse_exposition(body)
        assert m.server.server_address[0] == "127.0.0.1"  # bound to loopback only
    finally:
        m.close(remove_file=True)
    assert not (tmp_path / "glmpool.prom").exists()


def test_http_port_in_use_is_logged_not_raised(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        m = metrics.Metrics(port=busy.getsockname()[1])
        assert m.server is None
        assert any("not started" in r.message for r in caplog.records)
        m.update(STATUS)
        m.close()


# ---------------------------------------------------------------- example configuration

def _example_lines() -> dict[str, tuple[str, str]]:
    """setting -> (kind, 'key = value' text); kind: active, default ('# k = v') or example ('#   k = v')."""
    found: dict[str, tuple[str, str]] = {}
    for line in (DEPLOY / "glmpool.toml").read_text().splitlines():
        m = re.match(r"^(#   |# |)([a-z_]+) = (.*)$", line)
        if m:
            kind = {"": "active", "# ": "default", "#   ": "example"}[m.group(1)]
            assert m.group(2) not in found, f"{m.group(2)} shown twice"
            found[m.group(2)] = (kind, f"{m.group(2)} = {m.group(3)}")
    return found


def test_example_config_matches_the_declarations(tmp_path):
    import argparse
    import tomllib

    from glmpool import config
    lines = _example_lines()
    assert set(lines) == {s.name for s in config.SETTINGS}  # every setting, nothing else
    # The file as shipped loads, and what the units assume holds.
    path = tmp_path / "glmpool.toml"
    path.write_text((DEPLOY / "glmpool.toml").read_text())
    shipped = config.resolve(argparse.Namespace(config=str(path)), environ={})
    assert shipped.dir == "/srv/glmpool"  # RequiresMountsFor= / ReadWritePaths=
    assert shipped.cache_dir is None  # the standard cache, under the unit's HF_HOME in its CacheDirectory=
    # Every line uncommented is valid too, and "# key = value" lines really show the default.
    path.write_text("\n".join(text for _, text in lines.values()) + "\n")
    everything = config.resolve(argparse.Namespace(config=str(path)), environ={})
    for name, (kind, text) in lines.items():
        if kind == "default":
            assert getattr(everything, name) == config.BY_NAME[name].default, text
        assert getattr(everything, name) == config.BY_NAME[name].parse(tomllib.loads(text)[name])
