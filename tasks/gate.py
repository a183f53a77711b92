"""The promotion gate of every registered model family: a stage that `promotes` (lmcore.pipeline.Promotes) returns
`Scores` of the version it scored, and this moves `champion` only when that version beats the champion.

For each Scores, holding the registry lock of the family:
1. the version's scores become tags (bench.*), its per-item results are recorded (tasks.compare.record_results);
2. with no champion yet and a run that started from a pretrained base that can serve the family (`from_base`),
   the base is registered into the family and scored on the same items, and is the first champion: a
   fine-tune must beat what was downloaded to be promoted (`first_champion`);
3. a champion scored on other items is scored on these first (`rescore_champion`; the evaluation cache makes a
   champion scored before on the same items cost no forward pass);
4. the version is compared with the champion item by item (tasks.compare.compare_with_champion): the disagreements
   go to the run and into the decision, and a `paired` family (the classifier) is decided on the standard error
   of the per-item differences;
5. lmcore.promotion.decide moves `champion` or makes the version `challenger` (continued pretraining from the
   champion: on the held-out bits per byte it bought and the benchmark change it cost, `Scores.adaptation`); the decision is an artifact of the
   run, on the version's tags, and on the champion's (`promotion.challenged_*`), and both versions' cards show it.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

from lmcore.io import sha256_file, write_json
from lmcore.model_card import card_facts
from lmcore.paths import BASE_MANIFEST, WEIGHTS
from lmcore.pipeline import Stage
from lmcore.promotion import CHAMPION, paired_difference
from lmcore.stages import BASE_MANIFEST_DIR, Scores
from lmcore.tokenizer import has_tokenizer, load_tokenizer
from tasks import cards
from tasks.compare import compare_with_champion, record_results
from tasks.context import RunContext, logger, reviewed
from tasks.registry import (
    champion_version,
    download_model_dir,
    find_version,
    log_and_register,
    promote,
    registry_lock,
    tag_scores,
)
from tasks.tags import (
    BENCH_SETTINGS_PREFIX,
    PROMOTION_ARTIFACT,
    PROMOTION_PREFIX,
    TAG_BASE_MANIFEST_SHA,
    TAG_BENCH_SAMPLE,
    TAG_CHALLENGED_FILE,
    TAG_CHALLENGED_RUN,
    TAG_ORIGIN,
    TAG_PROMOTION_FILE,
    TAG_PROMOTION_RUN,
    TAG_WEIGHTS_SHA,
)
from tasks.tracking import MlflowTracker

BASE_ORIGIN = "base_model"  # TAG_ORIGIN of a version registered from models/base_model


def gate(rc: RunContext, stage: Stage, scores: Scores, run: MlflowTracker, *, several: bool = False) -> dict[str, Any]:
    """Put the version whose weights `scores` scored through the gate of `stage.promotes`' family.

    several: the stage gates more than one version in its run: each decision and comparison is kept under its own
        name (promotion/<label>.json, comparison/<label>/) rather than promotion.json and comparison/.
    Returns: {"model_version", "promotion": the decision (None when the version is not registered)}.
    """
    name = getattr(rc.params.tracking, stage.promotes.name)
    label = scores.label or stage.name
    run.set_tags({TAG_BENCH_SAMPLE: scores.sample_sha256})
    version = find_version(rc.tracking, name, sha256_file(scores.weights))
    if version is None:
        logger().warning("%s: %s (sha256 %s) is not registered as %s: no promotion", stage.name, scores.weights.parent.name,
                         sha256_file(scores.weights)[:12], name)
        return {"model_version": None, "promotion": None}
    client = rc.tracking.client()
    tag_scores(rc.tracking, name, version, scores.values, scores.sample_sha256)
    for key, value in scores.settings.items():
        client.set_model_version_tag(name, version, f"{BENCH_SETTINGS_PREFIX}{key}", value)
    record_results(rc.tracking, run, name, version, scores, "reports")
    artifact = f"promotion/{label}.json" if several else PROMOTION_ARTIFACT
    with registry_lock(name), tempfile.TemporaryDirectory(prefix="lmcore-gate-") as tmp:
        work = Path(tmp)
        before = cards.alias_holders(rc.tracking, name)
        if champion_version(rc.tracking, name) is None and stage.promotes.from_base is not None:
            first_champion(rc, stage, name, scores, run, work)
        rescore_champion(rc, stage, name, version, scores.sample_sha256, run, work)
        champion = champion_version(rc.tracking, name)
        compared = paired = None
        if champion is not None and str(champion.version) != str(version) and scores.results_dir is not None:
            with reviewed(stage.name, "comparison with the champion"):
                compared = compare_with_champion(rc.tracking, run, name, version, champion, scores.results_dir, work,
                                                 folder=f"comparison/{label}" if several else "comparison")
            if compared is None:
                logger().warning("%s: %s v%s has no per-item results on these items: no item-by-item comparison",
                                 stage.name, name, champion.version)
            elif stage.promotes.paired and len(compared["verdicts"][0]) >= 2:
                paired = paired_difference(*compared["verdicts"])
        # continued pretraining from the champion itself: decided on what it bought and what it cost
        adapted = champion is not None and scores.adaptation is not None and champion.tags.get(TAG_WEIGHTS_SHA) == scores.started_from
        decision = promote(rc.tracking, name, version, scores.metric, note=scores.note, paired=paired,
                           adaptation=scores.adaptation if adapted else None)
        if compared is not None:
            decision["disagreements"] = {
                "n": sum(n or 0 for n in compared["n_disagree"].values()),
                "items": sum(compared["n_items"].values()),
                "first": [{k: r.get(k) for k in ("task", "doc_id", "challenger_correct", "champion_correct")}
                          for r in compared["disagreements"][:5]],
            }
        run.client.log_text(run.run_id, json.dumps(decision, indent=2), artifact)
        client.set_model_version_tag(name, version, TAG_PROMOTION_RUN, run.run_id)
        client.set_model_version_tag(name, version, TAG_PROMOTION_FILE, artifact)
        if champion is not None and str(champion.version) != str(version):
            client.set_model_version_tag(name, str(champion.version), TAG_CHALLENGED_RUN, run.run_id)
            client.set_model_version_tag(name, str(champion.version), TAG_CHALLENGED_FILE, artifact)
        with reviewed(stage.name, "model cards"):  # this version's, the champion's, and those whose alias moved
            after = cards.alias_holders(rc.tracking, name)
            champions = [str(champion.version)] if champion is not None else []
            for changed in dict.fromkeys([version, *champions, *before.values(), *after.values()]):
                cards.refresh(rc.tracking, name, changed)
    prefix = f"{PROMOTION_PREFIX}{label}." if several else PROMOTION_PREFIX
    run.set_tags({f"{prefix}{k}": str(v) for k, v in decision.items() if isinstance(v, str)})
    run.log_metrics({f"{prefix}{k}": v for k, v in decision.items() if isinstance(v, float)})
    logger().info("%s v%s: %s (%s)", name, version, decision["alias"], decision["reason"])
    return {"model_version": version, "promotion": decision}


def _rescore_fn(stage: Stage):
    module, _, function = stage.promotes.rescore.partition(":")
    return getattr(importlib.import_module(module), function)


def rescore_champion(rc: RunContext, stage: Stage, name: str, version: str, sample_sha256: str, run: MlflowTracker, work: Path) -> None:
    """A champion scored on other items (another task list, limit, seed or test split) is scored on this sample
    first (the declaration's `rescore`, into `work`), so that the promotion compares like with like; its per-item
    results are kept with `run` as champion_v<N>/."""
    champion = champion_version(rc.tracking, name)
    if champion is None or str(champion.version) == str(version) or champion.tags.get(TAG_BENCH_SAMPLE) == sample_sha256:
        return
    uri = f"models:/{name}/{champion.version}"
    logger().info("champion %s v%s was scored on other items: scoring it on this sample", name, champion.version)
    with tempfile.TemporaryDirectory(prefix="lmcore-champion-") as tmp:
        model_dir = download_model_dir(uri, rc.tracking.uri, Path(tmp) / "model")
        scores = _rescore_fn(stage)(stage.context(rc.root, rc.params), model_dir, work / f"rescored-v{champion.version}", uri)
    tag_scores(rc.tracking, name, str(champion.version), scores.values, scores.sample_sha256)
    record_results(rc.tracking, run, name, str(champion.version), scores, f"champion_v{champion.version}")


def serves(base_dir: Path, from_base: str | None) -> bool:
    """Whether the pretrained base in `base_dir` can serve a family whose declaration says `from_base`."""
    if from_base is None or not (base_dir / WEIGHTS).is_file():
        return False
    if from_base == "chat":
        return has_tokenizer(base_dir) and load_tokenizer(base_dir).chat_template is not None
    return True


def first_champion(rc: RunContext, stage: Stage, name: str, scores: Scores, run: MlflowTracker, work: Path) -> str | None:
    """The model the run started from as the first champion of family `name`: when the run starts from a
    pretrained base (base_model.source is not scratch) that can serve the family, that base is registered into it
    (its own run, `base_model:<family>`; found by its weights when already there), scored on the items `scores`
    were scored on, and given `champion`. Returns its version, or None when there is no such base."""
    base_dir = rc.layout.base_source
    if rc.params.base_model.source == "scratch" or not serves(base_dir, stage.promotes.from_base):
        return None
    weights = sha256_file(base_dir / WEIGHTS)
    client = rc.tracking.client()
    version = find_version(rc.tracking, name, weights)
    what = rc.params.base_model.name or rc.params.base_model.source
    if version is None:
        manifest = base_dir / BASE_MANIFEST
        lineage = {TAG_BASE_MANIFEST_SHA: sha256_file(manifest)} if manifest.is_file() else {}
        with rc.tracking.run(f"base_model:{stage.promotes.name}", tags={TAG_ORIGIN: BASE_ORIGIN, **lineage}) as base_run:
            if manifest.is_file():  # where it came from, for `lmcore lineage`
                base_run.log_artifact(manifest, BASE_MANIFEST_DIR)
            facts_dir = work / "base-facts"
            facts_dir.mkdir(parents=True, exist_ok=True)
            kind = "instruct" if stage.promotes.from_base == "chat" else "base"
            facts = card_facts(base_dir, kind=kind, stage="base_model", started_from=f"the pretrained base ({what}), as downloaded",
                               data={}, training={}, extra={"origin": BASE_ORIGIN})
            write_json(facts_dir / "card.json", facts)
            version = log_and_register(rc.tracking, base_run.run_id, base_dir, name, tags={TAG_WEIGHTS_SHA: weights, TAG_ORIGIN: BASE_ORIGIN})
            if cards.log_facts(base_run, facts_dir):
                cards.refresh(rc.tracking, name, version)
        logger().info("%s: registered the pretrained base %s as %s v%s", stage.name, what, name, version)
    uri = f"models:/{name}/{version}"
    base_scores = _rescore_fn(stage)(stage.context(rc.root, rc.params), base_dir, work / "base-scored", uri)
    tag_scores(rc.tracking, name, version, base_scores.values, base_scores.sample_sha256)
    for key, value in base_scores.settings.items():
        client.set_model_version_tag(name, version, f"{BENCH_SETTINGS_PREFIX}{key}", value)
    record_results(rc.tracking, run, name, version, base_scores, f"base_v{version}")
    decision = {"metric": scores.metric, "version": str(version), "alias": CHAMPION,
                "reason": f"the model this run started from ({what}): the first champion, which a fine-tune must beat",
                **{k: base_scores.values.get(f"{scores.metric}{s}") for k, s in (("value", ""), ("stderr", "_stderr"))}}
    artifact = f"promotion/base_v{version}.json"
    run.client.log_text(run.run_id, json.dumps(decision, indent=2), artifact)
    client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in ((TAG_PROMOTION_RUN, run.run_id), (TAG_PROMOTION_FILE, artifact),
                       (f"{PROMOTION_PREFIX}alias", CHAMPION), (f"{PROMOTION_PREFIX}reason", decision["reason"])):
        client.set_model_version_tag(name, version, key, value)
    cards.refresh(rc.tracking, name, version)
    return version
