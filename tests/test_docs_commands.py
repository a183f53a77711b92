"""What the README and docs/ show runs: every shell command in their code blocks is run by a test, at tiny sizes.

    python -m pytest tests/test_docs_commands.py tests/flows/test_docs_commands.py -q          # + -m slow for the rest

A documented command is a line of a shell code block (```bash, ```sh, ``` or a four-space indented block; not
```python, ```yaml or ```json) of README.md or docs/*.md that starts like a command (make, lmcore, python,
torchrun, curl, dvc, export, git, pip, prefect, mlflow, sed, VAR=value), plus the alternatives its comment names
(`# or: dvc repro collect`, `# = dvc repro`), and a benchmark's command in running text or a table
(`python -m benchmarks.decode_speed --threads 1`); normalised (`.venv/bin/` dropped, `\\` continuations joined,
`$ ` prompts and trailing comments gone). WHERE names, for each of them, the tests that run it: a smoke test here (or
in tests/flows/test_docs_commands.py when it needs the micro lifecycle's project), or an existing test that runs
the same subcommand with the same options. A documented command missing from WHERE fails, so a new command in the
docs comes with its test (litgpt tests its README the same way); the few that cannot run here (a 15-minute
profile, Postgres and S3, Prefect work pools) are NotRun entries that say why and name the nearest test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SCRATCH

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# What a documented command starts with: a program (or .venv/bin/<program>), or an environment assignment.
START = r"(?:make|\.venv/bin/\S+|lmcore|python|torchrun|curl|dvc|export|sed|prefect|mlflow|pip|git|[A-Z][A-Z0-9_]*=\S*)\s"
# An alternative named in a comment: "# or: dvc repro collect / make pipeline", "# = dvc repro: re-runs ...",
# "# or make serve: ...", "# ... name one: dvc push -r local".
ALTERNATIVE = re.compile(r"(?:^(?:or:?|=)|:)\s+(" + START + r"(?:(?!:\s).)*)")
SEPARATOR = re.compile(r"\s+/\s+(?=" + START + ")")  # "make push / make pull"


# --- what the docs show ---------------------------------------------------------------------------------------


def code_lines(text: str):
    """(line number, text) of every line of a shell code block: fenced (```bash, ```sh, ```) or indented."""
    fence, prev_blank, indented = None, True, False
    for no, line in enumerate(text.splitlines(), 1):
        mark = re.match(r"^\s*```\s*(\S*)", line)
        if mark:
            fence = mark.group(1).lower() if fence is None else None
            prev_blank = indented = False
            continue
        if fence is not None:
            if fence in SHELL_FENCES:
                yield no, line
        elif line.startswith("    ") and (prev_blank or indented):
            indented = True
            yield no, line[4:]
        elif line.strip():
            indented = False
        prev_blank = not line.strip()


def split_comment(line: str) -> tuple[str, str]:
    """(the command, its trailing # comment) of a line; a # inside quotes is not a comment."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def _complete(text: str) -> bool:
    try:
        shlex.split(text)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return not text.endswith("\\")


def normalise(command: str) -> str:
    command = re.sub(r"(^|\s)\.venv/bin/", r"\1", command.strip())
    return command if "'" in command or '"' in command else " ".join(command.split())


def commands_in(text: str) -> list[tuple[int, str]]:
    """(line number, normalised command) of every command the shell code blocks of a Markdown text show."""
    found = []
    lines = list(code_lines(text))
    i = 0
    while i < len(lines):
        no, line = lines[i]
        i += 1
        command = line.strip().removeprefix("$ ")
        if not re.match(START, command + " "):
            continue
        command, comment = split_comment(command)
        comments = [comment]
        while i < len(lines) and not _complete(command):
            more, comment = split_comment(lines[i][1].strip())
            command = (command[:-1].rstrip() if command.endswith("\\") else command) + " " + more
            comments.append(comment)
            i += 1
        parts = SEPARATOR.split(command)
        parts += [p for c in comments for alt in ALTERNATIVE.findall(c) for p in SEPARATOR.split(alt)]
        found += [(no, normalise(p)) for p in parts]
    return found


# The benchmarks' commands in running text and tables (`python -m benchmarks.decode_speed --threads 1`): each
# stands beside the figures it measured, for a reader to reproduce them. Other inline code names a command rather
# than shows one to run (`lmcore serve`, `dvc repro`).
INLINE_BENCHMARK = re.compile(r"`((?:\.venv/bin/)?python -m benchmarks\.\w+(?: [^`]*)?)`")


def inline_benchmarks_in(text: str) -> list[tuple[int, str]]:
    return [(no, normalise(m)) for no, line in enumerate(text.splitlines(), 1) for m in INLINE_BENCHMARK.findall(line)]


def documented_commands() -> dict[str, list[str]]:
    """Every documented command -> where it is shown ("README.md:139")."""
    out: dict[str, list[str]] = {}
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for no, command in sorted(set(commands_in(text)) | set(inline_benchmarks_in(text))):
            out.setdefault(command, []).append(f"{path.relative_to(ROOT)}:{no}")
    return out


# --- where each command runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotRun:
    """A documented command no test runs: why, and the tests nearest to it."""

    reason: str
    nearest: tuple[str, ...] = ()


HERE = "tests/test_docs_commands.py"
FLOWS = "tests/flows/test_docs_commands.py"
MAKE = f"{HERE}::test_make_targets_run_the_documented_commands"
LIFECYCLE = "tests/flows/test_lifecycle.py"
DVC_REPRO = "tests/test_dvc.py::test_repro_runs_all_then_nothing_then_only_what_changed"  # every stage's `lmcore run`
DVC_WORKFLOW = "tests/test_dvc.py::test_push_then_fresh_clone_pull_restores_every_output"
DEPLOYMENT = "tests/test_deployment.py::test_triggered_run_is_tracked_under_its_flow_run_id"
SCHEDULED = "tests/test_deployment.py::test_deployment_has_the_cron_schedule_and_parameters"  # python -m flows.deploy served
SERVE_CHAT = "tests/test_serve.py::test_completion_shape_usage_and_greedy_parity"
SERVE_STREAM = "tests/test_serve.py::test_streaming_sends_the_reply_in_chunks"
SMOLLM2 = "tests/test_smollm2.py::test_import_matches_transformers_logits"
PROFILES = "tests/test_pipeline.py::test_every_shipped_params_file_names_every_section_dvc_reads"
DASK = "tests/flows/test_tokenize_dask.py::test_dask_runner_matches_the_default_runner"
MLFLOW_CLI = f"{HERE}::test_the_documented_mlflow_commands_take_their_options"
# the judge stage (as `lmcore run judge` runs it: its flow, judge.url and judge.model set) scoring through
# `lmcore serve --model models:/judge-73@prod --port <free>`
JUDGE = "tests/flows/test_evaluation_stages.py::test_judge_stage_scores_through_a_served_registered_model"
# `mlflow server` on SQLite and a local artifact folder on a free port (tests/servers.py), as `make mlflow-server` and
# `make ui` start it (`mlflow ui` is MLflow's alias of `mlflow server`), the registry read back over HTTP
MLFLOW_SERVER = "tests/test_deployment.py::test_registered_model_reads_back_over_http"

WHERE: dict[str, tuple[str, ...] | NotRun] = {
    # README: quick start, tests
    "make pipeline": (MAKE, "tests/test_dvc.py::test_prefect_run_leaves_dvc_nothing_to_do"),
    "make test": (MAKE,),  # the recipe is the default suite itself
    "make test XDIST=": (MAKE,),  # the same in one process
    "make test-all": (MAKE,),  # the whole suite; .ci/run runs it in CI (checked there)
    # README: fine-tuning
    'lmcore classify "WINNER!! Claim your free prize now" "see you at lunch"': (f"{LIFECYCLE}::test_cli_classify_and_chat",),
    'lmcore generate "Name three primary colors." --model models/instruct': (f"{FLOWS}::test_generate_and_chat_as_documented",),
    "lmcore chat --model models:/lmcore-instruct@dpo": (f"{FLOWS}::test_generate_and_chat_as_documented",),
    "lmcore run finetune_classifier --set finetune_classifier.lora.enabled=true": (
        f"{FLOWS}::test_stages_run_with_the_documented_overrides",),
    # README: the default run (SmolLM2-135M end to end) and the from-scratch profile
    "LMCORE_MIRROR=../shared/data lmcore pipeline": NotRun(
        "the default lifecycle on SmolLM2-135M takes about 10 min on 2 cores (README); `make pipeline` runs this "
        "command, its profile is validated and its GGUF file imported with transformers' logits",
        (MAKE, PROFILES, SMOLLM2, "tests/flows/test_default_profile.py::test_default_profile_runs_every_stage_on_smollm2")),
    "make pipeline PARAMS=profiles/scratch.yaml": (MAKE, PROFILES),  # the recipe, on a profile every section of
    # which is validated; its stages run in every micro lifecycle test (the same code at other sizes)
    # the registered models come from the default pipeline; the same file, imported, answers as the README shows
    'lmcore classify "WINNER!! You have won a free prize, call now to claim" "Are we still on for lunch tomorrow?" '
    "--model models:/lmcore-classifier": (f"{LIFECYCLE}::test_cli_classify_and_chat",),
    'lmcore generate "The capital of France is" --model models:/lmcore-base --temperature 0 --max-new-tokens 3': (
        "tests/test_smollm2.py::test_greedy_answer_names_paris", "tests/test_generation.py::test_cli_generate_streams_the_completion"),
    "lmcore chat --model models:/lmcore-instruct": (
        "tests/test_chat.py::test_cli_generate_and_chat_use_the_chat_template",),  # a model in SmolLM2's ChatML template
    "lmcore export-gguf models/dpo smollm2-dpo.gguf --dtype f16": (
        "tests/test_smollm2.py::test_export_f16_reads_back_in_transformers", "tests/test_gguf.py::test_cli_import_and_export"),
    # README, docs/evaluation.md: evaluate, serve, judge
    "lmcore benchmark --model models/base --tasks hellaswag,mmlu,truthfulqa_mc1,truthfulqa_mc2,arc_easy,arc_challenge "
    "--limit 100 --output reports/eval": (
        "tests/flows/test_cli.py::test_eval_scores_a_model_folder_and_collects_the_data", f"{FLOWS}::test_eval_as_documented"),
    "lmcore benchmark --model models:/lmcore-base@champion --tasks mmlu --num-fewshot 5 --limit 20 --output reports/eval-mmlu5":
        (f"{FLOWS}::test_eval_as_documented",),
    "lmcore benchmark --model models:/lmcore-instruct --tasks ifeval,gsm8k --limit 50 --output reports/eval-gen": (
        "tests/flows/test_cli.py::test_eval_generates_and_scores_ifeval_and_gsm8k",  # a bare models:/<name> is its @champion:
        "tests/flows/test_lifecycle.py::test_every_registered_family_has_a_gated_champion"),
    "lmcore run instruct_eval --set instruct_eval.limit=100": (
        "tests/flows/test_lifecycle.py::test_every_registered_family_has_a_gated_champion",
        "tests/flows/test_family_gates.py::test_the_pretrained_chat_model_is_the_first_instruct_champion"),
    "lmcore serve --model models:/lmcore-instruct@dpo --port 8000": (JUDGE,),
    # docs/models.md: serving options, the load test
    "LMCORE_API_KEY=... lmcore serve --model models/instruct --host 0.0.0.0 --allowed-host llm.internal --max-batch 32 "
    "--max-queue 128 --max-tokens 512 --quantize int8": ("tests/test_serve.py::test_sigterm_ends_in_flight_requests_and_exits_within_seconds",),
    "python -m benchmarks.serve_load --clients 64 --duration 60": ("tests/test_serve_load.py::test_64_clients_mixed_streams_every_reply_as_alone",),
    "python -m benchmarks.decode_speed --gguf --threads 2 --repeats 3": (
        "tests/test_llama_cpp.py::test_decode_speed_benchmark_runs_llama_cpp_beside_lmcore",),
    "python -m benchmarks.serve_load": ("tests/test_serve_load.py::test_64_clients_mixed_streams_every_reply_as_alone",),  # it serves models:/judge-73@prod
    "lmcore run judge --set judge.url=http://127.0.0.1:11434/v1 --set judge.model=llama3": (JUDGE,),
    "lmcore run judge --set judge.url=http://127.0.0.1:8000/v1 --set judge.model=lmcore-instruct@dpo": (JUDGE,),
    "curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"lmcore-instruct@dpo\", "
    "\"messages\": [{\"role\": \"user\", \"content\": \"Name three primary colors.\"}], \"temperature\": 0}'": (SERVE_CHAT,),
    "curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"instruct\", "
    "\"messages\": [{\"role\": \"user\", \"content\": \"Name three primary colors.\"}], \"stream\": true, \"top_p\": 0.9}'": (SERVE_STREAM,),
    "lmcore run benchmark": (DVC_REPRO,),
    # README: the MLflow UI
    "make ui": (MAKE, MLFLOW_CLI, MLFLOW_SERVER),
    "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000": (MLFLOW_CLI, MLFLOW_SERVER),
    # README: run one stage
    "lmcore run tokenize": (DVC_REPRO, "tests/flows/test_lineage.py::test_a_stage_run_by_lmcore_run_in_a_dvc_project_matches_dvc_lock"),
    # the benchmark stage with --set overrides of its sample (the stage flow `lmcore run` starts; --set parsing:
    # tests/flows/test_cli.py), re-scoring a champion: in a store of its own, as it refreshes the champion's card
    "lmcore run benchmark --set benchmark.limit=50": (
        "tests/flows/test_evaluation_stages.py::test_champion_scored_on_other_items_is_rescored_first",
        "tests/flows/test_cli.py::test_mistyped_value_is_an_error_naming_it"),
    "python -m flows.stage pretrain": (f"{FLOWS}::test_data_and_pretrain_stages_as_documented",),
    "lmcore params --set pretrain.lr=3e-4": ("tests/flows/test_cli.py::test_params_prints_resolved_values",),
    'lmcore generate "ROMEO:" --model models/base': (f"{LIFECYCLE}::test_cli_generates_from_folder_and_registry",),
    'lmcore generate "ROMEO:" --model models:/lmcore-base/1': (f"{LIFECYCLE}::test_cli_generates_from_folder_and_registry",),
    # README: change a parameter and reproduce with DVC
    "sed -i 's/^  lr: 0.00002/  lr: 0.00001/' params.yaml": (f"{HERE}::test_the_readme_sed_lowers_the_learning_rate",),
    "make repro": (MAKE, DVC_REPRO),
    "dvc repro": (DVC_REPRO,),
    "dvc metrics show": ("tests/test_dvc.py::test_repro_runs_all_then_nothing_then_only_what_changed",),
    "dvc plots show": ("tests/test_dvc.py::test_repro_runs_all_then_nothing_then_only_what_changed",),
    # README, docs/operations.md: operations
    "make serve": (MAKE, SCHEDULED),
    "make mlflow-server": (MAKE, MLFLOW_CLI, MLFLOW_SERVER),
    "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000": (DEPLOYMENT,),
    "make push": (MAKE, DVC_WORKFLOW),
    "make pull": (MAKE, DVC_WORKFLOW),
    "lmcore lineage models:/lmcore-base@champion": (
        "tests/flows/test_lineage.py::test_lineage_of_the_base_model_reaches_the_raw_sources",),
    "lmcore lineage models:/lmcore-instruct@dpo --json": ("tests/flows/test_lineage.py::test_fine_tunes_chain_through_their_base_models",),
    "lmcore lineage models:/lmcore-classifier/1 --root /srv/lmcore": (f"{FLOWS}::test_lineage_of_another_root",),
    "lmcore run collect": (  # and the README's example of a zip source that fails
        DVC_REPRO, "tests/flows/test_failures.py::test_zip_slip_is_one_line_exit_2_not_retried_and_traced_in_the_log_and_mlflow"),
    # README, docs/models.md: models
    "lmcore pipeline --params profiles/llama-tiny.yaml": NotRun(
        "the whole lifecycle on the default corpus and 400 steps (minutes); the profile is validated and its "
        "architecture trains", (PROFILES, "tests/test_model_arch.py::test_both_architectures_train")),
    "lmcore import-hf HF_DIR models/imported": ("tests/test_hf.py::test_cli_import_and_export",),
    "lmcore import-hf hf/llama models/llama": ("tests/test_hf.py::test_cli_import_and_export",),
    "lmcore export-hf models/base hf/base": ("tests/test_hf.py::test_cli_import_and_export",),
    "lmcore import-gguf model.gguf models/imported": ("tests/test_gguf.py::test_cli_import_and_export",),
    "lmcore import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2": (SMOLLM2, "tests/test_gguf.py::test_cli_import_and_export"),
    "lmcore export-gguf models/instruct instruct.gguf --dtype f16": ("tests/test_gguf.py::test_cli_import_and_export",),
    "lmcore run pretrain --set pretrain.precision=auto --set pretrain.compile=true": (
        f"{HERE}::test_scratch_profile_ablation_benchmark", "tests/test_training.py::test_compiled_run_matches_eager"),
    "torchrun --standalone --nproc_per_node 2 -m lmcore.pretrain --params profiles/scratch.yaml": (
        f"{HERE}::test_the_pretrain_entry_runs_on_the_shipped_params",
        "tests/test_distributed.py::test_ddp_on_two_processes_matches_one_process_at_equal_global_batch"),
    'lmcore generate "ROMEO:" --model models/base --top-p 0.9': (f"{FLOWS}::test_generate_and_chat_as_documented",),
    'lmcore generate "Every effort moves you" --model models/base --temperature 0.8 --top-k 40 --top-p 0.95 '
    "--stop $'\\n\\n' --max-new-tokens 100": (
        f"{FLOWS}::test_generate_and_chat_as_documented", "tests/test_generation.py::test_cli_generate_streams_the_completion"),
    "lmcore chat --model models:/lmcore-instruct@dpo --top-p 0.9 --temperature 0.7": (f"{FLOWS}::test_generate_and_chat_as_documented",),
    "lmcore run pretrain --set pretrain.checkpoint_interval=50": (f"{FLOWS}::test_data_and_pretrain_stages_as_documented",),
    "lmcore run pretrain --set pretrain.checkpoint_interval=50 --set pretrain.resume=true": (
        f"{FLOWS}::test_data_and_pretrain_stages_as_documented",
        "tests/test_faults.py::test_killed_flow_resumes_pretrain_from_its_checkpoint"),
    "torchrun --standalone --nproc_per_node 8 -m flows.torchrun --params profiles/gpt2-124m.yaml": (
        "tests/test_distributed.py::test_tracked_entry_under_torchrun_logs_to_mlflow_and_registers",),  # 2 processes, micro sizes
    "torchrun --standalone --nproc_per_node 8 -m flows.torchrun --params profiles/gpt2-124m.yaml "
    "--set pretrain.distributed=fsdp": (
        "tests/test_distributed.py::test_tracked_entry_under_torchrun_logs_to_mlflow_and_registers",
        "tests/test_distributed.py::test_fsdp_on_two_processes_trains_checkpoints_and_resumes"),
    # the benchmarks
    "python -m benchmarks.train_speed": (f"{HERE}::test_train_speed_benchmark",),
    "python -m benchmarks.decode_speed --threads 1": (f"{HERE}::test_decode_speed_benchmark",),
    "python -m benchmarks.decode_speed --threads 1 --repeats 5": (f"{HERE}::test_decode_speed_benchmark",),
    "python -m benchmarks.generate_speed --threads 1": ("tests/test_generation_batch.py::test_generate_speed_smoke",),
    "python -m benchmarks.classifier_speed": (f"{HERE}::test_classifier_speed_benchmark",),
    "python -m benchmarks.eval_speed --gguf ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf --tasks "
    "hellaswag,arc_easy,mmlu --limit 16 --group-limit 1 --repeats 3 --threads 1 --clock process": (
        f"{HERE}::test_eval_speed_benchmark_on_a_llama_with_a_chat_template",),  # a Llama with a chat template, tiny
    "python -m benchmarks.eval_speed --gguf ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf --tasks "
    "gsm8k,ifeval --limit 32 --repeats 1 --threads 1 --clock process": (
        f"{HERE}::test_eval_speed_benchmark_on_a_llama_with_a_chat_template",),
    "python -m benchmarks.scratch_profile": (f"{HERE}::test_scratch_profile_benchmark",),
    "python -m benchmarks.scratch_profile --no-before --vocab 2048 4096": (f"{HERE}::test_scratch_profile_benchmark",),
    "python -m benchmarks.scratch_profile --no-before --ablation": (f"{HERE}::test_scratch_profile_ablation_benchmark",),
    "python -m benchmarks.default_profile": (f"{FLOWS}::test_default_profile_benchmark_reads_the_runs",),
    "python -m benchmarks.loader_speed": (f"{HERE}::test_loader_speed_benchmark",),
    "python -m benchmarks.tokenize_speed": (f"{HERE}::test_tokenize_speed_benchmark",),
    "python -m benchmarks.tokenize_speed --mb 50 --vocab 8192": (f"{HERE}::test_tokenize_speed_benchmark",),
    "python -m benchmarks.eval_speed": (f"{HERE}::test_eval_speed_benchmark",),
    "python -m benchmarks.eval_speed --limit 100 --repeats 3": (f"{HERE}::test_eval_speed_benchmark",),
    # docs/data.md
    "dvc repro collect": (DVC_REPRO,),
    "dvc repro preprocess": (DVC_REPRO,),
    "dvc repro train_tokenizer": (DVC_REPRO,),
    "dvc repro tokenize": (DVC_REPRO,),
    "lmcore run preprocess": (DVC_REPRO,),
    "lmcore run train_tokenizer": (DVC_REPRO,),
    "lmcore run train_tokenizer --set train_tokenizer.vocab_size=8192 --set pretrain.model.vocab_size=8192": (
        f"{FLOWS}::test_data_and_pretrain_stages_as_documented",),
    "lmcore run tokenize --set tokenize.workers=8": (f"{FLOWS}::test_data_and_pretrain_stages_as_documented",),  # 2 workers
    "lmcore run tokenize --set tokenize.runner=dask": NotRun(
        "a Dask cluster of worker processes per run (seconds to start on 2 cores); the stage's Dask map is run on a "
        "real local cluster and picked by runner: dask", (DASK,)),
    "lmcore run tokenize --set tokenize.runner=dask --set tokenize.dask_address=tcp://scheduler:8786": NotRun(
        "needs a Dask scheduler at that address", (DASK,)),
    # docs/operations.md: Prefect
    "prefect server start --host 127.0.0.1": (SCHEDULED,),  # tests/servers.py starts it

    "export PREFECT_API_URL=http://127.0.0.1:4200/api": (DEPLOYMENT,),
    'python -m flows.deploy --cron "30 2 * * 1-5" --timezone Europe/Berlin --params profiles/llama-tiny.yaml '
    "--set pretrain.max_steps=2000 --name weekdays": (f"{HERE}::test_the_deploy_command_validates_and_schedules", SCHEDULED),
    "prefect deployment run lmcore-lifecycle/weekdays": (DEPLOYMENT,),  # run_deployment: the call the command makes
    "prefect work-pool create gpu --type process": NotRun(
        "Prefect's own work-pool tooling on a Prefect server", (f"{HERE}::test_the_work_pool_entrypoint_takes_the_documented_parameters",)),
    'prefect deploy flows/lifecycle.py:lifecycle -n nightly -p gpu --cron "0 3 * * *" --param params_file=params.yaml '
    "--param root=/srv/lmcore": NotRun(
        "registers a deployment on the work pool of a Prefect server: the entrypoint it names loads as Prefect loads it, "
        "and takes the parameters it passes", (f"{HERE}::test_the_work_pool_entrypoint_takes_the_documented_parameters",)),
    "prefect worker start -p gpu": NotRun(
        "a long-running Prefect worker for a work pool", (f"{HERE}::test_the_work_pool_entrypoint_takes_the_documented_parameters",)),
    # docs/operations.md: MLflow server
    "pip install psycopg2-binary boto3": NotRun("installs from the network", ()),
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...": NotRun("credentials of an S3 account", ()),
    "mlflow server --app-name basic-auth --backend-store-uri postgresql://mlflow:${PGPASSWORD}@db.internal:5432/mlflow "
    "--artifacts-destination s3://ml-artifacts/lmcore --host 0.0.0.0 --port 5000 --workers 4 --allowed-hosts "
    "mlflow.example.com,mlflow.internal:5000": NotRun(
        "needs Postgres and S3; its options and the basic-auth app are checked against the installed MLflow",
        (MLFLOW_CLI,)),
    "export MLFLOW_TRACKING_URI=https://mlflow.example.com MLFLOW_TRACKING_USERNAME=ci MLFLOW_TRACKING_PASSWORD=...": NotRun(
        "a team's MLflow server behind basic-auth", (DEPLOYMENT,)),
    # docs/operations.md: DVC remote
    "dvc remote modify --local local url /mnt/team/lmcore-dvc-remote": (f"{HERE}::test_the_dvc_remote_commands",),
    "git add dvc.lock": (DVC_WORKFLOW,),
    'git commit -m "pipeline run: ..."': (DVC_WORKFLOW,),
    "git clone <repo> lmcore && cd lmcore": (DVC_WORKFLOW,),
    "dvc status": (DVC_WORKFLOW,),
    "pip install dvc-s3": NotRun("installs from the network (dvc-s3 is not installed here)", ()),
    "dvc remote add -d s3 s3://my-bucket/lmcore": (f"{HERE}::test_the_dvc_remote_commands",),
    "dvc push": NotRun("to the S3 remote just added: needs dvc-s3 and a bucket; `dvc push` to the local remote runs",
                       (DVC_WORKFLOW,)),
    "dvc push -r local": (f"{HERE}::test_the_dvc_remote_commands", DVC_WORKFLOW),
    # docs/operations.md: the MLflow UI pictures
    # (a picture costs an `mlflow server` and a Chromium, some 15 s on 2 cores: one runs, a card)
    "python docs/screenshot_ui.py": (f"{FLOWS}::test_screenshot_ui_as_documented",),
    "python docs/screenshot_ui.py --version 2 --height 1600": (f"{FLOWS}::test_screenshot_ui_as_documented",),
    "python docs/screenshot_ui.py --versions --out docs/images/mlflow-registry.png": NotRun(
        "the versions table's picture: the same server and browser as the card's, another page (versions_shot); "
        "the card's picture runs", (f"{FLOWS}::test_screenshot_ui_as_documented",)),
    "python docs/screenshot_ui.py --model lmcore-instruct --out /tmp/instruct.png": (f"{FLOWS}::test_screenshot_ui_as_documented",),
}


def test_the_extractor_reads_what_the_docs_show():
    text = "\n".join([
        "Some text `lmcore not-this` here.", "", "```bash",
        ".venv/bin/lmcore run tokenize   # one stage  # and more",
        "make push / make pull      # both",
        "make repro   # = dvc repro: re-runs what changed",
        "lmcore run collect   # or: dvc repro collect / make pipeline",
        "curl -N http://x/v1 -H 'A: b' -d '{\"model\": \"m\",", "    \"stream\": true}'",
        "torchrun --standalone \\", "    -m lmcore.pretrain --params params.yaml", "```", "",
        "```python", "lmcore = 1", "```", "", "```", "$ .venv/bin/lmcore run collect     # a zip source", "$ echo $?", "```",
        "", "Indented:", "", "    prefect server start   # one shell", "    export A=1", "", "    - not: code",
        "```yaml", "python: no", "```",
    ])
    assert [c for _, c in commands_in(text)] == [
        "lmcore run tokenize", "make push", "make pull", "make repro", "dvc repro", "lmcore run collect",
        "dvc repro collect", "make pipeline", "curl -N http://x/v1 -H 'A: b' -d '{\"model\": \"m\", \"stream\": true}'",
        "torchrun --standalone -m lmcore.pretrain --params params.yaml", "lmcore run collect", "prefect server start",
        "export A=1",
    ]


def test_every_documented_command_runs_somewhere():
    shown = documented_commands()
    missing = {c: where for c, where in shown.items() if c not in WHERE}
    assert not missing, "documented commands no test runs; add each to WHERE with the test that runs it:\n" + "\n".join(
        f"  {', '.join(where)}: {c}" for c, where in missing.items())


def test_every_entry_of_the_table_is_a_documented_command():
    stale = sorted(set(WHERE) - set(documented_commands()))
    assert not stale, f"WHERE names commands the docs no longer show: {stale}"


def _test_names(path: Path) -> set[str]:
    return set(re.findall(r"^(?:async )?def (test_\w+)\(", path.read_text(encoding="utf-8"), flags=re.M))


def test_every_test_the_table_names_exists():
    named = {node for entry in WHERE.values() for node in (entry.nearest if isinstance(entry, NotRun) else entry)}
    absent = []
    for node in sorted(named):
        file, _, name = node.partition("::")
        if not (ROOT / file).is_file() or name not in _test_names(ROOT / file):
            absent.append(node)
    assert not absent, f"WHERE names tests that do not exist: {absent}"
    assert all(isinstance(e, NotRun) or e for e in WHERE.values()), "an entry without a test"
    for command, entry in WHERE.items():
        if isinstance(entry, NotRun):
            assert len(entry.reason) > 20, f"{command}: say why it is not run"
    # every smoke test here and in the flows file is in the table: a smoke test runs a documented command
    bookkeeping = {"test_the_extractor_reads_what_the_docs_show", "test_every_documented_command_runs_somewhere",
                   "test_every_entry_of_the_table_is_a_documented_command", "test_every_test_the_table_names_exists"}
    smokes = {f"{HERE}::{n}" for n in _test_names(ROOT / HERE) - bookkeeping} | {f"{FLOWS}::{n}" for n in _test_names(ROOT / FLOWS)}
    assert smokes <= named, f"smoke tests no command names: {sorted(smokes - named)}"


# --- smoke tests: the benchmarks --------------------------------------------------------------------------------


def run_main(main, argv: list[str], capsys) -> str:
    """A benchmark's main(argv) in this process; its standard output."""
    main(argv)
    return capsys.readouterr().out


def table(out: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row starts with `header`, as cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def ratio(cell: str) -> float:
    value = float(cell.removesuffix("x"))
    assert value > 0, cell
    return value


def tiny_params(tmp_path: Path, **pretrain) -> Path:
    """profiles/scratch.yaml as shipped (benchmark probe on) on the one short story, with a micro model: a tiny run of it."""
    params = yaml.safe_load(SCRATCH.read_text())
    assert params["pretrain"]["eval_benchmarks_every"], "scratch.yaml turned the probe off: this file tests it on"
    params["collect"]["sources"] = [s for s in params["collect"]["sources"] if s["name"] == "the-verdict"]
    params["preprocess"]["near_dedup"] = {"enabled": False}
    params["tokenize"]["val_fraction"] = 0.2
    params["train_tokenizer"]["vocab_size"] = 320
    params["pretrain"]["model"].update(vocab_size=320, context_length=32, n_embd=32, n_layer=1, n_head=2)
    params["pretrain"].update(batch_size=4, eval_batches=2, peak_flops=1e12, threads=1, **pretrain)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_train_speed_benchmark(capsys, one_thread):
    """The README's training benchmark on profiles/scratch.yaml (its benchmark probe on): a few steps of its model."""
    from benchmarks import train_speed

    out = run_main(train_speed.main, ["--steps", "2", "--threads", "1", "--tokens", "/nonexistent",
                                      "--set", "pretrain.compile=false", "--set", "pretrain.peak_flops=1e12"], capsys)
    assert "no tokens; a random stream instead" in out
    assert "Model: 4 layers, n_embd 128, 4 heads, context 128, vocab 8192" in out  # scratch.yaml's model
    rows = {r[0]: r for r in table(out, "| loop | settings |")}
    assert set(rows) == {"nanoGPT", "lmcore"} and "AdamW fused, eager" in rows["lmcore"][1]
    assert all(float(r[2].replace(",", "")) > 0 and 8 < float(r[5]) < 10 for r in rows.values())  # ln(8192) = 9.01
    assert ratio(re.search(r"lmcore / nanoGPT: (\S+) tokens/s per step", out).group(1))


def test_scratch_profile_benchmark(tmp_path, capsys, one_thread):
    """The README's two rows (before, scratch) and another vocabulary's, then --no-before, at tiny sizes."""
    from benchmarks import scratch_profile

    params = str(tiny_params(tmp_path))
    out = run_main(scratch_profile.main, ["--params", params, "--steps", "2", "--vocab", "300"], capsys)
    rows = table(out, "| row | vocab |")
    assert [(r[0], r[1]) for r in rows] == [("before (gpt2, fp32)", "50,257"), ("scratch", "320"), ("bpe-300", "300")]
    assert rows[0][9] == "1.00x" and all(ratio(r[9]) and 0 < float(r[11]) < 10 for r in rows)  # speed-up, bits per byte
    assert "2 pretrain steps each" in out

    out = run_main(scratch_profile.main, ["--params", params, "--steps", "1", "--no-before", "--vocab", "300", "290"], capsys)
    assert [r[0] for r in table(out, "| row | vocab |")] == ["scratch", "bpe-300", "bpe-290"]


@pytest.mark.slow
def test_scratch_profile_ablation_benchmark(tmp_path, capsys, one_thread):
    """--no-before --ablation: the profile's row, bf16 forced and torch.compile (20-30 s of compilation on 2 cores)."""
    from benchmarks import scratch_profile

    out = run_main(scratch_profile.main, ["--params", str(tiny_params(tmp_path)), "--steps", "1", "--no-before", "--ablation"], capsys)
    rows = table(out, "| row | vocab |")
    assert [(r[0], r[3], r[4]) for r in rows] == [
        ("scratch", "auto", "False"), ("scratch + bf16", "bf16", "False"), ("scratch + compile", "auto", "True")]
    assert all(0 < float(r[11]) < 10 for r in rows)


def test_decode_speed_benchmark(capsys, one_thread):
    """--threads 1 on a GPT-2 and a Llama-style shape: tokens/s of each side and the same token ids as transformers."""
    from benchmarks import decode_speed

    out = run_main(decode_speed.main, ["--threads", "1", "--repeats", "1", "--shapes", "tiny,llama-tiny", "--prompt-len", "4",
                                       "--new-tokens", "6"], capsys)
    rows = table(out, "| shape | new tokens |")
    assert [r[0].split(" ")[0] for r in rows] == ["tiny", "llama-tiny"] and "Llama" in rows[1][0]
    assert all(r[1] == "6" and ratio(r[5]) and ratio(r[6]) and r[7] == "yes, yes" for r in rows)


def test_classifier_speed_benchmark(capsys, one_thread):
    """A tiny model: per-step seconds and steady tokens/s of the plain loop and of finetune_classifier (its frozen
    prefix cached once), and their ratio."""
    from benchmarks import classifier_speed

    out = run_main(classifier_speed.main, ["--tiny", "--steps", "6", "--threads", "1"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("plain ", "lmcore "))}
    assert set(rows) == {"plain", "lmcore"} and all(float(rows[k][4]) > 0 for k in rows)
    assert rows["lmcore"][-1] == "s"  # the one-off prefix time is shown
    assert "ratio (lmcore / plain, steady tokens/s)" in out and "2 trained" in out


def test_loader_speed_benchmark(tmp_path, capsys):
    from benchmarks import loader_speed

    out = run_main(loader_speed.main, ["--tokens", "100000", "--batches", "5", "--repeats", "1", "--shapes", "4x64,2x128",
                                       "--dir", str(tmp_path)], capsys)
    rows = table(out, "| mode | B x T |")
    assert [(r[0], r[1]) for r in rows] == [("random", "4 x 64"), ("random", "2 x 128"), ("sequential", "4 x 64")]
    assert all(ratio(r[4]) for r in rows)
    assert not list(tmp_path.iterdir())  # its temporary folder is gone


@pytest.mark.slow
def test_tokenize_speed_benchmark(tmp_path, capsys):
    """GPT-2's and a trained BPE's raw tiktoken, process pool and whole-stage rows on a small corpus (--corpus)."""
    from benchmarks import tokenize_speed

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(f"Paragraph {i}: the lamp was lit early, and the street was quiet again."
                                              for i in range(300)), encoding="utf-8")
    out = run_main(tokenize_speed.main, ["--mb", "0.05", "--repeats", "1", "--vocab", "300", "--shard-mb", "0.01",
                                         "--corpus", str(corpus)], capsys)
    rows = table(out, "| tokenizer | run |")
    assert [r[0] for r in rows] == ["gpt2"] * 3 + ["bpe-300"] * 4 and "Hugging Face tokenizers" in rows[-1][1]
    assert all(float(r[2]) > 0 and ratio(r[3]) for r in rows)
    assert re.search(r"bpe-300: [\d,]+ tokens \([\d.]+ bytes/token\); stage / raw threads", out)


@pytest.mark.slow
def test_eval_speed_benchmark(capsys, one_thread, tmp_path, monkeypatch):
    """lmcore and lm-evaluation-harness on the same items: a task, an MMLU subject (both pick alike), IFEval and GSM8K
    (the same texts and verdicts)."""
    from benchmarks import eval_speed
    from lmcore.harness.punkt import NLTK_DATA_ENV

    monkeypatch.setenv(NLTK_DATA_ENV, str(tmp_path / "nltk_data"))  # IFEval's Punkt files, not in ~/.cache
    out = run_main(eval_speed.main, ["--tasks", "hellaswag,mmlu_anatomy,ifeval,gsm8k", "--limit", "2", "--repeats", "1",
                                     "--batch-size", "4", "--max-gen-toks", "8", "--threads", "1"], capsys)
    rows = [line.split() for line in out.splitlines() if line.startswith(("hellaswag ", "mmlu_anatomy "))]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("hellaswag", "2", "True"), ("mmlu_anatomy", "2", "True")]
    assert all(ratio(r[-2]) for r in rows) and "median ratio over tasks" in out
    gen = [line.split() for line in out.splitlines() if line.startswith(("ifeval ", "gsm8k "))]
    # task, items, lmcore it/s, lm-eval it/s, ratio, same texts, max toks, toks/item, same verdicts
    assert [(r[0], r[1], r[5], r[6], r[-1]) for r in gen] == [("ifeval", "2", "2/2", "8", "True"), ("gsm8k", "2", "2/2", "8", "True")]
    assert all(ratio(r[4]) for r in gen) and "differ" not in out


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.slow
def test_eval_speed_benchmark_on_a_llama_with_a_chat_template(capsys, one_thread, tmp_path, monkeypatch):
    """A Llama-style model folder with a Hugging Face tokenizer and a ChatML template (SmolLM2's kind): lm-eval gets
    a LlamaForCausalLM and the folder's tokenizer through AutoTokenizer, prompts through its own apply_chat_template,
    and stops at <|im_end|>; both pick alike and give the same texts and verdicts."""
    from benchmarks import eval_speed
    from lmcore.checkpoint import save_model
    from lmcore.config import ModelConfig
    from lmcore.harness.punkt import NLTK_DATA_ENV
    from lmcore.model import GPT
    from lmcore.tokenizer import HFTokenizer
    from tests.test_tokenizer import tiny_hf_tokenizer

    import torch

    monkeypatch.setenv(NLTK_DATA_ENV, str(tmp_path / "nltk_data"))
    tok = HFTokenizer(tiny_hf_tokenizer(tmp_path / "tokenizer.json"), name="tiny-chatml", bos_token="<|im_start|>",
                      eos_token="<|im_end|>", chat_template=CHATML)
    torch.manual_seed(0)
    folder = tmp_path / "model"
    save_model(GPT(ModelConfig(preset="llama-micro", vocab_size=320, context_length=256)), folder, extra={"tokenizer": tok.name})
    tok.save(folder)
    out = run_main(eval_speed.main, ["--model", str(folder), "--tasks", "arc_easy,ifeval,gsm8k", "--limit", "2", "--repeats", "1",
                                     "--batch-size", "2", "--max-gen-toks", "8", "--threads", "1"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("arc_easy ", "ifeval ", "gsm8k "))}
    assert rows["arc_easy"][1] == "2" and rows["arc_easy"][-1] == "True"
    assert [(rows[t][5], rows[t][-1]) for t in ("ifeval", "gsm8k")] == [("2/2", "True"), ("2/2", "True")]
    assert "tokenizer tiny-chatml" in out and "differ" not in out


# --- smoke tests: make, sed, dvc, prefect, mlflow ---------------------------------------------------------------


def make_dry_run(*args: str) -> list[str]:
    """The recipe lines `make -n` prints for a target, the venv set-up left out (the Makefile's defaults: nothing
    from an outer make, as under `make test`, or from the environment)."""
    overrides = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PARAMS", "MLFLOW_PORT", "PREFECT_PORT", "XDIST", "PYTEST_ARGS", "PYTHON"}
    env = {k: v for k, v in os.environ.items() if k not in overrides}
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    out = out.replace("\\\n", " ")
    setup = ("test -x .venv/bin/python", ".venv/bin/python -m pip install", "touch .venv/.installed")
    return [" ".join(line.split()) for line in out.splitlines() if line.strip() and not line.startswith(setup)]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_targets_run_the_documented_commands():
    """Each documented make target runs the command the docs say it does (the tests named beside it in WHERE run those)."""
    assert make_dry_run("pipeline") == [".venv/bin/lmcore pipeline --params params.yaml"]
    assert make_dry_run("pipeline", "PARAMS=profiles/scratch.yaml") == [".venv/bin/lmcore pipeline --params profiles/scratch.yaml"]
    assert make_dry_run("repro") == [".venv/bin/lmcore dvc-yaml", f"PATH={ROOT}/.venv/bin:$PATH .venv/bin/dvc repro"]
    assert make_dry_run("push") == [".venv/bin/dvc push"] and make_dry_run("pull") == [".venv/bin/dvc pull"]
    assert make_dry_run("serve") == [".venv/bin/python -m flows.deploy --start-server --port 4200 --params params.yaml"]
    assert make_dry_run("ui") == [".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"]
    assert make_dry_run("mlflow-server") == [
        f".venv/bin/mlflow server --host 127.0.0.1 --port 5000 --workers 2 --backend-store-uri sqlite:///{ROOT}/mlflow.db "
        f"--artifacts-destination {ROOT}/mlartifacts"]
    (default,) = make_dry_run("test")
    (everything,) = make_dry_run("test-all")
    assert default.startswith(".venv/bin/python -m pytest ") and "-m 'not slow'" in default
    assert "-n auto --dist loadgroup --no-loadscope-reorder" in default  # the groups of tests/conftest.py, longest first
    (serial,) = make_dry_run("test", "XDIST=")
    assert serial == ".venv/bin/python -m pytest -m 'not slow'"
    assert everything.startswith(".venv/bin/python -m pytest ") and "slow" not in everything
    assert re.search(r"^make test-all\b", (ROOT / ".ci" / "run").read_text(), flags=re.M)  # CI runs the README's command


def test_the_readme_sed_lowers_the_learning_rate(tmp_path):
    """README: `sed -i 's/^  lr: 0.00002/  lr: 0.00001/' params.yaml` changes pretrain.lr, and nothing else."""
    from lmcore.config import load_params

    (command,) = [c for c in WHERE if c.startswith("sed ")]
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(shlex.split(command), cwd=tmp_path, check=True)
    before, after = load_params(ROOT / "params.yaml").to_dict(), load_params(tmp_path / "params.yaml").to_dict()
    assert (before["pretrain"]["lr"], after["pretrain"]["lr"]) == (0.00002, 0.00001)
    after["pretrain"]["lr"] = 0.00002
    assert after == before


def test_the_dvc_remote_commands(tmp_path, monkeypatch):
    """docs/operations.md's remotes on a copy of the project's .dvc/config: the per-checkout override, an S3
    remote made the default (no dvc-s3 needed to add it), and `dvc push -r local` naming the local remote."""
    from dvc.cli import main as dvc

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".dvc").mkdir()
    shutil.copyfile(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")
    monkeypatch.chdir(tmp_path)
    assert dvc(["remote", "modify", "--local", "local", "url", "/mnt/team/lmcore-dvc-remote"]) == 0
    assert dvc(["remote", "add", "-d", "s3", "s3://my-bucket/lmcore"]) == 0
    config, local = (tmp_path / ".dvc" / "config").read_text(), (tmp_path / ".dvc" / "config.local").read_text()
    assert "remote = s3" in config and "url = s3://my-bucket/lmcore" in config
    assert "url = /mnt/team/lmcore-dvc-remote" in local
    assert dvc(["push", "-r", "local"]) == 0  # nothing to push yet: no stage has run in this copy


def test_the_documented_mlflow_commands_take_their_options():
    """`mlflow ui ...` (`make ui`) and docs/operations.md's production `mlflow server` (Postgres, S3, basic-auth): the
    installed MLflow has the command (`ui` is its alias of `server`), every option they pass, and the basic-auth app."""
    from importlib.metadata import entry_points

    import click
    from mlflow.cli import cli

    commands = [shlex.split(c) for c in WHERE if c.startswith("mlflow ")]
    assert {c[1] for c in commands} == {"ui", "server"}
    for words in commands:
        command = cli.get_command(click.Context(cli), words[1])
        assert command is not None and command.name == "server", words[1]
        known = {o for p in command.params for o in p.opts}
        assert {w for w in words if w.startswith("--")} - known == set(), words
    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}


def test_the_deploy_command_validates_and_schedules(monkeypatch):
    """docs/operations.md's `python -m flows.deploy --cron ... --timezone Europe/Berlin --params ... --set ... --name`:
    its params validate and the deployment it would serve has that schedule and those parameters (serving it under
    a real Prefect server is tests/test_deployment.py's)."""
    from flows import deploy
    from flows.lifecycle import lifecycle
    from lmcore.config import ParamsError

    served = {}
    monkeypatch.setattr(lifecycle, "serve", lambda **kwargs: served.update(kwargs))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never contacted: serve is replaced
    (command,) = [c for c in WHERE if c.startswith("python -m flows.deploy")]
    monkeypatch.chdir(ROOT)
    deploy.main(shlex.split(command)[3:])
    assert served["name"] == "weekdays" and served["global_limit"] == 1
    assert (served["schedule"].cron, served["schedule"].timezone) == ("30 2 * * 1-5", "Europe/Berlin")
    assert served["parameters"]["params_file"] == str(ROOT / "profiles" / "llama-tiny.yaml")
    assert served["parameters"]["overrides"] == ["pretrain.max_steps=2000"]

    with pytest.raises(ParamsError, match="pretrain.max_stepz"):  # a typo fails before anything is registered
        deploy.main(["--params", "profiles/llama-tiny.yaml", "--set", "pretrain.max_stepz=1"])


def test_the_work_pool_entrypoint_takes_the_documented_parameters():
    """`prefect deploy flows/lifecycle.py:lifecycle ... --param params_file=... --param root=...`: the entrypoint
    loads as Prefect loads it, and is the lifecycle flow with those parameters."""
    from prefect.flows import load_flow_from_entrypoint

    (command,) = [c for c in WHERE if c.startswith("prefect deploy ")]
    words = shlex.split(command)
    flow = load_flow_from_entrypoint(str(ROOT / words[2]))
    assert flow.name == "lmcore-lifecycle"
    given = {words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "--param"}
    assert given == {"params_file", "root"} and given <= set(flow.parameters.properties)


def test_the_pretrain_entry_runs_on_the_shipped_params(tmp_path, one_thread):
    """What every torchrun rank runs (`-m lmcore.pretrain --params profiles/scratch.yaml`), on that profile with its
    benchmark probe (scored at step 0 and at the last step), at tiny sizes; torchrun itself is tests/test_distributed.py's."""
    from benchmarks.train_speed import random_tokens
    from lmcore.bpe import save_trained, train_bpe
    from lmcore.paths import Layout
    from lmcore.launch import main

    tokens = Layout(tmp_path).tokens
    tokens.mkdir(parents=True)
    text = ["the lamp was lit early and the street was quiet again", "by morning the water had gone down"] * 20
    save_trained(train_bpe(text, vocab_size=300, special_tokens=["<|endoftext|>"]), tokens, name="bpe-300", eot="<|endoftext|>")
    random_tokens(tokens, 300, n=20_000)  # shards of its ids (the model keeps scratch.yaml's 8,192 rows)
    overrides = ["pretrain.max_steps=2", "pretrain.eval_interval=2", "pretrain.eval_batches=1", "pretrain.eval_benchmarks_limit=2",
                 "pretrain.model.n_layer=1", "pretrain.model.n_embd=32", "pretrain.model.n_head=2", "pretrain.peak_flops=1e12",
                 "pretrain.threads=1"]
    summary = main(["--params", str(SCRATCH), "--root", str(tmp_path), *(a for o in overrides for a in ("--set", o))])
    assert summary["steps"] == 2 and 1 <= summary["eval_benchmarks_items"] <= 2  # an item longer than the context is left out
    curve = (Layout(tmp_path).pretrain_reports / "bench_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and [row.split(",")[0] for row in curve[1:]] == ["0", "2"]
