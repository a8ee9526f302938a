"""Every file a user receives speaks of the product only: no word about how its making was organised (an issue
number with no tracker behind it, sessions, rounds, machines lent or not) and no path of the machine a file was
made on. Checked over every tracked file outside tests/; results files also name no absolute path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: words from outside the product, anywhere outside tests/
WORDS = {
    "an issue number": r"\bissues? #?\d+",
    "a stop number": r"\bstop \d+",
    "a session": r"\bsessions?\b",
    "the development machine": r"\bdevelopment machine\b",
    "a machine lent": r"\bno GPU was lent\b|\b(?:GPU|machine) (?:was|were) lent\b",
    "a round of work": r"\bthis round\b|\bround's changes\b",
    "the specs' folder": r"\.\./shared\b",
    "a path of the machine": r"(?<![\w.~$-])/(?:work|root)/",
}
#: and in results files (benchmarks/results/), which record where they were made: no absolute path at all
RESULTS_PATHS = r"(?<![\w.~$-])/(?:work|root|home|tmp|Users|scratch|mnt)/"


def tracked_files() -> list[Path]:
    """The repository's files (git's list; without git, every file but caches and build outputs)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "__pycache__", "site", "runs", "build", ".pytest_cache"}
        files = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return [p for p in files if p.is_file() and not p.is_symlink() and p.relative_to(ROOT).parts[0] != "tests"]


def text(path: Path) -> str | None:
    data = path.read_bytes()
    return None if b"\0" in data[:4096] else data.decode("utf-8", errors="replace")


def findings(path: Path, content: str) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    patterns = dict(WORDS)
    if rel.startswith("benchmarks/results/"):
        patterns["an absolute path"] = RESULTS_PATHS
    found = []
    for n, line in enumerate(content.splitlines(), 1):
        for what, pattern in patterns.items():
            m = re.search(pattern, line, flags=re.IGNORECASE)
            if m:
                found.append(f"{rel}:{n}: {what}: …{line[max(0, m.start() - 40):m.end() + 40]}…")
    return found


def test_no_word_from_outside_the_product_in_any_tracked_file():
    files = tracked_files()
    assert any(p.name == "README.md" for p in files) and any("benchmarks/results" in p.as_posix() for p in files)
    bad = [f for p in files if (t := text(p)) is not None for f in findings(p, t)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line, page", [
    ("### The GPU path (issue 23)", "CHANGELOG.md"),
    ("shared with five other sessions", "docs/adaptive.md"),
    ("measured on the CPU of the development machine", "docs/gpu.md"),
    ("(no GPU was lent)", "docs/adaptive.md"),
    ("the run before this round's changes", "docs/results.md"),
    ("final code of stop 25", "benchmarks/results/audit-demo-quick-cpu.json"),
    ("names as in `../shared/CLI.md`", "CONTRIBUTING.md"),
    ('"dataset": "/work/shared/data/cifar10-test-846.safetensors"', "benchmarks/results/layers-resnet18-cpu.json"),
    ('"mask": "/tmp/m13/layers/demo/mask-block3.safetensors"', "benchmarks/results/layers-demo-cpu.json"),
    ('"model": "/root/.pyenv/lib/python3.11/site-packages/pyautoattack/examples/model_test.pt"',
     "benchmarks/results/reproduce-cpu-quick.json"),
])
def test_each_kind_of_word_is_caught(line, page):
    """What the files held before they were cleaned: each is found (the check is not vacuous)."""
    assert findings(ROOT / page, line)


@pytest.mark.parametrize("line, page", [
    ("igd pipeline --workdir runs/adv", "docs/adaptive.md"),
    ('"workdir": "$TMPDIR/igd-bench/adv"', "benchmarks/results/layers-demo-cpu.json"),
    ("the loss surface of one round of APGD", "docs/audit.md"),
    ("sudo cluster/slurm/local-cluster.sh up /tmp/slurm", "docs/cluster.md"),
])
def test_product_words_pass(line, page):
    assert not findings(ROOT / page, line)
