"""What a stage function gets and what it returns: the contract between a stage's library code and whoever runs it.

A stage function is `run(ctx: StageContext) -> StageResult`, one per module here (`lmcore.stages.<stage>`):
it reads its inputs and writes its outputs under `ctx.root` at the paths its declaration in
`lmcore.pipeline` names, calls the library functions that do the work, and returns what it made. It never
logs to MLflow, registers a model or talks to Prefect: the orchestration layer (`tasks.runner`) does that for
every stage alike, from the `StageResult` and the declaration. Tests call a stage function directly.

    from lmcore.stages import StageContext
    from lmcore.stages.preprocess import run
    result = run(StageContext(root=Path("."), params=load_params("params.yaml")))
    result.summary["documents"]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcore.config import CollectConfig, Params, Source
from lmcore.io import sha256_file
from lmcore.paths import MANIFEST, Layout
from lmcore.promotion import Adaptation
from lmcore.tracking import NullTracker, Tracker

# Lineage keys of StageResult.tags; the orchestration layer records each as the run tag "lmcore.<key>", and on
# the version a stage registers.
RAW_MANIFEST_SHA = "raw_manifest_sha256"  # sha256 of data/raw/manifest.json: the collected corpus
TOKENS_MANIFEST_SHA = "tokens_manifest_sha256"  # sha256 of data/tokens/manifest.json
WEIGHTS_SHA = "weights_sha256"  # sha256 of the model.safetensors the stage made (or scored)
BASE_WEIGHTS_SHA = "base_weights_sha256"  # the weights a fine-tune started from
FINETUNE = "finetune"  # classifier | instruct | dpo
FINETUNE_MANIFEST_SHA = "finetune_manifest_sha256"  # the data a fine-tune collected
BASE_MANIFEST_SHA = "base_manifest_sha256"  # sha256 of models/base_model/base.json: the model a run started from
CONTINUED_WEIGHTS_SHA = "continued_weights_sha256"  # the registered champion a pretrain run continued (its weights)
# Artifact folders of the manifests a model-making stage logs with its run (`manifest_tags`).
RAW_MANIFEST_DIR = "data/raw"
TOKENS_MANIFEST_DIR = "data/tokens"
BASE_MANIFEST_DIR = "models/base_model"  # base.json of the pretrained base a pretrain run continued
FINETUNE_MANIFEST_DIR = "data/finetune/raw"  # a fine-tune's own collected data

# (fn, items) -> [fn(item) for item in items], run somewhere: the stage's own process pool when None.
MapFn = Callable[[Callable[[Any], Any], list], list]


@dataclass
class StageContext:
    """Where a stage runs and with what.

    root: the project root; every input and output path is relative to it (`layout`).
    params: the validated params (the stage reads its own section, `seed`, and what it shares).
    tracker: receives per-step metrics while the stage runs (MLflow under the orchestration layer).
    map: how independent work items run (e.g. a Prefect task per shard on Dask); None: the stage's default.
    resolve_model: a registered model's URI (`models:/name@alias`, `models:/name/3`) -> its lmcore model folder,
        downloaded; supplied by the orchestration layer (the library never talks to the registry). None: none.
    """

    root: Path
    params: Params
    tracker: Tracker = field(default_factory=NullTracker)
    map: MapFn | None = None
    resolve_model: Callable[[str], Path] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

    @property
    def seed(self) -> int:
        return self.params.seed

    def collect_config(self, sources: list[Source]) -> CollectConfig:
        """A collect config for a stage's own data (fine-tuning, benchmark files), with the collect section's
        download retries and timeout."""
        return CollectConfig(sources=sources, retries=self.params.collect.retries, timeout_s=self.params.collect.timeout_s)


@dataclass(frozen=True)
class Artifact:
    """A file or folder to keep with the stage's run, under `dest` (None: the run's artifact root)."""

    path: Path
    dest: str | None = None


@dataclass(frozen=True)
class VersionTags:
    """Tags for the registered version of `model` (a `tracking` params key, e.g. "registered_model") whose
    weights are the file `weights`: scores of a model the stage evaluated rather than made."""

    model: str
    weights: Path
    tags: dict[str, str]


@dataclass(frozen=True)
class Scores:
    """Benchmark scores of the model whose weights are `weights`, to promote on (`Stage.promotes`).

    values: tag suffix -> score ("hellaswag.acc_norm", "hellaswag.acc_norm_stderr", ...);
    metric: the one the promotion compares; sample_sha256: which items were scored.
    note: why `metric` has no value in `values` (not meaningful for the model: lmcore.harness.run.coverage);
        the promotion then compares nothing. None when it has one.
    results_dir: the folder of the per-item results (lmcore.harness.run: results.json and samples/), to compare
        with the champion's item by item; results_artifact: where the stage's run keeps that folder's files.
    label: which of the stage's models this is ("sft", "dpo"), when the stage scores several.
    settings: how the scores were made, where it differs from lm-evaluation-harness's own settings (a lower
        max_gen_toks) or qualifies them: tagged on the version (bench_settings.<key>) and shown in its card.
    adaptation: what continued pretraining bought (held-out bits per byte before and after), and `started_from`
        the sha256 of the weights it started from: the gate decides on both numbers when those weights are the
        champion's (lmcore.promotion.decide).
    """

    weights: Path
    values: dict[str, float]
    metric: str
    sample_sha256: str
    note: str | None = None
    results_dir: Path | None = None
    results_artifact: str | None = None
    label: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    adaptation: Adaptation | None = None
    started_from: str | None = None


@dataclass(frozen=True)
class Table:
    """A table for people (a Prefect table artifact): `key` (lowercase letters, digits, dashes), rows of dicts."""

    key: str
    rows: list[dict]
    description: str


@dataclass(frozen=True)
class ItemTable:
    """Per-item results for people to filter and sort in the MLflow UI: an MLflow table artifact (`log_table`) at
    `path` in the run's artifacts ("tables/<name>.json"). rows: flat dicts with the same keys, of strings, numbers,
    bools or lists of them (one row per benchmark item, test response, prediction, sample)."""

    path: str
    rows: list[dict]


@dataclass
class StageResult:
    """What a stage made.

    summary: small and JSON-able; what `lmcore run` prints and the lifecycle summary reads (the orchestration
        layer adds run_id, and model_version / weights_sha256 for a stage that registers a model).
    metrics: logged once to the stage's run (per-step metrics went to `ctx.tracker` while it ran).
    artifacts: files and folders to keep with the run.
    tags: run tags by key (recorded as "lmcore.<key>"; see the lineage keys above); a registered version gets
        them too.
    version_tags: extra tags for the version the stage registers, by full tag name (eval scores, labels, ...).
    scored: tags for versions the stage scored but did not make.
    scores: benchmark scores for the promotion gate: one Scores, or a list of them for a stage that scores several
        versions of its family (gated in order).
    tables: tables for people (Prefect); item_tables: per-item results as MLflow tables.
    log: one line for the log when the stage finishes; warnings: lines worth a warning.
    """

    summary: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    version_tags: dict[str, str] = field(default_factory=dict)
    scored: list[VersionTags] = field(default_factory=list)
    scores: Scores | list[Scores] | None = None
    tables: list[Table] = field(default_factory=list)
    item_tables: list[ItemTable] = field(default_factory=list)
    log: str = ""
    warnings: list[str] = field(default_factory=list)


def manifest_tags(manifests: dict[str, tuple[Path, str]]) -> tuple[dict[str, str], list[Artifact]]:
    """{lineage key: (data folder, artifact folder)} -> ({key: sha256 of the folder's manifest.json}, those
    manifests as artifacts): a model version leads to its data from its own run. Folders without one are left out."""
    tags, artifacts = {}, []
    for key, (folder, dest) in manifests.items():
        if (folder / MANIFEST).is_file():
            tags[key] = sha256_file(folder / MANIFEST)
            artifacts.append(Artifact(folder / MANIFEST, dest))
    return tags, artifacts


def numeric(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers (bools count as 0/1), as metrics."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, str)}


def base_dir(ctx: StageContext) -> Path | None:
    """The base model folder (models/base_model) when the run starts from a pretrained base; None from scratch."""
    if ctx.params.base_model.source == "scratch":
        return None
    return ctx.layout.base_source
