"""The package's layout rules: no import cycles, no Lightning below ``engine/``, rooms of bounded size,
each file saying its one job on its first line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_megatrain"
MAX_MODULE_LINES = 800
MAX_CLASS_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports, those under ``if TYPE_CHECKING`` included (a cycle there is a
    cycle in the design, even if Python never runs it)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c in known and c != name:
                found.add(c)
    return found


def test_the_engine_has_no_import_cycle() -> None:
    modules = _modules()
    engine = {n: p for n, p in modules.items() if n.startswith("lightning_megatrain.engine.")}
    graph = {n: _imports(n, p, set(engine)) for n, p in engine.items()}
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, "import cycle: " + " -> ".join(trail + [n, m])
            if m not in state:
                visit(m, trail + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    assert "lightning_megatrain.engine.runtime" in graph and len(graph) > 5


def test_the_engine_imports_no_lightning() -> None:
    for path in (PACKAGE / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), path


def test_rooms_are_bounded_and_say_their_job() -> None:
    too_long, no_doc = [], []
    for name, path in _modules().items():
        text = path.read_text()
        tree = ast.parse(text)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
        doc = ast.get_docstring(tree)
        if text.strip() and not doc:
            no_doc.append(name)
    assert not too_long, too_long
    assert not no_doc, f"modules without a first-line docstring saying their job: {no_doc}"
