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
from tasks.incremental import root_lock
from tasks.runner import TASKS


@flow(name="lmcore-stage", flow_run_name="{stage}")
def stage_flow(stage: str, params_file: str = "params.yaml", overrides: list[str] | None = None, root: str = ".",
               wait_s: float = 0.0) -> dict:
    """Run a single stage on the outputs the previous stages left under `root` (always: `dvc repro` decides
    whether to call it); returns its summary. Another run working in `root` makes it wait up to `wait_s` s, then fail."""
    pipeline.get(stage)  # KeyError naming the stages
    root_path, params_path = resolve(root, params_file)
    params = load_params(params_path, overrides=overrides)
    with root_lock(root_path, f"lmcore run {stage}", wait_s):
        return TASKS[stage](make_context(root_path, params, launcher="stage"))


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        raise SystemExit(f"usage: python -m flows.stage <stage> [params.yaml]; stages: {', '.join(pipeline.NAMES)}")
    stage_flow(args[0], params_file=args[1] if len(args) > 1 else "params.yaml")
