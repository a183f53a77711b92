"""The lifecycle flow, tracked in MLflow: every stage of lmcore.pipeline in order, one Prefect task each
(collect -> preprocess -> tokenize -> pretrain -> evaluate -> benchmark -> finetune_classifier -> finetune_instruct
-> dpo -> judge).

    python -m flows.lifecycle                     # default params.yaml, local ephemeral Prefect
    lmcore pipeline --params profiles/micro.yaml  # another profile
    PREFECT_API_URL=http://127.0.0.1:4200/api lmcore pipeline   # against a Prefect server

One MLflow parent run per lifecycle run with a nested run per stage; what each stage registers and promotes is in
its declaration; a markdown summary (rows from the declarations) is logged to the parent run and published as a
Prefect artifact; dvc.lock records the outputs when the run used the project's own params.yaml.
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import dvc_commit, make_context, resolve, with_parent
from lmcore import pipeline
from lmcore.config import load_params
from tasks.runner import TASKS
from tasks.tags import tag

SUMMARY_ARTIFACT = "summary.md"


def summary_markdown(results: dict[str, dict], run_id: str, commit_note: str) -> str:
    rows = pipeline.summary_rows(results) + [("MLflow run", run_id), ("DVC", commit_note)]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    return f"# lmcore lifecycle run\n\n| | |\n|---|---|\n{table}\n"


@flow(name="lmcore-lifecycle")
def lifecycle(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    root: str = ".",
    commit_dvc: bool = True,
) -> dict:
    """Run every stage in order; returns each stage's summary by name, the MLflow parent run id, the DVC note
    and the summary table's rows."""
    root_path, params_path = resolve(root, params_file)
    params = load_params(params_path, overrides=overrides)
    ctx = make_context(root_path, params, launcher="prefect")
    results: dict[str, dict] = {}
    with ctx.tracking.run("lifecycle") as parent:
        parent.log_params(params.to_dict())
        stage_ctx = with_parent(ctx, parent.run_id)
        for stage in pipeline.STAGES:
            results[stage.name] = TASKS[stage.name](stage_ctx)
        parent.set_tags({tag(k): v for k, v in pipeline.parent_tags(results).items()})
        parent.log_metrics(pipeline.parent_metrics(results))
        commit_note = dvc_commit(root_path, params_path, overrides) if commit_dvc else "skipped (commit_dvc=False)"
        markdown = summary_markdown(results, parent.run_id, commit_note)
        parent.client.log_text(parent.run_id, markdown, SUMMARY_ARTIFACT)
    create_markdown_artifact(markdown, key="lmcore-lifecycle-summary", description="lmcore lifecycle run")
    return {**results, "mlflow_run_id": parent.run_id, "dvc": commit_note, "summary": pipeline.summary_rows(results)}


if __name__ == "__main__":
    args = sys.argv[1:]
    lifecycle(params_file=args[0] if args else "params.yaml")
