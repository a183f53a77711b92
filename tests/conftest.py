"""Shared test setup: offline mirror and tokenizer from ../shared, private Prefect/MLflow/DVC state."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MICRO = ROOT / "profiles" / "micro.yaml"

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


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("LMCORE_TIKTOKEN_FILE") or not os.environ.get("LMCORE_MIRROR"):
        raise pytest.UsageError(
            "tests run offline: they need ../shared/data and ../shared/tokenizers/gpt2.tiktoken beside the "
            "checkout, or LMCORE_MIRROR and LMCORE_TIKTOKEN_FILE set"
        )


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (per-test harnesses are slow)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def one_thread():
    """Micro models run faster on one thread, and steadily when other processes share the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
