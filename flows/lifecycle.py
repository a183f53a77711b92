"""The lifecycle flow, tracked in MLflow: the stages of lmcore.pipeline in order, one Prefect task each
(collect -> preprocess -> base_model -> tokenize -> pretrain -> evaluate -> benchmark -> finetune_classifier
-> finetune_instruct -> dpo -> judge), each run only when it changed.

    python -m flows.lifecycle                     # default params.yaml, local ephemeral Prefect
    lmcore pipeline                               # the same; a second run with nothing changed runs nothing
    lmcore pipeline --force                       # every stage, changed or not
    lmcore pipeline --params profiles/micro.yaml  # another profile (every stage runs: dvc.lock is params.yaml's)
    PREFECT_API_URL=http://127.0.0.1:4200/api lmcore pipeline   # against a Prefect server

Only what changed: before each stage DVC's own code compares its deps, params and outs with dvc.lock
(tasks.incremental); an unchanged stage does not run: its task run ends Skipped, the summary shows the values of
the MLflow run that made its outputs, marked "(unchanged)", and the registry is not touched. A stage that runs is
committed to dvc.lock as soon as it finishes, so a run killed halfway keeps what it finished. This holds for runs
of the root's own params.yaml in a DVC project (what dvc.lock describes); other runs execute every stage.

One MLflow parent run per lifecycle run with a nested run per executed stage; the parent records which stages ran
and why (tags lmcore.stages_run, lmcore.stages_skipped, lmcore.decision.<stage>; plan.json) and a markdown
summary, also published as a Prefect artifact. One run at a time per root (tasks.incremental.root_lock).
"""

from __future__ import annotations

import functools
import json
import sys
import time

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.common import make_context, resolve, with_parent
from flows.dvc_yaml import refresh as refresh_dvc_yaml
from lmcore import pipeline
from lmcore.config import load_params
from tasks.context import logger
from tasks.incremental import Plan, made_by, registry_moves, root_lock
from tasks.runner import TASKS, Unchanged
from tasks.tags import TAG_STAGE_DECISION, TAG_STAGES_RUN, TAG_STAGES_SKIPPED, tag

SUMMARY_ARTIFACT = "summary.md"
PLAN_ARTIFACT = "plan.json"  # each stage: ran or not, and why (DVC's status entries)


def summary_markdown(results: dict[str, dict], run_id: str, commit_note: str, plan: Plan, times: dict[str, float]) -> str:
    rows = stage_rows(plan, times) + pipeline.summary_rows(results) + [("MLflow run", run_id), ("DVC", commit_note)]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    return f"# lmcore lifecycle run\n\n| | |\n|---|---|\n{table}\n"


@flow(name="lmcore-lifecycle")
def lifecycle(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    root: str = ".",
    commit_dvc: bool = True,
    force: bool = False,
    wait_s: float = 0.0,
) -> dict:
    """Run the stages in order, each only when DVC finds it changed (or with `force`), committing each to dvc.lock
    as it finishes; returns each stage's summary by name, the MLflow parent run id, the DVC note, the summary
    table's rows, the plan (which stages ran, and why) and each stage's wall time in seconds (`stage_times`, also
    the parent run's metrics stage_time_s.<stage>).

    Another run working in `root` makes this one wait up to `wait_s` seconds, then fail (RootBusyError)."""
    root_path, params_path = resolve(root, params_file)
    params = load_params(params_path, overrides=overrides)
    with root_lock(root_path, f"lifecycle flow run {flow_run.get_name() or 'outside Prefect'}", wait_s):
        plan = Plan.open(root_path, params_path, overrides, force=force)
        if plan.checks and refresh_dvc_yaml(root_path):  # params.yaml names other local source paths now
            logger().info("dvc.yaml rewritten: the local paths params.yaml names are its stages' deps")
        ctx = make_context(root_path, params, launcher="prefect")
        results: dict[str, dict] = {}
        times: dict[str, float] = {}
        with ctx.tracking.run("lifecycle") as parent:
            parent.log_params(params.to_dict())
            stage_ctx = with_parent(ctx, parent.run_id)
            for stage in pipeline.STAGES:
                started = time.perf_counter()
                results[stage.name] = run_or_skip(stage.name, stage_ctx, plan, commit_dvc)
                times[stage.name] = round(time.perf_counter() - started, 3)
            parent.set_tags({tag(k): v for k, v in pipeline.parent_tags(results).items()})
            parent.set_tags(plan_tags(plan, results))
            parent.log_metrics({**pipeline.parent_metrics(results), "stages_run": len(plan.ran), "stages_skipped": len(plan.skipped),
                                **{f"stage_time_s.{name}": s for name, s in times.items()}, "stages_time_s": round(sum(times.values()), 3)})
            parent.client.log_text(parent.run_id, json.dumps(plan.to_dict(), indent=2), PLAN_ARTIFACT)
            commit_note = dvc_note(plan, commit_dvc)
            markdown = summary_markdown(results, parent.run_id, commit_note, plan, times)
            parent.client.log_text(parent.run_id, markdown, SUMMARY_ARTIFACT)
    create_markdown_artifact(markdown, key="lmcore-lifecycle-summary", description="lmcore lifecycle run")
    return {**results, "mlflow_run_id": parent.run_id, "dvc": commit_note,
            "summary": stage_rows(plan, times) + pipeline.summary_rows(results), "plan": plan.to_dict(), "stage_times": times}


def run_or_skip(name: str, ctx, plan: Plan, commit_dvc: bool) -> dict:
    """The stage's summary: run when the plan says so (then committed to dvc.lock at once), else the summary of
    the run that made its outputs, from a task run in state Skipped."""
    made = functools.cache(lambda: made_by(ctx.tracking, ctx.root, name))  # the run that made the outputs, asked once
    registry = pipeline.get(name).registry_deps(ctx.params)  # what DVC cannot see: asked when DVC finds no change
    decision = plan.decide(name, (lambda: registry_moves(ctx.tracking, made()[0], registry)) if registry else None)
    if decision.run:
        logger().info("%s: running (%s)", name, decision.reason)
        result = TASKS[name](ctx)
        if commit_dvc and plan.commit(name):
            logger().info("%s: committed to dvc.lock", name)
        return result
    run_id, summary = made()
    return TASKS[name](ctx, unchanged=Unchanged(run_id, summary), return_state=True).result()


def stage_rows(plan: Plan, times: dict[str, float]) -> list[tuple[str, str]]:
    ran, skipped = plan.ran, plan.skipped
    rows = [("stages run", f"{len(ran)}: {', '.join(ran)}" if ran else "none")]
    if skipped:
        rows.append(("stages unchanged", f"{len(skipped)}: {', '.join(skipped)}"))
    if not plan.checks and not plan.force:
        rows.append(("change check", f"off: {plan.checked_against}"))
    rows.append(("stage time", time_row(times)))
    return rows


def time_row(times: dict[str, float]) -> str:
    """The stages' wall time in all, and the three longest with their shares: "6 min 20 s; longest: benchmark 96 s (25%), ..."."""
    total = sum(times.values())
    longest = ", ".join(f"{name} {s:.0f} s ({s / total:.0%})" for name, s in sorted(times.items(), key=lambda kv: -kv[1])[:3])
    return f"{int(total // 60)} min {total % 60:.0f} s" + (f"; longest: {longest}" if total else "")


def plan_tags(plan: Plan, results: dict[str, dict]) -> dict[str, str]:
    """The parent run's record of the plan: which stages ran, which did not, and the run that made the outputs
    of each one that did not."""
    tags = {TAG_STAGES_RUN: ",".join(plan.ran) or "none", TAG_STAGES_SKIPPED: ",".join(plan.skipped) or "none"}
    for decision in plan.decisions:
        made = results[decision.stage].get("run_id")
        tags[f"{TAG_STAGE_DECISION}{decision.stage}"] = (decision.reason if decision.run else f"unchanged since run {made}")[:5000]
    return tags


def dvc_note(plan: Plan, commit_dvc: bool) -> str:
    if not plan.checks:
        return f"not recorded: {plan.checked_against}"
    if not commit_dvc:
        return "not recorded (commit_dvc=False)"
    return f"committed to dvc.lock: {len(plan.ran)} stage(s)" + (f"; {len(plan.skipped)} unchanged" if plan.skipped else "")


if __name__ == "__main__":
    args = sys.argv[1:]
    lifecycle(params_file=args[0] if args else "params.yaml")
