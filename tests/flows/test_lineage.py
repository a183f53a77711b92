"""Lineage on the session's micro lifecycle run: every run's tags (git commit, params, Prefect flow run, the DVC
hashes of its inputs, checked against DVC itself), model versions linked to their data manifests, and
`lmcore lineage` from each registered model back to the raw sources; plus one stage run by `lmcore run` in a
real DVC project, checked against the dvc.lock that `dvc commit` writes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from lmcore.io import sha256_file
from lmcore.pipeline import NAMES as STAGE_NAMES
from lmcore.paths import MANIFEST, WEIGHTS, Layout
from tasks.tags import TAG_DVC_DEP, TAG_DVC_HASHED_BY, TAG_DVC_OUT
from tests.conftest import MICRO, ROOT

VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"  # profiles/micro.yaml's one source
# The runs behind a pretrained version, as lmcore.pipeline declares the stages: breadth first from the pretrain run
# (data/tokens, models/base_model), then tokenize's inputs (data/clean, models/tokenizer), then preprocess's (data/raw).
PRETRAIN_CHAIN = ["pretrain", "tokenize", "base_model", "preprocess", "train_tokenizer", "collect"]


def stage_runs(uri: str, parent_run_id: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lmcore-micro")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags["lmcore.stage"]: r for r in runs}


def dvc_add_md5(paths: list[Path], tmp: Path) -> dict[str, str]:
    """What DVC itself records for these folders: `dvc add` of copies in a throwaway DVC project."""
    repo = tmp / "dvc-add"
    repo.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    for path in paths:
        shutil.copytree(path, repo / path.name)
    names = [p.name for p in paths]
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", *names], cwd=repo, check=True, capture_output=True)
    return {name: yaml.safe_load((repo / f"{name}.dvc").read_text())["outs"][0]["md5"] for name in names}


def lineage(*args: str) -> object:
    return CliRunner().invoke(app, ["lineage", *args])


def test_every_run_carries_commit_params_flow_run_and_launcher(lifecycle_run):
    root, uri, result = lifecycle_run
    parent = MlflowClient(uri).get_run(result["mlflow_run_id"])
    runs = [parent, *stage_runs(uri, parent.info.run_id).values()]
    flow_run = parent.data.tags["lmcore.prefect_flow_run_id"]
    for run in runs:
        tags = run.data.tags
        assert tags["lmcore.git_commit"] and tags["lmcore.launcher"] == "prefect"
        assert tags["lmcore.params_sha256"] == parent.data.tags["lmcore.params_sha256"]
        assert tags["lmcore.prefect_flow_run_id"] == flow_run
    assert len(runs) == len(STAGE_NAMES) + 1  # the parent and one run a stage


def test_stage_runs_carry_the_dvc_hashes_of_their_inputs(lifecycle_run, tmp_path):
    root, uri, result = lifecycle_run
    runs = stage_runs(uri, result["mlflow_run_id"])
    layout = Layout(root)
    by_dvc = dvc_add_md5([layout.clean, layout.tokens], tmp_path)
    tokenize, pretrain = runs["tokenize"].data.tags, runs["pretrain"].data.tags
    assert tokenize[TAG_DVC_DEP + "data/clean"] == by_dvc["clean"] and by_dvc["clean"].endswith(".dir")
    assert pretrain[TAG_DVC_DEP + "data/tokens"] == by_dvc["tokens"]
    # code deps: DVC 3's md5 of a file is the md5 of its bytes; the code that ran is the checkout's
    for tags, code in ((tokenize, ["lmcore/data/tokenize.py", "lmcore/data/shards.py", "lmcore/tokenizer.py"]),
                       (pretrain, ["lmcore/model.py", "lmcore/training.py", "lmcore/data/loader.py"])):
        for path in code:
            assert tags[TAG_DVC_DEP + path] == hashlib.md5((ROOT / path).read_bytes()).hexdigest(), path
    assert tokenize[TAG_DVC_HASHED_BY].startswith("dvc_data: no DVC project at")
    assert len(tokenize["lmcore.dvc.deps_md5"]) == 32
    # outputs: what one stage wrote is what the next one read
    assert runs["tokenize"].data.tags[TAG_DVC_OUT + "data/tokens"] == by_dvc["tokens"]
    assert runs["preprocess"].data.tags[TAG_DVC_OUT + "data/clean"] == by_dvc["clean"]
    assert runs["collect"].data.tags[TAG_DVC_OUT + "data/raw"] == runs["preprocess"].data.tags[TAG_DVC_DEP + "data/raw"]
    assert not any(k.startswith("lmcore.dvc.") for k in MlflowClient(uri).get_run(result["mlflow_run_id"]).data.tags)


def test_model_versions_link_to_their_run_and_data_manifests(lifecycle_run):
    root, uri, result = lifecycle_run
    client = MlflowClient(uri, registry_uri=uri)
    layout = Layout(root)
    base = client.get_model_version("lmcore-base", "1")
    assert base.run_id == result["pretrain"]["run_id"]
    assert base.tags["lmcore.raw_manifest_sha256"] == sha256_file(layout.raw / MANIFEST)
    assert base.tags["lmcore.tokens_manifest_sha256"] == sha256_file(layout.tokens / MANIFEST)
    for folder in ("data/raw", "data/tokens"):
        local = Path(client.download_artifacts(base.run_id, f"{folder}/manifest.json"))
        assert sha256_file(local) == sha256_file(root / folder / MANIFEST)
    sft = client.get_model_version_by_alias("lmcore-instruct", "sft")
    manifest = layout.finetune_data("instruct") / "raw" / MANIFEST
    assert sft.tags["lmcore.finetune_manifest_sha256"] == sha256_file(manifest)
    assert sft.tags["lmcore.base_weights_sha256"] == base.tags["lmcore.weights_sha256"]
    logged = client.download_artifacts(sft.run_id, "data/finetune/raw/manifest.json")
    assert sha256_file(Path(logged)) == sha256_file(manifest)


def test_lineage_of_the_base_model_reaches_the_raw_sources(lifecycle_run, monkeypatch):
    root, uri, result = lifecycle_run
    monkeypatch.chdir(root)  # the project's store: <root>/mlflow.db
    out = lineage("models:/lmcore-base/1", "--json")
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    chain = got["chain"]
    assert [n["kind"] for n in chain] == ["model_version", "run", "tokens_manifest", *["run"] * 5, "raw_sources"]
    assert [n["stage"] for n in chain if n["kind"] == "run"] == PRETRAIN_CHAIN
    assert got["warnings"] == []
    version, pretrain, tokens, tokenize, base_model, preprocess, train_tokenizer, collect, raw = chain
    layout = Layout(root)
    runs = stage_runs(uri, result["mlflow_run_id"])
    assert (version["name"], version["version"], version["aliases"]) == ("lmcore-base", "1", ["champion"])
    assert version["weights_sha256"] == sha256_file(layout.pretrained / WEIGHTS)
    assert pretrain["run_id"] == result["pretrain"]["run_id"]
    assert pretrain["prefect_flow_run_id"] and pretrain["git_commit"] and pretrain["params_sha256"]
    assert pretrain["launcher"] == "prefect"
    assert pretrain["dvc"]["deps"]["data/tokens"] == runs["pretrain"].data.tags[TAG_DVC_DEP + "data/tokens"]
    assert tokens["sha256"] == sha256_file(layout.tokens / MANIFEST) and tokens["verified"] is True
    manifest = json.loads((layout.tokens / MANIFEST).read_text())
    assert tokens["shards"] == len(manifest["shards"])
    assert tokens["tokens"] == {"train": result["tokenize"]["train_tokens"], "val": result["tokenize"]["val_tokens"]}
    assert [n["run_id"] for n in chain if n["kind"] == "run"] == [runs[s].info.run_id for s in PRETRAIN_CHAIN]
    assert base_model["found_by"] == "its models/base_model output hash equals the pretrain run's input"
    assert train_tokenizer["found_by"] == "its models/tokenizer output hash equals the tokenize run's input"
    assert collect["found_by"] == "its data/raw output hash equals the preprocess run's input"
    assert preprocess["documents_kept"] == result["preprocess"]["documents"]
    assert tokenize["tokens"] == tokens["tokens"] and collect["sources"] == 1  # what each run counted
    assert raw["manifest_sha256"] == sha256_file(layout.raw / MANIFEST) and raw["verified"] is True
    (verdict,) = raw["sources"]
    assert verdict["name"] == "the-verdict" and verdict["sha256"] == VERDICT_SHA256
    assert verdict["url"].endswith("the-verdict.txt") and verdict["license"].startswith("public domain")
    assert verdict["origin"] == "mirror"

    text = lineage("models:/lmcore-base@champion")  # for people
    assert text.exit_code == 0, text.output
    for expected in ("model version  lmcore-base v1  @champion", "run  pretrain", "run  collect", "the-verdict",
                     VERDICT_SHA256, "data/tokens", pretrain["git_commit"]):
        assert expected in text.output, expected


@pytest.mark.parametrize(
    ("uri", "names"),
    [
        ("models:/lmcore-instruct@dpo", ["lmcore-instruct@dpo", "lmcore-instruct@sft", "lmcore-base@champion"]),
        ("models:/lmcore-instruct@sft", ["lmcore-instruct@sft", "lmcore-base@champion"]),
        ("models:/lmcore-classifier/1", ["lmcore-classifier@", "lmcore-base@champion"]),
    ],
)
def test_fine_tunes_chain_through_their_base_models(lifecycle_run, monkeypatch, uri, names):
    root, uri_store, result = lifecycle_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri_store)
    out = lineage(uri, "--json")
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    chain = got["chain"]
    versions = [n for n in chain if n["kind"] == "model_version"]
    # the fine-tunes' own markers (@sft, @dpo); whether a fine-tune also holds its family's @champion or
    # @challenger is the gate's business (tests/flows/test_lifecycle.py)
    gated = {"champion", "challenger"}
    assert [f"{v['name']}@{','.join(a for a in v['aliases'] if v['name'] == 'lmcore-base' or a not in gated)}"
            for v in versions] == names
    stages = [n["stage"] for n in chain if n["kind"] == "run"]
    finetunes = {"lmcore-instruct@dpo": "dpo", "lmcore-instruct@sft": "finetune_instruct", "lmcore-classifier@": "finetune_classifier"}
    assert stages == [finetunes[n] for n in names[:-1]] + PRETRAIN_CHAIN
    # each fine-tune's base is the version whose weights its run started from
    for child, base in zip(versions, versions[1:]):
        assert child["base_weights_sha256"] == base["weights_sha256"]
    assert sum(n["kind"] == "finetune_sources" for n in chain) == len(names) - 1
    assert chain[-1]["kind"] == "raw_sources" and chain[-1]["sources"][0]["sha256"] == VERDICT_SHA256
    assert got["warnings"] == []
    if uri.endswith("@dpo"):
        assert versions[0]["version"] == str(result["dpo"]["model_version"])
        assert chain[1]["run_id"] == result["dpo"]["run_id"]
        assert chain[1]["dvc"]["deps"]["models/instruct"].endswith(".dir")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/nope/1", "no registered model named 'nope'"),
        ("models:/lmcore-base/99", "lmcore-base has no version 99 (versions: 1)"),
        ("models:/lmcore-base@nope", "lmcore-base has no alias @nope"),
        ("lmcore-base", "expected models:/<name>/<version> or models:/<name>@<alias>"),
    ],
)
def test_unknown_model_version_or_alias_is_a_clear_error(lifecycle_run, monkeypatch, uri, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", lifecycle_run[1])
    out = lineage(uri)
    assert out.exit_code == 2
    assert message in out.output and "Traceback" not in out.output


def test_a_stage_run_by_lmcore_run_in_a_dvc_project_matches_dvc_lock(lifecycle_run, tmp_path, monkeypatch):
    """`lmcore run tokenize` (the `lmcore-stage` flow, as `dvc repro` runs it) in a git + DVC project: its run's
    dependency and output hashes are what `dvc commit` then writes to dvc.lock."""
    root, _, _ = lifecycle_run
    project = tmp_path / "project"
    shutil.copytree(ROOT / "lmcore", project / "lmcore", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Layout(root).clean, project / "data" / "clean")
    shutil.copytree(Layout(root).base_source, project / "models" / "base_model")  # a dep of tokenize (base.json: scratch)
    shutil.copytree(Layout(root).tokenizer, project / "models" / "tokenizer")  # another (micro tokenizes with GPT-2's)
    for src, dst in ((ROOT / "dvc.yaml", "dvc.yaml"), (MICRO, "params.yaml")):
        shutil.copy2(src, project / dst)
    (project / ".gitignore").write_text("/data/\n/models/\n/mlflow.db\n/mlartifacts/\n__pycache__/\n")
    git = ["git", "-c", "user.name=lmcore-test", "-c", "user.email=test@lmcore.invalid"]
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(project)  # MLflow's artifacts go to ./mlartifacts

    out = CliRunner().invoke(app, ["run", "tokenize", "--root", str(project)])
    assert out.exit_code == 0, out.output
    subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "-q", "tokenize"], cwd=project, check=True, capture_output=True)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["tokenize"]

    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("lmcore-micro").experiment_id])
    tags = run.data.tags
    assert tags["lmcore.stage"] == "tokenize" and tags["lmcore.launcher"] == "stage"
    assert tags["lmcore.prefect_flow_run_id"] and tags["lmcore.git_commit"].startswith(commit)
    assert tags[TAG_DVC_HASHED_BY] == f"dvc: the DVC project at {project.resolve()}"
    assert {k[len(TAG_DVC_DEP):]: v for k, v in tags.items() if k.startswith(TAG_DVC_DEP)} == {d["path"]: d["md5"] for d in lock["deps"]}
    assert {k[len(TAG_DVC_OUT):]: v for k, v in tags.items() if k.startswith(TAG_DVC_OUT)} == {o["path"]: o["md5"] for o in lock["outs"]}


def test_lineage_shows_where_a_model_came_from_without_the_credentials_in_its_urls(tmp_path, monkeypatch):
    """A pretrained base fetched from URLs with credentials (user:password@, ?token=, a signed S3 link), registered in
    a SQLite store: `lmcore lineage`, for people and as JSON, names the hosts and paths and none of the secrets; so
    does `render` for a chain someone else built (the tracking URI, a warning)."""
    from io import StringIO

    from rich.console import Console

    from lmcore.stages import BASE_MANIFEST_DIR
    from tasks.lineage_print import render
    from tasks.tags import TAG_BASE_MANIFEST_SHA, TAG_ORIGIN, TAG_STAGE, TAG_WEIGHTS_SHA

    secrets = ("hf-pass", "tok-1", "sig-2", "mlflow-pass")
    manifest = tmp_path / "base" / "base.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({
        "source": "https://hf-user:hf-pass@models.example/SmolLM2?token=tok-1", "name": "smol", "license": "apache-2.0",
        "architecture": "llama", "parameters": 135, "tokenizer": {"name": "smol"},
        "files": [{"file": "model.gguf", "url": "https://bucket.s3.example/m.gguf?X-Amz-Signature=sig-2&X-Amz-Date=1",
                   "path": None, "sha256": "ab" * 32, "origin": "download", "bytes": 10}],
    }))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # not a registry URI another test left set
    experiment = client.create_experiment("lineage", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment, tags={TAG_STAGE: "base_model", TAG_ORIGIN: "base_model",
                                              TAG_BASE_MANIFEST_SHA: sha256_file(manifest)})
    client.log_artifact(run.info.run_id, str(manifest), BASE_MANIFEST_DIR)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("smol")
    client.create_model_version("smol", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id, tags={TAG_WEIGHTS_SHA: "cd" * 32})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    text, as_json = lineage("models:/smol/1"), lineage("models:/smol/1", "--json")
    assert text.exit_code == 0 and as_json.exit_code == 0, text.output + as_json.output
    (base,) = [n for n in json.loads(as_json.output)["chain"] if n["kind"] == "base_model"]
    assert base["verified"] is True  # the manifest read is the one logged; only what is shown is masked
    assert base["source"] == "https://***@models.example/SmolLM2?token=***"
    assert base["files"][0]["url"] == "https://bucket.s3.example/m.gguf?X-Amz-Signature=***&X-Amz-Date=1"
    assert "https://***@models.example/SmolLM2?token=***" in text.output and "https://bucket.s3.example/m.gguf" in text.output
    out = StringIO()
    render({"model": "models:/smol/1", "tracking_uri": "https://ci:mlflow-pass@mlflow.example", "chain": [],
            "warnings": ["https://ci:mlflow-pass@mlflow.example: slow"]}, Console(file=out, soft_wrap=True))
    assert "https://***@mlflow.example" in out.getvalue()
    assert not [s for s in secrets if s in text.output + as_json.output + out.getvalue()]
