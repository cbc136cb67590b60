"""Wake up when the request directory changes: inotify where the kernel offers it, polling otherwise.

inotify only sees changes made through this kernel: on NFS, other hosts' writes still come from the
periodic scan (poll_interval), which is why the supervisor always scans at that interval too.
"""
from __future__ import annotations

import ctypes
import logging
import os
import select
from pathlib import Path

log = logging.getLogger(__name__)

IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_DELETE_SELF, IN_MOVE_SELF = 0x8, 0x80, 0x100, 0x400, 0x800
IN_NONBLOCK = os.O_NONBLOCK


class DirWatch:
    def __init__(self, directory: Path):
        self.directory = directory
        self.fd: int | None = None
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            fd = self._libc.inotify_init1(IN_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            self.fd = fd
            self._add()
        except (OSError, AttributeError) as error:
            log.info("inotify unavailable (%s): polling %s", error, directory)
            self.close()

    def _add(self) -> None:
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
        if self._libc.inotify_add_watch(self.fd, os.fsencode(self.directory), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {self.directory}")

    def changed(self) -> bool:
        """True if something happened since the last call (always True without inotify)."""
        if self.fd is None:
            return True
        readable, _, _ = select.select([self.fd], [], [], 0)
        if not readable:
            return False
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        if not self.directory.is_dir():  # deleted: the scan recreates it; watch the new one next time
            return True
        try:
            self._add()  # idempotent for the same directory; re-arms after a delete + recreate
        except OSError:
            pass
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
