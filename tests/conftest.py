"""Shared test setup: offline mirror and tokenizer from ../shared, private Prefect/MLflow/DVC state, and the
grouping that lets pytest-xdist spread the suite over the cores (`make test` runs `pytest -n auto`).

Under xdist each worker is one process on one core. A test whose fixture is shared beyond one test (a module
fixture, or the session's micro lifecycle run) is put in an `xdist_group` with every other test of that fixture, so
the fixture is built once, on one worker; the groups go out longest first (tests/durations.json)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MICRO = ROOT / "profiles" / "micro.yaml"
SCRATCH = ROOT / "profiles" / "scratch.yaml"  # the book's chapter-5 path: the from-scratch profile params.yaml was before issue 26

# Under pytest-xdist every worker has a core of its own: torch in it, and in the processes its tests start, runs on one
# thread. Two workers each spinning two threads on two cores run several times slower than one thread each.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

# Set before anything imports prefect or mlflow: both read settings at import time.
_STATE = Path(tempfile.mkdtemp(prefix="lmcore-tests-"))
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["DVC_SITE_CACHE_DIR"] = str(_STATE / "dvc-site")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
if (SHARED / "data").is_dir():
    os.environ.setdefault("LMCORE_MIRROR", str(SHARED / "data"))
if (SHARED / "tokenizers" / "gpt2.tiktoken").is_file():
    os.environ.setdefault("LMCORE_TIKTOKEN_FILE", str(SHARED / "tokenizers" / "gpt2.tiktoken"))


# Session fixtures too expensive to build on every worker: their tests form one xdist group each.
SHARED_SESSION_FIXTURES = {"lifecycle_run", "pipeline_project"}


def xdist_group(item: pytest.Item) -> str | None:
    """The group a test runs in under `--dist loadgroup`: the expensive session fixture it uses, else its module
    when it uses a module- or class-scoped fixture (built once per worker that runs a test of it), else none."""
    fixtures = item._fixtureinfo.name2fixturedefs
    shared = sorted(SHARED_SESSION_FIXTURES & set(fixtures))
    if shared:
        return shared[0]
    if any(defs[-1].scope in ("module", "class") for defs in fixtures.values()):
        return item.nodeid.split("::")[0]
    return None


def pytest_itemcollected(item):
    group = xdist_group(item) if WORKER else None
    if group:  # marked as each test is collected: xdist reads the marks in its own pytest_collection_modifyitems
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("LMCORE_TIKTOKEN_FILE") or not os.environ.get("LMCORE_MIRROR"):
        raise pytest.UsageError(
            "tests run offline: they need ../shared/data and ../shared/tokenizers/gpt2.tiktoken beside the "
            "checkout, or LMCORE_MIRROR and LMCORE_TIKTOKEN_FILE set"
        )
    if not WORKER:
        return
    from tests.durations import DEFAULT_S, load

    seconds, groups = load(), {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")  # set in pytest_itemcollected
        group = mark.args[0] if mark else None
        groups.setdefault(group or item.nodeid, []).append((item, item.nodeid.removesuffix(f"@{group}")))
    # Longest group first (xdist keeps this order with --no-loadscope-reorder); a group's tests stay in file order.
    cost = {g: sum(seconds.get(nodeid, DEFAULT_S) for _, nodeid in members) for g, members in groups.items()}
    items[:] = [item for g in sorted(groups, key=lambda g: -cost[g]) for item, _ in groups[g]]


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (per-test harnesses are slow)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory, prefect_harness):
    """A micro DVC project with a folder source, run by two `lmcore pipeline` started together (whole pipelines
    take minutes: the DVC comparisons of tests/test_dvc.py and tests/test_incremental_dvc.py share this one)."""
    from tests.projects import run_pipeline_project

    return run_pipeline_project(tmp_path_factory.mktemp("pipeline-project"))


@pytest.fixture(autouse=True)
def _no_process_wide_mlflow_uris():
    """Registering a model sets MLflow's process-wide tracking and registry URIs, and with them the environment
    variables MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI (tasks/registry.py): put back after each test, so that no
    test reads another's store (xdist runs them in another order than one process does). MLflow also keeps each
    run's artifact repository by run id, process-wide: a test working on a copy of a store (the same run ids)
    would write the original's artifacts (a refreshed MODEL_CARD.md) through it; emptied too."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {name: os.environ.get(name) for name in names}
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._artifact_repos_cache.clear()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _logging_left_enabled():
    """`logging.disable` is process-wide: a test that leaves it on (a benchmark's main run in-process) silences
    every later test's caplog on that worker. Such a test fails here, naming itself, and logging is switched back on."""
    yield
    level = logging.root.manager.disable
    if level:
        logging.disable(logging.NOTSET)
        pytest.fail(f"the test left logging.disable({logging.getLevelName(level)}) on: later tests' caplog would see nothing")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n for the block, then put back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Micro models run faster on one thread, and steadily when other processes share the cores."""
    with torch_threads(1):
        yield
