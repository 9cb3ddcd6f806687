"""The parts depend one way only, train -> export -> edge, read from the source's imports.

The no-torch tests prove it at run time for the paths they run; this catches an import in
any module, lazy ones inside functions included, which is how train/ once came to import
export/ while export/ imported train/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What each part may not import: the parts after it on the dependency line.
FORBIDDEN = {
    "train": ("ganspect.export",),
    "edge": ("ganspect.train", "ganspect.export"),
}


def _imported_modules(source: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            # `from ganspect import export` names the part in the alias, not the module.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_a_part_imports_nothing_that_depends_on_it(part):
    offending = [
        f"{source.relative_to(REPO)} imports {name}"
        for source in sorted((REPO / part).rglob("*.py"))
        for name in sorted(_imported_modules(source))
        if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[part])
    ]

    assert offending == []
