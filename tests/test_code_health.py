"""Checks on the code's shape (issue 13): no import cycle among p2pfl modules, no long function."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent

MAX_FUNCTION_LINES = 60


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under `root`, by dotted name (a package by its own name)."""
    found = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is (or is type-checked), not those inside functions.
    `if TYPE_CHECKING:` imports count: a cycle closed by one is a layering knot all the same."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)


def import_graph(root: Path, package: str) -> nx.DiGraph:
    """Module -> the modules of `package` it imports at module level."""
    mods = modules(root, package)
    graph = nx.DiGraph()
    for name, path in mods.items():
        graph.add_node(name)
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _module_level_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join([*parent, *([base] if base else [])])
                # `from pkg import mod` imports the module; `from mod import name` the module.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    for alias in node.names
                ]
            graph.add_edges_from((name, t) for t in targets if t in mods and t != name)
    return graph


def import_cycles(root: Path, package: str) -> list[list[str]]:
    return [sorted(c) for c in nx.simple_cycles(import_graph(root, package))]


def long_functions(root: Path, package: str, limit: int) -> dict[str, int]:
    """`path:Qualified.name` -> body lines, for every function whose body is over `limit`."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                body = child.body
                if len(body) > 1 and ast.get_docstring(child) is not None:
                    body = body[1:]
                lines = (child.end_lineno or child.lineno) - body[0].lineno + 1
                if lines > limit:
                    found[f"{path}:{prefix}{child.name}"] = lines
                visit(child, path, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, path, f"{prefix}{child.name}.")
            else:
                visit(child, path, prefix)

    for path in sorted((root / package).rglob("*.py")):
        visit(ast.parse(path.read_text()), path.relative_to(root).as_posix(), "")
    return found


def test_no_import_cycle_among_p2pfl_modules() -> None:
    assert import_cycles(ROOT, "p2pfl") == []


def test_the_walker_finds_cycles_through_relative_and_type_checking_imports(
    tmp_path: Path,
) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg.sub.b import B\n")  # fmt: skip
    (pkg / "sub" / "b.py").write_text("from ..a import A\ndef f():\n    import pkg.c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.sub.b"]]
    graph = import_graph(tmp_path, "pkg")
    assert graph.has_edge("pkg.sub", "pkg.sub.b")
    assert not graph.has_edge("pkg.sub.b", "pkg.c"), "an import inside a function is lazy"


def test_no_function_is_longer_than_60_lines() -> None:
    # Body lines: the signature (the CLI's option lists are declarations) and the docstring
    # do not count.
    assert long_functions(ROOT, "p2pfl", MAX_FUNCTION_LINES) == {}


def test_function_length_counts_the_body_not_the_signature_or_docstring(tmp_path: Path) -> None:
    options = "\n".join(f"    o{i}: int = {i}," for i in range(80))
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        f'def declared(\n{options}\n) -> None:\n    """Doc\n\n    more.\n    """\n    pass\n\n'
        f"class C:\n    async def long(self) -> None:\n{body.replace('    ', '        ')}\n"
    )
    assert long_functions(tmp_path, "pkg", 60) == {"pkg/m.py:C.long": 61}
