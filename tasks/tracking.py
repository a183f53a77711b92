"""MLflow on the edge of the pipeline: runs, params, metrics, tags and the model registry.

Prefect runs tasks in worker threads and MLflow's active run is thread-local, so everything here
goes through `MlflowClient` with explicit run ids.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

# Tag keys, named once.
TAG_STAGE = "lmcore.stage"
TAG_GIT_COMMIT = "lmcore.git_commit"
TAG_PARAMS_SHA = "lmcore.params_sha256"
TAG_RAW_MANIFEST_SHA = "lmcore.raw_manifest_sha256"
TAG_TOKENS_MANIFEST_SHA = "lmcore.tokens_manifest_sha256"
TAG_WEIGHTS_SHA = "lmcore.weights_sha256"
TAG_BASE_WEIGHTS_SHA = "lmcore.base_weights_sha256"  # the model a fine-tune started from
TAG_FINETUNE = "lmcore.finetune"  # classifier | instruct | dpo
TAG_FINETUNE_MANIFEST_SHA = "lmcore.finetune_manifest_sha256"  # the data a fine-tune collected
TAG_FLOW_RUN = "lmcore.prefect_flow_run_id"
TAG_LAUNCHER = "lmcore.launcher"
# DVC hashes (md5, as dvc.lock records them) of a stage run's inputs and outputs: one tag per path.
TAG_DVC_DEP = "lmcore.dvc.dep."  # + the path as dvc.yaml writes it
TAG_DVC_OUT = "lmcore.dvc.out."
TAG_DVC_DEPS_MD5 = "lmcore.dvc.deps_md5"  # md5 of all the deps' hashes: runs with equal inputs share it
TAG_DVC_HASHED_BY = "lmcore.dvc.hashed_by"  # DVC on the project at the root, or dvc_data without one
PARENT_RUN = "mlflow.parentRunId"

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"pretrain": {"lr": 0.001}} -> {"pretrain.lr": "0.001"}; lists are kept as one value."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LEN]
    return flat


class MlflowTracker:
    """lmcore's `Tracker` protocol on one MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


_READY_STORES: set[str] = set()  # SQLite stores this process has seen with their tables in place


def _create_sqlite_store(uri: str) -> None:
    """Open (and on first use create) a SQLite store while holding `<db>.lock`: MLflow creates a new store's tables
    on first access without a lock of its own, so two runs starting together on a fresh store would both try
    ("table ... already exists")."""
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=300):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # the tracking store: creates or migrates the tables
        client.search_registered_models(max_results=1)  # the registry store, on the same database


@dataclass
class Tracking:
    """Where runs go: the tracking URI, the experiment, and the parent run (if any)."""

    uri: str
    experiment: str
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # A run named after a dvc.yaml stage gets the DVC hashes of its deps (at the start) and outs (at the end)
    # under this project root; None: no DVC tags.
    lineage_root: Path | None = None

    def client(self) -> MlflowClient:
        if self.uri.startswith("sqlite:///") and self.uri not in _READY_STORES:
            _create_sqlite_store(self.uri)
            _READY_STORES.add(self.uri)
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def experiment_id(self, client: MlflowClient) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment)
        except Exception:  # another process created it meanwhile
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
        """A run (nested under the parent when there is one), FINISHED on success, FAILED on error.

        With `lineage_root`, a stage's run starts with its inputs' DVC hashes and ends with its outputs'.
        """
        from tasks import lineage  # it imports this module's tag names

        client = self.client()
        all_tags = {TAG_STAGE: name, **self.tags, **(tags or {})}
        if self.parent_run_id:
            all_tags[PARENT_RUN] = self.parent_run_id
        if self.lineage_root is not None:
            all_tags.update(lineage.input_tags(self.lineage_root, name))
        run = client.create_run(self.experiment_id(client), run_name=name, tags=all_tags)
        tracker = MlflowTracker(client, run.info.run_id)
        try:
            yield tracker
            if self.lineage_root is not None:
                tracker.set_tags(lineage.output_tags(self.lineage_root, name))
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")
