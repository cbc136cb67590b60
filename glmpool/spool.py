"""The file protocol: names, parsing and validation of requests, atomic writing of results.

Layout under the spool root:
    requests/<id>.request + <id>.history   seed form (question; empty or JSON [[q, a], ...] history)
    requests/<id>.json                      JSON form: {"query": ..., "history": ..., parameters}
    requests/<id>.back                      the answer (UTF-8), appears atomically
    requests/<id>.meta                      JSON detail of the answer (history, tokens, timings, worker)
    requests/<id>.partial                   the answer so far while generating
    requests/<id>.error                     failure: a sentence, then JSON detail; inputs go to failed/
    requests/<id>.cancel                    a client asks to stop generating
    requests/failed/                        inputs of failed requests, never silently deleted
    requests/.claims/                       claimed inputs (see claims.py)
    flags/quit.flag, flags/status.flag -> flags/status.back

Which request each file keyed by an id belongs to (ids are reused) is claims.py's rule.

Pure functions except for the small, explicit read/write helpers at the bottom; the supervisor is
the only caller that touches the spool.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

INPUT_SUFFIXES = (".request", ".history", ".json")
OUTPUT_SUFFIXES = (".back", ".meta", ".error", ".partial")
MAX_INPUT_BYTES = 1 << 20  # 1 MiB: far beyond any prompt the model window takes
# The longest id a `<id>.request` name (255 bytes, NAME_MAX) allows: then every name of the protocol,
# `.partial` and `.history` included, fits too. A longer id (only `.json` allows one) is refused.
MAX_ID_BYTES = 255 - len(".request")
MAX_HISTORY_DEPTH = 3  # [[q, a], ...]
SETTLE_SECONDS = 0.5  # a file unchanged this long is complete even without a final newline
HISTORY_GRACE_SECONDS = 1.0  # a missing .history counts as empty once the .request is this old
HOST_BEAT_SECONDS = 1.0  # a supervisor rewrites flags/.hosts/<host>.<pid>.json this often
HOST_FRESH_SECONDS = 10 * HOST_BEAT_SECONDS  # a heartbeat younger than this (spool clock) is a live supervisor
STRAY_SECONDS = 60.0  # a .cancel or .history that belongs to no request is cleared away once this old
JSON_PARAMETERS = {"max_length": int, "max_new_tokens": int, "top_p": float, "temperature": float,
                   "do_sample": bool, "seed": int, "top_k": int, "priority": int, "timeout": float}


class RequestError(Exception):
    """The request itself is bad (permanent): str() is the human sentence for the .error file."""


class NotReady(Exception):
    """The request is still being written; look again later."""


class NotAFlag(Exception):
    """Something that is not a flag lies under a flag's name; str() says what."""


@dataclass
class Request:
    id: str
    query: str
    history: list = field(default_factory=list)
    params: dict = field(default_factory=dict)  # validated generation parameters
    priority: int = 0
    timeout: float | None = None
    arrived: float = 0.0  # input mtime: FIFO order


def split_name(name: str) -> tuple[str, str] | None:
    """(id, suffix) of a spool file name, or None for names that are not ours (temp files, dot files)."""
    if name.startswith("."):
        return None
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        return None
    return stem, "." + suffix


def valid_id(request_id: object) -> bool:
    """A plain name, as split_name() gives: ids from claim records are checked with this before any path
    is built from them (a forged record could name `../../etc/x`)."""
    return isinstance(request_id, str) and bool(request_id) and not request_id.startswith(".") \
        and "/" not in request_id and "\0" not in request_id \
        and len(os.fsencode(request_id)) <= MAX_ID_BYTES


def is_regular(path: Path) -> bool:
    """True only for a regular file reached without following a symlink."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def flag_set(path: Path) -> bool:
    """Whether the flag `path` is set: a regular file (what `touch` makes) or an empty directory. Anything
    else under a flag's name raises NotAFlag: a symlink, dangling or not (never followed, like a request's
    input), a fifo, a socket, a device, a directory that is not empty."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode):
        return True
    if stat.S_ISDIR(mode):
        try:
            with os.scandir(path) as entries:
                if next(entries, None) is None:
                    return True
        except OSError as error:
            raise NotAFlag(f"{path.name} is a directory that cannot be read ({error.strerror})") from None
        raise NotAFlag(f"{path.name} is a directory that is not empty")
    kind = "a symlink" if stat.S_ISLNK(mode) else "a fifo" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise NotAFlag(f"{path.name} is {kind}, not a flag")


def read_input(path: Path, now: float | None = None, name: str | None = None) -> str:
    """Text of one input file, refusing anything but a complete regular file of reasonable size.
    `name` is how errors call the file (a claimed input's path carries the claim token instead)."""
    now = time.time() if now is None else now
    name = name or path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RequestError(f"{name} is a symlink, which glmpool never follows") from None
        raise RequestError(f"{name} cannot be read: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RequestError(f"{name} is not a regular file")
        if info.st_size > MAX_INPUT_BYTES:
            raise RequestError(f"{name} is {info.st_size} bytes, over the {MAX_INPUT_BYTES}-byte limit")
        data = os.read(fd, info.st_size + 1)  # a byte more than fstat said: growth shows in the checks below
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if after.st_size != len(data) or after.st_mtime_ns != info.st_mtime_ns:
        raise NotReady(f"{name} is still growing")
    if not looks_complete(path.suffix, data, now - info.st_mtime):
        raise NotReady(f"{name} may still be being written")
    if b"\0" in data:
        raise RequestError(f"{name} contains NUL bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"{name} is not valid UTF-8 (byte {error.start})") from None


def read_request(request_id: str, main_path: Path, history_path: Path | None, now: float,
                 history_grace: bool = True) -> Request | None:
    """The request whose main input (.request or .json) is `main_path`; None while it is not complete
    yet (history_grace: a seed-form request waits HISTORY_GRACE_SECONDS for a missing .history).
    Raises NotReady, RequestError, or OSError (FileNotFoundError: someone else took it)."""
    main = main_path.suffix
    size = len(os.fsencode(request_id))
    if size > MAX_ID_BYTES:
        raise RequestError(f"the id is {size} bytes, over the {MAX_ID_BYTES}-byte limit "
                           "(every result name must fit in 255 bytes)")
    text = read_input(main_path, now, f"{request_id}{main}")
    if not text:  # what a client's `echo > x.request` leaves when its write fails (a full disk)
        raise RequestError(f"{request_id}{main} is empty (0 bytes): its write failed, or nothing was written")
    history_text = ""
    if main == ".request":
        if history_path is not None and os.path.lexists(history_path):
            history_text = read_input(history_path, now, f"{request_id}.history")
        elif history_grace and now - os.lstat(main_path).st_mtime < HISTORY_GRACE_SECONDS:
            return None  # the client may be about to write its history
    request = parse_request(request_id, main, text, history_text)
    request.arrived = os.lstat(main_path).st_mtime  # a rename into .claims/ keeps it
    return request


def looks_complete(suffix: str, data: bytes, age: float) -> bool:
    """The completeness rule for files written without rename: a final newline (what `echo` writes),
    a .json that already parses (a cut JSON object never does), or no change for SETTLE_SECONDS."""
    if data.endswith(b"\n") or age >= SETTLE_SECONDS:
        return True
    if suffix != ".json":
        return False
    try:
        json.loads(data)
        return True
    except (ValueError, RecursionError):
        return False


def parse_request(request_id: str, suffix: str, text: str, history_text: str = "") -> Request:
    """A Request from the text of its main input (.json or .request) and, for .request, its .history."""
    if suffix == ".json":
        return parse_json_request(request_id, text)
    return Request(request_id, text.rstrip("\n"), parse_history(history_text, f"{request_id}.history"))


def parse_history(text: str, source: str = "history") -> list:
    if not text.strip():
        return []
    return validate_history(load_json(text, source), source)


def validate_history(history, source: str = "history") -> list:
    if history is None:
        return []
    if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(s, str) for s in turn)
            for turn in history):
        raise RequestError(f"{source} must be a list of [question, answer] string pairs")
    return [[q, a] for q, a in history]


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    keys = set()
    for key, _ in pairs:
        if key in keys:
            raise _DuplicateKey(key)
        keys.add(key)
    return dict(pairs)


def load_json(text: str, source: str):
    """JSON from a client's file. A key given twice is an error: json.loads would keep the last one, so
    `{"max_new_tokens": -1, "max_new_tokens": 3}` would pass the checks that only one value meets."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as error:
        raise RequestError(f"{source} has the key {json.dumps(error.args[0], ensure_ascii=False)} twice") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise RequestError(f"{source} is not valid JSON: {str(error)[:100]}") from None


def parse_json_request(request_id: str, text: str) -> Request:
    body = load_json(text, f"{request_id}.json")
    if not isinstance(body, dict):
        raise RequestError(f"{request_id}.json must hold one JSON object")
    unknown = sorted(set(body) - {"query", "history"} - set(JSON_PARAMETERS))
    if unknown:
        raise RequestError(f"{request_id}.json has unknown keys: {', '.join(unknown)}")
    query = body.get("query")
    if not isinstance(query, str):
        raise RequestError(f"{request_id}.json needs \"query\" as a string")
    params = {}
    for key, kind in JSON_PARAMETERS.items():
        if key not in body:
            continue
        value = body[key]
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, int) and not isinstance(value, bool) if kind is int else
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok:
            raise RequestError(f"{request_id}.json: {key} must be {kind.__name__}, got {value!r}")
        if kind is int and not -2 ** 63 <= value < 2 ** 63:  # JSON ints are unbounded; torch's are 64-bit
            raise RequestError(f"{request_id}.json: {key} is out of range, got {value!r}")
        params[key] = value
    priority = params.pop("priority", 0)
    timeout = params.pop("timeout", None)
    if timeout is not None and timeout <= 0:
        raise RequestError(f"{request_id}.json: timeout must be positive, got {timeout!r}")
    return Request(request_id, query, validate_history(body.get("history"), f"{request_id}.json history"),
                   params, priority, timeout)


# --- writing: always a temp file in the same directory, then rename, so readers never see a part ---

@dataclass
class Staged:
    """A file written under a temporary name beside its final one, not yet in place."""
    path: Path
    temp: str
    fd: int | None  # open until placed or discarded

    def place(self, exclusive: bool = False) -> bool:
        """Put it in place atomically; exclusive=True never replaces an existing file (False then)."""
        self.close()
        try:
            if not exclusive:
                os.replace(self.temp, self.path)
                return True
            try:
                os.link(self.temp, self.path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(self.temp)
        except BaseException:
            self.discard()
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass


def stage(path: Path, data: str | bytes) -> Staged:
    """Write `data` under a temp name beside `path` (no fsync yet). Text is encoded with surrogateescape:
    an id from an undecodable file name goes back as its own bytes."""
    payload = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    staged = Staged(path, *_create_temp(path))
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(staged.fd, view):]
        return staged
    except BaseException:
        staged.discard()
        raise


def _create_temp(path: Path) -> tuple[str, int]:
    """A new file `.<start of path's name>.<random>.tmp` beside `path` (what sweep() removes if we die),
    with the mode open() gives (0666 minus the umask); (its path, an fd open for writing)."""
    # Only the start of the final name: a 255-byte final name must not make the temp name too long.
    prefix = os.path.join(path.parent, f".{path.name[:40]}.")
    while True:
        temp = f"{prefix}{os.urandom(6).hex()}.tmp"
        try:  # O_EXCL: never through a symlink either
            return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:  # 48 random bits: practically never
            continue


def sync_all(files: list[Staged]) -> None:
    """fsync the staged files, all at once when there are several: the filesystem can then commit them
    together (ext4 lets concurrent fsyncs share journal commits, NFS pipelines its COMMITs) instead of
    one round each."""
    if len(files) == 1:
        os.fsync(files[0].fd)
    elif files:
        for _ in _sync_pool().map(lambda f: os.fsync(f.fd), files):
            pass


_pool = None  # (pid, executor): a forked child must not use its parent's threads, which it lacks


def _sync_pool():
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=16, thread_name_prefix="fsync"))
    return _pool[1]


def atomic_write(path: Path, data: str | bytes, exclusive: bool = False, sync: bool = True) -> bool:
    """Write `path` atomically. exclusive=True never replaces an existing file (returns False then).
    sync=False skips the fsync (still atomic for readers; only a power failure may lose it): for files that
    are rewritten anyway or matter only while the process lives, where an fsync (ms on many disks) is waste."""
    staged = stage(path, data)
    try:
        if sync:
            os.fsync(staged.fd)
    except BaseException:
        staged.discard()
        raise
    return staged.place(exclusive)


def touch(directory: Path, name: str) -> float:
    """Create or touch `directory/name`, never through a symlink (the directory's own name included, so
    a directory swapped for a symlink between a check and this write is refused); return its new mtime."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666, dir_fd=dir_fd)
        try:
            os.utime(fd)
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def live_heartbeats(flags: Path, prober: str) -> list[Path]:
    """Heartbeat files of supervisors (any host) alive within HOST_FRESH_SECONDS, judged by the filesystem's
    clock (a probe file named after `prober` is touched for "now"), by this host's when it cannot be."""
    hosts = flags / ".hosts"
    try:
        now = touch(hosts, f".probe-{prober}")
    except OSError:
        now = time.time()
    try:
        return [p for p in hosts.glob("*.json") if now - p.stat().st_mtime < HOST_FRESH_SECONDS]
    except OSError:
        return []


def error_text(sentence: str, detail: dict) -> str:
    return sentence.rstrip(".") + ".\n" + json.dumps(detail, ensure_ascii=False, indent=1) + "\n"


def remove(path: Path) -> None:
    """Remove a file or symlink (never what it points to), or an empty directory left under one of our
    names; a missing name is fine. A directory that is not empty raises OSError (ENOTEMPTY)."""
    try:
        os.unlink(path)
    except IsADirectoryError:
        os.rmdir(path)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENAMETOOLONG):  # a name too long cannot exist either
            raise
