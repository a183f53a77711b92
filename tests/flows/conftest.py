"""The micro lifecycle run, once per session, shared by the flow tests (a run takes a minute or two)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import MICRO


@pytest.fixture(scope="session")
def lifecycle_run(tmp_path_factory, prefect_harness):
    """(project root, MLflow URI, the flow's result) of one lifecycle flow on the micro profile in a temporary
    root (no DVC project there), tracked to a SQLite store in that root."""
    root = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    from flows.lifecycle import lifecycle

    from mlflow.tracking import MlflowClient

    # the experiment made first, its artifacts in the root: MLflow's default is ./mlruns of the folder the process
    # imported mlflow in (the checkout), where copies of this root would share them
    experiment = yaml.safe_load(MICRO.read_text())["tracking"]["experiment"]
    MlflowClient(uri).create_experiment(experiment, artifact_location=(root / "mlruns" / experiment).as_uri())
    # only while the flow runs: a session-long MLFLOW_TRACKING_URI would leak into every later test
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = lifecycle(params_file=str(MICRO), root=str(root))
    yield root, uri, result
