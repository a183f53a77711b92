"""Model cards in the MLflow registry: a version's description is its card (lmcore.model_card), the facts its
model folder carries (card.json) rendered with what the registry knows of the version: aliases, wall time,
evaluation, benchmark and judge scores, the promotion decision. `refresh` rewrites it, and the run's
MODEL_CARD.md artifact, whenever one of those changes (registration, scores, a promotion that moves an alias), so
the card is replaced, never appended to. A registered model's own description says what its versions are and
what its aliases mean, from the stage declarations (`describe_model`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow

from lmcore.model_card import Registry, model_description, render
from lmcore.paths import CARD, CARD_FACTS
from lmcore.pipeline import STAGES
from lmcore.promotion import CHALLENGER, CHAMPION
from tasks.tags import (
    BENCH_PREFIX,
    BENCH_SETTINGS_PREFIX,
    DECONTAM_PREFIX,
    PROMOTION_ARTIFACT,
    TAG_CHALLENGED_FILE,
    TAG_CHALLENGED_RUN,
    TAG_PROMOTION_FILE,
    TAG_BENCH_RESULTS,
    TAG_BENCH_SAMPLE,
    TAG_PROMOTION_RUN,
)
from tasks.tracking import MlflowTracker, Tracking, no_progress_bar

FACTS_ARTIFACT = f"model_card/{CARD_FACTS}"  # on the run that registered the version


def log_facts(run: MlflowTracker, model_dir: Path) -> bool:
    """Keep the model folder's card facts with the run that registers it (what `refresh` renders); False when the
    folder has none (a model folder written before cards)."""
    if not (Path(model_dir) / CARD_FACTS).is_file():
        return False
    run.log_artifact(Path(model_dir) / CARD_FACTS, "model_card")
    return True


def _load(client, run_id: str, path: str):
    """A JSON artifact of a run, or None when it has none (through the client: any store, a server's too)."""
    with no_progress_bar(), tempfile.TemporaryDirectory(prefix="lmcore-card-") as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text(encoding="utf-8"))
        except (mlflow.exceptions.MlflowException, OSError):  # no such artifact (which error depends on the store)
            return None


def registry_view(client, version, run) -> Registry:
    """What the registry knows of `version` (a ModelVersion), from its tags and the run that made it."""
    tags = version.tags
    scores = {k[len(BENCH_PREFIX):]: v for k, v in tags.items() if k.startswith(BENCH_PREFIX) and k not in (TAG_BENCH_SAMPLE, TAG_BENCH_RESULTS)}
    benchmark = []
    for key, value in sorted(scores.items()):
        if key.endswith("_stderr") or "." not in key:
            continue
        task, _, metric = key.rpartition(".")
        stderr = scores.get(f"{key}_stderr")
        benchmark.append({"task": task, "metric": metric, "value": float(value), "stderr": None if stderr is None else float(stderr)})
    promotion = _load(client, tags[TAG_PROMOTION_RUN], tags.get(TAG_PROMOTION_FILE, PROMOTION_ARTIFACT)) if TAG_PROMOTION_RUN in tags else None
    challenged = _load(client, tags[TAG_CHALLENGED_RUN], tags.get(TAG_CHALLENGED_FILE, PROMOTION_ARTIFACT)) if TAG_CHALLENGED_RUN in tags else None
    end = run.info.end_time or int(time.time() * 1000)
    return Registry(
        name=version.name, version=str(version.version), aliases=list(version.aliases), run_id=version.run_id,
        wall_time_s=(end - run.info.start_time) / 1000 if run.info.start_time else None,
        benchmark=benchmark, benchmark_sample=tags.get(TAG_BENCH_SAMPLE),
        evaluation={k.removeprefix("eval."): float(v) for k, v in tags.items() if k.startswith("eval.")},
        judge={k.removeprefix("judge."): (float(v) if k == "judge.mean_score" else v) for k, v in tags.items() if k.startswith("judge.")},
        promotion=promotion,
        challenged=challenged,
        settings={k.removeprefix(BENCH_SETTINGS_PREFIX): v for k, v in tags.items() if k.startswith(BENCH_SETTINGS_PREFIX)},
        decontamination={k.removeprefix(DECONTAM_PREFIX): int(v) for k, v in tags.items() if k.startswith(DECONTAM_PREFIX)},
    )


def refresh(tracking: Tracking, name: str, version: str) -> str | None:
    """Render version `version` of `name`'s card from its facts and its registry state; set it as the version's
    description and as MODEL_CARD.md on the run that made it (both replaced). Returns the card, or None when the
    version has no facts (registered before cards, or not by the pipeline)."""
    client = tracking.client()
    mv = client.get_model_version(name, str(version))
    if not mv.run_id:
        return None
    facts = _load(client, mv.run_id, FACTS_ARTIFACT)
    if facts is None:
        return None
    card = render(facts, registry_view(client, mv, client.get_run(mv.run_id)))
    if card != (mv.description or ""):
        client.update_model_version(name, str(version), description=card)
        client.log_text(mv.run_id, card, CARD)
    return card


def alias_holders(tracking: Tracking, name: str, aliases=(CHAMPION, CHALLENGER)) -> dict[str, str]:
    """{alias: version} of `name` for the aliases set now."""
    client, held = tracking.client(), {}
    for alias in aliases:
        try:
            held[alias] = str(client.get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException:
            pass
    return held


def describe_model(tracking: Tracking, key: str, name: str) -> str:
    """Set the description of registered model `name` (the `tracking.<key>` params name) from the stages that
    register or promote it: what each puts there, and the aliases they move."""
    holds = [f"`{s.name}`: {s.doc}" for s in STAGES if s.registers is not None and s.registers.name == key]
    aliases = [a for s in STAGES if s.registers is not None and s.registers.name == key for a in s.registers.aliases]
    if any(s.promotes is not None and s.promotes.name == key for s in STAGES):
        aliases += [CHAMPION, CHALLENGER]
    text = model_description(name, holds, list(dict.fromkeys(aliases)))
    client = tracking.client()
    if (client.get_registered_model(name).description or "") != text:
        client.update_registered_model(name, description=text)
    return text
