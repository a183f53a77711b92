"""Per-item results as MLflow tables (StageResult.item_tables): each stage's rows, checked against the files its library
functions wrote (micro models, real data from the mirror), and one stage run through the orchestration layer
(tasks.runner.execute) into a SQLite MLflow store, its table read back as the UI reads it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from lmcore.checkpoint import save_model
from lmcore.config import ModelConfig, load_params
from lmcore.finetune.common import read_split
from lmcore.io import jsonl_objects
from lmcore.model import GPT
from lmcore.paths import JUDGE_SCORES, SAMPLES, TEST_RESPONSES, Layout
from lmcore.pipeline import get
from lmcore.stages import (
    StageContext,
    benchmark,
    dpo,
    finetune_classifier,
    finetune_instruct,
    judge,
)
from lmcore.tokenizer import get_tokenizer
from tasks.context import RunContext
from tasks.runner import execute
from tasks.tracking import Tracking
from tests.conftest import MICRO
from tests.test_evaluation import write_tokens
from tests.test_judge import completion, endpoint

pytestmark = pytest.mark.usefixtures("one_thread")

GPT2_VOCAB = 50257
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # the run tag that makes the MLflow UI show a JSON artifact as a table


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")


def project(root: Path, enc, context_length: int = 32) -> Layout:
    """A project whose models/base is a random micro GPT with GPT-2's vocabulary and tokenizer."""
    layout = Layout(root)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=GPT2_VOCAB, context_length=context_length, n_embd=32, n_layer=2, n_head=2))
    save_model(model, layout.pretrained, extra={"tokenizer": "gpt2"})
    enc.save(layout.pretrained)
    return layout


def read_jsonl(path: Path) -> list[dict]:
    return [r for _, r in jsonl_objects(path.read_text(encoding="utf-8"), path)]


def columns(rows: list[dict]) -> list[str]:
    """The rows' keys, asserted the same (and in the same order) in every row: one table, one set of columns."""
    keys = list(rows[0])
    assert all(list(r) == keys for r in rows)
    return keys


def test_benchmark_rows_are_the_scored_items(tmp_path, enc):
    project(tmp_path, enc, context_length=128)
    params = load_params(MICRO, overrides=["benchmark.tasks=[arc_easy,truthfulqa_mc2,mmlu_anatomy]", "benchmark.limit=5",
                                           "benchmark.primary_metric=arc_easy.acc"])
    result = benchmark.run(StageContext(root=tmp_path, params=params))
    # a table per task, MMLU's per category (the UI's table view stalls on thousands of rows)
    assert [t.path for t in result.item_tables] == [f"tables/benchmark_items/{t}.json" for t in ("arc_easy", "mmlu_stem", "truthfulqa_mc2")] \
        + ["tables/decontamination.json"]  # the matches of the decontamination check (none here)
    samples = tmp_path / "reports" / "benchmark" / "samples"
    records = [r for name in ("arc_easy", "mmlu", "truthfulqa_mc2") for r in read_jsonl(samples / f"{name}.jsonl")]
    rows = [r for t in result.item_tables for r in t.rows]
    assert len(rows) == len(records) == result.summary["n_items"] == 15
    assert columns(rows) == ["task", "doc_id", "correct", "acc", "acc_norm", "gold", "pick", "pick_norm", "prompt", "choices",
                             "labels", "loglikelihoods", "truncated"]
    for row, rec in zip(rows, records, strict=True):
        same = ("task", "doc_id", "acc", "gold", "pick", "pick_norm", "prompt", "choices", "loglikelihoods", "truncated")
        assert {k: row[k] for k in same} == {k: rec[k] for k in same}
        if row["task"] == "truthfulqa_mc2":  # scored by the probability on the true answers: no right or wrong pick
            assert row["correct"] is None and row["acc_norm"] is None and row["labels"] == rec["labels"]
            assert 0 <= row["acc"] <= 1
        else:
            assert row["correct"] is (row["pick"] == row["gold"]) and float(row["correct"]) == rec["acc"]
            assert row["acc_norm"] == rec["acc_norm"] == float(row["pick_norm"] == row["gold"])
            assert row["labels"] == [int(i == row["gold"]) for i in range(len(row["choices"]))]
    arc = [r["correct"] for r in rows if r["task"] == "arc_easy"]
    assert result.scores.values["arc_easy.acc"] == pytest.approx(sum(arc) / len(arc))
    assert [r["task"] for r in rows].count("mmlu_anatomy") == 5


def test_classifier_rows_are_the_test_predictions(tmp_path, enc):
    layout = project(tmp_path, enc)
    params = load_params(MICRO)
    result = finetune_classifier.run(StageContext(root=tmp_path, params=params))
    (table,) = result.item_tables
    assert table.path == "tables/test_predictions.json"
    rows, labels = table.rows, params.finetune_classifier.labels
    splits, predictions = layout.finetune_data("classifier") / "splits", layout.reports("classifier") / "test_predictions.csv"
    test = read_split(splits, "test")
    with open(predictions, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(rows) == len(test) == len(written) == result.metrics["test_examples"] == 300
    assert columns(rows) == ["text", "label", "predicted", "correct", "where"]
    assert [(r["text"], r["label"], r["where"]) for r in rows] == [(t["text"], labels[t["label"]], t["where"]) for t in test]
    assert [(r["label"], r["predicted"]) for r in rows] == [(w["actual"], w["predicted"]) for w in written]
    assert all(r["correct"] is (r["label"] == r["predicted"]) for r in rows)
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(result.summary["test_accuracy"])

    predictions.write_text("".join(predictions.read_text().splitlines(keepends=True)[:-1]))  # one prediction short
    with pytest.raises(ValueError, match="299 predictions for 300 test examples"):
        finetune_classifier.prediction_rows(splits, predictions, labels)


def test_instruct_and_dpo_rows_hold_the_test_responses(tmp_path, enc):
    layout = project(tmp_path, enc)
    ctx = StageContext(root=tmp_path, params=load_params(MICRO))
    for name, stage in (("instruct", finetune_instruct), ("dpo", dpo)):
        (table,) = stage.run(ctx).item_tables
        assert table.path == "tables/test_responses.json"
        written = read_jsonl(layout.reports(name) / TEST_RESPONSES)
        assert len(table.rows) == len(written) == ctx.params.finetune_instruct.max_test_generations == 2
        assert columns(table.rows) == ["instruction", "input", "reference", "response"]
        assert [r["response"] for r in table.rows] == [w["response"] for w in written]  # the model's text, exactly
        test = read_split(layout.finetune_data(name) / "splits", "test")[:2]
        assert [(r["instruction"], r["input"], r["reference"]) for r in table.rows] == [
            (t["instruction"], t.get("input", ""), t["output"]) for t in test  # the preference data has the book's output too
        ]


def test_judge_rows_hold_each_score_and_raw_reply(tmp_path):
    layout = Layout(tmp_path)
    responses = {
        "instruct": [{"instruction": "Name a colour.", "input": "", "output": "Red", "response": "Blue."},
                     {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "response": "It is 5."}],
        "dpo": [{"instruction": "Say hi.", "input": "", "output": "Hi!", "response": "Hello there"},
                {"instruction": "Say no.", "input": "", "output": "No.", "response": "no"}],
    }
    for name, rows in responses.items():
        layout.reports(name).mkdir(parents=True)
        (layout.reports(name) / TEST_RESPONSES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = ["85", "I cannot score this.", "Score: 60/100", "**100**"]
    with endpoint([(200, completion(r)) for r in replies]) as (url, _):
        params = load_params(MICRO, overrides=[f"judge.url={url}", "judge.model=scripted", "judge.retries=0"])
        result = judge.run(StageContext(root=tmp_path, params=params))
    (table,) = result.item_tables
    assert table.path == "tables/judged_responses.json"
    assert columns(table.rows) == ["model", "score", "unparsed", "instruction", "input", "reference", "response", "judge_reply"]
    assert [(r["model"], r["score"], r["unparsed"], r["judge_reply"]) for r in table.rows] == [
        ("instruct", 85, False, "85"), ("instruct", None, True, "I cannot score this."),
        ("dpo", 60, False, "Score: 60/100"), ("dpo", 100, False, "**100**"),
    ]
    expected = [(r["instruction"], r["input"], r["output"], r["response"]) for rows in responses.values() for r in rows]
    assert [(r["instruction"], r["input"], r["reference"], r["response"]) for r in table.rows] == expected
    for name in responses:  # the rows are the scores files the library wrote
        scores = read_jsonl(layout.reports("judge") / name / JUDGE_SCORES)
        assert [(s["score"], s["judge_reply"]) for s in scores] == [(r["score"], r["judge_reply"]) for r in table.rows if r["model"] == name]


def test_evaluate_logs_its_samples_as_an_mlflow_table(tmp_path, enc):
    """Through the orchestration layer: the table is an artifact of the stage's run, and the run's
    mlflow.loggedArtifacts tag names it as a table (what makes the UI's artifact view show it as one)."""
    layout = project(tmp_path, enc)
    rng = np.random.default_rng(0)
    write_tokens(layout.tokens, {"train": [[rng.integers(0, GPT2_VOCAB, 200)]], "val": [[rng.integers(0, GPT2_VOCAB, 200)]]},
                 GPT2_VOCAB)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = load_params(MICRO, overrides=['evaluate.prompts=["Every effort moves you","I had always thought"]'])
    summary = execute(get("evaluate"), RunContext(tmp_path, params, Tracking(uri=uri, experiment="tables")))

    client = MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags[LOGGED_ARTIFACTS]) == [{"path": "tables/samples.json", "type": "table"}]
    local = Path(client.download_artifacts(run.info.run_id, "tables/samples.json", str(tmp_path / "download")))
    logged = json.loads(local.read_text())  # pandas' "split" orient: {"columns": [...], "data": [[...], ...]}
    assert logged["columns"] == ["prompt", "completion", "temperature", "top_k", "max_new_tokens", "seed"]
    samples = read_jsonl(layout.evaluate_reports / SAMPLES)
    assert [dict(zip(logged["columns"], row, strict=True)) for row in logged["data"]] == samples
    assert [s["prompt"] for s in samples] == ["Every effort moves you", "I had always thought"]
    assert all(s["completion"] and s["seed"] == params.seed and s["temperature"] == params.evaluate.temperature for s in samples)
    mlflow.set_tracking_uri(uri)  # load_table finds runs through mlflow.search_runs: the process-wide URI
    try:
        df = client.load_table(run.info.experiment_id, "tables/samples.json", run_ids=[run.info.run_id])
    finally:
        mlflow.set_tracking_uri(None)
    assert list(df["completion"]) == [s["completion"] for s in samples]
