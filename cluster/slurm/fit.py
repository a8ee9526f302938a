"""Fit the job scripts' resources to the partition (used by ``cluster/slurm/submit.sh`` and ``wait.py``).

``python3 cluster/slurm/fit.py SLURM_DIR [--partition P] [--cpus-per-task C] [--mem M] [--time T]`` reads the
largest node of partition P (default: the default partition) and its time limit from ``sinfo``, and prints one
line per job script: the script's name, then (tab-separated) the sbatch options it needs beyond its ``#SBATCH``
defaults. A default that asks more CPUs, memory or time than the partition offers (such a job would pend forever
with reason ``PartitionConfig``; e.g. the scripts' 4 CPUs per task on 2-CPU nodes) becomes the partition's
largest, said in one note line on stderr. An explicit value that no node offers is one error line (exit 2),
before anything is submitted. Where ``sinfo`` is missing or does not know the partition, nothing changes.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = ("rank.sbatch", "calibrate.sbatch", "attack.sbatch", "evaluate.sbatch", "merge.sbatch", "result.sbatch")


@dataclass
class Partition:
    name: str
    cpus: int  # the largest node's CPUs
    mem_mb: int  # the largest node's memory
    time_s: float | None  # the partition's time limit (None: infinite)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_mem(text: str) -> int | None:
    """sbatch's --mem (``8G``, ``500M``, ``1024``: megabytes) in MB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", text.strip().upper())
    if not m:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[m.group(2)]
    return int(float(m.group(1)) * scale)


def parse_time(text: str) -> float | None:
    """SLURM's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in seconds; None: infinite."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", ""):
        return None
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = [float(p) for p in rest.split(":")]
    if "-" in text:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = 0, parts[0], 0
    return ((float(days) * 24 + h) * 60 + m) * 60 + s


def format_time(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    return (f"{d}-" if d else "") + f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def partition(name: str | None) -> Partition | None:
    """The partition ``name`` (None: the default one) as ``sinfo`` sees it, or None where it cannot tell."""
    try:
        args = ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%l"] + (["-p", name] if name else [])
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 3]
    if out.returncode != 0 or not rows:
        return None
    if name is None:  # the default partition is marked with *
        rows = [r for r in rows if r[0].endswith("*")]
        if not rows:
            return None
    try:
        return Partition(rows[0][0].rstrip("*"), max(int(r[1].rstrip("+")) for r in rows),
                         max(int(r[2].rstrip("+")) for r in rows), parse_time(rows[0][3]))
    except ValueError:
        return None


def defaults(script: Path) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of a job script."""
    out = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)=(\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def too_big(p: Partition, cpus: int | None, mem_mb: int | None, time_s: float | None) -> list[tuple[str, str]]:
    """What a job asking these resources cannot get in ``p``: (option, what the partition offers) pairs."""
    out = []
    if cpus is not None and cpus > p.cpus:
        out.append(("--cpus-per-task", f"{p.cpus}"))
    if mem_mb is not None and mem_mb > p.mem_mb:
        out.append(("--mem", f"{p.mem_mb}M"))
    if time_s is not None and p.time_s is not None and time_s > p.time_s:
        out.append(("--time", format_time(p.time_s)))
    return out


def fit(here: Path, p: Partition, given: dict[str, str | None]) -> dict[str, list[str]]:
    """Per script, the options that make its defaults fit ``p`` (the given options are left to submit.sh)."""
    for opt, value in given.items():
        if value is None:
            continue
        try:
            ask = {"cpus-per-task": lambda v: (int(v), None, None), "mem": lambda v: (None, parse_mem(v), None),
                   "time": lambda v: (None, None, parse_time(v))}[opt](value)
        except ValueError:
            continue  # sbatch says what is wrong with it
        for name, offer in too_big(p, *ask):
            fail(f"--{opt} {value}: partition {p.name} offers at most {offer} (sinfo); a job asking more never "
                 f"starts")
    out, notes = {}, {}
    for script in SCRIPTS:
        d = defaults(here / script)
        ask = (None if given.get("cpus-per-task") else int(d["cpus-per-task"]) if "cpus-per-task" in d else None,
               None if given.get("mem") else parse_mem(d["mem"]) if "mem" in d else None,
               None if given.get("time") else parse_time(d["time"]) if "time" in d else None)
        out[script] = [f"{name}={offer}" for name, offer in too_big(p, *ask)]
        for name, offer in too_big(p, *ask):
            notes.setdefault((name, offer), []).append(script.removesuffix(".sbatch"))
    for (name, offer), scripts in notes.items():
        print(f"note: partition {p.name} offers at most {offer} for {name}: the {', '.join(scripts)} jobs ask for "
              f"{offer} instead of their default (pass {name} to choose)", file=sys.stderr)
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="fit.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("here", type=Path, help="the folder of the job scripts")
    ap.add_argument("--partition")
    for opt in ("--cpus-per-task", "--mem", "--time"):
        ap.add_argument(opt)
    a = ap.parse_args(argv)
    p = partition(a.partition)
    if p is None:
        return
    for script, args in fit(a.here, p, {"cpus-per-task": a.cpus_per_task, "mem": a.mem, "time": a.time}).items():
        print("\t".join([script, *args]))


if __name__ == "__main__":
    main(sys.argv[1:])
