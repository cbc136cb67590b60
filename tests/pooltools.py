"""Running real pools in tests: a supervisor subprocess in its own process group, always cleaned up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parent.parent)
# Subprocesses run in the spool directory, so without this they would import whatever glmpool is
# installed in site-packages instead of this checkout.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
GLMPOOL = [sys.executable, "-c", "import sys; from glmpool.cli import main; sys.exit(main())"]
# One torch thread per worker: on the tiny model, threads only add synchronisation (5x slower on 2 cores).
FAST = ("--model", "tiny-random", "--poll-interval", "0.2", "--worker-threads", "1")


def wait_for(predicate, timeout: float, what: str):
    from glmpool.selftest import wait_for as poll
    return poll(predicate, timeout, what, AssertionError)


def glmpool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The `glmpool` command, run to completion."""
    return subprocess.run(GLMPOOL + list(args), capture_output=True, text=True, timeout=timeout, env=ENV)


class Pool:
    """`glmpool serve` on `root` in its own session, so kill() reaches the supervisor and its workers."""

    def __init__(self, root: Path, cache_dir: Path, *args: str, env: dict | None = None, name: str = "pool"):
        self.root = root
        self.log_path = root / f"{name}.log"
        self.cmd = GLMPOOL + [*FAST, "--cache-dir", str(cache_dir), "--dir", str(root), *args]
        self.env = {**ENV, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> "Pool":
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True, cwd=self.root)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_running(self, timeout: float = 90) -> "Pool":
        wait_for(lambda: "Running..." in self.output() or self.process.poll() is not None, timeout, "Running...")
        assert self.process.poll() is None, self.output()
        return self

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # the supervisor and its workers
            except ProcessLookupError:
                pass
            self.process.wait(10)
            self.log.close()

    def status(self, timeout: float = 15) -> dict:
        from glmpool import client
        return client.status(self.root, timeout)


def seed_request(root: Path, rid: str, question: str, history: str = "") -> None:
    """Exactly what the original clients do: plain shell redirections, history first."""
    requests = root / "requests"
    requests.mkdir(parents=True, exist_ok=True)
    subprocess.run(["sh", "-c", f"echo '{history}' > {rid}.history; echo '{question}' > {rid}.request"],
                   cwd=requests, check=True)


def json_request(root: Path, rid: str, body: dict) -> None:
    from glmpool.spool import atomic_write
    (root / "requests").mkdir(parents=True, exist_ok=True)
    atomic_write(root / "requests" / f"{rid}.json", json.dumps(body, ensure_ascii=False))


def outcome(root: Path, rid: str, timeout: float = 60) -> tuple[str, str]:
    """("back" | "error", text) once the request has been answered."""
    requests = root / "requests"

    def done():
        for kind in ("back", "error"):
            path = requests / f"{rid}.{kind}"
            if path.exists():
                return kind, path.read_text(encoding="utf-8")
        return None
    return wait_for(done, timeout, f"an answer to {rid}")


def meta(root: Path, rid: str) -> dict:
    return json.loads((root / "requests" / f"{rid}.meta").read_text(encoding="utf-8"))


class Gateway:
    """`glmpool http` on `root` (any free port on 127.0.0.1), in its own session; url once listening."""

    def __init__(self, root: Path, *args: str, name: str = "gateway"):
        self.root = root
        self.log_path = root / f"{name}.log"
        self.cmd = GLMPOOL + ["http", "--dir", str(root), "--http-port", "0", "--poll-interval", "0.2", *args]
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 60) -> "Gateway":
        import re
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=ENV,
                                        start_new_session=True, cwd=self.root)
        found = wait_for(lambda: re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.output())
                         or self.process.poll() is not None, timeout, "the gateway listening")
        assert self.process.poll() is None, self.output()
        self.url = found.group(1)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **options):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=options.pop("api_key", "unused"),
                             max_retries=0, timeout=options.pop("timeout", 60), **options)

    def kill(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
            self.log.close()
