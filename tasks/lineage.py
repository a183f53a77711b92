"""Lineage: the chain from a registered model version back to its raw sources, read from MLflow alone.

    lmcore lineage models:/lmcore-base/1          # model version -> run -> the runs whose outputs it read -> sources
    lmcore lineage models:/lmcore-instruct@dpo --json

The model side: a model version names its run; a fine-tune's version names the weights it started from
(`lmcore.base_weights_sha256`), and a continued pretrain run the champion it continued, each found among the
registered versions by `lmcore.weights_sha256`. The data side follows the stage declarations (lmcore.pipeline, read
when the walk runs): for each dep a run's stage declares, the stage whose outs hold it (`pipeline.producer`) and
that stage's run whose `lmcore.dvc.out.<path>` equals the run's `lmcore.dvc.dep.<path>` (tasks/dvc_hashes.py
records both), or, without DVC tags, the producer's run with the same manifest sha256 (`lmcore.tokens_manifest_sha256`
of a data/tokens dep, ...); then that run's deps, until stages that read nothing of the project. The run that wrote
the raw manifest (collect) has it as an artifact: it names the raw sources. A new stage is followed by its
declaration alone. tasks/lineage_print.py prints the chain for people. Credentials in the URLs the chain holds
(sources, the tracking URI, tags) are masked (lmcore.redact) before anyone sees them.

The chain's order, newest first: the version, its run, what that run logged of its own inputs (a fine-tune's data
sources, a pretrained base's base.json, the tokens manifest), then the runs its data came from breadth first (the
runs whose outputs it read, in the order its stage declares its deps, then the runs those read from, ...; each run
once, where first reached), the raw sources, and last the versions it started from (a fine-tune's base, a continued
champion), each with its own chain.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from lmcore import pipeline
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
    PREFIX,
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
SOURCE_COUNTS = ("sources", "files", "bytes")  # what a run that collected files counts
# The manifest each of these folders holds, by the tag of its sha256: a run that read the folder and a run that
# wrote it both carry the tag, the link between them when the runs have no DVC hashes.
MANIFEST_TAGS = {TOKENS_MANIFEST_DIR: TAG_TOKENS_MANIFEST_SHA, RAW_MANIFEST_DIR: TAG_RAW_MANIFEST_SHA,
                 BASE_MANIFEST_DIR: TAG_BASE_MANIFEST_SHA}
RUN_CACHE = "outputs restored by DVC's run-cache make no run"


class LineageError(InputError):
    """The model URI is malformed, or names a model, version or alias the registry does not have."""


def model_lineage(uri: str, tracking_uri: str) -> dict[str, Any]:
    """The chain behind a registered model version, newest first (the module docstring has the order): the
    version, the run that made it, the runs whose outputs that run read as the stages declare them, back to the
    raw sources; for a fine-tune the base version and its chain, for a continued pretrain the champion's.

    Args:
        uri: models:/name/<version> or models:/name@<alias>.
        tracking_uri: the MLflow tracking (and registry) URI.
    Returns: {"model": uri, "chain": [node, ...], "warnings": [...]}; each node has a "kind" (model_version,
        run, finetune_sources, base_model, tokens_manifest, raw_sources) and, after the first, "found_by": how it was found.
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
        self._runs: set[str] = set()  # run ids in the chain: a run reached twice shows once

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
        if run.info.run_id in self._runs:  # already in the chain, with what it came from
            return
        self._runs.add(run.info.run_id)
        self.chain.append(_run_node(run, f"the run that registered {mv.name} v{mv.version}"))
        tags = run.data.tags
        base_sha = mv.tags.get(TAG_BASE_WEIGHTS_SHA) or tags.get(TAG_BASE_WEIGHTS_SHA)
        if base_sha:
            self.finetune_sources(run)
            self.data(run, by_weights=True)
            self.finetune(mv, run, base_sha)
        elif tags.get(TAG_ORIGIN) == "base_model" and TAG_BASE_MANIFEST_SHA in tags:
            self.base(run, tags[TAG_BASE_MANIFEST_SHA])  # the pretrained base itself, as downloaded
        elif TAG_TOKENS_MANIFEST_SHA in tags or getattr(_declared(_stage(run)), "deps", ()):
            if TAG_BASE_MANIFEST_SHA in tags:
                self.base(run, tags[TAG_BASE_MANIFEST_SHA])
            self.data(run)
            continued = tags.get(TAG_CONTINUED_WEIGHTS_SHA)
            if continued:  # the champion it continued, and that version's own chain
                self.continued(mv, run, continued)
        else:
            self.warnings.append(f"run {run.info.run_id} ({_stage(run)}): no base weights, tokens manifest tag or declared "
                                 "inputs; the chain ends here")

    def finetune_sources(self, run) -> None:
        manifest = self._manifest(run, FINETUNE_MANIFEST_DIR)
        if manifest is not None:
            self.chain.append(_sources_node("finetune_sources", manifest, run.data.tags.get(TAG_FINETUNE_MANIFEST_SHA),
                                            f"artifact {FINETUNE_MANIFEST_DIR}/manifest.json of run {run.info.run_id}"))

    def finetune(self, mv, run, base_sha: str) -> None:
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

    def data(self, run, by_weights: bool = False) -> None:
        """The tokens manifest `run` trained on (when it names one), the runs whose outputs it read (`upstream`),
        and the raw sources they start from.

        Args:
            run: a registered version's run, already in the chain.
            by_weights: its version names the weights it started from: a dep on a registered model's folder is
                that version's, followed through the registry (`finetune`) rather than by its DVC hash.
        """
        upstream = self.upstream(run, by_weights)
        tokens_sha = run.data.tags.get(TAG_TOKENS_MANIFEST_SHA)
        if tokens_sha:
            self.chain.append(self._tokens_node(run, tokens_sha, [r for r, _ in upstream]))
        for found, how in upstream:
            self.chain.append(_run_node(found, how))
        self.raw_sources(run, [r for r, _ in upstream if _writes(r, RAW_MANIFEST_DIR)])

    def upstream(self, start, by_weights: bool = False) -> list[tuple[Any, str]]:
        """(run, how it was found) of every run whose outputs `start` read, directly or through others, breadth
        first: the runs one declared dep away in the order the stage declares its deps, then two away, ...; a run
        already in the chain, or reached before, is not repeated."""
        found: list[tuple[Any, str]] = []
        queue = [start]
        while queue:
            run = queue.pop(0)
            for producer, how in self._inputs(run, skip_models=by_weights and run is start):
                if producer.info.run_id in self._runs:
                    continue
                self._runs.add(producer.info.run_id)
                found.append((producer, how))
                queue.append(producer)
        return found

    def _inputs(self, run, skip_models: bool) -> list[tuple[Any, str]]:
        """(run, how) of the run that wrote each dep of `run`'s declared stage, as that stage declares them."""
        name = _stage(run)
        stage = _declared(name)
        if stage is None:
            self.warnings.append(f"run {run.info.run_id}: lmcore.pipeline declares no stage {name!r}; its inputs are not followed")
            return []
        inputs = []
        for dep in stage.deps:
            maker = pipeline.maker(dep)
            # a file inside a stage's out folder: the producer's run has a hash of the folder alone; a stage that
            # reads the folder declares it, and that dep is followed
            if maker is None or maker[1] != dep:
                continue
            producer = maker[0]
            if skip_models and producer.registers is not None and producer.registers.model == dep:
                continue
            if run.data.tags.get(TAG_DVC_DEP + dep) == MISSING:  # the run read nothing there: no upstream
                continue
            found, how = self._producer(run, producer.name, dep)
            if found is None:
                self.warnings.append(f"no {producer.name} run wrote the {dep} that {name} run {run.info.run_id} read ({RUN_CACHE})")
            else:
                inputs.append((found, how))
        return inputs

    def _tokens_node(self, run, sha: str, upstream: list) -> dict:
        """The tokens manifest `run` trained on: its own copy, else that of the upstream run that made it."""
        manifest, where = self._manifest(run, TOKENS_MANIFEST_DIR), f"artifact {TOKENS_MANIFEST_DIR}/manifest.json of run {run.info.run_id}"
        maker = next((r for r in upstream if r.data.tags.get(TAG_TOKENS_MANIFEST_SHA) == sha), None)
        if manifest is None and maker is not None:
            manifest, where = self._manifest(maker, ""), f"artifact manifest.json of run {maker.info.run_id}"
        return _tokens_node(manifest, sha, where, f"the {_stage(run)} run's tokens manifest tag")

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

    def raw_sources(self, run, makers: list) -> None:
        """From the manifest of each run that wrote the raw data (`makers`, collect's); without one, the copy
        `run` logged, when it names one."""
        read_sha = run.data.tags.get(TAG_RAW_MANIFEST_SHA)
        for maker in makers:
            sha = maker.data.tags.get(TAG_RAW_MANIFEST_SHA)
            if read_sha and sha and read_sha != sha:
                self.warnings.append(f"the {_stage(run)} run logged raw manifest {read_sha[:12]}, but its data came from "
                                     f"{_stage(maker)} run {maker.info.run_id} with manifest {sha[:12]} "
                                     f"({RAW_MANIFEST_DIR} changed in between)")
            self._raw_node(self._manifest(maker, ""), sha, f"artifact manifest.json of run {maker.info.run_id}")
        if not makers and read_sha:
            self._raw_node(self._manifest(run, RAW_MANIFEST_DIR), read_sha,
                           f"artifact {RAW_MANIFEST_DIR}/manifest.json of run {run.info.run_id}")

    def _raw_node(self, manifest: dict | None, sha: str | None, where: str) -> None:
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

    def _producer(self, run, stage: str, path: str) -> tuple[Any, str]:
        """The `stage` run whose output `path` hashed to what `run` read there (their DVC tags); without that, the
        `stage` run with the sha256 of the manifest in `path` that `run` names. (None, "") when neither is found."""
        reader = _stage(run)
        value = run.data.tags.get(TAG_DVC_DEP + path)
        if value:
            found = self._run_with(run, stage, TAG_DVC_OUT + path, value)
            if found is not None:
                return found, f"its {path} output hash equals the {reader} run's input"
        tag = MANIFEST_TAGS.get(path)
        if tag and run.data.tags.get(tag):
            found = self._run_with(run, stage, tag, run.data.tags[tag])
            if found is not None:
                return found, f"its {tag.removeprefix(PREFIX).replace('_', ' ')} equals the {reader} run's"
        return None, ""

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


# the declarations, read when the walk runs (lmcore.pipeline's look-ups read STAGES as it is then)


def _declared(name: str):
    """The stage called `name` in lmcore.pipeline, or None."""
    try:
        return pipeline.get(name)
    except KeyError:
        return None


def _writes(run, folder: str) -> bool:
    """Whether `run`'s stage declares `folder` among its outs (it made what is there)."""
    return folder in getattr(_declared(_stage(run)), "outs", ())


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
    if DOCUMENTS_KEPT in metrics:
        node["documents_kept"] = int(metrics[DOCUMENTS_KEPT])
    if _writes(run, TOKENS_MANIFEST_DIR):
        node["tokens"] = {s: int(metrics[f"{s}_tokens"]) for s in ("train", "val") if f"{s}_tokens" in metrics}
    if _writes(run, RAW_MANIFEST_DIR):
        node.update({k: int(metrics[k]) for k in SOURCE_COUNTS if k in metrics})
    for key, tag in (("tokens_manifest_sha256", TAG_TOKENS_MANIFEST_SHA), ("raw_manifest_sha256", TAG_RAW_MANIFEST_SHA),
                     ("base_manifest_sha256", TAG_BASE_MANIFEST_SHA),
                     ("weights_sha256", TAG_WEIGHTS_SHA), ("base_weights_sha256", TAG_BASE_WEIGHTS_SHA)):
        if tag in tags:
            node[key] = tags[tag]
    return node


def _tokens_node(manifest: dict | None, sha: str, where: str, found_by: str) -> dict:
    node: dict[str, Any] = {"kind": "tokens_manifest", "sha256": sha, "found_by": found_by}
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
