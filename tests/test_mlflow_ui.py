"""Seen by a person: the MLflow UI shows the registered model, its versions and their aliases, each version's
model card, and the per-item tables of a run.

A real `mlflow server` holds three versions of `lmcore-base`, registered and promoted the product's way
(`tasks.registry.log_and_register`, `promote`, the cards of `tasks.cards`), and headless Chromium (Debian's
package, driven by Playwright) opens the pages of MLflow's React app and waits until they are rendered.

    .venv/bin/python -m pytest tests/test_mlflow_ui.py
    LMCORE_UI_SCREENSHOT=/tmp/registry.png .venv/bin/python -m pytest tests/test_mlflow_ui.py  # keep a picture

Without Chromium the test is skipped, except under CI (env CI set), where it fails: `.ci/run` installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import save_model
from lmcore.config import ModelConfig
from lmcore.io import sha256_file, write_json
from lmcore.model import GPT
from lmcore.model_card import card_facts
from lmcore.paths import CARD_FACTS, WEIGHTS
from lmcore.promotion import CHALLENGER, CHAMPION
from lmcore.tokenizer import get_tokenizer
from tasks import cards
from tasks.registry import log_and_register, promote, tag_scores
from tasks.tags import PROMOTION_ARTIFACT, TAG_PROMOTION_RUN, TAG_WEIGHTS_SHA
from tasks.tracking import Tracking
from tests.servers import mlflow_server

pytestmark = pytest.mark.slow

MODEL = "lmcore-base"
METRIC = "mmlu.acc"
# Chromium on a closed network: no sandbox as root, no GPU, and none of its background calls home
# (without these it retries Google's hosts at every start). See ../.library/env/machines/python.md.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# localStorage keys of MLflow 3.17's UI: keep the assistant panel and the registry promo dialog closed,
# so that neither covers the page on a first visit.
QUIET_UI = """
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
localStorage.setItem('_mlflow_model_registry_promo_modal_dismissed_v1', 'true');
"""
# The UI needs no background jobs (GenAI features); without them the server starts 7 fewer processes.
QUIET_SERVER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
TIMEOUT_MS = 60_000  # the app's first render, on two busy cores


def find_chromium() -> str | None:
    """LMCORE_CHROMIUM, else `chromium` on PATH (Debian's package: /usr/bin/chromium)."""
    return os.environ.get("LMCORE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def model_page(base_url: str, name: str = MODEL) -> str:
    return f"{base_url}/#/models/{name}"


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium under Playwright; skipped when none is installed, failed under CI."""
    path = find_chromium()
    if path is None:
        reason = "no chromium found (apt-get install chromium, or set LMCORE_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (.ci/run does)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(QUIET_UI)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def tiny_model(root: Path, seed: int) -> Path:
    """A random 2-layer lmcore model folder (GPT-2 vocabulary, width 32), as the trainer would leave it."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_embd=32, n_head=2, context_length=32))
    out = root / f"model-{seed}"
    save_model(model, out, extra={"tokenizer": "gpt2"})
    get_tokenizer("gpt2").save(out)
    write_json(out / CARD_FACTS, card_facts(out, kind="base", stage="pretrain", started_from="random weights", data={},
                                            training={"steps": 100 * seed, "final_val_loss": 4.0 - seed / 10, "final_val_bpb": 1.5}))
    return out


# The per-item table a benchmark run logs (tasks.runner: StageResult.item_tables), one row per item.
ITEMS = [
    {"task": "arc_easy", "doc_id": i, "prompt": f"Question: which gas do plants take in, case {i}?\nAnswer:",
     "choices": ["oxygen", "carbon dioxide"], "gold": 1, "pick": i % 2, "correct": i % 2 == 1}
    for i in range(5)
]
TABLE = "tables/benchmark_items/arc_easy.json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A server with `lmcore-base` v1..v3, promoted the pipeline's way: v1 is champion first, v2 beats it
    and takes the alias, v3 does not beat v2 and becomes challenger.

    Each version has its model card (refreshed as the pipeline does after every score and alias move), and the
    last benchmark run logs a per-item table.

    Returns: (server URL, {version: weights sha256}, {"experiment", "run"} of the benchmark run with the table).
    """
    import mlflow

    root = tmp_path_factory.mktemp("mlflow-ui")
    scores = {"1": 0.30, "2": 0.40, "3": 0.41}  # stderr 0.01 each: v3's lead is inside the combined stderr
    with mlflow_server(root / "server", env=QUIET_SERVER) as server:
        tracking = Tracking(uri=server.url, experiment="ui")
        shas = {}
        try:
            for seed, score in enumerate(scores.values(), start=1):
                model_dir = tiny_model(root, seed)
                sha = sha256_file(model_dir / WEIGHTS)
                with tracking.run("pretrain", tags={TAG_WEIGHTS_SHA: sha}) as run:
                    version = log_and_register(
                        tracking, run.run_id, model_dir, MODEL,
                        tags={TAG_WEIGHTS_SHA: sha},
                    )
                    cards.log_facts(run, model_dir)
                    cards.describe_model(tracking, "registered_model", MODEL)
                with tracking.run("benchmark") as bench:
                    bench.log_table(TABLE, ITEMS)
                    tag_scores(tracking, MODEL, version, {METRIC: score, f"{METRIC}_stderr": 0.01}, sample_sha256="sample")
                    decision = promote(tracking, MODEL, version, METRIC)
                    bench.client.log_text(bench.run_id, json.dumps(decision), PROMOTION_ARTIFACT)
                    bench.client.set_model_version_tag(MODEL, version, TAG_PROMOTION_RUN, bench.run_id)
                for v in [*shas, version]:  # the cards of every version whose alias may have moved
                    cards.refresh(tracking, MODEL, v)
                shas[version] = sha
            experiment = tracking.client().get_experiment_by_name("ui").experiment_id
        finally:  # log_and_register sets both process-wide
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
        assert sorted(shas) == sorted(scores)
        yield server.url, shas, {"experiment": experiment, "run": bench.run_id}


def version_row(page, version: str):
    return page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))


def test_model_page_shows_versions_with_their_aliases_and_tags(page, registry):  # browser first: skip before the server
    from playwright.sync_api import expect

    url, shas, _ = registry
    page.goto(model_page(url))
    expect(page.get_by_role("heading", name=MODEL)).to_be_visible()
    expect(page.get_by_role("columnheader", name="Aliases")).to_be_visible()
    # An alias chip reads "@ champion"; a tag reads "key: value" (promotion.alias: challenger is a tag).
    alias = re.compile(r"^@\s")
    expected = {"1": [], "2": [f"@ {CHAMPION}"], "3": [f"@ {CHALLENGER}"]}
    for version, chips in expected.items():
        row = version_row(page, version)
        expect(row).to_have_count(1)
        expect(row.get_by_text(alias)).to_have_text(chips)  # in order, and nothing else
        expect(row).to_contain_text(TAG_WEIGHTS_SHA)
        expect(row).to_contain_text(shas[version])
        expect(row).to_contain_text(f"bench.{METRIC}")
    if os.environ.get("LMCORE_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["LMCORE_UI_SCREENSHOT"])


def test_models_list_shows_the_registered_model(page, registry):
    from playwright.sync_api import expect

    url, _, _ = registry
    page.goto(f"{url}/#/models")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=MODEL, exact=True))
    expect(row).to_have_count(1)
    expect(row).to_contain_text("Version 3")  # the latest version
    expect(row.get_by_text(re.compile(r"^@\s")).first).to_be_visible()  # aliased versions are listed

    # and a click on the name opens the model's page
    row.get_by_role("link", name=MODEL, exact=True).click()
    expect(page).to_have_url(re.compile(re.escape(f"#/models/{MODEL}") + "$"))
    expect(version_row(page, "2").get_by_text(f"@ {CHAMPION}", exact=True)).to_be_visible()


def test_version_page_shows_the_model_card(page, registry):
    """The description of v2 is its card: its headings, its score and the promotion numbers against v1."""
    from playwright.sync_api import expect

    url, shas, _ = registry
    page.goto(f"{model_page(url)}/versions/2")
    expect(page.get_by_role("heading", name=f"{MODEL} v2")).to_be_visible()
    for heading in ("What it is", "Data", "Training", "Scores", "Promotion"):
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
    scores = page.get_by_role("row").filter(has_text="mmlu")
    expect(scores.first).to_contain_text("0.4000")
    expect(page.get_by_role("row").filter(has_text="champion v1").first).to_contain_text("0.3000 ± 0.0100")
    expect(page.get_by_text(shas["2"]).first).to_be_visible()
    if os.environ.get("LMCORE_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["LMCORE_UI_SCREENSHOT"].replace(".png", "-card.png"), full_page=True)


def test_run_table_artifact_shows_its_rows(page, registry):
    """A per-item table logged with the run opens as a table in the run's artifacts, a row per item."""
    from playwright.sync_api import expect

    url, _, bench = registry
    page.goto(f"{url}/#/experiments/{bench['experiment']}/runs/{bench['run']}/artifacts/{TABLE}")
    row = page.get_by_role("row").filter(has_text="case 3")
    expect(row.first).to_be_visible()
    expect(row.first).to_contain_text("carbon dioxide")
