"""igd's modules import without circles: the import graph of ``igd_cli`` (counting imports made inside functions,
which is how a circle is usually hidden) is acyclic, every module imports alone in a fresh interpreter, and igd's
home folder is named by one leaf module (:mod:`igd_cli.home`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "igd_cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the igd modules it imports anywhere in its file (module level or inside a function)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # ``from . import noise`` imports the module igd_cli.noise
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "igd_cli")
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle_even_through_imports_inside_functions():
    graph = import_graph()
    assert "igd_cli.artifacts" in graph and "igd_cli.models" in graph
    assert cycles(graph) == []


def test_the_circle_finder_sees_a_circle_hidden_in_a_function():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_home_is_a_leaf_and_the_only_place_that_reads_igd_home():
    graph = import_graph()
    assert graph["igd_cli.home"] == set()
    readers = [name for name, path in modules().items()
               if '"IGD_HOME"' in path.read_text() and name != "igd_cli.home"]
    assert readers == []
    for name in ("igd_cli.artifacts", "igd_cli.download"):
        assert "igd_cli.models" not in graph[name], name


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module first, on its own (igd's modules dropped from sys.modules before each): an import that only
    works after another module was imported first fails here. One interpreter keeps torch loaded between them."""
    names = [n for n in modules() if not n.endswith("__main__")]
    script = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m == 'igd_cli' or m.startswith('igd_cli.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_the_home_folders(monkeypatch, tmp_path):
    from igd_cli import home

    monkeypatch.setenv("IGD_HOME", str(tmp_path / "h"))
    assert home.igd_home() == tmp_path / "h"
    assert home.model_dir() == tmp_path / "h" / "models"
    assert home.data_home() == tmp_path / "h" / "data"
    assert home.adv_home() == tmp_path / "h" / "adv"
    assert home.clip_cache_home() == tmp_path / "h" / "clip-cache"
    assert home.digest_store() == tmp_path / "h" / "cache" / "sha256.json"
    monkeypatch.delenv("IGD_HOME")
    assert home.igd_home() == Path.home() / ".cache" / "igd"
