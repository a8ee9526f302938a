"""The cluster route on a real SLURM: a one-node cluster started in a temp folder by ``cluster/slurm/local-cluster.sh``,
the shipped job scripts submitted by ``cluster/slurm/submit.sh``, and the faults a scheduler brings (scancel, requeue,
a failing task, a re-submission while the first one runs, a failed activation). Skipped, with the reason, where
SLURM cannot be had; under ``CI=true`` (``.ci/run``) that is a failure instead, so CI cannot go green without them.

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
#: the same with the default attack, IW-WC (the paper's nine attacks and the adaptive tenth column)
CHAIN_IW_WC = [*RANK, "--n-examples", "6", "--steps", "2", "--queries", "20", "--eot-iter", "1", "--draws", "2"]
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


def unavailable(reason: str) -> None:
    """Skip a scheduler test that cannot have SLURM, saying why; under CI=true fail it instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the scheduler tests must run)", pytrace=False)
    pytest.skip(reason)


def test_a_scheduler_test_without_slurm_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"not installed \(CI=true: the scheduler tests must run\)"):
        unavailable("SLURM is not installed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="SLURM is not installed"):
        unavailable("SLURM is not installed")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if os.name != "posix" or os.geteuid() != 0:
        unavailable("the local SLURM cluster runs its daemons as root (run the tests as root, as CI does)")
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch")
               if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        unavailable(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                    f"slurm-client munge (.ci/run does it)")
    folder = tmp_path_factory.mktemp("slurm")
    script = SLURM / "local-cluster.sh"
    up = subprocess.run([str(script), "up", str(folder)], capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        subprocess.run([str(script), "down", str(folder)], capture_output=True, timeout=60)
        unavailable(f"the local SLURM cluster did not start: {(up.stderr or up.stdout).strip().splitlines()[-1:]}")
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
    return {name.removeprefix("igd-").removesuffix(f"-{tag}"): jid for name, jid, *_ in
            (line.split("\t") for line in (run / "cluster" / "jobs.tsv").read_text().splitlines())}


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

    # every job and array task recorded its own exit: --wait needs no controller that still remembers them
    jobs = _jobs(run)
    want = {f"{jobs[a]}_{i}" for a in ("rank", "attack", "evaluate") for i in range(3)} | \
        {jobs[j] for j in ("merge-importance", "calibrate", "merge-eval", "result")}
    statuses = {p.name.removesuffix(".status"): json.loads(p.read_text()) for p in (run / ".jobs").iterdir()}
    assert set(statuses) == want and all(v["exit"] == 0 for v in statuses.values()), statuses
    forgot = _forgetful_controller(tmp_path)
    w = subprocess.run([sys.executable, str(SLURM / "wait.py"), str(run / "cluster" / "jobs.tsv")],
                       env={**cluster.env(), "PATH": f"{forgot}{os.pathsep}{os.environ['PATH']}"},
                       capture_output=True, text=True, timeout=120)
    assert w.returncode == 0 and w.stdout.strip() == "all 13 jobs and array tasks completed", w.stderr

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


def _forgetful_controller(tmp_path: Path) -> Path:
    """A folder with ``scontrol`` and ``sacct`` as a SLURM without accounting answers MinJobAge after the jobs ended."""
    folder = tmp_path / "forgetful"
    folder.mkdir(exist_ok=True)
    for name, say in (("scontrol", "slurm_load_jobs error: Invalid job id specified"),
                      ("sacct", "sacct: error: Slurm accounting storage is disabled")):
        (folder / name).write_text(f"#!/usr/bin/env bash\necho '{say}' >&2\nexit 1\n")
        (folder / name).chmod(0o755)
    return folder


def test_a_resubmission_keeps_the_earlier_jobs_and_waits_for_them(cluster, reference, tmp_path):
    """Re-running the driver while its first submission still runs (task 1 of the ranking held at a gate): jobs.tsv
    keeps both submissions, the second --wait waits for the first one's running jobs too, and quoted
    --sbatch-args values reach sbatch whole."""
    run, gate = tmp_path / "run", tmp_path / "gate"
    r = cluster.submit(run, "--until", "rank", "--sbatch-args", "--comment='igd first'", "--", *RANK, gate=gate,
                       wait=False, shards=2)
    assert r.returncode == 0, r.stderr
    _until(Path(f"{gate}.started.0"))
    first = _jobs(run)
    show = subprocess.run(["scontrol", "show", "job", first["rank"]], env=cluster.env(), capture_output=True,
                          text=True).stdout
    assert "Comment=igd first" in show, show
    cmd = [str(SLURM / "submit.sh"), str(run), "--shards", "2", "--wait", *RESOURCES, "--until", "rank",
           "--sbatch-args", "--comment='igd second'", "--sbatch-args", "--nice=0", "--", *RANK]
    second = subprocess.Popen(cmd, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _until(run / "importance-lo-ir-block3.safetensors")  # the second submission's merge (the first's waits)
        time.sleep(6)  # three polls of --wait
        assert second.poll() is None, second.communicate()  # the first submission's task 1 still runs
    finally:
        gate.with_name(gate.name + ".open").touch()
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert out.strip().splitlines()[-1] == ("all 3 jobs and array tasks completed, and 2 jobs of an earlier "
                                           "submission ended")
    lines = [line.split("\t") for line in (run / "cluster" / "jobs.tsv").read_text().splitlines()]
    assert [(name, sub) for name, _, _, sub in lines] == [("igd-rank-run", "1"), ("igd-merge-importance-run", "1"),
                                                          ("igd-rank-run", "2"), ("igd-merge-importance-run", "2")]
    assert lines[0][1] == first["rank"] and lines[0][2] == "0-1"
    assert torch.equal(_importance(run), reference)
    assert cluster.wait(run).returncode == 0


def test_defaults_the_partition_cannot_give_and_a_failed_activation(cluster, tmp_path):
    """The scripts ask 4 CPUs per task; a partition whose node has fewer gets the node's (a note says so) instead of
    a job that pends forever; an explicit request no node offers fails before anything is submitted. A failed
    IGD_ACTIVATE fails the job, saying so in its log, and never runs whatever igd is on PATH."""
    node_cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], env=cluster.env(), capture_output=True,
                                   text=True).stdout.split()[0].rstrip("+"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "igd").write_text("#!/usr/bin/env bash\necho 'not the igd of IGD_ACTIVATE'\n")
    (bin_dir / "igd").chmod(0o755)
    env = {**cluster.env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "IGD_ACTIVATE": 'if [ -n "${SLURM_JOB_ID:-}" ]; then source /nonexistent/venv/bin/activate; fi'}
    run = tmp_path / "run"
    base = [str(SLURM / "submit.sh"), str(run), "--shards", "2", "--mem", "1G", "--time", "00:05:00"]
    r = subprocess.run([*base, "--cpus-per-task", str(node_cpus + 1), "--", *RANK], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --cpus-per-task {node_cpus + 1}: partition local "
                                                      f"offers at most {node_cpus} (sinfo); a job asking more "
                                                      f"never starts")
    assert not (run / "cluster" / "jobs.tsv").exists()
    r = subprocess.run([*base, "--wait", "--until", "rank", "--", *RANK], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1
    jobs = _jobs(run)
    if node_cpus < 4:
        assert (f"note: partition local offers at most {node_cpus} for --cpus-per-task: the rank, calibrate, attack, "
                f"evaluate jobs ask for {node_cpus} instead of their default") in r.stderr
    show = subprocess.run(["scontrol", "show", "job", jobs["rank"]], env=env, capture_output=True, text=True).stdout
    assert f"MinCPUsNode={min(4, node_cpus)}" in show
    assert f"error: igd-rank-run (job {jobs['rank']}, array tasks 0-1) FAILED (exit 1:0)" in r.stderr, r.stderr
    assert f"error: igd-merge-importance-run (job {jobs['merge-importance']}) never ran" in r.stderr, r.stderr
    log = (run / "logs" / f"rank.{jobs['rank']}_0.log").read_text()
    assert "error: IGD_ACTIVATE failed (exit 1): if [ -n" in log and "not the igd" not in log, log
    assert json.loads((run / ".jobs" / f"{jobs['rank']}_0.status").read_text())["exit"] == 1


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


def _plain_pipeline(chain: list[str], tmp_path: Path) -> dict:
    """What the plain ``igd pipeline CHAIN --json`` prints, run off the cluster in ``tmp_path/plain``: the route's
    result.json must equal it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "IGD_NO_PROGRESS": "1", "IGD_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-m", "igd_cli", "pipeline", *chain, "--out", str(tmp_path / "plain"),
                        "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)

def test_several_masked_layers_and_iw_wc_through_the_route(cluster, tmp_path):
    """Two masked layers and the default attack (IW-WC) at tiny budgets: the ranking is one job (plan.py), the rest
    sharded; result.json equals igd pipeline's."""
    chain = [*CHAIN_IW_WC, "--layer", "block2", "--layer", "block3"]
    expected = _plain_pipeline(chain, tmp_path)
    run = tmp_path / "run"
    r = cluster.submit(run, "--", *chain, shards=2, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "rank" not in _jobs(run)  # no ranking array: merge-importance ranks both layers in one job
    got = json.loads((run / "result.json").read_text())
    assert set(got["k"]) == {"block2", "block3"}
    assert len(got["robust_accuracy"]) == 10  # IW-WC: the nine transfer and adaptive attacks, and the tenth column
    for key in (*FIGURES, "iw_wc_paper", "iw_wc_paper_std", "iw_wc_paper_majority", "iw_wc_paper_all_draws"):
        assert got[key] == expected[key], key
    (mask,) = run.glob("mask-*.safetensors")
    want = load_artifact(expected["paths"]["mask"])
    have = load_artifact(mask)
    assert set(have.tensors) == set(want.tensors) and all(torch.equal(have[t], want[t]) for t in want.tensors)


def test_a_user_defence_through_the_route(cluster, tmp_path):
    """igd pipeline --defense on the route: no ranking or calibration job, the transfer and evaluation arrays, and
    result.json equal to the plain igd pipeline --defense (a randomized defence, scored by repeated draws)."""
    chain = ["--defense", f"{REPO / 'examples' / 'defenses' / 'smoothing.py'}:smoothing", "--n-examples", "6",
             "--steps", "2", "--queries", "20", "--eot-iter", "1", "--draws", "2", "--batch-size", "64"]
    expected = _plain_pipeline(chain, tmp_path)
    run = tmp_path / "run"
    r = cluster.submit(run, "--until", "calibrate", "--", *chain, wait=False, shards=2)
    assert r.returncode == 2 and "a --defense run has no ranking or calibration" in r.stderr, r.stderr
    r = cluster.submit(run, "--", *chain, shards=2, timeout=900)
    assert r.returncode == 0, r.stderr
    assert set(_jobs(run)) == {"attack", "evaluate", "merge-eval", "result"}
    got = json.loads((run / "result.json").read_text())
    assert got["defense"]["callable"] == "smoothing" and got["randomized"] is True and got["k"] is None
    for key in (*FIGURES, "iw_wc_paper", "iw_wc_paper_std", "defense"):
        assert got[key] == expected[key], key


def test_the_plan_refuses_a_broken_defence_on_the_login_node(tmp_path):
    """plan.py builds a --defense once before anything is submitted: a defence that fails is one error line there,
    not a failed array of jobs (no scheduler needed)."""
    (tmp_path / "broken.py").write_text("def broken(base):\n    raise RuntimeError('no such layer')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "IGD_NO_PROGRESS": "1", "IGD_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, str(SLURM / "plan.py"), str(tmp_path / "run"), "2", "--",
                        "--defense", f"{tmp_path / 'broken.py'}:broken"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: --defense") and "no such layer" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "cluster" / "plan.json").exists()
    ok = subprocess.run([sys.executable, str(SLURM / "plan.py"), str(tmp_path / "run"), "2", "--", "--defense",
                         f"{REPO / 'examples' / 'defenses' / 'bit_depth.py'}:bit_depth", "--n-examples", "8"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    assert plan["defense"] == "yes" and plan["rank_shards"] == 0 and plan["n_examples"] == 8
