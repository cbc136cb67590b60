"""systemd readiness and watchdog notifications (sd_notify) over ``$NOTIFY_SOCKET``.

The protocol is one newline-separated ``KEY=VALUE`` datagram per call, sent on an ``AF_UNIX``
datagram socket whose address systemd puts in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace). Outside systemd the variable is absent and every function here is a no-op.

Every function returns True when a datagram was sent and False otherwise; none raises: a broken
notification channel must never take the supervisor down (systemd then acts on its own timeouts).

Call these only from the supervisor process. The units use ``NotifyAccess=main``, so a datagram
from a worker would be dropped by systemd anyway; ``watchdog_interval()`` also honours
``$WATCHDOG_PID``, so a spawned worker that inherited the environment sees no watchdog.

Typical use in the supervisor::

    notify.status("loading model on 2 workers")
    ...                                      # model loaded
    notify.ready("running: 2 workers")
    every = notify.watchdog_interval()       # seconds, or None
    while serving:
        ...
        if every and now - last_ping >= every:
            notify.watchdog()
    notify.stopping()
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

SEND_TIMEOUT = 0.5  # seconds a datagram may wait for room in the listener's queue

__all__ = [
    "enabled", "send", "ready", "status", "stopping", "reloading", "watchdog",
    "watchdog_interval", "extend_timeout",
]


def _address() -> str | bytes | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return b"\0" + addr[1:].encode()
    if addr.startswith("/"):
        return addr
    # Newer systemd may hand out vsock: addresses (VMs); not needed on a GPU host.
    log.debug("unsupported NOTIFY_SOCKET address %r; notifications disabled", addr)
    return None


def enabled() -> bool:
    """True when a usable ``$NOTIFY_SOCKET`` is set (i.e. running as a Type=notify unit)."""
    return _address() is not None


def send(*fields: str) -> bool:
    """Send raw ``KEY=VALUE`` fields as one datagram; True when it was sent."""
    addr = _address()
    if addr is None or not fields:
        return False
    # A newline inside a value would start a new field: flatten it.
    payload = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)  # a listener that stopped reading must not stall the supervisor
            sock.sendto(payload, addr)
        return True
    except Exception as exc:  # never raise into the supervisor's loop
        log.debug("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def ready(text: str | None = None) -> bool:
    """``READY=1`` (with an optional ``STATUS=``): start-up is complete, systemd may proceed."""
    fields = ["READY=1"]
    if text:
        fields.append(f"STATUS={text}")
    return send(*fields)


def status(text: str) -> bool:
    """``STATUS=``: one line shown by ``systemctl status``."""
    return send(f"STATUS={text}")


def stopping(text: str | None = None) -> bool:
    """``STOPPING=1``: shutdown has begun (in-flight work is finishing)."""
    fields = ["STOPPING=1"]
    if text:
        fields.append(f"STATUS={text}")
    return send(*fields)


def reloading() -> bool:
    """``RELOADING=1`` (not used by glmpool today; here for completeness)."""
    return send("RELOADING=1")


def watchdog() -> bool:
    """``WATCHDOG=1``: the keep-alive ping; send it every ``watchdog_interval()`` seconds."""
    return send("WATCHDOG=1")


def extend_timeout(seconds: float, text: str | None = None) -> bool:
    """``EXTEND_TIMEOUT_USEC=`` (with an optional ``STATUS=``): ask for more start/stop time (e.g. while a
    model downloads or loads)."""
    fields = [f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}"]
    if text:
        fields.append(f"STATUS={text}")
    return send(*fields)


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is expected from this process.

    Half of ``$WATCHDOG_USEC``, as systemd recommends, so one late loop iteration is not fatal.
    ``$WATCHDOG_PID`` (when set) must be this process: children inherit the variables, but only
    the main process is watched.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        pid = os.environ.get("WATCHDOG_PID")
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0 or not enabled():
        return None
    return usec / 2_000_000
