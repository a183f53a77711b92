"""A stage added the way docs/architecture.md says (a function returning a StageResult, and a declaration) runs as a
Prefect task with its own MLflow run, shows in dvc.yaml and in the lifecycle summary: no runner, flow, CLI or
dvc.yaml code names it."""

from __future__ import annotations

import re
import sys
import types

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
from tasks.runner import stage_task
from tasks.tracking import Tracking
from tests.conftest import ROOT


def count_words(ctx: StageContext) -> StageResult:
    """The new stage's function: words per line of the corpus the collect stage wrote."""
    out = ctx.layout.reports("count_words")
    text = (ctx.root / "data" / "raw" / "book.txt").read_text(encoding="utf-8")
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
    module.run = count_words
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
    assert pipeline.parent_metrics({"count_words": summary}) == {"words": 5}


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
