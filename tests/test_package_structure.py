"""The package's shape: one-way dependencies, no cycles, short modules, no reaching into privates."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "koopman_hooks"
MAX_LINES = 400

# layers, bottom to top: a module may import its own layer and the ones below it, never above
LAYERS = [
    {"_version", "errors"},
    {"maths"},
    {"core"},
    {"koopman", "training", "data", "models", "vision", "text"},
    {"fitting"},
    {"analysis", "unlearning"},
    {"probe"},
    {"recipes"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` for every ``koopman_hooks`` import in a file, wherever it sits."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("koopman_hooks"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("koopman_hooks")]
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names in imports_of(path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in mods and candidate != name:
                    edges[name].add(candidate)
                    break
    return edges


def test_no_module_is_longer_than_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_dependencies_point_one_way():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if RANK[layer_of(target)] > RANK[layer_of(name)]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_the_import_graph_is_acyclic():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    # a package's __init__ re-exporting its modules is not a cycle of meaning; everything else is
    real = [c for c in cycles if not any(modules()[m].name == "__init__.py" for m in c[:-1])]
    assert not real, real


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for name, path in modules().items():
        for target, names in imports_of(path):
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__"):
                    offenders.append(f"{name} imports {target}.{imported}")
    assert not offenders, offenders


ISOLATED_IMPORTS = """
import importlib, os, sys, traceback
import torch  # shared by every child; no koopman_hooks module is imported in the parent
failed = []
names = sys.argv[1:]
for first in range(0, len(names), 4):  # four children at a time
    children = {}
    for name in names[first : first + 4]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        children[pid] = name
    failed += [name for pid, name in children.items() if os.waitpid(pid, 0)[1] != 0]
print(failed)
"""


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter (forked before any koopman_hooks import): an import
    that works only because another module happened to be imported first fails here."""
    names = sorted(m for m in modules() if m != "koopman_hooks.__main__")
    result = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, *names], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", (result.stdout, result.stderr[-3000:])


def test_importing_the_package_pulls_in_no_optional_dependency():
    code = ("import sys, koopman_hooks, koopman_hooks.unlearning, koopman_hooks.analysis; "
            "print(sorted(m for m in ('scipy', 'sklearn', 'concept_erasure', 'gtda', 'matplotlib', 'timm', "
            "'torchvision', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    importlib.import_module("koopman_hooks")


def test_no_merge_conflict_markers_are_left_in_the_sources_or_docs():
    root = PACKAGE.parent
    files = [p for pattern in ("*.md", "*.toml", "*.py") for folder in ("", "koopman_hooks", "tests", "benchmarks", "reports")
             for p in (root / folder).rglob(pattern) if ".git" not in p.parts]
    assert len(files) > 50
    marked = [f"{p.relative_to(root)}:{i + 1}" for p in set(files)
              for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines())
              if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
    assert not marked, f"merge conflict markers at {marked}"
