"""The lifecycle's stages, each declared once.

A declaration names the stage's params, the library function it runs (`lmcore.stages.<name>.run`), the folders
it reads and writes under the project root, its DVC metrics and plots, what it registers or promotes and under
which name, and how it shows in the lifecycle summary. Everything else follows from it:

- the lifecycle flow runs `STAGES` in this order (flows/lifecycle.py), one Prefect task each (tasks/runner.py);
- `lmcore run <stage>` accepts exactly these names;
- `dvc.yaml` is written from it (`lmcore dvc-yaml`; a test fails when the committed file differs), each stage's
  code deps being the lmcore modules its function imports (`code_deps`), computed, never listed by hand;
- the lifecycle summary and the parent run's metrics and tags (`summary_rows`, `parent_metrics`, `parent_tags`);
- the DVC hashes each stage run is tagged with (tasks/dvc_hashes.py).

Adding a stage: docs/architecture.md, "Adding a stage".
"""

from __future__ import annotations

import ast
import glob
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from lmcore.config import BaseModelConfig, Params, Source
from lmcore.stages import StageContext
from lmcore.paths import (
    BASE_SOURCE,
    BENCHMARK_DATA,
    CLEAN,
    GENERATIVE_DATA,
    MANIFEST,
    RAW,
    TOK_EVAL,
    TOKENIZER,
    TOKENS,
    WEIGHTS,
    finetune_data_path,
    model_path,
    reports_path,
)

PACKAGE = Path(__file__).resolve().parent  # lmcore/
CODE_ROOT = PACKAGE.parent  # where lmcore/ (and a checkout's dvc.yaml) live


@dataclass(frozen=True)
class Registers:
    """The stage's output model folder `model` is logged and registered as the model that `tracking.<name>`
    names, as an MLflow pyfunc of `kind` (generator: text in, text out; classifier: label and probability),
    with `aliases` moved to the new version."""

    model: str
    name: str
    kind: str = "generator"
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Promotes:
    """The stage's `Scores` decide whether the scored version of `tracking.<name>` takes `champion`
    (lmcore.promotion). A champion scored on other items is first scored on the same ones by `rescore`,
    "module:function" with (ctx, model_dir, out_dir, model_ref) -> Scores.

    paired: compare item by item (the standard error of the per-item differences) rather than by the combined
        standard error of the two scores.
    from_base: which pretrained base (base_model.source other than scratch) can serve this family, and so is
        registered and scored as its first champion: "any" base, a "chat" base (its tokenizer has a chat
        template: an instruct model), or None (no base can: a classifier needs its head).
    """

    name: str
    rescore: str
    paired: bool = False
    from_base: Literal["any", "chat"] | None = None


@dataclass(frozen=True)
class Curve:
    """A DVC plot drawn from CSV columns: x, and y as {csv file: column}."""

    name: str
    x: str
    y: dict[str, str]
    template: str = "linear"


@dataclass(frozen=True)
class Row:
    """A row of the lifecycle summary, read from the stage's summary dict."""

    label: str
    value: Callable[[dict], Any]


@dataclass(frozen=True)
class Stage:
    """One stage of the lifecycle.

    name: the stage's name: its params section, its `lmcore run` name, its dvc.yaml stage, its MLflow run name.
    doc: one line on what it does.
    deps: data it reads, relative to the root (each inside an earlier stage's outs).
    outs: folders it writes, each replaced whole.
    metrics: JSON files inside outs that DVC shows as metrics; plots: images and CSV curves inside outs.
    params: the params.yaml keys its outputs depend on.
    tags: run tags (lineage keys, "lmcore.<key>") known before it runs.
    registry: the registered models it reads, given the params (`models:/name@alias` URIs: a champion it continues,
        a model it serves): the only ones its context resolves, and what the change check compares with the versions
        the run that made its outputs read (tasks.incremental).
    registers, promotes: what it does to the model registry.
    retries: extra attempts on a transient failure (network); bad input is never retried.
    summary: rows of the lifecycle summary; parent_metrics, parent_tags: what it adds to the lifecycle's run.
    """

    name: str
    doc: str
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str | Curve, ...] = ()
    params: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    registry: Callable[[Params], tuple[str, ...]] | None = None
    registers: Registers | None = None
    promotes: Promotes | None = None
    retries: int = 0
    summary: tuple[Row, ...] = ()
    parent_metrics: Callable[[dict], dict[str, float]] | None = None
    parent_tags: Callable[[dict], dict[str, str]] | None = None

    @property
    def module(self) -> str:
        """The module whose `run(ctx) -> StageResult` is the stage's function."""
        return f"lmcore.stages.{self.name}"

    def function(self) -> Callable:
        return importlib.import_module(self.module).run

    def registry_deps(self, params: Params) -> tuple[str, ...]:
        """The registered models the stage reads under `params`."""
        return self.registry(params) if self.registry is not None else ()

    def context(self, root: Path, params: Params, **kwargs: Any) -> StageContext:
        """The context the stage's function runs in: handed its declared deps and outs (and nothing else), and the
        registered models it declares; kwargs: tracker, map, resolve_model."""
        return StageContext(root=root, params=params, stage=self.name, deps=(*self.deps, *self.local_deps(params, root)),
                            outs=self.outs, registry=self.registry_deps(params), **kwargs)

    def code_deps(self) -> list[str]:
        """The lmcore source files the stage's function imports, directly or not (see `import_closure`)."""
        return import_closure(self.module)

    def local_paths(self, params: Params | None) -> list[tuple[str, str]]:
        """(params key, path) of every local file or folder the stage reads because its params name it: a source's
        `path`, a base model's file or folder, a model folder it serves."""
        section = getattr(params, self.name, None) if params is not None else None
        if section is None:
            return []
        found = [(f"{self.name}.sources[{i}].path (source {src.name!r})", src.path)
                 for i, src in enumerate(getattr(section, "sources", [])) if isinstance(src, Source) and src.path is not None]
        source = getattr(section, "source", None)
        if isinstance(source, Source) and source.path is not None:
            found.append((f"{self.name}.source.path (source {source.name!r})", source.path))
        if isinstance(section, BaseModelConfig) and section.source in ("gguf", "folder") and section.path:
            found.append((f"{self.name}.path", section.path))
        serve = getattr(section, "serve", None)  # a model folder the stage serves (judge.serve), not a registered one
        if isinstance(serve, str) and not serve.startswith("models:/"):
            found.append((f"{self.name}.serve", serve))
        return found

    def _outside(self, params: Params | None, root: Path) -> list[tuple[str, str, str]]:
        """(params key, path, DVC dep) of the `local_paths` that no stage makes: a path inside a stage's outs
        (`judge.serve: models/base_model`) is that stage's output, there by the time this stage runs."""
        found = [(key, path, _dep_path(path, Path(root))) for key, path in self.local_paths(params)]
        return [(key, path, dep) for key, path, dep in found if maker(dep) is None]

    def local_deps(self, params: Params | None, root: Path) -> list[str]:
        """`local_paths` that no stage makes, as DVC deps, so that a new document in a source folder re-runs the
        stage: relative to `root` when inside it, a glob's fixed leading folder for a glob."""
        return list(dict.fromkeys(dep for _, _, dep in self._outside(params, root)))

    def missing_local_paths(self, params: Params | None, root: Path) -> list[str]:
        """One line for each of `local_paths` that no stage makes and is not there (for a glob: its fixed leading
        folder), naming the params key: what the CLI checks before it starts the machinery."""
        missing = []
        for key, path, dep in self._outside(params, root):
            if not (Path(dep) if Path(dep).is_absolute() else Path(root) / dep).exists():
                missing.append(f"{key}: {path} does not exist" + (f" (under {Path(root).resolve()})" if not Path(path).expanduser().is_absolute() else ""))
        return missing


def _dep_path(path: str, root: Path) -> str:
    """A params path as dvc.yaml names it: relative to root when inside it; up to the first glob part for a glob."""
    parts = Path(path).expanduser().parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    where = Path(*parts[:fixed]) if fixed else Path(".")
    full = where if where.is_absolute() else Path(root).resolve() / where
    try:
        return full.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return full.resolve().as_posix()


# -- how stages read in the lifecycle summary ----------------------------------------------------------------


def _registered(s: dict, alias: str | None = None) -> str:
    return f"{s['registered_model']} v{s['model_version']}" + (f" (@{alias})" if alias else "")


def _arrow(a: float, b: float) -> str:
    return f"{a:.4f} → {b:.4f}"


def _promotion(s: dict) -> str:
    decision = s.get("promotion")
    if decision is None:
        return "none (the scored model is not registered)"
    return f"v{decision['version']} -> @{decision['alias']}: {decision['reason']}"


def _instruct_scores(s: dict) -> str:
    """"ifeval.prompt_level_loose_acc: sft 0.2400 ± 0.0610, dpo 0.2600 ± 0.0627 (50 items)"."""
    shown = ", ".join(f"{label} {v['value']:.4f} ± {v['stderr'] or 0:.4f}" for label, v in s["scores"].items() if v["value"] is not None)
    return f"{s['primary_metric']}: {shown} ({next(iter(s['n_items'].values()), 0):,} items)"


def _promotions(s: dict) -> str:
    decisions = s.get("promotions") or {}
    return "; ".join(f"{label} " + (_promotion({"promotion": d}) if d else "not registered") for label, d in decisions.items()) or "none"


def _base(s: dict) -> str:
    if s["source"] == "scratch":
        return "scratch (random weights)"
    return f"{s['name']} ({s['source']}, {s['parameters']:,} parameters)"


def _bytes_per_token(s: dict) -> str:
    """"3.29 bytes/token held out (gpt2 3.32)"."""
    report = s["report"]
    mine, others = report[s["tokenizer"]], {n: r for n, r in report.items() if n != s["tokenizer"]}
    what = "held-out" if "held-out" in mine else next(iter(mine))
    theirs = ", ".join(f"{n} {r[what]['bytes_per_token']:.2f}" for n, r in others.items() if what in r)
    return f"{mine[what]['bytes_per_token']:.2f} bytes/token {what}" + (f" ({theirs})" if theirs else "")


def _judge(s: dict) -> str:
    if s["skipped"]:
        return f"skipped: {s['reason']}"
    scores = s["mean_scores"].items()
    return ", ".join(f"{name} {score:.1f}" if score is not None else f"{name}: no score" for name, score in scores)


STAGES: tuple[Stage, ...] = (
    Stage(
        "collect",
        "every source into data/raw, pinned by sha256 (offline mirror first), with its manifest",
        outs=(RAW,),
        params=("collect",),
        retries=2,
        summary=(Row("sources collected", lambda s: s["sources"]), Row("raw bytes", lambda s: f"{s['bytes']:,}")),
        parent_tags=lambda s: {"raw_manifest_sha256": s["raw_manifest_sha256"]},
    ),
    Stage(
        "preprocess",
        "clean, filter and deduplicate into data/clean/documents.jsonl, with removal counts per rule",
        deps=(RAW,),
        outs=(CLEAN,),
        plots=(f"{CLEAN}/filters.png",),
        params=("preprocess",),
        summary=(Row("documents", lambda s: f"{s['documents']:,}"),),
    ),
    Stage(
        "train_tokenizer",
        "a byte-level BPE trained on the corpus's train split into models/tokenizer; bytes per token against GPT-2's",
        deps=(CLEAN,),
        outs=(TOKENIZER, reports_path("tokenizer")),
        metrics=(f"{reports_path('tokenizer')}/{TOK_EVAL}",),
        # tokenize: its val split is held out from training; benchmark: the texts of the report (whole sections:
        # DVC refuses a dotted key that params.yaml leaves to its default)
        params=("seed", "train_tokenizer", "tokenize", "benchmark"),
        summary=(Row("tokenizer", lambda s: f"{s['tokenizer']} ({s['n_vocab']:,} tokens): "
                                            + _bytes_per_token(s)),),
        parent_tags=lambda s: {"trained_tokenizer_sha256": s["tokenizer_sha256"]},
    ),
    Stage(
        "base_model",
        "the model a run starts from (scratch, Hugging Face, GGUF, a folder, the registry) into models/base_model",
        outs=(BASE_SOURCE,),
        params=("base_model",),
        registry=lambda p: (p.base_model.uri,) if p.base_model.source == "registry" else (),
        retries=2,
        summary=(Row("base model", _base),),
        parent_tags=lambda s: {"base_manifest_sha256": s["base_manifest_sha256"]},
    ),
    Stage(
        "tokenize",
        "documents into train/val Arrow token shards and their manifest",
        deps=(CLEAN, BASE_SOURCE, TOKENIZER),
        outs=(TOKENS,),
        params=("seed", "tokenize"),
        summary=(Row("train tokens", lambda s: f"{s['train_tokens']:,}"), Row("val tokens", lambda s: f"{s['val_tokens']:,}")),
        parent_tags=lambda s: {"tokens_manifest_sha256": s["tokens_manifest_sha256"]},
    ),
    Stage(
        "pretrain",
        "a decoder on the token shards, from random weights or continuing the base model; registered as tracking.registered_model",
        deps=(TOKENS, BASE_SOURCE, f"{RAW}/{MANIFEST}"),  # the raw manifest: its lineage tag and the card's corpus
        outs=(model_path("base"), reports_path("pretrain")),
        plots=(
            Curve("loss", "step", {f"{reports_path('pretrain')}/train_loss.csv": "train_loss",
                                   f"{reports_path('pretrain')}/val_loss.csv": "val_loss"}),
            f"{reports_path('pretrain')}/loss.png",
        ),
        params=("seed", "pretrain"),
        registry=lambda p: (f"models:/{p.tracking.registered_model}@champion",) if p.pretrain.init == "champion" else (),
        registers=Registers(model_path("base"), "registered_model"),
        summary=(
            Row("parameters", lambda s: f"{s['n_params']:,}"),
            Row("started from", lambda s: s.get("continued_from") and f"{s['continued_from']} (@champion)" or s.get("init", "scratch")),
            Row("steps", lambda s: s["steps"]),
            Row("val loss (first → final)", lambda s: _arrow(s["first_val_loss"], s["final_val_loss"])),
            Row("val bits per byte (first → final)", lambda s: _arrow(s["first_val_bpb"], s["final_val_bpb"])
                if None not in (s.get("first_val_bpb"), s.get("final_val_bpb")) else "none (no tokenizer recorded)"),
            Row("tokens/s", lambda s: f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "none (no update)"),
            Row("registered model", _registered),
        ),
        parent_metrics=lambda s: {"first_val_loss": s["first_val_loss"], "final_val_loss": s["final_val_loss"],
                                  **{k: s[k] for k in ("first_val_bpb", "final_val_bpb") if s.get(k) is not None}},
        parent_tags=lambda s: {"weights_sha256": s["weights_sha256"], "registered_model": s["registered_model"],
                               "model_version": str(s["model_version"])},
    ),
    Stage(
        "evaluate",
        "validation loss and perplexity of models/base, and seeded samples; tags the registered version",
        deps=(model_path("base"), TOKENS),
        outs=(reports_path("evaluate"),),
        metrics=(f"{reports_path('evaluate')}/metrics.json",),
        params=("seed", "evaluate"),
        summary=(
            Row("evaluation val loss", lambda s: f"{s['val_loss']:.4f}"),
            Row("perplexity", lambda s: f"{s['perplexity']:.2f}"),
            Row("evaluation val bits per byte", lambda s: f"{s['val_bpb']:.4f}" if s.get("val_bpb") is not None else "none (no tokenizer)"),
        ),
        parent_metrics=lambda s: {"val_loss": s["val_loss"], "perplexity": s["perplexity"],
                                  **({"val_bpb": s["val_bpb"]} if s.get("val_bpb") is not None else {})},
    ),
    Stage(
        "benchmark",
        "HellaSwag, MMLU, TruthfulQA, ARC scored as lm-evaluation-harness scores them, decontaminated; eval-gated champion",
        deps=(model_path("base"), CLEAN, BASE_SOURCE),
        outs=(BENCHMARK_DATA, reports_path("benchmark")),
        metrics=(f"{reports_path('benchmark')}/metrics.json", f"{reports_path('benchmark')}/decontamination.json"),
        plots=(f"{reports_path('benchmark')}/scores.png",),
        params=("benchmark",),
        promotes=Promotes("registered_model", rescore="lmcore.stages.benchmark:rescore", from_base="any"),
        retries=2,
        summary=(
            Row("benchmark", lambda s: f"{s['primary_metric']} " + (s.get("primary_note") or f"{s['primary_value']:.4f} ± {s['primary_stderr'] or 0:.4f}")
                                       + f" ({s['n_items']:,} items)"),
            Row("promotion", _promotion),
        ),
        parent_metrics=lambda s: {} if s["primary_value"] is None else {f"benchmark.{s['primary_metric']}": s["primary_value"]},
    ),
    Stage(
        "finetune_classifier",
        "a classification head on models/base (book ch. 6); registered as tracking.classifier_model",
        deps=(model_path("base"),),
        outs=(finetune_data_path("classifier"), model_path("classifier"), reports_path("classifier")),
        metrics=(f"{reports_path('classifier')}/metrics.json",),
        plots=(
            Curve("classifier_loss", "step", {f"{reports_path('classifier')}/train_loss.csv": "train_loss",
                                              f"{reports_path('classifier')}/val_loss.csv": "val_loss"}),
            Curve("classifier_confusion", "actual", {f"{reports_path('classifier')}/test_predictions.csv": "predicted"},
                  template="confusion"),
            f"{reports_path('classifier')}/loss.png",
            f"{reports_path('classifier')}/confusion_matrix.png",
        ),
        params=("seed", "finetune_classifier"),
        tags={"finetune": "classifier"},
        registers=Registers(model_path("classifier"), "classifier_model", kind="classifier"),
        promotes=Promotes("classifier_model", rescore="lmcore.stages.finetune_classifier:rescore", paired=True),
        retries=2,
        summary=(
            Row("classifier test accuracy (majority baseline)",
                lambda s: f"{s['test_accuracy']:.4f} ({s['majority_baseline_accuracy']:.4f})"),
            Row("classifier test F1", lambda s: f"{s['test_f1']:.4f}"),
            Row("registered classifier", _registered),
            Row("classifier promotion", _promotion),
        ),
        parent_metrics=lambda s: {"classifier_test_accuracy": s["test_accuracy"], "classifier_test_f1": s["test_f1"]},
    ),
    Stage(
        "finetune_instruct",
        "instruction following on models/base (book ch. 7); registered as tracking.instruct_model @sft",
        deps=(model_path("base"),),
        outs=(finetune_data_path("instruct"), model_path("instruct"), reports_path("instruct")),
        metrics=(f"{reports_path('instruct')}/metrics.json",),
        plots=(
            Curve("instruct_loss", "step", {f"{reports_path('instruct')}/train_loss.csv": "train_loss",
                                            f"{reports_path('instruct')}/val_loss.csv": "val_loss"}),
            f"{reports_path('instruct')}/loss.png",
        ),
        params=("seed", "finetune_instruct"),
        tags={"finetune": "instruct"},
        registers=Registers(model_path("instruct"), "instruct_model", aliases=("sft",)),
        retries=2,
        summary=(
            Row("instruct val loss (first → final)", lambda s: _arrow(s["first_val_loss"], s["final_val_loss"])),
            Row("instruct val bits per byte (final)", lambda s: f"{s['final_val_bpb']:.4f}" if s.get("final_val_bpb") is not None else "none"),
            Row("registered instruction model", lambda s: _registered(s, "sft")),
        ),
        parent_metrics=lambda s: {"instruct_final_val_loss": s["final_val_loss"],
                                  **({"instruct_final_val_bpb": s["final_val_bpb"]} if s.get("final_val_bpb") is not None else {})},
    ),
    Stage(
        "dpo",
        "direct preference optimisation of models/instruct; a new version of tracking.instruct_model @dpo",
        deps=(model_path("instruct"),),
        outs=(finetune_data_path("dpo"), model_path("dpo"), reports_path("dpo")),
        metrics=(f"{reports_path('dpo')}/metrics.json",),
        plots=(
            Curve("dpo_reward_margin", "step", {f"{reports_path('dpo')}/train_loss.csv": "train_reward_margin",
                                                f"{reports_path('dpo')}/val_loss.csv": "val_reward_margin"}),
            f"{reports_path('dpo')}/loss.png",
        ),
        params=("seed", "dpo"),
        tags={"finetune": "dpo"},
        registers=Registers(model_path("dpo"), "instruct_model", aliases=("dpo",)),
        retries=2,
        summary=(
            Row("DPO val reward margin (first → final)",
                lambda s: _arrow(s["first_val_reward_margin"], s["final_val_reward_margin"])),
            Row("registered DPO model", lambda s: _registered(s, "dpo")),
        ),
        parent_metrics=lambda s: {"dpo_final_val_reward_margin": s["final_val_reward_margin"]},
    ),
    Stage(
        "instruct_eval",
        "IFEval and GSM8K of models/instruct and models/dpo, generated in their chat template and scored as "
        "lm-evaluation-harness scores them, decontaminated; eval-gated champion of tracking.instruct_model",
        deps=(model_path("instruct"), model_path("dpo"), CLEAN, finetune_data_path("instruct"), finetune_data_path("dpo"), BASE_SOURCE),
        outs=(GENERATIVE_DATA, reports_path("instruct_eval")),
        metrics=(f"{reports_path('instruct_eval')}/metrics.json", f"{reports_path('instruct_eval')}/decontamination.json"),
        params=("instruct_eval",),
        promotes=Promotes("instruct_model", rescore="lmcore.stages.instruct_eval:rescore", from_base="chat"),
        retries=2,
        summary=(
            Row("instruct eval", _instruct_scores),
            Row("instruct promotion", _promotions),
        ),
        parent_metrics=lambda s: {f"instruct_eval.{label}.{s['primary_metric']}": v["value"]
                                  for label, v in s["scores"].items() if v["value"] is not None},
    ),
    Stage(
        "judge",
        "LLM-as-judge scores of the instruction models' test responses, by an endpoint or a model the stage serves (skipped without either)",
        # the weights: the registered versions it tags with their scores are found by their sha256
        deps=(f"{reports_path('instruct')}/test_responses.jsonl", f"{reports_path('dpo')}/test_responses.jsonl",
              f"{model_path('instruct')}/{WEIGHTS}", f"{model_path('dpo')}/{WEIGHTS}", BASE_SOURCE),
        outs=(reports_path("judge"),),
        metrics=(f"{reports_path('judge')}/summary.json",),
        params=("judge",),
        registry=lambda p: (p.judge.serve,) if p.judge.serve else (),
        retries=2,
        summary=(Row("LLM-as-judge", _judge),),
        parent_metrics=lambda s: {f"judge.{name}_mean_score": v for name, v in s.get("mean_scores", {}).items() if v is not None},
    ),
)

NAMES = tuple(s.name for s in STAGES)

# The look-ups below read STAGES when called, so that a test (or a tool) that declares other stages sees them.


def get(name: str) -> Stage:
    """The stage called `name`; KeyError naming the stages otherwise."""
    found = next((s for s in STAGES if s.name == name), None)
    if found is None:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")
    return found


def within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it (paths as the declarations write them)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def maker(path: str) -> tuple[Stage, str] | None:
    """The stage whose outs hold `path` (a folder or a file inside one) and that out, or None."""
    return next(((s, o) for s in STAGES for o in s.outs if within(path, o)), None)


def producer(path: str) -> str | None:
    """The name of the stage whose outs hold `path`, or None."""
    found = maker(path)
    return found[0].name if found else None


def missing_inputs(name: str, params: Params | None, root: Path) -> list[str]:
    """One line for each input of stage `name` that is not there: its declared deps under `root` (made by earlier
    stages) and the local paths its params name. What `lmcore run <stage>` checks before it starts anything."""
    stage, root = get(name), Path(root)
    lines = [f"{name}: {dep} does not exist under {root.resolve()}: the {producer(dep)} stage makes it "
             f"(lmcore run {producer(dep)}, or lmcore pipeline)" for dep in stage.deps if not (root / dep).exists()]
    return lines + [f"{name}: {line}" for line in stage.missing_local_paths(params, root)]


def downstream(name: str) -> list[str]:
    """`name` and every stage that reads what it writes, directly or through others, in stage order: what
    `dvc repro` re-runs after a change to `name` (when each output changes)."""
    changed = {name}
    dirty_outs = list(get(name).outs)
    for stage in STAGES:
        if stage.name not in changed and any(within(d, o) for d in stage.deps for o in dirty_outs):
            changed.add(stage.name)
            dirty_outs += stage.outs
    return [s.name for s in STAGES if s.name in changed]


# -- what the lifecycle run reports, from the stages' summaries ----------------------------------------------


UNCHANGED = "unchanged"  # in a stage's result: the stage did not run; the rest is the summary of the run that made its outputs


def summary_rows(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(label, value) rows of every stage in `results`, in stage order. A stage that did not run (UNCHANGED) shows
    the values of the run that made its outputs, marked "(unchanged)", or one row saying so when none is known."""
    rows = []
    for stage in (s for s in STAGES if s.name in results):
        result = results[stage.name]
        if not result.get(UNCHANGED):
            rows += [(row.label, str(row.value(result))) for row in stage.summary]
            continue
        try:
            rows += [(row.label, f"{row.value(result)} (unchanged)") for row in stage.summary]
        except (KeyError, TypeError):  # no summary of the run that made the outputs
            rows.append((stage.name, "unchanged (dvc.lock); no MLflow run in this store made its outputs"))
    return rows


def _from(results: dict[str, dict], what: str) -> dict:
    """What the stages' `what` (parent_metrics, parent_tags) make of their results; a stage that did not run and
    whose making run is unknown adds nothing."""
    out: dict = {}
    for stage in (s for s in STAGES if s.name in results and getattr(s, what)):
        try:
            out.update(getattr(stage, what)(results[stage.name]))
        except (KeyError, TypeError):
            if not results[stage.name].get(UNCHANGED):
                raise
    return out


def parent_metrics(results: dict[str, dict]) -> dict[str, float]:
    return _from(results, "parent_metrics")


def parent_tags(results: dict[str, dict]) -> dict[str, str]:
    """Lineage keys for the lifecycle's run (recorded as "lmcore.<key>")."""
    return _from(results, "parent_tags")


# -- code deps: the import closure of a stage's module inside lmcore/ ------------------------------------------


def _source(module: str) -> Path | None:
    """The file of an lmcore module (a package's __init__.py), or None when there is none."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = CODE_ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _parse(path: Path, attempts: int = 3) -> ast.Module:
    """ast.parse, tried again on CPython 3.11's spurious "AST constructor recursion depth mismatch" SystemError: the
    AST builder's recursion counter is shared by all threads, so a parse in another thread at the same time (a
    served deployment runs Prefect's threads beside the flow) can trip it (python/cpython#106905). The file is fine."""
    source = path.read_text(encoding="utf-8")
    for attempt in range(attempts):
        try:
            return ast.parse(source, filename=str(path))
        except SystemError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _imported(module: str, path: Path) -> set[str]:
    """Every module name an import statement in `path` may load (function-level and TYPE_CHECKING imports
    included: a conservative closure re-runs a stage too often, never too rarely)."""
    stat = path.stat()
    return _imported_as_of(module, path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=None)
def _imported_as_of(module: str, path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """`_imported` of the file as it was at (mtime_ns, size): the stages' closures share most files, and one run
    asks for all of them (dvc.yaml, then each stage's code deps); an edited file is parsed again."""
    tree = _parse(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return frozenset(names)


@lru_cache(maxsize=None)
def import_closure(module: str) -> list[str]:
    """The lmcore source files that importing `module` may execute: the module, every lmcore module it imports,
    recursively, and the __init__.py of every package on the way; as sorted paths relative to the code root
    ("lmcore/data/collect.py")."""
    files: set[Path] = set()
    todo = [module]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run their __init__
        path = _source(name)
        if path is None:
            continue
        files.add(path)
        todo.extend(m for m in _imported(name, path) if m.split(".")[0] == PACKAGE.name)
    return sorted(p.relative_to(CODE_ROOT).as_posix() for p in files)
