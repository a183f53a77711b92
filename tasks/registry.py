"""The MLflow model registry: log and register a model folder, find a version by its weights, tag scores, and
move `champion` through the promotion gate (the decision itself is lmcore.promotion's, a pure function)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import lmcore
from lmcore.errors import NotRegisteredError
from lmcore.io import write_json
from lmcore.paths import REGISTERED
from lmcore.promotion import CHAMPION, Adaptation, Champion, Score, decide
from lmcore.tokenizer import has_tokenizer, load_tokenizer
from tasks.tags import (
    BENCH_PREFIX,
    PARENT_RUN,
    PROMOTION_PREFIX,
    TAG_BENCH_RESULTS,
    TAG_BENCH_SAMPLE,
    TAG_TOKENIZER,
    TAG_TOKENIZER_SHA,
    TAG_WEIGHTS_SHA,
)
from tasks.tracking import Tracking

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
    for dist in ("torch", "tiktoken", "tokenizers", "jinja2", "safetensors", "numpy", "pyarrow", "pydantic", "pyyaml", "tqdm", "scikit-learn", "pandas"):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def tokenizer_tags(model_dir: Path) -> dict[str, str]:
    """The version tags naming the tokenizer `model_dir` carries ({} when it carries none)."""
    if not has_tokenizer(model_dir):
        return {}
    tok = load_tokenizer(model_dir)
    return {TAG_TOKENIZER: tok.name, TAG_TOKENIZER_SHA: tok.sha256}


def log_and_register(
    tracking: Tracking,
    run_id: str,
    model_dir: Path,
    name: str,
    *,
    tags: dict[str, str],
    kind: str = "generator",
    aliases: tuple[str, ...] = (),
) -> str:
    """Log `model_dir` as a pyfunc in run `run_id`, register it as `name`, return the version.

    kind: "generator" (text in, text out; instruction models apply their template) or "classifier".
    tags: set on the new version, besides `tokenizer_tags` of the folder.
    aliases: set on the new version (moved from any older version that had them).
    """
    code, signature = KINDS[kind]
    mlflow.set_tracking_uri(tracking.uri)
    mlflow.set_registry_uri(tracking.uri)
    artifacts = {"model_dir": str(model_dir)}
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
    for key, value in {**tokenizer_tags(model_dir), **tags}.items():
        client.set_model_version_tag(name, version, key, value)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return version


def download_model_dir(uri: str, tracking_uri: str, dst: Path | None = None) -> Path:
    """The lmcore model folder inside a logged model (`models:/name@alias`, `models:/name/3`, `runs:/...`), downloaded.
    `models:/name` alone is `models:/name@champion`.

    A registered model's folder gets `.registered.json` (lmcore.paths.REGISTERED): its name, version, run and
    aliases, for the lineage of what starts from it. An alias is resolved once, before the download, so the files
    are the version named even if the alias moves meanwhile.

    Raises: NotRegisteredError when the URI names no registered model, alias or version; ValueError when the
    logged model holds no lmcore model folder.
    """
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    version = registered_version(uri, tracking_uri)
    source = f"models:/{version.name}/{version.version}" if version is not None else uri
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=None if dst is None else str(dst)))
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"{uri}: {err.message}") from None
    # the pyfunc layout: <model>/artifacts/<model_dir name>/config.json
    found = next(local.glob("artifacts/*/config.json"), None)
    if found is None:
        raise ValueError(f"{uri}: no lmcore model folder inside the logged model")
    if version is not None:
        write_json(found.parent / REGISTERED, {"uri": uri, "name": version.name, "version": str(version.version),
                                               "run_id": version.run_id, "aliases": sorted(version.aliases)})
    return found.parent


def version_card(uri: str, tracking_uri: str) -> str | None:
    """The model card (description) of the version a `models:/` URI names; None when it has none."""
    version = registered_version(uri, tracking_uri)
    return (version.description or None) if version is not None else None


def registered_version(uri: str, tracking_uri: str):
    """The ModelVersion a `models:/name@alias`, `models:/name/<version>` or `models:/name` URI names (None for
    other URIs). A bare name is its `@champion`: the version a user serves."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))?", uri)
    if match is None:
        return None
    name, alias, number = match.groups()
    alias = alias or (None if number else CHAMPION)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in err.message:
            raise NotRegisteredError(f"{uri}: {err.message}") from None
        raise


def find_version(tracking: Tracking, name: str, weights_sha256: str) -> str | None:
    """The registered version of `name` whose weights have this sha256: the one registered under the same
    lifecycle run (`tracking.parent_run_id`) when there is one, else the newest. Two runs with the same params
    and seed make identical weights; each must still score and promote its own version."""
    client = tracking.client()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    matches = sorted((v for v in versions if v.tags.get(TAG_WEIGHTS_SHA) == weights_sha256), key=lambda v: -int(v.version))
    if not matches:
        return None
    if tracking.parent_run_id and len(matches) > 1:
        for v in matches:
            if v.run_id and client.get_run(v.run_id).data.tags.get(PARENT_RUN) == tracking.parent_run_id:
                return str(v.version)
    return str(matches[0].version)


def champion_version(tracking: Tracking, name: str):
    """The ModelVersion with alias `champion`, or None."""
    try:
        return tracking.client().get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def tag_scores(tracking: Tracking, name: str, version: str, scores: dict[str, float], sample_sha256: str) -> None:
    """Record benchmark scores on a model version (bench.<metric> tags) and the sample they were computed on. Scores
    of an earlier sample that this one has not (a task not meaningful on it, or not run) are removed: they would
    read as scores on this sample."""
    client = tracking.client()
    for key in client.get_model_version(name, version).tags:
        if key.startswith(BENCH_PREFIX) and key not in (TAG_BENCH_SAMPLE, TAG_BENCH_RESULTS) and key[len(BENCH_PREFIX):] not in scores:
            client.delete_model_version_tag(name, version, key)
    for key, value in scores.items():
        client.set_model_version_tag(name, version, f"{BENCH_PREFIX}{key}", repr(float(value)))
    client.set_model_version_tag(name, version, TAG_BENCH_SAMPLE, sample_sha256)


@contextlib.contextmanager
def registry_lock(name: str, timeout_s: float = 900) -> Iterator[None]:
    """Hold the lock on registered model `name` for a read-modify-write of its aliases (score the champion,
    compare, move `champion`), so that two pipelines finishing at once cannot both crown their version.

    The lock is a Prefect global concurrency limit of 1 slot, `lmcore-registry-<name>`, created on first use:
    it holds across processes and machines that share a Prefect server (or, without one, the local
    ephemeral server's database). MLflow itself has no transactions across calls.
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    limit = "lmcore-registry-" + re.sub(r"[^a-z0-9-]+", "-", name.lower())
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):  # another process made it first
            client.upsert_global_concurrency_limit_by_name(limit, 1)
    with concurrency(limit, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield


def _score(tags: dict[str, str], metric: str) -> Score | None:
    """A version's score on `metric` from its bench.* tags, with its tokenizer (`tokenizer_tags`; None for a
    version registered before they were recorded); None when it has no score."""
    if f"{BENCH_PREFIX}{metric}" not in tags:
        return None
    return Score(float(tags[f"{BENCH_PREFIX}{metric}"]), float(tags.get(f"{BENCH_PREFIX}{metric}_stderr", "0")), tags.get(TAG_BENCH_SAMPLE),
                 tokenizer_sha256=tags.get(TAG_TOKENIZER_SHA), tokenizer=tags.get(TAG_TOKENIZER))


def promote(tracking: Tracking, name: str, version: str, metric: str, *, note: str | None = None,
            paired: tuple[float, float] | None = None, adaptation: Adaptation | None = None) -> dict:
    """Eval-gated promotion of `version` of `name` on `metric` (lmcore.promotion.decide): `champion` moves to it
    only when it beats the current champion by more than the combined standard error, otherwise it becomes
    `challenger` (so also when `metric` is a per-token loss and the two versions carry different tokenizers). Both versions carry their scores as tags (`tag_scores`); hold `registry_lock(name)` around it.

    note: `metric` is not meaningful for `version` (why; lmcore.harness.run.coverage): it is not compared.
    paired: (mean per-item difference, its standard error) against the champion on the same items: decided on
        that standard error (lmcore.promotion.decide).
    adaptation: held-out bits per byte before (the champion's) and after continued pretraining from the champion:
        decided on both (lmcore.promotion.decide).

    Returns: the decision and its numbers (its alias and reason also set as tags `promotion.*` on `version`).
    """
    client = tracking.client()
    score = None if note is not None else _score(client.get_model_version(name, version).tags, metric)
    if score is None and note is None:
        raise ValueError(f"{name} v{version} has no {metric} score to promote on; tag_scores first")
    current = champion_version(tracking, name)
    champion = None if current is None else Champion(str(current.version), _score(current.tags, metric))
    decision = decide(metric, version, score, champion, note=note, paired=paired, adaptation=adaptation)
    client.set_registered_model_alias(name, decision["alias"], version)
    for key in ("alias", "reason"):
        client.set_model_version_tag(name, version, f"{PROMOTION_PREFIX}{key}", str(decision[key]))
    return decision
