"""tasks.tracking against a real SQLite store: processes that open a new store at the same moment all succeed."""

from __future__ import annotations

import subprocess
import sys
import time

SCRIPT = """
import sys, time
from tasks.tracking import Tracking
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together
tracking = Tracking(uri=sys.argv[1], experiment="race")
with tracking.run("collect") as run:
    run.log_metrics({"x": 1.0})
"""


def test_processes_opening_a_new_sqlite_store_together_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.time() + 8  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, uri, str(start)], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-2000:] for e in errors)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("race")
    assert len(client.search_runs([exp.experiment_id])) == 3
