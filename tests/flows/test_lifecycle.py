"""The lifecycle flow end to end on the micro profile, under a real (temporary) Prefect server and
a real MLflow SQLite store: shards, weights, parent + nested runs, the registered model."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lmcore.checkpoint import load_model
from lmcore.data.loader import TokenDataset
from lmcore.data.tokenize import decode_shard
from lmcore.io import sha256_file
from lmcore.paths import MANIFEST, METRICS, SAMPLES, WEIGHTS, Layout
from lmcore.pipeline import NAMES as STAGES
from lmcore.tokenizer import get_tokenizer


def test_outputs_land_where_the_layout_says(lifecycle_run):
    root, _, result = lifecycle_run
    layout = Layout(root)
    manifest = json.loads((layout.tokens / MANIFEST).read_text())
    assert {s["split"] for s in manifest["shards"]} == {"train", "val"}
    enc = get_tokenizer("gpt2")
    docs = [json.loads(line)["text"] for line in (layout.clean / "documents.jsonl").read_text().splitlines()]
    decoded = [t for s in manifest["shards"] for t in decode_shard(layout.tokens / s["file"], enc)]
    assert sorted(decoded) == sorted(docs)
    model = load_model(layout.pretrained)
    assert model.config.n_embd == 32
    assert TokenDataset(layout.tokens, "train").n_tokens == result["tokenize"]["train_tokens"]
    metrics = json.loads((layout.evaluate_reports / METRICS).read_text())
    assert metrics["perplexity"] > 1
    assert (layout.evaluate_reports / SAMPLES).read_text().count("\n") == 1
    assert result["dvc"].startswith("not recorded: no DVC project")  # the tmp root is no DVC project
    assert result["plan"]["checked_against_dvc_lock"] is False  # so every stage ran
    assert [s["stage"] for s in result["plan"]["stages"] if s["run"]] == list(STAGES)


def test_mlflow_parent_and_nested_runs(lifecycle_run):
    root, uri, result = lifecycle_run
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lmcore-micro")
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.model.n_embd"] == "32"
    assert parent.data.tags["lmcore.tokens_manifest_sha256"] == sha256_file(Layout(root).tokens / MANIFEST)
    assert parent.data.tags["lmcore.git_commit"]
    assert parent.data.tags["lmcore.prefect_flow_run_id"]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["lmcore.stage"] for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    pretrain = next(r for r in children if r.data.tags["lmcore.stage"] == "pretrain")
    history = client.get_metric_history(pretrain.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 13))
    val = client.get_metric_history(pretrain.info.run_id, "val_loss")
    assert len(val) >= 3
    assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "val_bpb")] == [m.step for m in val]
    assert parent.data.metrics["val_loss"] == pytest.approx(result["evaluate"]["val_loss"])
    assert parent.data.metrics["val_bpb"] == pytest.approx(result["evaluate"]["val_bpb"])
    assert parent.data.metrics["final_val_bpb"] == pytest.approx(result["pretrain"]["final_val_bpb"])
    # each stage's wall time, on the parent run and in the summary (benchmarks.default_profile reads them)
    times = result["stage_times"]
    assert list(times) == list(STAGES) and all(s > 0 for s in times.values())
    assert {s: parent.data.metrics[f"stage_time_s.{s}"] for s in STAGES} == pytest.approx(times)
    assert parent.data.metrics["stages_time_s"] == pytest.approx(sum(times.values()), abs=1e-2)
    row = dict(result["summary"])["stage time"]
    assert row.startswith(f"{int(sum(times.values()) // 60)} min ") and f"longest: {max(times, key=times.get)} " in row


def test_model_is_registered_and_loads(lifecycle_run):
    root, uri, result = lifecycle_run
    client = MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'lmcore-base'")
    assert [str(v.version) for v in versions] == ["1"]
    version = versions[0]
    assert version.tags["lmcore.weights_sha256"] == sha256_file(Layout(root).pretrained / WEIGHTS)
    assert float(version.tags["eval.val_loss"]) == pytest.approx(result["evaluate"]["val_loss"], abs=1e-5)
    assert float(version.tags["eval.val_bpb"]) == pytest.approx(result["evaluate"]["val_bpb"], abs=1e-5)
    assert (version.tags["lmcore.tokenizer"], version.tags["lmcore.tokenizer_sha256"][:12]) == ("gpt2", "306cd27f03c1")
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/lmcore-base/1")
    out = model.predict(["Every effort moves you"], params={"max_new_tokens": 5, "temperature": 0.0})
    assert len(out) == 1 and isinstance(out[0], str) and out[0]


def test_markdown_artifact_published(lifecycle_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmcore-lifecycle-summary"])))
    arts = own_summaries(arts, lifecycle_run[0])
    assert arts and "registered model" in arts[0].data and "lmcore-base v1" in arts[0].data


def own_summaries(artifacts: list, root) -> list:
    """The lifecycle summaries of the run in `root`: other tests' flows publish theirs to the same Prefect server."""
    return [a for a in artifacts if str(root) in a.data]


def offline_without_ranks(monkeypatch) -> None:
    """No $LMCORE_TIKTOKEN_FILE and no network: tiktoken's own loader fails as it would offline."""
    import tiktoken

    from lmcore.tokenizer import RANKS_ENV

    def offline(name):
        raise OSError(f"offline: tiktoken tried to download {name!r}")

    monkeypatch.delenv(RANKS_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)


def test_cli_generates_from_folder_and_registry(lifecycle_run, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    root, _, _ = lifecycle_run
    monkeypatch.chdir(root)
    offline_without_ranks(monkeypatch)  # the model folder carries its tokenizer: no variable, no download
    args = ["Every effort", "--max-new-tokens", "6", "--temperature", "0"]
    local = CliRunner().invoke(app, ["generate", *args, "--model", "models/base"])
    assert local.exit_code == 0, local.output
    assert local.output.startswith("Every effort") and len(local.output) > len("Every effort\n")
    registry = CliRunner().invoke(app, ["generate", *args, "--model", "models:/lmcore-base/1"])
    assert registry.exit_code == 0, registry.output
    assert registry.output.splitlines()[-1] == local.output.splitlines()[-1]


def test_finetuned_models_are_registered_with_aliases(lifecycle_run):
    root, uri, result = lifecycle_run
    client = MlflowClient(uri, registry_uri=uri)
    classifier = client.get_model_version("lmcore-classifier", "1")
    assert classifier.tags["lmcore.weights_sha256"] == sha256_file(Layout(root).model("classifier") / WEIGHTS)
    assert client.get_model_version_by_alias("lmcore-instruct", "sft").tags["lmcore.finetune"] == "instruct"
    dpo = client.get_model_version_by_alias("lmcore-instruct", "dpo")
    assert dpo.tags["lmcore.finetune"] == "dpo" and str(dpo.version) == str(result["dpo"]["model_version"])
    assert dpo.tags["lmcore.base_weights_sha256"] == sha256_file(Layout(root).model("instruct") / WEIGHTS)
    mlflow.set_tracking_uri(uri)
    labels = mlflow.pyfunc.load_model("models:/lmcore-classifier/1").predict(["WINNER!! Claim your free prize now", "see you at lunch"])
    assert list(labels.columns) == ["label", "probability"] and set(labels["label"]) <= {"ham", "spam"}
    chat = mlflow.pyfunc.load_model("models:/lmcore-instruct@dpo")
    assert len(chat.predict(["Name a color."], params={"max_new_tokens": 4, "temperature": 0.0})) == 1


def test_finetune_runs_are_nested_with_curves(lifecycle_run):
    root, uri, result = lifecycle_run
    client = MlflowClient(uri)
    run = client.get_run(result["dpo"]["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == result["mlflow_run_id"]
    margins = client.get_metric_history(run.info.run_id, "train_reward_margin")
    assert [m.step for m in margins] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/loss.png", "reports/test_responses.jsonl", "reports/metrics.json"} <= artifacts
    cls = client.get_run(result["finetune_classifier"]["run_id"])
    assert cls.data.metrics["records_read"] == 5574 and cls.data.metrics["records_bad"] == 0
    assert cls.data.metrics["trainable_params"] < cls.data.metrics["total_params"]


def test_cli_classify_and_chat(lifecycle_run, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    root, _, _ = lifecycle_run
    monkeypatch.chdir(root)
    offline_without_ranks(monkeypatch)
    out = CliRunner().invoke(app, ["classify", "WINNER!! Claim your prize", "ok see you soon"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("ham", "spam") and 0.5 <= float(line.split("\t")[1]) <= 1 for line in lines)
    registry = CliRunner().invoke(app, ["classify", "WINNER!! Claim your prize", "--model", "models:/lmcore-classifier/1"])
    assert registry.exit_code == 0 and registry.output.splitlines()[0] == lines[0]
    chat = CliRunner().invoke(app, ["chat", "--model", "models/dpo", "--max-new-tokens", "4"], input="Name a color.\n\n")
    assert chat.exit_code == 0, chat.output
    not_instruct = CliRunner().invoke(app, ["chat", "--model", "models/base"], input="hi\n")
    assert not_instruct.exit_code == 2 and "not an instruction model" in not_instruct.output
    not_classifier = CliRunner().invoke(app, ["classify", "hi", "--model", "models/base"])
    assert not_classifier.exit_code == 2


def test_benchmark_scores_promote_the_first_version_to_champion(lifecycle_run):
    root, uri, result = lifecycle_run
    out = Layout(root).reports("benchmark")
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["limit"] == 4 and results["groups"]["mmlu"]["n"] == 228
    assert (out / "scores.png").is_file() and (out / "samples" / "mmlu.jsonl").is_file()
    bench = result["benchmark"]
    assert bench["primary_metric"] == "mmlu.acc" and bench["primary_value"] == results["groups"]["mmlu"]["acc"]
    assert bench["promotion"]["alias"] == "champion" and bench["promotion"]["reason"] == "no champion yet"

    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("lmcore-base", "champion")
    assert str(champion.version) == "1"
    assert float(champion.tags["bench.mmlu.acc"]) == pytest.approx(results["groups"]["mmlu"]["acc"])
    assert champion.tags["bench.sample_sha256"] == results["sample_sha256"]
    run = client.get_run(bench["run_id"])
    assert run.data.tags["promotion.alias"] == "champion"
    assert run.data.metrics["mmlu.acc"] == pytest.approx(results["groups"]["mmlu"]["acc"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"promotion.json", "reports/results.json", "reports/scores.png", "reports/samples"} <= logged

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        arts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmcore-benchmark"])))
        summary = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmcore-lifecycle-summary"])))
    # this lifecycle's table: other tests' flows on the session's Prefect server write the same key
    flow_run = run.data.tags["lmcore.prefect_flow_run_id"]
    arts = [a for a in arts if str(a.flow_run_id) == flow_run]
    assert len(arts) == 1 and arts[0].type == "table" and "mmlu" in json.dumps(arts[0].data)
    summary = own_summaries(summary, root)
    assert summary and "v1 -> @champion" in summary[0].data and "skipped: no judge endpoint" in summary[0].data


def test_judge_without_endpoint_is_skipped_not_faked(lifecycle_run):
    root, uri, result = lifecycle_run
    assert result["judge"]["skipped"] and "judge.url" in result["judge"]["reason"]
    summary = json.loads((Layout(root).reports("judge") / "summary.json").read_text())
    assert summary == {"skipped": True, "reason": result["judge"]["reason"]}
    assert not any(Layout(root).reports("judge").glob("*/scores.jsonl"))


def test_every_registered_family_has_a_gated_champion(lifecycle_run, monkeypatch):
    """The classifier (paired, on its test split) and the instruction models (IFEval and GSM8K as lm-eval scores them)
    go through the promotion gate like the base model: the first of each family is champion, DPO is compared with
    SFT on the same items, and `models:/<name>` alone is the champion."""
    root, uri, result = lifecycle_run
    client = MlflowClient(uri, registry_uri=uri)
    classifier = result["finetune_classifier"]["promotion"]
    assert classifier["metric"] == "test.accuracy" and classifier["alias"] == "champion"
    tags = client.get_model_version("lmcore-classifier", "1").tags
    assert float(tags["bench.test.accuracy"]) == pytest.approx(result["finetune_classifier"]["test_accuracy"])

    evaluated = result["instruct_eval"]
    assert set(evaluated["scores"]) == {"sft", "dpo"} and evaluated["primary_metric"] == "ifeval.prompt_level_loose_acc"
    sft, dpo = evaluated["promotions"]["sft"], evaluated["promotions"]["dpo"]
    assert sft["alias"] == "champion" and sft["reason"] == "no champion yet"
    assert dpo["champion_version"] == sft["version"] and "by more than the combined stderr" in dpo["reason"]
    assert dpo["disagreements"]["items"] == evaluated["n_items"]["dpo"]
    dpo_version = client.get_model_version("lmcore-instruct", dpo["version"])
    assert "dpo" in dpo_version.aliases and dpo_version.tags["bench.sample_sha256"] == evaluated["sample_sha256"]
    assert "bench_settings.ifeval.max_gen_toks" in dpo_version.tags  # 8 of lm-eval's 1280: recorded, and in the card
    card = dpo_version.description
    assert "## Promotion" in card and "## Decontamination" in card and "max gen toks" in card
    champion = client.get_model_version_by_alias("lmcore-instruct", "champion")
    assert "### Last challenged" in client.get_model_version("lmcore-instruct", sft["version"]).description  # both sides

    # per item, for review: the prompt, the response, each instruction's verdicts
    run = client.get_run(evaluated["run_id"])
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables/instruct_eval/dpo")}
    assert tables == {"tables/instruct_eval/dpo/ifeval.json", "tables/instruct_eval/dpo/gsm8k.json"}
    rows = json.loads(open(client.download_artifacts(run.info.run_id, "tables/instruct_eval/dpo/ifeval.json", str(root / "t"))).read())
    assert {"prompt", "response", "inst_level_strict_acc", "inst_level_loose_acc"} <= set(rows["columns"])

    # a bare name is the champion
    from tasks.registry import download_model_dir

    folder = download_model_dir("models:/lmcore-instruct", uri, root / "bare")
    assert json.loads((folder / ".registered.json").read_text())["version"] == str(champion.version)
