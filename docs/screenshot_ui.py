"""Pictures of the MLflow UI for the README: a registered version's page with its model card
(docs/images/mlflow-model-card.png), or a registered model's versions (docs/images/mlflow-registry.png).

    .venv/bin/python docs/screenshot_ui.py                       # lmcore-base's champion and its card, from ./mlflow.db
    .venv/bin/python docs/screenshot_ui.py --version 2           # another version
    .venv/bin/python docs/screenshot_ui.py --versions --out docs/images/mlflow-registry.png   # the versions table
    .venv/bin/python docs/screenshot_ui.py --model lmcore-instruct --out /tmp/instruct.png

Starts `mlflow server` on a copy of the project's store (the store itself is only read, through SQLite's
backup API), opens the page in headless Chromium (Debian's package, driven by Playwright, as in
tests/test_mlflow_ui.py) and saves a PNG once it is rendered: for a version, once the card's headings are.

A version of a pipeline-run model carries some forty tags (hashes, eval and benchmark scores, the
promotion decision), so the UI draws each version row some thousand pixels tall. To show every version in
one picture, each row's tag list is cut to its first --tag-lines lines, faded out at the cut; the UI
itself shows them all. --tag-lines 0 keeps the page as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import BIN, background, free_port, wait_http
from tests.test_mlflow_ui import (
    CHROMIUM_FLAGS,
    QUIET_SERVER,
    QUIET_UI,
    find_chromium,
    model_page,
)

TAG_LINE_PX = 24  # one key-value tag chip in the versions table
# The versions table's tag cells; each tag is a chip rendered by MLflow's KeyValueTag component.
CLIP_TAGS = """
div[role="cell"]:has([data-component-id*="keyvaluetag"]) {
    max-height: %dpx; overflow: hidden;
    -webkit-mask-image: linear-gradient(to bottom, black 70%%, transparent);
}
"""


def copy_store(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite store that another process may be writing."""
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(dst) as target:
        source.backup(target)


def champion(db: Path, model: str) -> str:
    """The version holding @champion (else the newest) in a SQLite store."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        row = con.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = 'champion'", (model,)).fetchone()
        row = row or con.execute("SELECT MAX(version) FROM model_versions WHERE name = ?", (model,)).fetchone()
    if row is None or row[0] is None:
        raise SystemExit(f"{db}: no version of {model}")
    return str(row[0])


@contextlib.contextmanager
def browser_page(width: int, height: int) -> Iterator:
    """A page of headless Chromium (the test's flags, MLflow's one-time dialogs marked seen), closed after."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no chromium found (apt-get install chromium, or set LMCORE_CHROMIUM)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, locale="en-US", timezone_id="UTC")
            context.add_init_script(QUIET_UI)
            context.set_default_timeout(60_000)
            yield context.new_page()
        finally:
            browser.close()


def card_shot(page, base_url: str, model: str, version: str) -> None:
    """The version's page once its card is rendered: its title and its sections down to the scores."""
    from playwright.sync_api import expect

    page.goto(f"{model_page(base_url, model)}/versions/{version}")
    expect(page.get_by_role("heading", name=f"{model} v{version}")).to_be_visible()
    expect(page.get_by_role("heading", name="Scores", exact=True)).to_be_visible()
    page.wait_for_timeout(1000)  # the aliases arrive with the version; the app polls, never idles


def versions_shot(page, base_url: str, model: str, tag_lines: int) -> None:
    """The model's page once its versions and their aliases are rendered, each row's tags cut to `tag_lines`."""
    from playwright.sync_api import expect

    page.goto(model_page(base_url, model))
    expect(page.get_by_role("heading", name=model)).to_be_visible()
    expect(page.get_by_role("link", name="Version 1", exact=True)).to_be_visible()
    expect(page.get_by_role("columnheader", name="Aliases")).to_be_visible()
    page.wait_for_timeout(1000)  # the alias chips arrive with the versions; the app polls, never idles
    if tag_lines:
        page.add_style_tag(content=CLIP_TAGS % (tag_lines * TAG_LINE_PX))
    page.wait_for_timeout(500)  # let the table settle after the style change


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=ROOT / "mlflow.db", help="the MLflow SQLite store (only read)")
    parser.add_argument("--model", default="lmcore-base")
    parser.add_argument("--version", help="the version whose card to show (default: the champion, else the newest)")
    parser.add_argument("--versions", action="store_true", help="the model's versions table instead of a card")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "mlflow-model-card.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--tag-lines", type=int, default=5, help="tags shown per version row; 0: all")
    args = parser.parse_args(argv)
    if not args.db.is_file():
        raise SystemExit(f"{args.db}: no such store (make pipeline writes one)")

    with tempfile.TemporaryDirectory(prefix="lmcore-ui-") as tmp:
        work = Path(tmp)
        copy_store(args.db, work / "mlflow.db")
        port, log = free_port(), work / "mlflow-server.log"
        cmd = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "artifacts"),
        ]
        env = {**os.environ, **QUIET_SERVER, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with background(cmd, log, env=env) as proc:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", proc, log, timeout=120)
            with browser_page(args.width, args.height) as page:
                if args.versions:
                    versions_shot(page, url, args.model, args.tag_lines)
                else:
                    card_shot(page, url, args.model, args.version or champion(work / "mlflow.db", args.model))
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
