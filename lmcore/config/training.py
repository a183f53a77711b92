"""Params of the trainers: pretrain (and the schedule that continues a champion), the fine-tunes (classifier,
instruct, DPO) and LoRA."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from lmcore.config.base import Section
from lmcore.config.data import Source
from lmcore.config.model import ModelConfig
from lmcore.config.sources import INSTRUCTION_DATA, PREFERENCE_DATA, SMS_SPAM
from lmcore.harness.benchmarks import expand


def _known_probe_tasks(tasks: list[str]) -> list[str]:
    """eval_benchmarks: task or group names lmcore.harness.benchmarks knows (ValueError with a hint otherwise)."""
    expand(tasks)
    return tasks


class ContinuedConfig(Section):
    """The schedule of a run that continues the champion (`pretrain.init: champion`); null keeps the pretrain value.

    A continued run starts a fresh AdamW (the registry keeps weights, not optimizer state), warms up again to a
    peak usually below the first run's and decays to min_lr over its own max_steps: re-warming and re-decaying, as
    continual pretraining does (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs").
    Its steps are numbered on from the champion's, so its metrics continue the champion's curve.
    """

    max_steps: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)
    min_lr: float | None = Field(default=None, ge=0)
    warmup_steps: int | None = Field(default=None, ge=0)


class TrainConfig(Section):
    """What every trainer shares (lmcore.training.train_loop: pretraining and the fine-tunes): the batch and its
    accumulation, AdamW and its warmup-cosine schedule, precision, the evaluation cadence, training checkpoints and
    resume, the device. The defaults are pretraining's; FinetuneConfig sets its own where they differ. The run length
    (`max_steps`) and the evaluation size (`eval_batches`) mean different things in each, so each declares its own.

    `key_order`: the order of a section's keys in what is written from it (params.yaml beside every model, MLflow
    params, the checkpoints' config), kept as it was before these fields moved here, so those files do not change;
    pydantic itself lists a base class's fields first.
    """

    batch_size: int = Field(default=16, ge=1)  # examples (windows) per forward pass (micro-batch), per process
    grad_accum_steps: int = Field(default=1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(default=1e-3, gt=0)
    min_lr: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)  # matmul weights only: never norms, biases, embeddings
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    eval_interval: int = Field(default=25, ge=1)
    # fp32; bf16 autocast; fp16 autocast with a gradient scaler; auto: bf16 where the device computes it
    # natively (a GPU with bf16, a CPU with avx512_bf16 or AMX), else fp16 on a GPU and fp32 on a CPU.
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    # Training checkpoints every N optimizer steps (in the checkpoint folder the caller names; the pipeline's
    # is models/checkpoints/<stage>); null writes none. The last `keep_checkpoints` are kept.
    checkpoint_interval: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    # Continue from the latest complete checkpoint (refused when it was written under other settings);
    # false starts afresh and removes the folder's old checkpoints.
    resume: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(default=0, ge=0)  # torch intra-op threads; 0 keeps torch's default

    key_order: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _in_key_order(self, handler) -> dict[str, Any]:
        data = handler(self)  # include / exclude applied
        return {k: data[k] for k in self.key_order if k in data} | data  # keys not in key_order follow in field order

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run resuming it: all but how it runs and saves."""
        return self.model_dump(mode="json", exclude=set(RESUME_FREE_KEYS))


class PretrainConfig(TrainConfig):
    """Pretraining (lmcore.pretrain.pretrain); docs/models.md "## Training" explains each option.

    One optimizer step consumes batch_size x grad_accum_steps windows per process, and world_size times
    that under torchrun: the global batch.
    """

    # scratch: `model` from random weights. base: continue pretraining the base model (`base_model`), whose
    # architecture and tokenizer it keeps (`model` is then not used); with max_steps 0 the base is taken as it is,
    # so the fine-tuning stages start from it directly. champion: continue the registered champion
    # (models:/<tracking.registered_model>@champion) on the new shards with the `continued` schedule, when there
    # is one with the shards' tokenizer and the architecture this run would otherwise train; else as base when
    # base_model names one, else as scratch (the run says which, and why).
    init: Literal["scratch", "base", "champion"] = "scratch"
    continued: ContinuedConfig = ContinuedConfig()
    model: ModelConfig = ModelConfig()
    # Training window in tokens; null: the model's context_length (a base's may be 8k: far beyond a CPU's budget).
    seq_len: int | None = Field(default=None, ge=1)
    max_steps: int = Field(default=300, ge=0)  # 0: no update (with init base: the base as it is)
    eval_batches: int = Field(default=8, ge=1)
    # The in-training benchmark probe (lmcore.harness.probe): at step 0, every N steps and at the last step, score a
    # fixed sample of `eval_benchmarks_limit` items per task (drawn with benchmark.sample_seed, zero-shot) and log
    # train_bench.<task>.<metric>; null: off. It changes no weight, so a run may resume with other settings.
    eval_benchmarks_every: int | None = Field(default=None, ge=1)
    eval_benchmarks: list[str] = Field(default=["hellaswag"], min_length=1)  # benchmark task names (benchmark.tasks)
    eval_benchmarks_limit: int = Field(default=50, ge=1)
    # Stop when val_loss has not improved on its best by more than min_delta for `patience` evaluations
    # in a row; null trains to max_steps.
    early_stopping_patience: int | None = Field(default=None, ge=1)
    early_stopping_min_delta: float = Field(default=0.0, ge=0)
    compile: bool = False  # torch.compile the training forward and backward (needs a C++ compiler on CPU)
    # AdamW implementation: auto is fused on CPU and CUDA (one kernel over all tensors), foreach elsewhere.
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    # Device peak FLOP/s for MFU in the precision used; null measures it once with a short matmul benchmark.
    peak_flops: float | None = Field(default=None, gt=0)
    # Under torchrun (world size > 1): ddp replicates the model; fsdp shards parameters, gradients and
    # optimizer state (FSDP2 fully_shard, one group per block).
    distributed: Literal["ddp", "fsdp"] = "ddp"

    key_order = (
        "init", "continued", "model", "seq_len", "batch_size", "grad_accum_steps", "max_steps", "lr", "min_lr",
        "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "eval_interval", "eval_batches",
        "eval_benchmarks_every", "eval_benchmarks", "eval_benchmarks_limit", "early_stopping_patience",
        "early_stopping_min_delta", "precision", "compile", "optimizer_impl", "peak_flops", "checkpoint_interval",
        "keep_checkpoints", "resume", "distributed", "device", "threads",
    )

    _probe_tasks = field_validator("eval_benchmarks")(_known_probe_tasks)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        self.continuation()  # the continued schedule's min_lr must not exceed its lr either
        return self

    def continuation(self) -> PretrainConfig:
        """These settings with the `continued` schedule in place of the first run's."""
        update = {k: v for k, v in self.continued.model_dump().items() if v is not None}
        merged = self.model_copy(update=update)
        if merged.min_lr > merged.lr:
            raise ValueError(f"pretrain.continued: min_lr ({merged.min_lr}) must not exceed lr ({merged.lr})")
        return merged


# Keys a run may change when it resumes (TrainConfig.resume_key): they change how fast it runs or what it saves,
# not which numbers it computes.
RESUME_FREE_KEYS = ("threads", "checkpoint_interval", "keep_checkpoints", "resume", "peak_flops",
                    "eval_benchmarks_every", "eval_benchmarks", "eval_benchmarks_limit")


class LoraConfig(Section):
    """Low-rank adapters on the named Linear layers; the base weights stay frozen."""

    enabled: bool = False
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Suffixes of module names: "attn.qkv" matches blocks.{i}.attn.qkv.
    target_modules: list[str] = Field(default=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], min_length=1)


class FinetuneConfig(TrainConfig):
    """What every fine-tuning stage shares: data policy, split, optimisation (TrainConfig, with the fine-tunes'
    defaults), LoRA."""

    # Bad records (malformed, missing fields, unknown labels): "error" stops at the first, naming file and
    # record; "skip" drops and counts them, and fails when more than max_bad_fraction of the records are bad.
    on_bad: Literal["error", "skip"] = "error"
    max_bad_fraction: float = Field(default=0.0, ge=0, le=1)
    train_fraction: float = Field(default=0.85, gt=0, lt=1)
    val_fraction: float = Field(default=0.05, gt=0, lt=1)  # test gets the rest
    max_length: int | None = Field(default=None, ge=2)  # tokens per example; null: the model's context length
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # stop early after this many updates; null: run all epochs
    eval_batches: int | None = Field(default=4, ge=1)  # val batches per periodic eval; null: the whole split
    # TrainConfig's fields with the fine-tunes' defaults; grad_accum_steps draws its batches from one stream over
    # the epochs.
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=5e-5, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    beta2: float = Field(default=0.999, ge=0, lt=1)
    eval_interval: int = Field(default=50, ge=1)
    lora: LoraConfig = LoraConfig()

    key_order = (
        "on_bad", "max_bad_fraction", "train_fraction", "val_fraction", "max_length", "epochs", "max_steps", "batch_size",
        "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "eval_interval", "eval_batches",
        "device", "threads", "precision", "grad_accum_steps", "checkpoint_interval", "keep_checkpoints", "resume", "lora",
    )

    @model_validator(mode="after")
    def _test_split_left(self) -> FinetuneConfig:
        if self.train_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"train_fraction + val_fraction ({self.train_fraction} + {self.val_fraction}) must be < 1: the rest is the test split"
            )
        return self


class ClassifierConfig(FinetuneConfig):
    """Classification fine-tuning (book ch. 6): an n-class head read from the last real token."""

    sources: list[Source] = Field(default=[SMS_SPAM], min_length=1)
    # Two columns per line, no header: the label (one of `labels`) and the text.
    labels: list[str] = Field(default=["ham", "spam"], min_length=2)
    label_column: Literal[0, -1] = 0  # 0: label<TAB>text; -1: text<TAB>label
    delimiter: str = Field(default="\t", min_length=1)
    balance: bool = True  # undersample every class to the smallest
    stratify: bool = True  # every split keeps the class ratio
    train_fraction: float = Field(default=0.7, gt=0, lt=1)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    # Train the last N transformer blocks, the final norm and the head; null trains everything.
    # With LoRA enabled the adapters and the head train instead.
    trainable_blocks: int | None = Field(default=1, ge=0)
    # With the first blocks frozen (trainable_blocks, no LoRA, no dropout), their output for each example is
    # computed once and every epoch and evaluation pass runs only the blocks that train. false: the whole model
    # at every step (the same results within float rounding).
    cache_frozen: bool = True

    @model_validator(mode="after")
    def _unique_labels(self) -> ClassifierConfig:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}")
        return self


class _Responses(FinetuneConfig):
    # Test-split responses, generated after training (greedy by default) and saved as JSONL.
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_k: int | None = Field(default=None, ge=1)
    max_test_generations: int | None = Field(default=None, ge=0)  # null: the whole test split
    # The in-training benchmark probe, as pretrain.eval_benchmarks_every / eval_benchmarks / eval_benchmarks_limit.
    eval_benchmarks_every: int | None = Field(default=None, ge=1)
    eval_benchmarks: list[str] = Field(default=["hellaswag"], min_length=1)
    eval_benchmarks_limit: int = Field(default=50, ge=1)

    _probe_tasks = field_validator("eval_benchmarks")(_known_probe_tasks)


class InstructConfig(_Responses):
    """Instruction fine-tuning (book ch. 7): prompt template, shifted targets, padding masked."""

    source: Source = INSTRUCTION_DATA
    # auto: the start model's own chat template when its tokenizer has one (chat), else alpaca.
    template: Literal["auto", "chat", "alpaca", "phi3"] = "auto"
    mask_prompt: bool = False  # also leave the prompt tokens out of the loss


class DpoConfig(_Responses):
    """Direct preference optimisation (Rafailov et al. 2023) of the instruction model, against a frozen copy.

    The prompt template is the instruction model's (read from its config.json).
    """

    source: Source = PREFERENCE_DATA
    beta: float = Field(default=0.1, gt=0)
    lr: float = Field(default=5e-6, gt=0)
