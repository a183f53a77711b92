"""Run only what changed, and one run at a time per project root.

Before each stage the lifecycle flow asks DVC, with DVC's own code, whether the stage is changed: its deps,
params, command and outs against dvc.lock (`dvc.stage.Stage.status`, what `dvc status` prints and what
`dvc repro` decides on). Asked stage by stage, after the stages before it ran and were committed, the answers
are the ones `dvc repro` would give: a stage whose inputs came out byte-identical is not run again.

    plan = Plan.open(root, params_path, overrides, force=False)
    decision = plan.decide("pretrain")       # Decision(run=False, reason="unchanged", ...)
    ...                                      # run the stage when decision.run
    plan.commit("pretrain")                  # dvc.lock records it now: a run killed later keeps it

The check applies only where dvc.lock can speak for the run: a DVC project at the root, run on its own
params.yaml without overrides. Anywhere else every stage runs and the decision says why.

A skipped stage's summary is the one the run that made its outputs logged (`made_by`): the newest finished
MLflow run of that stage whose output hashes (`lmcore.dvc.out.*`) are dvc.lock's.

Registry deps (`Stage.registry`: the champion pretrain continues, the model judge serves) are outside DVC: a stage
DVC finds unchanged still runs when a registered model it reads now resolves to another version than the one the
run that made its outputs read (`registry_moves`; that run's tag lmcore.registry_deps).

`root_lock`: a lifecycle run and `lmcore run <stage>` hold <root>/.lmcore/run.lock while they work, so two runs
in one root never execute a stage on the same outputs; the second waits up to `wait_s` seconds, then fails
with one line naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from lmcore.errors import InputError, NotRegisteredError
from lmcore.io import write_json
from tasks import failures
from tasks.dvc_hashes import is_dvc_project
from tasks.tags import TAG_DVC_OUT, TAG_REGISTRY_DEPS, TAG_STAGE, TAG_START_WEIGHTS_SHA, TAG_WEIGHTS_SHA
from tasks.tracking import Tracking, no_progress_bar

log = logging.getLogger("lmcore.incremental")

LOCK_DIR = ".lmcore"  # in the project root; git- and DVC-ignored
RUN_LOCK = "run.lock"
HOLDER = "run.lock.json"  # who holds the lock: pid, host, what, since
STAGE_SUMMARY = "stage_summary.json"  # the artifact every stage run logs: its summary, for later skipped runs
MAX_SHOWN = 4  # changed paths named in a reason; the rest are counted


class RootBusyError(InputError):
    """Another lmcore run (or DVC command) works in this project root. Not retried: wait for it, then run again."""


@dataclass(frozen=True)
class Decision:
    """Whether a stage runs, and why: "forced", "changed: <what>", "unchanged", "not checked: <why>"."""

    stage: str
    run: bool
    reason: str
    changes: list = field(default_factory=list)  # DVC's status entries for the stage (empty when unchanged)


@dataclass
class Plan:
    """Stage-by-stage run decisions for one lifecycle run in `root`.

    checked_against: None when dvc.lock speaks for the run, else why it cannot (every stage then runs).
    force: every stage runs (`lmcore pipeline --force`).
    """

    root: Path
    checked_against: str | None
    force: bool = False
    decisions: list[Decision] = field(default_factory=list)

    @classmethod
    def open(cls, root: Path, params_path: Path, overrides: list[str] | None, force: bool = False) -> Plan:
        return cls(Path(root).resolve(), not_checkable(root, params_path, overrides), force)

    @property
    def checks(self) -> bool:
        return self.checked_against is None

    def decide(self, stage: str, registry_moves: Callable[[], list[str]] | None = None) -> Decision:
        """Whether `stage` runs; `registry_moves` (asked only when DVC finds it unchanged): its registry deps that
        now resolve to other versions, one line each."""
        if self.force:
            decision = Decision(stage, True, "forced")
        elif not self.checks:
            decision = Decision(stage, True, f"not checked: {self.checked_against}")
        else:
            changes = stage_status(self.root, stage)
            moved = [] if changes or registry_moves is None else registry_moves()
            if changes:
                decision = Decision(stage, True, f"changed: {describe(changes, changed_keys(self.root, stage))}", changes)
            elif moved:
                decision = Decision(stage, True, f"changed: registry {'; '.join(moved)}", [{"changed registry": moved}])
            else:
                decision = Decision(stage, False, "unchanged")
        self.decisions.append(decision)
        return decision

    def commit(self, stage: str) -> bool:
        """Record the stage's deps, params and outs in dvc.lock (and its outs in DVC's cache) now; False when
        dvc.lock does not speak for this run."""
        if not self.checks:
            return False
        dvc_log = logging.getLogger("dvc")
        level = dvc_log.level
        dvc_log.setLevel(logging.WARNING)  # not "Updating lock file 'dvc.lock'" per stage
        try:
            with dvc_repo(self.root, locked=False) as repo:
                repo.commit(target(self.root, stage), force=True)  # takes DVC's lock itself
        finally:
            dvc_log.setLevel(level)
        return True

    @property
    def ran(self) -> list[str]:
        return [d.stage for d in self.decisions if d.run]

    @property
    def skipped(self) -> list[str]:
        return [d.stage for d in self.decisions if not d.run]

    def to_dict(self) -> dict:
        return {
            "checked_against_dvc_lock": self.checks,
            "why_not": self.checked_against,
            "force": self.force,
            "stages": [{"stage": d.stage, "run": d.run, "reason": d.reason, "changes": d.changes} for d in self.decisions],
        }


def not_checkable(root: Path, params_path: Path, overrides: list[str] | None) -> str | None:
    """Why dvc.lock cannot decide for a run (None: it can)."""
    root = Path(root).resolve()
    if not is_dvc_project(root):
        return f"no DVC project at {root}"
    if Path(params_path).resolve() != (root / "params.yaml").resolve():
        return f"the run uses {params_path}, not the root's params.yaml"
    if overrides:
        return f"the run overrides params ({', '.join(overrides)})"
    return None


@contextlib.contextmanager
def dvc_repo(root: Path, locked: bool = True) -> Iterator:
    """DVC's Repo at `root`, holding DVC's repo lock when `locked` (what `dvc status` takes; `Repo.commit` takes
    it itself); a busy DVC (`dvc repro` running here) is a RootBusyError."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    # DVC resolves some paths against the current folder (a stage's wdir in `commit`): be in the root meanwhile
    with contextlib.chdir(root), Repo(str(root)) as repo:
        try:
            with repo.lock if locked else contextlib.nullcontext():
                yield repo
        except LockError as err:
            raise RootBusyError(f"{root}: another DVC command holds {root / '.dvc' / 'tmp' / 'lock'} ({err}); "
                                "run again when it has finished") from None


def target(root: Path, stage: str) -> str:
    """A stage as DVC's API addresses it whatever the current folder: "<root>/dvc.yaml:<stage>" (a bare stage
    name is looked up in the dvc.yaml of the current folder)."""
    return f"{Path(root).resolve() / 'dvc.yaml'}:{stage}"


def stage_status(root: Path, stage: str) -> list:
    """DVC's status entries of `stage` (what `dvc status <stage>` prints; empty when unchanged)."""
    with dvc_repo(root) as repo:
        (dvc_stage,) = repo.stage.collect(target(root, stage))
        return dvc_stage.status().get(dvc_stage.addressing, [])


def changed_keys(root: Path, stage: str) -> dict[str, list[str]]:
    """For each params section of `stage` that dvc.lock recorded: the dotted keys whose values params.yaml now
    changes, adds or removes ("tokenize.val_fraction"), the names the stage's MLflow run logs them under."""
    lock, params = Path(root) / "dvc.lock", Path(root) / "params.yaml"
    if not lock.is_file() or not params.is_file():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    entry = (yaml.load(lock.read_text(encoding="utf-8"), Loader=loader) or {}).get("stages", {}).get(stage, {})
    before = entry.get("params", {}).get("params.yaml", {})
    now = yaml.load(params.read_text(encoding="utf-8"), Loader=loader) or {}
    return {key: sorted(_differ(before.get(key), now.get(key), key)) for key in before}


def _differ(a, b, prefix: str) -> list[str]:
    """The dotted keys under `prefix` where a and b differ (a whole list counts as one value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in a.keys() | b.keys() for k in _differ(a.get(key), b.get(key), f"{prefix}.{key}")]
    return [] if a == b else [prefix]


def describe(changes: list, keys: dict[str, list[str]] | None = None) -> str:
    """DVC's status entries in one line: "deps data/raw modified, lmcore/io.py modified (+3 more); params
    tokenize.val_fraction modified". `keys` (`changed_keys`): a changed section named by its changed dotted keys,
    as the stage's MLflow run logs them; DVC itself names the section."""
    parts = []
    for entry in changes:
        if isinstance(entry, str):  # "changed command", "always changed"
            parts.append(entry)
            continue
        for kind, paths in entry.items():
            named, params = [], []
            for path, status in paths.items():
                if isinstance(status, dict):  # params.yaml: {"dpo": "modified"}
                    params += [f"{', '.join((keys or {}).get(key) or [key])} {value}" for key, value in status.items()]
                else:
                    named.append(f"{path} {status}")
            if named:
                more = f" (+{len(named) - MAX_SHOWN} more)" if len(named) > MAX_SHOWN else ""
                parts.append(f"{kind.removeprefix('changed ')} {', '.join(named[:MAX_SHOWN])}{more}")
            if params:
                parts.append(f"params {', '.join(params)}")
    return "; ".join(parts) or "changed"


def locked_outs(root: Path, stage: str) -> dict[str, str]:
    """The md5 dvc.lock records for each of the stage's outs."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    # libyaml's loader where PyYAML has it: the pure-Python one takes ~0.3 s per read of a default dvc.lock (its code
    # deps), and a run reads it once per stage
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    entry = (yaml.load(lock.read_text(encoding="utf-8"), Loader=loader) or {}).get("stages", {}).get(stage, {})
    return {o["path"]: o["md5"] for o in entry.get("outs", []) if "md5" in o}


def made_by(tracking: Tracking, root: Path, stage: str) -> tuple[str | None, dict]:
    """The MLflow run that made the stage's current outputs (the newest finished run of the stage whose output
    hashes are dvc.lock's) and the summary it logged; (None, {}) when no run in this store did."""
    outs = locked_outs(root, stage)
    client = tracking.client()
    exp = client.get_experiment_by_name(tracking.experiment)
    if not outs or exp is None:
        return None, {}
    conditions = [f"tags.`{TAG_STAGE}` = '{stage}'", "attributes.status = 'FINISHED'"]
    conditions += [f"tags.`{TAG_DVC_OUT}{path}` = '{md5}'" for path, md5 in outs.items()]
    runs = client.search_runs([exp.experiment_id], " and ".join(conditions), order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None, {}
    run_id = runs[0].info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="lmcore-summary-") as tmp, no_progress_bar():
            path = client.download_artifacts(run_id, STAGE_SUMMARY, tmp)
            return run_id, json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - a run from before stage summaries were logged
        log.info("run %s of %s has no %s (%s)", run_id, stage, STAGE_SUMMARY, err)
        return run_id, {}


def registry_moves(tracking: Tracking, run_id: str | None, uris: tuple[str, ...]) -> list[str]:
    """Each of `uris` (a stage's registry deps) that resolves to another version now than it did for the run
    `run_id` that made the stage's outputs (its tag lmcore.registry_deps): "models:/lmcore-base@champion: lmcore-base
    v2 -> lmcore-base v3". A version whose weights that run made (pretrain's output, promoted since) or started from
    (the pretrained base, registered as the first champion since) is no move: the run would start where it did."""
    from tasks.registry import registered_version

    if not uris:
        return []
    recorded, known = {}, set()
    if run_id is not None:
        tags = tracking.client().get_run(run_id).data.tags
        recorded = json.loads(tags.get(TAG_REGISTRY_DEPS) or "{}")
        known = {tags[t] for t in (TAG_WEIGHTS_SHA, TAG_START_WEIGHTS_SHA) if tags.get(t)}
    moved = []
    for uri in uris:
        try:
            version = registered_version(uri, tracking.uri)
        except NotRegisteredError:
            version = None
        now = f"{version.name} v{version.version}" if version is not None else None
        if now != recorded.get(uri) and (version is None or version.tags.get(TAG_WEIGHTS_SHA) not in known):
            moved.append(f"{uri}: {recorded.get(uri) or 'none'} -> {now or 'none'}")
    return moved


@contextlib.contextmanager
def root_lock(root: Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold <root>/.lmcore/run.lock for the block: the only lmcore run working in `root`.

    The lock is the operating system's (flock): a killed holder releases it. `what` (e.g. "lifecycle flow run
    <id>") is recorded beside it so that a run turned away can say who holds it.

    Raises: RootBusyError when another run holds it for longer than `wait_s` seconds.
    """
    folder = Path(root).resolve() / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / RUN_LOCK, timeout=max(wait_s, 0.0))
    try:
        lock.acquire()
    except Timeout:
        waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
        err = RootBusyError(f"{root}: another lmcore run is working in this project root ({holder(folder)}){waited}; "
                            "let it finish, or pass --wait SECONDS to queue behind it")
        failures.RECORDED[str(err)] = failures.Failure(None, bad_input=True)  # the CLI shows it once, as one line
        raise err from None
    try:
        write_json(folder / HOLDER, {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                                     "since": dt.datetime.now().isoformat(timespec="seconds")})
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / HOLDER).unlink()
        lock.release()


def holder(folder: Path) -> str:
    try:
        info = json.loads((folder / HOLDER).read_text(encoding="utf-8"))
        return f"{info['what']}, pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return f"holder unknown; lock file {folder / RUN_LOCK}"
