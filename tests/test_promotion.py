"""Eval-gated promotion on a real MLflow SQLite registry: champion moves only past the combined standard error."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from tasks.registry import promote
from tasks.tracking import Tracking


def registry(tmp_path, n: int) -> tuple[Tracking, MlflowClient, list[str]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(uri=uri, experiment="promotion")
    client = tracking.client()
    client.create_registered_model("m")
    versions = [str(client.create_model_version("m", source=str(tmp_path / f"v{i}")).version) for i in range(n)]
    return tracking, client, versions


def test_champion_moves_only_beyond_the_combined_stderr(tmp_path):
    tracking, client, (v1, v2, v3) = registry(tmp_path, 3)
    first = promote(tracking, "m", v1, "hellaswag.acc_norm", 0.30, 0.03)
    assert first["alias"] == "champion" and first["reason"] == "no champion yet"

    # +0.04 with stderrs 0.03 and 0.03: combined 0.0424 -> not enough
    close = promote(tracking, "m", v2, "hellaswag.acc_norm", 0.34, 0.03)
    assert close["alias"] == "challenger"
    assert math.isclose(close["combined_stderr"], math.hypot(0.03, 0.03)) and math.isclose(close["difference"], 0.04)
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1
    assert str(client.get_model_version_by_alias("m", "challenger").version) == v2

    clear = promote(tracking, "m", v3, "hellaswag.acc_norm", 0.40, 0.02)
    assert clear["alias"] == "champion" and clear["champion_version"] == v1
    assert str(client.get_model_version_by_alias("m", "champion").version) == v3
    tags = client.get_model_version("m", v3).tags
    assert tags["promotion.alias"] == "champion" and float(tags["bench.hellaswag.acc_norm"]) == 0.40
