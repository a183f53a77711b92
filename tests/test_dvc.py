"""`dvc repro` in a temporary git repo: runs every stage, then nothing, then only what a param change touches;
a Prefect lifecycle run leaves DVC with nothing to do, and makes the same bytes as `dvc repro`; after `dvc push`
to the default remote, a fresh clone plus `dvc pull` restores every output and `dvc repro` runs nothing.

Two micro pipeline runs of one project (the micro profile and a folder source) serve every test here: one by
`dvc repro` (a module fixture, on the project as committed) and one by `lmcore pipeline` (the session's
`pipeline_project`, which tests/test_incremental_dvc.py shares); a test that changes a project works on a copy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lmcore import pipeline
from tests.projects import copy_project, dvc, pipeline_ran, repro_ran, sh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # whole pipelines are the fixtures' set-up
STAGES = list(pipeline.NAMES)
# a finetune_instruct param re-runs it, dpo (which reads its model), the instruct gate and the judge (which reads both
# models' weights): only what the change touches (the wider fan-out of a new corpus document, every stage from collect
# on, is tests/test_deployment.py's third scheduled run)
DOWNSTREAM_OF_INSTRUCT = pipeline.downstream("finetune_instruct")


def ran(output: str) -> list[str]:
    return repro_ran(output)


def tracked_outputs(repo: Path) -> list[str]:
    """Every out and metrics file the stages of dvc.yaml declare."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return [entry if isinstance(entry, str) else next(iter(entry))
            for stage in stages.values() for key in ("outs", "metrics") for entry in stage.get(key, [])]


def digests(repo: Path) -> dict[str, str]:
    """sha256 of every file under the tracked outputs, by path relative to the repo."""
    files = []
    for out in tracked_outputs(repo):
        path = repo / out
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# What a run measures about itself, not what it computes: wall-clock seconds, throughput, measured peak FLOP/s.
TIMINGS = {"train_time_s", "tokens_per_s", "mfu", "peak_flops", "elapsed_s", "items_per_s", "cached_prefix_s"}


def comparable(repo: Path, rel: str):
    """A JSON output with the timings left out."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(json.loads((repo / rel).read_text(encoding="utf-8")))


@dataclass
class Run:
    """A micro pipeline run in its own repo, and what it left right after (tests may go on changing the repo)."""

    repo: Path
    env: dict
    output: str
    files: dict[str, str]  # digests(repo)
    json: dict[str, object]  # every .json output, parsed, with the timings left out


def finished(repo: Path, env: dict, output: str) -> Run:
    files = digests(repo)
    return Run(repo, env, output, files, {f: comparable(repo, f) for f in files if f.endswith(".json")})


@pytest.fixture(scope="module")
def repro_run(pipeline_project, tmp_path_factory) -> Run:
    """The project as committed, run by `dvc repro` in a copy of its own."""
    repo, env = copy_project(pipeline_project.pristine, pipeline_project.env, tmp_path_factory.mktemp("repro") / "repo")
    return finished(repo, env, dvc(repo, env, "repro"))


@pytest.fixture(scope="module")
def prefect_run(pipeline_project) -> Run:
    """The same project run by the Prefect lifecycle flow (which ends with `dvc commit`): the session's run."""
    repo, env = pipeline_project.repo, pipeline_project.env
    output = next(o for o in pipeline_project.outputs if pipeline_ran(o))  # the one that ran, not the one that waited
    return finished(repo, env, output)


def test_repro_runs_all_then_nothing_then_only_what_changed(repro_run):
    repo, env = repro_run.repo, repro_run.env
    assert ran(repro_run.output) == STAGES
    assert ran(dvc(repo, env, "repro")) == []
    assert "up to date" in dvc(repo, env, "status")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune_instruct"]["lr"] = 0.001
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = ran(dvc(repo, env, "repro"))
    assert first == DOWNSTREAM_OF_INSTRUCT == ["finetune_instruct", "dpo", "instruct_eval", "judge"]
    # a dpo param alone re-runs dpo and the instruct gate: tests/test_incremental_dvc.py, by DVC and by Prefect

    metrics = json.loads(dvc(repo, env, "metrics", "show", "--json"))[""]["data"]
    values = metrics["reports/evaluate/metrics.json"]["data"]
    assert values["perplexity"] > 1 and values["val_loss"] > 0
    assert 0 <= metrics["reports/classifier/metrics.json"]["data"]["test"]["accuracy"] <= 1
    assert metrics["reports/instruct/metrics.json"]["data"]["final_val_loss"] > 0
    assert "final_val_reward_margin" in metrics["reports/dpo/metrics.json"]["data"]
    assert 0 <= metrics["reports/benchmark/metrics.json"]["data"]["mmlu"]["acc"] <= 1
    assert metrics["reports/judge/summary.json"]["data"]["skipped"] is True
    dvc(repo, env, "plots", "show", "--out", "dvc_plots")
    html = (repo / "dvc_plots" / "index.html").read_text()
    assert "val_loss" in html and "train_loss" in html and "train_reward_margin" in html

    # every dvc-run stage tracked to MLflow, one run per stage execution
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("lmcore-micro")
    stages = sorted(r.data.tags["lmcore.stage"] for r in client.search_runs([exp.experiment_id]))
    assert stages == sorted(STAGES + DOWNSTREAM_OF_INSTRUCT)


def test_prefect_run_leaves_dvc_nothing_to_do(prefect_run):
    repo, env = prefect_run.repo, prefect_run.env
    assert "committed to dvc.lock" in prefect_run.output
    assert "up to date" in dvc(repo, env, "status")
    assert ran(dvc(repo, env, "repro")) == []


def test_prefect_flow_and_dvc_repro_make_the_same_bytes(repro_run, prefect_run):
    """Same params, seed and machine: the lifecycle flow (one process, stages in Prefect worker threads) and
    `dvc repro` (a process per stage) write byte-identical token shards, manifest and weights, and the same
    everything else but for timings (no output holds the checkout's absolute path)."""
    by_repro, by_prefect = repro_run.files, prefect_run.files
    assert by_repro.keys() == by_prefect.keys()
    tokens = [f for f in by_repro if f.startswith("data/tokens/")]
    assert "data/tokens/manifest.json" in tokens and any(f.endswith(".arrow") for f in tokens)
    weights = [f for f in by_repro if f.startswith("models/") and f.endswith(".safetensors")]
    assert {f.split("/")[1] for f in weights} == {"base", "classifier", "instruct", "dpo"}
    differ = sorted(f for f in by_repro if by_repro[f] != by_prefect[f])
    assert not set(differ) & set(tokens + weights), f"differ: {differ}"
    assert all(f.endswith(".json") for f in differ), f"differ: {differ}"
    for f in differ:
        assert repro_run.json[f] == prefect_run.json[f], f"{f} differs beyond timings"
    assert not any(str(repro_run.repo) in (repro_run.repo / f).read_text(errors="replace") for f in differ)


def test_push_then_fresh_clone_pull_restores_every_output(prefect_run, tmp_path):
    """The documented workflow: run, `git add dvc.lock`, commit, `dvc push`; elsewhere clone and `dvc pull`."""
    before = prefect_run.files
    repo, env = copy_project(prefect_run.repo, prefect_run.env, tmp_path / "repo")  # the shared run stays as it is
    remote = repo.parent / "lmcore-dvc-remote"  # the default remote: ../../lmcore-dvc-remote from repo/.dvc
    assert not any(part in ("mlruns", "mlartifacts", "mlflow.db") for f in before for part in f.split("/"))
    assert sh(repo, env, "git", "status", "--porcelain").splitlines() == ["?? dvc.lock"]  # all git needs
    sh(repo, env, "git", "add", "dvc.lock")
    sh(repo, env, "git", "commit", "-qm", "pipeline run")
    dvc(repo, env, "push")
    assert (remote / "files" / "md5").is_dir()
    assert "in sync" in dvc(repo, env, "status", "--cloud")

    clone = repo.parent / "clone"
    sh(repo.parent, env, "git", "clone", "-q", str(repo), str(clone))
    clone_env = {**env, "PYTHONPATH": str(clone), "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"}
    assert not (clone / "models").exists()
    dvc(clone, clone_env, "pull")
    assert digests(clone) == before  # every file of every out, byte for byte
    assert "up to date" in dvc(clone, clone_env, "status")
    assert ran(dvc(clone, clone_env, "repro")) == []
    assert not (clone / "mlflow.db").exists()  # no stage ran, nothing was tracked
    assert sh(clone, clone_env, "git", "status", "--porcelain") == ""


def test_repro_stage_runs_carry_lineage(repro_run):
    """Every `lmcore run <stage>` that `dvc repro` starts tags its MLflow run: commit, params, flow run, launcher,
    and the md5s of its deps and outs as dvc.lock records them (the newest run of each stage made the current lock)."""
    from mlflow.tracking import MlflowClient

    repo, env = repro_run.repo, repro_run.env
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("lmcore-micro")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    newest = {r.data.tags["lmcore.stage"]: r for r in runs}
    assert sorted(newest) == sorted(STAGES)
    for stage, run in newest.items():
        tags = run.data.tags
        assert tags["lmcore.launcher"] == "stage" and tags["lmcore.prefect_flow_run_id"] and tags["lmcore.params_sha256"]
        assert tags["lmcore.git_commit"] != "unknown"
        assert tags["lmcore.dvc.hashed_by"] == f"dvc: the DVC project at {repo.resolve()}"
        deps = {k.removeprefix("lmcore.dvc.dep."): v for k, v in tags.items() if k.startswith("lmcore.dvc.dep.")}
        outs = {k.removeprefix("lmcore.dvc.out."): v for k, v in tags.items() if k.startswith("lmcore.dvc.out.")}
        assert deps == {d["path"]: d["md5"] for d in lock[stage]["deps"]}, stage
        assert outs == {o["path"]: o["md5"] for o in lock[stage]["outs"]}, stage
