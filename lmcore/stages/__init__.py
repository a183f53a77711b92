"""What a stage function gets and what it returns: the contract between a stage's library code and whoever runs it.

A stage function is `run(ctx: StageContext) -> StageResult`, one per module here (`lmcore.stages.<stage>`):
it is handed its inputs and outputs as its declaration in `lmcore.pipeline` names them (`ctx.inputs[TOKENS]`,
`ctx.outputs[model_path("base")]`: what is declared is what is passed, kedro's node shape), the registered models it
may read (`ctx.resolve_model`, for the URIs its declaration's `registry` gives), calls the library functions that do
the work, and returns what it made. It never
logs to MLflow, registers a model or talks to Prefect: the orchestration layer (`tasks.runner`) does that for
every stage alike, from the `StageResult` and the declaration. Tests call a stage function directly.

    from lmcore import pipeline
    from lmcore.stages.preprocess import run
    result = run(pipeline.get("preprocess").context(Path("."), load_params("params.yaml")))
    result.summary["documents"]

A context built by hand (`StageContext(root, params)`, as unit tests do) resolves any path under the root: nothing
is checked. One built from the declaration (`Stage.context`, what the orchestration layer runs) refuses a path or a
registered model the stage did not declare, naming the stage and what it asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from lmcore.config import CollectConfig, Params, Source
from lmcore.errors import InputError
from lmcore.io import sha256_file
from lmcore.paths import BASE_SOURCE, MANIFEST, Layout
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
START_WEIGHTS_SHA = "start_weights_sha256"  # the weights a pretrain run started from (the base's or the champion's)
# Artifact folders of the manifests a model-making stage logs with its run (`manifest_tags`).
RAW_MANIFEST_DIR = "data/raw"
TOKENS_MANIFEST_DIR = "data/tokens"
BASE_MANIFEST_DIR = "models/base_model"  # base.json of the pretrained base a pretrain run continued
FINETUNE_MANIFEST_DIR = "data/finetune/raw"  # a fine-tune's own collected data

# Typed summaries: each stage module defines `Summary`, the TypedDict of its StageResult.summary. The summary rows
# and parent metrics of its declaration (lmcore.pipeline) read those keys, and the ones the orchestration layer adds
# (`Registered`, `Promoted`, `PromotedSeveral`); tests/test_pipeline.py runs every row on a sample of the types, so a
# misspelled key fails there, and tests/flows/test_stage_reads.py checks the keys each stage really returns.


class Registered(TypedDict):
    """What the orchestration layer adds to the summary of a stage that registers its model (`Stage.registers`)."""

    registered_model: str
    model_version: str
    weights_sha256: str


class Decision(TypedDict):
    """The promotion gate's decision on a version (lmcore.promotion.decide; more keys as the gate had them)."""

    version: str
    alias: str
    reason: str


class Promoted(TypedDict):
    """What the orchestration layer adds for a stage whose Scores go through the gate (`Stage.promotes`), one version."""

    model_version: str | None
    promotion: Decision | None


class PromotedSeveral(TypedDict):
    """... and for a stage that scores several versions of its family, by label."""

    model_versions: dict[str, str | None]
    promotions: dict[str, Decision | None]


class Counts(TypedDict):
    """Decontamination of one benchmark: items checked, found in training data, clean."""

    items: int
    contaminated: int
    clean: int


class ProbeSummary(TypedDict, total=False):
    """The benchmark probe's part of a training stage's summary, when it ran (lmcore.harness.probe)."""

    eval_benchmarks_items: int
    eval_benchmarks_too_long: int
    eval_benchmarks_time_s: float


# (fn, items) -> [fn(item) for item in items], run somewhere: the stage's own process pool when None.
MapFn = Callable[[Callable[[Any], Any], list], list]


class UndeclaredError(InputError):
    """A stage asked for a path or a registered model that its declaration (lmcore.pipeline) does not name."""


class Declared(Mapping[str, Path]):
    """A stage's declared paths (its deps, or its outs), as lmcore.pipeline names them relative to the root ->
    the absolute path. `declared` None: any path under the root (a context built by hand, not from a declaration)."""

    def __init__(self, root: Path, declared: tuple[str, ...] | None, stage: str, what: str):
        self.root, self.declared, self.stage, self.what = root, declared, stage, what

    def __getitem__(self, path: str) -> Path:
        if self.declared is not None and path not in self.declared:
            raise UndeclaredError(f"{self.stage}: {path} is not among its declared {self.what} "
                                  f"({', '.join(self.declared) or 'none'}); declare it in lmcore/pipeline.py")
        return self.root / path

    def __iter__(self) -> Iterator[str]:
        return iter(self.declared or ())

    def __len__(self) -> int:
        return len(self.declared or ())


@dataclass
class StageContext:
    """Where a stage runs and with what.

    root: the project root; every input and output path is relative to it.
    params: the validated params (the stage reads its own section, `seed`, and what it shares).
    tracker: receives per-step metrics while the stage runs (MLflow under the orchestration layer).
    map: how independent work items run (e.g. a Prefect task per shard on Dask); None: the stage's default.
    resolve_model: a registered model's URI (`models:/name@alias`, `models:/name/3`) -> its lmcore model folder,
        downloaded; supplied by the orchestration layer (the library never talks to the registry). None: none.
    stage, deps, outs, registry: the declaration the context was made from (`lmcore.pipeline.Stage.context`): its
        name, the paths it reads and writes, and the registered models it may resolve. None: not checked.
    """

    root: Path
    params: Params
    tracker: Tracker = field(default_factory=NullTracker)
    map: MapFn | None = None
    resolve_model: Callable[[str], Path] | None = None
    stage: str = "stage"
    deps: tuple[str, ...] | None = None
    outs: tuple[str, ...] | None = None
    registry: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if self.resolve_model is not None and self.registry is not None:
            self.resolve_model = self._checked(self.resolve_model)

    def _checked(self, resolve: Callable[[str], Path]) -> Callable[[str], Path]:
        def resolve_declared(uri: str) -> Path:
            if uri not in self.registry:
                raise UndeclaredError(f"{self.stage}: {uri} is not among its declared registry deps "
                                      f"({', '.join(self.registry) or 'none'}); declare it in lmcore/pipeline.py")
            return resolve(uri)

        return resolve_declared

    @property
    def inputs(self) -> Declared:
        """Its declared deps: `ctx.inputs[TOKENS]` is <root>/data/tokens."""
        return Declared(self.root, self.deps, self.stage, "deps")

    @property
    def outputs(self) -> Declared:
        """Its declared outs, each replaced whole by the stage."""
        return Declared(self.root, self.outs, self.stage, "outs")

    @property
    def layout(self) -> Layout:
        """The project's fixed places that belong to no stage's outs: training checkpoints, caches, logs."""
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
    """The base model folder (models/base_model, a declared dep) when the run starts from a pretrained base; None
    from scratch."""
    if ctx.params.base_model.source == "scratch":
        return None
    return ctx.inputs[BASE_SOURCE]
