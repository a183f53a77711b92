"""dvc.yaml, written from the stage declarations (lmcore.pipeline): `lmcore dvc-yaml` (or `make dvc-yaml`).

Each stage's cmd is `lmcore run <stage>`, the same Prefect flow and MLflow logging as the lifecycle flow; its deps
are the data it reads and the lmcore source files its function imports (its import closure, computed); its
params are the params.yaml keys its outputs depend on; the local files and folders params.yaml names (a `path:`
source, a base model file) are deps of the stage that reads them, so the file follows params.yaml; its outs are the folders it writes. Metrics and plots
inside those folders are listed at the top level (DVC refuses an out inside another). A test fails when the
committed dvc.yaml differs from what this writes.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lmcore.config import Params, load_params
from lmcore.pipeline import STAGES, Curve, Stage

HEADER = """\
# Written by `lmcore dvc-yaml` from the stage declarations in lmcore/pipeline.py: edit those, then run it again
# (a test fails when this file differs). `dvc repro` runs what changed: each stage's cmd is `lmcore run <stage>`,
# the same Prefect task and MLflow logging as the lifecycle flow, reading params.yaml. A stage's code deps are
# the lmcore modules its function (lmcore/stages/<stage>.py) imports, directly or not.
"""


def stage_entry(stage: Stage, params: Params | None = None, root: Path = Path(".")) -> dict:
    entry: dict = {"cmd": f"lmcore run {stage.name}",
                   "deps": [*stage.deps, *stage.local_deps(params, root), *stage.code_deps()]}
    if stage.params:
        entry["params"] = list(stage.params)
    entry["outs"] = list(stage.outs)
    return entry


def plot_entry(plot: str | Curve) -> str | dict:
    if isinstance(plot, str):
        return plot
    return {plot.name: {"template": plot.template, "x": plot.x, "y": dict(plot.y)}}


def _dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)


def _indent(text: str, spaces: int = 2) -> str:
    return "".join(" " * spaces + line if line.strip() else line for line in text.splitlines(keepends=True))


def render(params: Params | None = None, root: Path | str = ".") -> str:
    """The text of dvc.yaml; with `params`, a stage also depends on the local paths its params name (a folder
    source of collect, a fine-tune's data file), relative to `root`."""
    parts = [HEADER, "stages:\n"]
    for i, stage in enumerate(STAGES):
        if i:
            parts.append("\n")
        parts.append(f"  # {stage.doc}\n")
        parts.append(_indent(_dump({stage.name: stage_entry(stage, params, Path(root))})))
    parts.append("\n# DVC metrics and plots: files inside the stages' outs.\n")
    parts.append(_dump({"metrics": [m for s in STAGES for m in s.metrics]}))
    parts.append(_dump({"plots": [plot_entry(p) for s in STAGES for p in s.plots]}))
    return "".join(parts)


def render_for(root: Path | str) -> str:
    """dvc.yaml for the project at `root`, from its params.yaml (when there is one)."""
    params_path = Path(root) / "params.yaml"
    return render(load_params(params_path) if params_path.is_file() else None, root)


def refresh(root: Path | str) -> bool:
    """Rewrite <root>/dvc.yaml when params.yaml now names other local paths than it lists; True when rewritten."""
    from lmcore.io import write_text

    path, text = Path(root) / "dvc.yaml", render_for(root)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    write_text(path, text)
    return True
