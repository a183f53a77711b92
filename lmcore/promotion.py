"""The promotion gate: does a new model version take `champion` from the current one? A pure comparison of
scores and standard errors; the registry (tasks.registry.promote) reads the scores, calls `decide` and moves the
alias.

    decide("hellaswag.acc_norm", "3", Score(0.31, 0.02, "s1"), Champion("2", Score(0.26, 0.02, "s1")))
    # {"alias": "champion", "reason": "beats v2 by more than the combined stderr", "difference": 0.05, ...}

A new version whose metric is not meaningful for it (no score: most of its benchmark prompts were cut to fit its
context, lmcore.harness.run.coverage; `note` says so) is not compared: it becomes champion only when there is
none yet, else `challenger`.

Rules, in order: the first version ever scored becomes champion; the champion scored again stays champion; a
champion with no score on the metric yields to the new version; a per-token loss (`per_token`: val_loss, loss,
perplexity) of versions with different tokenizers is not compared (a token is another unit of text) and the new
version is `challenger`; so are scores on other items (another task list, limit or sample seed); otherwise the new
version takes `champion` only when it beats the champion by more than the combined standard error
sqrt(se_new^2 + se_champion^2): higher is better, lower for losses, perplexity and bits per byte
(`lower_is_better`). Bits per byte and benchmark accuracies compare across tokenizers.

A paired comparison (`paired`: both versions' per-item verdicts on the same items, `paired_difference`) replaces
the combined standard error by the standard error of the per-item differences, which is smaller when the two
models get mostly the same items right: the classifier's gate, whose test split is small.

Continued pretraining is decided on two numbers (`adaptation`): what it bought, the change in held-out bits per
byte of the corpus from the champion it started from (the same windows, before and after, with the paired
standard error), and what it cost, the benchmark change against that champion. A version that does not beat the
champion on the benchmark still takes `champion` when it lowers the held-out bits per byte by more than their
standard error and loses no more than the combined standard error on the benchmark: it learned the corpus without
forgetting measurably. A version that started from another model is decided on the benchmark alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"


def per_token(metric: str) -> bool:
    """Whether `metric` is a per-token loss (its name ends in val_loss, loss or perplexity): its value depends on
    the tokenizer, what a token is."""
    return metric.endswith(("loss", "perplexity"))


def lower_is_better(metric: str) -> bool:
    """Losses, perplexity and bits per byte improve downwards; accuracies and scores upwards."""
    return per_token(metric) or metric.endswith("bpb")


@dataclass(frozen=True)
class Score:
    """A version's score on the metric, its standard error, which items it was computed on, and the tokenizer of
    the version (its name and sha256; None when not recorded)."""

    value: float
    stderr: float
    sample_sha256: str | None
    tokenizer_sha256: str | None = None
    tokenizer: str | None = None


def _tokenizers(a: Score, b: Score) -> str:
    """"name a vs name b", with sha256 prefixes when the names alone do not tell them apart."""
    names = [s.tokenizer or "unnamed" for s in (a, b)]
    if names[0] == names[1]:
        names = [f"{n} ({(s.tokenizer_sha256 or '')[:12]})" for n, s in zip(names, (a, b))]
    return " vs ".join(names)


@dataclass(frozen=True)
class Adaptation:
    """Held-out bits per byte of the corpus before and after continued pretraining, on the same windows, and the
    paired standard error of the change (lmcore.training.bpb_change): what the run bought, against the model it
    started from (the champion, for the gate to use it)."""

    before: float
    after: float
    stderr: float

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclass(frozen=True)
class Champion:
    """The current champion: its version and its score (None when it has no score on the metric)."""

    version: str
    score: Score | None


def paired_difference(new: list[bool | float], old: list[bool | float]) -> tuple[float, float]:
    """The mean per-item difference new - old of two models' verdicts (or scores) on the same items, in the same
    order, and its standard error std(d) / sqrt(n) (sample std, n - 1): a paired test's numbers."""
    if len(new) != len(old) or len(new) < 2:
        raise ValueError(f"a paired comparison needs two equal lists of at least 2 items, got {len(new)} and {len(old)}")
    d = [float(a) - float(b) for a, b in zip(new, old)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


def decide(
    metric: str, version: str, score: Score | None, champion: Champion | None, *, note: str | None = None,
    paired: tuple[float, float] | None = None, adaptation: Adaptation | None = None,
) -> dict[str, Any]:
    """Which alias `version` gets, why, and the numbers behind it.

    score: None when `metric` is not meaningful for `version` (`note` says why): nothing is compared.
    paired: (mean difference, its standard error) of the two versions' per-item verdicts on the same items
        (`paired_difference`); the margin is then that standard error, not the combined one.
    adaptation: the held-out bits per byte before (the champion's) and after continued pretraining from the
        champion: decided on both (module docstring); None: on `metric` alone.
    Returns: {"metric", "value", "stderr", "version", "alias", "reason"} and, when compared with a champion,
        "champion_version", "champion_value", "champion_stderr", "difference", "combined_stderr" (and with an
        adaptation "heldout_bpb_before", "heldout_bpb_after", "heldout_bpb_change", "heldout_bpb_change_stderr").
    """
    if score is None:
        return _not_meaningful(metric, str(version), champion, note)
    decision: dict[str, Any] = {"metric": metric, "value": score.value, "stderr": score.stderr, "version": str(version)}
    if champion is None:
        return {**decision, "alias": CHAMPION, "reason": "no champion yet"}
    decision["champion_version"] = str(champion.version)
    if str(champion.version) == str(version):
        return {**decision, "alias": CHAMPION, "reason": "already the champion"}
    if champion.score is None:
        return {**decision, "alias": CHAMPION, "reason": f"champion v{champion.version} has no {metric} score"}
    shas = (score.tokenizer_sha256, champion.score.tokenizer_sha256)
    if per_token(metric) and None not in shas and shas[0] != shas[1]:  # unrecorded (older versions): compared
        return {**decision, "alias": CHALLENGER, "reason": f"per-token {metric} is not comparable across tokenizers "
                                                           f"({_tokenizers(score, champion.score)}); compare val_bpb"}
    if champion.score.sample_sha256 != score.sample_sha256:
        return {**decision, "alias": CHALLENGER, "reason": f"champion v{champion.version} was scored on other items; not compared"}
    margin = math.sqrt(score.stderr**2 + champion.score.stderr**2)
    difference = score.value - champion.score.value
    if paired is not None:
        margin = paired[1]
    gain = -difference if lower_is_better(metric) else difference
    beats = gain > margin
    rule = "the paired stderr" if paired is not None else "the combined stderr"
    reason = ("beats" if beats else "does not beat") + f" v{champion.version} by more than {rule}"
    if adaptation is not None:
        adapted = -adaptation.change > adaptation.stderr
        kept = gain >= -margin
        held_out = (f"held-out bits per byte {adaptation.before:.4f} -> {adaptation.after:.4f} "
                    f"({adaptation.change:+.4f} ± {adaptation.stderr:.4f})")
        cost = f"{metric} {difference:+.4f} ± {margin:.4f} against v{champion.version}"
        if not beats:
            beats = adapted and kept
            if beats:
                reason = f"adapts to the corpus ({held_out}) at a benchmark cost within {rule} ({cost})"
            elif adapted:
                reason = f"adapts to the corpus ({held_out}) but loses more than {rule} on the benchmark ({cost})"
            else:
                reason = f"does not beat v{champion.version} on the benchmark ({cost}) and its {held_out} is no gain beyond its stderr"
        else:
            reason += f"; {held_out}"
        decision.update(heldout_bpb_before=adaptation.before, heldout_bpb_after=adaptation.after,
                        heldout_bpb_change=adaptation.change, heldout_bpb_change_stderr=adaptation.stderr)
    return {
        **decision,
        "alias": CHAMPION if beats else CHALLENGER,
        "reason": reason,
        "champion_value": champion.score.value,
        "champion_stderr": champion.score.stderr,
        "difference": difference,
        "combined_stderr": margin,
        **({"paired": True} if paired is not None else {}),
    }


def _not_meaningful(metric: str, version: str, champion: Champion | None, note: str | None) -> dict[str, Any]:
    """`version` has no value on `metric` (not meaningful for it): champion only when there is none yet."""
    decision: dict[str, Any] = {"metric": metric, "value": None, "stderr": None, "version": version}
    why = f"{metric} is not meaningful for v{version}" + (f" ({note})" if note else "")
    if champion is None:
        return {**decision, "alias": CHAMPION, "reason": f"no champion yet; {why}"}
    decision["champion_version"] = str(champion.version)
    if str(champion.version) == version:
        return {**decision, "alias": CHAMPION, "reason": f"already the champion; {why}"}
    return {**decision, "alias": CHALLENGER, "reason": f"{why}; not compared with v{champion.version}"}
