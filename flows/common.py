"""What every flow does around its tasks: resolve the root and params, point MLflow, tag lineage."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from prefect.runtime import flow_run

from lmcore.config import Params
from tasks.context import RunContext
from tasks.tags import TAG_FLOW_RUN, TAG_GIT_COMMIT, TAG_LAUNCHER, TAG_PARAMS_SHA
from tasks.tracking import Tracking, git_commit, tracking_uri

log = logging.getLogger("lmcore.flows")


def resolve(root: str | Path, params_file: str | Path) -> tuple[Path, Path]:
    root = Path(root).resolve()
    params_path = Path(params_file)
    return root, params_path if params_path.is_absolute() else root / params_path


def make_context(root: Path, params: Params, launcher: str) -> RunContext:
    """Lineage on every run: git commit, params sha256, launcher, the Prefect flow run (inside one), and for
    stage runs the DVC hashes of their inputs and outputs (`tasks.dvc_hashes`)."""
    tags = {
        TAG_GIT_COMMIT: git_commit(root),
        TAG_PARAMS_SHA: params.fingerprint(),
        TAG_LAUNCHER: launcher,
    }
    run_id = flow_run.get_id()
    if run_id:
        tags[TAG_FLOW_RUN] = str(run_id)
    # lineage_root: each stage's run is tagged with the DVC hashes of its deps and outs under the root
    tracking = Tracking(uri=tracking_uri(root), experiment=params.tracking.experiment, tags=tags, lineage_root=root)
    return RunContext(root=root, params=params, tracking=tracking)


def with_parent(ctx: RunContext, parent_run_id: str) -> RunContext:
    return replace(ctx, tracking=replace(ctx.tracking, parent_run_id=parent_run_id))
