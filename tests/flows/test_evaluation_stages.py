"""The benchmark and judge stages as `lmcore run` runs them (Prefect flows, a real MLflow SQLite registry):
a champion scored on other items is re-scored before the comparison, and the judge stage scores the
instruction models' responses through `lmcore serve` serving a registered model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.stage import stage_flow
from lmcore.checkpoint import save_model
from lmcore.paths import TEST_RESPONSES, Layout
from lmcore.tokenizer import get_tokenizer
from tasks.registry import log_and_register
from tasks.tracking import Tracking
from tests.conftest import MICRO
from tests.test_judge import constant_judge
from tests.test_serve import running_server


@pytest.fixture
def project(tmp_path, prefect_harness, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return tmp_path, uri


def run(stage, root, *overrides):
    return stage_flow(stage, params_file=str(MICRO), overrides=list(overrides), root=str(root))


@pytest.mark.slow  # six stage flows and two benchmark runs (make test-all)
def test_champion_scored_on_other_items_is_rescored_first(project):
    root, uri = project
    for stage in ("collect", "preprocess", "tokenize", "pretrain"):
        run(stage, root)
    first = run("benchmark", root)
    assert first["promotion"]["alias"] == "champion" and first["model_version"] == "1"

    run("pretrain", root, "pretrain.max_steps=6")  # other weights: version 2
    second = run("benchmark", root, "benchmark.sample_seed=99", "benchmark.limit=3")
    assert second["model_version"] == "2" and second["sample_sha256"] != first["sample_sha256"]
    decision = second["promotion"]
    assert decision["champion_version"] == "1" and "combined stderr" in decision["reason"]
    client = MlflowClient(uri, registry_uri=uri)
    v1 = client.get_model_version("lmcore-base", "1").tags
    assert v1["bench.sample_sha256"] == second["sample_sha256"]  # re-scored on the new sample
    assert float(v1["bench.mmlu.acc"]) == pytest.approx(decision["champion_value"])
    assert decision["difference"] == pytest.approx(second["primary_value"] - decision["champion_value"])
    holder = client.get_model_version_by_alias("lmcore-base", decision["alias"])
    assert str(holder.version) == "2"
    logged = json.loads(Path(client.download_artifacts(second["run_id"], "promotion.json", str(root))).read_text())
    assert logged == decision

    # champion vs challenger on the same items, in the second benchmark run's artifacts
    assert v1["bench.results"] == f"runs:/{second['run_id']}/champion_v1"  # the re-scored champion's per-item results
    tags = client.get_run(second["run_id"]).data.tags
    assert tags["lmcore.compared_with"] == "lmcore-base v1"
    assert second["run_id"] in tags["lmcore.compare_runs"] and first["run_id"] in tags["lmcore.compare_runs"]
    files = {f.path for f in client.list_artifacts(second["run_id"], "comparison")}
    assert files >= {f"comparison/{f}" for f in ("comparison.md", "scores.csv", "scores.png", "disagreements.jsonl")}
    table = Path(client.download_artifacts(second["run_id"], "comparison/scores.csv", str(root / "cmp"))).read_text()
    mmlu = next(line.split(",") for line in table.splitlines() if line.startswith("mmlu,acc,"))
    assert float(mmlu[3]) == pytest.approx(second["primary_value"]) and float(mmlu[5]) == pytest.approx(decision["champion_value"])
    disagree = Path(client.download_artifacts(second["run_id"], "comparison/disagreements.jsonl", str(root / "cmp"))).read_text()
    counted = sum(v for k, v in client.get_run(second["run_id"]).data.metrics.items() if k.startswith("compare.") and k.endswith(".disagree"))
    assert counted == len(disagree.splitlines())

    # the model cards follow: v2's says how the gate decided against v1; v1's shows the alias it holds now
    v2_card = client.get_model_version("lmcore-base", "2").description
    assert v2_card.startswith("# lmcore-base v2\n") and f"`@{decision['alias']}`: {decision['reason']}." in v2_card
    assert f"| champion v1 | {decision['champion_value']:.4f} ± {decision['champion_stderr']:.4f} |" in v2_card
    v1_aliases = client.get_model_version("lmcore-base", "1").aliases
    v1_card = client.get_model_version("lmcore-base", "1").description
    assert v1_card.splitlines()[2].startswith(" ".join(f"`@{a}`" for a in sorted(v1_aliases)) or "no alias")
    assert f"| mmlu | acc | {float(v1['bench.mmlu.acc']):.4f} |" in v1_card  # its scores on the new sample


def test_judge_stage_scores_through_a_served_registered_model(project, one_thread):
    root, uri = project
    enc = get_tokenizer("gpt2")
    layout = Layout(root)
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w, "response": w.lower()} for w in ("Yes", "No", "Maybe")]
    for name in ("instruct", "dpo"):
        layout.reports(name).mkdir(parents=True)
        (layout.reports(name) / TEST_RESPONSES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_model(constant_judge(enc), root / "judge-model", extra={"template": "alpaca", "tokenizer": "gpt2"})
    enc.save(root / "judge-model")
    tracking = Tracking(uri=uri, experiment="judges")
    with tracking.run("register") as reg:
        version = log_and_register(tracking, reg.run_id, root / "judge-model", "judge-73", tags={}, aliases=("prod",))
    assert version == "1"

    with running_server("models:/judge-73@prod", root) as url:
        result = run("judge", root, f"judge.url={url}", "judge.model=judge-73@prod", "judge.max_items=2")
    assert result == {"skipped": False, "mean_scores": {"instruct": 73.0, "dpo": 73.0}, "run_id": result["run_id"]}
    summary = json.loads((layout.reports("judge") / "summary.json").read_text())
    assert summary["judge"]["model"] == "judge-73@prod" and summary["judge"]["url"] == url
    assert summary["instruct"]["n_scored"] == 2 and summary["dpo"]["mean_score"] == 73.0
    scores = [json.loads(line) for line in (layout.reports("judge") / "dpo" / "scores.jsonl").read_text().splitlines()]
    assert [(s["response"], s["score"]) for s in scores] == [("yes", 73), ("no", 73)]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lmcore-micro")
    (judge_run,) = client.search_runs([exp.experiment_id], "tags.`lmcore.stage` = 'judge'")
    assert judge_run.data.metrics["instruct.mean_score"] == 73.0 and judge_run.data.params["judge.model"] == "judge-73@prod"
