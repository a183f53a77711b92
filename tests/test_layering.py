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
