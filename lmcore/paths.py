"""Where each stage's outputs land, relative to a project root. dvc.yaml names the same paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# File names inside stage folders (named once, used everywhere).
MANIFEST = "manifest.json"
STATS = "stats.json"
DOCUMENTS = "documents.jsonl"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
RESOLVED_PARAMS = "params.yaml"
METRICS = "metrics.json"
SAMPLES = "samples.jsonl"
TRAIN_LOSS = "train_loss.csv"
VAL_LOSS = "val_loss.csv"
LOSS_PLOT = "loss.png"
SUMMARY = "summary.json"
# Fine-tuning.
SPLITS = ("train", "val", "test")  # each written as <split>.jsonl
CONFUSION_PLOT = "confusion_matrix.png"
TEST_RESPONSES = "test_responses.jsonl"
ADAPTER = "adapter.safetensors"  # the LoRA adapter alone (the model folder holds the merged weights)
ADAPTER_CONFIG = "adapter_config.json"
FINETUNES = ("classifier", "instruct", "dpo")
JUDGE_SCORES = "scores.jsonl"  # per judged response: the judge's reply and its score


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def clean(self) -> Path:
        return self.root / "data" / "clean"

    @property
    def tokens(self) -> Path:
        return self.root / "data" / "tokens"

    @property
    def base_model(self) -> Path:
        return self.root / "models" / "base"

    @property
    def pretrain_reports(self) -> Path:
        return self.root / "reports" / "pretrain"

    @property
    def evaluate_reports(self) -> Path:
        return self.root / "reports" / "evaluate"

    @property
    def benchmark_data(self) -> Path:
        """data/benchmarks: the benchmark files, collected (manifest.json names each source's file)."""
        return self.root / "data" / "benchmarks"

    def finetune_data(self, name: str) -> Path:
        """data/finetune/<name>: raw/ (collected, with manifest) and splits/ (train/val/test.jsonl, stats.json)."""
        return self.root / "data" / "finetune" / name

    def model(self, name: str) -> Path:
        """models/<name>: base, classifier, instruct, dpo."""
        return self.root / "models" / name

    def reports(self, name: str) -> Path:
        return self.root / "reports" / name
