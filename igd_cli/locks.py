"""Run-folder locks that hold where clusters keep their files (``igd pipeline``'s ``run_lock``).

A lock is an ``flock`` on a lock file plus a record in it of its holder (host, pid, the pid's start time, since
when, what it runs), refreshed every :data:`HEARTBEAT` seconds while held and cleared on release. ``flock`` alone
is not enough on a cluster: on BeeGFS's defaults and on NFS with ``local_lock`` it is local to each node, so the
record is what another node sees; and a process that ended without releasing (killed, or its node failed) leaves
a record that is *stale*: on the same host its pid is dead (or is now another process), from another host it has
not been refreshed for :data:`STALE` seconds. Where the file system refuses ``flock`` (Lustre mounted without
``-o flock``, NFS without a lock manager) igd says so in one line and what to do: keep the locks in a folder on a
file system that has them (``--lock-dir DIR`` / ``IGD_LOCK_DIR``), or run without (``--lock-dir none``).

A plain run holds the run lock ``.igd-lock`` exclusively. A piece (``--piece``) holds it shared and its own lock
``.igd-lock-PIECE`` exclusively: pieces of different kinds run side by side (each writes its own files, and every
artifact is written atomically under its identity), a plain run and any piece exclude each other, and a second
run of one piece waits for the first. Whoever finds a lock held waits for it, at most ``--lock-wait`` seconds
(``IGD_LOCK_WAIT``, default :data:`DEFAULT_WAIT`), saying so in one line, then fails in one line naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .console import err_console
from .errors import IgdError

#: errno values with which a file system refuses ``flock`` itself (not: another process holds the lock)
REFUSED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})
#: errno values meaning "held by another process"
BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})
DEFAULT_WAIT = 600.0  # seconds: covers an NFS lease (90 s) and STALE after a node failure
HEARTBEAT = 15.0  # seconds between two refreshes of a held lock's record
STALE = 60.0  # seconds without a refresh after which another host's record is stale
POLL = 1.0  # seconds between two tries while waiting (with jitter)
RECORD_BYTES = 512  # a record is rewritten in place at this fixed size, so a reader never sees half of two
NO_LOCK = "none"
RUN_LOCK = ".igd-lock"


@dataclass(frozen=True)
class LockOptions:
    """Where a run folder's locks live (``None``: in the folder; ``"none"``: no lock) and how long to wait."""

    lock_dir: str | None = None
    wait: float = DEFAULT_WAIT

    @classmethod
    def from_env(cls) -> LockOptions:
        """``IGD_LOCK_DIR`` and ``IGD_LOCK_WAIT`` (what ``--lock-dir`` and ``--lock-wait`` default to)."""
        wait = os.environ.get("IGD_LOCK_WAIT", "").strip()
        return cls(os.environ.get("IGD_LOCK_DIR") or None, parse_wait(wait) if wait else DEFAULT_WAIT)


def parse_wait(text: str | float) -> float:
    """``--lock-wait`` / ``IGD_LOCK_WAIT`` as seconds ≥ 0, else one error line."""
    try:
        wait = float(text)
    except ValueError:
        wait = -1.0
    if not wait >= 0:
        raise IgdError(f"--lock-wait {text}: expected seconds ≥ 0 (IGD_LOCK_WAIT)")
    return wait


@dataclass
class Record:
    """Who holds a lock file: written by the holder, read by whoever finds the lock taken."""

    host: str
    pid: int
    start: str | None  # the pid's start time (Linux: /proc/PID/stat), so that a reused pid is not mistaken
    since: float
    what: str
    beat: int = 0

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"{self.what} (pid {self.pid} on {self.host} since {when})"

    def encode(self) -> bytes:
        raw = json.dumps({"igd_lock": 1, **asdict(self)}).encode()
        return raw.ljust(RECORD_BYTES)[:RECORD_BYTES] if len(raw) <= RECORD_BYTES else raw

    @staticmethod
    def decode(raw: bytes) -> Record | None:
        """The record in ``raw``; None when empty (a released lock) or not an igd record (older igd versions wrote
        one line of text that they never cleared: only their ``flock`` counted)."""
        try:
            d = json.loads(raw.decode().strip() or "null")
        except ValueError:
            return None
        if not isinstance(d, dict) or d.pop("igd_lock", None) != 1:
            return None
        try:
            return Record(**d)
        except TypeError:
            return None


def _pid_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, Linux), or None where /proc has no such entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive_here(rec: Record) -> bool:
    """Whether the process of a record of this host still runs (the same pid and start time)."""
    try:
        os.kill(rec.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists and belongs to another user
    start = _pid_start(rec.pid)
    return rec.start is None or start is None or start == rec.start


def _read(path: Path) -> tuple[bytes, Record | None]:
    """A lock file's bytes and record, read through a fresh open (NFS: close-to-open sees the latest write)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(4 * RECORD_BYTES)
    except OSError:
        return b"", None
    return raw, Record.decode(raw)


def lock_file(folder: Path, name: str, lock_dir: str | None) -> Path | None:
    """Where lock ``name`` of ``folder`` lives: in the folder, in ``lock_dir`` (named after the folder's resolved
    path, so that every node finds the same file), or nowhere (``lock_dir == "none"``)."""
    if lock_dir is None:
        return folder / name
    if lock_dir.strip().lower() == NO_LOCK:
        return None
    where = Path(lock_dir).expanduser()
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IgdError(f"--lock-dir {lock_dir}: cannot create it ({exc.strerror})") from None
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return where / f"{folder.name}-{key}{name}"


class _Refused(Exception):
    """flock is refused by the file system (``errno`` in :data:`REFUSED`)."""


def _flock(fd: int, op: int) -> None:
    fcntl.flock(fd, op)


class _Held:
    """One lock file open and ``flock``-ed; once :meth:`announce`-d, its record refreshed until :meth:`release`."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd
        self.record: Record | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def announce(self, record: Record) -> None:
        self.record = record
        self._write()
        self._beat = threading.Thread(target=self._refresh, name=f"igd-lock {self.path.name}", daemon=True)
        self._beat.start()

    def _write(self) -> None:
        with contextlib.suppress(OSError):  # a record that cannot be refreshed only delays others' verdicts
            os.pwrite(self.fd, self.record.encode(), 0)

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            self.record.beat += 1
            self._write()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with contextlib.suppress(OSError):
            if self.record is not None:
                os.ftruncate(self.fd, 0)  # released: nobody holds it (a record left behind means a crash)
            _flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _try(path: Path, exclusive: bool) -> _Held | None:
    """``path`` locked (exclusive or shared) without blocking; None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise IgdError(f"{path}: cannot open the lock file ({exc.strerror})") from None
    try:
        _flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in BUSY:
            return None
        if exc.errno in REFUSED:
            raise _Refused(exc.strerror) from None
        raise IgdError(f"{path}: cannot lock it ({exc.strerror})") from None
    return _Held(path, fd)


class _Attempt:
    """What one process learns while it tries to take a folder's locks: which records it judged stale (so that
    the holders' refreshes are followed across tries), when it started waiting, and whether it said so."""

    def __init__(self, label: str, wait: float):
        self.label, self.wait = label, wait
        self.t0 = time.monotonic()
        self.seen: dict[Path, tuple[bytes, float]] = {}
        self.noted: set[Path] = set()
        self.said = False

    def live(self, path: Path, raw: bytes, rec: Record | None) -> bool:
        """Whether ``rec`` (found in ``path`` though its ``flock`` was free) is a holder that still runs."""
        if rec is None:
            return False
        if rec.host == socket.gethostname():
            if _alive_here(rec):
                return True
            self._note(path, rec, "which has ended")
            return False
        now = time.monotonic()  # another host: stale once its record has not changed for STALE seconds
        before, since = self.seen.get(path, (None, now))
        if before != raw:
            self.seen[path] = (raw, now)
            return True
        if now - since < STALE:
            return True
        self._note(path, rec, f"which has not refreshed it for {STALE:g} s (its node failed?)")
        return False

    def _note(self, path: Path, rec: Record, why: str) -> None:
        if path not in self.noted:
            self.noted.add(path)
            _say(f"note: {self.label}: the lock {path.name} of {rec.describe()} is stale ({why})")

    def pause(self, holder: Record | None, path: Path) -> None:
        """Wait a little for ``holder``; past the deadline one error line naming it."""
        if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
            raise IgdError(f"{self.label}: already locked by this process ({path.name})")
        who = holder.describe() if holder is not None else f"another process ({path})"
        if holder is not None and holder.host != socket.gethostname():
            who += f" (another node: a holder that ended is taken over {STALE:g} s after its last refresh)"
        left = self.wait - (time.monotonic() - self.t0)
        if left <= 0:
            waited = f"; waited {self.wait:g} s (--lock-wait)" if self.wait else ""
            raise IgdError(f"{self.label}: in use by {who}{waited}: wait for it to finish or choose another --out")
        if not self.said:
            self.said = True
            _say(f"waiting for {self.label}: in use by {who}; up to {self.wait:g} s (--lock-wait)")
        time.sleep(min(left, POLL * random.uniform(0.5, 1.5)))


def _say(text: str) -> None:
    err_console.print(text, highlight=False, soft_wrap=True)


def _refused(label: str, path: Path, why: str, elsewhere: str, none: str) -> IgdError:
    return IgdError(f"{label}: the file system of {path.parent} refuses file locks (flock: {why}): {elsewhere} on a "
                    f"file system whose locks every node sees, or {none} to run without a lock")


def _me(what: str) -> Record:
    return Record(socket.gethostname(), os.getpid(), _pid_start(os.getpid()), time.time(), what)


def _take(run: Path, mine: Path | None, piece: str | None, att: _Attempt, held: list[_Held]) \
        -> tuple[Record | None, Path] | None:
    """One try at the run lock ``run`` of a plain run (``piece`` None), or at it and the piece's lock ``mine``;
    None when taken (appended to ``held``), else the holder in the way (None: unknown) and its lock file."""
    if piece is None:
        got = _step(run, True, att, held)
        if isinstance(got, tuple):
            if got[0] is None:  # held shared by pieces: each names itself in its own file
                return next(((rec, p) for p in _piece_files(run) if (rec := _holder(p)) is not None), got)
            return got
        got.announce(_me("igd pipeline"))
        for path in _piece_files(run):  # pieces on other nodes, where flock is local to each node
            raw, rec = _read(path)
            if att.live(path, raw, rec):
                return rec, path
            if rec is not None:
                _clear(path, raw)
        return None
    for path, exclusive in ((run, False), (mine, True)):
        got = _step(path, exclusive, att, held)
        if isinstance(got, tuple):
            return got
    got.announce(_me(f"igd pipeline --piece {piece}"))
    raw, rec = _read(run)  # a plain run that announced itself meanwhile on another node: both back off and retry
    return (rec, run) if att.live(run, raw, rec) else None


def _step(path: Path, exclusive: bool, att: _Attempt, held: list[_Held]) -> _Held | tuple[Record | None, Path]:
    """``path`` locked and its record checked: the lock (appended to ``held``), or the holder in the way."""
    h = _try(path, exclusive)
    if h is None:
        return _holder(path), path
    held.append(h)
    raw, rec = _read(path)
    return (rec, path) if att.live(path, raw, rec) else h


def _clear(path: Path, raw: bytes) -> None:
    """Remove the stale record ``raw`` from ``path``, under the file's own ``flock`` (unless taken meanwhile)."""
    h = _try(path, exclusive=True)
    if h is not None:
        if _read(path)[0] == raw:
            os.ftruncate(h.fd, 0)
        h.release()


def _piece_files(run: Path) -> list[Path]:
    """The piece lock files beside the run lock ``run``."""
    return sorted(run.parent.glob(f"{run.name}-*"))


def _holder(path: Path) -> Record | None:
    """The record in ``path`` when it may name a running holder (another host's, or a live pid here)."""
    rec = _read(path)[1]
    return None if rec is not None and rec.host == socket.gethostname() and not _alive_here(rec) else rec


@contextlib.contextmanager
def run_lock(folder: Path, piece: str | None = None, options: LockOptions | None = None) -> Iterator[None]:
    """Hold the locks of run folder ``folder`` (a plain run: exclusive; ``piece``: shared, and that piece's lock
    exclusive) while writing it; wait for a holder at most ``options.wait`` seconds, then one error line."""
    opts = options or LockOptions.from_env()
    folder = Path(folder)
    label = f"--out {folder}"
    run = lock_file(folder, RUN_LOCK, opts.lock_dir)
    if run is None:  # --lock-dir none: the user keeps writers apart
        yield
        return
    mine = None if piece is None else lock_file(folder, f"{RUN_LOCK}-{piece}", opts.lock_dir)
    att = _Attempt(label, opts.wait)
    held: list[_Held] = []
    try:
        while (got := _take(run, mine, piece, att, held)) is not None:
            _release(held)
            att.pause(*got)
    except _Refused as exc:
        _release(held)
        raise _refused(label, run, str(exc), "pass --lock-dir DIR (or IGD_LOCK_DIR)", "--lock-dir none") from None
    except BaseException:
        _release(held)
        raise
    try:
        yield
    finally:
        _release(held)


def _release(held: list[_Held]) -> None:
    for h in reversed(held):
        h.release()
    held.clear()


@contextlib.contextmanager
def entry_lock(path: Path, label: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (or on its stand-in in ``IGD_LOCK_DIR``), blocking until it is
    free: for cache entries that one process fills while the others wait (``igd_cli.download``)."""
    where = lock_file(path.parent, path.name, os.environ.get("IGD_LOCK_DIR") or None)
    if where is None:
        yield
        return
    fd = os.open(where, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            _flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno in REFUSED:
                raise _refused(label, where, exc.strerror, "set IGD_LOCK_DIR to a folder", "IGD_LOCK_DIR=none") \
                    from None
            raise
        yield
    finally:
        os.close(fd)  # closing releases the lock

