"""The shape of the source, read with ``ast``: imports flow one way, a function-level import says
what heavy dependency it defers, and only the edit-method registry knows method names."""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path


SRC = Path(__file__).resolve().parent.parent / "src" / "gradcouple"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of every node under ``if TYPE_CHECKING:``: annotations only, never imported at run time."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for n in ast.walk(node)}
    return out


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The gradcouple modules an import statement loads (a name imported from a package that is a
    submodule counts as that submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


@functools.lru_cache(maxsize=1)
def module_graph() -> dict[str, set[str]]:
    """gradcouple module -> the gradcouple modules it imports, at module level or in a function."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        graph[module] = {dep for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         and id(node) not in skip for dep in _imported(module, path, node)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, three colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(graph):
        if colour.get(start) is None and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_module_graph_is_read_from_the_source():
    graph = module_graph()
    assert "gradcouple.ranks" in graph["gradcouple.rundir.lock"]       # from ..ranks import is_main
    assert "gradcouple.stages.extract" in graph["gradcouple.api"]      # from .stages import extract as ...
    assert "gradcouple.stores.shards" not in graph["gradcouple.stores.base"]  # TYPE_CHECKING only


def test_imports_flow_one_way():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _function_level_imports():
    """(module, import statement, the first line of the run of imports it ends, the file's lines)
    for every import inside a function."""
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for block in ast.walk(fn):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    run_start = None
                    stmts = getattr(block, field, None)
                    for stmt in stmts if isinstance(stmts, list) else []:
                        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                            run_start = run_start or stmt.lineno
                            yield module, stmt, run_start, lines
                        else:
                            run_start = None


def _commented(node: ast.stmt, run_start: int, lines: list[str]) -> bool:
    """A comment on a line of the run of imports that ``node`` ends (its own lines included), or in
    the comment lines just above that run."""
    k = run_start - 1
    while k > 0 and lines[k - 1].strip().startswith("#"):
        k -= 1
    return any("#" in line for line in lines[k:node.end_lineno])


def test_a_function_level_import_defers_a_heavy_dependency_and_says_which():
    stdlib = set(sys.stdlib_module_names)
    found = []
    for module, node, run_start, lines in _function_level_imports():
        top = (node.names[0].name if isinstance(node, ast.Import) else (node.module or "")).split(".")[0]
        where = f"{MODULES[module].relative_to(SRC.parent)}:{node.lineno}"
        if isinstance(node, ast.ImportFrom) and node.level == 0 and top in stdlib or isinstance(node, ast.Import) and top in stdlib:
            found.append(f"{where}: the standard library is cheap to import at the top")
        elif not _commented(node, run_start, lines):
            found.append(f"{where}: say in a comment which heavy dependency this defers")
    assert not found, "\n".join(found)




def test_only_the_edit_method_registry_compares_a_method_name():
    from gradcouple.edits import ALIASES, METHODS

    names = set(METHODS) | set(ALIASES)
    found = []
    for module, path in MODULES.items():
        if module.startswith("gradcouple.edits"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            consts = [c.value for o in operands for c in ([o] if isinstance(o, ast.Constant) else
                      getattr(o, "elts", [])) if isinstance(c, ast.Constant)]
            if names & set(consts):
                found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "ask the registry (gradcouple.edits) instead:\n" + "\n".join(found)
