"""MLflow on the edge of the pipeline: runs, params, metrics, tags and the model registry.

Prefect runs tasks in worker threads and MLflow's active run is thread-local, so everything here
goes through `MlflowClient` with explicit run ids. Param and tag values, the error tag and the traceback artifact
are logged with the credentials in their URLs masked (lmcore.redact): `user:password@` and `?token=...`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lmcore.redact import redact
from tasks import dvc_hashes
from tasks.tags import ERROR_ARTIFACT, PARENT_RUN, TAG_ERROR, TAG_STAGE

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
    """{"pretrain": {"lr": 0.001}} -> {"pretrain.lr": "0.001"}; lists are kept as one value. Credentials in URLs
    are masked (lmcore.redact) before the value is cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = redact(str(value))[:MAX_PARAM_LEN]
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
        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_table(self, artifact_file: str, rows: list[dict]) -> None:
        """Rows as an MLflow table artifact: the UI's artifact view shows it as a table to filter and sort."""
        import pandas as pd

        self.client.log_table(self.run_id, pd.DataFrame(rows), artifact_file)

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
        """A run (nested under the parent when there is one), FINISHED on success; on an error FAILED, with the
        error's first line as tag `lmcore.error` and its traceback as the artifact error/traceback.txt.

        With `lineage_root`, a stage's run starts with its inputs' DVC hashes and ends with its outputs'.
        """
        client = self.client()
        all_tags = {k: redact(str(v)) for k, v in {TAG_STAGE: name, **self.tags, **(tags or {})}.items()}
        if self.parent_run_id:
            all_tags[PARENT_RUN] = self.parent_run_id
        if self.lineage_root is not None:
            all_tags.update(dvc_hashes.input_tags(self.lineage_root, name))
        run = client.create_run(self.experiment_id(client), run_name=name, tags=all_tags)
        tracker = MlflowTracker(client, run.info.run_id)
        try:
            yield tracker
            if self.lineage_root is not None:
                tracker.set_tags(dvc_hashes.output_tags(self.lineage_root, name))
        except BaseException as err:
            with contextlib.suppress(Exception):  # the run is failed whatever happens to its error record
                message = (str(err).strip().splitlines() or [type(err).__name__])[0]
                client.set_tag(run.info.run_id, TAG_ERROR, redact(f"{type(err).__name__}: {message}")[:MAX_PARAM_LEN])
                client.log_text(run.info.run_id, redact("".join(traceback.format_exception(err))), ERROR_ARTIFACT)
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")


@contextlib.contextmanager
def no_progress_bar():
    """MLflow draws a download bar per artifact on stderr; a few small files need none."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
