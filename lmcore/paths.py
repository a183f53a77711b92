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
BENCH_CURVE = "bench_curve.csv"  # the in-training benchmark probe's scores per step (lmcore.harness.probe)
LOSS_PLOT = "loss.png"
SUMMARY = "summary.json"
# Fine-tuning.
SPLITS = ("train", "val", "test")  # each written as <split>.jsonl
CONFUSION_PLOT = "confusion_matrix.png"
TEST_RESPONSES = "test_responses.jsonl"
ADAPTER = "adapter.safetensors"  # the LoRA adapter alone (the model folder holds the merged weights)
ADAPTER_CONFIG = "adapter_config.json"
JUDGE_SCORES = "scores.jsonl"  # per judged response: the judge's reply and its score
CARD = "MODEL_CARD.md"  # in a model folder: its model card (lmcore.model_card), also in HF exports
CARD_FACTS = "card.json"  # in a model folder: the card's facts, which the registry renders with the version's scores
REGISTERED = ".registered.json"  # in a model folder downloaded from the registry: its name, version, run, aliases
BASE_MANIFEST = "base.json"  # in models/base_model: where the base model came from (lmcore.base_model)


# Stage folders relative to the project root: the stage declarations (lmcore.pipeline), dvc.yaml and Layout
# all name these.
RAW = "data/raw"
CLEAN = "data/clean"
TOKENS = "data/tokens"
BENCHMARK_DATA = "data/benchmarks"
GENERATIVE_DATA = "data/instruct_eval"  # IFEval and GSM8K, collected by the instruct_eval stage
FINETUNE_DATA = "data/finetune"  # + /<name>: raw/ (collected) and splits/
MODELS = "models"  # + /<name>: base, classifier, instruct, dpo
TOKENIZER = "models/tokenizer"  # the train_tokenizer stage's trained BPE (tokenizer.json + tokenizer_config.json)
TOKENIZER_RECORD = "train.json"  # in models/tokenizer: what it was trained on, with which params, how it encodes
TOK_EVAL = "tok_eval.json"  # in reports/tokenizer: bytes per token of the trained tokenizer and GPT-2's
BASE_SOURCE = "models/base_model"  # the model a run starts from (the base_model stage); models/base is pretrain's
REPORTS = "reports"  # + /<stage>
CHECKPOINTS = "models/checkpoints"  # + /<stage>: training checkpoints; outside every stage's outputs
LOGS = "logs"  # <stage>.log: each stage run's log, tracebacks included; outside every stage's outputs


def model_path(name: str) -> str:
    return f"{MODELS}/{name}"


def reports_path(name: str) -> str:
    return f"{REPORTS}/{name}"


def finetune_data_path(name: str) -> str:
    return f"{FINETUNE_DATA}/{name}"


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def raw(self) -> Path:
        return self.root / RAW

    @property
    def clean(self) -> Path:
        return self.root / CLEAN

    @property
    def tokens(self) -> Path:
        return self.root / TOKENS

    @property
    def pretrained(self) -> Path:
        """models/base: the pretrain stage's model (the base_model stage's starting point is `base_source`)."""
        return self.model("base")

    @property
    def tokenizer(self) -> Path:
        """models/tokenizer: the tokenizer the train_tokenizer stage trained on the corpus."""
        return self.root / TOKENIZER

    @property
    def base_source(self) -> Path:
        """models/base_model: the model a run starts from (lmcore model folder + base.json; base.json alone from scratch)."""
        return self.root / BASE_SOURCE

    @property
    def pretrain_reports(self) -> Path:
        return self.reports("pretrain")

    @property
    def evaluate_reports(self) -> Path:
        return self.reports("evaluate")

    @property
    def benchmark_data(self) -> Path:
        """data/benchmarks: the benchmark files, collected (manifest.json names each source's file)."""
        return self.root / BENCHMARK_DATA

    @property
    def generative_data(self) -> Path:
        """data/instruct_eval: the generative benchmarks' files (IFEval, GSM8K), collected."""
        return self.root / GENERATIVE_DATA

    def finetune_data(self, name: str) -> Path:
        """data/finetune/<name>: raw/ (collected, with manifest) and splits/ (train/val/test.jsonl, stats.json)."""
        return self.root / finetune_data_path(name)

    def model(self, name: str) -> Path:
        """models/<name>: base, classifier, instruct, dpo."""
        return self.root / model_path(name)

    def reports(self, name: str) -> Path:
        return self.root / reports_path(name)

    def checkpoints(self, stage: str) -> Path:
        """models/checkpoints/<stage>: a training stage's checkpoints (beside the model folders, not a DVC output)."""
        return self.root / CHECKPOINTS / stage

    def log_file(self, stage: str) -> Path:
        return self.root / LOGS / f"{stage}.log"
