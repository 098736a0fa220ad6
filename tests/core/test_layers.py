"""The layers, as imports: the library's tests (`tests/core`, with the `conftest.py` and
`helpers.py` they load) import nothing from `experiments/`, the library imports neither the
experiments nor the tests, and the experiments do not import the tests. Read from the source
with `ast`, every import at any depth, so an import inside a function counts too."""

import ast
import pathlib

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
TEST_MODULES = {"tests", "helpers", "conftest"}


def _imports(source: str) -> list[tuple[int, str]]:
    """`(line, module)` for each module that `source` imports: `import a.b`, `from a.b import c`
    and `importlib.import_module("a.b")` / `__import__("a.b")` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    found.append((node.lineno, first.value))
    return found


def _offenders(paths, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in paths
        for line, module in _imports(path.read_text())
        if module.split(".")[0] in forbidden
    ]


def test_the_guard_sees_every_kind_of_import():
    source = """
import experiments
import numpy as np, experiments.data as d
from experiments.problems import ridge
import importlib

def f():
    from experiments import _harness
    importlib.import_module("experiments.ridge_l2")
    __import__("experiments")

from . import helpers  # relative: this package, not `experiments`
"""
    assert [line for line, m in _imports(source) if m.split(".")[0] == "experiments"] == [
        2,
        3,
        4,
        8,
        9,
        10,
    ]


def test_core_tests_import_nothing_from_experiments():
    paths = sorted((TESTS / "core").rglob("*.py")) + [TESTS / "conftest.py", TESTS / "helpers.py"]
    assert len(paths) > 20  # the guard reads the tests, not an empty folder
    offenders = _offenders(paths, {"experiments"})
    assert not offenders, "tests/core must test the library alone:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "package, forbidden",
    [("bilevax", {"experiments", *TEST_MODULES}), ("experiments", TEST_MODULES)],
    ids=["bilevax", "experiments"],
)
def test_nothing_imports_upward(package, forbidden):
    paths = sorted((ROOT / package).rglob("*.py"))
    assert paths
    offenders = _offenders(paths, forbidden)
    assert not offenders, f"{package}/ imports a layer above it:\n" + "\n".join(offenders)
