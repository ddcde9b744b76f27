"""The project's import graph: no cycles, and imports at module level.

The graph is built from the source with ``ast``: every ``import`` / ``from … import`` in
``engine/``, ``lance_app/`` and ``pages/`` (module level and inside functions; ``if TYPE_CHECKING:``
blocks excepted, they never run), relative imports resolved, ``from pkg import sub`` pointing at the
submodule. Implicit parent-package imports are not edges (every module has them).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# function-level imports allowed: genuinely optional third-party packages, and Streamlit inside
# `lance app` (building the CLI parser must not start Streamlit; tests/test_app_install.py)
OPTIONAL = {"tensorly", "ray", "playwright"}
ALLOWED_LAZY = {("lance_app.cli", "streamlit")}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted([*REPO.glob("engine/**/*.py"), *REPO.glob("lance_app/**/*.py"), *REPO.glob("pages/*.py")]):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[0] == "pages":
            parts = ["lance_app", *parts]  # installed as lance_app.pages
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(module: str, path: Path):
    """(imported module name, line, inside a function?) for every import statement of ``module``."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for grandchild in child.orelse:
                    visit_node(grandchild, in_function)
                continue
            visit_node(child, in_function)

    def visit_node(child, in_function):
        if isinstance(child, ast.Import):
            found.extend((alias.name, child.lineno, in_function) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (child.level - 1)]
                prefix = ".".join(base + ([child.module] if child.module else []))
            else:
                prefix = child.module
            for alias in child.names:
                sub = f"{prefix}.{alias.name}"
                found.append((sub if sub in MODULES else prefix, child.lineno, in_function))
        else:
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _project_target(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(module, path):
            target = _project_target(name)
            if target and target != module and not module.startswith(target + "."):
                edges[module].add(target)
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = dfs(start)
            if cycle:
                return cycle
    return None


def test_the_graph_is_built_from_the_real_tree():
    edges = _graph()
    assert len(MODULES) > 80 and "engine.layers" in MODULES and "lance_app.pages.setup" in MODULES
    assert {"engine.methods", "engine.memory", "engine.functional"} <= edges["engine.layers"]
    assert "engine.store" in edges["engine.train.session"]


def test_no_import_cycles_among_the_project_modules():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_are_at_module_level():
    lazy = []
    for module, path in MODULES.items():
        for name, line, in_function in _imports(module, path):
            root = name.split(".")[0]
            if in_function and root not in OPTIONAL and (module, root) not in ALLOWED_LAZY:
                lazy.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not lazy, "function-level imports (move them to the top of the module):\n" + "\n".join(lazy)


@pytest.mark.parametrize("source, expected", [
    ("import a\n", None),
    ("def f():\n    import engine.store\n", "engine.store"),
])
def test_the_checker_sees_function_level_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    lazy = [name for name, _, in_function in _imports("engine.m", path) if in_function]
    assert lazy == ([expected] if expected else [])


def test_the_checker_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
