"""Champion vs challenger in the benchmark run: the new version's per-item results against the champion's on the
same items (lmcore.harness.compare), logged with the run as comparison/ (a table, a plot with error bars, and
the items where the two disagree as MLflow tables, one per task), so a reviewer sees in the run's artifacts why the
promotion gate decided as it did.

Each version scored by the gate records where its per-item results are kept (`record_results`: the version tag
bench.results, an artifact folder of the run that scored it), so a later run finds the champion's.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from lmcore.harness.compare import paired_verdicts, write_comparison
from lmcore.harness.run import RESULTS, SAMPLES_DIR, item_tables
from lmcore.stages import Scores
from tasks.tags import TAG_BENCH_RESULTS, TAG_COMPARE_RUNS, TAG_COMPARED_WITH, TAG_PROMOTION_RUN
from tasks.tracking import MlflowTracker, Tracking, no_progress_bar

COMPARISON_DIR = "comparison"
DISAGREEMENTS_TABLES = f"{COMPARISON_DIR}/disagreements"  # /<task>.json, MMLU by category (lmcore.harness.run.table_part)


def record_results(tracking: Tracking, run: MlflowTracker, name: str, version: str, scores: Scores, dest: str) -> None:
    """Tag version `version` of `name` with the artifact folder of the per-item results behind its scores: where the
    stage logged them (`scores.results_artifact`), else logged now under `dest` in `run` (a re-scored champion)."""
    if scores.results_dir is None:
        return
    artifact = scores.results_artifact
    if artifact is None:
        artifact = dest
        run.log_artifact(scores.results_dir / RESULTS, artifact)
        run.log_artifact(scores.results_dir / SAMPLES_DIR, f"{artifact}/{SAMPLES_DIR}")
    tracking.client().set_model_version_tag(name, version, TAG_BENCH_RESULTS, f"runs:/{run.run_id}/{artifact}")


def fetch_results(tracking: Tracking, uri: str, dst: Path) -> Path | None:
    """The per-item results folder at `uri` (runs:/<id>/<folder>) downloaded into `dst`; None when it is gone."""
    dst.mkdir(parents=True, exist_ok=True)
    with no_progress_bar():
        try:
            for part in (RESULTS, SAMPLES_DIR):
                mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{part}", dst_path=str(dst), tracking_uri=tracking.uri)
        except (mlflow.exceptions.MlflowException, OSError):
            return None
    return dst if (dst / RESULTS).is_file() and (dst / SAMPLES_DIR).is_dir() else None


def compare_with_champion(tracking: Tracking, run: MlflowTracker, name: str, version: str, champion, mine: Path, work: Path,
                          folder: str = COMPARISON_DIR) -> dict | None:
    """Compare version `version` (its results folder `mine`) with `champion` (the ModelVersion that holds
    @champion; fetched again here, so tags set since count) on the same items; log `folder` (comparison/) with
    `run`, the disagreements as MLflow tables under <folder>/disagreements/. Returns the comparison's summary
    (lmcore.harness.compare.write_comparison's, plus "verdicts": both models' per-item verdicts, for a paired
    test), or None when the champion's per-item results are not recorded (scored before they were) or are on
    other items."""
    champion = tracking.client().get_model_version(name, str(champion.version))
    uri = champion.tags.get(TAG_BENCH_RESULTS)
    theirs = fetch_results(tracking, uri, work / f"champion-v{champion.version}") if uri else None
    if theirs is None:
        return None
    labels = (f"{name} v{version}", f"v{champion.version} @champion")
    out = work / folder
    try:
        summary = write_comparison(mine, theirs, out, labels)
        summary["verdicts"] = paired_verdicts(Path(mine) / SAMPLES_DIR, theirs / SAMPLES_DIR)
    except ValueError:  # scored on other items: the gate compared nothing either
        return None
    run.log_artifact(out, folder)
    for part, rows in item_tables(summary["disagreements"]).items():
        run.log_table(f"{folder}/disagreements/{part}.json", rows)
    run.set_tags({TAG_COMPARED_WITH: f"{name} v{champion.version}"})
    # MLflow's run comparison view of this benchmark run and the one that made the champion champion: the two
    # versions' metrics side by side (the same names in both)
    champion_run = champion.tags.get(TAG_PROMOTION_RUN) or uri.removeprefix("runs:/").split("/")[0]
    if champion_run != run.run_id:
        client = tracking.client()
        experiments = sorted({client.get_run(r).info.experiment_id for r in (run.run_id, champion_run)})
        run.set_tags({TAG_COMPARE_RUNS: f"#/compare-runs?runs={json.dumps([run.run_id, champion_run])}&experiments={json.dumps(experiments)}"})
    run.log_metrics({f"compare.{task}.disagree": float(n) for task, n in summary["n_disagree"].items() if n is not None})
    return summary
