"""Eval-gated promotion: the decision alone (lmcore.promotion, no MLflow), then on a real MLflow SQLite registry:
champion moves only past the combined standard error, and only between versions scored on the same items."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from lmcore.promotion import Adaptation, Champion, Score, decide, lower_is_better, paired_difference, per_token
from lmcore.tokenizer import get_tokenizer
from tasks.registry import promote, tag_scores, tokenizer_tags
from tasks.tags import TAG_TOKENIZER, TAG_TOKENIZER_SHA
from tasks.tracking import Tracking
from tests.test_tokenizer import SHARED

METRIC = "hellaswag.acc_norm"


def test_decision_rules_without_a_registry():
    mine = Score(0.34, 0.03, "s1")
    assert decide(METRIC, "2", mine, None)["reason"] == "no champion yet"
    assert decide(METRIC, "2", mine, Champion("2", mine))["alias"] == "champion"
    unscored = decide(METRIC, "2", mine, Champion("1", None))
    assert unscored["alias"] == "champion" and unscored["reason"] == f"champion v1 has no {METRIC} score"
    elsewhere = decide(METRIC, "2", Score(0.9, 0.01, "s2"), Champion("1", Score(0.25, 0.01, "s1")))
    assert elsewhere["alias"] == "challenger" and "scored on other items" in elsewhere["reason"]

    close = decide(METRIC, "2", mine, Champion("1", Score(0.30, 0.03, "s1")))  # +0.04 < sqrt(0.03^2 + 0.03^2)
    assert close["alias"] == "challenger" and close["reason"] == "does not beat v1 by more than the combined stderr"
    assert close["difference"] == pytest.approx(0.04) and close["combined_stderr"] == pytest.approx(math.hypot(0.03, 0.03))
    clear = decide(METRIC, "3", Score(0.40, 0.02, "s1"), Champion("1", Score(0.30, 0.03, "s1")))
    assert clear["alias"] == "champion" and clear["champion_version"] == "1" and clear["champion_value"] == 0.30
    # exactly the combined stderr is not enough: it must be beaten
    edge = decide(METRIC, "2", Score(0.35, 0.03, "s1"), Champion("1", Score(0.30, 0.04, "s1")))
    assert edge["combined_stderr"] == pytest.approx(0.05) and edge["alias"] == "challenger"


def test_a_metric_that_is_not_meaningful_is_never_compared():
    note = "n/a: 71% of 400 items cut to fit the 128-token context"
    first = decide(METRIC, "1", None, None, note=note)
    assert first["alias"] == "champion" and first["value"] is None
    assert first["reason"] == f"no champion yet; {METRIC} is not meaningful for v1 ({note})"
    later = decide(METRIC, "2", None, Champion("1", Score(0.25, 0.01, "s1")), note=note)
    assert later["alias"] == "challenger" and later["reason"] == f"{METRIC} is not meaningful for v2 ({note}); not compared with v1"
    assert "difference" not in later and decide(METRIC, "1", None, Champion("1", None), note=note)["alias"] == "champion"


GPT2, BPE = ("a" * 64, "gpt2"), ("b" * 64, "bpe-4096")  # (sha256, name) of two tokenizers


def test_per_token_losses_are_not_compared_across_tokenizers():
    assert [per_token(m) for m in ("val_loss", "eval.val_loss", "test_loss", "perplexity", "val_bpb", "hellaswag.acc_norm")] == [
        True, True, True, True, False, False]
    assert [lower_is_better(m) for m in ("val_loss", "perplexity", "val_bpb", "hellaswag.acc_norm")] == [True, True, True, False]

    # v2 (a 4k BPE) has a far lower per-token loss than v1 (GPT-2): its tokens are shorter, not its model better
    refused = decide("val_loss", "2", Score(3.1, 0.01, "s1", *BPE), Champion("1", Score(4.2, 0.01, "s1", *GPT2)))
    assert refused["alias"] == "challenger"
    assert refused["reason"] == "per-token val_loss is not comparable across tokenizers (bpe-4096 vs gpt2); compare val_bpb"
    # two tokenizers with one name are told apart by their sha256
    same_name = decide("perplexity", "2", Score(20.0, 0.1, "s1", "c" * 64, "bpe"), Champion("1", Score(40.0, 0.1, "s1", "d" * 64, "bpe")))
    assert same_name["reason"] == f"per-token perplexity is not comparable across tokenizers (bpe ({'c' * 12}) vs bpe ({'d' * 12})); compare val_bpb"

    # bits per byte and accuracies compare across tokenizers, each in its direction
    bpb = decide("val_bpb", "2", Score(1.10, 0.01, "s1", *BPE), Champion("1", Score(1.20, 0.01, "s1", *GPT2)))
    assert bpb["alias"] == "champion" and bpb["difference"] == pytest.approx(-0.10)
    worse = decide("val_bpb", "2", Score(1.30, 0.01, "s1", *BPE), Champion("1", Score(1.20, 0.01, "s1", *GPT2)))
    assert worse["alias"] == "challenger" and worse["reason"] == "does not beat v1 by more than the combined stderr"
    acc = decide(METRIC, "2", Score(0.40, 0.02, "s1", *BPE), Champion("1", Score(0.30, 0.03, "s1", *GPT2)))
    assert acc["alias"] == "champion" and acc["reason"] == "beats v1 by more than the combined stderr"
    # one tokenizer (or one not recorded, a version from before): a per-token loss compares, lower is better
    same = decide("val_loss", "2", Score(3.1, 0.01, "s1", *GPT2), Champion("1", Score(4.2, 0.01, "s1", *GPT2)))
    assert same["alias"] == "champion" and same["difference"] == pytest.approx(-1.1)
    assert decide("val_loss", "2", Score(3.1, 0.01, "s1", *BPE), Champion("1", Score(4.2, 0.01, "s1")))["alias"] == "champion"


def test_a_paired_comparison_decides_on_the_stderr_of_the_differences():
    # 200 items: the challenger right on 8 more items than the champion, the two agreeing on the other 192
    old = [True] * 100 + [False] * 100
    new = [True] * 108 + [False] * 92
    diff, se = paired_difference(new, old)
    d = [a - b for a, b in zip(map(float, new), map(float, old))]
    assert diff == pytest.approx(0.04) and se == pytest.approx(math.sqrt(sum((x - 0.04) ** 2 for x in d) / 199 / 200))
    scores = [Score(sum(v) / 200, math.sqrt(0.25 / 199), "s1") for v in (new, old)]  # stderr of each mean, ~0.035
    unpaired = decide("test.accuracy", "2", scores[0], Champion("1", scores[1]))
    assert unpaired["alias"] == "challenger"  # +0.04 < the combined stderr (0.050)
    paired = decide("test.accuracy", "2", scores[0], Champion("1", scores[1]), paired=(diff, se))
    assert paired["alias"] == "champion" and paired["reason"] == "beats v1 by more than the paired stderr"
    assert paired["combined_stderr"] == pytest.approx(se) and paired["paired"] is True  # 0.014: the 192 shared items cancel
    with pytest.raises(ValueError, match="two equal lists"):
        paired_difference([True], [False])


def test_continued_pretraining_is_decided_on_what_it_bought_and_what_it_cost():
    """Adapted (held-out bpb down beyond its stderr) and no benchmark loss beyond the combined stderr: champion,
    though it does not beat the champion on the benchmark; either condition missing: challenger."""
    champion = Champion("1", Score(0.37, 0.06, "s1"))  # the base it continued
    bought = Adaptation(before=1.842, after=1.748, stderr=0.01)
    adapted = decide(METRIC, "2", Score(0.35, 0.06, "s1"), champion, adaptation=bought)
    assert adapted["alias"] == "champion" and adapted["reason"].startswith("adapts to the corpus (held-out bits per byte 1.8420 -> 1.7480 (-0.0940 ± 0.0100))")
    assert f"{METRIC} -0.0200 ± 0.0849 against v1" in adapted["reason"]
    assert (adapted["heldout_bpb_change"], adapted["heldout_bpb_change_stderr"]) == (pytest.approx(-0.094), 0.01)
    assert decide(METRIC, "2", Score(0.35, 0.06, "s1"), champion)["alias"] == "challenger"  # the benchmark alone

    forgot = decide(METRIC, "2", Score(0.15, 0.05, "s1"), champion, adaptation=bought)  # -0.22 beyond 0.078
    assert forgot["alias"] == "challenger" and "but loses more than the combined stderr on the benchmark" in forgot["reason"]
    noise = decide(METRIC, "2", Score(0.37, 0.06, "s1"), champion, adaptation=Adaptation(1.842, 1.838, 0.01))
    assert noise["alias"] == "challenger" and "is no gain beyond its stderr" in noise["reason"]
    better = decide(METRIC, "2", Score(0.60, 0.05, "s1"), champion, adaptation=Adaptation(1.842, 1.838, 0.01))
    assert better["alias"] == "champion" and better["reason"].startswith("beats v1 by more than the combined stderr; held-out")


def test_a_bare_registered_name_is_its_champion(tmp_path):
    from tasks.registry import registered_version

    tracking, client, (v1, v2) = registry(tmp_path, 2)
    scored(tracking, v1, 0.25, 0.01)
    scored(tracking, v2, 0.40, 0.01)
    assert str(registered_version("models:/m", tracking.uri).version) == v2  # models:/m is models:/m@champion
    assert str(registered_version("models:/m/1", tracking.uri).version) == v1
    assert registered_version("runs:/abc/model", tracking.uri) is None


def registry(tmp_path, n: int) -> tuple[Tracking, MlflowClient, list[str]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(uri=uri, experiment="promotion")
    client = tracking.client()
    client.create_registered_model("m")
    versions = [str(client.create_model_version("m", source=str(tmp_path / f"v{i}")).version) for i in range(n)]
    return tracking, client, versions


def scored(tracking, version, value, stderr, sample="s1"):
    tag_scores(tracking, "m", version, {METRIC: value, f"{METRIC}_stderr": stderr, "mmlu.acc": 0.25}, sample)
    return promote(tracking, "m", version, METRIC)


def test_champion_moves_only_beyond_the_combined_stderr(tmp_path):
    tracking, client, (v1, v2, v3) = registry(tmp_path, 3)
    first = scored(tracking, v1, 0.30, 0.03)
    assert first["alias"] == "champion" and first["reason"] == "no champion yet"

    # +0.04 with stderrs 0.03 and 0.03: combined 0.0424 -> not enough
    close = scored(tracking, v2, 0.34, 0.03)
    assert close["alias"] == "challenger"
    assert math.isclose(close["combined_stderr"], math.hypot(0.03, 0.03)) and math.isclose(close["difference"], 0.04)
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1
    assert str(client.get_model_version_by_alias("m", "challenger").version) == v2

    clear = scored(tracking, v3, 0.40, 0.02)
    assert clear["alias"] == "champion" and clear["champion_version"] == v1
    assert str(client.get_model_version_by_alias("m", "champion").version) == v3
    tags = client.get_model_version("m", v3).tags
    assert tags["promotion.alias"] == "champion" and float(tags[f"bench.{METRIC}"]) == 0.40
    assert tags["bench.sample_sha256"] == "s1" and float(tags["bench.mmlu.acc"]) == 0.25
    # scoring the champion again changes nothing
    assert scored(tracking, v3, 0.40, 0.02)["reason"] == "already the champion"


def test_a_version_not_meaningful_on_its_sample_is_challenger(tmp_path):
    tracking, client, (v1, v2) = registry(tmp_path, 2)
    scored(tracking, v1, 0.25, 0.01)
    tag_scores(tracking, "m", v2, {"mmlu.acc": 0.3}, "s1")  # no METRIC: not meaningful on s1
    decision = promote(tracking, "m", v2, METRIC, note="n/a: 100% of 8 items cut to fit the 16-token context")
    assert decision["alias"] == "challenger" and "not meaningful for v2" in decision["reason"]
    assert client.get_model_version("m", v2).tags["promotion.alias"] == "challenger"
    with pytest.raises(ValueError, match="no hellaswag.acc_norm score"):
        promote(tracking, "m", v2, METRIC)
    # the champion re-scored on a sample where the metric is not meaningful keeps no stale score for it
    tag_scores(tracking, "m", v1, {"mmlu.acc": 0.3}, "s2")
    tags = client.get_model_version("m", v1).tags
    assert f"bench.{METRIC}" not in tags and f"bench.{METRIC}_stderr" not in tags and tags["bench.sample_sha256"] == "s2"


def test_scores_on_other_items_are_not_compared(tmp_path):
    tracking, client, (v1, v2) = registry(tmp_path, 2)
    scored(tracking, v1, 0.25, 0.01, sample="s1")
    other = scored(tracking, v2, 0.90, 0.01, sample="s2")  # far better, but on another sample
    assert other["alias"] == "challenger" and "scored on other items" in other["reason"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1


def test_the_registry_reads_each_versions_tokenizer(tmp_path):
    """Versions carry their model folder's tokenizer as tags (log_and_register sets tokenizer_tags); promotion on a
    per-token loss refuses versions with different ones and still compares acc_norm."""
    folder = tmp_path / "model"
    get_tokenizer("gpt2", SHARED / "tokenizers" / "gpt2.tiktoken").save(folder)
    gpt2_tags = tokenizer_tags(folder)
    assert gpt2_tags == {TAG_TOKENIZER: "gpt2", TAG_TOKENIZER_SHA: "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"}
    assert tokenizer_tags(tmp_path) == {}

    tracking, client, (v1, v2, v3) = registry(tmp_path, 3)
    for version, tags in ((v1, gpt2_tags), (v2, {TAG_TOKENIZER: BPE[1], TAG_TOKENIZER_SHA: BPE[0]})):
        for key, value in tags.items():
            client.set_model_version_tag("m", version, key, value)
        tag_scores(tracking, "m", version, {"val_loss": 4.2 if version == v1 else 3.1, "val_loss_stderr": 0.01}, "s1")
    assert promote(tracking, "m", v1, "val_loss")["alias"] == "champion"
    refused = promote(tracking, "m", v2, "val_loss")
    assert refused["alias"] == "challenger"
    assert refused["reason"] == "per-token val_loss is not comparable across tokenizers (bpe-4096 vs gpt2); compare val_bpb"
    assert client.get_model_version("m", v2).tags["promotion.reason"] == refused["reason"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1

    scored(tracking, v1, 0.30, 0.03)
    assert scored(tracking, v2, 0.40, 0.02)["alias"] == "champion"  # acc_norm: compared across tokenizers
    # a version registered before tokenizers were tagged is compared as before
    tag_scores(tracking, "m", v3, {"val_loss": 2.0, "val_loss_stderr": 0.01}, "s1")
    tag_scores(tracking, "m", v2, {"val_loss": 3.1, "val_loss_stderr": 0.01}, "s1")
    assert promote(tracking, "m", v3, "val_loss")["alias"] == "champion"


def test_registry_lock_serialises_promotions_across_processes(tmp_path, prefect_harness):
    """Two processes that hold the lock of one registered model for 1.5 s each run one after the other."""
    import json
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    script = (
        "import json, sys, time\n"
        "from tasks.registry import registry_lock\n"
        "with registry_lock(sys.argv[1]):\n"
        "    start = time.time(); time.sleep(1.5); end = time.time()\n"
        "print(json.dumps([start, end]))\n"
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    procs = [subprocess.Popen([sys.executable, "-c", script, name], env=env, stdout=subprocess.PIPE, text=True)
             for name in ("lmcore-base", "lmcore-base")]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        spans.append(json.loads(out.strip().splitlines()[-1]))
    (a0, a1), (b0, b1) = spans
    assert a1 <= b0 or b1 <= a0  # one after the other
