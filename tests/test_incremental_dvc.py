"""The Prefect path skips what `dvc repro` would skip, and two runs started together in one root do not both run.

One micro project with a folder source is run by two `lmcore pipeline --wait` started at once: one runs every
stage, the other waits for it and then finds nothing to do. Then, for each change (nothing; a `dpo` param; a new
document in the folder source; a code file of the tokenizer), two copies of that project get the change: `dvc repro`
runs in one and `lmcore pipeline` in the other, and the stages each ran are compared."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmcore import pipeline
from tests.conftest import MICRO
from tests.projects import dvc, make_project, pipeline_ran, repro_ran, sh

pytestmark = pytest.mark.slow
STAGES = list(pipeline.NAMES)
CORPUS = {f"corpus/doc{i}.txt": "\n\n".join(f"Paragraph {j} of document {i}: the river ran past the old stone house "
                                              f"in the morning light, and nobody said a word about it." for j in range(8))
          for i in range(2)}


def lifecycle_runs(repo, env):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])  # not a process-wide registry URI
    exp = client.get_experiment_by_name("lmcore-micro")
    return client, client.search_runs([exp.experiment_id], "tags.`lmcore.stage` = 'lifecycle'", order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness):
    """The micro profile plus a folder source, run by two pipelines started together: (repo, env, outputs)."""
    params = yaml.safe_load(MICRO.read_text())
    params["collect"]["sources"].append({"name": "notes", "path": "corpus", "license": "test"})
    repo, env = make_project(tmp_path_factory.mktemp("incremental") / "repo", params, CORPUS)
    cmd = ["lmcore", "pipeline", "--wait", "900"]
    procs = [subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    return repo, env, outputs


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
    dst = tmp_path / name
    shutil.copytree(repo, dst, symlinks=True)
    return dst, {**env, "PYTHONPATH": str(dst), "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}"}


def change_dpo(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dpo"]["beta"] = 0.3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def new_document(repo):
    (repo / "corpus" / "doc9.txt").write_text(
        "A new document arrived overnight, about a ferry crossing in winter.\n\n"
        "The boat left at six, and the harbour lights were still burning when it came back for the second time.\n\n"
        "Nobody on board could remember a colder morning, though the captain said he had seen worse ones.\n")


def tokenizer_code(repo):
    path = repo / "lmcore" / "data" / "tokenize.py"
    path.write_text(path.read_text() + "\n# a comment: the code changed, what it makes did not\n")


def nothing(repo):
    pass


@pytest.mark.parametrize("change, expected", [
    (nothing, []),
    (change_dpo, ["dpo"]),  # the judge stage re-runs only if the dpo responses changed: compared, not assumed
    (new_document, None),  # every stage downstream of collect whose inputs came out different
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
    if expected is not None:
        assert flow[: len(expected)] == expected and set(flow) - set(expected) <= {"judge"}
    else:
        assert flow[:2] == ["collect", "preprocess"] and "base_model" not in flow and "pretrain" in flow
    assert "up to date" in dvc(by_prefect, prefect_env, "status")  # each stage that ran was committed
    client, runs = lifecycle_runs(by_prefect, prefect_env)
    assert runs[-1].data.tags["lmcore.stages_run"] == (",".join(flow) or "none")
