"""A Python client of the spool, used by `glmpool ask/status/quit` (and usable by any program)."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Callable

from . import spool


class ClientError(Exception):
    """The server answered with an .error, or nothing came in time; str() is the message."""


def submit(root: str | Path, query: str, history: list | None = None, request_id: str | None = None,
           params: dict | None = None) -> str:
    """Write a request the safe way (old outputs removed, inputs written atomically); return its id."""
    requests = Path(root) / "requests"
    requests.mkdir(parents=True, exist_ok=True)
    request_id = request_id or f"ask-{uuid.uuid4().hex[:12]}"
    for suffix in spool.OUTPUT_SUFFIXES:
        spool.remove(requests / f"{request_id}{suffix}")
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
    """The answer of `request_id`; streams `.partial` text to on_partial while it grows."""
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
    raise ClientError(f"no answer to {request_id} within {timeout:.0f}s (is glmpool running on {root}?)")


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
    raise ClientError(f"no status from {root} within {timeout:.0f}s (is glmpool running there?)")


def quit(root: str | Path) -> None:
    flags = Path(root) / "flags"
    flags.mkdir(parents=True, exist_ok=True)
    (flags / "quit.flag").touch()
