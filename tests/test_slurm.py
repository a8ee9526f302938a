"""The cluster route on a real SLURM (issue 20): a one-node cluster started in a temp folder by
``cluster/slurm/local-cluster.sh``, the shipped job scripts submitted by ``cluster/slurm/submit.sh``, and the faults a
scheduler brings (scancel, requeue, a failing task). Skipped, with the reason, where SLURM cannot be had.

Jobs call igd through ``IGD_ACTIVATE`` (a shell line run at the top of every job): here it defines ``igd`` as this
interpreter running this tree, and, for the fault tests, holds array task 1 of the ranking at a gate so that the
test can cancel or requeue it while it runs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from igd_cli.artifacts import load_artifact

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "cluster" / "slurm"
RANK = ["--n-probe", "120", "--batch-size", "64"]
#: the whole method at tiny budgets (--attack aa: rank, calibrate-k, then the defended evaluation)
CHAIN = [*RANK, "--n-examples", "9", "--attack", "aa", "--steps", "2", "--queries", "20", "--draws", "3"]
#: the local node has 2 CPUs: ask for one per task so that two tasks run at once
RESOURCES = ["--cpus-per-task", "1", "--mem", "1G", "--time", "00:10:00"]
FIGURES = ("n_examples", "clean_accuracy", "clean_accuracy_std", "base_clean_accuracy", "robust_accuracy",
           "base_robust_accuracy", "robust_accuracy_std", "worst_case", "worst_case_std", "worst_case_majority",
           "worst_case_all_draws", "base_worst_case", "draws", "protocol", "randomized", "measured_on_survivors",
           "eps", "mode", "k", "layer", "n_neurons", "calibration", "probe", "preset", "budgets")
PIECES = "pieces"  # where the pieces of a run go (igd pipeline --piece)


class Cluster:
    def __init__(self, folder: Path, home: Path):
        self.folder, self.home = folder, home
        self.conf = folder / "slurm.conf"

    def env(self, gate: Path | None = None) -> dict[str, str]:
        activate = f'igd() {{ {shlex.quote(sys.executable)} -m igd_cli "$@"; }}'
        if gate is not None:  # hold array task 1 of the ranking until the test opens the gate
            activate += (f'; if [ "${{SLURM_ARRAY_TASK_ID:-}}" = 1 ] && [ "$SLURM_JOB_NAME" = "igd-rank-'
                         f'$(basename "$IGD_RUN")" ]; then touch {gate}.started.${{SLURM_RESTART_COUNT:-0}}; '
                         f'while [ ! -e {gate}.open ]; do sleep 0.2; done; fi')
        return {**os.environ, "SLURM_CONF": str(self.conf), "PYTHONPATH": str(REPO), "IGD_ACTIVATE": activate,
                "IGD_NO_PROGRESS": "1", "IGD_HOME": str(self.home)}

    def submit(self, run: Path, *args: str, gate: Path | None = None, wait: bool = True, shards: int = 3,
               timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [str(SLURM / "submit.sh"), str(run), "--shards", str(shards), *(["--wait"] if wait else []),
               *RESOURCES, *args]
        return subprocess.run(cmd, env=self.env(gate), capture_output=True, text=True, timeout=timeout, cwd=run.parent)

    def wait(self, run: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SLURM / "wait.py"), str(run / "cluster" / "jobs.tsv")],
                              env=self.env(), capture_output=True, text=True, timeout=600)

    def scontrol(self, *args: str) -> None:
        subprocess.run(["scontrol", *args], env=self.env(), check=True, capture_output=True, timeout=30)

    def scancel(self, job: str) -> None:
        subprocess.run(["scancel", job], env=self.env(), check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root (run the tests as root, as CI does)")
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch")
               if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                    f"slurm-client munge (.ci/run does it)")
    folder = tmp_path_factory.mktemp("slurm")
    script = SLURM / "local-cluster.sh"
    up = subprocess.run([str(script), "up", str(folder)], capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        subprocess.run([str(script), "down", str(folder)], capture_output=True, timeout=60)
        pytest.skip(f"the local SLURM cluster did not start: {(up.stderr or up.stdout).strip().splitlines()[-1:]}")
    assert up.stdout.strip() == f"export SLURM_CONF={folder / 'slurm.conf'}"
    try:
        yield Cluster(folder, tmp_path_factory.mktemp("igd-home"))
    finally:
        subprocess.run([str(script), "down", str(folder)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``igd rank`` unsharded, in a process of its own."""
    out = tmp_path_factory.mktemp("ref") / "importance.safetensors"
    subprocess.run([sys.executable, "-m", "igd_cli", "rank", *RANK, "--out", str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "IGD_NO_PROGRESS": "1"}, capture_output=True)
    return load_artifact(out)["importance"]


def _jobs(run: Path) -> dict[str, str]:
    """job name prefix (rank, merge-importance, ...) -> job id of the latest submission"""
    tag = run.name
    return {name.removeprefix("igd-").removesuffix(f"-{tag}"): jid
            for name, jid in (line.split("\t") for line in (run / "cluster" / "jobs.tsv").read_text().splitlines())}


def _records(run: Path, step: str) -> list[dict]:
    """Every igd --json line that the tasks of ``step`` printed into their logs, all submissions."""
    out = []
    for log in sorted((run / "logs").glob(f"{step}.*.log")):
        out += [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return out


def _until(path: Path, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


def _importance(run: Path) -> torch.Tensor:
    (path,) = run.glob("importance-*.safetensors")
    return load_artifact(path, kind="importance")["importance"]


def _rank_piece(run: Path, a: int, b: int) -> Path:
    return run / PIECES / f"importance-lo-ir-block3.{a:05d}-{b:05d}.safetensors"


def test_sharded_ranking_equals_the_unsharded_ranking(cluster, reference, tmp_path):
    run = tmp_path / "run"
    r = cluster.submit(run, "--until", "rank", "--", *RANK)
    assert r.returncode == 0, r.stderr
    assert "all 4 jobs and array tasks completed" in r.stdout
    assert torch.equal(_importance(run), reference)  # bitwise
    recs = _records(run, "rank")
    assert sorted(tuple(x["neurons"]) for x in recs) == [(0, 42), (42, 85), (85, 128)]
    assert not any(x["skipped"] for x in recs)
    assert sorted(p.name for p in (run / "logs").iterdir()) == sorted(
        [f"rank.{_jobs(run)['rank']}_{i}.log" for i in range(3)] + [f"merge-importance.{_jobs(run)['merge-importance']}.log"])
    # a resubmitted finished run exits at once: every shard is skipped, the result is the same
    r = cluster.submit(run, "--until", "rank", "--", *RANK)
    assert r.returncode == 0, r.stderr
    assert [x["skipped"] for x in _records(run, "rank")].count(True) == 3
    assert torch.equal(_importance(run), reference)


def test_scancel_of_a_running_task_then_a_rerun(cluster, reference, tmp_path):
    run, gate = tmp_path / "run", tmp_path / "gate"
    r = cluster.submit(run, "--until", "rank", "--", *RANK, gate=gate, wait=False)
    assert r.returncode == 0, r.stderr
    _until(Path(f"{gate}.started.0"))  # task 1 is running (held at the gate)
    rank_job = _jobs(run)["rank"]
    shard = run / PIECES
    _until(_rank_piece(run, 0, 42))
    _until(_rank_piece(run, 85, 128))
    cluster.scancel(f"{rank_job}_1")
    w = cluster.wait(run)
    assert w.returncode == 1
    err = w.stderr.strip().splitlines()
    assert any(f"igd-rank-run (job {rank_job}, array task 1) CANCELLED" in line for line in err), w.stderr
    assert any(line.startswith("error: igd-merge-importance-run") and "never ran" in line for line in err), w.stderr
    assert not list(run.glob("importance-*.safetensors"))  # the merge never ran
    assert not _rank_piece(run, 42, 85).exists()
    done = {p.name: p.stat().st_mtime_ns for p in shard.iterdir()}
    gate.with_name(gate.name + ".open").touch()
    r = cluster.submit(run, "--until", "rank", "--", *RANK)
    assert r.returncode == 0, r.stderr
    assert torch.equal(_importance(run), reference)
    for name, mtime in done.items():  # finished shards were not recomputed
        assert (shard / name).stat().st_mtime_ns == mtime
    second = [x for x in _records(run, "rank") if x["skipped"]]
    assert sorted(tuple(x["neurons"]) for x in second) == [(0, 42), (85, 128)]
    assert [tuple(x["neurons"]) for x in _records(run, "rank") if not x["skipped"]].count((42, 85)) == 1


def test_requeue_of_a_running_task(cluster, reference, tmp_path):
    run, gate = tmp_path / "run", tmp_path / "gate"
    r = cluster.submit(run, "--until", "rank", "--", *RANK, gate=gate, wait=False)
    assert r.returncode == 0, r.stderr
    _until(Path(f"{gate}.started.0"))
    task = f"{_jobs(run)['rank']}_1"
    cluster.scontrol("requeue", task)  # preemption: the task is killed and queued again
    gate.with_name(gate.name + ".open").touch()
    # SLURM holds a requeued job ~2 min before it may start again (BeginTime): release it as soon as it is held
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        show = subprocess.run(["scontrol", "show", "job", "-o", task], env=cluster.env(), capture_output=True,
                              text=True).stdout
        if "JobState=PENDING" in show and "Reason=BeginTime" in show:
            cluster.scontrol("update", f"JobId={task}", "StartTime=now")
            break
        time.sleep(0.2)
    w = cluster.wait(run)
    assert w.returncode == 0, w.stderr
    assert Path(f"{gate}.started.1").exists()  # it ran a second time
    log = (run / "logs" / f"rank.{_jobs(run)['rank']}_1.log").read_text()
    assert "DUE TO JOB REQUEUE" in log
    assert torch.equal(_importance(run), reference)


@pytest.fixture(scope="module")
def pipeline_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    p = subprocess.run([sys.executable, "-m", "igd_cli", "pipeline", *CHAIN, "--out", str(out / "run"), "--json"],
                       env={**os.environ, "PYTHONPATH": str(REPO), "IGD_NO_PROGRESS": "1",
                            "IGD_HOME": str(out / "home")}, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), out / "run"


def test_whole_route_equals_igd_pipeline_and_a_failing_task_stops_its_dependents(cluster, pipeline_result, tmp_path):
    expected, pipe_run = pipeline_result
    run = tmp_path / "run"
    r = cluster.submit(run, "--", *CHAIN, timeout=900)
    assert r.returncode == 0, r.stderr
    got = json.loads((run / "result.json").read_text())
    for key in FIGURES:
        assert got[key] == expected[key], key
    pipe = {a.meta["kind"]: a for a in (load_artifact(p) for p in pipe_run.glob("*.safetensors"))}
    assert torch.equal(_importance(run), pipe["importance"]["importance"])
    (mask,) = run.glob("mask-*.safetensors")
    assert torch.equal(load_artifact(mask)["mask"], pipe["mask"]["mask"])

    # the pilot's sizing: size.py reads the tasks' logged seconds (each piece's --json line) and scales them
    sized = subprocess.run([sys.executable, str(SLURM / "size.py"), str(run), "--images", "900", "--json"],
                           capture_output=True, text=True, timeout=60)
    assert sized.returncode == 0, sized.stderr
    sized = json.loads(sized.stdout)
    evals = [x for x in _records(run, "evaluate") if not x.get("skipped")]
    assert len(evals) == 3 and sized["steps"]["evaluate"]["tasks_measured"] == 3
    slowest = max(x["seconds"] / (x["positions"][1] - x["positions"][0]) for x in evals)
    assert sized["steps"]["evaluate"]["seconds_per_unit"] == round(slowest, 4)
    assert {"rank", "calibrate", "evaluate", "merge-eval"} <= set(sized["steps"]) and sized["shards"] >= 1

    # fault: a corrupt evaluation shard -> its task fails, the merge and the final step never run, --wait names them
    first = (run / "result.json").read_text()
    (bad,) = (run / PIECES).glob("eval-aa-*.shard-1-of-3.safetensors")
    bad.write_bytes(b"\x00 not a safetensors file")
    (run / "result.json").unlink()
    r = cluster.submit(run, "--", *CHAIN, timeout=900)
    assert r.returncode == 1
    jobs = _jobs(run)
    assert f"error: igd-evaluate-run (job {jobs['evaluate']}, array task 1) FAILED (exit 2:0)" in r.stderr, r.stderr
    assert f"error: igd-merge-eval-run (job {jobs['merge-eval']}) never ran" in r.stderr, r.stderr
    assert f"error: igd-result-run (job {jobs['result']}) never ran" in r.stderr, r.stderr
    assert not (run / "result.json").exists()
    # remove the fault: the re-run recomputes that shard only and gives the same result
    bad.unlink()
    r = cluster.submit(run, "--", *CHAIN, timeout=900)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "result.json").read_text()) == {**json.loads(first), "seconds": json.loads(
        (run / "result.json").read_text())["seconds"]}
    evals = _records(run, "evaluate")
    assert [x.get("skipped", False) for x in evals].count(False) == 3 + 1  # first run: 3, after the fault: 1
    assert all(x["skipped"] for x in _records(run, "rank")[-3:])


def test_the_driver_refuses_bad_input_before_submitting_anything(cluster, tmp_path):
    run = tmp_path / "run"
    r = cluster.submit(run, "--", "--bogus", wait=False)
    assert r.returncode == 2 and r.stderr.strip() == "error: igd pipeline options: No such option: --bogus"
    r = cluster.submit(run, "--", *RANK, "--piece", "calibrate", wait=False)
    assert r.returncode == 2 and "--piece: the driver submits the pieces itself" in r.stderr
    r = cluster.submit(run, "--", *RANK, "--force", wait=False)
    assert r.returncode == 2 and "--force" in r.stderr
    r = cluster.submit(run, "--", *RANK, wait=False, shards=0)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --shards N")
    assert not (run / "cluster" / "jobs.tsv").exists()  # nothing was submitted
    # a run folder holds one run: other options on it are refused
    assert cluster.submit(run, "--until", "rank", "--", *RANK).returncode == 0
    r = cluster.submit(run, "--until", "rank", "--", "--n-probe", "60", wait=False)
    assert r.returncode == 2 and "holds a run with other options" in r.stderr


def test_several_masked_layers_through_the_route(cluster, tmp_path):
    """Two masked layers: the ranking is one job (plan.py), the rest sharded; result.json equals igd pipeline's."""
    chain = [*CHAIN, "--layer", "block2", "--layer", "block3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "IGD_NO_PROGRESS": "1", "IGD_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-m", "igd_cli", "pipeline", *chain, "--out", str(tmp_path / "plain"),
                        "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    expected = json.loads(p.stdout)
    run = tmp_path / "run"
    r = cluster.submit(run, "--", *chain, shards=2, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "rank" not in _jobs(run)  # no ranking array: merge-importance ranks both layers in one job
    got = json.loads((run / "result.json").read_text())
    assert set(got["k"]) == {"block2", "block3"}
    for key in FIGURES:
        assert got[key] == expected[key], key
    (mask,) = run.glob("mask-*.safetensors")
    want = load_artifact(expected["paths"]["mask"])
    have = load_artifact(mask)
    assert set(have.tensors) == set(want.tensors) and all(torch.equal(have[t], want[t]) for t in want.tensors)
