"""Scheduled runs do only what changed and carry the model forward (the fast half; tests/test_incremental_dvc.py
runs whole pipelines against `dvc repro`).

- DVC decides: a stage's status against dvc.lock, computed by DVC in a real DVC project, is "unchanged" after
  its commit and names what changed after a params edit or a new file in a folder source;
- the local paths params name are dvc.yaml deps of the stage that reads them;
- one run at a time per root: a second is turned away with one line naming the holder, or waits for it;
- `pretrain.init: champion` continues the registered champion with the continued schedule and numbers its steps
  on from the champion's, and falls back (with a warning) when there is none or it is another architecture.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.dvc_yaml import render, render_for
from lmcore import pipeline
from lmcore.checkpoint import read_model_config, save_model
from lmcore.config import ModelConfig, TokenizeConfig, load_params
from lmcore.data.tokenize import tokenize
from lmcore.errors import NotRegisteredError
from lmcore.io import sha256_file, write_json
from lmcore.model import GPT
from lmcore.paths import REGISTERED, WEIGHTS, Layout
from lmcore.stages import CONTINUED_WEIGHTS_SHA, StageContext
from lmcore.stages.pretrain import run as pretrain_stage
from lmcore.tokenizer import get_tokenizer, load_tokenizer
from lmcore.tracking import ListTracker
from tasks.incremental import Plan, RootBusyError, changed_keys, describe, registry_moves, root_lock
from tasks.tags import TAG_REGISTRY_DEPS, TAG_START_WEIGHTS_SHA, TAG_WEIGHTS_SHA
from tasks.tracking import Tracking
from tests.conftest import MICRO, ROOT, SHARED
from tests.test_pretrain_base import documents

# -- DVC decides --------------------------------------------------------------------------------------------


def test_describe_puts_dvc_status_on_one_line():
    changes = [{"changed deps": {"data/raw": "modified", **{f"lmcore/m{i}.py": "modified" for i in range(5)},
                                 "params.yaml": {"dpo": "modified"}}},
               {"changed outs": {"reports/dpo": "not in cache"}}, "always changed"]
    assert describe(changes) == ("deps data/raw modified, lmcore/m0.py modified, lmcore/m1.py modified, "
                                 "lmcore/m2.py modified (+2 more); params dpo modified; outs reports/dpo not in cache; always changed")


def test_local_paths_named_in_params_are_deps_of_the_stage_reading_them(tmp_path):
    assert render_for(ROOT) == (ROOT / "dvc.yaml").read_text(encoding="utf-8")  # the default names no local path
    data = yaml.safe_load(MICRO.read_text())
    data["collect"]["sources"] += [{"name": "notes", "path": "corpus"}, {"name": "wiki", "path": "docs/**/*.md"},
                                   {"name": "far", "path": str(tmp_path.parent / "elsewhere" / "a.txt")}]
    data["finetune_instruct"] = {**data.get("finetune_instruct", {}), "source": {"name": "mine", "path": "./data/mine.json"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    stages = yaml.safe_load(render_for(tmp_path))["stages"]
    assert stages["collect"]["deps"][:3] == ["corpus", "docs", str((tmp_path.parent / "elsewhere" / "a.txt").resolve())]
    assert "data/mine.json" in stages["finetune_instruct"]["deps"]
    assert not {"corpus", "docs"} & set(stages["preprocess"]["deps"])
    assert yaml.safe_load(render())["stages"]["collect"]["deps"][0].startswith("lmcore/")


@pytest.fixture
def dvc_project(tmp_path) -> Path:
    """A git + DVC project holding the code (the stages' code deps), micro params with a folder source, and the
    dvc.yaml written for them."""
    root = tmp_path / "project"
    shutil.copytree(ROOT / "lmcore", root / "lmcore", ignore=shutil.ignore_patterns("__pycache__"))
    data = yaml.safe_load(MICRO.read_text())
    data["collect"]["sources"] = [{"name": "notes", "path": "corpus", "license": "test"}]
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("The first document of the folder source, long enough to keep.\n")
    (root / "dvc.yaml").write_text(render_for(root))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root


def test_dvc_status_decides_each_stage(dvc_project):
    from lmcore.stages.collect import run as collect

    root = dvc_project
    plan = Plan.open(root, root / "params.yaml", None)
    assert plan.checks
    first = plan.decide("collect")
    assert first.run and "outs data/raw deleted" in first.reason  # never run: nothing in dvc.lock
    collect(StageContext(root=root, params=load_params(root / "params.yaml")))
    assert plan.commit("collect")
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["collect"]["outs"][0]["path"] == "data/raw"
    assert not plan.decide("collect").run  # committed: unchanged
    # a registry dep that moved (tasks.incremental.registry_moves) is asked only of a stage DVC finds unchanged
    moved = plan.decide("collect", lambda: ["models:/m@champion: m v1 -> m v2"])
    assert moved.run and moved.reason == "changed: registry models:/m@champion: m v1 -> m v2"

    (root / "corpus" / "b.txt").write_text("A new document in the folder source.\n")
    assert plan.decide("collect").reason == "changed: deps corpus modified"
    (root / "corpus" / "b.txt").unlink()
    assert not plan.decide("collect").run  # the same bytes again: unchanged

    data = yaml.safe_load((root / "params.yaml").read_text())
    data["collect"]["retries"] = 5
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    assert plan.decide("collect").reason == "changed: params collect.retries modified"  # as the stage's MLflow run logs it
    assert Plan.open(root, root / "params.yaml", None, force=True).decide("collect").reason == "forced"
    assert Plan.open(root, MICRO, None).decide("collect").reason.startswith("not checked: the run uses")
    assert Plan.open(root, root / "params.yaml", ["seed=1"]).decide("collect").reason == "not checked: the run overrides params (seed=1)"
    assert plan.ran == ["collect", "collect", "collect", "collect"] and plan.skipped == ["collect", "collect"]


def test_the_reason_names_the_changed_params_keys_as_mlflow_logs_them(tmp_path):
    lock = {"stages": {"tokenize": {"params": {"params.yaml": {"seed": 1, "tokenize": {"val_fraction": 0.1, "runner": "local",
                                                                                     "dask": {"workers": 2}, "shards": [1, 2]}}}}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "tokenize": {"val_fraction": 0.2, "runner": "local",
                                                                                  "dask": {"workers": 4}, "shards": [1, 3], "new": 1}}))
    keys = changed_keys(tmp_path, "tokenize")
    assert keys == {"seed": [], "tokenize": ["tokenize.dask.workers", "tokenize.new", "tokenize.shards", "tokenize.val_fraction"]}
    changes = [{"changed deps": {"params.yaml": {"tokenize": "modified"}}}]
    assert describe(changes, keys) == "params tokenize.dask.workers, tokenize.new, tokenize.shards, tokenize.val_fraction modified"
    assert describe(changes) == "params tokenize modified"  # no dvc.lock entry to compare: DVC's own word


def test_a_registry_dep_that_moved_is_a_change(tmp_path):
    """pretrain.init: champion reads the registry: when the champion is another version than the one the run that made
    the outputs continued, the stage is changed though DVC finds its files unchanged."""
    tracking = Tracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="registry-deps")
    client, uri = tracking.client(), "models:/lmcore-base@champion"
    assert registry_moves(tracking, None, ()) == []
    assert registry_moves(tracking, None, (uri,)) == []  # no champion then, none now
    client.create_registered_model("lmcore-base")
    for _ in range(2):
        client.create_model_version("lmcore-base", source=str(tmp_path))
    client.set_registered_model_alias("lmcore-base", "champion", "1")
    assert registry_moves(tracking, None, (uri,)) == [f"{uri}: none -> lmcore-base v1"]
    with tracking.run("pretrain") as run:
        run.set_tags({TAG_REGISTRY_DEPS: json.dumps({uri: "lmcore-base v1"})})
    assert registry_moves(tracking, run.run_id, (uri,)) == []
    client.set_registered_model_alias("lmcore-base", "champion", "2")
    assert registry_moves(tracking, run.run_id, (uri,)) == [f"{uri}: lmcore-base v1 -> lmcore-base v2"]
    # the champion is the model that run made (v3, promoted since), or the base it started from (v4, registered as
    # the first champion since): no move, the run would start where it did
    with tracking.run("pretrain") as made:
        made.set_tags({TAG_REGISTRY_DEPS: "{}", TAG_WEIGHTS_SHA: "w" * 64, TAG_START_WEIGHTS_SHA: "b" * 64})
    for version, sha in (("3", "w" * 64), ("4", "b" * 64)):
        client.create_model_version("lmcore-base", source=str(tmp_path), tags={TAG_WEIGHTS_SHA: sha})
        client.set_registered_model_alias("lmcore-base", "champion", version)
        assert registry_moves(tracking, made.run_id, (uri,)) == []
    assert registry_moves(tracking, run.run_id, (uri,)) == [f"{uri}: lmcore-base v1 -> lmcore-base v4"]


def test_summary_of_an_unchanged_stage_is_the_making_runs(tmp_path):
    made = {"n_params": 1000, "steps": 12, "first_val_loss": 10.8, "final_val_loss": 10.3, "tokens_per_s": 900.0,
            "registered_model": "lmcore-base", "model_version": "1", "init": "scratch"}
    rows = dict(pipeline.summary_rows({"pretrain": {**made, pipeline.UNCHANGED: True}}))
    assert rows["registered model"] == "lmcore-base v1 (unchanged)" and rows["steps"] == "12 (unchanged)"
    unknown = pipeline.summary_rows({"pretrain": {pipeline.UNCHANGED: True, "run_id": None}})
    assert unknown == [("pretrain", "unchanged (dvc.lock); no MLflow run in this store made its outputs")]
    assert pipeline.parent_tags({"pretrain": {pipeline.UNCHANGED: True}}) == {}


# -- one run at a time per root -----------------------------------------------------------------------------


def test_a_second_run_in_a_busy_root_is_turned_away_naming_the_holder(tmp_path, prefect_harness):
    from flows.cli import app

    with root_lock(tmp_path, "lifecycle flow run nightly-otter"):
        with pytest.raises(RootBusyError, match=r"another lmcore run is working in this project root \(lifecycle flow run "
                                                r"nightly-otter, pid \d+ on .*\); let it finish, or pass --wait SECONDS"):
            with root_lock(tmp_path, "second"):
                pass
        result = CliRunner().invoke(app, ["run", "collect", "--params", str(MICRO), "--root", str(tmp_path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if "nightly-otter" in line]
    assert len(lines) == 1 and "another lmcore run is working in this project root" in lines[0]
    assert not (tmp_path / "data").exists()  # nothing ran
    with root_lock(tmp_path, "third"):  # released
        assert json.loads((tmp_path / ".lmcore" / "run.lock.json").read_text())["what"] == "third"
    assert not (tmp_path / ".lmcore" / "run.lock.json").exists()


def test_a_second_run_that_may_wait_runs_after_the_first(tmp_path):
    order = []

    def first():
        with root_lock(tmp_path, "first"):
            order.append("first in")
            time.sleep(1.0)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    while not order:
        time.sleep(0.01)
    with root_lock(tmp_path, "second", wait_s=30):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]


# -- continue from the champion ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    gpt2 = get_tokenizer("gpt2", SHARED / "tokenizers" / "gpt2.tiktoken")
    tokenize(TokenizeConfig(val_fraction=0.2), documents(Layout(root).clean), Layout(root).tokens, seed=1, tokenizer=gpt2)
    return root


def params(**continued):
    overrides = ["pretrain.init=champion", "pretrain.max_steps=6", "pretrain.eval_interval=3"]
    return load_params(MICRO, overrides=overrides + [f"pretrain.continued.{k}={v}" for k, v in continued.items()])


def registered(folder: Path, version: int) -> Path:
    """`folder` as the orchestration layer's resolve_model hands a registered version to a stage."""
    write_json(folder / REGISTERED, {"name": "lmcore-base", "version": str(version), "aliases": ["champion"]})
    return folder


def no_champion(uri: str) -> Path:
    raise NotRegisteredError(f"{uri}: Registered model alias champion not found.")


def test_pretrain_continues_the_champion_with_the_continued_schedule(tokens_root, tmp_path, one_thread):
    layout = Layout(tokens_root)
    first = pretrain_stage(StageContext(root=tokens_root, params=params(), resolve_model=no_champion))
    assert first.summary["init"] == "scratch" and first.summary["continued_from"] is None
    assert first.warnings == ["pretrain.init champion: no champion yet (models:/lmcore-base@champion: Registered model "
                              "alias champion not found.); starting from random weights"]
    assert read_model_config(layout.pretrained)[1]["pretrain_steps"] == 6
    champion = registered(Path(shutil.copytree(layout.pretrained, tmp_path / "v1")), 1)

    tracker = ListTracker()
    second = pretrain_stage(StageContext(root=tokens_root, params=params(max_steps=4, lr=0.0005, warmup_steps=0),
                                         tracker=tracker, resolve_model=lambda uri: champion))
    s = second.summary
    assert (s["init"], s["continued_from"], s["start_step"], s["steps"], s["pretrain_steps"]) == ("champion", "lmcore-base v1", 6, 4, 10)
    # the same validation windows: the continued run starts where the champion ended
    assert s["first_val_loss"] == pytest.approx(first.summary["final_val_loss"], abs=1e-5)
    assert second.tags[CONTINUED_WEIGHTS_SHA] == sha256_file(champion / WEIGHTS)
    train_steps = [(step, m["lr"]) for step, m in tracker.records if "train_loss" in m]
    assert [step for step, _ in train_steps] == [7, 8, 9, 10]  # numbered on from the champion's 6
    assert train_steps[0][1] == pytest.approx(0.0005)  # the continued peak, no warmup
    assert [step for step, m in tracker.records if "val_loss" in m] == [6, 9, 10]
    assert read_model_config(layout.pretrained)[1]["pretrain_steps"] == 10
    assert load_tokenizer(layout.pretrained).identity == load_tokenizer(champion).identity


def test_a_champion_of_another_architecture_is_not_continued(tokens_root, tmp_path, one_thread):
    other = tmp_path / "other"
    save_model(GPT(ModelConfig(vocab_size=50257, context_length=32, n_embd=16, n_layer=2, n_head=2)), other)
    load_tokenizer(Layout(tokens_root).tokens).save(other)
    result = pretrain_stage(StageContext(root=tokens_root, params=params(), resolve_model=lambda uri: registered(other, 3)))
    assert result.summary["init"] == "scratch" and CONTINUED_WEIGHTS_SHA not in result.tags
    assert result.warnings == ["pretrain.init champion: lmcore-base v3 is another architecture than this run trains "
                               "(n_embd 16 vs 32); starting from random weights"]


def test_the_continued_schedule_is_validated():
    from lmcore.config import ParamsError

    with pytest.raises(ParamsError, match=r"pretrain.*continued: min_lr \(0.01\) must not exceed lr \(0.001\)"):
        load_params(MICRO, overrides=["pretrain.continued.lr=0.001", "pretrain.continued.min_lr=0.01"])
    assert params(lr=0.0005).pretrain.continuation().lr == 0.0005
    assert params().pretrain.continuation().max_steps == 6  # null keeps the pretrain value
