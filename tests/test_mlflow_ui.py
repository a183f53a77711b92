"""Seen by a person: the MLflow UI shows the registered model, its versions and their aliases.

A real `mlflow server` holds three versions of `lmcore-base`, registered the product's way
(`tasks.registry.log_and_register`), and headless Chromium (Debian's package, driven by Playwright)
opens the registry pages of MLflow's React app and waits until they are rendered.

    .venv/bin/python -m pytest tests/test_mlflow_ui.py
    LMCORE_UI_SCREENSHOT=/tmp/registry.png .venv/bin/python -m pytest tests/test_mlflow_ui.py  # keep a picture

Without Chromium the test is skipped, except under CI (env CI set), where it fails: `.ci/run` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import save_model
from lmcore.config import ModelConfig
from lmcore.io import sha256_file
from lmcore.model import GPT
from lmcore.paths import WEIGHTS
from lmcore.promotion import CHALLENGER, CHAMPION
from tasks.registry import log_and_register, promote, tag_scores
from tasks.tags import TAG_WEIGHTS_SHA
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
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A server with `lmcore-base` v1..v3, promoted the pipeline's way: v1 is champion first, v2 beats it
    and takes the alias, v3 does not beat v2 and becomes challenger.

    Returns: (server URL, {version: weights sha256}).
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
                tag_scores(tracking, MODEL, version, {METRIC: score, f"{METRIC}_stderr": 0.01}, sample_sha256="sample")
                promote(tracking, MODEL, version, METRIC)
                shas[version] = sha
        finally:  # log_and_register sets both process-wide
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
        assert sorted(shas) == sorted(scores)
        yield server.url, shas


def version_row(page, version: str):
    return page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))


def test_model_page_shows_versions_with_their_aliases_and_tags(page, registry):  # browser first: skip before the server
    from playwright.sync_api import expect

    url, shas = registry
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

    url, _ = registry
    page.goto(f"{url}/#/models")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=MODEL, exact=True))
    expect(row).to_have_count(1)
    expect(row).to_contain_text("Version 3")  # the latest version
    expect(row.get_by_text(re.compile(r"^@\s")).first).to_be_visible()  # aliased versions are listed

    # and a click on the name opens the model's page
    row.get_by_role("link", name=MODEL, exact=True).click()
    expect(page).to_have_url(re.compile(re.escape(f"#/models/{MODEL}") + "$"))
    expect(version_row(page, "2").get_by_text(f"@ {CHAMPION}", exact=True)).to_be_visible()
