"""The micro lifecycle run, once per session, shared by the flow tests (a run takes a minute or two)."""

from __future__ import annotations

import pytest

from tests.conftest import MICRO


@pytest.fixture(scope="session")
def lifecycle_run(tmp_path_factory, prefect_harness):
    """(project root, MLflow URI, the flow's result) of one lifecycle flow on the micro profile in a temporary
    root (no DVC project there), tracked to a SQLite store in that root."""
    root = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    from flows.lifecycle import lifecycle

    # only while the flow runs: a session-long MLFLOW_TRACKING_URI would leak into every later test
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = lifecycle(params_file=str(MICRO), root=str(root))
    yield root, uri, result
