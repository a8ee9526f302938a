"""Every ``igd …`` example in README.md and docs/**/*.md runs (reduced) or, where it needs what a test machine
lacks, parses with igd's real Typer parser; a failure names the page and line of the example.

What counts as an example: each line of a ```bash / ```sh / ```shell / ```console block whose command is ``igd``
(``$ `` prompts stripped; in a console block only prompt lines are commands, the rest is output; backslash
continuations joined; ``a && igd …`` / ``igd … | head`` keep the igd part; ``NAME=value`` / ``export NAME=value``
lines set variables for the page's later commands), and each inline code span ```igd …``` of the prose: a whole
command is checked like a block's; a *mention* that leaves out what the command requires (``igd attack --attack
adaptive``, ``igd defend-eval --adv``: defend-eval needs one of ``--mask`` and ``--defense``) must name an
existing command and options that command has. Blocks marked otherwise (```text, ```json, a bare ```` ``` ````:
output) are not examples. A *synopsis* (a line with ``…``, ``...``, ``[``, ``<`` or an ``a|b`` alternative) is
not a runnable command: only its command and the ``--options`` it names are checked against the parser. An
example that names a path outside the repository (``../shared``, ``/work/…``: not in a reader's clone) fails.

Each page runs in its own temporary working folder, its commands in order (so a page's later commands read what
its earlier ones wrote), with ``IGD_HOME`` in that folder, no network (``IGD_OFFLINE=1``), and the repository's
``examples/``, ``benchmarks/`` and ``artifacts/`` beside it; the demo model's ``imp.safetensors`` and
``mask.safetensors``, which a page may take as given (PREPARED), are made with ``igd rank`` / ``igd calibrate-k``
before the first command that reads them. A command the page repeats verbatim runs once. A command is only
*parsed* (every option and argument accepted by the real parser, types converted, nothing run) when it needs
something this machine lacks:

- a GPU (``--device cuda…`` without one);
- a download: a RobustBench zoo model (a ``--model`` that is neither ``demo`` nor a file), ``--method cd-ir``
  (CLIP weights), a torchvision data set (``--dataset cifar10`` …), ``igd fetch``;
- a data file of ``../shared/data`` that is absent (when present it is used: any input whose file name is one of
  those files, wherever the page says it lives, reads that file);
- a placeholder (``M``, ``IMP``, ``PATH.pt``, ``RUN_DIR``, ``defend:I/N``: a name in capitals; a path with
  ``…``), an input written by a command outside igd (EXTERNAL below) or by an earlier example on the page that
  was only parsed, or a file the reader brings (``--model weights.pt``: no example of the page writes it; a name
  within a typo of a file the page did write runs, and fails).

A command that runs is reduced by this substitution table (an option the example gives is capped; an option it
leaves out is added when the command takes it, so that a default budget is reduced too; the attack budgets
``--steps``/``--restarts``/``--queries``/``--eot-iter`` only where the command attacks):

    option          becomes                 why
    --n-examples    min(N, 8)               evaluation / calibration images
    --n-probe       min(N, 64)              ranking probe images (not added to a --defense run: it ranks nothing)
    --preset paper  --preset quick          the paper's attack budgets take GPU hours
    --steps         min(S, 2)               attack iterations (APGD, PGD, the shift analysis's PGD-50)
    --restarts      1                       attack restarts
    --queries       min(Q, 20)              Square / RayS queries
    --eot-iter      1                       EoT samples per step
    --draws         min(R, 2)               noise draws per candidate of a randomized model
    --checks        1,6,9 where not given   igd audit: its attack-strength checks run minutes per image on a
                                            CPU even so (tests/test_audit.py runs every check)

With these the figures differ from the page's; what is tested is that the documented command line is accepted and
runs to the end (exit 0). Commands outside igd (``python …``, ``pip …``, ``cluster/slurm/…``) are not run here.
"""

from __future__ import annotations

import difflib
import glob
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from .conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]

#: the substitution table of the docstring: option -> (kind, value); "cap": min(given, value), "set": value,
#: "map": {given: replacement}
SUBSTITUTIONS: dict[str, tuple[str, object]] = {
    "--n-examples": ("cap", 8),
    "--n-probe": ("cap", 64),
    "--preset": ("map", {"paper": "quick"}),
    "--steps": ("cap", 2),
    "--restarts": ("set", 1),
    "--queries": ("cap", 20),
    "--eot-iter": ("set", 1),
    "--draws": ("cap", 2),
}

#: the audit's checks an example runs when it names none (the docstring's table)
AUDIT_CHECKS = "1,6,9"

#: inputs made by a command outside igd (not run here): path pattern -> what makes it
EXTERNAL: dict[str, str] = {
    r"^runs/mnist-example/": "python scripts/train_mnist_example.py (trains a network)",
}

#: inputs a page may take as given for the demo model (its text says how they are made): made before the first
#: command that reads them, with these commands (reduced like the examples)
PREPARED: dict[str, list[str]] = {
    "imp.safetensors": ["rank", "--model", "demo", "--out", "imp.safetensors"],
    "mask.safetensors": ["calibrate-k", "--model", "demo", "--importance", "imp.safetensors", "--out",
                         "mask.safetensors"],
}

#: options whose value is a file or folder the command reads
INPUT_OPTIONS = ("--model", "--importance", "--mask", "--adv", "--dataset", "--probe-dataset", "--data-dir")
#: options whose value is a file or folder the command writes
OUTPUT_OPTIONS = ("--out", "--report", "--plot", "--plot-dir", "--workdir")
#: torchvision / ImageNet data set names: a download
DOWNLOAD_DATASETS = {"cifar10", "cifar100", "imagenet", "mnist", "svhn"}
#: the real data files the docs name (tests/conftest.py's SHARED_DATA when present)
SHARED_FILES = {"cifar10-test-846.safetensors", "cifar10-train-4660.safetensors", "mnist-test-10000.safetensors"}
COMMAND_LANGS = {"bash", "sh", "shell", "console", "zsh"}
SYNOPSIS = re.compile(r"…|\.\.\.|\[|<|\|")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$")
#: a path a reader's clone does not have (issue 24: examples name nothing outside the repository)
OUTSIDE = re.compile(r"(^|[=:])(\.\./shared\b|/work/)")
#: values in capitals that are not placeholders
LITERAL_CAPS = {"L2", "Linf"}
ASSIGN = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@dataclass
class Example:
    """One ``igd`` command of a page: where it is, its words after ``igd``, and whether it is a synopsis."""

    file: str
    line: int
    text: str
    argv: list[str] = field(default_factory=list)
    synopsis: bool = False
    inline: bool = False  # an inline code span of the prose (it may name a command without all it needs)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _split_commands(line: str) -> list[str]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;``, ``|``), comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    parts: list[list[str]] = [[]]
    try:
        for tok in lex:
            if tok and set(tok) <= set(";&|"):
                parts.append([])
            else:
                parts[-1].append(tok)
    except ValueError:  # unbalanced quotes: not a shell line
        return []
    return [shlex.join(p) for p in parts if p]


def _expand(word: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), word)


def extract(text: str, file: str) -> list[Example]:
    """Every ``igd`` example of a Markdown page, in page order (see the module docstring for the rules)."""
    out: list[Example] = []
    env: dict[str, str] = {}
    lines = text.splitlines()
    fence: str | None = None  # the language of the open fenced block ("" for a bare fence)
    prose: list[tuple[int, str]] = []
    i = 0

    def command(raw: str, lineno: int) -> None:
        for simple in _split_commands(raw):
            words = shlex.split(simple)
            if words and words[0] == "export":
                words = words[1:]
            m = ASSIGN.match(words[0]) if len(words) == 1 else None
            if m:
                env[m.group(1)] = _expand(m.group(2), env)
                continue
            if words and words[0] == "igd":
                add(" ".join(words), words, lineno)

    def add(simple: str, words: list[str], lineno: int, inline: bool = False) -> None:
        syn = bool(SYNOPSIS.search(simple))
        out.append(Example(file, lineno, simple, [_expand(w, env) for w in words[1:]], syn, inline))

    while i < len(lines):
        line = lines[i]
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if m:
            if fence is None:
                fence = m.group(2).lower()
            else:
                fence = None
            i += 1
            continue
        if fence is None:
            prose.append((i + 1, line))
            i += 1
            continue
        if fence not in COMMAND_LANGS:
            i += 1
            continue
        start = i
        s = line.strip()
        if fence == "console" and not s.startswith("$ "):
            i += 1  # output of the console session
            continue
        if s.startswith("$ "):
            s = s[2:]
        while s.endswith("\\") and i + 1 < len(lines):
            i += 1
            s = s[:-1] + " " + lines[i].strip()
        command(s, start + 1)
        i += 1
    # inline code spans in the prose (a span may wrap onto the next line)
    body = "\n".join(t for _, t in prose)
    starts = [n for n, _ in prose]
    for m in re.finditer(r"(?<!`)`(igd [^`]+)`(?!`)", body):
        span = " ".join(m.group(1).split())
        lineno = starts[body.count("\n", 0, m.start())]
        try:
            words = shlex.split(span)
        except ValueError:
            continue
        if len(words) >= 2 and re.match(r"^[a-z][a-z-]*$", words[1]):
            add(span, words, lineno, inline=True)
    return sorted(out, key=lambda e: e.line)


# --- the parser -------------------------------------------------------------------------------------------------

def _root():
    import typer

    from igd_cli.cli import app
    from igd_cli.commands import register_all

    register_all()
    return typer.main.get_command(app)


def parse(argv: list[str]):
    """Parse ``igd ARGV`` with igd's own parser (types converted, nothing run): the command object and its
    context. Raises the parser's usage error."""
    cmd = _root()
    ctx = cmd.make_context("igd", list(argv), resilient_parsing=False)
    while hasattr(cmd, "commands"):
        rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]
        if not rest:
            raise ValueError("no command given")
        _, sub, rest = cmd.resolve_command(ctx, rest)
        cmd, ctx = sub, sub.make_context(sub.name, rest, parent=ctx, resilient_parsing=False)
    return cmd, ctx


def parse_error(argv: list[str], *, partial: bool = False) -> str | None:
    """None when igd's parser accepts ``argv``, else its message in one line. ``partial``: a mention in the prose
    (``igd attack --attack adaptive``, ``igd defend-eval --adv``) may leave out required parameters or an
    option's value; everything it does say must still be accepted."""
    try:
        parse(argv)
        lacking = lacks_one_of(argv)
        if lacking:
            return synopsis_error(Example("", 0, "", list(argv), True)) if partial else lacking
    except Exception as exc:  # click's usage errors (vendored by typer) and our ValueError
        msg = " ".join(str(exc.format_message() if hasattr(exc, "format_message") else exc).split())
        incomplete = type(exc).__name__ in ("MissingParameter", "NoArgsIsHelpError") or (
            "requires an argument" in msg and argv and argv[-1].startswith("--"))
        if partial and incomplete:
            return synopsis_error(Example("", 0, "", list(argv), True))
        return msg
    return None


#: commands that need one of several options, which the parser cannot require (the command says so in one line)
ONE_OF: dict[str, tuple[str, ...]] = {"defend-eval": ("--mask", "--defense")}


def lacks_one_of(argv: list[str]) -> str | None:
    """``igd defend-eval`` without ``--mask`` or ``--defense``: the message, else None."""
    need = ONE_OF.get(argv[0]) if argv else None
    if need and not any(w.split("=")[0] in need for w in argv[1:]):
        return f"igd {argv[0]} needs one of {', '.join(need)}"
    return None


def option_names(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def synopsis_error(ex: Example) -> str | None:
    """A synopsis: its command path must exist and each ``--option`` it names must belong to that command."""
    cmd, words = _root(), [w for w in ex.argv]
    path = []
    while hasattr(cmd, "commands") and words and words[0] in cmd.commands:
        cmd = cmd.commands[words[0]]
        path.append(words.pop(0))
    if hasattr(cmd, "commands"):
        if not words or words[0].startswith(("…", "-", "[", "<")):
            return None
        missing = [w for w in re.split(r"\\?\|", words[0]) if w not in cmd.commands]
        return f"no command igd {' '.join(path + missing[:1])}" if missing else None
    known = option_names(cmd)
    for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(words)):
        if opt not in known:
            return f"igd {' '.join(path)} has no option {opt}"
    return None


# --- classification and substitution ----------------------------------------------------------------------------

def option_values(argv: list[str], name: str) -> list[tuple[int, str]]:
    """(index of the value, value) of every occurrence of ``--name V`` / ``--name=V``."""
    out = []
    for i, w in enumerate(argv):
        if w == name and i + 1 < len(argv):
            out.append((i + 1, argv[i + 1]))
        elif w.startswith(name + "="):
            out.append((i, w[len(name) + 1:]))
    return out


def _set_value(argv: list[str], i: int, name: str, value: str) -> None:
    argv[i] = f"{name}={value}" if argv[i].startswith(name + "=") else value


def inputs(cmd, ctx, argv: list[str]) -> list[tuple[str, str]]:
    """(option, path) of every file or folder the command reads (positional arguments included)."""
    out = [(name, v) for name in INPUT_OPTIONS for _, v in option_values(argv, name)]
    for p in cmd.params:
        if p.param_type_name == "argument":
            vals = ctx.params.get(p.name)
            for v in (vals if isinstance(vals, (list, tuple)) else [vals]):
                if v is not None:
                    out.append((p.name, str(v)))
    return out


def localize(argv: list[str]) -> list[str]:
    """Inputs named after a file of ``../shared/data`` read that file (when it is present); a word with ``*``
    expands as the shell would (files written by the page's earlier commands)."""
    argv = [w2 for w in argv for w2 in (sorted(glob.glob(w)) if "*" in w and glob.glob(w) else [w])]
    for name in INPUT_OPTIONS:
        for i, v in option_values(argv, name):
            p = Path(v)
            if name == "--data-dir" and p.name == "data" and "shared" in p.parts and SHARED_DATA.is_dir():
                _set_value(argv, i, name, str(SHARED_DATA))
            elif not p.exists() and (SHARED_DATA / p.name).is_file():
                _set_value(argv, i, name, str(SHARED_DATA / p.name))
    return argv


def parse_only_reason(cmd, ctx, argv: list[str], made_by_parsed: dict[str, int]) -> str | None:
    """Why the command can only be parsed here (None: it runs)."""
    if cmd.name == "fetch":
        return "igd fetch downloads"
    for _, dev in option_values(argv, "--device"):
        if dev.startswith("cuda") and not torch.cuda.is_available():
            return "needs a GPU"
    for _, m in option_values(argv, "--method"):
        if m == "cd-ir":
            return "CD-IR needs the CLIP weights (a download)"
    for w in argv:  # a placeholder value: --piece defend:I/N, --neurons A:B, --k K
        if not w.startswith("-") and any(PLACEHOLDER.match(seg) and seg not in LITERAL_CAPS
                                         for seg in re.split(r"[/:=,]", w)):
            return f"{w}: a placeholder"
    for opt, v in inputs(cmd, ctx, argv):
        base = v.split(":")[0] if opt == "--model" else v
        if opt in ("--dataset", "--probe-dataset") and v.lower() in DOWNLOAD_DATASETS:
            return f"{opt} {v}: a torchvision data set (a download)"
        if opt == "--model" and (v == "demo" or Path(v).exists()):
            continue
        if opt == "--model" and v.startswith("torchvision:"):
            return f"--model {v}: torchvision weights (a download)"
        if PLACEHOLDER.match(Path(base).name) or PLACEHOLDER.match(base) or "…" in v or "..." in v:
            return f"{opt} {v}: a placeholder"
        if Path(v).exists():
            continue
        if "*" in v:
            return f"{v}: no file of the page matches (they are made elsewhere)"
        for pat, why in EXTERNAL.items():
            if re.search(pat, v):
                return f"{v} is made outside igd: {why}"
        for made, line in made_by_parsed.items():
            if v == made or v.startswith(made.rstrip("/") + "/"):
                return f"{v} comes from the example on line {line}, itself only parsed"
        if Path(v).name in SHARED_FILES:
            return f"{opt} {v}: the data file is absent here"
        if opt == "--model" and "/" not in v and not Path(v).suffix:
            return f"--model {v}: a RobustBench zoo model (a download)"
        near = difflib.get_close_matches(v, [str(f) for f in Path(".").rglob("*") if "igd_home" not in f.parts
                                             and not f.is_symlink()], n=1, cutoff=0.85)
        if near:
            return None  # a near miss of a file the page made: run it, so that the typo fails
        return f"{opt} {v}: a file the reader brings (no example of the page writes it)"
    return None


#: options that only mean something when the command attacks (``--attack`` not ``none``): never added otherwise
ATTACK_BUDGETS = ("--steps", "--restarts", "--queries", "--eot-iter")


def attack_budgets(attack: str | None) -> set[str]:
    """The budget options an ``--attack`` value takes: one attack's own (its ``defaults``), all for a set of
    attacks (``iw-wc``, a pipeline, an ablation), none for ``none``."""
    from igd_cli.attacks import ATTACKS

    if attack in (None, "none"):
        return set()
    if attack in ATTACKS:
        return {"--" + k.replace("_", "-") for k in ATTACKS[attack].defaults}
    return set(ATTACK_BUDGETS)


def reduce(cmd, argv: list[str]) -> list[str]:
    """Apply :data:`SUBSTITUTIONS`: cap the options given, add the ones left out that the command takes (the
    attack budgets only where the command attacks)."""
    argv = list(argv)
    known = option_names(cmd)
    takes = attack_budgets(parse(argv)[1].params.get("attack", "iw-wc"))
    for name, (kind, value) in SUBSTITUTIONS.items():
        if name not in known or (name in ATTACK_BUDGETS and name not in takes and not option_values(argv, name)):
            continue
        given = option_values(argv, name)
        for i, v in given:
            if kind == "cap":
                new = str(min(int(v), int(value))) if v.isdigit() else v
            elif kind == "set":
                new = str(value)
            else:
                new = value.get(v, v)  # type: ignore[union-attr]
            _set_value(argv, i, name, new)
        if not given and kind != "map" and not (name == "--n-probe" and option_values(argv, "--defense")):
            argv += [name, str(value)]  # (igd pipeline --defense ranks nothing: no --n-probe)
    if argv and argv[0] == "audit" and not option_values(argv, "--checks"):
        argv += ["--checks", AUDIT_CHECKS]
    return argv


# --- running a page ---------------------------------------------------------------------------------------------

class _Log(list):
    """A list of log lines that also shows each line as it is added."""

    def __init__(self, show=None):
        super().__init__()
        self.show = show

    def append(self, line: str) -> None:
        super().append(line)
        if self.show is not None:
            self.show(line)


def check_page(examples: list[Example], workdir: Path, run, prepare=None, show=None) -> tuple[list[str], list[str]]:
    """Check a page's examples in order in ``workdir``; ``run(argv) -> (code, stderr)`` runs one command,
    ``prepare(cmd, ctx, argv)`` makes the :data:`PREPARED` inputs it needs. Returns (failures, log): each failure
    names ``file:line``."""
    failures: list[str] = []
    log = _Log(show)
    made_by_parsed: dict[str, int] = {}
    ran: dict[tuple[str, ...], int] = {}  # a command run once on the page (its line) is not run again
    for ex in examples:
        if ex.synopsis:
            err = synopsis_error(ex)
            log.append(f"{ex.where} synopsis {'FAIL ' + err if err else 'ok'}: igd {' '.join(ex.argv)}")
            if err:
                failures.append(f"{ex.where}: {ex.text}: {err}")
            continue
        outside = [w for w in ex.argv if OUTSIDE.search(w)]
        if outside:
            failures.append(f"{ex.where}: {ex.text}: names a path outside the repository: {outside[0]}")
            log.append(f"{ex.where} FAIL path outside the repository: {outside[0]}")
        err = parse_error(ex.argv, partial=ex.inline)
        if err:
            failures.append(f"{ex.where}: {ex.text}: does not parse: {err}")
            log.append(f"{ex.where} FAIL parse: {err}")
            continue
        if ex.inline and parse_error(ex.argv) is not None:
            log.append(f"{ex.where} mention, options ok: igd {' '.join(ex.argv)}")
            continue
        argv = localize(ex.argv)
        cmd, ctx = parse(argv)
        if prepare is not None:
            prepare(cmd, ctx, argv)
        reason = parse_only_reason(cmd, ctx, argv, made_by_parsed)
        if reason:
            for name in OUTPUT_OPTIONS:
                for _, v in option_values(argv, name):
                    made_by_parsed.setdefault(v, ex.line)
            log.append(f"{ex.where} parsed only ({reason}): igd {' '.join(ex.argv)}")
            continue
        small = reduce(cmd, argv)
        if tuple(small) in ran:
            log.append(f"{ex.where} same command as line {ran[tuple(small)]}, not run again")
            continue
        for name in OUTPUT_OPTIONS:
            for _, v in option_values(argv, name):
                made_by_parsed.pop(v, None)
        t0 = time.perf_counter()
        code, stderr = run(small)
        ran[tuple(small)] = ex.line
        log.append(f"{ex.where} ran, exit {code}, {time.perf_counter() - t0:.1f} s: igd {' '.join(small)}")
        if code != 0:
            last = (stderr.strip().splitlines() or ["(no message)"])[-1]
            failures.append(f"{ex.where}: {ex.text}: exit {code} (ran as: igd {' '.join(small)}): {last}")
    return failures, log


def preparer(run):
    """``prepare(cmd, ctx, argv)`` for :func:`check_page`: makes the missing :data:`PREPARED` inputs of a command
    on the demo model (and what they need first)."""

    def make(name: str) -> None:
        if Path(name).exists():
            return
        argv = PREPARED[name]
        for _, dep in option_values(argv, "--importance"):
            make(dep)
        code, err = run(reduce(parse(argv)[0], argv))
        assert code == 0, f"preparing {name}: igd {' '.join(argv)}: {err.strip()[-300:]}"

    def prepare(cmd, ctx, argv: list[str]) -> None:
        if any(m != "demo" for _, m in option_values(argv, "--model")):
            return
        for _, v in inputs(cmd, ctx, argv):
            if v in PREPARED:
                make(v)

    return prepare


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.fixture
def page_env(tmp_path, monkeypatch):
    """A working folder as a page's reader has it: the repository's examples/, benchmarks/, artifacts/ beside it, igd's
    home inside it, no network, no progress bars."""
    for name in ("examples", "benchmarks", "artifacts"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IGD_HOME", str(tmp_path / "igd_home"))
    for var, val in (("IGD_OFFLINE", "1"), ("IGD_NO_PROGRESS", "1"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, val)
    monkeypatch.delenv("IGD_DATA_DIR", raising=False)
    return tmp_path


def _runner(capsys):
    from igd_cli.cli import main

    def run(argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(argv))
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in doc_pages()])
def test_every_example_of_the_page_runs_or_parses(page, page_env, capsys):
    examples = extract((ROOT / page).read_text(), page)
    run = _runner(capsys)

    def show(line: str) -> None:  # each example as it is checked (pytest -s shows them)
        with capsys.disabled():
            print(f"  {line}", flush=True)

    with capsys.disabled():
        print(f"\n{page}: {len(examples)} examples", flush=True)
    failures, log = check_page(examples, page_env, run, preparer(run), show=show)
    assert not failures, "doc examples that fail:\n" + "\n".join(failures)


# --- the checker itself -----------------------------------------------------------------------------------------

SNIPPET = """\
# A page

Run `igd layers --model demo` first; a synopsis such as `igd rank --model M [--layer L]` is not run.

```bash
D=some/dir
igd rank --model demo --n-probe 100 \\
    --out imp.safetensors   # a comment
pip install -e . && igd inspect imp.safetensors --json | head -1
```

```console
$ igd calibrate-k --importance imp.safetensors --out mask.safetensors
k = 2 of 128            (output, not a command)
```

```text
igd this-is-output --not-run
```

```bash
igd defend-eval --mask mask.safetensors --dataset $D/x.safetensors --adv a.safetensors b.safetensors c.safetensors
igd calibrate-k … --importance imp3.safetensors --k layer3=64 --out m.safetensors
```
"""


def test_extractor_reads_blocks_prompts_continuations_and_inline_spans():
    ex = extract(SNIPPET, "snippet.md")
    got = [(e.line, e.argv, e.synopsis) for e in ex]
    assert got[0] == (3, ["layers", "--model", "demo"], False) and ex[0].inline
    assert got[1][0] == 3 and got[1][2] is True  # the synopsis span
    assert got[2] == (7, ["rank", "--model", "demo", "--n-probe", "100", "--out", "imp.safetensors"], False)
    assert got[3] == (9, ["inspect", "imp.safetensors", "--json"], False)
    assert got[4] == (13, ["calibrate-k", "--importance", "imp.safetensors", "--out", "mask.safetensors"], False)
    assert got[5][0] == 22 and got[5][1][:5] == ["defend-eval", "--mask", "mask.safetensors", "--dataset",
                                                 "some/dir/x.safetensors"]
    assert got[6][0] == 23 and got[6][2] is True
    assert not any("this-is-output" in e.argv for e in ex) and len(ex) == 7
    env = extract("```sh\nexport M=…/examples/model_test.pt\nigd layers --model $M\n```\n", "v.md")
    assert [e.argv for e in env] == [["layers", "--model", "…/examples/model_test.pt"]]


def test_the_old_adv_example_fails_and_names_its_line(tmp_path, monkeypatch):
    """The README once showed ``--adv a b c``; --adv takes one file per flag, so the checker must reject it."""
    ex = [e for e in extract(SNIPPET, "snippet.md") if e.argv[0] == "defend-eval"]
    failures, _ = check_page(ex, tmp_path, run=lambda argv: pytest.fail("a command that does not parse ran"))
    assert len(failures) == 1 and failures[0].startswith("snippet.md:22: ") and "does not parse" in failures[0]
    fixed = extract("```bash\nigd defend-eval --mask mask.safetensors --adv a.safetensors --adv b.safetensors\n```",
                    "fixed.md")
    assert parse_error(fixed[0].argv) is None


def test_a_file_the_reader_brings_is_parsed_and_a_typo_runs(page_env, capsys):
    page = ("```bash\nigd rank --model demo --out imp.safetensors --n-probe 16\nigd layers --model weights.pt\n"
            "igd inspect imp.safetensor\n```\n")
    failures, log = check_page(extract(page, "p.md"), page_env, _runner(capsys))
    assert "a file the reader brings" in log[1]
    assert len(failures) == 1 and failures[0].startswith("p.md:4: igd inspect imp.safetensor: exit 2")


def test_a_path_outside_the_repository_fails(tmp_path):
    page = "```bash\nD=../shared/data\nigd layers --dataset $D/cifar10-test-846.safetensors --model M\n```\n"
    failures, _ = check_page(extract(page, "p.md"), tmp_path, run=lambda argv: (0, ""))
    assert failures == ["p.md:3: igd layers --dataset $D/cifar10-test-846.safetensors --model M: names a path "
                        "outside the repository: ../shared/data/cifar10-test-846.safetensors"]


def test_a_synopsis_with_an_unknown_option_fails():
    ok = extract("`igd calibrate-k … --importance A --k layer3=64 --out M`", "p.md")
    bad = extract("`igd calibrate-k … --importance A --kk 3 [--out M]`", "p.md")
    assert ok[0].synopsis and synopsis_error(ok[0]) is None
    assert bad[0].synopsis and synopsis_error(bad[0]) == "igd calibrate-k has no option --kk"


def test_a_command_that_parses_but_fails_fails(page_env, capsys):
    """A runnable example whose run exits non-zero is a failure naming its line; one that needs a download, a GPU
    or a placeholder's file is only parsed."""
    page = ("```bash\nigd rank --model demo --layer no.such.layer --out x.safetensors\n"
            "igd rank --model Wu2020Adversarial --out imp.safetensors\n"
            "igd calibrate-k --importance imp.safetensors --out m.safetensors\nigd layers --model M\n"
            "igd layers --model demo --device cuda\nigd pipeline --piece defend:I/N\n```\n")
    failures, log = check_page(extract(page, "p.md"), page_env, _runner(capsys))
    assert len(failures) == 1 and failures[0].startswith("p.md:2: igd rank --model demo --layer no.such.layer")
    assert ": exit 2 " in failures[0]
    assert "zoo model" in log[1] and "itself only parsed" in log[2] and "placeholder" in log[3]
    assert ("needs a GPU" in log[4]) != torch.cuda.is_available()
    assert "defend:I/N: a placeholder" in log[5]


def test_reduce_caps_and_adds_the_budget_options():
    cmd, _ = parse(["pipeline", "--preset", "paper", "--n-examples", "1000", "--steps=1"])
    small = reduce(cmd, ["pipeline", "--preset", "paper", "--n-examples", "1000", "--steps=1"])
    assert small[:6] == ["pipeline", "--preset", "quick", "--n-examples", "8", "--steps=1"]
    assert option_values(small, "--queries") == [(small.index("--queries") + 1, "20")]
    adaptive = ["attack", "--attack", "adaptive", "--out", "a.safetensors"]
    small = reduce(parse(adaptive)[0], adaptive)
    assert "--steps" in small and "--queries" not in small  # only the budgets the attack takes
    clean = ["defend-eval", "--mask", "m.safetensors"]  # --attack none: no attack budget added
    assert reduce(parse(clean)[0], clean) == [*clean, "--n-examples", "8", "--draws", "2"]
    cmd, _ = parse(["report", "runs/demo"])
    assert reduce(cmd, ["report", "runs/demo"]) == ["report", "runs/demo"]


def test_the_docstring_table_is_the_substitution_table():
    """The table the module docstring prints is SUBSTITUTIONS itself (so the README can quote it)."""
    rows = {ln.split()[0]: ln.split() for ln in (__doc__ or "").splitlines() if ln.startswith("    --")}
    assert set(rows) == set(SUBSTITUTIONS) | {"--checks"}
    assert rows["--checks"][1] == AUDIT_CHECKS  # the audit's reduction, outside SUBSTITUTIONS (only when absent)
    for name, (kind, value) in SUBSTITUTIONS.items():
        cells = " ".join(rows[name][1:4])
        if kind == "cap":
            assert cells.startswith("min(") and f", {value})" in cells, (name, cells)
        elif kind == "set":
            assert cells.split()[0] == str(value), (name, cells)
        else:
            assert all(f"{a} {name} {b}" in cells for a, b in value.items()), (name, cells)  # type: ignore[union-attr]
