"""tasks.tracking against a real SQLite store: processes that open a new store at the same moment all succeed."""

from __future__ import annotations

import subprocess
import sys
import time

SCRIPT = """
import sys, time
from pathlib import Path
from tasks.tracking import Tracking
Path(sys.argv[2] + "." + sys.argv[3]).touch()  # imported: ready
while not Path(sys.argv[2]).exists():  # start together, when every interpreter is ready
    time.sleep(0.01)
tracking = Tracking(uri=sys.argv[1], experiment="race")
with tracking.run("collect") as run:
    run.log_metrics({"x": 1.0})
"""


def test_processes_opening_a_new_sqlite_store_together_all_succeed(tmp_path):
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, uri, str(go), str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"go.{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not get ready"
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-2000:] for e in errors)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("race")
    assert len(client.search_runs([exp.experiment_id])) == 3
