"""Params of the evaluation stages: evaluate (loss, perplexity, samples), benchmark, instruct_eval, judge.
Task names are checked against the harness's task tables (lmcore.harness.benchmarks, lmcore.harness.gentasks),
which import nothing of lmcore.config."""

from __future__ import annotations

import difflib
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmcore.config.base import Section
from lmcore.config.data import Source
from lmcore.config.sources import BENCHMARK_SOURCES, GENERATIVE_SOURCES
from lmcore.harness.benchmarks import check_tasks, headline_metric
from lmcore.harness.gentasks import TASKS as GENERATIVE_TASKS


class EvaluateConfig(Section):
    batch_size: int = Field(default=16, ge=1)
    max_batches: int | None = Field(default=None, ge=1)  # None: the whole validation split
    seq_len: int | None = Field(default=None, ge=1)  # tokens per scored window; null: the model's context length
    prompts: list[str] = ["Every effort moves you", "ROMEO:"]
    max_new_tokens: int = Field(default=40, ge=1)
    temperature: float = Field(default=0.8, ge=0)  # 0 is greedy
    top_k: int | None = Field(default=40, ge=1)


class BenchmarkConfig(Section):
    """Multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores them."""

    sources: list[Source] = Field(default=BENCHMARK_SOURCES, min_length=1)
    # hellaswag, mmlu (all 57 subjects) or mmlu_<subject>, truthfulqa_mc1, truthfulqa_mc2, arc_easy, arc_challenge.
    tasks: list[str] = Field(
        default=["hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "arc_easy", "arc_challenge"], min_length=1
    )
    # Items per task (per subject for MMLU), drawn with sample_seed; null scores every item.
    limit: int | None = Field(default=None, ge=1)
    # Items per MMLU subject (57 of them); null: `limit`. A small model's whole sample stays affordable with 1-2.
    mmlu_limit: int | None = Field(default=None, ge=1)
    # Fixed apart from the top-level seed: a model is compared with the champion on the same items.
    sample_seed: int = 1234
    num_fewshot: int = Field(default=0, ge=0)  # MMLU only, from its dev split (first k, as lm-eval)
    batch_size: int = Field(default=16, ge=1)  # packed rows (one item each) per forward pass
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(default=0, ge=0)
    # Eval-gated promotion: `champion` moves to a new version only when it beats the current champion on
    # this metric by more than the combined standard error; otherwise the version becomes `challenger`.
    # null: the first task's headline metric (acc_norm for hellaswag and arc, else acc).
    primary_metric: str | None = "hellaswag.acc_norm"
    # A task with more than this share of its sampled items cut to fit the model's context (or left out) is n/a:
    # reported, logged and promoted on as no score (lmcore.harness.run.MAX_CUT_FRACTION). 1: every task is scored.
    max_cut_fraction: float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _known_tasks(self) -> BenchmarkConfig:
        metrics = check_tasks(self.tasks, self.num_fewshot, {s.name for s in self.sources})
        if self.primary_metric is None:
            object.__setattr__(self, "primary_metric", headline_metric(self.tasks[0]))
        if self.primary_metric not in metrics:
            hint = difflib.get_close_matches(self.primary_metric, sorted(metrics), n=1)
            shown = sorted(m for m in metrics if not m.startswith("mmlu_")) or sorted(metrics)[:8]
            raise ValueError(
                f"primary_metric {self.primary_metric!r} is not a metric of the configured tasks"
                + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; e.g. {shown}"
            )
        return self


# The generative tasks: their metrics (lm-evaluation-harness's names; gsm8k's per answer filter), test items and
# the sources they read. lmcore.harness.generative scores them.
class InstructEvalConfig(Section):
    """Generative benchmarks of the instruction models, scored as lm-evaluation-harness scores them (IFEval,
    GSM8K), and the gate of tracking.instruct_model's `champion` on `primary_metric`."""

    sources: list[Source] = Field(default=GENERATIVE_SOURCES, min_length=1)
    tasks: list[str] = Field(default=["ifeval", "gsm8k"], min_length=1)
    # Items per task, a fixed sample drawn with sample_seed (every model of the family on the same items); null: all.
    limit: int | None = Field(default=50, ge=1)
    sample_seed: int = 1234
    # Generated tokens per item. lm-eval's are 1280 (ifeval) and 256 (gsm8k); a lower value is recorded with
    # the scores and shown in the card. null: lm-eval's.
    max_gen_toks: int | None = Field(default=256, ge=1)
    chat_template: Literal["auto", "chat", "none"] = "auto"  # auto: the model's own when it has one (--apply_chat_template); chat: required
    batch_size: int = Field(default=16, ge=1)  # sequences decoded together
    models: list[Literal["instruct", "dpo"]] = Field(default=["instruct", "dpo"], min_length=1)
    primary_metric: str = "ifeval.prompt_level_loose_acc"  # `champion` moves only past the combined standard error on it
    decontaminate: bool = True  # check every training text the models saw against the benchmark items (13-grams)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _known_tasks(self) -> InstructEvalConfig:
        unknown = [t for t in self.tasks if t not in GENERATIVE_TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; generative tasks: {', '.join(GENERATIVE_TASKS)}")
        metrics = [f"{t}.{m}" for t in self.tasks for m in GENERATIVE_TASKS[t].metrics]
        if self.primary_metric not in metrics:
            hint = difflib.get_close_matches(self.primary_metric, metrics, n=1)
            raise ValueError(f"primary_metric {self.primary_metric!r} is not a metric of the configured tasks"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; allowed: {', '.join(metrics)}")
        for t in self.tasks:
            size = GENERATIVE_TASKS[t].size
            if self.limit is not None and self.limit > size:
                raise ValueError(f"limit {self.limit} is larger than {t}'s {size} items; at most {size}, or null for all")
            missing = [n for n in GENERATIVE_TASKS[t].sources if n not in {s.name for s in self.sources}]
            if missing:
                raise ValueError(f"task {t} needs the source {missing[0]!r} in instruct_eval.sources")
        return self


# judge.api_key_env: names made for an API key (OPENAI_API_KEY, GROQ_API_KEY, LMCORE_JUDGE_API_KEY, SERVICE_API_TOKEN)
# and Hugging Face's HF_TOKEN (its inference endpoints speak the OpenAI API). Deliberately not every *_KEY or *_TOKEN:
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and GITHUB_TOKEN are credentials for other services.
API_KEY_ENV = re.compile(r"[A-Z][A-Z0-9_]*_API_(?:KEY|TOKEN)|HF_TOKEN")


class JudgeConfig(Section):
    """LLM-as-judge (book ch. 7): an OpenAI-compatible chat endpoint scores responses 0-100.

    With no `url`, the judge stage is skipped with a message; scores are never made up.
    """

    url: str | None = None  # base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1 (Ollama)
    model: str | None = None  # the judge model's name at that endpoint, e.g. llama3
    # Instead of `url`: a model the stage serves itself for the judging, as `lmcore serve` does (127.0.0.1, a
    # free port, for the stage's duration): a registered model (models:/name@alias) or a model folder.
    serve: str | None = None
    # The variable holding the API key, if the endpoint needs one. Its value is sent to `url` as a bearer token, so
    # only a name made for an API key is taken (API_KEY_ENV): a params file cannot send HOME, a database URL or the
    # AWS/GitHub credentials of the shell that runs the stage to a judge endpoint.
    api_key_env: str = "OPENAI_API_KEY"
    responses: list[Literal["instruct", "dpo"]] = Field(default=["instruct", "dpo"], min_length=1)
    max_items: int | None = Field(default=None, ge=1)  # responses judged per model; null: all
    temperature: float = Field(default=0.0, ge=0)
    seed: int | None = 123  # the book's; sent to the endpoint (not every server honours it)
    max_tokens: int = Field(default=16, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    retries: int = Field(default=3, ge=0)
    # Worked examples (a right and a wrong answer with their scores) sent as earlier turns before each request:
    # a small judge (a 135M model) answers the question instead of scoring it without them. 0: the book's prompt alone.
    calibration_examples: int = Field(default=0, ge=0, le=2)
    # Replies without a 0-100 score are counted and left out of the mean; above this share the judge is not
    # following the prompt and the stage fails.
    max_unparsed_fraction: float = Field(default=0.5, ge=0, le=1)

    @field_validator("api_key_env")
    @classmethod
    def _api_key_name(cls, name: str) -> str:
        if not API_KEY_ENV.fullmatch(name):
            raise ValueError("not the name of an API key variable: expected <NAME>_API_KEY or <NAME>_API_TOKEN in "
                             "capitals (OPENAI_API_KEY, LMCORE_JUDGE_API_KEY), or HF_TOKEN")
        return name

    @model_validator(mode="after")
    def _model_with_url(self) -> JudgeConfig:
        if self.url is not None and self.serve is not None:
            raise ValueError("judge.url and judge.serve are both set: judge at an endpoint, or serve a model, not both")
        if self.url is not None and not self.model:
            raise ValueError("judge.url is set but judge.model is not: name the judge model served there")
        return self
