"""One Prefect task per stage, all made alike from the stage declarations (lmcore.pipeline).

A stage's task opens its MLflow run (nested under the lifecycle run when there is one; tagged with lineage),
logs the stage's params, calls the stage's library function (`lmcore.stages.<name>.run`) with a tracker for
per-step metrics, and then records what the function returned (`StageResult`): metrics, artifacts and tags on
the run, Prefect table artifacts, and what the declaration asks of the model registry: register the model folder
(`registers`), tag the versions it scored, put the scores through the promotion gate (`promotes`).

Failures: the run ends FAILED with the error and its traceback (tasks.tracking); the traceback also goes to
logs/<stage>.log. Prefect retries only transient failures (tasks.retries); bad input fails at once.

    result = TASKS["preprocess"](run_context)   # inside a flow: flows/stage.py, flows/lifecycle.py
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from lmcore.config import Params
from lmcore.errors import is_input_error, is_transient
from lmcore.io import read_json, sha256_file
from lmcore.paths import REGISTERED, WEIGHTS
from lmcore.pipeline import STAGES, UNCHANGED, Stage
from lmcore.stages import Scores, StageContext, StageResult
from tasks import cards, failures
from tasks.context import RunContext, logger, reviewed
from tasks.gate import gate
from tasks.incremental import STAGE_SUMMARY
from tasks.registry import download_model_dir, find_version, log_and_register
from tasks.retries import RETRY_DELAY_S, retry_transient
from tasks.tags import TAG_PARAMS_SHA, TAG_REGISTRY_DEPS, TAG_WEIGHTS_SHA, tag
from tasks.tracking import MlflowTracker


def section(params: Params, stage: Stage) -> dict[str, Any]:
    """The params a stage's run logs: the top-level keys it declares (`Stage.params`), the ones dvc.yaml tracks for it
    and the change check names (train_tokenizer: seed, train_tokenizer, tokenize and benchmark)."""
    data = params.to_dict()
    return {key: data[key] for key in stage.params}


def stage_context(rc: RunContext, stage: Stage, tracker, downloads: Path | None = None,
                  resolved: dict[str, str] | None = None) -> StageContext:
    """The library's view of the run, made from the stage's declaration (its deps, outs and registry deps): root,
    params, tracker, a Dask map for a section with `runner: dask`, and the registry's models (`resolve_model`,
    downloaded under `downloads`; each URI resolved is recorded in `resolved` as "name vN")."""
    cfg = getattr(rc.params, stage.name, None)
    mapper = None
    if getattr(cfg, "runner", None) == "dask":
        from tasks.dask import dask_map

        mapper = dask_map(cfg.dask_address, cfg.workers, f"{stage.name}-item")

    def resolve(uri: str) -> Path:
        folder = resolve_registered(uri, rc.tracking.uri, downloads)
        if resolved is not None and (folder / REGISTERED).is_file():
            record = read_json(folder / REGISTERED)
            resolved[uri] = f"{record['name']} v{record['version']}"
        return folder

    return stage.context(rc.root, rc.params, tracker=tracker, map=mapper, resolve_model=resolve)


def resolve_registered(uri: str, tracking_uri: str, downloads: Path | None = None) -> Path:
    """The lmcore model folder of a registered model (`models:/name@alias`, `models:/name/3`), downloaded under
    `downloads` (which the caller removes; None: a temporary folder of MLflow's)."""
    dst = None if downloads is None else Path(tempfile.mkdtemp(prefix="model-", dir=downloads))
    return download_model_dir(uri, tracking_uri, dst)


def execute(stage: Stage, rc: RunContext) -> dict[str, Any]:
    """Run `stage` under `rc` with its MLflow run; returns its summary (plus run_id, and the registry's part)."""
    with stage_log(rc.layout.log_file(stage.name), stage.name), \
            rc.tracking.run(stage.name, tags={tag(k): v for k, v in stage.tags.items()}) as run, \
            tempfile.TemporaryDirectory(prefix="lmcore-registry-") as downloads:
        run.log_params(section(rc.params, stage))
        resolved: dict[str, str] = {}
        result: StageResult = stage.function()(stage_context(rc, stage, run, Path(downloads), resolved))
        run.set_tags({tag(k): v for k, v in result.tags.items()})
        if stage.registry_deps(rc.params):  # what the change check compares with the registry next time
            run.set_tags({TAG_REGISTRY_DEPS: json.dumps(resolved, sort_keys=True)})
        if result.metrics:
            run.log_metrics(result.metrics)
        for artifact in result.artifacts:
            run.log_artifact(artifact.path, artifact.dest)
        if result.item_tables:
            with reviewed(stage.name, "item tables"):
                for table in (t for t in result.item_tables if t.rows):
                    run.log_table(table.path, table.rows)
        if result.log:
            logger().info("%s: %s", stage.name, result.log)
        for line in result.warnings:
            logger().warning("%s: %s", stage.name, line)
        summary = dict(result.summary)
        if stage.registers is not None:
            summary.update(register(rc, stage, result, run))
        for scored in result.scored:
            tag_scored_version(rc, getattr(rc.params.tracking, scored.model), scored.weights, scored.tags)
        if stage.promotes is not None and result.scores is not None:
            summary.update(gates(rc, stage, result, run))
        for table in result.tables:
            create_table_artifact(table.rows, key=table.key, description=table.description)
        # what a later run that finds this stage unchanged reports for it (tasks.incremental.made_by)
        run.client.log_text(run.run_id, json.dumps(summary, indent=2, default=str), STAGE_SUMMARY)
    return {**summary, "run_id": run.run_id}


def register(rc: RunContext, stage: Stage, result: StageResult, run: MlflowTracker) -> dict[str, Any]:
    """Log the stage's model folder as a pyfunc in its run and register it; the version carries the run's lineage
    tags, the weights and params sha256, and the stage's version tags."""
    spec = stage.registers
    name = getattr(rc.params.tracking, spec.name)
    model_dir = rc.root / spec.model
    weights = sha256_file(model_dir / WEIGHTS)
    run.set_tags({TAG_WEIGHTS_SHA: weights})
    tags = {
        TAG_WEIGHTS_SHA: weights,
        TAG_PARAMS_SHA: rc.params.fingerprint(),
        **{tag(k): v for k, v in {**stage.tags, **result.tags}.items()},
        **result.version_tags,
    }
    version = log_and_register(rc.tracking, run.run_id, model_dir, name, kind=spec.kind,
                               aliases=spec.aliases, tags=tags)
    with reviewed(stage.name, "model card"):
        cards.describe_model(rc.tracking, spec.name, name)
        if cards.log_facts(run, model_dir):
            cards.refresh(rc.tracking, name, version)
    logger().info("%s: registered %s v%s%s", stage.name, name, version, "".join(f" @{a}" for a in spec.aliases))
    return {"registered_model": name, "model_version": version, "weights_sha256": weights}


def gates(rc: RunContext, stage: Stage, result: StageResult, run: MlflowTracker) -> dict[str, Any]:
    """Every Scores of the stage through its family's promotion gate (tasks.gate), in order. One: its
    model_version and promotion; several: promotions, {label: decision}, and model_versions, {label: version}."""
    if isinstance(result.scores, Scores):
        return gate(rc, stage, result.scores, run)
    done = {s.label: gate(rc, stage, s, run, several=True) for s in result.scores}
    return {"promotions": {k: v["promotion"] for k, v in done.items()}, "model_versions": {k: v["model_version"] for k, v in done.items()}}


def tag_scored_version(rc: RunContext, name: str, weights: Path, tags: dict[str, str]) -> str | None:
    """Tags on the registered version of `name` whose weights are the file `weights` (when there is one)."""
    version = find_version(rc.tracking, name, sha256_file(weights))
    if version is not None:
        client = rc.tracking.client()
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        cards.refresh(rc.tracking, name, version)
    return version


@contextlib.contextmanager
def stage_log(path: Path, stage: str) -> Iterator[None]:
    """Everything logged while the stage runs, and the traceback of its failure, appended to logs/<stage>.log.
    An expected failure (bad input, transient) is remembered so that the terminal shows it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        handler.stream.write(f"--- {stage}: started {dt.datetime.now().isoformat(timespec='seconds')} ---\n")
        yield
    except BaseException as err:
        handler.stream.write("".join(traceback.format_exception(err)))
        if is_input_error(err) or is_transient(err):
            failures.RECORDED[str(err)] = failures.Failure(path, is_input_error(err))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


@dataclass(frozen=True)
class Unchanged:
    """A stage the flow does not run: its outputs are dvc.lock's, made by MLflow run `run_id` (None: no run in
    this store made them), whose summary is `summary`."""

    run_id: str | None
    summary: dict[str, Any]

    @property
    def message(self) -> str:
        return f"unchanged since MLflow run {self.run_id}" if self.run_id else "unchanged (dvc.lock); no MLflow run here made its outputs"


def stage_task(stage: Stage):
    """The Prefect task that runs `stage` (`execute`), retrying transient failures `stage.retries` times; given
    `unchanged`, it runs nothing and ends in the state Skipped, carrying the summary of the run that made the
    outputs (call it with return_state=True)."""

    def run_stage(rc: RunContext, unchanged: Unchanged | None = None) -> dict[str, Any] | State:
        if unchanged is not None:
            logger().info("%s: %s: skipped", stage.name, unchanged.message)
            data = {**unchanged.summary, "run_id": unchanged.run_id, UNCHANGED: True}
            return Completed(data=data, name="Skipped", message=unchanged.message)
        return execute(stage, rc)

    run_stage.__name__ = run_stage.__qualname__ = f"run_{stage.name}"
    run_stage.__doc__ = f"The {stage.name} stage: {stage.doc}."
    return task(
        run_stage, name=stage.name, retries=stage.retries, retry_delay_seconds=RETRY_DELAY_S,
        retry_condition_fn=retry_transient, cache_policy=NO_CACHE,
    )


TASKS = {stage.name: stage_task(stage) for stage in STAGES}
