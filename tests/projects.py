"""A project root as a user has one: a git repository with DVC, the code (the stages' code deps), dvc.yaml and
a params.yaml; for the slow tests that run `dvc repro`, `lmcore pipeline` and the deployment in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import MICRO, ROOT

COPY = ["lmcore", "tasks", "flows", "dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", ".gitignore"]


def make_project(repo: Path, params: dict | None = None, files: dict[str, str] | None = None) -> tuple[Path, dict]:
    """A git + DVC project at `repo` (created) with the checkout's code, `params` (default: the micro profile) as
    params.yaml, `files` (relative path -> text) and dvc.yaml written for those params; committed.

    Returns: (repo, env) with env for commands run in it: its code first on PYTHONPATH, MLflow in its mlflow.db,
    the session's Prefect server (not a temporary one per command)."""
    from flows.dvc_yaml import render_for

    repo.mkdir(parents=True)
    for name in COPY:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (repo / "params.yaml").write_text(MICRO.read_text() if params is None else yaml.safe_dump(params, sort_keys=False))
    for rel, text in (files or {}).items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    (repo / "dvc.yaml").write_text(render_for(repo))
    # the checkout's .gitignore: DVC outs (/data/, /models/, /reports/), mlflow.db, mlruns/, dvc_plots/ stay out of git
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(repo)  # the copied code, not the checkout's
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "lmcore-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@lmcore.invalid"
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    return repo, env


def sh(repo: Path, env: dict, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def dvc(repo: Path, env: dict, *args: str) -> str:
    return sh(repo, env, sys.executable, "-m", "dvc", *args)


def repro_ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order."""
    return re.findall(r"Running stage '(\w+)'", output)


def pipeline_ran(output: str) -> list[str]:
    """The stages an `lmcore pipeline` ran, in order, from its summary's "stages run" row."""
    found = re.search(r"^stages run\s+(?:none|\d+: (.*))$", output, re.MULTILINE)
    assert found, f"no 'stages run' row in:\n{output[-3000:]}"
    return found.group(1).split(", ") if found.group(1) else []


# The micro profile plus a folder source: what the DVC comparisons and the concurrency check run on.
CORPUS = {f"corpus/doc{i}.txt": "\n\n".join(f"Paragraph {j} of document {i}: the river ran past the old stone house "
                                              f"in the morning light, and nobody said a word about it." for j in range(8))
          for i in range(2)}
# ... and the classifier's labelled data as a local file (the mirror's SMS spam collection, copied): a change to it
# re-runs finetune_classifier alone, which nothing reads.
LABELLED = "labelled/sms.tsv"
SMS_SPAM = Path(os.environ.get("LMCORE_MIRROR", ROOT.parent / "shared" / "data")) / "classification" / "sms_spam" / "SMSSpamCollection"


def micro_with_folder_source() -> dict:
    params = yaml.safe_load(MICRO.read_text())
    params["collect"]["sources"].append({"name": "notes", "path": "corpus", "license": "test"})
    params["finetune_classifier"]["sources"] = [{"name": "sms-spam", "path": LABELLED, "license": "CC BY 4.0"}]
    return params


@dataclass
class PipelineProject:
    """One micro project (a folder source too) run once by two `lmcore pipeline --wait` started together, and an
    untouched copy made before that run. Shared read-only by tests/test_dvc.py and tests/test_incremental_dvc.py:
    a test that changes a project works on a copy (`copy_project`)."""

    repo: Path
    env: dict
    outputs: list[str]  # the two pipelines' terminal output
    pristine: Path  # the same project as committed, before any run


def run_pipeline_project(work: Path) -> PipelineProject:
    repo, env = make_project(work / "repo", micro_with_folder_source(), {**CORPUS, LABELLED: SMS_SPAM.read_text(encoding="utf-8")})
    pristine = work / "pristine" / "repo"  # .../pristine/repo: its default DVC remote is .../pristine/lmcore-dvc-remote
    shutil.copytree(repo, pristine, symlinks=True)
    cmd = ["lmcore", "pipeline", "--wait", "900"]
    procs = [subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    return PipelineProject(repo, env, outputs, pristine)


def copy_project(src: Path, env: dict, dst: Path) -> tuple[Path, dict]:
    """A copy of the project at `src` (outputs, DVC cache, git and MLflow store included) at `dst`, and its env."""
    shutil.copytree(src, dst, symlinks=True)
    return dst, {**env, "PYTHONPATH": str(dst), "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}"}
