"""Lineage: the chain from a registered model version back to its raw sources, read from MLflow alone.

    lmcore lineage models:/lmcore-base/1          # model version -> run -> tokens -> preprocess -> collect -> sources
    lmcore lineage models:/lmcore-instruct@dpo --json

A model version names its run; a fine-tune's version names the weights it started from
(`lmcore.base_weights_sha256`), found among registered versions; the pretrain run's tokens manifest sha256 finds
the tokenize run; the tokenize run's `data/clean` dependency hash (tasks/dvc_hashes.py records them) finds the
preprocess run whose output it was, and its `data/raw` dependency the collect run, whose manifest (an artifact)
names the raw sources. tasks/lineage_print.py prints the chain for people. Credentials in the URLs the chain holds
(sources, the tracking URI, tags) are masked (lmcore.redact) before anyone sees them.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from lmcore.errors import InputError
from lmcore.paths import BASE_MANIFEST
from lmcore.redact import redact_tree
from lmcore.stages import (
    BASE_MANIFEST_DIR,
    FINETUNE_MANIFEST_DIR,
    RAW_MANIFEST_DIR,
    TOKENS_MANIFEST_DIR,
)
from tasks.dvc_hashes import MISSING
from tasks.tags import (
    PARENT_RUN,
    TAG_BASE_MANIFEST_SHA,
    TAG_BASE_WEIGHTS_SHA,
    TAG_CONTINUED_WEIGHTS_SHA,
    TAG_DVC_DEP,
    TAG_DVC_DEPS_MD5,
    TAG_DVC_HASHED_BY,
    TAG_DVC_OUT,
    TAG_FINETUNE,
    TAG_FINETUNE_MANIFEST_SHA,
    TAG_FLOW_RUN,
    TAG_GIT_COMMIT,
    TAG_LAUNCHER,
    TAG_ORIGIN,
    TAG_PARAMS_SHA,
    TAG_RAW_MANIFEST_SHA,
    TAG_STAGE,
    TAG_TOKENS_MANIFEST_SHA,
    TAG_WEIGHTS_SHA,
)
from tasks.tracking import no_progress_bar

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")
DOCUMENTS_KEPT = "documents_out"  # the preprocess run's metric


class LineageError(InputError):
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
        Every string has the credentials of its URLs masked (`https://***@host`, `?token=***`).
    Raises: LineageError for a malformed URI or an unknown model, version or alias.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    walk = _Walk(client)
    walk.version(_resolve(client, uri), found_by=None)
    return redact_tree({"model": uri, "tracking_uri": tracking_uri, "chain": walk.chain, "warnings": walk.warnings})


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
        elif run.data.tags.get(TAG_ORIGIN) == "base_model" and TAG_BASE_MANIFEST_SHA in run.data.tags:
            self.base(run, run.data.tags[TAG_BASE_MANIFEST_SHA])  # the pretrained base itself, as downloaded
        elif TAG_TOKENS_MANIFEST_SHA in run.data.tags:
            self.pretrain(run)
            continued = run.data.tags.get(TAG_CONTINUED_WEIGHTS_SHA)
            if continued:  # the champion it continued, and that version's own chain
                self.continued(mv, run, continued)
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

    def continued(self, mv, run, sha: str) -> None:
        champion = self._version_with_weights(sha, before=run.info.start_time)
        if champion is None:
            self.warnings.append(f"{mv.name} v{mv.version}: continued weights (sha256 {sha[:12]}) that no registered version has")
            return
        self.version(champion, found_by=f"the champion {mv.name} v{mv.version} continued: its weights sha256 is {sha[:12]}")

    # the data side --------------------------------------------------------------------------------------------

    def pretrain(self, run) -> None:
        tags = run.data.tags
        if TAG_BASE_MANIFEST_SHA in tags:
            self.base(run, tags[TAG_BASE_MANIFEST_SHA])
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

    def base(self, run, sha: str) -> None:
        """The pretrained base the pretrain run continued: its base.json, logged with the run."""
        manifest = self._manifest(run, BASE_MANIFEST_DIR, name=BASE_MANIFEST)
        if manifest is None:
            self.warnings.append(f"run {run.info.run_id}: continued a pretrained base ({sha[:12]}) but logged no {BASE_MANIFEST}")
            return
        content = manifest["content"]
        self.chain.append({
            "kind": "base_model", "manifest_sha256": manifest["sha256"], "verified": manifest["sha256"] == sha,
            "found_by": f"artifact {BASE_MANIFEST_DIR}/{BASE_MANIFEST} of run {run.info.run_id}",
            "source": content.get("source"), "name": content.get("name"), "license": content.get("license"),
            "architecture": content.get("architecture"), "parameters": content.get("parameters"),
            "tokenizer": (content.get("tokenizer") or {}).get("name"),
            "files": [{k: f.get(k) for k in ("file", "url", "path", "sha256", "origin", "bytes")} for f in content.get("files", [])],
        })

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

    def _manifest(self, run, artifact_dir: str, name: str = "manifest.json") -> dict | None:
        """A run's manifest artifact (`name` under `artifact_dir`), parsed, with its sha256; None when absent."""
        from mlflow.exceptions import MlflowException

        path = f"{artifact_dir}/{name}" if artifact_dir else name
        with tempfile.TemporaryDirectory(prefix="lmcore-lineage-") as tmp, no_progress_bar():
            try:
                local = Path(self.client.download_artifacts(run.info.run_id, path, tmp))
            except (MlflowException, OSError):
                return None
            data = local.read_bytes()
        return {"sha256": hashlib.sha256(data).hexdigest(), "content": json.loads(data)}


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
        "continued_weights_sha256": tags.get(TAG_CONTINUED_WEIGHTS_SHA),
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
        "parent_run_id": tags.get(PARENT_RUN),
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
