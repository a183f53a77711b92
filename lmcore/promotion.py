"""The promotion gate: does a new model version take `champion` from the current one? A pure comparison of
scores and standard errors; the registry (tasks.registry.promote) reads the scores, calls `decide` and moves the
alias.

    decide("hellaswag.acc_norm", "3", Score(0.31, 0.02, "s1"), Champion("2", Score(0.26, 0.02, "s1")))
    # {"alias": "champion", "reason": "beats v2 by more than the combined stderr", "difference": 0.05, ...}

Rules, in order: the first version ever scored becomes champion; the champion scored again stays champion; a
champion with no score on the metric yields to the new version; scores on other items (another task list, limit
or sample seed) are not compared and the new version is `challenger`; otherwise the new version takes `champion`
only when it beats the champion by more than the combined standard error sqrt(se_new^2 + se_champion^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class Score:
    """A version's score on the metric, its standard error, and which items it was computed on."""

    value: float
    stderr: float
    sample_sha256: str | None


@dataclass(frozen=True)
class Champion:
    """The current champion: its version and its score (None when it has no score on the metric)."""

    version: str
    score: Score | None


def decide(metric: str, version: str, score: Score, champion: Champion | None) -> dict[str, Any]:
    """Which alias `version` gets, why, and the numbers behind it.

    Returns: {"metric", "value", "stderr", "version", "alias", "reason"} and, when compared with a champion,
        "champion_version", "champion_value", "champion_stderr", "difference", "combined_stderr".
    """
    decision: dict[str, Any] = {"metric": metric, "value": score.value, "stderr": score.stderr, "version": str(version)}
    if champion is None:
        return {**decision, "alias": CHAMPION, "reason": "no champion yet"}
    decision["champion_version"] = str(champion.version)
    if str(champion.version) == str(version):
        return {**decision, "alias": CHAMPION, "reason": "already the champion"}
    if champion.score is None:
        return {**decision, "alias": CHAMPION, "reason": f"champion v{champion.version} has no {metric} score"}
    if champion.score.sample_sha256 != score.sample_sha256:
        return {**decision, "alias": CHALLENGER, "reason": f"champion v{champion.version} was scored on other items; not compared"}
    margin = math.sqrt(score.stderr**2 + champion.score.stderr**2)
    difference = score.value - champion.score.value
    beats = difference > margin
    return {
        **decision,
        "alias": CHAMPION if beats else CHALLENGER,
        "reason": ("beats" if beats else "does not beat") + f" v{champion.version} by more than the combined stderr",
        "champion_value": champion.score.value,
        "champion_stderr": champion.score.stderr,
        "difference": difference,
        "combined_stderr": margin,
    }
