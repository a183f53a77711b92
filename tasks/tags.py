"""Every MLflow tag name the orchestration layer writes or reads, named once. Imports nothing from tasks/.

Run tags: every run carries the git commit, the params sha256, the launcher and (inside one) the Prefect flow
run; a stage run carries its stage's lineage keys (lmcore.stages: manifests, weights, base weights) as
"lmcore.<key>", and the DVC md5s of its deps and outs. Model version tags: the same lineage keys, plus the
scores the evaluation stages put there (eval.*, bench.*, judge.*) and the promotion decision.
"""

from __future__ import annotations

from lmcore.stages import (
    BASE_MANIFEST_SHA,
    BASE_WEIGHTS_SHA,
    CONTINUED_WEIGHTS_SHA,
    START_WEIGHTS_SHA,
    FINETUNE,
    FINETUNE_MANIFEST_SHA,
    RAW_MANIFEST_SHA,
    TOKENS_MANIFEST_SHA,
    WEIGHTS_SHA,
)

PREFIX = "lmcore."


def tag(key: str) -> str:
    """The tag name of a StageResult tag key: "lmcore.<key>"."""
    return PREFIX + key


TAG_STAGE = "lmcore.stage"
TAG_GIT_COMMIT = "lmcore.git_commit"
TAG_PARAMS_SHA = "lmcore.params_sha256"
TAG_FLOW_RUN = "lmcore.prefect_flow_run_id"
TAG_LAUNCHER = "lmcore.launcher"  # prefect (lmcore pipeline) | stage (lmcore run) | torchrun
TAG_ERROR = "lmcore.error"  # a failed run: the error's one-line message (the traceback is the artifact ERROR_ARTIFACT)
TAG_RAW_MANIFEST_SHA = tag(RAW_MANIFEST_SHA)
TAG_TOKENS_MANIFEST_SHA = tag(TOKENS_MANIFEST_SHA)
TAG_BASE_MANIFEST_SHA = tag(BASE_MANIFEST_SHA)  # a pretrain run that continued a pretrained base
TAG_WEIGHTS_SHA = tag(WEIGHTS_SHA)
TAG_BASE_WEIGHTS_SHA = tag(BASE_WEIGHTS_SHA)  # the model a fine-tune started from
TAG_CONTINUED_WEIGHTS_SHA = tag(CONTINUED_WEIGHTS_SHA)  # the registered champion a pretrain run continued
TAG_START_WEIGHTS_SHA = tag(START_WEIGHTS_SHA)  # the weights a pretrain run started from
TAG_FINETUNE = tag(FINETUNE)  # classifier | instruct | dpo
TAG_FINETUNE_MANIFEST_SHA = tag(FINETUNE_MANIFEST_SHA)  # the data a fine-tune collected
# The tokenizer a model version carries (and the tokenize run used): the promotion gate compares per-token losses
# only between versions with the same one.
TAG_TOKENIZER = tag("tokenizer")
TAG_TOKENIZER_SHA = tag("tokenizer_sha256")
# DVC hashes (md5, as dvc.lock records them) of a stage run's inputs and outputs: one tag per path.
TAG_REGISTRY_DEPS = "lmcore.registry_deps"  # JSON {models:/ URI: "name vN"}: the registered versions a stage run read
TAG_DVC_DEP = "lmcore.dvc.dep."  # + the path as dvc.yaml writes it
TAG_DVC_OUT = "lmcore.dvc.out."
TAG_DVC_DEPS_MD5 = "lmcore.dvc.deps_md5"  # md5 of all the deps' hashes: runs with equal inputs share it
TAG_DVC_HASHED_BY = "lmcore.dvc.hashed_by"  # DVC on the project at the root, or dvc_data without one
PARENT_RUN = "mlflow.parentRunId"
# On the lifecycle run: which stages ran and which DVC found unchanged (comma-separated), and per stage why
# ("changed: deps data/raw modified", "forced") or which run made its outputs ("unchanged since run <id>").
TAG_STAGES_RUN = "lmcore.stages_run"
TAG_STAGES_SKIPPED = "lmcore.stages_skipped"
TAG_STAGE_DECISION = "lmcore.decision."  # + the stage name

# Model version tags of the benchmark stage and the promotion gate.
BENCH_PREFIX = "bench."  # bench.<task>.<metric>, bench.<task>.<metric>_stderr
TAG_BENCH_SAMPLE = "bench.sample_sha256"  # which items the bench.* scores were computed on (also on the run)
TAG_BENCH_RESULTS = "bench.results"  # runs:/<id>/<folder>: the per-item results behind a version's bench.* scores
TAG_COMPARED_WITH = "lmcore.compared_with"  # on a benchmark run: the champion it was compared with ("lmcore-base v2")
TAG_COMPARE_RUNS = "lmcore.compare_runs"  # ... and the MLflow UI's comparison of the two benchmark runs (a URL fragment)
PROMOTION_PREFIX = "promotion."  # promotion.alias, promotion.reason (version and run), promotion.<number> (run metrics)
TAG_PROMOTION_RUN = "promotion.run_id"  # on a version: the benchmark run whose promotion.json decided its alias
TAG_PROMOTION_FILE = "promotion.file"  # ... and that decision's artifact in it, when not promotion.json (a run gating several)
# On a champion: the latest decision that compared another version with it (it kept or lost @champion).
TAG_CHALLENGED_RUN = "promotion.challenged_run_id"
TAG_CHALLENGED_FILE = "promotion.challenged_file"
BENCH_SETTINGS_PREFIX = "bench_settings."  # how the bench.* scores were made (max_gen_toks against lm-eval's, template)
DECONTAM_PREFIX = "decontam."  # decontam.<benchmark>.<source>: benchmark items found in that training source
TAG_ORIGIN = "lmcore.origin"  # "base_model": a version registered from the pretrained base a run started from

ERROR_ARTIFACT = "error/traceback.txt"  # a failed run's traceback
PROMOTION_ARTIFACT = "promotion.json"  # the promotion decision, on the benchmark run
