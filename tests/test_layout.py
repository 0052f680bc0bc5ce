"""The package's layers: no import cycles, no star_jax import inside a function, the library never
imports a CLI module or a project, no core module over 500 lines, stage names only in the registry."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "star_jax"
MAX_LINES = 500
# Entry points may name anything; the library below them may not.
ENTRY_POINTS = ("star_jax/main.py", "star_jax/cli/", "star_jax/bench/")
STAGE_NAMES = ("understanding", "generation", "editing")  # "vq" and "vision" also name model parts


def _modules() -> dict[str, pathlib.Path]:
    """Module name -> file: star_jax/ and configs/ (installed as star_jax.configs)."""
    out = {}
    for folder, prefix in ((PACKAGE, ("star_jax",)), (ROOT / "configs", ("star_jax", "configs"))):
        for path in folder.rglob("*.py"):
            parts = list(prefix) + list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported star_jax module, inside a function?) for every import of `path`."""
    modules = _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    local = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out += [(c, id(node) in local) for c in candidates if c in modules or c.startswith("star_jax.projects")]
    return out


def _is_entry_point(path: pathlib.Path) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == e or (e.endswith("/") and rel.startswith(e)) for e in ENTRY_POINTS)


def test_no_star_jax_import_inside_a_function():
    bad = [
        f"{path.relative_to(ROOT)} imports {target}"
        for name, path in _modules().items()
        for target, inside in _imports(name, path)
        if inside
    ]
    assert not bad, "function-local star_jax imports:\n" + "\n".join(bad)


def test_import_graph_is_acyclic():
    modules = _modules()
    graph = {name: {t for t, _ in _imports(name, path) if t in modules and t != name} for name, path in modules.items()}
    # A package's __init__ importing its own submodules is a parent edge, not a cycle.
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_library_imports_no_cli_and_no_project():
    bad = []
    for name, path in _modules().items():
        if _is_entry_point(path) or name.startswith("star_jax.configs"):
            continue
        for target, _ in _imports(name, path):
            if target.startswith(("star_jax.cli", "star_jax.projects", "star_jax.main", "star_jax.bench")):
                bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["star_jax"])
def test_no_core_module_over_the_limit(folder):
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_stage_names_only_in_the_registry():
    bad = []
    for name, path in _modules().items():
        if _is_entry_point(path) or path == PACKAGE / "stages.py" or name.startswith("star_jax.configs"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in STAGE_NAMES:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not bad, "stage names outside star_jax/stages.py:\n" + "\n".join(bad)
