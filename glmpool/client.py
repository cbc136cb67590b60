"""A Python client of the spool, used by `glmpool ask/chat/status/quit` (and usable by any program).

    from glmpool import client
    answer = client.ask("/srv/glmpool", "你好")                   # submit, wait, clean up; ClientError on failure
    rid = client.submit("/srv/glmpool", "你好", history=[["q", "a"]], params={"max_new_tokens": 64})
    text = client.wait("/srv/glmpool", rid, timeout=60, on_partial=print)
    client.remove_results("/srv/glmpool", rid)                      # .back, .meta, .error, .partial
    client.cancel("/srv/glmpool", rid)                              # withdraw it, or stop its generation
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from . import spool

CANCEL_WAIT_SECONDS = 5.0  # after a cancel, how long ask() waits for the outcome it then removes


class ClientError(Exception):
    """The server answered with an .error, or nothing came in time; str() is the message."""


def submit(root: str | Path, query: str, history: list | None = None, request_id: str | None = None,
           params: dict | None = None) -> str:
    """Write a request the safe way (old outputs removed, inputs written atomically); return its id."""
    requests = Path(root) / "requests"
    requests.mkdir(parents=True, exist_ok=True)
    request_id = request_id or f"ask-{uuid.uuid4().hex[:12]}"
    remove_results(root, request_id)
    # Final newlines: the server takes a newline-terminated file at once (the completeness rule).
    if params:
        body = {"query": query, "history": history or [], **params}
        spool.atomic_write(requests / f"{request_id}.json", json.dumps(body, ensure_ascii=False) + "\n")
    else:
        spool.atomic_write(requests / f"{request_id}.history", json.dumps(history or [], ensure_ascii=False) + "\n")
        spool.atomic_write(requests / f"{request_id}.request", query + "\n")
    return request_id


def wait(root: str | Path, request_id: str, timeout: float = 600.0,
         on_partial: Callable[[str], None] | None = None, poll: float = 0.05) -> str:
    """The answer of `request_id`; streams `.partial` text to on_partial while it grows. ClientError with
    the error's first line, or when nothing came within `timeout` (saying whether any pool is alive)."""
    requests = Path(root) / "requests"
    deadline = time.monotonic() + timeout
    shown = None
    while time.monotonic() < deadline:
        back = requests / f"{request_id}.back"
        if back.exists():
            return back.read_text(encoding="utf-8")
        error = requests / f"{request_id}.error"
        if error.exists():
            raise ClientError(error.read_text(encoding="utf-8").split("\n", 1)[0])
        if on_partial is not None:
            try:
                partial = (requests / f"{request_id}.partial").read_text(encoding="utf-8")
            except OSError:
                partial = None
            if partial is not None and partial != shown:
                on_partial(partial)
                shown = partial
        time.sleep(poll)
    raise ClientError(f"no answer to {request_id} within {timeout:g}s ({pool_state(root)})")


def cancel(root: str | Path, request_id: str) -> bool:
    """Withdraw a request: its inputs are removed while no supervisor has claimed them (True); once claimed,
    a `.cancel` asks the pool to stop it, and it ends with an `.error` "the request was cancelled" (False).
    A request already answered is left alone (False)."""
    if answered(root, request_id):
        return False
    requests = Path(root) / "requests"
    withdrawn = False
    for suffix in (".json", ".request"):  # a claim renames the main input away: only one of us wins
        try:
            os.unlink(requests / f"{request_id}{suffix}")
            withdrawn = True
        except FileNotFoundError:
            pass
    spool.remove(requests / f"{request_id}.history")
    if not withdrawn:
        spool.touch(requests, f"{request_id}.cancel")
    return withdrawn


def remove_results(root: str | Path, request_id: str) -> None:
    """Remove what the pool wrote for `request_id` (.back, .meta, .error, .partial)."""
    for suffix in spool.OUTPUT_SUFFIXES:
        spool.remove(Path(root) / "requests" / f"{request_id}{suffix}")


def ask(root: str | Path, query: str, history: list | None = None, params: dict | None = None,
        timeout: float = 600.0, on_partial: Callable[[str], None] | None = None, keep: bool = False) -> str:
    """Submit, wait and return the answer. Whatever stops the wait (an .error, the timeout, Ctrl-C or any
    other exception) cancels the request, so it does not keep a worker busy; its result files are
    removed unless `keep`."""
    request_id = submit(root, query, history, params=params)
    try:
        return wait(root, request_id, timeout, on_partial)
    finally:
        if not answered(root, request_id) and not cancel(root, request_id) and live_pools(root):
            deadline = time.monotonic() + CANCEL_WAIT_SECONDS  # the cancelled outcome, to remove it too
            while not answered(root, request_id) and time.monotonic() < deadline:
                time.sleep(0.05)
        if not keep:
            remove_results(root, request_id)


def answered(root: str | Path, request_id: str) -> bool:
    """The pool published an outcome (.back or .error) for `request_id`."""
    return any((Path(root) / "requests" / f"{request_id}{suffix}").exists() for suffix in (".back", ".error"))


def live_pools(root: str | Path) -> list[dict]:
    """The heartbeats (status documents) of the supervisors alive on `root`."""
    found = []
    for path in spool.live_heartbeats(Path(root) / "flags", f"client-{socket.gethostname()}"):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            found.append({})
    return found


def pool_state(root: str | Path) -> str:
    """Why nothing came: no pool alive, or the pools' queue."""
    pools = live_pools(root)
    if not pools:
        return f"is glmpool running on {Path(root).resolve()}? no supervisor has a heartbeat there"
    pending = sum(p.get("queue", {}).get("pending", 0) for p in pools)
    busy = sum(p.get("queue", {}).get("in_progress", 0) for p in pools)
    return f"{len(pools)} supervisor(s) alive and busy: {busy} in progress, {pending} pending"


def status(root: str | Path, timeout: float = 10.0) -> dict:
    flags = Path(root) / "flags"
    flags.mkdir(parents=True, exist_ok=True)
    back = flags / "status.back"
    spool.remove(back)
    (flags / "status.flag").touch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(back.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            time.sleep(0.05)
    try:
        spool.remove(flags / "status.flag")
    except OSError:  # not ours to remove: a directory holding files (the server says so in its log)
        pass
    raise ClientError(f"no status from {Path(root).resolve()} within {timeout:g}s ({pool_state(root)})")


def quit(root: str | Path) -> int:
    """Ask every supervisor on `root` to stop; how many were alive (0: nothing was asked)."""
    pools = live_pools(root)
    if pools:
        flags = Path(root) / "flags"
        flags.mkdir(parents=True, exist_ok=True)
        (flags / "quit.flag").touch()
    return len(pools)
