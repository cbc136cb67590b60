"""Claims: which supervisor answers which request, correct even across hosts.

Claiming a request takes three steps, each safe on its own:
1. a `filelock` lock on `requests/.locks/<n>.lock` (non-blocking; n is one of LOCK_STRIPES picked by
   the id, so the lock files stay few however many ids come and go) keeps supervisors whose locks are
   coherent from even trying the same request at once;
2. a record `.claims/<token>.claim` (host, pid, time, id) names the claim; the token is fresh per claim;
3. the atomic rename of the request's main input into `.claims/<token>.<suffix>` is the claim itself:
   exactly one rename of a file can succeed, whatever the locks did. A rename that reports an error is
   confirmed by stat of the destination (an NFS retransmit can report a rename that succeeded as failed).

The claim's identity is its token: the answer is written only while `.claims/<token>.*` still exists,
and `.back` is created exclusively (hard link), so a late duplicate never replaces a first answer, while
a new request under a reused id (its own fresh claim removes the old outputs) does. Leases: the owner
touches its records; another host adopts a record whose mtime is older than the lease, judged against a
probe file it has just touched on the same filesystem (the server's clock, never two hosts' clocks).

One request of an id at a time: a claim also links its record as `.claims/<id>.owner`, exclusively, so
a request whose id is in flight (on any host) waits until the one before has its outcome; which request
each file keyed by an id belongs to follows from that (see "which request a file belongs to" below).

Claims and answers go in groups (claim_many, finish_many): the files of a group are written under temp
names and fsynced together, then each takes effect in the order above, so a disk pays one round of
commits per group instead of one per file.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from . import spool

log = logging.getLogger(__name__)

# A dispatch round holds the stripes of all the requests it claims while their records are fsynced; with
# 256, another supervisor's candidate rarely shares one of them (it would skip that request until its next scan).
LOCK_STRIPES = 256


@dataclass
class Claim:
    token: str
    id: str
    inputs: dict[str, Path] = field(default_factory=dict)  # suffix -> claimed path
    attempts: int = 0  # how many workers died while running it
    origin: str = ""  # the token of the request's first claim, kept by adopters: its outcomes carry it

    def __post_init__(self):
        self.origin = self.origin or self.token

    @property
    def main(self) -> str:
        return ".json" if ".json" in self.inputs else ".request"

    def to_record(self, host: str) -> str:
        return json.dumps({"id": self.id, "token": self.token, "host": host, "pid": os.getpid(), "time": time.time(),
                           "attempts": self.attempts, "origin": self.origin, "inputs": sorted(self.inputs)})


def main_input(suffixes) -> tuple[str, str | None]:
    """The main input of an id's waiting request, and the one refused beside it. Of `<id>.request` and
    `<id>.json` waiting at once, the seed form is answered (the original clients read nothing but .back)
    and the .json fails. Judged from the names alone, so that every host decides the same."""
    if ".request" in suffixes:
        return ".request", ".json" if ".json" in suffixes else None
    return ".json", None


class Claims:
    def __init__(self, requests_dir: Path, host_id: str, lease_seconds: float = 60.0):
        self.requests = requests_dir
        self.dir = requests_dir / ".claims"
        self.locks = requests_dir / ".locks"
        self.host = host_id
        self.lease = lease_seconds
        self.mine: dict[str, Claim] = {}  # token -> claim held by this supervisor
        self.stripes: dict[int, FileLock] = {}  # made once each: a FileLock costs more to build than to take
        self.refused: set[str] = set()  # tokens of claim records not fit to adopt (logged once)

    def ensure_dirs(self) -> None:
        for d in (self.requests, self.dir, self.locks, self.requests / "failed"):
            d.mkdir(parents=True, exist_ok=True)
        self.check_dirs()

    def check_dirs(self) -> None:
        """Refuse (NotADirectoryError) while a directory we write into is not a real one: clients can
        write in requests/, so one could swap .claims/ or failed/ for a symlink to have inputs renamed, or
        records written, wherever it points. Nothing is claimed or moved until it is fixed. A missing one
        is refused too (FileNotFoundError; the next scan's ensure_dirs() recreates it): a symlink may be
        about to take its place."""
        for d in (self.dir, self.locks, self.requests / "failed"):
            mode = os.lstat(d).st_mode
            if not stat.S_ISDIR(mode):
                raise NotADirectoryError(errno.ENOTDIR, f"requests/{d.name} is not a directory (a symlink?); "
                                         "glmpool never writes through one: nothing is claimed until it is fixed")

    def record_path(self, token: str) -> Path:
        return self.dir / f"{token}.claim"

    def owner_path(self, request_id: str) -> Path:
        return self.dir / f"{request_id}.owner"

    def claim(self, request_id: str, main: str, extras: tuple[str, ...] = ()) -> Claim | None:
        """Take `requests/<id><main>` (and the `extras` suffixes if present); None if someone else has it."""
        return self.claim_many([(request_id, main, extras)])[0]

    def claim_many(self, wanted: list[tuple[str, str, tuple[str, ...]]]) -> list[Claim | None]:
        """claim() for several (id, main, extras) at once, in that order: their records are made durable
        in one group of fsyncs, then each main input is renamed (the claim itself), all under the locks."""
        self.check_dirs()
        locks: dict[str, FileLock] = {}  # lock file -> held (ids of one stripe share it)
        staged: list[tuple[int, Claim, str, tuple, spool.Staged]] = []
        claimed: list[Claim | None] = [None] * len(wanted)
        try:
            for index, (request_id, main, extras) in enumerate(wanted):
                lock = self._lock(request_id)
                if lock.lock_file not in locks:
                    try:
                        lock.acquire()
                    except Timeout:
                        continue
                    locks[lock.lock_file] = lock
                if not os.path.lexists(self.requests / f"{request_id}{main}") \
                        or os.path.lexists(self.owner_path(request_id)):  # gone, or its id is in flight
                    continue
                claim = Claim(uuid.uuid4().hex[:16], request_id)
                staged.append((index, claim, main, extras, spool.stage(self.record_path(claim.token),
                                                                       claim.to_record(self.host))))
            spool.sync_all([record for *_, record in staged])
            while staged:
                index, claim, main, extras, record = staged.pop(0)
                claimed[index] = self._take(claim, main, extras, record)
        finally:
            for *_, record in staged:
                record.discard()
            for lock in locks.values():
                lock.release()
        return claimed

    def _take(self, claim: Claim, main: str, extras: tuple[str, ...], record: spool.Staged) -> Claim | None:
        """The rest of a claim once its record is durable, under the request's lock."""
        try:
            record.place()  # the record exists before the rename, so a claimed input is never unowned
        except OSError as error:
            log.warning("cannot claim %s: %s", claim.id, error.strerror)
            return None
        target = self.dir / f"{claim.token}{main}"
        if not self._own(claim) or not self._rename(self.requests / f"{claim.id}{main}", target):
            try:
                self._disown(claim.id, claim.token)
                spool.remove(self.record_path(claim.token))
            except OSError as error:  # a record without inputs: orphans() removes it later
                log.warning("cannot remove claim record %s: %s", claim.token, error.strerror)
            return None
        claim.inputs[main] = target
        for suffix in extras:
            extra = self.requests / f"{claim.id}{suffix}"
            if os.path.lexists(extra) and self._rename(extra, self.dir / f"{claim.token}{suffix}"):
                claim.inputs[suffix] = self.dir / f"{claim.token}{suffix}"
        for suffix in spool.OUTPUT_SUFFIXES:  # a new request under a used id replaces old answers
            try:
                spool.remove(self.requests / f"{claim.id}{suffix}")
            except OSError as error:  # e.g. a directory that is not empty: finish() fails the request
                log.error("cannot remove %s%s: %s", claim.id, suffix, error.strerror)
        self.mine[claim.token] = claim
        return claim

    def _own(self, claim: Claim, replace: bool = False) -> bool:
        """Link the claim's record as `<id>.owner`: exclusively (False: the id is in flight already), or,
        for an adopter, in place of its predecessor's link."""
        record, owner = self.record_path(claim.token), self.owner_path(claim.id)
        try:
            if replace:
                temp = self.dir / f".owner.{uuid.uuid4().hex[:12]}.tmp"
                os.link(record, temp)
                try:
                    os.replace(temp, owner)
                except OSError:
                    spool.remove(temp)
                    raise
            else:
                os.link(record, owner)
        except FileExistsError:  # NFS: a retransmitted link reports its own success as EEXIST
            return self._owner_token(claim.id) == claim.token
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:  # an id this long fails as soon as it is read
                return True
            log.warning("cannot claim %s: %s", claim.id, error.strerror)
            return False
        return True

    def _owner_token(self, request_id: str) -> str | None:
        """The token in the record that `<id>.owner` links (its content, not its inode: sshfs and other
        FUSE filesystems number inodes by path)."""
        try:  # read like an input: never through a symlink, never blocking on a fifo
            info = json.loads(spool.read_input(self.owner_path(request_id), now=float("inf")))
        except (OSError, ValueError, RecursionError, spool.RequestError, spool.NotReady):
            return None
        return info.get("token") if isinstance(info, dict) else None

    def _disown(self, request_id: str, token: str) -> None:
        """Remove `<id>.owner` if it is still the claim `token`'s (an adopter may have replaced it since)."""
        if self._owner_token(request_id) == token:
            spool.remove(self.owner_path(request_id))

    def _lock(self, request_id: str) -> FileLock:
        stripe = zlib.crc32(request_id.encode("utf-8", "surrogateescape")) % LOCK_STRIPES
        if stripe not in self.stripes:
            self.stripes[stripe] = FileLock(str(self.locks / f"{stripe}.lock"), timeout=0)
        return self.stripes[stripe]

    def update(self, claim: Claim) -> None:
        """(Re)write the claim's record: owner, time, attempts so far (an adopter continues the count)."""
        spool.atomic_write(self.record_path(claim.token), claim.to_record(self.host))

    @staticmethod
    def _rename(source: Path, target: Path) -> bool:
        try:
            os.rename(source, target)
            return True
        except OSError as error:
            if os.path.lexists(target):  # NFS: a retransmitted rename reports the first one's success as an error
                return True
            if not isinstance(error, FileNotFoundError):
                log.warning("cannot claim %s: %s", source.name, error.strerror)
            return False

    def holds(self, claim: Claim) -> bool:
        """Still ours: the record and the main input are where our claim put them."""
        return claim.token in self.mine and self.record_path(claim.token).exists() and \
            all(os.path.lexists(p) for p in claim.inputs.values())

    def finish(self, claim: Claim, back: str, meta: dict) -> bool:
        """Publish the answer once: .meta, then .back (exclusive); then drop the claimed inputs. False if
        it was not ours to publish (taken over, or answered already)."""
        outcome = self.finish_many([(claim, back, meta)])[0]
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def finish_many(self, answers: list[tuple[Claim, str, dict]]) -> list[bool | OSError]:
        """finish() for several answers at once, their files made durable in one group of fsyncs. Each
        outcome is finish()'s, or the OSError that kept that answer from being published (nothing of it
        was: publishing it again later is safe)."""
        outcomes: list[bool | OSError] = [False] * len(answers)
        staged: list[tuple[int, Claim, spool.Staged, spool.Staged]] = []
        try:
            for index, (claim, back, meta) in enumerate(answers):
                try:
                    if self._publishable(claim):
                        staged.append((index, claim, *self._stage_answer(claim, back, meta)))
                except OSError as error:
                    outcomes[index] = error
            try:
                spool.sync_all([f for *_, meta_file, back_file in staged for f in (meta_file, back_file)])
            except OSError as error:
                for index, *_ in staged:
                    outcomes[index] = error
                return outcomes
            while staged:
                index, claim, meta_file, back_file = staged.pop(0)
                try:
                    self.clear_cancel(claim.id)
                    meta_file.place()
                    outcomes[index] = self._publish(claim, back_file)
                except OSError as error:
                    back_file.discard()
                    outcomes[index] = error
            return outcomes
        finally:
            for _, _, meta_file, back_file in staged:
                meta_file.discard()
                back_file.discard()

    def _stage_answer(self, claim: Claim, back: str, meta: dict) -> tuple[spool.Staged, spool.Staged]:
        meta_file = spool.stage(self.requests / f"{claim.id}.meta", json.dumps(meta, ensure_ascii=False, indent=1))
        try:
            return meta_file, spool.stage(self.requests / f"{claim.id}.back", back)
        except BaseException:
            meta_file.discard()
            raise

    def _publishable(self, claim: Claim) -> bool:
        if not self.holds(claim):
            log.warning("claim %s of %s was taken over; dropping this late answer", claim.token, claim.id)
            self.mine.pop(claim.token, None)
            return False
        back_path = self.requests / f"{claim.id}.back"
        if os.path.isdir(back_path) and not os.path.islink(back_path):
            # Not an answer but a directory in the way (claim() removes only empty ones): the client
            # must hear that its answer cannot be written, not wait for it.
            self.fail(claim, f"{claim.id}.back cannot be written: a directory is in its place",
                      {"id": claim.id, "reason": "output blocked"})
            return False
        return not self.answered(claim)

    def _publish(self, claim: Claim, back_file: spool.Staged) -> bool:
        """After the .meta: the .back (exclusive), then the claim is dropped."""
        written = back_file.place(exclusive=True)
        if not written:
            log.warning("%s.back already exists; not replacing it with a duplicate answer", claim.id)
        spool.remove(self.requests / f"{claim.id}.partial")
        self.drop(claim)
        return written

    def answered(self, claim: Claim) -> bool:
        """An outcome of this request (its .meta or .error names the claim's origin) while we hold the
        claim was published by an owner killed before it dropped the claim, and adopted since: finish that
        owner's work (an .error's inputs go to failed/) and drop the rerun, keeping .back, .meta or .error
        as they are. Another outcome under the id (a refused .json's .error) is not this request's."""
        for suffix in (".back", ".error"):
            if spool.is_regular(self.requests / f"{claim.id}{suffix}") and self._published_by(claim, suffix):
                log.warning("%s%s was already published under claim %s; dropping this rerun", claim.id, suffix,
                            claim.token)
                spool.remove(self.requests / f"{claim.id}.partial")
                if suffix == ".error":
                    self.keep_inputs(claim)
                self.drop(claim, remove_inputs=suffix == ".back")
                return True
        return False

    def _published_by(self, claim: Claim, suffix: str) -> bool:
        try:
            if suffix == ".back":
                detail = json.loads((self.requests / f"{claim.id}.meta").read_text(encoding="utf-8"))
            else:
                detail = json.loads((self.requests / f"{claim.id}.error").read_text(encoding="utf-8").split("\n", 1)[1])
        except (OSError, ValueError, IndexError):
            return False
        return isinstance(detail, dict) and detail.get("claim") == claim.origin

    def fail(self, claim: Claim, sentence: str, detail: dict) -> None:
        """Publish an .error, then keep the inputs in failed/ (never silently deleted). In that order: an
        owner killed in between leaves a claim whose .error says it is answered (see answered()). Safe to
        call again after an OSError (a full disk): nothing was moved yet."""
        if claim.token in self.mine and not self.holds(claim):
            self.mine.pop(claim.token, None)
            return
        if self.answered(claim):
            return
        self.check_dirs()
        self.take_late_history(claim)
        spool.remove(self.requests / f"{claim.id}.partial")
        self.clear_cancel(claim.id)
        try:
            spool.atomic_write(self.requests / f"{claim.id}.error",
                               spool.error_text(sentence, {**detail, "claim": claim.origin}))
        except OSError as error:
            if error.errno not in (errno.ENAMETOOLONG, errno.EISDIR):  # permanent: retrying cannot help
                raise
            log.error("%s failed (%s) but no .error can be named after it (%s); its inputs are in failed/",
                      claim.id, sentence, error.strerror)
        self.keep_inputs(claim)
        self.drop(claim, remove_inputs=False)

    def keep_inputs(self, claim: Claim) -> None:
        """Move the claimed inputs into failed/."""
        self.check_dirs()
        for suffix, path in list(claim.inputs.items()):
            try:
                self._into_failed(path, f"{claim.id}{suffix}", claim.token)
            except OSError as error:
                log.error("cannot move %s into failed/: %s", path, error.strerror)
            del claim.inputs[suffix]

    def _into_failed(self, path: Path, name: str, tag: str) -> None:
        """Move `path` to failed/<name>, or failed/<name>.<tag> where an earlier failure's file (an id is
        reused) holds that name: inputs kept there are never replaced."""
        target = self.requests / "failed" / name
        if os.path.lexists(target):
            target = target.with_name(f"{name}.{tag}")
        os.rename(path, target)

    def release(self, claim: Claim) -> None:
        """Give the request back unanswered (stop, or cut by the grace timeout): inputs return to requests/."""
        for suffix, path in sorted(claim.inputs.items(), key=lambda item: item[0] != ".history"):
            destination = self.requests / f"{claim.id}{suffix}"
            try:
                os.link(path, destination)  # never over a newer request that reused the id
                os.unlink(path)
            except FileExistsError:
                log.warning("%s was re-submitted meanwhile; the claimed copy stays for adoption", destination.name)
                return
            except OSError:
                pass
        self.drop(claim, remove_inputs=False)

    def drop(self, claim: Claim, remove_inputs: bool = True) -> None:
        if remove_inputs:
            for path in claim.inputs.values():
                spool.remove(path)
        self._disown(claim.id, claim.token)  # before the record: an owner link always has a record naming its id
        spool.remove(self.record_path(claim.token))
        self.mine.pop(claim.token, None)

    def renew(self) -> None:
        """Heartbeat every claim we hold (the lease)."""
        for token in list(self.mine):
            try:
                os.utime(self.record_path(token))
            except FileNotFoundError:
                log.warning("claim %s disappeared (taken over?)", token)

    def orphans(self) -> list[Claim]:
        """Adopt claims whose owner is gone: this host's dead incarnations, or any host's expired lease."""
        self.check_dirs()
        now = spool.touch(self.dir, f".probe-{self.host}")  # the shared filesystem's clock
        self.sweep(now)
        adopted = []
        claimed_ids = {claim.id for claim in self.mine.values()}
        for record in self.dir.glob("*.claim"):
            token = record.name[:-len(".claim")]
            if token in self.mine or token in self.refused:
                continue
            try:  # read like an input: never through a symlink, never blocking on a fifo
                info = json.loads(spool.read_input(record, now=float("inf")))
                age = now - os.lstat(record).st_mtime
            except (OSError, ValueError, RecursionError, spool.RequestError, spool.NotReady):
                continue
            if not isinstance(info, dict) or not spool.valid_id(info.get("id")) \
                    or not isinstance(info.get("attempts", 0), int):
                log.error("claim record %s does not name a valid request (%r): not adopted", record.name,
                          info.get("id") if isinstance(info, dict) else info)
                self.refused.add(token)
                continue
            claimed_ids.add(info["id"])
            same_host_dead = info.get("host") == self.host and not _alive(info.get("pid"))
            if same_host_dead or age > self.lease:
                claim = self._adopt(token, info)
                if claim:
                    adopted.append(claim)
        self.clear_stale_owners(now, claimed_ids)
        self.clear_strays(now)
        return adopted

    def clear_stale_owners(self, now: float, claimed_ids: set[str]) -> None:
        """An owner link is made after its record and removed before it, so one that no record names
        is left by damage (a record deleted by hand): removed once older than the lease, the id freed."""
        for owner in self.dir.glob("*.owner"):
            request_id = owner.name[:-len(".owner")]
            try:
                if request_id not in claimed_ids and now - os.lstat(owner).st_mtime > self.lease:
                    spool.remove(owner)
                    log.warning("removed %s, which no claim names", owner.name)
            except OSError:
                pass

    def sweep(self, now: float) -> None:
        """Remove the temp files (spool.atomic_write's `.<name>.<random>.tmp`) of writers killed before
        their rename, and heartbeat files in flags/.hosts/, once older than the lease (heartbeats: and
        15 s) by the filesystem's clock `now` (a live writer renames its own within moments, a live
        supervisor beats every second; one stalled longer has lost its claims anyway, and beats again)."""
        flags = self.requests.parent / "flags"
        for directory in (self.requests, self.dir, flags, flags / ".hosts"):
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                # also the heartbeat files of supervisors killed before they could remove their own
                beat = directory.name == ".hosts" and not entry.name.startswith(".") and entry.name.endswith(".json")
                if beat or entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    try:  # a heartbeat older than 15 s is past what counts as a live peer (10 s)
                        if now - entry.stat(follow_symlinks=False).st_mtime > max(self.lease, 15.0 if beat else 0.0):
                            os.unlink(entry.path)
                            log.info("removed %s, left by a writer that died", entry.name)
                    except OSError:
                        pass

    def _adopt(self, old_token: str, info: dict) -> Claim | None:
        """Move an orphaned claim's inputs under a fresh claim of ours. The main input is renamed first
        and alone decides: of two adopters, the one that lost it touches nothing else."""
        lock = self._lock(str(info.get("id")))
        try:
            lock.acquire()
        except Timeout:
            return None
        try:
            origin = info.get("origin")
            claim = Claim(uuid.uuid4().hex[:16], info["id"], attempts=int(info.get("attempts", 0)),
                          origin=origin if isinstance(origin, str) and origin else old_token)
            self.update(claim)
            inputs = {p.suffix: p for p in self.dir.glob(f"{old_token}.*") if p.suffix in spool.INPUT_SUFFIXES}
            main = ".json" if ".json" in inputs else ".request"
            if main not in inputs or not self._rename(inputs[main], self.dir / f"{claim.token}{main}"):
                spool.remove(self.record_path(claim.token))
                if main not in inputs:  # nothing left to answer: an interrupted claim, drop or fail
                    self._disown(claim.id, old_token)
                    spool.remove(self.record_path(old_token))
                return None
            for suffix, path in inputs.items():
                target = self.dir / f"{claim.token}{suffix}"
                if suffix == main or self._rename(path, target):
                    claim.inputs[suffix] = target
            history = self.requests / f"{claim.id}.history"
            if main == ".request" and ".history" not in claim.inputs and os.path.lexists(history):
                # its claimer died between the renames (or a release put the history back first): the
                # request's history is still in requests/, and no client reuses an id before its answer
                if self._rename(history, self.dir / f"{claim.token}.history"):
                    claim.inputs[".history"] = self.dir / f"{claim.token}.history"
            self._own(claim, replace=True)  # the id stays in flight: now under our record
            spool.remove(self.record_path(old_token))
            self.mine[claim.token] = claim
            log.info("adopted %s (claim %s of host %s)", claim.id, old_token, info.get("host"))
            return claim
        finally:
            lock.release()

    # --- which request a file belongs to -------------------------------------------------------------
    # Ids are reused (the original clients ask every question as `1`), so a file named by an id alone could
    # act on a later request. The rules (the README's "Which request a file belongs to" states them too):
    # - outputs (.back .meta .error .partial) belong to the one request of the id that is claimed: claiming
    #   removes earlier ones, and no second request of an id is claimed until the first has its outcome;
    # - <id>.history belongs to the <id>.request claimed with it (a .json never takes one); one that comes
    #   after its request was claimed without it fails that request (take_late_history); one that no
    #   request takes is moved to failed/ once STRAY_SECONDS old (clear_strays);
    # - <id>.cancel applies to a request of its id whose main input is not newer than it (cancel_applies);
    #   it is removed just before an outcome of its id appears, unless a waiting request of the id is older
    #   than it (clear_cancel); one that applies to nothing is removed once STRAY_SECONDS old;
    # - <id>.request and <id>.json waiting at once: the seed form is answered, the .json fails (main_input).

    def cancel_applies(self, request_id: str, arrived: float) -> bool:
        """Whether `<id>.cancel` applies to the request of that id whose main input's mtime is `arrived`:
        only if it is not older than that input (the filesystem's clock for both, so every host agrees).
        A .cancel left over from an earlier request never stops a later one."""
        try:
            return os.lstat(self.requests / f"{request_id}.cancel").st_mtime >= arrived
        except OSError:
            return False

    def clear_cancel(self, request_id: str) -> None:
        """Just before an outcome of the id appears (a client may reuse the id as soon as it sees it):
        its .cancel is done with, unless a request of the id still waiting is older than it. (Strictly: a
        request sent again at once after a cancel may share its mtime on a coarse clock, and must run.)"""
        cancel = self.requests / f"{request_id}.cancel"
        try:
            written = os.lstat(cancel).st_mtime
            if any(os.path.lexists(main) and os.lstat(main).st_mtime < written
                   for main in (self.requests / f"{request_id}.request", self.requests / f"{request_id}.json")):
                return
            spool.remove(cancel)
        except FileNotFoundError:
            pass
        except OSError as error:  # e.g. a directory holding files: it cannot act on a later request anyway
            log.warning("cannot remove %s.cancel: %s", request_id, error.strerror)

    def take_late_history(self, claim: Claim) -> bool:
        """A seed-form request claimed without a .history (none came within the grace): an `<id>.history`
        that appeared since, with no new request of the id beside it, was meant for this request and
        came too late. It joins the claim (its inputs go to failed/ together); True if it did."""
        if claim.main != ".request" or ".history" in claim.inputs:
            return False
        history = self.requests / f"{claim.id}.history"
        if not os.path.lexists(history) or os.path.lexists(self.requests / f"{claim.id}.request") \
                or os.path.lexists(self.requests / f"{claim.id}.json"):
            return False
        if not self._rename(history, self.dir / f"{claim.token}.history"):
            return False
        claim.inputs[".history"] = self.dir / f"{claim.token}.history"
        return True

    def clear_strays(self, now: float) -> None:
        """A .cancel or .history that belongs to no request, once STRAY_SECONDS old by the filesystem's
        clock `now` and its id not in flight: a .cancel that applies to no waiting request is removed, a
        .history beside no .request is moved to failed/ (a client's file is never silently deleted)."""
        try:
            entries = list(os.scandir(self.requests))
        except OSError:
            return
        groups: dict[str, dict[str, os.DirEntry]] = {}
        for entry in entries:
            parts = spool.split_name(entry.name)
            if parts and parts[1] in (".cancel", ".history", ".request", ".json"):
                groups.setdefault(parts[0], {})[parts[1]] = entry
        for request_id, names in groups.items():
            if not {".cancel", ".history"} & set(names) or os.path.lexists(self.owner_path(request_id)):
                continue
            try:
                mtime = {suffix: entry.stat(follow_symlinks=False).st_mtime for suffix, entry in names.items()}
                cancel, history = mtime.get(".cancel"), mtime.get(".history")
                if cancel is not None and now - cancel > spool.STRAY_SECONDS \
                        and not any(mtime.get(main, float("inf")) <= cancel for main in (".request", ".json")):
                    spool.remove(self.requests / f"{request_id}.cancel")
                    log.info("removed %s.cancel: no request of its id was written before it", request_id)
                if history is not None and now - history > spool.STRAY_SECONDS and ".request" not in names:
                    self.check_dirs()
                    self._into_failed(self.requests / f"{request_id}.history", f"{request_id}.history",
                                      uuid.uuid4().hex[:16])
                    log.warning("moved %s.history into failed/: no %s.request came with it", request_id, request_id)
            except OSError:  # gone meanwhile (a client, another host), or not removable: looked at again later
                pass

    def reject(self, request_id: str, suffix: str, sentence: str, detail: dict) -> None:
        """Fail a waiting input that no claim may take (the .json beside a .request of its id, decided by
        the supervisor that claimed the .request): its .error, then the input into failed/."""
        self.check_dirs()
        spool.atomic_write(self.requests / f"{request_id}.error", spool.error_text(sentence, detail))
        try:
            self._into_failed(self.requests / f"{request_id}{suffix}", f"{request_id}{suffix}", uuid.uuid4().hex[:16])
        except FileNotFoundError:
            pass


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
