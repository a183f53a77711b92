"""One stage as its own Prefect flow: `lmcore run <stage>` (what dvc.yaml's stages run) or `python -m flows.stage <stage>`.

    lmcore run pretrain --set pretrain.max_steps=50
    python -m flows.stage tokenize [params.yaml]

The stage reads what the previous stages left under the root and tracks to MLflow as the lifecycle flow does.
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.common import make_context, resolve
from lmcore import pipeline
from lmcore.config import load_params
from tasks.runner import TASKS


@flow(name="lmcore-stage", flow_run_name="{stage}")
def stage_flow(stage: str, params_file: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict:
    """Run a single stage on the outputs the previous stages left under `root`; returns its summary."""
    pipeline.get(stage)  # KeyError naming the stages
    root_path, params_path = resolve(root, params_file)
    params = load_params(params_path, overrides=overrides)
    return TASKS[stage](make_context(root_path, params, launcher="stage"))


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        raise SystemExit(f"usage: python -m flows.stage <stage> [params.yaml]; stages: {', '.join(pipeline.NAMES)}")
    stage_flow(args[0], params_file=args[1] if len(args) > 1 else "params.yaml")
