"""The import layering README's "Where each part lives" promises: imports run downward, never back up.

Read from the source with ``ast`` (nothing is imported), so a new upward import fails here before review.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fracwatch"
LEAVES = {"config", "errors", "domain", "logs", "resample", "__version__"}
CORE = {"dicom", "pipeline", "model", "store", "report", "triage", "synth"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "domain": set(),
    "resample": set(),
    "logs": set(),
    "config": {"errors"},
    "dicom": LEAVES,
    "pipeline": LEAVES,
    "model": LEAVES | {"pipeline"},
    "store": LEAVES,
    "report": LEAVES,
    "triage": LEAVES,
    "synth": LEAVES,
    "service": LEAVES | CORE - {"synth"},
    "lab": LEAVES | {"model", "pipeline", "synth", "service"},
    "web": LEAVES | {"service", "store"},
    "jobs": LEAVES | CORE - {"synth"} | {"service"},
    "daemon": LEAVES | CORE | {"service", "web", "jobs"},
    "cli": LEAVES | CORE | {"service", "lab", "daemon", "jobs"},
    "__main__": {"cli"},
    "__init__": set(),
}


def imports_by_part() -> dict[str, set[str]]:
    """For each top-level part of the package (sub-package or module), the other parts it imports."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        if relative[0] in ("_migrations", "_models"):
            continue
        part = relative[0] if len(relative) > 1 else relative[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fracwatch":
                names = [f"fracwatch.{a.name}" for a in node.names] if node.module == "fracwatch" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "fracwatch"]
            for name in names:
                target = name.split(".")[1]
                if target != part:
                    found[part].add(target)
    return found


def test_every_part_of_the_package_has_a_place_in_the_layers() -> None:
    parts = {
        p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert parts - set(ALLOWED) == set(), "a new part of the package needs its row in ALLOWED (and the README's table)"


def test_imports_run_downward() -> None:
    upward = {
        part: sorted(targets - ALLOWED.get(part, set()))
        for part, targets in imports_by_part().items()
        if targets - ALLOWED.get(part, set())
    }
    assert upward == {}
