"""The package's layout rules: the product never reaches the lab, no path hacks.

The walk follows every `import` and `from ... import` of pyloader's modules
(function-level imports too: the CLI imports its optional parts lazily),
starting from the entry point, by reading the source (nothing is imported).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SRC = os.path.join(ROOT, "src")


def module_file(name: str) -> str | None:
    base = os.path.join(SRC, *name.split("."))
    for cand in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(cand):
            return cand
    return None


def imported_modules(name: str) -> set[str]:
    """pyloader modules that module @name imports, anywhere in its body."""
    path = module_file(name)
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    found = set()
    for m in out:
        if not m.startswith("pyloader"):
            continue
        parts = m.split(".")
        for i in range(1, len(parts) + 1):  # a package's __init__ runs too
            prefix = ".".join(parts[:i])
            if module_file(prefix):
                found.add(prefix)
    return found


def reachable(start: str) -> dict[str, str]:
    """Every pyloader module reachable from @start: module -> who imports it."""
    seen, todo = {start: ""}, [start]
    while todo:
        cur = todo.pop()
        for m in imported_modules(cur):
            if m not in seen:
                seen[m] = cur
                todo.append(m)
    return seen


def chain(seen: dict[str, str], m: str) -> str:
    out = [m]
    while seen[out[-1]]:
        out.append(seen[out[-1]])
    return " <- ".join(out)


@pytest.mark.parametrize("entry", ["pyloader.cli", "pyloader.__main__"])
def test_the_product_never_imports_the_lab(entry):
    seen = reachable(entry)
    assert "pyloader.agent" in seen and "pyloader.kernel.tracer" in seen  # the walk works
    lab = sorted(m for m in seen if m == "pyloader.lab" or m.startswith("pyloader.lab."))
    assert not lab, "the product reaches the lab: " + "; ".join(chain(seen, m) for m in lab)


def test_the_walk_sees_a_lab_import():
    """The check above can fail: the demo does import the lab."""
    assert "pyloader.lab.netnode" in reachable("pyloader.lab.demo")


def python_files(*tops: str):
    for top in tops:
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            if "__pycache__" in d:
                continue
            yield from (os.path.join(d, f) for f in files if f.endswith(".py"))


def test_no_sys_path_manipulation():
    """Imports resolve through the package and pytest's pythonpath (setup.cfg)."""
    bad = []
    for path in python_files("src", "tests", "bench", "scripts"):
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not bad, bad


MAX_LINES = 420  # "about 400"


def test_no_product_module_is_over_about_400_lines():
    big = []
    for path in python_files(os.path.join("src", "pyloader")):
        if os.sep + "lab" + os.sep in path:
            continue
        n = sum(1 for _ in open(path))
        if n > MAX_LINES:
            big.append((os.path.relpath(path, ROOT), n))
    for part in ("bpf", "native"):
        for f in os.listdir(os.path.join(SRC, part)):
            if f.endswith((".c", ".h")):
                n = sum(1 for _ in open(os.path.join(SRC, part, f)))
                if n > MAX_LINES:
                    big.append((f"src/{part}/{f}", n))
    assert not big, big
