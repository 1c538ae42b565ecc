"""The package imports, at module level, only the standard library and what pyproject.toml declares
(numpy, transformers and peft are not dependencies: optional ones are imported inside functions)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _declared() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
    assert block is not None
    names = re.findall(r'"([A-Za-z0-9_.-]+)', block.group(1))
    return {n.lower().replace("-", "_") for n in names}


def test_module_level_imports_are_declared() -> None:
    allowed = _declared() | set(sys.stdlib_module_names) | {"lightning_megatrain", "__future__"}
    bad = []
    for path in sorted((ROOT / "lightning_megatrain").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: imports inside functions are optional extras
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, f"undeclared module-level imports: {bad}"
