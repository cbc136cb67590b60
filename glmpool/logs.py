"""Logging of the supervisor and its workers: one format, to standard error.

- plain, on a terminal or into a file: `[Info 2024-01-01 12:00:00]: message`, the original server's console
  style (its `Loaded.` and `Running...` lines come out exactly as it printed them);
- plain under systemd ($JOURNAL_STREAM names standard error): `<6>message`, each line behind the
  syslog priority journald reads (`journalctl -p warning`), without a timestamp of our own (journald
  stamps every line);
- json: one object per line (time, level, logger, message; the traceback under "exception"), behind
  the same `<N>` prefix under systemd.
A worker's lines say which worker wrote them ("worker 0: ..." in plain, "worker": 0 in JSON).
"""
from __future__ import annotations

import json
import logging
import os
import sys

PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def to_journal(stream) -> bool:
    """True when `stream` is the journal connection systemd describes in $JOURNAL_STREAM (device:inode)."""
    try:
        device, inode = map(int, os.environ.get("JOURNAL_STREAM", "").split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def priority(record: logging.LogRecord) -> int:
    return PRIORITIES.get(record.levelno, 7 if record.levelno < logging.INFO else 3)


class PlainFormatter(logging.Formatter):
    def __init__(self, journal: bool = False, worker: int | None = None):
        super().__init__()
        self.journal, self.prefix = journal, "" if worker is None else f"worker {worker}: "

    def format(self, record: logging.LogRecord) -> str:
        text = self.prefix + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:  # every line of a traceback keeps the priority
            return "\n".join(f"<{priority(record)}>{line}" for line in text.split("\n"))
        return f"[{record.levelname.title()} {self.formatTime(record, '%Y-%m-%d %H:%M:%S')}]: {text}"


class JSONFormatter(logging.Formatter):
    def __init__(self, journal: bool = False, worker: int | None = None):
        super().__init__()
        self.journal, self.worker = journal, worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": record.created, "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(entry, ensure_ascii=False)
        return f"<{priority(record)}>{line}" if self.journal else line


def setup(level: str = "INFO", fmt: str = "plain", worker: int | None = None) -> None:
    """Route every logger (and Python warnings) to standard error in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    journal = to_journal(sys.stderr)
    handler.setFormatter(JSONFormatter(journal, worker) if fmt == "json" else PlainFormatter(journal, worker))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
