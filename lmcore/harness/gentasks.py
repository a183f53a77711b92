"""The generative tasks as lm-evaluation-harness 0.4.13's YAML configures them (IFEval v4.0, GSM8K v3.0): names,
sizes, splits, stop strings, budgets and metric names. No imports: params validation (lmcore.config) reads it
without loading the harness; lmcore.harness.generative runs the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

# Metric names. lm-eval names gsm8k's "exact_match,strict-match" and "exact_match,flexible-extract" (LM_EVAL_NAMES);
# here they are names MLflow accepts.
PROMPT_STRICT, INST_STRICT = "prompt_level_strict_acc", "inst_level_strict_acc"
PROMPT_LOOSE, INST_LOOSE = "prompt_level_loose_acc", "inst_level_loose_acc"
EM_STRICT, EM_FLEXIBLE = "exact_match_strict_match", "exact_match_flexible_extract"
LM_EVAL_NAMES = {PROMPT_STRICT: f"{PROMPT_STRICT},none", INST_STRICT: f"{INST_STRICT},none",
                 PROMPT_LOOSE: f"{PROMPT_LOOSE},none", INST_LOOSE: f"{INST_LOOSE},none",
                 EM_STRICT: "exact_match,strict-match", EM_FLEXIBLE: "exact_match,flexible-extract"}


@dataclass(frozen=True)
class GenTask:
    """A task as lm-eval's YAML configures it."""

    name: str
    version: float  # metadata.version
    source: str  # the evaluated split's source name
    fewshot_source: str | None  # the few-shot split's source name
    num_fewshot: int
    until: tuple[str, ...]  # generation_kwargs.until
    max_gen_toks: int
    metrics: tuple[str, ...]
    headline: str  # the metric whose per-item verdict is `correct` in the samples
    size: int  # documents in the evaluated split (params validation bounds `limit` with it, before any download)

    @property
    def sources(self) -> tuple[str, ...]:
        """The collect sources it reads (lmcore.config.GENERATIVE_SOURCES names)."""
        return (self.source,) if self.fewshot_source is None else (self.source, self.fewshot_source)


TASKS: dict[str, GenTask] = {
    "ifeval": GenTask("ifeval", 4.0, "ifeval", None, 0, (), 1280,
                      (PROMPT_STRICT, INST_STRICT, PROMPT_LOOSE, INST_LOOSE), PROMPT_LOOSE, 541),
    "gsm8k": GenTask("gsm8k", 3.0, "gsm8k-test", "gsm8k-train", 5, ("Question:", "</s>", "<|im_end|>"), 256,
                     (EM_STRICT, EM_FLEXIBLE), EM_FLEXIBLE, 1319),
}
