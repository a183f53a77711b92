"""A stage added the way docs/architecture.md says (a function returning a StageResult, and a declaration) runs as a
Prefect task with its own MLflow run, shows in dvc.yaml, in the lifecycle summary and in `lmcore lineage`: no
runner, flow, CLI, dvc.yaml or lineage code names it."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import types
from dataclasses import replace
from typing import TypedDict

import yaml
from mlflow.tracking import MlflowClient
from prefect import flow

from flows import dvc_yaml
from lmcore import pipeline
from lmcore.config import load_params
from lmcore.io import atomic_dir, write_json
from lmcore.pipeline import Row, Stage
from lmcore.stages import Artifact, StageContext, StageResult
from tasks.context import RunContext
from tasks.lineage import model_lineage
from tasks.runner import stage_task
from tasks.tags import TAG_DVC_DEP, TAG_DVC_OUT, TAG_RAW_MANIFEST_SHA, TAG_STAGE, TAG_TOKENS_MANIFEST_SHA, TAG_WEIGHTS_SHA
from tasks.tracking import Tracking
from tests.conftest import ROOT
from tests.test_pipeline import read_everything, summary_sample


class CountWordsSummary(TypedDict):
    words: int


def count_words(ctx: StageContext) -> StageResult:
    """The new stage's function: words per line of the corpus the collect stage wrote."""
    out = ctx.outputs["reports/count_words"]  # handed what its declaration names
    text = (ctx.inputs["data/raw"] / "book.txt").read_text(encoding="utf-8")
    counts = [len(line.split()) for line in text.splitlines()]
    with atomic_dir(out) as tmp:
        write_json(tmp / "metrics.json", {"words": sum(counts), "lines": len(counts)})
    return StageResult(summary={"words": sum(counts)}, metrics={"words": sum(counts), "lines": len(counts)},
                       artifacts=[Artifact(out / "metrics.json", "reports")], log=f"{sum(counts)} words")


COUNT_WORDS = Stage(
    "count_words",
    "words in the raw corpus",
    deps=("data/raw",),
    outs=("reports/count_words",),
    metrics=("reports/count_words/metrics.json",),
    params=("seed",),
    summary=(Row("words", lambda s: f"{s['words']:,}"),),
    parent_metrics=lambda s: {"words": s["words"]},
)


def test_a_declared_stage_runs_logs_and_shows_in_dvc_yaml(tmp_path, monkeypatch, prefect_harness):
    module = types.ModuleType("lmcore.stages.count_words")
    module.run, module.Summary = count_words, CountWordsSummary
    monkeypatch.setitem(sys.modules, "lmcore.stages.count_words", module)
    monkeypatch.setattr(dvc_yaml, "STAGES", (*pipeline.STAGES[:1], COUNT_WORDS))

    text = yaml.safe_load(dvc_yaml.render())["stages"]["count_words"]
    assert text == {"cmd": "lmcore run count_words", "deps": ["data/raw", *COUNT_WORDS.code_deps()], "params": ["seed"],
                    "outs": ["reports/count_words"]}

    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "book.txt").write_text("one two three\nfour five\n", encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = RunContext(tmp_path, load_params(ROOT / "params.yaml"), Tracking(uri=uri, experiment="new-stage"))
    task = stage_task(COUNT_WORDS)

    @flow(name="lmcore-new-stage")
    def run_it() -> dict:
        return task(ctx)

    summary = run_it()
    assert summary["words"] == 5 and summary["run_id"]
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["lmcore.stage"] == "count_words"
    assert run.data.metrics == {"words": 5.0, "lines": 2.0} and run.data.params == {"seed": str(ctx.params.seed)}
    assert [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "reports")] == ["reports/metrics.json"]

    monkeypatch.setattr(pipeline, "STAGES", (COUNT_WORDS,))
    assert pipeline.summary_rows({"count_words": summary}) == [("words", "5")]
    read_everything(COUNT_WORDS, summary_sample(COUNT_WORDS))  # its rows read the keys its Summary types
    assert pipeline.parent_metrics({"count_words": summary}) == {"words": 5}


DEDUPE_MORE = Stage("dedupe_more", "near-duplicates out of the cleaned corpus", deps=("data/clean",), outs=("data/clean2",))


def test_a_declared_stage_shows_in_the_lineage(tmp_path, monkeypatch):
    """A data stage between preprocess and tokenize, declared alone: `lmcore lineage` of a model trained on its
    output finds its run between the tokenize and preprocess runs by the DVC hashes the runs carry (tasks/dvc_hashes.py
    tags every stage run so), with no edit to tasks/."""
    declared = {s.name: s for s in pipeline.STAGES}
    monkeypatch.setattr(pipeline, "STAGES", (declared["collect"], declared["preprocess"], DEDUPE_MORE,
                                             replace(declared["tokenize"], deps=("data/clean2",)), declared["pretrain"]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("lineage", artifact_location=(tmp_path / "mlruns").as_uri())
    md5 = {path: hashlib.md5(path.encode()).hexdigest() + ".dir" for path in ("data/raw", "data/clean", "data/clean2", "data/tokens")}

    def stage_run(stage: str, deps=(), outs=(), tags=None, manifest=None) -> str:
        """A finished run of `stage`, tagged as tasks/dvc_hashes.py tags one, with `manifest` as its manifest.json."""
        run = client.create_run(experiment, tags={TAG_STAGE: stage, **(tags or {}), **{TAG_DVC_DEP + p: md5[p] for p in deps},
                                                  **{TAG_DVC_OUT + p: md5[p] for p in outs}})
        if manifest is not None:
            (tmp_path / stage).mkdir()
            (tmp_path / stage / "manifest.json").write_bytes(manifest)
            client.log_artifact(run.info.run_id, str(tmp_path / stage / "manifest.json"))
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    raw = json.dumps({"sources": [{"name": "book", "source": "https://example.org/book.txt", "sha256": "ab" * 32,
                                   "license": "public domain", "origin": "mirror", "bytes": 24}]}).encode()
    tokens = json.dumps({"shards": [], "splits": {"train": {"tokens": 8}, "val": {"tokens": 2}}}).encode()
    lineage_keys = {TAG_RAW_MANIFEST_SHA: hashlib.sha256(raw).hexdigest(), TAG_TOKENS_MANIFEST_SHA: hashlib.sha256(tokens).hexdigest()}
    collect = stage_run("collect", outs=["data/raw"], tags={TAG_RAW_MANIFEST_SHA: lineage_keys[TAG_RAW_MANIFEST_SHA]}, manifest=raw)
    preprocess = stage_run("preprocess", ["data/raw"], ["data/clean"], {TAG_RAW_MANIFEST_SHA: lineage_keys[TAG_RAW_MANIFEST_SHA]})
    dedupe = stage_run("dedupe_more", ["data/clean"], ["data/clean2"])
    md5["data/clean2"], decoy = "0" * 32 + ".dir", md5["data/clean2"]
    stage_run("dedupe_more", ["data/clean"], ["data/clean2"])  # another dedupe_more run, other output: not the one read
    md5["data/clean2"] = decoy
    tokenize = stage_run("tokenize", ["data/clean2"], ["data/tokens"], {TAG_TOKENS_MANIFEST_SHA: lineage_keys[TAG_TOKENS_MANIFEST_SHA]},
                         manifest=tokens)
    pretrain = stage_run("pretrain", ["data/tokens"], tags=lineage_keys)
    client.create_registered_model("tiny")
    client.create_model_version("tiny", f"runs:/{pretrain}/model", run_id=pretrain, tags={TAG_WEIGHTS_SHA: "cd" * 32})

    got = model_lineage("models:/tiny/1", uri)
    chain = got["chain"]
    assert got["warnings"] == []
    assert [n["kind"] for n in chain] == ["model_version", "run", "tokens_manifest", "run", "run", "run", "run", "raw_sources"]
    assert [(n["stage"], n["run_id"]) for n in chain if n["kind"] == "run"] == [
        ("pretrain", pretrain), ("tokenize", tokenize), ("dedupe_more", dedupe), ("preprocess", preprocess), ("collect", collect)]
    assert chain[4]["found_by"] == "its data/clean2 output hash equals the tokenize run's input"
    assert chain[5]["found_by"] == "its data/clean output hash equals the dedupe_more run's input"
    assert chain[2]["verified"] is True and chain[2]["tokens"] == {"train": 8, "val": 2}
    assert chain[-1]["verified"] is True and chain[-1]["sources"][0]["name"] == "book"


def test_docs_give_one_list_for_adding_a_stage():
    """docs/architecture.md says once how a stage is added: the four steps the stage above took (a params section
    is optional for it: its params are the seed), each naming where it goes."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert text.count("## Adding a stage\n") == 1
    section = text.split("## Adding a stage\n", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^(\d)\. \*\*(.+?)\*\*(.*?)(?=^\d\. |\Z)", section, re.M | re.S)
    assert [(n, title.rstrip(":,")) for n, title, _ in steps] == [
        ("1", "Its params section"), ("2", "Its function"), ("3", "Its declaration"), ("4", "dvc.yaml")]
    where = ["lmcore/config/", "lmcore/stages/<name>.py", "lmcore/pipeline.py", "lmcore dvc-yaml"]
    assert all(place in body.replace("\n   ", " ") for place, (_, _, body) in zip(where, steps)), steps
    assert len(re.findall(r"^1\. ", text, re.M)) == 1  # no second list elsewhere in the file
    assert COUNT_WORDS.module == "lmcore.stages.count_words"  # step 2's place, where the test above put its function
