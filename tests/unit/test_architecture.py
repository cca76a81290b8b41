"""The directions of imports that ARCHITECTURE.md writes down, checked on the source.

``reembed`` is the library every process speaks: it imports none of the process packages.
``producer``, ``worker`` and ``search`` import ``reembed`` and never one another; ``cli``
composes them all. Read from the source with ``ast`` (imports inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("reembed", "producer", "worker", "search", "cli")
#: Which of the project's packages each package may import.
ALLOWED = {
    "reembed": {"reembed"},
    "producer": {"reembed", "producer"},
    "worker": {"reembed", "worker"},
    "search": {"reembed", "search"},
    "cli": set(PACKAGES),
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module.split(".")[0], node.lineno))
    return {(name, line) for name, line in found if name in PACKAGES}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_the_written_way(package: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for name, line in sorted(imported_packages(path)) if name not in ALLOWED[package]]
    assert not wrong, "imports against ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_the_library_starts_no_process_of_the_project() -> None:
    """Only ``cli`` may run ``celery -A worker.app`` (the library must not know the worker)."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "reembed").rglob("*.py") if "worker.app" in p.read_text()]
    assert not offenders


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from search.searcher import Searcher\n")
    assert imported_packages(bad) == {("search", 2)}
