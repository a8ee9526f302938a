"""Run-folder locks (igd_cli/locks.py) where clusters keep their files: a file system that refuses ``flock``, one
whose ``flock`` is local to each node (simulated: ``flock`` always succeeds, another node's holder is a record
refreshed by a thread), stale records, a plain run against pieces, and a second run of one piece, which waits."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from igd_cli import locks
from igd_cli.errors import IgdError
from igd_cli.locks import LockOptions, Record, run_lock

TINY = ["--n-probe", "80", "--n-examples", "6", "--attack", "aa", "--steps", "1", "--queries", "5", "--draws", "2",
        "--batch-size", "8", "--json"]
#: one of every kind of piece (``igd pipeline --piece``)
PIECES = ["rank:0:64", "rank", "calibrate", "transfer:0/2", "defend:0/2", "merge"]
NOW = LockOptions(wait=0)


def _hold(folder, piece, options, ready, release):
    with run_lock(Path(folder), piece, options):
        ready.set()
        release.wait(60)


class Holder:
    """Another process holding the run lock (``piece`` None) or one piece's lock of ``folder`` until released."""

    def __init__(self, folder: Path, piece: str | None = None, options: LockOptions = NOW):
        ctx = mp.get_context("fork")
        self.ready, self.release = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_hold, args=(folder, piece, options, self.ready, self.release))

    def __enter__(self) -> Holder:
        self.proc.start()
        assert self.ready.wait(60)
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.proc.join(60)


def _one_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and text.strip().splitlines()[-1] == lines[0], text
    return lines[0]


def _refuse(monkeypatch, err: int, only_under: Path | None = None) -> None:
    """``flock`` refused with ``err`` (for lock files under ``only_under``, else everywhere)."""
    real = fcntl.flock

    def flock(fd, op):
        if only_under is None or os.readlink(f"/proc/self/fd/{fd}").startswith(str(only_under)):
            raise OSError(err, os.strerror(err))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


def _node_local(monkeypatch) -> None:
    """``flock`` as on BeeGFS's defaults or NFS with local_lock seen from another node: it never sees a holder."""
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_is_one_line_naming_the_remedy(tmp_path, cli, monkeypatch, err):
    """Lustre without -o flock (ENOSYS), NFS without a lock manager (ENOLCK), FUSE (EOPNOTSUPP): not 'in use by'."""
    out = tmp_path / "run"
    _refuse(monkeypatch, err)
    monkeypatch.setenv("IGD_LOCK_WAIT", "0")  # were it taken for "in use", no waiting
    r = cli("pipeline", *TINY, "--out", out)
    line = _one_error(r.err)
    assert r.code == 2 and "refuses file locks" in line and "in use" not in line, line
    assert f"flock: {os.strerror(err)}" in line and "--lock-dir DIR" in line and "--lock-dir none" in line


def test_lock_dir_and_opting_out(tmp_path, cli, monkeypatch):
    """--lock-dir DIR keeps the locks where flock works; --lock-dir none runs without; IGD_LOCK_DIR is the same."""
    out, elsewhere = tmp_path / "lustre" / "run", tmp_path / "locks"
    out.mkdir(parents=True)
    _refuse(monkeypatch, errno.ENOSYS, only_under=tmp_path / "lustre")
    piece = ["--piece", "rank:0:8"]  # a piece takes the run lock (shared) and its own
    r = cli("pipeline", *TINY, *piece, "--out", out, "--lock-dir", elsewhere)
    assert r.code == 0, r.err
    held = sorted(p.name for p in elsewhere.iterdir())
    assert [name.split(".", 1)[1] for name in held] == ["igd-lock", "igd-lock-rank-0-8"], held
    assert all(name.startswith("run-") for name in held)
    assert all((elsewhere / name).read_bytes() == b"" for name in held)  # released: no holder recorded
    assert not list(out.glob(".igd-lock*"))
    # the locks in DIR are the run folder's: held there, another run fails naming its holder
    monkeypatch.setenv("IGD_LOCK_DIR", str(elsewhere))
    with Holder(out, options=LockOptions.from_env()) as h:
        r = cli("pipeline", *TINY, *piece, "--out", out, "--lock-wait", "0")
        assert r.code == 2 and f"in use by igd pipeline (pid {h.proc.pid}" in _one_error(r.err)
    monkeypatch.setenv("IGD_LOCK_DIR", "none")
    assert cli("pipeline", *TINY, *piece, "--out", out).code == 0
    assert sorted(p.name for p in elsewhere.iterdir()) == held


def test_a_plain_run_and_every_kind_of_piece_exclude_each_other(tmp_path, cli):
    """A piece that takes no lock (or a lock the plain run does not see) would run here: every kind must wait."""
    out = tmp_path / "run"
    out.mkdir()
    with Holder(out) as h:
        for piece in PIECES:
            r = cli("pipeline", *TINY, "--out", out, "--piece", piece, "--lock-wait", "0")
            line = _one_error(r.err)
            assert r.code == 2 and f"in use by igd pipeline (pid {h.proc.pid} on" in line, (piece, line)
    for piece in PIECES[:3]:  # and a plain run waits for any piece
        with Holder(out, piece.replace(":", "-")) as h:
            r = cli("pipeline", *TINY, "--out", out, "--lock-wait", "0")
            line = _one_error(r.err)
            assert r.code == 2 and f"--piece {piece.replace(':', '-')} (pid {h.proc.pid} on" in line, line
    assert not list(out.glob("*.safetensors"))  # nothing ran


def test_pieces_of_different_kinds_run_side_by_side(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with Holder(out, "transfer-0-of-2"), Holder(out, "rank-0-64"):
        with run_lock(out, "defend-0-of-2", NOW), run_lock(out, "transfer-1-of-2", NOW):
            pass


def test_a_second_run_of_one_piece_waits_for_the_first(tmp_path, cli):
    """A requeued task whose old attempt still holds its lock (NFS keeps it until the lease ends) waits, then
    runs; past --lock-wait it fails in one line naming the holder."""
    out = tmp_path / "run"
    out.mkdir()
    with Holder(out, "calibrate") as h:
        threading.Timer(2.0, h.release.set).start()
        r = cli("pipeline", *TINY, "--out", out, "--piece", "calibrate", "--lock-wait", "60")
    assert r.code == 0, r.err
    waiting = [ln for ln in r.err.splitlines() if ln.startswith("waiting for")]
    assert len(waiting) == 1 and f"in use by igd pipeline --piece calibrate (pid {h.proc.pid} on" in waiting[0]
    assert "up to 60 s (--lock-wait)" in waiting[0]
    assert r.json()["piece"] == "calibrate"
    with Holder(out, "calibrate") as h:
        t0 = time.monotonic()
        with pytest.raises(IgdError, match=rf"in use by igd pipeline --piece calibrate \(pid {h.proc.pid} on .*"
                                           r"waited 0.5 s \(--lock-wait\)"):
            with run_lock(out, "calibrate", LockOptions(wait=0.5)):
                pass
        assert time.monotonic() - t0 >= 0.5


def test_a_held_lock_records_its_holder_refreshes_it_and_clears_it(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT", 0.05)
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out, "defend-1-of-4", NOW):
        rec = Record.decode((out / ".igd-lock-defend-1-of-4").read_bytes())
        assert (rec.host, rec.pid) == (socket.gethostname(), os.getpid())
        assert rec.what == "igd pipeline --piece defend-1-of-4"
        assert rec.start == locks._pid_start(os.getpid()) and abs(rec.since - time.time()) < 60
        time.sleep(0.3)
        assert Record.decode((out / ".igd-lock-defend-1-of-4").read_bytes()).beat > rec.beat
        assert (out / ".igd-lock").read_bytes() == b""  # a piece holds the run lock shared, without a record
    assert (out / ".igd-lock-defend-1-of-4").read_bytes() == b""


def _record(path: Path, **kw) -> Record:
    rec = Record(**{"host": socket.gethostname(), "pid": os.getpid(), "start": None, "since": time.time(),
                    "what": "igd pipeline", **kw})
    path.write_bytes(rec.encode())
    return rec


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_records_on_this_host_are_taken_over(tmp_path, capsys):
    """A process killed without releasing leaves its record: on this host a dead pid (or a pid that is now another
    process: another start time) is stale, named in one note line, and the lock is taken."""
    out = tmp_path / "run"
    out.mkdir()
    old = _record(out / ".igd-lock", pid=_dead_pid())
    with run_lock(out, None, NOW):
        assert Record.decode((out / ".igd-lock").read_bytes()).pid == os.getpid()
    err = capsys.readouterr().err
    assert f"the lock .igd-lock of igd pipeline (pid {old.pid} on {old.host} since" in err and "which has ended" in err
    _record(out / ".igd-lock-calibrate", pid=os.getppid(), start="1", what="igd pipeline --piece calibrate")
    with run_lock(out, "calibrate", NOW):
        pass
    # records written by earlier igd versions (one line of text, never cleared) are no holder
    (out / ".igd-lock").write_text(f"igd (pid {os.getppid()} on {socket.gethostname()})")
    with run_lock(out, None, NOW):
        pass


def test_a_live_holder_on_this_host_is_named_even_where_flock_sees_nothing(tmp_path, monkeypatch):
    _node_local(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as p:
        try:
            time.sleep(0.2)
            _record(out / ".igd-lock-calibrate", pid=p.pid, start=locks._pid_start(p.pid),
                    what="igd pipeline --piece calibrate")
            with pytest.raises(IgdError, match=rf"in use by igd pipeline --piece calibrate \(pid {p.pid} on"):
                with run_lock(out, "calibrate", NOW):
                    pass
            with pytest.raises(IgdError, match=rf"--piece calibrate \(pid {p.pid} on"):  # and a plain run
                with run_lock(out, None, NOW):
                    pass
        finally:
            p.kill()


def test_another_nodes_holder_waits_and_an_unrefreshed_one_is_stale(tmp_path, monkeypatch, capsys):
    """Where flock is local to each node, another node's holder is seen by its record: a refreshed record is a
    holder (named with its host; the plain run waits for it), a record unchanged for STALE seconds (its node
    failed) is taken over."""
    _node_local(monkeypatch)
    monkeypatch.setattr(locks, "STALE", 1.0)
    out = tmp_path / "run"
    out.mkdir()
    path = out / ".igd-lock-defend-0-of-2"
    rec = _record(path, host="node-b", pid=4242, what="igd pipeline --piece defend-0-of-2")
    stop = threading.Event()

    def refresh():  # as a holder does: rewritten in place at a fixed size, never truncated
        fd = os.open(path, os.O_RDWR)
        while not stop.wait(0.1):
            rec.beat += 1
            os.pwrite(fd, rec.encode(), 0)
        os.close(fd)

    beat = threading.Thread(target=refresh)
    beat.start()
    try:
        with pytest.raises(IgdError, match=r"in use by igd pipeline --piece defend-0-of-2 \(pid 4242 on node-b "
                                           r"since .*another node.*waited 2 s"):
            with run_lock(out, None, LockOptions(wait=2)):
                pass
        with pytest.raises(IgdError, match="pid 4242 on node-b"):
            with run_lock(out, "defend-0-of-2", LockOptions(wait=2)):
                pass
    finally:
        stop.set()
        beat.join()
    capsys.readouterr()
    t0 = time.monotonic()
    with run_lock(out, "defend-0-of-2", LockOptions(wait=30)):  # its node failed: no more refreshes
        assert Record.decode(path.read_bytes()).pid == os.getpid()
    assert time.monotonic() - t0 >= 1.0
    err = capsys.readouterr().err
    assert "waiting for" in err and "which has not refreshed it for 1 s (its node failed?)" in err
    # a plain run on another node announced itself: a piece here waits for it too
    _record(out / ".igd-lock", host="node-c", pid=7, since=0.0)
    with pytest.raises(IgdError, match=r"in use by igd pipeline \(pid 7 on node-c since 1970-01-01 00:00:00 UTC\)"):
        with run_lock(out, "transfer-0-of-2", NOW):
            pass


def test_lock_wait_from_the_environment(monkeypatch):
    monkeypatch.setenv("IGD_LOCK_WAIT", "2.5")
    monkeypatch.setenv("IGD_LOCK_DIR", "/somewhere")
    assert LockOptions.from_env() == LockOptions("/somewhere", 2.5)
    monkeypatch.setenv("IGD_LOCK_WAIT", "soon")
    with pytest.raises(IgdError, match="--lock-wait soon: expected seconds"):
        LockOptions.from_env()
    monkeypatch.delenv("IGD_LOCK_WAIT")
    assert LockOptions.from_env().wait == locks.DEFAULT_WAIT


def test_record_round_trip_and_fixed_size():
    rec = Record("node17", 4242, "123", 0.0, "igd pipeline --piece rank-0-64", beat=3)
    raw = rec.encode()
    assert len(raw) == locks.RECORD_BYTES and Record.decode(raw) == rec
    assert json.loads(raw)["igd_lock"] == 1
    assert Record.decode(b"") is None and Record.decode(b"igd (pid 1 on x)") is None


def test_a_cache_entry_on_a_file_system_without_flock(tmp_path, monkeypatch):
    """igd fetch's cache entries (ENTRY.lock): the same one line, and IGD_LOCK_DIR / IGD_LOCK_DIR=none work."""
    from igd_cli.download import fill

    home, elsewhere = tmp_path / "lustre", tmp_path / "locks"
    _refuse(monkeypatch, errno.ENOSYS, only_under=home)
    with pytest.raises(IgdError, match=r"models/x.pt: the file system of .* refuses file locks \(flock: Function "
                                       r"not implemented\): set IGD_LOCK_DIR"):
        fill(home / "models" / "x.pt", lambda tmp: tmp.write_text("1"))
    monkeypatch.setenv("IGD_LOCK_DIR", str(elsewhere))
    assert fill(home / "models" / "x.pt", lambda tmp: tmp.write_text("1"))
    assert [p.name.split("-", 1)[0] for p in elsewhere.iterdir()] == ["models"]
    monkeypatch.setenv("IGD_LOCK_DIR", "none")
    assert fill(home / "models" / "y.pt", lambda tmp: tmp.write_text("2"))
