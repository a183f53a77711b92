"""The DVC hashes of a stage run's inputs and outputs, as run tags: what `lmcore lineage` follows.

A run named after a stage starts with a tag per dependency, `lmcore.dvc.dep.<path>` = the md5 that dvc.lock
records for it (`<md5>.dir` for a folder), and ends with `lmcore.dvc.out.<path>` for each output. In a DVC
project (dvc.yaml and .dvc/ at the root) DVC computes them (`dvc.repo.Repo`; its state database makes unchanged
files free). Elsewhere (a temporary root) the stage's paths come from its declaration (lmcore.pipeline, the
same paths dvc.yaml is written from): code paths (`lmcore/...`) are hashed where the running code lives, data
paths under the root, by dvc_data as DVC would. `lmcore.dvc.hashed_by` says which.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from lmcore import pipeline
from tasks.tags import TAG_DVC_DEP, TAG_DVC_DEPS_MD5, TAG_DVC_HASHED_BY, TAG_DVC_OUT

log = logging.getLogger("lmcore.lineage")

MISSING = "missing"  # the tag value for a path that did not exist when hashed


def is_dvc_project(root: Path) -> bool:
    return (Path(root) / "dvc.yaml").is_file() and (Path(root) / ".dvc").is_dir()


def stage_paths(stage: str, which: str) -> list[str] | None:
    """A stage's deps (data inputs, then code) or outs, as dvc.yaml lists them; None for an unknown stage."""
    try:
        spec = pipeline.get(stage)
    except KeyError:
        return None
    return [*spec.deps, *spec.code_deps()] if which == "deps" else list(spec.outs)


def dvc_hashes(root: Path, stage: str, which: str = "deps") -> tuple[dict[str, str], str] | None:
    """The md5s DVC records in dvc.lock for a stage's `deps` or `outs` (params are left out: runs carry the
    params sha256), keyed by the path as dvc.yaml writes it; a path that does not exist maps to "missing".

    Returns: (hashes, how they were computed), or None when `stage` is not a stage (e.g. the lifecycle run).
    """
    root = Path(root).resolve()
    paths = stage_paths(stage, which)
    if paths is None:
        return None
    if is_dvc_project(root):
        try:
            return _repo_hashes(root, stage, which), f"dvc: the DVC project at {root}"
        except Exception as err:  # noqa: BLE001 - DVC raises many kinds; fall back and say why
            log.warning("DVC could not hash the %s of stage %s (%s); hashing them with dvc_data", which, stage, err)
            note = f"dvc_data: DVC failed at {root} ({type(err).__name__})"
    else:
        note = f"dvc_data: no DVC project at {root}"
    state = _state()
    try:
        hashes = {p: _hash_path(_locate(root, p), state) for p in paths}
    finally:
        state.close()
    return hashes, f"{note}; paths from lmcore.pipeline at {pipeline.CODE_ROOT}"


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
        (dvc_stage,) = repo.stage.collect(f"{root / 'dvc.yaml'}:{stage}")  # not the current folder's dvc.yaml
        for item in getattr(dvc_stage, which):
            if isinstance(item, ParamsDependency):
                continue
            try:
                hashes[str(item.def_path)] = item.get_hash().value
            except FileNotFoundError:
                hashes[str(item.def_path)] = MISSING
    return hashes


def _locate(root: Path, path: str) -> Path:
    """Code paths where the running lmcore package lives; data paths under the project root."""
    return pipeline.CODE_ROOT / path if path.startswith(f"{pipeline.PACKAGE.name}/") else root / path


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
