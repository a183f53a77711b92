"""A project root as a user has one: a git repository with DVC, the code (the stages' code deps), dvc.yaml and
a params.yaml; for the slow tests that run `dvc repro`, `lmcore pipeline` and the deployment in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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
