"""The lifecycle flow, tracked in MLflow: collect -> preprocess -> tokenize -> pretrain -> evaluate -> benchmark
(HellaSwag, MMLU, TruthfulQA, ARC; eval-gated `champion`), then fine-tuning: finetune_classifier (spam/ham head),
finetune_instruct (Alpaca template) -> dpo (preferences), and judge (LLM-as-judge, when an endpoint is configured).

    python -m flows.lifecycle                     # default params.yaml, local ephemeral Prefect
    lmcore pipeline --params profiles/micro.yaml  # another profile
    PREFECT_API_URL=http://127.0.0.1:4200/api lmcore pipeline   # against a Prefect server

One MLflow parent run per lifecycle run with a nested run per stage; the models are registered as
`lmcore-base`, `lmcore-classifier` and `lmcore-instruct` (the SFT version @sft, the DPO version @dpo);
a markdown artifact summarises the run; dvc.lock records the outputs.
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import dvc_commit, make_context, resolve, with_parent
from lmcore.config import load_params
from tasks.stages import STAGES, TASKS
from tasks.tracking import TAG_RAW_MANIFEST_SHA, TAG_TOKENS_MANIFEST_SHA, TAG_WEIGHTS_SHA


def summary_markdown(results: dict, registered: str, commit_note: str, run_id: str) -> str:
    pre, ev = results["pretrain"], results["evaluate"]
    cls, ins, dpo = results["finetune_classifier"], results["finetune_instruct"], results["dpo"]
    bench = results["benchmark"]
    rows = [
        ("sources collected", results["collect"]["sources"]),
        ("raw bytes", f"{results['collect']['bytes']:,}"),
        ("documents", f"{results['preprocess']['documents']:,}"),
        ("train tokens", f"{results['tokenize']['train_tokens']:,}"),
        ("val tokens", f"{results['tokenize']['val_tokens']:,}"),
        ("parameters", f"{pre['n_params']:,}"),
        ("steps", pre["steps"]),
        ("val loss (first → final)", f"{pre['first_val_loss']:.4f} → {pre['final_val_loss']:.4f}"),
        ("evaluation val loss", f"{ev['val_loss']:.4f}"),
        ("perplexity", f"{ev['perplexity']:.2f}"),
        ("tokens/s", f"{pre['tokens_per_s']:,.0f}"),
        ("registered model", f"{registered} v{pre['model_version']}"),
        ("classifier test accuracy (majority baseline)", f"{cls['test_accuracy']:.4f} ({cls['majority_baseline_accuracy']:.4f})"),
        ("classifier test F1", f"{cls['test_f1']:.4f}"),
        ("instruct val loss (first → final)", f"{ins['first_val_loss']:.4f} → {ins['final_val_loss']:.4f}"),
        ("DPO val reward margin (first → final)", f"{dpo['first_val_reward_margin']:.4f} → {dpo['final_val_reward_margin']:.4f}"),
        ("registered fine-tunes", f"classifier v{cls['model_version']}, instruct v{ins['model_version']} (@sft), v{dpo['model_version']} (@dpo)"),
        (f"benchmark {bench['primary_metric']}", f"{bench['primary_value']:.4f} ± {bench['primary_stderr'] or 0:.4f} ({bench['n_items']:,} items)"),
        ("promotion", _promotion_note(bench["promotion"])),
        ("LLM-as-judge", _judge_note(results["judge"])),
        ("MLflow run", run_id),
        ("DVC", commit_note),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# lmcore lifecycle run\n\n| | |\n|---|---|\n{table}\n"


def _promotion_note(decision: dict | None) -> str:
    if decision is None:
        return "none (the base model is not registered)"
    return f"v{decision['version']} -> @{decision['alias']}: {decision['reason']}"


def _judge_note(judge: dict) -> str:
    if judge["skipped"]:
        return f"skipped: {judge['reason']}"
    return ", ".join(f"{name} {score:.1f}" if score is not None else f"{name}: no score" for name, score in judge["mean_scores"].items())


@flow(name="lmcore-lifecycle")
def lifecycle(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    root: str = ".",
    commit_dvc: bool = True,
) -> dict:
    """Run every stage in order; returns each stage's summary plus the MLflow parent run id."""
    root_path, params_path = resolve(root, params_file)
    params = load_params(params_path, overrides=overrides)
    ctx = make_context(root_path, params, launcher="prefect")
    results: dict = {}
    with ctx.tracking.run("lifecycle") as parent:
        parent.log_params(params.to_dict())
        stage_ctx = with_parent(ctx, parent.run_id)
        for stage in STAGES:
            results[stage] = TASKS[stage](stage_ctx)
        parent.set_tags(
            {
                TAG_RAW_MANIFEST_SHA: results["collect"]["raw_manifest_sha256"],
                TAG_TOKENS_MANIFEST_SHA: results["tokenize"]["tokens_manifest_sha256"],
                TAG_WEIGHTS_SHA: results["pretrain"]["weights_sha256"],
                "lmcore.registered_model": params.tracking.registered_model,
                "lmcore.model_version": str(results["pretrain"]["model_version"]),
            }
        )
        parent.log_metrics(
            {
                "val_loss": results["evaluate"]["val_loss"],
                "perplexity": results["evaluate"]["perplexity"],
                "first_val_loss": results["pretrain"]["first_val_loss"],
                "final_val_loss": results["pretrain"]["final_val_loss"],
                "classifier_test_accuracy": results["finetune_classifier"]["test_accuracy"],
                "classifier_test_f1": results["finetune_classifier"]["test_f1"],
                "instruct_final_val_loss": results["finetune_instruct"]["final_val_loss"],
                "dpo_final_val_reward_margin": results["dpo"]["final_val_reward_margin"],
                f"benchmark.{results['benchmark']['primary_metric']}": results["benchmark"]["primary_value"],
                **{f"judge.{name}_mean_score": v for name, v in results["judge"].get("mean_scores", {}).items() if v is not None},
            }
        )
        commit_note = dvc_commit(root_path, params_path, overrides) if commit_dvc else "skipped (commit_dvc=False)"
        markdown = summary_markdown(results, params.tracking.registered_model, commit_note, parent.run_id)
        parent.client.log_text(parent.run_id, markdown, "summary.md")
    create_markdown_artifact(markdown, key="lmcore-lifecycle-summary", description="lmcore lifecycle run")
    results["mlflow_run_id"] = parent.run_id
    results["dvc"] = commit_note
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    lifecycle(params_file=args[0] if args else "params.yaml")
