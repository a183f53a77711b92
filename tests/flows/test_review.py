"""Reviewing a lifecycle run in the MLflow UI: every registered version's description is its model card, every
registered model says what it holds and what its aliases mean, and the per-item results are MLflow tables.
The micro lifecycle run of tests/flows/conftest.py, on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from lmcore.paths import CARD, Layout
from lmcore.pipeline import STAGES

# stage -> the per-item tables its run logs
TABLES = {
    "evaluate": ["tables/samples.json"],
    "finetune_classifier": ["tables/test_predictions.json"],
    "finetune_instruct": ["tables/test_responses.json"],
    "dpo": ["tables/test_responses.json"],
}


def stage_runs(client: MlflowClient, result: dict) -> dict:
    return {s.name: client.get_run(result[s.name]["run_id"]) for s in STAGES if result.get(s.name, {}).get("run_id")}


def test_every_registered_version_has_its_card(lifecycle_run):
    root, uri, result = lifecycle_run
    client = MlflowClient(uri, registry_uri=uri)
    layout = Layout(root)
    folders = {"pretrain": layout.pretrained, "finetune_classifier": layout.model("classifier"),
               "finetune_instruct": layout.model("instruct"), "dpo": layout.model("dpo")}
    for stage in (s for s in STAGES if s.registers is not None):
        name, version = result[stage.name]["registered_model"], result[stage.name]["model_version"]
        card = client.get_model_version(name, version).description
        assert card.startswith(f"# {name} v{version}\n"), card[:200]
        headings = [line for line in card.splitlines() if line.startswith("## ")]
        assert headings[:4] == ["## What it is", "## Data", "## Training", "## Scores"], (stage.name, headings)
        # the folder's card is the same facts without the registry's part; the run keeps the registry's card
        folder_card = (folders[stage.name] / CARD).read_text()
        assert folder_card.split("## What it is")[1].split("## Training")[0] in card
        run_card = client.download_artifacts(result[stage.name]["run_id"], CARD, str(root / "review" / stage.name))
        assert Path(run_card).read_text() == card
        if stage.registers.aliases:
            assert f"`@{stage.registers.aliases[0]}`" in card.splitlines()[2]

    base = client.get_model_version("lmcore-base", result["pretrain"]["model_version"]).description
    assert "## Promotion" in base and "`@champion`: no champion yet." in base  # the first version
    bench = result["benchmark"]
    if bench["primary_value"] is not None:
        task, metric = bench["primary_metric"].rsplit(".", 1)
        assert f"| {task} | {metric} | {bench['primary_value']:.4f} |" in base
    assert f"{result['evaluate']['val_bpb']:.4f}" in base  # evaluate's scores, tagged on the version
    classifier = client.get_model_version("lmcore-classifier", result["finetune_classifier"]["model_version"]).description
    assert f"| test accuracy | {result['finetune_classifier']['test_accuracy']:.4f} |" in classifier

    descriptions = {m.name: m.description for m in client.search_registered_models()}
    assert "`@champion`" in descriptions["lmcore-base"] and "`@challenger`" in descriptions["lmcore-base"]
    assert "`@sft`" in descriptions["lmcore-instruct"] and "`@dpo`" in descriptions["lmcore-instruct"]
    assert "`finetune_classifier`" in descriptions["lmcore-classifier"]


def test_per_item_results_are_mlflow_tables(lifecycle_run):
    root, uri, result = lifecycle_run
    client = MlflowClient(uri)
    runs = stage_runs(client, result)
    def tables(stage: str) -> list[str]:
        logged = json.loads(runs[stage].data.tags.get("mlflow.loggedArtifacts", "[]"))
        return [t["path"] for t in logged if t["type"] == "table"]

    def rows(stage: str, table: str) -> list:
        data = json.loads(Path(client.download_artifacts(runs[stage].info.run_id, table, str(root / "review" / stage))).read_text())
        assert data["columns"], (stage, table)
        return data["data"]

    for stage, expected in TABLES.items():
        assert tables(stage) == expected, stage
        assert all(rows(stage, t) for t in expected)
    # the benchmark's items: a table per task, MMLU's per category, every scored item once
    parts = {t.removeprefix("tables/benchmark_items/").removesuffix(".json") for t in tables("benchmark")}
    assert {"hellaswag", "arc_easy", "mmlu_stem", "mmlu_humanities"} <= parts
    assert parts <= {"hellaswag", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2",
                     "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"}
    assert sum(len(rows("benchmark", t)) for t in tables("benchmark")) == result["benchmark"]["n_items"]
