"""What the gating stages do before a score decides anything, on micro models and the mirror's real benchmark files:
the evaluation cache (a model scored before on the same items runs no forward pass), decontamination (a benchmark
item planted in the corpus is found, with its file and line, and the scores are also given on the clean part),
and the instruct_eval stage's scores, settings and per-item tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcore.config import load_params
from lmcore.harness.run import SAMPLES_DIR
from lmcore.io import read_json
from lmcore.model import GPT
from lmcore.paths import DOCUMENTS
from lmcore.stages import StageContext, benchmark
from tests.conftest import MICRO
from tests.test_item_tables import enc, project  # noqa: F401 (the module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """Every GPT.hidden call (each forward pass, scoring's included) appends its batch size."""
    calls: list[int] = []
    hidden = GPT.hidden

    def counted(self, idx, **kwargs):
        calls.append(idx.shape[0])
        return hidden(self, idx, **kwargs)

    monkeypatch.setattr(GPT, "hidden", counted)
    return calls


def corpus(root: Path, texts: list[str]) -> Path:
    path = root / "data" / "clean" / DOCUMENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_a_model_scored_before_on_the_same_items_runs_no_forward_pass(tmp_path, enc, monkeypatch, forward_calls):  # noqa: F811
    monkeypatch.setenv("LMCORE_EVAL_CACHE", str(tmp_path / "cache"))
    layout = project(tmp_path, enc, context_length=128)
    corpus(tmp_path, ["a short corpus with nothing of the benchmarks in it"])
    params = load_params(MICRO, overrides=["benchmark.tasks=[arc_easy]", "benchmark.limit=6", "benchmark.primary_metric=arc_easy.acc"])
    ctx = StageContext(root=tmp_path, params=params)
    first = benchmark.run(ctx)
    assert forward_calls, "the first run scores the model"
    forward_calls.clear()
    # the champion re-scored on the same sample (the gate's `rescore`): from the cache, without loading the model
    again = benchmark.rescore(ctx, layout.pretrained, tmp_path / "rescored", "models:/lmcore-base/1")
    assert forward_calls == []
    assert again.values == {k: v for k, v in first.scores.values.items() if k in again.values}
    assert again.sample_sha256 == first.scores.sample_sha256
    assert (tmp_path / "rescored" / SAMPLES_DIR / "arc_easy.jsonl").read_text() == \
        (layout.reports("benchmark") / SAMPLES_DIR / "arc_easy.jsonl").read_text()
    # another sample is another key: scored
    ctx = StageContext(root=tmp_path, params=load_params(MICRO, overrides=[
        "benchmark.tasks=[arc_easy]", "benchmark.limit=6", "benchmark.primary_metric=arc_easy.acc", "benchmark.sample_seed=7"]))
    benchmark.rescore(ctx, layout.pretrained, tmp_path / "other", "models:/lmcore-base/1")
    assert forward_calls


def test_a_benchmark_item_in_the_corpus_is_found_and_scored_apart(tmp_path, enc, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LMCORE_EVAL_CACHE", str(tmp_path / "cache"))
    project(tmp_path, enc, context_length=128)
    params = load_params(MICRO, overrides=["benchmark.tasks=[arc_easy]", "benchmark.limit=6", "benchmark.primary_metric=arc_easy.acc"])
    ctx = StageContext(root=tmp_path, params=params)
    corpus(tmp_path, ["nothing here yet"])
    benchmark.run(ctx)
    records = [json.loads(line) for line in (tmp_path / "reports/benchmark/samples/arc_easy.jsonl").read_text().splitlines()]
    planted = records[2]
    # the corpus holds one sampled question, lowercased and without punctuation, between unrelated documents
    words = " ".join(planted["prompt"].replace("?", " ").replace(",", " ").lower().split())
    path = corpus(tmp_path, ["the verdict was in", f"notes: {words} and more", "another document"])
    result = benchmark.run(ctx)
    report = read_json(tmp_path / "reports/benchmark/decontamination.json")
    assert report["benchmarks"]["arc_easy"] == {"items": 6, "contaminated": 1, "clean": 5}
    assert report["sources"]["corpus"]["contaminated"] == {"arc_easy": 1}
    match = report["matches"][0]
    assert (match["item"], match["source"], match["file"], match["line"]) == \
        (f"arc_easy/{planted['doc_id']}", "corpus", path.relative_to(tmp_path).as_posix(), 2)
    # the scores on the whole sample and on its clean part
    clean = [r for r in records if r["doc_id"] != planted["doc_id"]]
    values = result.scores.values
    assert values["arc_easy.n_clean"] == 5
    assert values["arc_easy.acc_clean"] == pytest.approx(sum(r["acc"] for r in clean) / 5)
    assert values["arc_easy.acc"] == pytest.approx(sum(r["acc"] for r in records) / 6)
    assert result.summary["decontamination"]["arc_easy"]["contaminated"] == 1
    # the MLflow table (item, matching n-gram, source, file, line) and the version tags for the card
    table = next(t for t in result.item_tables if t.path == "tables/decontamination.json")
    assert [(r["item"], r["source"], r["file"], r["line"]) for r in table.rows] == \
        [(f"arc_easy/{planted['doc_id']}", "corpus", "data/clean/documents.jsonl", 2)]
    assert len(table.rows[0]["ngram"].split()) == 13
    assert result.scored[0].tags == {"decontam.arc_easy.corpus": "1", "decontam.arc_easy.base_card": "0"}
