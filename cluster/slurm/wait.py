"""``submit.sh --wait``: block until every job of a run has ended, then name each one that did not complete.

``python cluster/slurm/wait.py RUN_DIR/cluster/jobs.tsv`` (lines ``NAME<TAB>JOB_ID``). States come from ``sacct``
where accounting is on, else from ``scontrol show job`` (which keeps a finished job for MinJobAge seconds).
Exit 0 when every job and array task COMPLETED, else 1 with one line per job that did not, each naming the job,
its array task, state, exit code and log; jobs cancelled because a predecessor failed are named as such.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

#: pending reasons that no waiting cures: the job asks for more than the partition has
STUCK = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit", "ReqNodeNotAvail"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "REVOKED"}


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


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
                    "exit": code, "reason": reason, "log": ""})
    return out


def states_scontrol(ids: list[str]) -> list[dict]:
    out = []
    for jid in ids:
        p = _run("scontrol", "show", "job", "-o", jid)
        if p.returncode != 0:
            out.append({"job": jid, "task": "", "name": "?", "state": "UNKNOWN (no longer known to the controller; "
                        "raise MinJobAge or enable accounting)", "exit": "", "reason": "", "log": ""})
            continue
        for line in p.stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            out.append({"job": f.get("ArrayJobId", f.get("JobId", jid)), "task": f.get("ArrayTaskId", ""),
                        "name": f.get("JobName", ""), "state": f.get("JobState", ""), "exit": f.get("ExitCode", ""),
                        "reason": f.get("Reason", ""), "log": f.get("StdOut", "")})
    return out


def main(jobs_tsv: str, poll: float = 2.0) -> int:
    ids = [line.split("\t")[1].strip() for line in Path(jobs_tsv).read_text().splitlines() if line.strip()]
    while True:
        recs = states_sacct(ids)
        if recs is None or not recs:
            recs = states_scontrol(ids)
        active = [r for r in recs if r["state"] not in FINAL and not r["state"].startswith("UNKNOWN")]
        if recs and not active:
            break
        stuck = [r for r in active if r["state"] == "PENDING" and r["reason"] in STUCK]
        if stuck and all(r["state"] == "PENDING" and r["reason"] in STUCK | {"Dependency"} for r in active):
            break  # nothing runs and nothing can: report instead of waiting forever
        time.sleep(poll)
    bad = [r for r in recs if r["state"] != "COMPLETED"]
    for r in bad:
        what = f"{r['name']} (job {r['job']}" + (f", array task {r['task']}" if r["task"] else "") + ")"
        if r["state"] == "PENDING" and r["reason"] == "Dependency":
            print(f"error: {what} never ran: it waits on a job that cannot start", file=sys.stderr)
        elif r["state"] == "PENDING":
            print(f"error: {what} cannot start ({r['reason']}: it asks for more than the partition offers; "
                  f"see --time/--mem/--cpus-per-task/--gres); cancel the run with scancel", file=sys.stderr)
        elif r["reason"] == "DependencyNeverSatisfied":
            print(f"error: {what} never ran: a job it depends on did not complete", file=sys.stderr)
        else:
            log = f"; log {r['log']}" if r["log"] else ""
            print(f"error: {what} {r['state']} (exit {r['exit']}){log}", file=sys.stderr)
    if not bad:
        print(f"all {len(recs)} jobs and array tasks completed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
