"""The Prefect path skips what `dvc repro` would skip, and two runs started together in one root do not both run.

The session's micro project with a folder source (tests/conftest.py `pipeline_project`, shared with tests/test_dvc.py)
was run by two `lmcore pipeline --wait` started at once: one ran every stage, the other waited for it and then found
nothing to do. Then, for each change (a `dpo` param; a new example in the classifier's local labelled file; a code
file of the tokenizer), two copies of that project get the change: `dvc repro` runs in one and `lmcore pipeline` in
the other, and the stages each ran are compared. With nothing changed both run nothing: the waiting pipeline above,
and `dvc repro` in tests/test_dvc.py::test_prefect_run_leaves_dvc_nothing_to_do (the same project). A new document in
the corpus, which re-runs nearly every stage, is tests/test_deployment.py's third scheduled run."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmcore import pipeline
from tests.projects import LABELLED, copy_project, dvc, pipeline_ran, repro_ran, sh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # the shared project's two pipelines are its set-up
STAGES = list(pipeline.NAMES)


def lifecycle_runs(repo, env):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])  # not a process-wide registry URI
    exp = client.get_experiment_by_name("lmcore-micro")
    return client, client.search_runs([exp.experiment_id], "tags.`lmcore.stage` = 'lifecycle'", order_by=["attributes.start_time ASC"])


@pytest.fixture
def project(pipeline_project):
    return pipeline_project.repo, pipeline_project.env, pipeline_project.outputs


def test_two_runs_started_together_do_not_both_run_a_stage(project):
    repo, env, outputs = project
    assert sorted(pipeline_ran(o) for o in outputs) == [[], STAGES]  # the second waited, then found nothing changed
    client, runs = lifecycle_runs(repo, env)
    assert [r.data.tags["lmcore.stages_run"] for r in runs] == [",".join(STAGES), "none"]
    assert runs[1].data.tags["lmcore.stages_skipped"] == ",".join(STAGES)
    stage_runs = client.search_runs([runs[0].info.experiment_id], "tags.`lmcore.stage` != 'lifecycle'")
    assert sorted(r.data.tags["lmcore.stage"] for r in stage_runs) == sorted(STAGES)  # each stage ran once
    assert [str(v.version) for v in client.search_model_versions("name = 'lmcore-base'")] == ["1"]
    # the skipped stages point at the runs that made their outputs
    made = {r.data.tags["lmcore.stage"]: r.info.run_id for r in stage_runs}
    assert {s: runs[1].data.tags[f"lmcore.decision.{s}"] for s in STAGES} == {s: f"unchanged since run {made[s]}" for s in STAGES}
    assert "up to date" in dvc(repo, env, "status")


def copy(project, tmp_path, name):
    repo, env, _ = project
    return copy_project(repo, env, tmp_path / name)


def change_dpo(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dpo"]["beta"] = 0.3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def new_labelled_example(repo):
    with (repo / LABELLED).open("a", encoding="utf-8") as f:
        f.write("spam\tWINNER! A free ferry crossing in winter is yours: text FERRY to 80085 before six tomorrow\n")


def tokenizer_code(repo):
    path = repo / "lmcore" / "data" / "tokenize.py"
    path.write_text(path.read_text() + "\n# a comment: the code changed, what it makes did not\n")


@pytest.mark.parametrize("change, expected", [
    (change_dpo, ["dpo", "instruct_eval"]),  # and the judge when the DPO weights it reads changed (a micro run's may not)
    (new_labelled_example, ["finetune_classifier"]),  # a local source's file: the stage that reads it, nothing after
    # train_tokenizer splits train/val with tokenize's code, so it re-runs too; its tokenizer and the shards come out
    # byte-identical: nothing after tokenize runs
    (tokenizer_code, ["train_tokenizer", "tokenize"]),
])
def test_prefect_path_runs_what_dvc_repro_runs(project, tmp_path, change, expected):
    by_dvc, dvc_env = copy(project, tmp_path, "by-dvc")
    by_prefect, prefect_env = copy(project, tmp_path, "by-prefect")
    change(by_dvc)
    change(by_prefect)
    repro = repro_ran(dvc(by_dvc, dvc_env, "repro"))
    flow = pipeline_ran(sh(by_prefect, prefect_env, "lmcore", "pipeline"))
    assert flow == repro
    assert flow[: len(expected)] == expected and set(flow) - set(expected) <= {"judge"}
    assert "up to date" in dvc(by_prefect, prefect_env, "status")  # each stage that ran was committed
    client, runs = lifecycle_runs(by_prefect, prefect_env)
    assert runs[-1].data.tags["lmcore.stages_run"] == (",".join(flow) or "none")
