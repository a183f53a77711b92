"""Logging the trained model to MLflow and registering it, with links back to its data."""

from __future__ import annotations

import importlib.metadata
import math
import warnings
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import lmcore
from tasks.tracking import TAG_TOKENS_MANIFEST_SHA, TAG_WEIGHTS_SHA, Tracking

LMCORE_SRC = Path(lmcore.__file__).parent
MODEL_ARTIFACT = "model"

GENERATOR_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),  # a list of prompts
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", 50),
            ParamSpec("temperature", "double", 0.8),
            ParamSpec("top_k", "long", 40),
            ParamSpec("seed", "long", 0),
        ]
    ),
)
CLASSIFIER_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),  # a list of texts
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]),
)
# kind -> (pyfunc code file, signature)
KINDS = {
    "generator": (Path(__file__).with_name("pyfunc_model.py"), GENERATOR_SIGNATURE),
    "classifier": (Path(__file__).with_name("pyfunc_classifier.py"), CLASSIFIER_SIGNATURE),
}


def _requirements() -> list[str]:
    pins = []
    for dist in ("torch", "tiktoken", "safetensors", "numpy", "pyarrow", "pydantic", "pyyaml", "tqdm", "scikit-learn", "pandas"):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def log_and_register(
    tracking: Tracking,
    run_id: str,
    model_dir: Path,
    name: str,
    *,
    ranks_file: str | None,
    tags: dict[str, str],
    kind: str = "generator",
    aliases: tuple[str, ...] = (),
) -> str:
    """Log `model_dir` as a pyfunc in run `run_id`, register it as `name`, return the version.

    kind: "generator" (text in, text out; instruction models apply their template) or "classifier".
    aliases: set on the new version (moved from any older version that had them).
    """
    code, signature = KINDS[kind]
    mlflow.set_tracking_uri(tracking.uri)
    mlflow.set_registry_uri(tracking.uri)
    artifacts = {"model_dir": str(model_dir)}
    if ranks_file:
        artifacts["tokenizer"] = str(ranks_file)
    # The active run is thread-local; resuming the run by id in this thread is safe under Prefect.
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # MLflow nags for type hints and an input example; the explicit signature covers both.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.pyfunc.*")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(code),
            artifacts=artifacts,
            code_paths=[str(LMCORE_SRC)],
            signature=signature,
            pip_requirements=_requirements(),
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    client = tracking.client()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return version


def find_version(tracking: Tracking, name: str, weights_sha256: str) -> str | None:
    """The newest registered version of `name` whose weights have this sha256, if any."""
    client = tracking.client()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    matches = [v for v in versions if v.tags.get(TAG_WEIGHTS_SHA) == weights_sha256]
    if not matches:
        return None
    return str(max(int(v.version) for v in matches))


__all__ = ["log_and_register", "find_version", "TAG_WEIGHTS_SHA", "TAG_TOKENS_MANIFEST_SHA"]


CHAMPION = "champion"
CHALLENGER = "challenger"


def promote(tracking: Tracking, name: str, version: str, metric: str, value: float, stderr: float) -> dict:
    """Eval-gated promotion: `champion` moves to `version` only when it beats the current champion on `metric`
    by more than the combined standard error, sqrt(se_new^2 + se_champion^2); otherwise `version` becomes
    `challenger`. The first version ever scored becomes champion. Each scored version carries the tags
    `bench.<metric>` and `bench.<metric>_stderr`, so later comparisons need no re-evaluation.

    Returns: the decision and its numbers (also set as tags `promotion.*` on the version).
    """
    client = tracking.client()
    client.set_model_version_tag(name, version, f"bench.{metric}", repr(float(value)))
    client.set_model_version_tag(name, version, f"bench.{metric}_stderr", repr(float(stderr)))
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        champion = None
    decision = {"metric": metric, "value": float(value), "stderr": float(stderr), "version": str(version)}
    if champion is None:
        decision.update(alias=CHAMPION, reason="no champion yet")
    elif str(champion.version) == str(version):
        decision.update(alias=CHAMPION, reason="already the champion", champion_version=str(version))
    else:
        tags = champion.tags
        if f"bench.{metric}" not in tags:
            decision.update(alias=CHAMPION, reason=f"champion v{champion.version} has no {metric} score", champion_version=str(champion.version))
        else:
            best, best_se = float(tags[f"bench.{metric}"]), float(tags.get(f"bench.{metric}_stderr", "0"))
            margin = math.sqrt(float(stderr) ** 2 + best_se**2)
            beats = float(value) - best > margin
            decision.update(
                alias=CHAMPION if beats else CHALLENGER,
                reason=("beats" if beats else "does not beat") + f" v{champion.version} by more than the combined stderr",
                champion_version=str(champion.version),
                champion_value=best,
                champion_stderr=best_se,
                difference=float(value) - best,
                combined_stderr=margin,
            )
    client.set_registered_model_alias(name, decision["alias"], version)
    for key in ("alias", "reason"):
        client.set_model_version_tag(name, version, f"promotion.{key}", str(decision[key]))
    return decision
