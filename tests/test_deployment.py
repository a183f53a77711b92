"""Scheduled runs on real servers: a `prefect server`, an `mlflow server`, and the lifecycle deployment
served by `python -m flows.deploy` (what `make serve` runs). One triggered run of the micro profile
logs to the MLflow server over HTTP; the tests then read the schedule, the flow run, the MLflow runs
tagged with its id and the registered model back from the servers."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import MICRO, ROOT
from tests.servers import background, mlflow_server, prefect_server

pytestmark = pytest.mark.slow
CRON = "17 3 * * *"
DEPLOYMENT = "lmcore-lifecycle/nightly-test"


def get_json(url: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(query)}", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Servers up, the deployment served, one run triggered and finished: (prefect, mlflow, flow run, root)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work = tmp_path_factory.mktemp("ops")
    root = work / "project"
    root.mkdir()
    fast_scheduler = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    with prefect_server(work / "prefect", env=fast_scheduler) as prefect, mlflow_server(work / "mlflow") as mlflow:
        env = {
            **os.environ,
            **prefect.env(),
            "MLFLOW_TRACKING_URI": mlflow.url,
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        cmd = [sys.executable, "-m", "flows.deploy", "--name", "nightly-test", "--cron", CRON,
               "--params", str(MICRO), "--root", str(root)]
        log = work / "serve.log"
        with background(cmd, log, env=env, cwd=ROOT) as serve, temporary_settings({PREFECT_API_URL: prefect.api_url}):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 120
                while True:
                    assert serve.poll() is None, f"flows.deploy exited:\n{log.read_text()[-4000:]}"
                    try:
                        deployment = client.read_deployment_by_name(DEPLOYMENT)
                        break
                    except Exception:
                        assert time.monotonic() < deadline, f"no deployment after 120 s:\n{log.read_text()[-4000:]}"
                        time.sleep(1)
                flow_run = run_deployment(DEPLOYMENT, timeout=0)
                deadline = time.monotonic() + 600
                while not (flow_run := client.read_flow_run(flow_run.id)).state.is_final():
                    assert serve.poll() is None, f"flows.deploy exited:\n{log.read_text()[-4000:]}"
                    assert time.monotonic() < deadline, f"run not finished in 600 s:\n{log.read_text()[-4000:]}"
                    time.sleep(2)
                scheduled = client.read_flow_runs(limit=20)
            assert flow_run.state.is_completed(), f"{flow_run.state}:\n{log.read_text()[-6000:]}"
            yield {"prefect": prefect, "mlflow": mlflow, "flow_run": flow_run, "deployment": deployment,
                   "runs": scheduled, "root": root}


def test_deployment_has_the_cron_schedule_and_parameters(served):
    deployment = served["deployment"]
    assert [s.schedule.cron for s in deployment.schedules] == [CRON]
    assert deployment.parameters["params_file"] == str(MICRO)
    assert deployment.parameters["root"] == str(served["root"])
    # one run at a time: runs of one deployment share their output folders
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    # the server's scheduler put the next nightly runs on the calendar, at 03:17 UTC
    upcoming = [r for r in served["runs"] if r.deployment_id == deployment.id and r.state.is_scheduled()
                and r.id != served["flow_run"].id]
    assert upcoming, "the scheduler created no scheduled runs"
    assert all((r.expected_start_time.hour, r.expected_start_time.minute) == (3, 17) for r in upcoming)


def test_triggered_run_is_tracked_under_its_flow_run_id(served):
    from mlflow.tracking import MlflowClient

    from lmcore.pipeline import NAMES as STAGES

    run_id = str(served["flow_run"].id)
    client = MlflowClient(served["mlflow"].url)
    exp = client.get_experiment_by_name("lmcore-micro")
    runs = client.search_runs([exp.experiment_id], f"tags.`lmcore.prefect_flow_run_id` = '{run_id}'")
    stages = sorted(r.data.tags["lmcore.stage"] for r in runs)
    assert stages == sorted([*STAGES, "lifecycle"])
    assert all(r.info.status == "FINISHED" for r in runs)
    # artifacts went through the server's proxy into its artifact root, none into the project
    assert any(served["mlflow"].artifacts.rglob("model.safetensors"))
    assert not (served["root"] / "mlruns").exists() and not (served["root"] / "mlflow.db").exists()


def test_registered_model_reads_back_over_http(served, tmp_path):
    import mlflow

    url = served["mlflow"].url
    model = get_json(f"{url}/api/2.0/mlflow/registered-models/get", name="lmcore-base")["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
    assert aliases == {"champion": "1"}  # the first version scored becomes champion
    version = get_json(f"{url}/api/2.0/mlflow/model-versions/get", name="lmcore-base", version="1")["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    run = get_json(f"{url}/api/2.0/mlflow/runs/get", run_id=version["run_id"])["run"]
    run_tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run_tags["lmcore.stage"] == "pretrain"
    assert run_tags["lmcore.prefect_flow_run_id"] == str(served["flow_run"].id)
    assert tags["lmcore.weights_sha256"] == run_tags["lmcore.weights_sha256"]
    # the model itself, downloaded through the server, generates
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)  # process-wide: other tests' registrations set it too
    try:
        loaded = mlflow.pyfunc.load_model("models:/lmcore-base@champion", dst_path=str(tmp_path))
        out = loaded.predict(["Every effort moves you"], params={"max_new_tokens": 4, "temperature": 0.0})
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert len(out) == 1 and isinstance(out[0], str) and out[0].strip()  # the continuation
