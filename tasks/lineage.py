"""Lineage: the DVC hashes of each stage run's inputs and outputs, and the chain from a registered model back
to its raw sources, read from MLflow alone.

    lmcore lineage models:/lmcore-base/1          # model version -> run -> tokens -> preprocess -> collect -> sources
    lmcore lineage models:/lmcore-instruct@dpo --json

Recording (called by `Tracking.run` for every run named after a dvc.yaml stage): the run starts with a tag per
dependency, `lmcore.dvc.dep.<path>` = the md5 that dvc.lock records for it (`<md5>.dir` for a folder), and ends
with `lmcore.dvc.out.<path>` for each output. In a DVC project (dvc.yaml and .dvc/ at the root) DVC computes them
(`dvc.repo.Repo`, its state database makes unchanged files free); elsewhere (a temporary root) the stage's paths
come from the dvc.yaml beside the running code, code paths (`lmcore/...`) are hashed where that code lives and
data paths under the root, by dvc_data as DVC would. `lmcore.dvc.hashed_by` says which.

Reading: a model version names its run; a fine-tune's version names the weights it started from
(`lmcore.base_weights_sha256`), found among registered versions; the pretrain run's tokens manifest sha256 finds
the tokenize run; the tokenize run's `data/clean` dependency hash finds the preprocess run whose output it was,
and its `data/raw` dependency the collect run, whose manifest (an artifact) names the raw sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

import lmcore
from tasks.tracking import (
    TAG_BASE_WEIGHTS_SHA,
    TAG_DVC_DEP,
    TAG_DVC_DEPS_MD5,
    TAG_DVC_HASHED_BY,
    TAG_DVC_OUT,
    TAG_FINETUNE,
    TAG_FINETUNE_MANIFEST_SHA,
    TAG_FLOW_RUN,
    TAG_GIT_COMMIT,
    TAG_LAUNCHER,
    TAG_PARAMS_SHA,
    TAG_RAW_MANIFEST_SHA,
    TAG_STAGE,
    TAG_TOKENS_MANIFEST_SHA,
    TAG_WEIGHTS_SHA,
)

log = logging.getLogger("lmcore.lineage")

CODE_ROOT = Path(lmcore.__file__).resolve().parents[1]  # where the running lmcore package (and its dvc.yaml) live
MISSING = "missing"  # the tag value for a path that did not exist when hashed

# Artifact folders of the run that registers a model version: the manifests (manifest.json) of its data.
RAW_MANIFEST_DIR = "data/raw"
TOKENS_MANIFEST_DIR = "data/tokens"
FINETUNE_MANIFEST_DIR = "data/finetune/raw"  # the fine-tune's own collected data


# ---------------------------------------------------------------------------------------------------------------
# Recording: DVC hashes of a stage's deps and outs


def is_dvc_project(root: Path) -> bool:
    return (Path(root) / "dvc.yaml").is_file() and (Path(root) / ".dvc").is_dir()


def dvc_hashes(root: Path, stage: str, which: str = "deps") -> tuple[dict[str, str], str] | None:
    """The md5s DVC records in dvc.lock for a stage's `deps` or `outs` (params are left out: runs carry the
    params sha256), keyed by the path as dvc.yaml writes it; a path that does not exist maps to "missing".

    Returns: (hashes, how they were computed), or None when no dvc.yaml knows the stage.
    """
    root = Path(root).resolve()
    if is_dvc_project(root):
        from dvc.stage.exceptions import StageNotFound

        try:
            return _repo_hashes(root, stage, which), f"dvc: the DVC project at {root}"
        except StageNotFound:  # e.g. the lifecycle parent run
            return None
        except Exception as err:  # noqa: BLE001 - DVC raises many kinds; fall back and say why
            log.warning("DVC could not hash the %s of stage %s (%s); hashing them with dvc_data", which, stage, err)
            note = f"dvc_data: DVC failed at {root} ({type(err).__name__})"
    else:
        note = f"dvc_data: no DVC project at {root}"
    paths = _code_stage_paths(stage, which)
    if paths is None:
        return None
    state = _state()
    try:
        hashes = {p: _hash_path(_locate(root, p), state) for p in paths}
    finally:
        state.close()
    return hashes, f"{note}; paths from {CODE_ROOT / 'dvc.yaml'}"


def input_tags(root: Path, stage: str) -> dict[str, str]:
    """Run tags for the stage's dependencies: one per path, their combined md5 and how they were hashed.
    Lineage never fails a stage: an error is logged and recorded in `lmcore.dvc.hashed_by`."""
    try:
        found = dvc_hashes(root, stage, "deps")
    except Exception as err:  # noqa: BLE001
        log.warning("could not hash the deps of stage %s: %s", stage, err)
        return {TAG_DVC_HASHED_BY: f"failed: {type(err).__name__}: {err}"[:500]}
    if found is None:
        return {}
    hashes, how = found
    return {TAG_DVC_HASHED_BY: how, TAG_DVC_DEPS_MD5: combined_md5(hashes), **{TAG_DVC_DEP + p: h for p, h in hashes.items()}}


def output_tags(root: Path, stage: str) -> dict[str, str]:
    """Run tags for what the stage wrote: `lmcore.dvc.out.<path>` = md5, as dvc.lock records the outs."""
    try:
        found = dvc_hashes(root, stage, "outs")
    except Exception as err:  # noqa: BLE001
        log.warning("could not hash the outs of stage %s: %s", stage, err)
        return {}
    return {} if found is None else {TAG_DVC_OUT + p: h for p, h in found[0].items()}


def combined_md5(hashes: dict[str, str]) -> str:
    """One md5 for a set of path hashes (`lmcore.dvc.deps_md5`): equal inputs, equal value."""
    return hashlib.md5(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def _repo_hashes(root: Path, stage: str, which: str) -> dict[str, str]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    hashes: dict[str, str] = {}
    with Repo(str(root)) as repo:  # no lock taken: `dvc repro` holds it while `lmcore run` runs
        (dvc_stage,) = repo.stage.collect(stage)
        for item in getattr(dvc_stage, which):
            if isinstance(item, ParamsDependency):
                continue
            try:
                hashes[str(item.def_path)] = item.get_hash().value
            except FileNotFoundError:
                hashes[str(item.def_path)] = MISSING
    return hashes


def _code_stage_paths(stage: str, which: str) -> list[str] | None:
    """A stage's deps (or outs, metrics and plots files) as the dvc.yaml beside the running code lists them."""
    dvc_yaml = CODE_ROOT / "dvc.yaml"
    if not dvc_yaml.is_file():
        return None
    spec = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage)
    if spec is None:
        return None
    keys = ("deps",) if which == "deps" else ("outs", "metrics", "plots")
    # an entry is "path" or {"path": {options}}
    return [e if isinstance(e, str) else next(iter(e)) for key in keys for e in spec.get(key) or []]


def _locate(root: Path, path: str) -> Path:
    """Code paths where the running lmcore package lives; data paths under the project root."""
    return CODE_ROOT / path if path == "lmcore" or path.startswith("lmcore/") else root / path


def _state():
    """dvc_data's hash cache (inode, mtime, size -> md5) in DVC's site cache folder; none when unwritable."""
    from dvc.dirs import site_cache_dir
    from dvc_data.hashfile.state import State, StateNoop

    try:
        folder = Path(site_cache_dir()) / "lmcore-lineage"
        folder.mkdir(parents=True, exist_ok=True)
        return State(None, str(folder))
    except Exception as err:  # noqa: BLE001 - no cache: hash in full
        log.debug("no hash cache (%s)", err)
        return StateNoop()


def _hash_path(path: Path, state) -> str:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem, MemoryFileSystem

    if not path.exists():
        return MISSING
    staging = HashFileDB(MemoryFileSystem(), "/lmcore-lineage", state=state, hash_name="md5")
    _, _, obj = build(staging, str(path), LocalFileSystem(), "md5", dry_run=True)
    return obj.hash_info.value


# ---------------------------------------------------------------------------------------------------------------
# Reading: the chain from a registered model version back to its raw sources

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")
DOCUMENTS_KEPT = "documents_out"  # the preprocess run's metric


class LineageError(ValueError):
    """The model URI is malformed, or names a model, version or alias the registry does not have."""


def model_lineage(uri: str, tracking_uri: str) -> dict[str, Any]:
    """The chain behind a registered model version, newest first: the version, the run that made it, for a
    fine-tune the base version and its run (recursively), the tokens manifest and the tokenize run, the
    preprocess run, the collect run and the raw sources.

    Args:
        uri: models:/name/<version> or models:/name@<alias>.
        tracking_uri: the MLflow tracking (and registry) URI.
    Returns: {"model": uri, "chain": [node, ...], "warnings": [...]}; each node has a "kind" (model_version,
        run, finetune_sources, tokens_manifest, raw_sources) and, after the first, "found_by": how it was found.
    Raises: LineageError for a malformed URI or an unknown model, version or alias.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    walk = _Walk(client)
    walk.version(_resolve(client, uri), found_by=None)
    return {"model": uri, "tracking_uri": tracking_uri, "chain": walk.chain, "warnings": walk.warnings}


def _resolve(client, uri: str):
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.match(uri.strip())
    if match is None:
        raise LineageError(f"{uri}: expected models:/<name>/<version> or models:/<name>@<alias>")
    name, version, alias = match["name"], match["version"], match["alias"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise LineageError(f"{uri}: no registered model named {name!r}") from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        what = f"alias @{alias}" if alias is not None else f"version {version}"
        raise LineageError(f"{uri}: {name} has no {what} (versions: {', '.join(map(str, known)) or 'none'})") from None


class _Walk:
    """Follows the links from a model version upstream, appending a node per step to `chain`."""

    def __init__(self, client):
        self.client = client
        self.chain: list[dict] = []
        self.warnings: list[str] = []
        self._seen: set[tuple[str, str]] = set()

    # the model side -------------------------------------------------------------------------------------------

    def version(self, mv, found_by: str | None) -> None:
        key = (mv.name, str(mv.version))
        if key in self._seen:  # a version cannot descend from itself; stop rather than loop
            self.warnings.append(f"{mv.name} v{mv.version} appears twice in its own lineage")
            return
        self._seen.add(key)
        self.chain.append(_version_node(mv, found_by))
        run = self._get_run(mv.run_id)
        if run is None:
            self.warnings.append(f"{mv.name} v{mv.version}: its run {mv.run_id} is not in the tracking store")
            return
        self.chain.append(_run_node(run, f"the run that registered {mv.name} v{mv.version}"))
        base_sha = mv.tags.get(TAG_BASE_WEIGHTS_SHA) or run.data.tags.get(TAG_BASE_WEIGHTS_SHA)
        if base_sha:
            self.finetune(mv, run, base_sha)
        elif TAG_TOKENS_MANIFEST_SHA in run.data.tags:
            self.pretrain(run)
        else:
            self.warnings.append(f"run {run.info.run_id} ({_stage(run)}): no base weights or tokens manifest tag; the chain ends here")

    def finetune(self, mv, run, base_sha: str) -> None:
        manifest = self._manifest(run, FINETUNE_MANIFEST_DIR)
        if manifest is not None:
            self.chain.append(_sources_node("finetune_sources", manifest, run.data.tags.get(TAG_FINETUNE_MANIFEST_SHA),
                                            f"artifact {FINETUNE_MANIFEST_DIR}/manifest.json of run {run.info.run_id}"))
        base = self._version_with_weights(base_sha, before=run.info.start_time)
        if base is None:
            self.warnings.append(f"{mv.name} v{mv.version}: no registered version has the base weights (sha256 {base_sha})")
            return
        self.version(base, found_by=f"the registered version whose weights sha256 is {mv.name} v{mv.version}'s base ({base_sha[:12]})")

    # the data side --------------------------------------------------------------------------------------------

    def pretrain(self, run) -> None:
        tags = run.data.tags
        tokens_sha = tags[TAG_TOKENS_MANIFEST_SHA]
        tokenize = self._run_with(run, "tokenize", TAG_TOKENS_MANIFEST_SHA, tokens_sha)
        how = "its tokens manifest sha256 equals the pretrain run's"
        if tokenize is None:
            tokenize, how = self._producer(run, "data/tokens", "tokenize"), "its data/tokens output hash equals the pretrain run's input"
        manifest, where = self._manifest(run, TOKENS_MANIFEST_DIR), f"artifact {TOKENS_MANIFEST_DIR}/manifest.json of run {run.info.run_id}"
        if manifest is None and tokenize is not None:
            manifest, where = self._manifest(tokenize, ""), f"artifact manifest.json of run {tokenize.info.run_id}"
        self.chain.append(_tokens_node(manifest, tokens_sha, where))
        if tokenize is None:
            self.warnings.append(f"no tokenize run made the tokens manifest {tokens_sha[:12]} (outputs restored by DVC's run-cache make no run)")
            return self.raw_sources(run, None)
        self.chain.append(_run_node(tokenize, how))
        preprocess = self._producer(tokenize, "data/clean", "preprocess")
        if preprocess is None:
            self.warnings.append(f"no preprocess run wrote the data/clean that tokenize run {tokenize.info.run_id} read")
            return self.raw_sources(run, None)
        self.chain.append(_run_node(preprocess, "its data/clean output hash equals the tokenize run's input"))
        collect = self._producer(preprocess, "data/raw", "collect")
        how = "its data/raw output hash equals the preprocess run's input"
        raw_sha = preprocess.data.tags.get(TAG_RAW_MANIFEST_SHA)
        if collect is None and raw_sha:
            collect, how = self._run_with(preprocess, "collect", TAG_RAW_MANIFEST_SHA, raw_sha), "its raw manifest sha256 equals the preprocess run's"
        if collect is None:
            self.warnings.append(f"no collect run wrote the data/raw that preprocess run {preprocess.info.run_id} read")
            return self.raw_sources(run, None)
        self.chain.append(_run_node(collect, how))
        self.raw_sources(run, collect)

    def raw_sources(self, pretrain_run, collect_run) -> None:
        """From the collect run's manifest; else the copy the pretrain run logged."""
        pre_sha = pretrain_run.data.tags.get(TAG_RAW_MANIFEST_SHA)
        if collect_run is not None:
            sha = collect_run.data.tags.get(TAG_RAW_MANIFEST_SHA)
            manifest = self._manifest(collect_run, "")
            where = f"artifact manifest.json of run {collect_run.info.run_id}"
            if pre_sha and sha and pre_sha != sha:
                self.warnings.append(f"the pretrain run logged raw manifest {pre_sha[:12]}, but its data came from collect run "
                                     f"{collect_run.info.run_id} with manifest {sha[:12]} (data/raw changed after tokenize)")
        else:
            sha, manifest = pre_sha, self._manifest(pretrain_run, RAW_MANIFEST_DIR)
            where = f"artifact {RAW_MANIFEST_DIR}/manifest.json of run {pretrain_run.info.run_id}"
        if manifest is None:
            self.warnings.append("no raw manifest found as an artifact")
            return
        self.chain.append(_sources_node("raw_sources", manifest, sha, where))

    # MLflow look-ups ------------------------------------------------------------------------------------------

    def _get_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def _producer(self, run, path: str, stage: str):
        """The `stage` run whose output `path` hashed to what `run` read there (its DVC dep tag)."""
        value = run.data.tags.get(TAG_DVC_DEP + path)
        if not value or value == MISSING:
            return None
        return self._run_with(run, stage, TAG_DVC_OUT + path, value)

    def _run_with(self, downstream, stage: str, tag: str, value: str):
        """The newest finished `stage` run with tag == value that started before `downstream` (same experiment
        first, then any); identical outputs from reruns make several candidates."""
        query = f"tags.`{TAG_STAGE}` = '{stage}' AND tags.`{tag}` = '{value}'"
        for experiments in ([downstream.info.experiment_id], None):
            ids = experiments or [e.experiment_id for e in self.client.search_experiments()]
            runs = self.client.search_runs(ids, query, order_by=["attributes.start_time DESC"], max_results=50)
            runs = [r for r in runs if r.info.status == "FINISHED"]
            earlier = [r for r in runs if r.info.start_time <= downstream.info.start_time]
            if earlier or runs:
                return (earlier or runs)[0]
        return None

    def _version_with_weights(self, sha: str, before: int):
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"tags.`{TAG_WEIGHTS_SHA}` = '{sha}'")
        except MlflowException:  # a store without tag search: scan
            versions = [v for m in self.client.search_registered_models()
                        for v in self.client.search_model_versions(f"name = '{m.name}'") if v.tags.get(TAG_WEIGHTS_SHA) == sha]
        if not versions:
            return None
        earlier = [v for v in versions if v.creation_timestamp <= before] or versions
        best = max(earlier, key=lambda v: (v.creation_timestamp, int(v.version)))
        # search results may lack aliases; a direct read has them
        return self.client.get_model_version(best.name, best.version)

    def _manifest(self, run, artifact_dir: str) -> dict | None:
        """A run's manifest.json artifact (under `artifact_dir`), parsed, with its sha256; None when absent."""
        from mlflow.exceptions import MlflowException

        path = f"{artifact_dir}/manifest.json" if artifact_dir else "manifest.json"
        with tempfile.TemporaryDirectory(prefix="lmcore-lineage-") as tmp, _no_progress_bar():
            try:
                local = Path(self.client.download_artifacts(run.info.run_id, path, tmp))
            except (MlflowException, OSError):
                return None
            data = local.read_bytes()
        return {"sha256": hashlib.sha256(data).hexdigest(), "content": json.loads(data)}


@contextlib.contextmanager
def _no_progress_bar():
    """MLflow draws a download bar per artifact on stderr; a few small manifests need none."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


# nodes ------------------------------------------------------------------------------------------------------


def _iso(ms: int | None) -> str | None:
    import datetime as dt

    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")


def _stage(run) -> str:
    return run.data.tags.get(TAG_STAGE, run.info.run_name or "?")


def _version_node(mv, found_by: str | None) -> dict:
    tags = dict(mv.tags)
    node = {
        "kind": "model_version",
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(mv.aliases or []),
        "weights_sha256": tags.get(TAG_WEIGHTS_SHA),
        "run_id": mv.run_id,
        "created": _iso(mv.creation_timestamp),
        "finetune": tags.get(TAG_FINETUNE),
        "base_weights_sha256": tags.get(TAG_BASE_WEIGHTS_SHA),
        "tokens_manifest_sha256": tags.get(TAG_TOKENS_MANIFEST_SHA),
        "raw_manifest_sha256": tags.get(TAG_RAW_MANIFEST_SHA),
        "finetune_manifest_sha256": tags.get(TAG_FINETUNE_MANIFEST_SHA),
        "tags": tags,
    }
    if found_by:
        node["found_by"] = found_by
    return node


def _run_node(run, found_by: str) -> dict:
    tags, metrics = run.data.tags, run.data.metrics
    stage = _stage(run)
    node = {
        "kind": "run",
        "stage": stage,
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "start_time": _iso(run.info.start_time),
        "git_commit": tags.get(TAG_GIT_COMMIT),
        "params_sha256": tags.get(TAG_PARAMS_SHA),
        "prefect_flow_run_id": tags.get(TAG_FLOW_RUN),
        "launcher": tags.get(TAG_LAUNCHER),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "dvc": {
            "hashed_by": tags.get(TAG_DVC_HASHED_BY),
            "deps_md5": tags.get(TAG_DVC_DEPS_MD5),
            "deps": {k[len(TAG_DVC_DEP):]: v for k, v in sorted(tags.items()) if k.startswith(TAG_DVC_DEP)},
            "outs": {k[len(TAG_DVC_OUT):]: v for k, v in sorted(tags.items()) if k.startswith(TAG_DVC_OUT)},
        },
        "found_by": found_by,
    }
    if stage == "preprocess" and DOCUMENTS_KEPT in metrics:
        node["documents_kept"] = int(metrics[DOCUMENTS_KEPT])
    if stage == "tokenize":
        node["tokens"] = {s: int(metrics[f"{s}_tokens"]) for s in ("train", "val") if f"{s}_tokens" in metrics}
    if stage == "collect":
        node.update({k: int(metrics[k]) for k in ("sources", "files", "bytes") if k in metrics})
    for key, tag in (("tokens_manifest_sha256", TAG_TOKENS_MANIFEST_SHA), ("raw_manifest_sha256", TAG_RAW_MANIFEST_SHA),
                     ("weights_sha256", TAG_WEIGHTS_SHA), ("base_weights_sha256", TAG_BASE_WEIGHTS_SHA)):
        if tag in tags:
            node[key] = tags[tag]
    return node


def _tokens_node(manifest: dict | None, sha: str, where: str) -> dict:
    node: dict[str, Any] = {"kind": "tokens_manifest", "sha256": sha, "found_by": "the pretrain run's tokens manifest tag"}
    if manifest is None:
        node["artifact"] = None
        return node
    content = manifest["content"]
    node.update(
        artifact=where,
        verified=manifest["sha256"] == sha,  # the logged file is the one the tag names
        encoding=content.get("encoding"),
        documents_sha256=content.get("documents_sha256"),
        shards=len(content.get("shards", [])),
        tokens={split: d.get("tokens") for split, d in content.get("splits", {}).items()},
    )
    return node


def _sources_node(kind: str, manifest: dict, sha: str | None, where: str) -> dict:
    sources = [
        {"name": s.get("name"), "url": s.get("source"), "sha256": s.get("sha256"), "license": s.get("license"),
         "origin": s.get("origin"), "bytes": s.get("bytes")}
        for s in manifest["content"].get("sources", [])
    ]
    return {"kind": kind, "manifest_sha256": manifest["sha256"], "verified": None if sha is None else manifest["sha256"] == sha,
            "found_by": where, "sources": sources}


# rendering --------------------------------------------------------------------------------------------------


def render(lineage: dict, console=None) -> None:
    """The chain for people: one block per node, newest first, each preceded by how it was found. Lines are
    not wrapped, so hashes stay whole for copying."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(soft_wrap=True, highlight=False)
    console.print(f"[bold]Lineage of {escape(lineage['model'])}[/bold]  [dim]({escape(lineage['tracking_uri'])})[/dim]")
    for node in lineage["chain"]:
        if node.get("found_by"):
            console.print(f"  [dim]\u2191 {escape(node['found_by'])}[/dim]")
        title, rows = _describe(node)
        console.print(f"[bold cyan]{escape(title)}[/bold cyan]")
        width = max((len(key) for key, _ in rows), default=0)
        for key, value in rows:
            console.print(f"    [dim]{escape(key.ljust(width))}[/dim]  {escape(value)}")
    for warning in lineage["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _describe(node: dict) -> tuple[str, list[tuple[str, str]]]:
    kind = node["kind"]
    rows: list[tuple[str, str]] = []

    def add(key: str, value) -> None:
        if value not in (None, "", {}, []):
            rows.append((key, str(value)))

    if kind == "model_version":
        aliases = " ".join(f"@{a}" for a in node["aliases"])
        add("weights sha256", node["weights_sha256"])
        add("run", node["run_id"])
        add("created", node["created"])
        add("fine-tune", node["finetune"])
        add("base weights sha256", node["base_weights_sha256"])
        add("tokens manifest", node["tokens_manifest_sha256"])
        add("raw manifest", node["raw_manifest_sha256"])
        add("fine-tune data manifest", node["finetune_manifest_sha256"])
        return f"model version  {node['name']} v{node['version']}  {aliases}".rstrip(), rows
    if kind == "run":
        add("status", f"{node['status']}, started {node['start_time']}")
        add("git commit", node["git_commit"])
        add("params sha256", node["params_sha256"])
        add("Prefect flow run", node["prefect_flow_run_id"])
        add("launcher", node["launcher"])
        add("parent run", node["parent_run_id"])
        add("tokens", _counts(node.get("tokens")))
        for key in ("documents_kept", "sources", "files", "bytes", "tokens_manifest_sha256", "raw_manifest_sha256"):
            add(key.replace("_", " "), node.get(key))
        dvc = node["dvc"]
        add("DVC hashed by", dvc["hashed_by"])
        for label, hashes in (("DVC deps", dvc["deps"]), ("DVC outs", dvc["outs"])):
            for i, (path, md5) in enumerate(hashes.items()):
                rows.append((label if i == 0 else "", f"{path}  {md5}"))
        return f"run  {node['stage']}  {node['run_id']}", rows
    if kind == "tokens_manifest":
        add("artifact", node.get("artifact") or "not logged")
        add("verified", node.get("verified"))
        add("shards", node.get("shards"))
        add("tokens", _counts(node.get("tokens")))
        add("documents sha256", node.get("documents_sha256"))
        return f"tokens manifest  {node['sha256']}", rows
    title = "raw sources" if kind == "raw_sources" else "fine-tune data"
    add("manifest sha256", node["manifest_sha256"] + ("" if node["verified"] is None else f" (verified: {node['verified']})"))
    for src in node["sources"]:
        size = "" if src["bytes"] is None else f", {src['bytes']:,} bytes"
        rows.append((src["name"], f"sha256 {src['sha256']} ({src['origin']}{size})"))
        rows.append(("", f"{src['url']}"))
        rows.append(("", f"licence: {src['license']}"))
    return title, rows


def _counts(counts: dict | None) -> str | None:
    return None if not counts else ", ".join(f"{k} {v:,}" for k, v in counts.items() if v is not None)
