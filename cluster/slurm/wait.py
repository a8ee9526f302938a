"""``submit.sh --wait``: block until the jobs of a run have ended, then name each one that did not complete.

``python cluster/slurm/wait.py RUN_DIR/cluster/jobs.tsv`` (lines ``NAME<TAB>JOB_ID<TAB>ARRAY<TAB>SUBMISSION``;
every submission of the run appends its jobs). It waits for the jobs of the latest submission and for those of
earlier ones that are still pending or running, and judges the latest submission's only.

How a job or array task ended comes first from its own record, ``RUN_DIR/.jobs/<job id>[_<task>].status``
(written by job-lib.sh when the job exits), so that a job the controller has forgotten (no accounting, and more
than ``MinJobAge`` since it ended) is still known; then from ``sacct`` where accounting is on, else from
``scontrol show job``. Exit 0 when every job and array task of the latest submission COMPLETED, else 1 with one
line per job (or run of array tasks) that did not, naming its state, exit code and log, the job it waited on, or
why it cannot start and which submit.sh option fixes that.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fit  # noqa: E402  (beside this file)

#: pending reasons that no waiting cures: the job asks for more than the partition has
STUCK = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit", "ReqNodeNotAvail",
         "DependencyNeverSatisfied"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "REVOKED"}
UNKNOWN = "UNKNOWN"


@dataclass
class Job:
    name: str
    id: str
    submission: int
    tasks: list[str]  # its array tasks, [""] for a job without array; []: not recorded (an older jobs.tsv)


def read_jobs(path: Path) -> list[Job]:
    jobs = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, jid, *rest = line.rstrip("\n").split("\t")
            array, sub = (rest + [None, None])[:2]
            tasks = [] if array is None else expand(array) if array else [""]
            jobs.append(Job(name, jid.strip(), int(sub) if sub else 0, tasks))
    return jobs


def expand(spec: str) -> list[str]:
    """Array task ids of ``0-2``, ``[1-2]``, ``0,3,5-6``, ``0-9%4``."""
    out = []
    for part in spec.strip("[]").split("%")[0].split(","):
        if "-" in part:
            a, b = part.split("-")
            out += [str(i) for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(part)
    return out


def _run(*cmd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 1, "", str(exc))


def states_sacct(ids: list[str]) -> list[dict] | None:
    """One record per job / array task from accounting, or None where accounting is off."""
    p = _run("sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,JobName,State,ExitCode,Reason")
    if p.returncode != 0:
        return None
    out = []
    for line in p.stdout.splitlines():
        job, name, state, code, reason = (line.split("|") + [""] * 5)[:5]
        base, _, task = job.partition("_")
        out.append({"job": base, "task": task, "name": name, "state": state.split()[0] if state else "",
                    "exit": code, "reason": reason, "log": "", "dependency": "", "partition": ""})
    return out


def states_scontrol(ids: list[str]) -> list[dict]:
    out = []
    for jid in ids:
        p = _run("scontrol", "show", "job", "-o", jid)
        if p.returncode != 0:
            continue  # no longer known to the controller
        for line in p.stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            out.append({"job": f.get("ArrayJobId", f.get("JobId", jid)), "task": f.get("ArrayTaskId", ""),
                        "name": f.get("JobName", ""), "state": f.get("JobState", ""), "exit": f.get("ExitCode", ""),
                        "reason": f.get("Reason", ""), "log": f.get("StdOut", ""),
                        "dependency": f.get("Dependency", ""), "partition": f.get("Partition", ""),
                        "cpus": f.get("MinCPUsNode", ""), "mem": f.get("MinMemoryNode", ""),
                        "time": f.get("TimeLimit", "")})
    return out


def scheduler(ids: list[str]) -> dict[tuple[str, str], dict]:
    """What the scheduler knows, per (job id, array task) ("" for a job without array); pending array tasks
    listed as one range are expanded."""
    if not ids:
        return {}
    recs = states_sacct(ids)
    if not recs:
        recs = states_scontrol(ids)
    out = {}
    for r in recs:
        for task in expand(r["task"]) if r["task"] else [""]:
            out[(r["job"], task)] = {**r, "task": task}
    return out


def status_file(run: Path, job: str, task: str) -> dict | None:
    """The job's own record of its exit (job-lib.sh), or None."""
    path = run / ".jobs" / (f"{job}_{task}" if task else job)
    try:
        return json.loads(path.with_name(path.name + ".status").read_text())
    except (OSError, ValueError):
        return None


def resolve(run: Path, job: Job, task: str, sched: dict | None) -> dict:
    """The state of one job or array task: its status file says how it ended, unless the scheduler has it pending
    or running again (a requeue); the scheduler adds the state's name (CANCELLED, TIMEOUT, ...) where it knows."""
    rec = {"state": UNKNOWN, "exit": "", "reason": "", "log": "", "dependency": "", **(sched or {}),
           "job": job.id, "task": task, "name": job.name}
    status = status_file(run, job.id, task)
    if status is not None and status.get("exit") == 0:
        return {**rec, "state": "COMPLETED", "exit": "0:0"}
    if sched is not None and sched["state"] not in FINAL:
        return rec  # pending or running (again)
    if status is not None:
        state = sched["state"] if sched is not None else "FAILED"
        return {**rec, "state": state, "exit": rec["exit"] or f"{status.get('exit')}:0", "from_status": True}
    return rec


def active(r: dict) -> bool:
    return r["state"] not in FINAL and r["state"] != UNKNOWN


def stuck(r: dict) -> bool:
    return r["state"] == "PENDING" and r["reason"] in STUCK


def main(jobs_tsv: str, poll: float = 2.0) -> int:
    path = Path(jobs_tsv).resolve()
    run = path.parent.parent
    jobs = read_jobs(path)
    latest = max(j.submission for j in jobs)
    done: dict[tuple[str, str], dict] = {}  # final states, not asked again
    earlier_running: set[str] = set()
    first = True
    while True:
        ask = sorted({j.id for j in jobs if not j.tasks or any((j.id, t) not in done for t in j.tasks)})
        sched = scheduler(ask)
        recs: list[tuple[Job, dict]] = []
        for j in jobs:
            tasks = j.tasks or sorted({t for (jid, t) in sched if jid == j.id}) or [""]
            for t in tasks:
                r = done.get((j.id, t)) or resolve(run, j, t, sched.get((j.id, t)))
                if not active(r) and r["state"] != UNKNOWN and j.tasks:
                    done[(j.id, t)] = r
                recs.append((j, r))
        if first:
            earlier_running = {j.id for j, r in recs if j.submission < latest and active(r)}
            first = False
        waiting = [(j, r) for j, r in recs if active(r) and (j.submission == latest or j.id in earlier_running)]
        if not waiting:
            break
        if all(stuck(r) or (r["state"] == "PENDING" and r["reason"] == "Dependency") for _, r in waiting) and \
                any(stuck(r) for _, r in waiting):
            break  # nothing runs and nothing can: report instead of waiting forever
        time.sleep(poll)
    names = {j.id: j.name for j in jobs}
    mine = [r for j, r in recs if j.submission == latest]
    bad = [r for r in mine if r["state"] != "COMPLETED"]
    for group in _groups(bad):
        print(f"error: {describe(group, names, run, [j.id for j in jobs if j.submission == latest])}", file=sys.stderr)
    for j, r in recs:
        if j.submission < latest and j.id in earlier_running and stuck(r):
            print(f"note: {j.name} (job {j.id}) of an earlier submission cannot start ({r['reason']}): "
                  f"scancel {j.id}", file=sys.stderr)
    if not bad:
        more = f", and {len(earlier_running)} jobs of an earlier submission ended" if earlier_running else ""
        print(f"all {len(mine)} jobs and array tasks completed{more}")
    return 1 if bad else 0


def _groups(recs: list[dict]) -> list[list[dict]]:
    """Runs of array tasks of one job that share their state (one line for 'array tasks 0-7')."""
    out: list[list[dict]] = []
    for r in recs:
        if out and r["task"] and out[-1][0]["task"] and _key(out[-1][0]) == _key(r):
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _key(r: dict) -> tuple:
    return r["job"], r["state"], r["exit"], r["reason"], bool(r.get("from_status"))


def describe(group: list[dict], names: dict[str, str], run: Path, ids: list[str]) -> str:
    r = group[0]
    tasks = [g["task"] for g in group]
    which = "" if not r["task"] else (f", array task {tasks[0]}" if len(tasks) == 1 else
                                      f", array tasks {_span(tasks)}")
    what = f"{r['name']} (job {r['job']}{which})"
    if r["state"] == "PENDING" and r["reason"] == "Dependency":
        on = [f"{names[d]} (job {d})" for d in _dependencies(r["dependency"]) if d in names]
        return f"{what} never ran: it waits on {' and '.join(on) or 'a job'}, which cannot start"
    if r["state"] == "PENDING":
        return f"{what} cannot start ({r['reason']}): {why_stuck(r)}; cancel the run with scancel {' '.join(ids)}"
    if r["reason"] == "DependencyNeverSatisfied" or (r["state"] == "CANCELLED" and r["reason"] == "Dependency"):
        return f"{what} never ran: a job it depends on did not complete"
    if r["state"] == UNKNOWN:
        return (f"{what} UNKNOWN: no status file in {run / '.jobs'} and no longer known to the controller (it "
                f"never ran, or its node failed)")
    log = r["log"] or _log(run, r)
    return f"{what} {r['state']} (exit {r['exit']})" + (f"; log {log}" if log else "")


def why_stuck(r: dict) -> str:
    """Which of the job's requests the partition cannot meet, and the submit.sh option that fixes it."""
    p = fit.partition(r.get("partition") or None)
    if p is not None:
        cpus = int(r["cpus"]) if r.get("cpus", "").isdigit() else None
        mem = fit.parse_mem(r["mem"]) if r.get("mem") else None
        t = fit.parse_time(r["time"]) if r.get("time") else None
        over = fit.too_big(p, cpus, mem, t)
        if over:
            asks = {"--cpus-per-task": f"{cpus} CPUs per task", "--mem": f"{r.get('mem')} of memory",
                    "--time": f"{r.get('time')} of time"}
            return "; ".join(f"it asks for {asks[opt]} and partition {p.name} offers at most {offer}: pass {opt} "
                             f"{offer} (or less) to submit.sh" for opt, offer in over)
    return "it asks for more than the partition offers; see submit.sh's --time/--mem/--cpus-per-task/--gres"


def _dependencies(text: str) -> list[str]:
    return re.findall(r":(\d+)", text or "")


def _span(tasks: list[str]) -> str:
    nums = [int(t) for t in tasks]
    return f"{nums[0]}-{nums[-1]}" if nums == list(range(nums[0], nums[-1] + 1)) else ",".join(tasks)


def _log(run: Path, r: dict) -> str:
    """The task's log as submit.sh names it (RUN_DIR/logs/STEP.JOB[_TASK].log), when it exists."""
    step = re.sub(r"^igd-", "", r["name"]).removesuffix(f"-{run.name}")
    path = run / "logs" / f"{step}.{r['job']}{'_' + r['task'] if r['task'] else ''}.log"
    return str(path) if path.exists() else ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
