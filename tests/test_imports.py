"""No import cycles among ``llkd_ray``'s modules, counting every import in a file.

Function-local imports count as much as the ones at the top: they hide a cycle from Python at
import time, not from a reader, and a module that needs the other back is one layer mixed into
another. The imports are read with ``ast`` (nothing is imported), absolute and relative,
``TYPE_CHECKING`` blocks included.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llkd_ray"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """``llkd_ray.x.y`` -> its file, for every module of the package (``__init__`` as the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports: ``import a.b``, ``from a import b`` (as ``a`` and
    ``a.b``: b may be a module), and relative imports resolved against the module's package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name is its longest prefix that is a module)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> a``) through each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")  # a strongly connected group has one


def test_the_graph_sees_local_and_relative_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n")
    (package / "b.py").write_text("from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from .c import x\n")
    graph = import_graph(module_files(package))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg", "pkg.c"} and graph["pkg.d"] == {"pkg.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_llkd_ray_has_no_import_cycle() -> None:
    modules = module_files()
    assert {"llkd_ray.cli", "llkd_ray.pipeline.run", "llkd_ray.artifacts"} <= set(modules)
    graph = import_graph(modules)
    assert "llkd_ray.report.page" in graph["llkd_ray.pipeline.run"]  # a function-local import is seen
    cycles = find_cycles(graph)
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


# --------------------------------------------------------------------------- the layout's rules

#: What each stage may import from the package besides the foundations at the top level (and itself).
STAGE_ALLOWED = {
    "llkd_ray.label": set(),
    "llkd_ray.serve": set(),
    "llkd_ray.train": set(),
}
#: Layers above the stages: no stage imports them.
ABOVE_STAGES = (
    "llkd_ray.evaluate",
    "llkd_ray.pipeline",
    "llkd_ray.report",
    "llkd_ray.quality",
    "llkd_ray.cli",
)


def _stage_of(module: str) -> str | None:
    return next((stage for stage in STAGE_ALLOWED if module == stage or module.startswith(stage + ".")), None)


def test_stages_import_only_foundations_and_themselves() -> None:
    """label, train and serve depend on the foundations (the student's home among them), not on each
    other or on the layers above them: a stage can be read, tested and replaced on its own."""
    graph = import_graph(module_files())
    wrong = []
    for module, targets in graph.items():
        stage = _stage_of(module)
        if stage is None:
            continue
        for target in targets:
            other = _stage_of(target)
            above = target.startswith(ABOVE_STAGES)
            if above or (other not in (None, stage) and target not in STAGE_ALLOWED[stage]):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "stage imports across the layout: " + "; ".join(sorted(wrong))


def test_the_student_is_a_foundation() -> None:
    """Training, serving, evaluation and the rounds all load the student: its home imports no stage
    and nothing above them, so none of them depends on another to read a model directory."""
    graph = import_graph(module_files())
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("llkd_ray.student")
        for target in targets
        if _stage_of(target) is not None or target.startswith(ABOVE_STAGES)
    ]
    assert not wrong, "the student's home imports a stage or a layer above: " + "; ".join(sorted(wrong))


def test_subpackage_inits_are_docstrings_only() -> None:
    """No re-exports: an ``__init__`` that imports its modules hides where a name lives and makes cycles."""
    for path in PACKAGE.rglob("__init__.py"):
        if path.parent == PACKAGE:
            continue
        body = ast.parse(path.read_text()).body
        assert body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), path
        assert len(body) == 1, f"{path} holds more than its docstring"


def test_modules_stay_small() -> None:
    """One concern per module: none over 500 lines (split along the seams instead)."""
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    long = {name: lines for name, lines in sizes.items() if lines > 500}
    assert not long, f"modules over 500 lines: {long}"
