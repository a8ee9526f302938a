"""The usage example in the docstring of ``igd_cli`` and of each of its public objects runs: an ``Example::`` block
is executed, a ``>>>`` example is run by doctest (its printed values compared), in the notebook the examples assume
(docs/library.md, "The docstrings' examples"), on the demo model, offline."""

from __future__ import annotations

import doctest
import inspect
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import igd_cli

from .conftest import real_resnet18_path

ROOT = Path(__file__).resolve().parents[1]

#: the package, then every public object that has a docstring of its own (values such as ATTACKS have none)
NAMES = ["igd_cli", *(n for n in igd_cli.__all__ if n != "__version__" and n != "ATTACKS")]


def example_block(doc: str) -> str | None:
    """The code of a docstring's ``Example::`` block (its indented lines, dedented); None without one."""
    lines = inspect.cleandoc(doc).splitlines()
    if "Example::" not in lines:
        return None
    body = []
    for line in lines[lines.index("Example::") + 1:]:
        if line.strip() and not line.startswith("    "):
            break
        body.append(line)
    return textwrap.dedent("\n".join(body)).strip("\n") + "\n"


def test_the_example_block_is_found():
    doc = """What it does.

        Example::

            a = 1

            b = a + 1      # a comment
        Then prose again.
        """
    assert example_block(doc) == "a = 1\n\nb = a + 1      # a comment\n"
    assert example_block("No example.") is None


def notebook_setup() -> str:
    """The code of docs/library.md's block under "The docstrings' examples": the notebook they assume."""
    page = (ROOT / "docs" / "library.md").read_text()
    section = page[page.index("## The docstrings' examples"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """A function giving a fresh namespace of that notebook (a new ``defense`` each time: some examples change its
    masks), in a folder that also holds the files the examples name."""
    folder = tmp_path_factory.mktemp("notebook")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo model's tiny forwards: threads only synchronise on a shared machine
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("IGD_HOME", str(folder / "igd_home"))
        for var in ("IGD_OFFLINE", "HF_HUB_OFFLINE", "IGD_NO_PROGRESS"):
            mp.setenv(var, "1")
        from igd_cli.cli import main

        setup: dict = {"__name__": "notebook"}
        exec(compile(notebook_setup(), "docs/library.md", "exec"), setup)
        assert main(["defend-eval", "--mask", "mask.safetensors", "--attack", "fgsm", "--n-examples", "8",
                     "--draws", "2", "--report", "eval.safetensors"]) == 0
        (folder / "runs" / "demo").mkdir(parents=True)
        shutil.copy(folder / "eval.safetensors", folder / "runs" / "demo" / "eval-fgsm.safetensors")
        shutil.copy(real_resnet18_path(), folder / "weights.pt")

        def fresh() -> dict:
            return {**setup, "defense": setup["defense_from_ranking"](setup["target"], setup["importance"], 16)}

        yield fresh
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_the_docstring_example_runs(name, notebook, capsys):
    obj = igd_cli if name == "igd_cli" else getattr(igd_cli, name)
    doc = obj.__doc__ or ""
    where = f"{name} ({getattr(obj, '__module__', name)})"
    block = example_block(doc)
    doctests = doctest.DocTestParser().get_examples(doc)
    assert block or doctests, f"{where}: no usage example in its docstring (Example:: or >>>)"
    ns = notebook()
    if block:
        try:
            exec(compile(block, f"<example of {name}>", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"{where}: the example fails: {type(exc).__name__}: {exc}\n{block}") from exc
    if doctests:
        test = doctest.DocTestParser().get_doctest(doc, ns, name, None, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report: list[str] = []
        runner.run(test, out=report.append)
        assert runner.failures == 0, "".join(report)
