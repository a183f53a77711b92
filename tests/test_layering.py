"""lmcore/ is the library: it never imports the orchestration or tracking layers."""

import ast
from pathlib import Path

FORBIDDEN = {"prefect", "mlflow", "dvc", "flows", "tasks"}
LMCORE = Path(__file__).resolve().parents[1] / "lmcore"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in {"import_module", "__import__"}:
            if node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
    return names


def test_lmcore_never_imports_orchestration():
    files = sorted(LMCORE.rglob("*.py"))
    assert len(files) >= 10, "the scan must see the library"
    offenders = {
        str(f.relative_to(LMCORE.parent)): sorted(m for m in imported_modules(f) if m.split(".")[0] in FORBIDDEN)
        for f in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"lmcore/ must not import {sorted(FORBIDDEN)}: {offenders}"


def test_scanner_catches_lazy_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import mlflow.pyfunc\n    from prefect import flow\n    importlib.import_module('dvc.repo')\n")
    assert {"mlflow.pyfunc", "prefect", "dvc.repo"} <= imported_modules(bad)


LAYERS = ("lmcore", "tasks", "flows")


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (any import statement, lazy ones included), for lmcore/, tasks/, flows/."""
    root = LMCORE.parent
    modules = {}
    for layer in LAYERS:
        for f in sorted((root / layer).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_and_tasks_never_import_flows():
    graph = module_graph()
    assert len(graph) > 40 and "tasks.runner" in graph and "flows.cli" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    offenders = {m: sorted(t for t in targets if t.split(".")[0] == "flows") for m, targets in graph.items() if m.startswith("tasks")}
    assert not any(offenders.values()), f"tasks/ must not import flows/: {offenders}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
