"""The package's shape, read from its source: imports flow one way, privates stay private.

The graph counts every import statement, at module level or inside a function (an import
moved into a function to dodge a cycle is still a cycle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dtop_cli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    """Absolute name of a (possibly relative) import target."""
    if level == 0:
        return module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def _imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, list[str], int]]]:
    """module -> [(imported module, names taken from it, line)] for imports of dtop_cli."""
    out: dict[str, list[tuple[str, list[str], int]]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("dtop_cli"):
                        found.append((a.name, [], node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_pkg, node.level, node.module)
                if not target.startswith("dtop_cli"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # `from . import exits`: the submodule itself
                        found.append((sub, [], node.lineno))
                    else:
                        found.append((target, [a.name], node.lineno))
        out[name] = found
    return out


def test_import_graph_has_no_cycle():
    mods = _modules()
    graph = {m: sorted({t for t, _, _ in edges if t in mods and t != m}) for m, edges in _imports(mods).items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 30  # the walk really read the package


def test_no_module_imports_another_modules_private_names():
    mods = _modules()
    bad = [f"{m}:{line} imports {t}.{n}" for m, edges in _imports(mods).items()
           for t, names, line in edges for n in names if n.startswith("_") and t != m]
    assert not bad, bad


def test_no_import_of_the_package_is_optional():
    """`try: from .x import y / except ImportError` hides a broken install behind a mode."""
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            handles_import_error = any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers)
            own = any(isinstance(s, ast.ImportFrom) and (s.level > 0 or (s.module or "").startswith("dtop_cli"))
                      for s in ast.walk(ast.Module(body=node.body, type_ignores=[])))
            if handles_import_error and own:
                bad.append(f"{name}:{node.lineno}")
    assert not bad, bad


def test_the_graph_walk_sees_function_level_imports(tmp_path):
    """The checker itself: an import inside a function is an edge."""
    src = "def f():\n    from .b import thing\n    return thing\n"
    tree = ast.parse(src)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _resolve("dtop_cli.a", False, node.level, node.module) == "dtop_cli.b"
    assert _resolve("dtop_cli.commands", True, 2, "api") == "dtop_cli.api"
    assert _resolve("dtop_cli.commands.bench", False, 2, None) == "dtop_cli"
