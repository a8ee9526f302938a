"""cluster/slurm/wait.py and fit.py without a scheduler: a stand-in ``scontrol`` (and a ``sacct`` without accounting)
answers from files the tests write, so that a controller that has forgotten finished jobs (no accounting, more
than MinJobAge since they ended), a requeue, and jobs of an earlier submission can be played exactly."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[1] / "cluster" / "slurm"

FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol show job -o ID: the lines of $FAKE_SLURM/ID, else what a controller says of a job it no longer knows
f="$FAKE_SLURM/$4"
[ -f "$f" ] && exec cat "$f"
echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1
"""
FAKE_SACCT = """#!/usr/bin/env bash
echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1
"""


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"slurm_{name}", SLURM / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A stand-in scheduler: ``fake.job(ID, state, ...)`` makes scontrol know a job; unknown ids are forgotten."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))

    class Fake:
        run = tmp_path / "run"

        def job(self, jid: str, state_: str, task: str = "", exit_code: str = "0:0", reason: str = "None",
                name: str = "igd-rank-run") -> None:
            array = f" ArrayJobId={jid} ArrayTaskId={task}" if task else ""
            line = (f"JobId={jid}{array} JobName={name} JobState={state_} Reason={reason} ExitCode={exit_code} "
                    f"Partition=local StdOut={self.run}/logs/x.log\n")
            path = state / jid
            path.write_text((path.read_text() if path.exists() and task else "") + line)

        def forget(self, jid: str) -> None:
            (state / jid).unlink(missing_ok=True)

        def status(self, key: str, code: int) -> None:
            (self.run / ".jobs").mkdir(parents=True, exist_ok=True)
            (self.run / ".jobs" / f"{key}.status").write_text(json.dumps({"exit": code, "host": "n1", "restart": 0}))

        def jobs(self, *lines: str) -> Path:
            path = self.run / "cluster" / "jobs.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(line + "\n" for line in lines))
            return path

        def wait(self) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, str(SLURM / "wait.py"), str(self.run / "cluster" / "jobs.tsv")],
                                  capture_output=True, text=True, timeout=120)

    return Fake()


def test_jobs_the_controller_forgot_are_judged_by_their_status_files(fake):
    """No accounting, MinJobAge passed: scontrol knows none of the jobs; their own status files say how they
    ended (today's wait.py called every one UNKNOWN and failed a correct route)."""
    fake.jobs("igd-rank-run\t7\t0-2\t1", "igd-merge-importance-run\t8\t\t1")
    for key in ("7_0", "7_1", "7_2", "8"):
        fake.status(key, 0)
    w = fake.wait()
    assert w.returncode == 0 and w.stdout.strip() == "all 4 jobs and array tasks completed", w.stderr
    # a failed task: its exit code from its file, its log named; a task that left no file: unknown, said why
    fake.status("7_1", 2)
    (fake.run / ".jobs" / "8.status").unlink()
    (fake.run / "logs").mkdir()
    (fake.run / "logs" / "rank.7_1.log").write_text("error: ...\n")
    w = fake.wait()
    assert w.returncode == 1
    assert w.stderr.splitlines() == [
        f"error: igd-rank-run (job 7, array task 1) FAILED (exit 2:0); log {fake.run}/logs/rank.7_1.log",
        f"error: igd-merge-importance-run (job 8) UNKNOWN: no status file in {fake.run}/.jobs and no longer known "
        f"to the controller (it never ran, or its node failed)"]


def test_the_scheduler_names_the_state_and_a_requeued_task_is_waited_for(fake):
    fake.jobs("igd-evaluate-run\t11\t0-1\t1")
    fake.status("11_0", 0)
    fake.status("11_1", 143)  # its first attempt was killed by a requeue ...
    fake.job("11", "COMPLETED", task="0")
    fake.job("11", "PENDING", task="1", reason="BeginTime")  # ... and it waits to run again
    wait = _load("wait")
    got = {}
    t = threading.Thread(target=lambda: got.update(rc=wait.main(str(fake.run / "cluster" / "jobs.tsv"), poll=0.1)))
    t.start()
    time.sleep(1.0)
    assert t.is_alive()  # not judged by the killed attempt's file
    fake.status("11_1", 0)
    fake.job("11", "COMPLETED", task="0")
    fake.job("11", "COMPLETED", task="1")
    t.join(30)
    assert got == {"rc": 0}
    # where the controller still knows a failed job, its state's name and exit code are the scheduler's
    fake.status("11_1", 143)
    fake.job("11", "COMPLETED", task="0")
    fake.job("11", "CANCELLED", task="1", exit_code="143:0")
    w = fake.wait()
    assert w.returncode == 1 and "igd-evaluate-run (job 11, array task 1) CANCELLED (exit 143:0); log " in w.stderr


def test_wait_also_waits_for_an_earlier_submissions_running_jobs(fake, capsys):
    """submit.sh appends each submission's jobs: --wait judges the latest submission and waits for the earlier
    jobs still running (a re-submission while a first one runs)."""
    fake.jobs("igd-rank-run\t5\t0-1\t1", "igd-merge-importance-run\t6\t\t1",
              "igd-rank-run\t9\t0-1\t2", "igd-merge-importance-run\t10\t\t2")
    fake.status("5_0", 0)  # of the first submission: task 1 still runs, its merge waits on it
    fake.job("5", "COMPLETED", task="0")
    fake.job("5", "RUNNING", task="1")
    fake.job("6", "PENDING", reason="Dependency", name="igd-merge-importance-run")
    for key in ("9_0", "9_1", "10"):  # the second submission is done
        fake.status(key, 0)
    wait = _load("wait")
    got = {}
    t = threading.Thread(target=lambda: got.update(rc=wait.main(str(fake.run / "cluster" / "jobs.tsv"), poll=0.1)))
    t.start()
    time.sleep(1.0)
    assert t.is_alive()
    for key in ("5_1", "6"):
        fake.status(key, 0)
    fake.forget("5")
    fake.forget("6")
    t.join(30)
    assert got == {"rc": 0}
    out = capsys.readouterr().out
    assert "all 3 jobs and array tasks completed, and 2 jobs of an earlier submission ended" in out
    # a failure of an earlier submission is not this one's
    fake.status("5_1", 1)
    assert fake.wait().returncode == 0


def test_a_job_that_cannot_start_names_the_option_that_fixes_it(fake, tmp_path, monkeypatch):
    """A one-node partition with 2 CPUs and jobs asking 4 per task (SLURM: PartitionConfig, forever)."""
    bin_dir = Path(os.environ["PATH"].split(os.pathsep)[0])
    (bin_dir / "sinfo").write_text("#!/usr/bin/env bash\necho 'local*|2|24000|4:00:00'\n")
    (bin_dir / "sinfo").chmod(0o755)
    fake.jobs("igd-rank-run\t7\t0-2\t1", "igd-merge-importance-run\t8\t\t1")
    (Path(os.environ["FAKE_SLURM"]) / "7").write_text(
        "JobId=7 ArrayJobId=7 ArrayTaskId=0-2 JobName=igd-rank-run JobState=PENDING Reason=PartitionConfig "
        "ExitCode=0:0 Partition=local MinCPUsNode=4 MinMemoryNode=8G TimeLimit=00:30:00\n")
    (Path(os.environ["FAKE_SLURM"]) / "8").write_text(
        "JobId=8 JobName=igd-merge-importance-run JobState=PENDING Reason=Dependency ExitCode=0:0 "
        "Partition=local Dependency=afterok:7_*(unfulfilled)\n")
    w = fake.wait()
    assert w.returncode == 1
    assert w.stderr.splitlines() == [
        "error: igd-rank-run (job 7, array tasks 0-2) cannot start (PartitionConfig): it asks for 4 CPUs per task "
        "and partition local offers at most 2: pass --cpus-per-task 2 (or less) to submit.sh; cancel the run with "
        "scancel 7 8",
        "error: igd-merge-importance-run (job 8) never ran: it waits on igd-rank-run (job 7), which cannot start"]


def test_fit_lowers_defaults_the_partition_cannot_give_and_refuses_explicit_ones(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/usr/bin/env bash\necho 'local*|2|6000|04:00:00'\n"
                                   "echo 'local*|2|4000|04:00:00'\n")
    (bin_dir / "sinfo").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def fit(*args):
        return subprocess.run([sys.executable, str(SLURM / "fit.py"), str(SLURM), *args], capture_output=True,
                              text=True, env=env, timeout=60)

    r = fit()
    assert r.returncode == 0, r.stderr
    got = dict((line.split("\t")[0], line.split("\t")[1:]) for line in r.stdout.splitlines())
    assert got["rank.sbatch"] == ["--cpus-per-task=2", "--mem=6000M"]
    assert got["evaluate.sbatch"] == ["--cpus-per-task=2", "--mem=6000M", "--time=04:00:00"]
    assert got["merge.sbatch"] == ["--mem=6000M"] and got["result.sbatch"] == []
    assert "note: partition local offers at most 2 for --cpus-per-task: the rank, calibrate, attack, evaluate jobs " \
           "ask for 2 instead of their default (pass --cpus-per-task to choose)" in r.stderr
    r = fit("--cpus-per-task", "1", "--mem", "1G", "--time", "1:00:00")
    assert r.returncode == 0 and all(line.split("\t")[1:] == [] for line in r.stdout.splitlines()), r.stdout
    r = fit("--cpus-per-task", "4")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --cpus-per-task 4: partition local offers at most 2 (sinfo); a job asking more never starts")
    r = fit("--time", "1-00:00:00")
    assert r.returncode == 2 and "--time 1-00:00:00: partition local offers at most 04:00:00" in r.stderr
    (bin_dir / "sinfo").write_text("#!/usr/bin/env bash\nexit 1\n")  # no sinfo answer: nothing changes
    r = fit("--cpus-per-task", "64")
    assert r.returncode == 0 and r.stdout == ""
