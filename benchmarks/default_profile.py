"""Time the default profile stage by stage: `make pipeline` on a fresh clone, then again with nothing changed.

    .venv/bin/python -m benchmarks.default_profile                           # params.yaml, a fresh clone of HEAD
    .venv/bin/python -m benchmarks.default_profile --root .                  # the runs this project has made
    .venv/bin/python -m benchmarks.default_profile --params profiles/micro.yaml --keep /tmp/micro-run

Without --root: clones this checkout's HEAD (`git clone`: the committed files, as a user gets them) into a
temporary folder, runs `lmcore pipeline --params <params>` there with this venv (the clone's code first on
PYTHONPATH, its own mlflow.db and dvc.lock), then runs it again with nothing changed. With --root: reads the last
two lifecycle runs that project made. Either way it prints, per run, each stage's wall time and its share of the
whole (the lifecycle parent run's metrics stage_time_s.<stage>, timed around each stage's task), which stages ran,
and the model versions the registry held after it: a second run that registers nothing and stays under a
minute is what `make pipeline` on an unchanged project must be.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.tags import TAG_STAGES_RUN

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "stage_time_s."  # the lifecycle parent run's metric per stage (flows/lifecycle.py)


def run_pipeline(project: Path, params: str) -> float:
    """`lmcore pipeline` in `project`, as `make pipeline` runs it there; returns its wall time (process start included)."""
    env = {**os.environ, "PYTHONPATH": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    shared = ROOT.parent / "shared"  # the offline mirror and GPT-2's ranks beside the checkout, as the Makefile finds them
    if (shared / "data").is_dir():
        env.setdefault("LMCORE_MIRROR", str(shared / "data"))
    if (shared / "tokenizers" / "gpt2.tiktoken").is_file():
        env.setdefault("LMCORE_TIKTOKEN_FILE", str(shared / "tokenizers" / "gpt2.tiktoken"))
    lmcore = Path(sys.executable).parent / "lmcore"
    started = time.perf_counter()
    proc = subprocess.run([str(lmcore), "pipeline", "--params", params, "--root", str(project)], cwd=project, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lmcore pipeline failed in {project} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def client(project: Path):
    """The project's MLflow store (its mlflow.db, as `lmcore pipeline` there uses it)."""
    import mlflow

    return mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project.resolve() / 'mlflow.db'}")


def lifecycle_runs(project: Path, n: int) -> list:
    """The last `n` lifecycle parent runs of the project's MLflow store, oldest first."""
    store = client(project)
    runs = [r for e in store.search_experiments() for r in store.search_runs(
        [e.experiment_id], filter_string="tags.mlflow.runName = 'lifecycle'", order_by=["attributes.start_time DESC"], max_results=n)]
    runs = sorted(runs, key=lambda r: r.info.start_time)[-n:]
    if not runs:
        sys.exit(f"no lifecycle run in {project}'s MLflow store")
    return runs


def versions(project: Path) -> dict[str, int]:
    """Model versions per registered name."""
    store = client(project)
    return {m.name: len(store.search_model_versions(f"name = '{m.name}'")) for m in store.search_registered_models()}


def table(run) -> str:
    """Each stage's wall time and share of the whole run, in the order the flow ran them."""
    from lmcore.pipeline import NAMES

    times = {k.removeprefix(PREFIX): v for k, v in run.data.metrics.items() if k.startswith(PREFIX)}
    ran = set(run.data.tags.get(TAG_STAGES_RUN, "none").split(",")) - {"none"}
    total = sum(times.values())
    rows = ["| stage | ran | wall s | share |", "|---|---|---:|---:|"]
    for stage in sorted(times, key=lambda name: NAMES.index(name) if name in NAMES else len(NAMES)):
        rows.append(f"| {stage} | {'yes' if stage in ran else 'unchanged'} | {times[stage]:.1f} | {times[stage] / total:.1%} |")
    rows.append(f"| **all** | {len(ran)} ran | **{total:.1f}** | 100% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="the profile, relative to the project (default: params.yaml)")
    ap.add_argument("--root", type=Path, default=None, help="read this project's last two lifecycle runs instead of running")
    ap.add_argument("--keep", type=Path, default=None, help="clone into this folder (created) and keep it")
    ap.add_argument("--no-rerun", action="store_true", help="leave out the second, unchanged run")
    args = ap.parse_args(argv)

    walls: list[float] = []
    held: list[dict[str, int]] = []
    if args.root is not None:
        project = args.root
        runs = lifecycle_runs(project, 2)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lmcore-default-profile-")
        project = args.keep or Path(tmp.name) / "project"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
        for _ in range(1 if args.no_rerun else 2):
            walls.append(run_pipeline(project, args.params))
            held.append(versions(project))
            print(f"run {len(walls)}: {walls[-1]:.1f} s; model versions in the registry: {held[-1]}", flush=True)
        runs = lifecycle_runs(project, len(walls))
    for i, run in enumerate(runs):
        wall = f"; `lmcore pipeline` {walls[i]:.1f} s in all, process start included" if walls else ""
        print(f"\n## run {i + 1}: MLflow run {run.info.run_id}{wall}\n")
        print(table(run))
    if len(held) == 2:
        new = sum(held[1].values()) - sum(held[0].values())
        print(f"\nnew model versions in the unchanged run: {new}")
    if args.root is None and args.keep is None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
