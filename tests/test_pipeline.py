"""The stage declarations (lmcore.pipeline): consistent with each other and with params, and the source of dvc.yaml,
whose code deps are computed import closures that DVC itself acts on."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import typing_extensions

from flows.dvc_yaml import render
from lmcore import pipeline
from lmcore.config import Params, load_params
from lmcore.pipeline import STAGES, Curve, import_closure
from lmcore.stages import Promoted, PromotedSeveral, Registered, StageContext, StageResult, UndeclaredError
from tests.conftest import ROOT


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def test_committed_dvc_yaml_is_what_the_declarations_write():
    assert (ROOT / "dvc.yaml").read_text(encoding="utf-8") == render(), "dvc.yaml is stale: run `lmcore dvc-yaml`"


def test_every_stage_is_declared_consistently():
    names = [s.name for s in STAGES]
    assert len(set(names)) == len(names) and pipeline.NAMES == tuple(names)
    written: list[str] = []
    for stage in STAGES:
        assert callable(stage.function()), stage.name
        assert stage.doc and stage.outs, stage.name
        for key in stage.params:  # every DVC param is a params.yaml section (or the seed)
            assert key.split(".")[0] in Params.model_fields, (stage.name, key)
        # the stage's own section is among its params, so changing it re-runs the stage under `dvc repro`
        assert stage.name in stage.params, stage.name
        # a stage reads only what earlier stages wrote
        for dep in stage.deps:
            assert any(inside(dep, out) for out in written), f"{stage.name} reads {dep}, which no earlier stage writes"
        # no two stages write the same place
        for out in stage.outs:
            assert not any(inside(out, o) or inside(o, out) for o in written), f"{stage.name} writes {out} twice"
        files = [*stage.metrics, *(p if isinstance(p, str) else f for p in stage.plots for f in ([] if isinstance(p, str) else p.y))]
        for f in files:
            assert any(inside(f, out) for out in stage.outs), f"{stage.name}: {f} is outside its outs"
        if stage.registers is not None:
            assert stage.registers.model in stage.outs and stage.registers.name in Params.model_fields["tracking"].annotation.model_fields
        written += stage.outs
    with pytest.raises(KeyError, match="unknown stage 'finetune'; stages: collect, preprocess"):
        pipeline.get("finetune")


def test_code_deps_are_the_import_closure():
    dpo = pipeline.get("dpo").code_deps()
    # dpo generates test responses through finetune/instruct.py, which imports the generator
    assert {"lmcore/stages/dpo.py", "lmcore/finetune/dpo.py", "lmcore/finetune/instruct.py", "lmcore/generation.py",
            "lmcore/finetune/trainer.py", "lmcore/training.py", "lmcore/model.py", "lmcore/finetune/__init__.py"} <= set(dpo)
    assert "lmcore/finetune/classifier.py" not in dpo and "lmcore/harness/run.py" not in dpo
    collect = pipeline.get("collect").code_deps()
    assert {"lmcore/data/collect.py", "lmcore/data/archives.py", "lmcore/data/formats.py"} <= set(collect)
    assert "lmcore/model.py" not in collect and "lmcore/generation.py" not in collect
    assert "lmcore/harness/scoring.py" in pipeline.get("benchmark").code_deps()
    for stage in STAGES:
        deps = stage.code_deps()
        assert deps == sorted(deps) and all((ROOT / d).is_file() for d in deps), stage.name
        assert f"lmcore/stages/{stage.name}.py" in deps and "lmcore/pipeline.py" not in deps


def test_import_closure_follows_relative_and_lazy_imports(tmp_path, monkeypatch):
    """A fake lmcore tree: `from . import b` (relative), a function-level import, and `from pkg import module`."""
    pkg = tmp_path / "lmcore"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\n\ndef f():\n    from lmcore import lazy\n")
    (pkg / "sub" / "b.py").write_text("import os\nfrom lmcore.sub.c import thing\n")
    (pkg / "sub" / "c.py").write_text("thing = 1\n")
    (pkg / "lazy.py").write_text("")
    (pkg / "unused.py").write_text("")
    monkeypatch.setattr(pipeline, "PACKAGE", pkg)
    monkeypatch.setattr(pipeline, "CODE_ROOT", tmp_path)
    import_closure.cache_clear()
    try:
        assert import_closure("lmcore.sub.a") == [
            "lmcore/__init__.py", "lmcore/lazy.py", "lmcore/sub/__init__.py", "lmcore/sub/a.py", "lmcore/sub/b.py", "lmcore/sub/c.py",
        ]
    finally:
        import_closure.cache_clear()


def test_dvc_yaml_lists_each_stage_as_declared():
    import yaml

    dvc = yaml.safe_load(render())
    assert list(dvc["stages"]) == list(pipeline.NAMES)
    dpo = dvc["stages"]["dpo"]
    assert dpo["cmd"] == "lmcore run dpo" and dpo["params"] == ["seed", "dpo"] and dpo["outs"] == list(pipeline.get("dpo").outs)
    assert dpo["deps"] == ["models/instruct", *pipeline.get("dpo").code_deps()]
    assert dvc["metrics"] == [m for s in STAGES for m in s.metrics]
    curves = [p for s in STAGES for p in s.plots if isinstance(p, Curve)]
    assert {"loss", "dpo_reward_margin", "classifier_confusion"} <= {c.name for c in curves}


def test_downstream_follows_the_declared_deps():
    assert pipeline.downstream("pretrain") == ["pretrain", "evaluate", "benchmark", "finetune_classifier", "finetune_instruct", "dpo",
                                               "instruct_eval", "judge"]
    assert pipeline.downstream("dpo") == ["dpo", "instruct_eval", "judge"]
    assert pipeline.downstream("collect") == [n for n in pipeline.NAMES if n != "base_model"]  # the base needs no data
    assert pipeline.downstream("base_model")[:3] == ["base_model", "tokenize", "pretrain"]


def test_summary_rows_and_parent_metrics_come_from_the_declarations():
    results = {
        "collect": {"sources": 2, "bytes": 1234, "raw_manifest_sha256": "r" * 64},
        "tokenize": {"train_tokens": 10, "val_tokens": 2, "tokens_manifest_sha256": "t" * 64},
        "judge": {"skipped": True, "reason": "no endpoint"},
    }
    assert pipeline.summary_rows(results) == [
        ("sources collected", "2"), ("raw bytes", "1,234"), ("train tokens", "10"), ("val tokens", "2"), ("LLM-as-judge", "skipped: no endpoint"),
    ]
    assert pipeline.parent_tags(results) == {"raw_manifest_sha256": "r" * 64, "tokens_manifest_sha256": "t" * 64}
    assert pipeline.parent_metrics({"judge": {"skipped": False, "mean_scores": {"instruct": 61.5, "dpo": None}}}) == {
        "judge.instruct_mean_score": 61.5}


def sample(tp: object) -> object:
    """A value of type `tp`: TypedDicts with every key, "sample" for each string and each dict key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if typing_extensions.is_typeddict(tp):  # typing's or typing_extensions' (train_tokenizer's has extra_items)
        return {key: sample(t) for key, t in typing_extensions.get_type_hints(tp).items()}
    if origin in (typing.Union, types.UnionType):
        return sample(next(a for a in args if a is not type(None)))
    if origin in (typing.NotRequired, typing.Required):
        return sample(args[0])
    if origin is dict:
        return {"sample": sample(args[1])}
    if origin is list:
        return [sample(args[0])]
    if origin is typing.Literal:
        return args[0]
    return {int: 3, float: 0.5, bool: False, str: "sample"}[tp]


def summary_keys(typed: type) -> tuple[set[str], set[str]]:
    """(required, optional) keys of a TypedDict. Its own __required_keys__ misses a NotRequired[...] written under
    `from __future__ import annotations` (a string, on Python 3.11); the evaluated hints have it."""
    hints = typing_extensions.get_type_hints(typed, include_extras=True)
    optional = set(typed.__optional_keys__) | {k for k, t in hints.items() if typing.get_origin(t) is typing.NotRequired}
    return set(hints) - optional, optional


def summary_sample(stage: pipeline.Stage) -> dict:
    """A summary of `stage` as the orchestration layer hands it on: its module's `Summary`, with what the layer adds
    for a stage that registers a model or goes through a promotion gate."""
    summary = sample(importlib.import_module(stage.module).Summary)
    if stage.registers is not None:
        summary |= sample(Registered)
    if stage.promotes is not None:
        summary |= sample(PromotedSeveral if stage.name == "instruct_eval" else Promoted)
    return summary


def read_everything(stage: pipeline.Stage, summary: dict) -> None:
    """Every summary row, parent metric and parent tag of the declaration, on `summary`."""
    for row in stage.summary:
        assert isinstance(row.value(summary), (str, int, float)), (stage.name, row.label)
    for what in (stage.parent_metrics, stage.parent_tags):
        if what is not None:
            what(summary)


def test_every_summary_row_reads_keys_its_stage_returns():
    """Each stage module types its summary (`Summary`); the declaration's rows, parent metrics and tags read only
    those keys (and what the orchestration layer adds): a misspelled key is a KeyError here, not after a lifecycle."""
    for stage in STAGES:
        read_everything(stage, summary_sample(stage))
    collect = pipeline.get("collect")
    misspelled = pipeline.Row("sources collected", lambda s: s["source"])
    with pytest.raises(KeyError, match="source"):
        read_everything(pipeline.Stage("collect", "", outs=collect.outs, summary=(misspelled,)), summary_sample(collect))


def test_a_stage_is_handed_what_it_declares_and_nothing_else(tmp_path):
    params = load_params(ROOT / "params.yaml")
    ctx = pipeline.get("evaluate").context(tmp_path, params, resolve_model=lambda uri: tmp_path / "never")
    assert ctx.inputs["models/base"] == tmp_path.resolve() / "models" / "base" and set(ctx.inputs) == {"models/base", "data/tokens"}
    assert ctx.outputs["reports/evaluate"] == tmp_path.resolve() / "reports" / "evaluate"
    with pytest.raises(UndeclaredError, match=r"^evaluate: data/clean is not among its declared deps \(models/base, data/tokens\)"):
        ctx.inputs["data/clean"]
    with pytest.raises(UndeclaredError, match="evaluate: models/base is not among its declared outs"):
        ctx.outputs["models/base"]
    with pytest.raises(UndeclaredError, match="evaluate: models:/lmcore-base@champion is not among its declared registry deps"):
        ctx.resolve_model("models:/lmcore-base@champion")
    # pretrain continuing the champion declares that registry read, and resolves it
    champion, base = (params.model_copy(update={"pretrain": params.pretrain.model_copy(update={"init": init})}) for init in ("champion", "base"))
    uri = f"models:/{params.tracking.registered_model}@champion"
    assert pipeline.get("pretrain").registry_deps(champion) == (uri,) and pipeline.get("pretrain").registry_deps(base) == ()
    assert pipeline.get("pretrain").context(tmp_path, champion, resolve_model=lambda u: tmp_path / u[-8:]).resolve_model(uri) == tmp_path / "champion"
    # a context built by hand (unit tests) resolves any path
    assert StageContext(tmp_path, params).inputs["data/clean"] == tmp_path.resolve() / "data" / "clean"


def test_the_shipped_params_name_no_local_path_a_fresh_clone_lacks(tmp_path):
    """`make pipeline` on a fresh clone: the CLI checks the local paths params.yaml names before it starts, and the
    one the default names (judge.serve: models/base_model) is the base_model stage's output, not a missing input,
    nor a second dvc.yaml dep of judge beside its declared one."""
    for params in (load_params(ROOT / "params.yaml"), load_params(ROOT / "profiles" / "micro.yaml")):
        assert [line for s in STAGES for line in s.missing_local_paths(params, tmp_path)] == []
    judge = pipeline.get("judge")
    assert judge.local_paths(load_params(ROOT / "params.yaml")) == [("judge.serve", "models/base_model")]
    assert judge.local_deps(load_params(ROOT / "params.yaml"), tmp_path) == []
    elsewhere = load_params(ROOT / "params.yaml", overrides=[f"judge.serve={tmp_path / 'judge-model'}"])
    assert judge.missing_local_paths(elsewhere, tmp_path) == [f"judge.serve: {tmp_path / 'judge-model'} does not exist"]


def test_a_stage_function_runs_without_any_orchestration(tmp_path):
    """The library's stage function alone: no Prefect, no MLflow; it returns what it made."""
    from lmcore.config import load_params
    from lmcore.stages import StageContext
    from lmcore.stages.collect import run as collect

    (tmp_path / "book.txt").write_text("It was a dark and stormy night. " * 20, encoding="utf-8")
    params = load_params(ROOT / "params.yaml", overrides=["collect.sources=[{name: book, path: book.txt}]"])
    result = collect(StageContext(root=tmp_path, params=params))
    assert isinstance(result, StageResult)
    assert result.summary["sources"] == 1 and result.metrics["bytes"] == 640
    manifest = tmp_path / "data" / "raw" / "manifest.json"
    assert result.artifacts[0].path == manifest and json.loads(manifest.read_text())["sources"][0]["name"] == "book"
    assert result.tags == {"raw_manifest_sha256": result.summary["raw_manifest_sha256"]}


def dvc(repo: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode == 0, f"dvc {args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_editing_the_generator_marks_dpo_changed_under_dvc_status(tmp_path):
    """DVC itself, on the committed dvc.yaml: after `dvc commit` of dpo and collect, an edit to
    lmcore/generation.py (which dpo runs through finetune/instruct.py) makes dpo changed and leaves collect alone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "lmcore", repo / "lmcore", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, repo / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.check_update", "false")
    for stage in ("collect", "dpo"):  # stand-ins for the data the two stages read and write
        for path in (*pipeline.get(stage).deps, *pipeline.get(stage).outs):
            (repo / path).mkdir(parents=True, exist_ok=True)
            (repo / path / "part.txt").write_text(f"{stage} {path}\n")
    dvc(repo, "commit", "-f", "-q", "collect", "dpo")
    assert json.loads(dvc(repo, "status", "--json", "collect", "dpo")) == {}

    with open(repo / "lmcore" / "generation.py", "a", encoding="utf-8") as f:
        f.write("\n# an edit to the generator\n")
    status = json.loads(dvc(repo, "status", "--json", "collect", "dpo"))
    assert list(status) == ["dpo"]
    assert {"changed deps": {"lmcore/generation.py": "modified"}} in status["dpo"]


def test_every_shipped_params_file_names_every_section_dvc_reads():
    """`dvc repro` on a profile copied to params.yaml fails on a section the file leaves to the defaults."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    sections = {p.split(".")[0] for stage in pipeline.STAGES for p in stage.params}
    # the files `dvc repro` runs on (params.yaml, and micro.yaml copied over it in tests/test_dvc.py), and the
    # whole-lifecycle profiles; gpt2-124m.yaml is a pretraining profile for `lmcore run`/torchrun and names what it changes
    for path in [root / "params.yaml", *(root / "profiles" / f"{p}.yaml" for p in ("micro", "llama-tiny", "scratch"))]:
        missing = sections - set(yaml.safe_load(path.read_text()))
        assert not missing, f"{path.name} lacks {sorted(missing)}"
