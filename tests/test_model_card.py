"""Model cards: the card a model-making stage writes into its folder (lmcore.model_card), and the registry's
copy (tasks.cards): a version's description rendered with its scores and aliases, replaced when they change.
Real stages on the micro profile, a real MLflow SQLite registry."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmcore.config import load_params
from lmcore.io import read_json
from lmcore.model import GPT
from lmcore.model_card import card_facts, render
from lmcore.paths import CARD, CARD_FACTS, MANIFEST, WEIGHTS, Layout
from lmcore.promotion import Adaptation
from lmcore.stages import StageContext
from lmcore.stages import collect as collect_stage
from lmcore.stages import preprocess as preprocess_stage
from lmcore.stages import pretrain as pretrain_stage
from lmcore.stages import tokenize as tokenize_stage
from tasks import cards
from tasks.registry import log_and_register, promote, tag_scores
from tasks.tracking import Tracking
from tests.conftest import MICRO

HEADINGS = ["## What it is", "## Data", "## Training", "## Scores"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A root where collect, preprocess, tokenize and pretrain (6 steps) ran on the micro profile."""
    root = tmp_path_factory.mktemp("card")
    ctx = StageContext(root=root, params=load_params(MICRO, overrides=["pretrain.max_steps=6", "pretrain.eval_interval=3"]))
    for stage in (collect_stage, preprocess_stage, tokenize_stage):
        stage.run(ctx)
    pretrain_stage.run(ctx)
    return root


def headings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("## ")]


def test_pretrain_writes_the_card_into_the_model_folder(trained):
    layout = Layout(trained)
    text = (layout.pretrained / CARD).read_text()
    facts = read_json(layout.pretrained / CARD_FACTS)
    assert text == render(facts)
    assert text.startswith("# lmcore base model\n")
    assert headings(text) == HEADINGS  # no registry yet: no promotion
    from lmcore.checkpoint import load_model

    model: GPT = load_model(layout.pretrained)
    assert facts["model"]["parameters"] == model.num_params()
    assert f"| parameters | {model.num_params():,} |" in text
    assert "GPT-2-style decoder: 2 layers, 2 heads, width 32, context 32" in text
    summary = read_json(layout.pretrain_reports / "summary.json")
    assert facts["training"]["steps"] == summary["steps"] == 6
    assert f"{summary['final_val_loss']:.4f} nats/token ({summary['final_val_bpb']:.4f} bits/byte)" in text
    # the data it saw: each source of the raw manifest, with its licence, and the manifest's hash
    manifest = read_json(layout.raw / MANIFEST)
    for source in manifest["sources"]:
        assert re.search(rf"\| {re.escape(source['name'])} \| {re.escape(source['license'])} \|", text)
    assert facts["data"]["corpus"]["manifest_sha256"][:12] in text
    assert facts["tokens"] == {"train": summary["train_tokens"], "val": summary["val_tokens"]}
    assert "train_time" not in json.dumps(facts) and "wall" not in text  # no timings: the folder stays reproducible


def test_the_card_is_the_same_for_the_same_inputs(trained, tmp_path):
    layout = Layout(trained)
    before = (layout.pretrained / CARD).read_bytes(), (layout.pretrained / CARD_FACTS).read_bytes()
    root = tmp_path / "again"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("models"))
    pretrain_stage.run(StageContext(root=root, params=load_params(MICRO, overrides=["pretrain.max_steps=6", "pretrain.eval_interval=3"])))
    again = Layout(root).pretrained
    assert ((again / CARD).read_bytes(), (again / CARD_FACTS).read_bytes()) == before


def registered(trained: Path, tracking: Tracking, tmp_path: Path, seed: int) -> tuple[str, str]:
    """A copy of models/base (weights perturbed by `seed`) registered as lmcore-base the pipeline's way (facts
    logged with the run, then the card refreshed); returns (version, run id)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / f"model-{seed}"
    shutil.copytree(Layout(trained).pretrained, folder)
    state = load_file(folder / WEIGHTS)
    state = {k: v + seed * 1e-3 * torch.ones_like(v) for k, v in state.items()}
    save_file(state, folder / WEIGHTS)
    facts = card_facts(folder, kind="base", stage="pretrain", started_from="random weights", data={}, training={"steps": seed})
    (folder / CARD_FACTS).write_text(json.dumps(facts))
    with tracking.run("pretrain") as run:
        version = log_and_register(tracking, run.run_id, folder, "lmcore-base", tags={})
        assert cards.log_facts(run, folder)
        cards.describe_model(tracking, "registered_model", "lmcore-base")
        cards.refresh(tracking, "lmcore-base", version)
    return version, run.run_id


def test_the_registry_card_follows_scores_and_aliases(trained, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(uri=uri, experiment="cards")
    client = MlflowClient(uri, registry_uri=uri)
    v1, run1 = registered(trained, tracking, tmp_path, 1)
    card = client.get_model_version("lmcore-base", v1).description
    assert card.startswith("# lmcore-base v1\n") and headings(card) == HEADINGS + ["## Promotion"]
    assert "Not scored yet." in card and "Not put through the promotion gate yet." in card
    assert re.search(r"\| wall time \| \d+ s \(the pretrain run\) \|", card)
    model = client.get_registered_model("lmcore-base").description
    assert "`@champion`" in model and "`@challenger`" in model and "`pretrain`:" in model

    def scored(version: str, value: float, bench_run: str, adaptation=None) -> dict:
        tag_scores(tracking, "lmcore-base", version, {"arc_easy.acc": value, "arc_easy.acc_stderr": 0.01}, "s1")
        decision = promote(tracking, "lmcore-base", version, "arc_easy.acc", adaptation=adaptation)
        client.log_text(bench_run, json.dumps(decision), "promotion.json")
        client.set_model_version_tag("lmcore-base", version, "promotion.run_id", bench_run)
        for v in ("1", "2"):
            if client.search_model_versions(f"name = 'lmcore-base' and version_number = {v}"):
                cards.refresh(tracking, "lmcore-base", v)
        return decision

    with tracking.run("benchmark") as bench:
        scored(v1, 0.30, bench.run_id)
    card = client.get_model_version("lmcore-base", v1).description
    assert "`@champion`" in card.splitlines()[2]
    assert "| arc_easy | acc | 0.3000 | 0.0100 |" in card
    assert "`@champion`: no champion yet." in card

    v2, _ = registered(trained, tracking, tmp_path, 2)
    with tracking.run("benchmark") as bench:
        decision = scored(v2, 0.40, bench.run_id, adaptation=Adaptation(before=1.9, after=1.8, stderr=0.01))
    assert decision["alias"] == "champion"
    new, old = (client.get_model_version("lmcore-base", v).description for v in (v2, v1))
    assert "`@champion`" in new.splitlines()[2] and "| champion v1 | 0.3000 ± 0.0100 |" in new
    # continued pretraining: the held-out bits per byte it bought beside the benchmark change it cost
    assert "| held-out bits per byte of the corpus (before: the champion's) | 1.9000 -> 1.8000 (-0.1000 ± 0.0100) |" in new
    assert "| difference | +0.1000 |" in new
    assert old.splitlines()[2].startswith("no alias")  # the alias moved: v1's card says so
    # replaced, not appended: one card, and the run's MODEL_CARD.md is the same text
    assert old.count("## What it is") == 1 and new.count("# lmcore-base v2") == 1
    assert Path(client.download_artifacts(run1, CARD, str(tmp_path))).read_text() == old
    assert cards.refresh(tracking, "lmcore-base", v1) == old  # nothing changed: the same card


def test_hf_export_carries_the_card(trained, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from lmcore.hf import export_hf

    folder = Layout(trained).pretrained
    export_hf(folder, tmp_path / "hf")
    card = (folder / CARD).read_text()
    assert (tmp_path / "hf" / CARD).read_text() == card
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: transformers\n") and readme.endswith(card)

    # a registered version: its registry card, scores and aliases included
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(uri=uri, experiment="cards")
    version, _ = registered(trained, tracking, tmp_path, 3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = CliRunner().invoke(app, ["export-hf", f"models:/lmcore-base/{version}", str(tmp_path / "hf-registered")])
    assert out.exit_code == 0, out.output
    exported = (tmp_path / "hf-registered" / CARD).read_text()
    assert exported.startswith(f"# lmcore-base v{version}\n")
    assert exported == MlflowClient(uri, registry_uri=uri).get_model_version("lmcore-base", version).description
