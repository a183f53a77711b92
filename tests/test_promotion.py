"""Eval-gated promotion: the decision alone (lmcore.promotion, no MLflow), then on a real MLflow SQLite registry:
champion moves only past the combined standard error, and only between versions scored on the same items."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from lmcore.promotion import Champion, Score, decide
from tasks.registry import promote, tag_scores
from tasks.tracking import Tracking

METRIC = "hellaswag.acc_norm"


def test_decision_rules_without_a_registry():
    mine = Score(0.34, 0.03, "s1")
    assert decide(METRIC, "2", mine, None)["reason"] == "no champion yet"
    assert decide(METRIC, "2", mine, Champion("2", mine))["alias"] == "champion"
    unscored = decide(METRIC, "2", mine, Champion("1", None))
    assert unscored["alias"] == "champion" and unscored["reason"] == f"champion v1 has no {METRIC} score"
    elsewhere = decide(METRIC, "2", Score(0.9, 0.01, "s2"), Champion("1", Score(0.25, 0.01, "s1")))
    assert elsewhere["alias"] == "challenger" and "scored on other items" in elsewhere["reason"]

    close = decide(METRIC, "2", mine, Champion("1", Score(0.30, 0.03, "s1")))  # +0.04 < sqrt(0.03^2 + 0.03^2)
    assert close["alias"] == "challenger" and close["reason"] == "does not beat v1 by more than the combined stderr"
    assert close["difference"] == pytest.approx(0.04) and close["combined_stderr"] == pytest.approx(math.hypot(0.03, 0.03))
    clear = decide(METRIC, "3", Score(0.40, 0.02, "s1"), Champion("1", Score(0.30, 0.03, "s1")))
    assert clear["alias"] == "champion" and clear["champion_version"] == "1" and clear["champion_value"] == 0.30
    # exactly the combined stderr is not enough: it must be beaten
    edge = decide(METRIC, "2", Score(0.35, 0.03, "s1"), Champion("1", Score(0.30, 0.04, "s1")))
    assert edge["combined_stderr"] == pytest.approx(0.05) and edge["alias"] == "challenger"


def registry(tmp_path, n: int) -> tuple[Tracking, MlflowClient, list[str]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(uri=uri, experiment="promotion")
    client = tracking.client()
    client.create_registered_model("m")
    versions = [str(client.create_model_version("m", source=str(tmp_path / f"v{i}")).version) for i in range(n)]
    return tracking, client, versions


def scored(tracking, version, value, stderr, sample="s1"):
    tag_scores(tracking, "m", version, {METRIC: value, f"{METRIC}_stderr": stderr, "mmlu.acc": 0.25}, sample)
    return promote(tracking, "m", version, METRIC)


def test_champion_moves_only_beyond_the_combined_stderr(tmp_path):
    tracking, client, (v1, v2, v3) = registry(tmp_path, 3)
    first = scored(tracking, v1, 0.30, 0.03)
    assert first["alias"] == "champion" and first["reason"] == "no champion yet"

    # +0.04 with stderrs 0.03 and 0.03: combined 0.0424 -> not enough
    close = scored(tracking, v2, 0.34, 0.03)
    assert close["alias"] == "challenger"
    assert math.isclose(close["combined_stderr"], math.hypot(0.03, 0.03)) and math.isclose(close["difference"], 0.04)
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1
    assert str(client.get_model_version_by_alias("m", "challenger").version) == v2

    clear = scored(tracking, v3, 0.40, 0.02)
    assert clear["alias"] == "champion" and clear["champion_version"] == v1
    assert str(client.get_model_version_by_alias("m", "champion").version) == v3
    tags = client.get_model_version("m", v3).tags
    assert tags["promotion.alias"] == "champion" and float(tags[f"bench.{METRIC}"]) == 0.40
    assert tags["bench.sample_sha256"] == "s1" and float(tags["bench.mmlu.acc"]) == 0.25
    # scoring the champion again changes nothing
    assert scored(tracking, v3, 0.40, 0.02)["reason"] == "already the champion"


def test_scores_on_other_items_are_not_compared(tmp_path):
    tracking, client, (v1, v2) = registry(tmp_path, 2)
    scored(tracking, v1, 0.25, 0.01, sample="s1")
    other = scored(tracking, v2, 0.90, 0.01, sample="s2")  # far better, but on another sample
    assert other["alias"] == "challenger" and "scored on other items" in other["reason"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1


def test_registry_lock_serialises_promotions_across_processes(tmp_path, prefect_harness):
    """Two processes that hold the lock of one registered model for 1.5 s each run one after the other."""
    import json
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    script = (
        "import json, sys, time\n"
        "from tasks.registry import registry_lock\n"
        "with registry_lock(sys.argv[1]):\n"
        "    start = time.time(); time.sleep(1.5); end = time.time()\n"
        "print(json.dumps([start, end]))\n"
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    procs = [subprocess.Popen([sys.executable, "-c", script, name], env=env, stdout=subprocess.PIPE, text=True)
             for name in ("lmcore-base", "lmcore-base")]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        spans.append(json.loads(out.strip().splitlines()[-1]))
    (a0, a1), (b0, b1) = spans
    assert a1 <= b0 or b1 <= a0  # one after the other
