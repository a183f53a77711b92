"""Scheduled runs on real servers: a `prefect server`, an `mlflow server`, and the lifecycle deployment
served by `python -m flows.deploy` (what `make serve` runs) for a DVC project on the micro profile. Three
triggered runs log to the MLflow server over HTTP: the first runs every stage; the second, with nothing changed,
runs none and registers nothing; the third, after a new document in the folder source, runs the affected stages
and continues the champion. The tests read the schedule, the flow runs, the MLflow runs tagged with their ids
and the registered models back from the servers. The Prefect server runs as `make serve` starts it, CSRF protection
on and CORS for its own origin only: all of the above goes through Prefect's client with that on."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tests.conftest import MICRO, ROOT
from tests.projects import make_project
from tests.servers import background, mlflow_server, prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # three whole scheduled runs are the fixture's set-up
CRON = "17 3 * * *"
DEPLOYMENT = "lmcore-lifecycle/nightly-test"


def get_json(url: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(query)}", timeout=30) as resp:
        return json.loads(resp.read())


def finish(client, flow_run, serve, log):
    """Wait for a triggered flow run to end; it must complete."""
    deadline = time.monotonic() + 600
    while not (flow_run := client.read_flow_run(flow_run.id)).state.is_final():
        assert serve.poll() is None, f"flows.deploy exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"run not finished in 600 s:\n{log.read_text()[-4000:]}"
        time.sleep(2)
    assert flow_run.state.is_completed(), f"{flow_run.state}:\n{log.read_text()[-6000:]}"
    return flow_run


def versions(mlflow_url: str) -> dict[str, list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_url, registry_uri=mlflow_url)
    return {m.name: sorted(str(v.version) for v in client.search_model_versions(f"name = '{m.name}'"))
            for m in client.search_registered_models()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Servers up, the deployment of a DVC project (micro, a folder source, pretrain.init: champion) served, and
    three runs triggered: the first runs everything, the second (nothing changed) nothing, the third after a new
    document in the folder source. Yields the servers, the flow runs, the registry after each run and the root."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work = tmp_path_factory.mktemp("ops")
    params = yaml.safe_load(MICRO.read_text())
    params["collect"]["sources"].append({"name": "notes", "path": "corpus", "license": "test"})
    params["pretrain"].update(init="champion", continued={"max_steps": 6, "lr": 0.001, "warmup_steps": 1})
    corpus = {"corpus/a.txt": "\n\n".join(f"Paragraph {i}: the lamp was lit early and the street was quiet again." for i in range(6))}
    root, _ = make_project(work / "project", params, corpus)
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
               "--params", "params.yaml", "--root", str(root)]
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
                runs, registry = [], []
                for i in range(3):
                    if i == 2:
                        (root / "corpus" / "b.txt").write_text(
                            "A new document: the river rose in the night and the bridge held.\n\n"
                            "By morning the water had gone down, and the baker opened his shop as on any other day.\n")
                    runs.append(finish(client, run_deployment(DEPLOYMENT, timeout=0), serve, log))
                    registry.append(versions(mlflow.url))
                scheduled = client.read_flow_runs(limit=20)
                task_runs = {i: client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
                             for i, r in enumerate(runs)}
            yield {"prefect": prefect, "mlflow": mlflow, "flow_run": runs[0], "flow_runs": runs, "deployment": deployment,
                   "runs": scheduled, "root": root, "registry": registry, "task_runs": task_runs}


def stage_runs(served, i: int) -> dict:
    """The MLflow runs of the i-th triggered flow run, by stage."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(served["mlflow"].url, registry_uri=served["mlflow"].url)  # not a process-wide registry URI
    exp = client.get_experiment_by_name("lmcore-micro")
    runs = client.search_runs([exp.experiment_id], f"tags.`lmcore.prefect_flow_run_id` = '{served['flow_runs'][i].id}'")
    return {r.data.tags["lmcore.stage"]: r for r in runs}


def test_deployment_has_the_cron_schedule_and_parameters(served):
    deployment = served["deployment"]
    assert [s.schedule.cron for s in deployment.schedules] == [CRON]
    assert deployment.parameters["params_file"] == str(served["root"] / "params.yaml")
    assert deployment.parameters["root"] == str(served["root"])
    assert deployment.parameters["wait_s"] == 3600  # a run due beside a manual one waits for it
    # one run at a time: runs of one deployment share their output folders
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    # the server's scheduler put the next nightly runs on the calendar, at 03:17 UTC
    upcoming = [r for r in served["runs"] if r.deployment_id == deployment.id and r.state.is_scheduled()
                and r.id not in {f.id for f in served["flow_runs"]}]
    assert upcoming, "the scheduler created no scheduled runs"
    assert all((r.expected_start_time.hour, r.expected_start_time.minute) == (3, 17) for r in upcoming)


def request(method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, dict[str, str]]:
    """(status, headers with lower-case names) of one plain HTTP request, as a web page's script would send it."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method=method), timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}


def test_the_server_takes_changes_only_with_a_csrf_token_and_answers_only_its_own_origin(served):
    """What a web page in a browser on this machine could do to the server `make serve` starts: post without
    Prefect's CSRF token (refused), read the API cross-origin (no CORS grant), while Prefect's own client, which
    fetches the token, works: it served the deployment and ran it three times (the fixture), and creates a flow here."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = served["prefect"].api_url
    own, other = api.removesuffix("/api"), "http://attacker.example"
    post = {"Content-Type": "application/json", "Origin": other}
    status, _ = request("POST", f"{api}/flows/", post, json.dumps({"name": "from-a-web-page"}).encode())
    assert status == 403
    status, _ = request("POST", f"{api}/deployments/{served['deployment'].id}/create_flow_run", post, b"{}")
    assert status == 403
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        assert client.read_flow(client.create_flow_from_name("with-prefects-client")).name == "with-prefects-client"
        assert not [f for f in client.read_flows() if f.name == "from-a-web-page"]
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, headers = request("OPTIONS", f"{api}/flows/", {**preflight, "Origin": other})
    assert status == 400 and "access-control-allow-origin" not in headers
    status, headers = request("OPTIONS", f"{api}/flows/", {**preflight, "Origin": own})
    assert status == 200 and headers["access-control-allow-origin"] == own
    # nor may another origin's script read a CSRF token (the browser withholds a response without the grant)
    status, headers = request("GET", f"{api}/csrf-token?client=web-page", {"Origin": other})
    assert "access-control-allow-origin" not in headers


def test_triggered_run_is_tracked_under_its_flow_run_id(served):
    from mlflow.tracking import MlflowClient

    from lmcore.pipeline import NAMES as STAGES

    run_id = str(served["flow_run"].id)
    client = MlflowClient(served["mlflow"].url, registry_uri=served["mlflow"].url)  # not a process-wide registry URI
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
    # the first version scored became champion; the third run's v2 took it or became challenger
    assert aliases in ({"champion": "1", "challenger": "2"}, {"champion": "2"})
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


def test_a_second_run_with_nothing_changed_runs_nothing_and_registers_nothing(served):
    from lmcore.pipeline import NAMES as STAGES

    first, second = served["registry"][:2]
    assert second == first and first["lmcore-base"] == ["1"]
    runs = stage_runs(served, 1)
    assert list(runs) == ["lifecycle"]  # no stage run: only the lifecycle's own
    tags = runs["lifecycle"].data.tags
    assert tags["lmcore.stages_run"] == "none" and tags["lmcore.stages_skipped"] == ",".join(STAGES)
    made = stage_runs(served, 0)
    assert tags["lmcore.decision.pretrain"] == f"unchanged since run {made['pretrain'].info.run_id}"
    # in Prefect: a task run per stage, each Skipped
    assert sorted(t.state.name for t in served["task_runs"][1]) == ["Skipped"] * len(STAGES)


def test_a_new_document_runs_the_affected_stages_and_continues_the_champion(served):
    from mlflow.tracking import MlflowClient

    runs = stage_runs(served, 2)
    ran = runs["lifecycle"].data.tags["lmcore.stages_run"].split(",")
    assert ran[:2] == ["collect", "preprocess"] and "base_model" not in ran and "pretrain" in ran
    assert sorted(runs) == sorted([*ran, "lifecycle"])
    assert runs["lifecycle"].data.tags["lmcore.decision.collect"] == "changed: deps corpus modified"
    # pretraining continued the champion (v1), on the new shards, with the continued schedule
    client = MlflowClient(served["mlflow"].url, registry_uri=served["mlflow"].url)  # not a process-wide registry URI
    v1 = client.get_model_version("lmcore-base", "1")
    pretrain = runs["pretrain"]
    assert pretrain.data.tags["lmcore.continued_weights_sha256"] == v1.tags["lmcore.weights_sha256"]
    assert pretrain.data.metrics["start_step"] == 12 and pretrain.data.metrics["steps"] == 6
    assert served["registry"][2]["lmcore-base"] == ["1", "2"]
    # the gate decided on v2 against the champion, and said so
    assert runs["benchmark"].data.tags["promotion.alias"] in ("champion", "challenger")
    assert runs["benchmark"].data.tags["promotion.reason"]
