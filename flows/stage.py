"""One stage as its own Prefect flow: `python -m flows.<stage>` or `lmcore run <stage>`.

    python -m flows.pretrain
    lmcore run pretrain --set pretrain.max_steps=50

dvc.yaml runs each stage this way, so `dvc repro` tracks to MLflow as the lifecycle flow does.
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.common import make_context, resolve
from lmcore.config import load_params
from tasks.stages import STAGES, TASKS


@flow(name="lmcore-stage", flow_run_name="{stage}")
def stage_flow(stage: str, params_file: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict:
    """Run a single stage on the outputs the previous stages left under `root`."""
    if stage not in TASKS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    root_path, params_path = resolve(root, params_file)
    params = load_params(params_path, overrides=overrides)
    ctx = make_context(root_path, params, launcher="stage")
    return TASKS[stage](ctx)


def main(stage: str) -> None:
    args = sys.argv[1:]
    stage_flow(stage, params_file=args[0] if args else "params.yaml")
