"""Classification fine-tuning on the real SMS Spam Collection: data prep, learning, metrics, the saved model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from lmcore.checkpoint import read_model_config
from lmcore.config import SMS_SPAM, ClassifierConfig, LoraConfig, Source
from lmcore.finetune.classifier import classification_metrics, classify, finetune_classifier, load_classifier, prepare_classification
from lmcore.finetune.common import read_split
from lmcore.finetune.data import DataError
from lmcore.paths import ADAPTER, CONFUSION_PLOT, LOSS_PLOT, METRICS, STATS, SUMMARY, TRAIN_LOSS, VAL_LOSS
from lmcore.tracking import ListTracker
from tests.finetune.conftest import MIRROR, collect_source

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_cfg(**overrides) -> ClassifierConfig:
    base = dict(max_length=48, trainable_blocks=None, batch_size=16, max_steps=80, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                eval_interval=40, eval_batches=2, device="cpu")
    return ClassifierConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def spam_splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("spam")
    raw = collect_source(SMS_SPAM, out)
    stats = prepare_classification(micro_cfg(), raw, out / "splits", seed=7)
    return out / "splits", stats


def test_prepare_balances_and_splits_70_10_20(spam_splits):
    splits, stats = spam_splits
    assert stats["read"]["per_label"] == {"ham": 4827, "spam": 747}
    assert stats["records"] == 2 * 747
    sizes = {name: sum(counts.values()) for name, counts in stats["splits"].items()}
    assert sizes == {"train": 1045, "val": 149, "test": 300}  # int(0.7 n), int(0.1 n) per class; test the rest
    for counts in stats["splits"].values():
        assert abs(counts["ham"] - counts["spam"]) <= 1
    rows = {name: read_split(splits, name) for name in ("train", "val", "test")}
    texts = [r["where"] for part in rows.values() for r in part]
    assert len(texts) == len(set(texts)) == 1494  # no record in two splits
    assert json.loads((splits / STATS).read_text())["splits"] == stats["splits"]


def test_classifier_learns_spam_beats_majority_baseline(spam_splits, base_model_dir, enc, tmp_path):
    splits, _ = spam_splits
    tracker = ListTracker()
    summary = finetune_classifier(micro_cfg(), base_model_dir, splits, tmp_path / "model", tmp_path / "reports",
                                  seed=0, enc=enc, tracker=tracker)
    test = summary["metrics"]["test"]
    assert test["majority_baseline_accuracy"] == pytest.approx(0.5, abs=0.01)
    assert test["accuracy"] >= test["majority_baseline_accuracy"] + 0.25, test
    assert test["f1"] > 0.7
    assert summary["final_val_loss"] < summary["first_val_loss"]
    # per-step metrics went to the tracker; files for DVC and MLflow exist
    logged = {k for _, m in tracker.records for k in m}
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "trainable_params", "test_f1"} <= logged
    for name in (METRICS, SUMMARY, TRAIN_LOSS, VAL_LOSS, LOSS_PLOT, CONFUSION_PLOT, "test_predictions.csv"):
        assert (tmp_path / "reports" / name).is_file(), name
    cm = np.array(summary["confusion_matrix"]["test"])
    assert cm.sum() == 300 and np.trace(cm) / 300 == pytest.approx(test["accuracy"])

    # the saved classifier reloads and predicts what the run measured
    model, labels, max_length = load_classifier(tmp_path / "model")
    assert labels == ["ham", "spam"] and max_length == 48
    rows = read_split(splits, "test")
    probs = classify(model, enc, [r["text"] for r in rows], max_length)
    assert probs.shape == (300, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert float((probs.argmax(1) == [r["label"] for r in rows]).mean()) == pytest.approx(test["accuracy"])


def test_default_trains_last_block_norm_and_head_only(spam_splits, base_model_dir, enc, tmp_path):
    splits, _ = spam_splits
    tracker = ListTracker()
    summary = finetune_classifier(micro_cfg(trainable_blocks=1, max_steps=2, eval_interval=2), base_model_dir, splits,
                                  tmp_path / "m", tmp_path / "r", seed=0, enc=enc, tracker=tracker)
    n_embd = 32
    block = 4 * n_embd + (3 * n_embd * n_embd + 3 * n_embd) + (n_embd * n_embd + n_embd) + (4 * n_embd * n_embd + 4 * n_embd) + (4 * n_embd * n_embd + n_embd)
    assert summary["trainable_params"] == block + 2 * n_embd + (2 * n_embd + 2)  # last block, norm_f, head


def test_frozen_prefix_cache_equals_the_uncached_run_and_skips_the_frozen_blocks(spam_splits, base_model_dir, enc,
                                                                                   tmp_path, monkeypatch):
    """With the first block frozen, its output is computed once per example: the run ends with the same losses, metrics
    and weights as the one that runs the whole model at every step, and the frozen block runs once per example."""
    from lmcore.model import Block

    splits, _ = spam_splits
    calls = []
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, x, *a, **kw: calls.append(x.shape[0]) or forward(self, x, *a, **kw))
    cfg = dict(trainable_blocks=1, max_steps=12, eval_interval=6, eval_batches=1)
    runs = {}
    for cache in (False, True):
        calls.clear()
        summary = finetune_classifier(micro_cfg(**cfg, cache_frozen=cache), base_model_dir, splits, tmp_path / f"m{cache}",
                                      tmp_path / f"r{cache}", seed=0, enc=enc)
        runs[cache] = summary, sum(calls)
    (plain, plain_rows), (cached, cached_rows) = runs[False], runs[True]
    assert cached["cached_frozen_blocks"] == 1 and plain["cached_frozen_blocks"] == 0
    assert cached["first_val_loss"] == pytest.approx(plain["first_val_loss"], rel=1e-5)
    assert cached["final_val_loss"] == pytest.approx(plain["final_val_loss"], rel=1e-4)
    for split in ("val", "test"):
        assert cached["metrics"][split]["loss"] == pytest.approx(plain["metrics"][split]["loss"], rel=1e-4)
        assert cached["confusion_matrix"][split] == plain["confusion_matrix"][split]
    # rows through a block: the uncached run passes every batch through both blocks; the cached one runs block 0
    # once for each of the 1,494 examples, and only block 1 at every step and evaluation
    assert cached_rows == 1494 + plain_rows // 2
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "mFalse" / "model.safetensors"), load_file(tmp_path / "mTrue" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)  # 12 AdamW steps of float rounding


def test_lora_classifier_trains_adapters_and_head(spam_splits, base_model_dir, enc, tmp_path):
    splits, _ = spam_splits
    cfg = micro_cfg(lora=LoraConfig(enabled=True, rank=4, alpha=8), max_steps=3, eval_interval=3)
    summary = finetune_classifier(cfg, base_model_dir, splits, tmp_path / "m", tmp_path / "r", seed=0, enc=enc)
    per_layer = 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))  # rank * (in + out) per wrapped Linear
    assert summary["trainable_params"] == 2 * per_layer + (2 * 32 + 2)
    assert summary["lora"] and (tmp_path / "m" / ADAPTER).is_file()
    _, extra = read_model_config(tmp_path / "m")
    assert extra["head"] == {"type": "classifier", "labels": ["ham", "spam"]}
    load_classifier(tmp_path / "m")  # merged weights load as a plain classifier


def test_metrics_match_sklearn_for_three_classes():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["accuracy"] == pytest.approx(float((y == p).mean()))
    assert np.array(m["confusion_matrix"]).sum() == 50


def test_sentiment_sentences_work_as_a_second_dataset(base_model_dir, enc, tmp_path):
    """The UCI sentiment files: text<TAB>label, labels 0/1, three files."""
    shasums = dict(line.split()[::-1] for line in (MIRROR / "SHA256SUMS").read_text().splitlines() if line.strip())
    sources = [
        Source(name=name, path=str(MIRROR / f"classification/sentiment_labelled_sentences/{name}_labelled.txt"),
               sha256=shasums[f"classification/sentiment_labelled_sentences/{name}_labelled.txt"])
        for name in ("amazon_cells", "imdb", "yelp")
    ]
    from lmcore.config import CollectConfig
    from lmcore.data.collect import collect

    collect(CollectConfig(sources=sources), tmp_path / "raw")
    cfg = micro_cfg(sources=sources, labels=["0", "1"], label_column=-1, max_steps=4, eval_interval=4)
    stats = prepare_classification(cfg, tmp_path / "raw", tmp_path / "splits", seed=0)
    assert stats["read"]["per_label"] == {"0": 1500, "1": 1500}
    summary = finetune_classifier(cfg, base_model_dir, tmp_path / "splits", tmp_path / "m", tmp_path / "r", seed=0, enc=enc)
    assert summary["examples"] == {"train": 2100, "val": 300, "test": 600}


def test_wrong_label_names_the_file_and_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "d.txt").write_text("ham\thello there\nspam\twin a prize\nhamm\ttypo label\n")
    (raw / "manifest.json").write_text(json.dumps({"sources": [{"name": "d", "file": "d.txt"}]}))
    with pytest.raises(DataError, match=r"d\.txt:3.*hamm"):
        prepare_classification(micro_cfg(), raw, tmp_path / "splits", seed=0)
    assert not (tmp_path / "splits").exists()  # nothing half-written
