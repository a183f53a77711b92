"""Typed parameters for every stage, read from params.yaml.

params.yaml is the one source of parameters for DVC, Prefect and the CLI. It is validated here:
an unknown key or a value of the wrong type is a `ParamsError` that names the dotted key.

    params = load_params("params.yaml", overrides=["pretrain.lr=3e-4"])
    params.pretrain.lr  # 0.0003

By concern: base (Section, ParamsError), data, model, training, evaluation, operations, sources (the catalogue
of pinned public files), params (Params, load_params). Everything is importable from here.
"""

from lmcore.config.base import ParamsError, Section
from lmcore.config.sources import BENCHMARK_SOURCES, GENERATIVE_SOURCES, INSTRUCTION_DATA, PREFERENCE_DATA, SMS_SPAM
from lmcore.config.data import (
    CollectConfig,
    GopherQualityConfig,
    NearDedupConfig,
    PiiConfig,
    PreprocessConfig,
    RepetitionConfig,
    Source,
    TEXT_FORMATS,
    TokenizeConfig,
    TrainTokenizerConfig,
)
from lmcore.config.model import (
    BASE_SOURCE_KEYS,
    BaseModelConfig,
    FILE_NAME_PATTERN,
    MAX_CONTEXT,
    MAX_LAYERS,
    MAX_MLP,
    MAX_MODEL_BYTES,
    MAX_VOCAB,
    MAX_WIDTH,
    MODEL_PRESETS,
    ModelConfig,
)
from lmcore.config.training import (
    ClassifierConfig,
    ContinuedConfig,
    DpoConfig,
    FinetuneConfig,
    InstructConfig,
    LoraConfig,
    PretrainConfig,
    RESUME_FREE_KEYS,
    TrainConfig,
)
from lmcore.config.evaluation import API_KEY_ENV, BenchmarkConfig, EvaluateConfig, InstructEvalConfig, JudgeConfig
from lmcore.config.operations import TrackingConfig
from lmcore.config.params import PROBE_SECTIONS, Params, load_params, params_from_dict, parse_override

__all__ = [
    "API_KEY_ENV",
    "BASE_SOURCE_KEYS",
    "BENCHMARK_SOURCES",
    "BaseModelConfig",
    "BenchmarkConfig",
    "ClassifierConfig",
    "CollectConfig",
    "ContinuedConfig",
    "DpoConfig",
    "EvaluateConfig",
    "FILE_NAME_PATTERN",
    "FinetuneConfig",
    "GENERATIVE_SOURCES",
    "GopherQualityConfig",
    "INSTRUCTION_DATA",
    "InstructConfig",
    "InstructEvalConfig",
    "JudgeConfig",
    "LoraConfig",
    "MAX_CONTEXT",
    "MAX_LAYERS",
    "MAX_MLP",
    "MAX_MODEL_BYTES",
    "MAX_VOCAB",
    "MAX_WIDTH",
    "MODEL_PRESETS",
    "ModelConfig",
    "NearDedupConfig",
    "PREFERENCE_DATA",
    "PROBE_SECTIONS",
    "Params",
    "ParamsError",
    "PiiConfig",
    "PreprocessConfig",
    "PretrainConfig",
    "RESUME_FREE_KEYS",
    "RepetitionConfig",
    "SMS_SPAM",
    "Section",
    "Source",
    "TEXT_FORMATS",
    "TokenizeConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainTokenizerConfig",
    "load_params",
    "params_from_dict",
    "parse_override",
]
