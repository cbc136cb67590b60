"""Wake up when the spool changes: inotify where the kernel offers it, polling otherwise.

inotify only sees changes made through this kernel: on NFS, other hosts' writes still come from the
periodic scan (poll_interval), which is why the supervisor always scans at that interval too.
The supervisor waits on fileno() together with its workers' pipes, so a new request wakes it at once.
"""
from __future__ import annotations

import ctypes
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW = \
    0x8, 0x80, 0x100, 0x400, 0x800, 0x4000
IN_NONBLOCK = os.O_NONBLOCK
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class DirWatch:
    """inotify on a few directories; changed() reports only events about names we care about
    (the supervisor's own .partial/.back writes would otherwise wake it for nothing)."""

    def __init__(self, *directories: Path, suffixes: tuple[str, ...] = ()):
        self.directories = directories
        self.suffixes = suffixes  # empty: every name counts
        self.fd: int | None = None
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            fd = self._libc.inotify_init1(IN_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            self.fd = fd
            self.rearm()
        except (OSError, AttributeError) as error:
            log.info("inotify unavailable (%s): polling", error)
            self.close()

    def rearm(self) -> None:
        """Watch the directories (idempotent; after a directory was deleted and recreated, watches the new one)."""
        if self.fd is None:
            return
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
        for directory in self.directories:
            if self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")

    def fileno(self) -> int | None:
        """Readable when something changed (None without inotify)."""
        return self.fd

    def changed(self) -> bool:
        """True if something we care about happened since the last call (always True without inotify)."""
        names = self.names()
        return names is None or bool(names)

    def names(self) -> list[str] | None:
        """The names we care about that changed since the last call, or None when anything may have
        changed (no inotify, events lost to an overflow, a watched directory deleted or moved)."""
        if self.fd is None:
            return None
        data = b""
        try:
            while chunk := os.read(self.fd, 65536):
                data += chunk
        except BlockingIOError:
            pass
        names: list[str] | None = []
        offset = 0
        while offset + EVENT.size <= len(data):
            _, mask, _, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size:offset + EVENT.size + length].rstrip(b"\0")
            offset += EVENT.size + length
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_Q_OVERFLOW):
                names = None
                try:
                    self.rearm()
                except OSError:  # gone for now: the scan recreates it and rearms
                    pass
            elif names is not None:
                text = os.fsdecode(name)  # surrogateescape: an undecodable name is its own bytes, as ids are
                if not self.suffixes or text.endswith(self.suffixes):
                    names.append(text)
        return names

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
