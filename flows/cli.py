"""The `lmcore` command line.

    lmcore pipeline                                  # the lifecycle flow on params.yaml: the stages that changed
    lmcore pipeline --force                          # every stage
    lmcore pipeline --params profiles/micro.yaml     # another profile (not recorded in dvc.lock)
    lmcore run pretrain --set pretrain.lr=3e-4       # one stage as its own Prefect flow
    lmcore dvc-yaml                                  # write dvc.yaml from the stage declarations (lmcore.pipeline)
    lmcore params --set pretrain.max_steps=10        # validate and print the resolved params
    lmcore generate "ROMEO:" --model models/base     # sample from a model folder or models:/name@alias
    lmcore generate "Name three primary colors." --model models/instruct   # an instruction model: its template
    lmcore generate "ROMEO:" --top-p 0.9 --stop $'\\n\\n' --no-stream   # nucleus sampling, stop at a blank line, no streaming
    lmcore chat --model models:/lmcore-instruct@dpo  # instructions from stdin, one streamed response each
    lmcore classify "WINNER! Claim your prize now"   # label and probability from models/classifier
    lmcore benchmark --model models:/lmcore-base@champion --tasks hellaswag,mmlu --limit 100 --output reports/eval
    lmcore serve --model models:/lmcore-instruct@dpo --port 8000   # an OpenAI-compatible chat API on 127.0.0.1
    lmcore import-hf hf/llama models/llama           # a Hugging Face GPT-2 or Llama folder -> an lmcore model folder
    lmcore export-hf models/base hf/base             # an lmcore model folder -> config.json + model.safetensors for transformers
    lmcore import-gguf model.gguf models/imported    # a llama.cpp GGUF file (dequantized, with tokenizer and chat template)
    lmcore export-gguf models/instruct out.gguf --dtype f16   # for llama.cpp and Ollama, with the model's tokenizer
    lmcore lineage models:/lmcore-base@champion      # model version -> its run -> the runs that made its inputs -> raw sources

It lives beside the flows, not in `lmcore/`, because it drives Prefect and MLflow.

Failures: bad input (lmcore.errors.InputError: a params key, a data file, an archive member, a model file) ends
the command with one line naming it and exit status 2, a transient failure that outlasted its retries with one
line and status 1; the traceback is in logs/<stage>.log and the stage's MLflow run, and on the terminal with
`lmcore --verbose ...`. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer
import yaml
from typer.core import TyperGroup

from lmcore import pipeline
from lmcore.config import load_params
from lmcore.errors import is_input_error, is_transient
from tasks import failures

VERBOSE = False  # --verbose: tracebacks of expected failures on the terminal too


def _expected(err: BaseException) -> bool:
    return is_input_error(err) or is_transient(err)


class _OneLineErrors(TyperGroup):
    """Bad input and transient failures end a command with one line (exit 2 and 1); bugs keep their traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as err:
            if not _expected(err):
                raise
            if VERBOSE:
                traceback.print_exception(err, file=sys.stderr)
            recorded = failures.RECORDED.get(str(err))
            detail = f"  [traceback: {recorded.log}]" if recorded and recorded.log and not VERBOSE else ""
            typer.secho(f"{err}{detail}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2 if is_input_error(err) else 1) from None


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lmcore: raw text to an evaluated, registered LM.")


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks of failures caused by "
                                                    "bad input or the network (always in logs/<stage>.log)")] = False) -> None:
    global VERBOSE
    VERBOSE = verbose


class _HideExpectedFailures(logging.Filter):
    """Keeps Prefect's reports of an expected failure (its traceback, its "Finished in state Failed" lines) off
    the terminal: the command prints the failure once, as one line. Bugs pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and _expected(record.exc_info[1]):
            return False
        message = record.getMessage()
        return not any(m in message or repr(m)[1:-1] in message for m, f in failures.RECORDED.items() if f.bad_input and m)


def _quiet_terminal() -> None:
    """Install _HideExpectedFailures on the terminal's log handlers (after Prefect configured logging)."""
    if VERBOSE:
        return
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's handlers now; later set-ups are incremental and keep them
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if not any(isinstance(f, _HideExpectedFailures) for f in handler.filters):
                    handler.addFilter(_HideExpectedFailures())


ParamsOpt = Annotated[str, typer.Option("--params", "-p", help="params file (relative to --root)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override: dotted key=value (repeatable)")]
RootOpt = Annotated[str, typer.Option("--root", help="project root: where data/, models/, reports/ land")]
WaitOpt = Annotated[float, typer.Option("--wait", help="seconds to wait for another run working in the root (0: fail at once)")]


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("pipeline")
def run_pipeline(
    params: ParamsOpt = "params.yaml",
    set_: SetOpt = None,
    root: RootOpt = ".",
    commit_dvc: Annotated[bool, typer.Option(help="record outputs in dvc.lock (params.yaml runs only)")] = True,
    force: Annotated[bool, typer.Option("--force", help="run every stage, even those DVC finds unchanged")] = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Run the lifecycle as one Prefect flow, each stage only when it changed (see dvc.lock); prints the summary."""
    checked = _check_params(root, params, set_)
    _fail_on([line for name in pipeline.NAMES for line in pipeline.get(name).missing_local_paths(checked, Path(root))])
    _quiet_terminal()
    from flows.lifecycle import lifecycle

    result = lifecycle(params_file=params, overrides=set_ or [], root=root, commit_dvc=commit_dvc, force=force, wait_s=wait)
    width = max(len(label) for label, _ in result["summary"])
    for label, value in result["summary"] + [("MLflow run", result["mlflow_run_id"]), ("DVC", result["dvc"])]:
        typer.echo(f"{label.ljust(width)}  {value}")


@app.command()
def run(
    stage: Annotated[str, typer.Argument(help=" | ".join(pipeline.NAMES))],
    params: ParamsOpt = "params.yaml",
    set_: SetOpt = None,
    root: RootOpt = ".",
    wait: WaitOpt = 0.0,
) -> None:
    """Run one stage as its own Prefect flow (dvc.yaml calls this); prints its summary as JSON."""
    if stage not in pipeline.NAMES:
        _fail(f"unknown stage {stage!r}; stages: {', '.join(pipeline.NAMES)}")
    _fail_on(pipeline.missing_inputs(stage, _check_params(root, params, set_), Path(root)))
    _quiet_terminal()
    from flows.stage import stage_flow

    result = stage_flow(stage, params_file=params, overrides=set_ or [], root=root, wait_s=wait)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command("dvc-yaml")
def dvc_yaml(
    root: RootOpt = ".",
    check: Annotated[bool, typer.Option("--check", help="only compare: exit 1 when <root>/dvc.yaml differs")] = False,
) -> None:
    """Write dvc.yaml from the stage declarations (lmcore.pipeline); code deps are each stage's import closure."""
    from flows.dvc_yaml import render_for
    from lmcore.io import write_text

    path = Path(root) / "dvc.yaml"
    text = render_for(root)
    current = path.read_text(encoding="utf-8") if path.is_file() else None
    if check:
        if current != text:
            typer.secho(f"{path} differs from what the stage declarations produce: run `lmcore dvc-yaml`", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        typer.echo(f"{path} is up to date")
        return
    if current != text:
        write_text(path, text)
    typer.echo(f"{path}: {len(pipeline.STAGES)} stages" + ("" if current != text else " (unchanged)"))


@app.command("params")
def show_params(params: ParamsOpt = "params.yaml", set_: SetOpt = None, root: RootOpt = ".") -> None:
    """Validate a params file (with overrides) and print it fully resolved."""
    resolved = _check_params(root, params, set_)
    typer.echo(yaml.safe_dump(resolved.to_dict(), sort_keys=False))


ModelOpt = Annotated[str, typer.Option(help="model folder, models:/name@alias, models:/name/version or models:/name (its @champion)")]


def _load_generator(model: str):
    """The model, its prompt template (None for a plain LM; "chat": the chat template its tokenizer carries) and the
    tokenizer the model folder carries."""
    from lmcore.checkpoint import load_model, read_model_config
    from lmcore.finetune.instruct import TEMPLATE_KEY, check_chat_template
    from lmcore.tokenizer import load_tokenizer

    model_dir = _model_dir(model)
    extra = read_model_config(model_dir)[1]
    enc = load_tokenizer(model_dir)
    template = extra.get(TEMPLATE_KEY)
    if template is not None:
        check_chat_template(enc, template, str(model_dir))
    return load_model(model_dir).eval(), template, enc


TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0 is greedy")]
TopKOpt = Annotated[int | None, typer.Option(min=1, help="sample among the k most likely tokens")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling: the most likely tokens up to this mass; 1: all")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="end the text before this string (repeatable)")]
StreamOpt = Annotated[bool, typer.Option(help="print the text as it is generated")]
CacheOpt = Annotated[bool, typer.Option("--cache/--no-cache", help="decode with the KV cache")]


def _respond(lm, template: str | None, enc, text: str, *, input_: str = "", stream: bool = True, **sampling) -> None:
    """Print the completion of `text` (a plain LM, after the prompt) or the response to it (an instruction model,
    in its template, stripped; up to the chat template's end of turn), piece by piece as it is generated when `stream`."""
    from lmcore.finetune.data import instruction_prompt
    from lmcore.generation import stream_text, strip_pieces

    if sampling["top_p"] == 0:
        _fail("--top-p must be greater than 0")
    if template is None:
        typer.echo(text, nl=False)
        pieces = stream_text(lm, enc, text, **sampling)
    else:
        prompt, stop_ids = instruction_prompt({"instruction": text, "input": input_}, enc, template)
        pieces = strip_pieces(stream_text(lm, enc, prompt, stop_ids=stop_ids, **sampling))
    if stream:
        for piece in pieces:
            typer.echo(piece, nl=False)  # click flushes after each write
        typer.echo()
    else:
        typer.echo("".join(pieces))


@app.command()
def generate(
    prompt: str,
    model: ModelOpt = "models/base",
    max_new_tokens: int = 50,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 1.0,
    stop: StopOpt = None,
    seed: int = 0,
    input_: Annotated[str, typer.Option("--input", help="instruction models: the optional input field")] = "",
    stream: StreamOpt = True,
    cache: CacheOpt = True,
) -> None:
    """Sample a completion (a plain LM) or a response (an instruction model, in its own template: alpaca, phi3 or the
    chat template its tokenizer carries)."""
    lm, template, enc = _load_generator(model)
    _respond(lm, template, enc, prompt, input_=input_, stream=stream, max_new_tokens=max_new_tokens, temperature=temperature,
             top_k=top_k, top_p=top_p, stop=stop or [], seed=seed, use_cache=cache)


@app.command()
def chat(
    model: ModelOpt = "models/instruct",
    max_new_tokens: int = 100,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = 1.0,
    stop: StopOpt = None,
    seed: int = 0,
    stream: StreamOpt = True,
    cache: CacheOpt = True,
) -> None:
    """Talk to an instruction model: each line you type is an instruction; an empty line or EOF ends. A model whose
    config.json names no template but whose tokenizer carries a chat template (a downloaded chat model, such as the
    first champion of lmcore-instruct) talks in that template."""
    lm, template, enc = _load_generator(model)
    if template is None and enc.chat_template is not None:
        template = "chat"
    if template is None:
        _fail(f"{model}: not an instruction model (its config.json names no template, its tokenizer no chat template); "
              "use `lmcore generate`")
    typer.echo(f"lmcore chat ({template} template). Empty line or Ctrl-D to quit.", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        _respond(lm, template, enc, line, stream=stream, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, stop=stop or [], seed=seed, use_cache=cache)


@app.command()
def classify(
    texts: Annotated[list[str], typer.Argument(help="one or more texts")],
    model: ModelOpt = "models/classifier",
) -> None:
    """Print the predicted label and its probability for each text (tab-separated)."""
    from lmcore.finetune.classifier import classify as predict_probs
    from lmcore.finetune.classifier import load_classifier
    from lmcore.tokenizer import load_tokenizer

    model_dir = _model_dir(model)
    try:
        lm, labels, max_length = load_classifier(model_dir)
    except ValueError as err:
        _fail(str(err))
    probs = predict_probs(lm, load_tokenizer(model_dir), texts, max_length)
    for row in probs:
        best = int(row.argmax())
        typer.echo(f"{labels[best]}\t{row[best]:.4f}")


@app.command("benchmark")
def benchmark(
    model: ModelOpt = "models/base",
    tasks: Annotated[str | None, typer.Option(help="comma-separated: hellaswag, mmlu, mmlu_<subject>, truthfulqa_mc1, "
                                                   "truthfulqa_mc2, arc_easy, arc_challenge (default: params' benchmark.tasks); "
                                                   "or the generative ifeval, gsm8k")] = None,
    limit: Annotated[int | None, typer.Option(help="items per task (per subject for MMLU), sampled with --seed; default: params")] = None,
    output: Annotated[str, typer.Option(help="folder for results.json, metrics.json, samples/*.jsonl, table.md, scores.png")] = "reports/eval",
    num_fewshot: Annotated[int | None, typer.Option(help="MMLU dev examples before each question; default: params")] = None,
    batch_size: Annotated[int | None, typer.Option(help="items per forward pass; default: params")] = None,
    seed: Annotated[int | None, typer.Option(help="the sample's seed; default: params' benchmark.sample_seed")] = None,
    max_gen_toks: Annotated[int | None, typer.Option(help="ifeval, gsm8k: tokens generated per item; default: params' "
                                                          "instruct_eval.max_gen_toks")] = None,
    data: Annotated[str | None, typer.Option(help="a collected benchmark folder; default: data/benchmarks, collected "
                                                  "there (offline mirror first) when missing")] = None,
    params: ParamsOpt = "params.yaml",
    set_: SetOpt = None,
    root: RootOpt = ".",
) -> None:
    """Score a model on benchmarks as lm-evaluation-harness scores them: multiple choice by log-likelihood, or
    IFEval and GSM8K by greedy generation in the model's chat template."""
    from lmcore.harness.gentasks import TASKS as GENERATIVE_TASKS
    from lmcore.harness.run import TABLE, benchmark_model

    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if any(t in GENERATIVE_TASKS for t in names):
        _eval_generative(model, names, limit, output, batch_size, seed, max_gen_toks, data, params, set_, root)
        return
    overrides = list(set_ or [])
    if tasks is not None:
        overrides.append(f"benchmark.tasks=[{','.join(t.strip() for t in tasks.split(',') if t.strip())}]")
    for key, value in (("limit", limit), ("num_fewshot", num_fewshot), ("batch_size", batch_size), ("sample_seed", seed)):
        if value is not None:
            overrides.append(f"benchmark.{key}={value}")
    if tasks is not None:  # the primary metric matters for promotion only: the first task's headline metric
        overrides.append("benchmark.primary_metric=null")
    cfg = _check_params(root, params, overrides).benchmark
    model_dir = _model_dir(model)  # a wrong path fails before any data is collected
    data_dir = Path(data) if data else _collected_benchmarks(Path(root), cfg)
    from lmcore.tokenizer import load_tokenizer

    try:
        results = benchmark_model(cfg, model_dir, data_dir, Path(output), enc=load_tokenizer(model_dir), model_ref=model)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo((Path(output) / TABLE).read_text(encoding="utf-8"), nl=False)
    typer.echo(f"{results['n_items']} items in {results['elapsed_s']:.1f} s ({results['items_per_s']} items/s); "
               f"sample seed {cfg.sample_seed}, sha256 {results['sample_sha256'][:12]}; written to {output}")


# The command's first name, kept for scripts: `lmcore eval` is `lmcore benchmark` (not the evaluate stage).
app.command("eval", hidden=True, help="The old name of `lmcore benchmark`.")(benchmark)


def _eval_generative(model, names, limit, output, batch_size, seed, max_gen_toks, data, params, set_, root) -> None:
    """`lmcore benchmark` of the generative tasks (lmcore.harness.generative) with the instruct_eval section's settings."""
    from lmcore.harness.gentasks import TASKS as GENERATIVE_TASKS

    mixed = [t for t in names if t not in GENERATIVE_TASKS]
    if mixed:
        _fail(f"--tasks: {', '.join(mixed)} with {', '.join(t for t in names if t in GENERATIVE_TASKS)}: score multiple-choice "
              "and generative tasks in separate runs")
    overrides = [*(set_ or []), f"instruct_eval.tasks=[{','.join(names)}]"]
    for key, value in (("limit", limit), ("batch_size", batch_size), ("sample_seed", seed), ("max_gen_toks", max_gen_toks)):
        if value is not None:
            overrides.append(f"instruct_eval.{key}={value}")
    overrides.append(f"instruct_eval.primary_metric={names[0]}.{GENERATIVE_TASKS[names[0]].metrics[0]}")
    cfg = _check_params(root, params, overrides).instruct_eval
    from lmcore.paths import Layout

    model_dir = _model_dir(model)  # a wrong path fails before any data is collected
    data_dir = Path(data) if data else _collected_benchmarks(Path(root), cfg, Layout(root).generative_data)
    from lmcore.checkpoint import load_model
    from lmcore.harness.generative import RESULTS, run_generative
    from lmcore.tokenizer import load_tokenizer

    try:
        results = run_generative(load_model(model_dir), load_tokenizer(model_dir), data_dir, Path(output), tasks=cfg.tasks,
                                 limit=cfg.limit, sample_seed=cfg.sample_seed, max_gen_toks=cfg.max_gen_toks,
                                 batch_size=cfg.batch_size, chat_template=cfg.chat_template, model_ref=model)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    for task, scores in results["tasks"].items():
        for metric in GENERATIVE_TASKS[task].metrics:
            se = scores.get(f"{metric}_stderr")
            typer.echo(f"{task}\t{metric}\t{scores[metric]:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
    typer.echo(f"{results['n_items']} items in {results['elapsed_s']:.1f} s; {results['config']['template_mode']} prompts; "
               f"sample seed {cfg.sample_seed}, sha256 {results['sample_sha256'][:12]}; written to {output}/{RESULTS}")


def _collected_benchmarks(root: Path, cfg, out: Path | None = None) -> Path:
    """data/benchmarks (or `out`) under the root, collected from the configured sources (mirror first) unless
    already there."""
    from lmcore.config import CollectConfig
    from lmcore.data.collect import collect, mirror_from_env
    from lmcore.paths import MANIFEST, Layout

    out = out or Layout(root).benchmark_data
    if (out / MANIFEST).is_file():
        collected = {e["name"]: e["sha256"] for e in json.loads((out / MANIFEST).read_text())["sources"]}
        if all(collected.get(s.name) == s.sha256 for s in cfg.sources):
            return out
    collect(CollectConfig(sources=cfg.sources), out, mirror=mirror_from_env(), base_dir=root)  # errors: one line
    return out


@app.command()
def serve(
    model: ModelOpt = "models/instruct",
    host: Annotated[str, typer.Option(help="address to bind; anything but loopback exposes the model (use --api-key)")] = "127.0.0.1",
    port: int = 8000,
    name: Annotated[str | None, typer.Option(help="the model name clients send; default: from --model")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | mps | auto")] = "cpu",
    api_key: Annotated[str | None, typer.Option(envvar="LMCORE_API_KEY", show_envvar=True,
                                                help="clients must send 'Authorization: Bearer KEY' (401 otherwise)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="requests decoded together (continuous batching)")] = 16,
    max_queue: Annotated[int, typer.Option(min=0, help="requests waiting for a place; past that, 503 with Retry-After")] = 64,
    queue_timeout: Annotated[float, typer.Option(min=0.0, help="seconds a request may wait for a place (then 503)")] = 30.0,
    request_timeout: Annotated[float, typer.Option(min=0.0, help="seconds a non-streamed request may take (then 504)")] = 600.0,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="the most tokens a request may ask for; default: the context")] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="larger request bodies are refused (413)")] = 1 << 20,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="a Host header name to accept (repeat; '*' any); default: loopback names, plus --host when it is not loopback")] = None,
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic int8 linear layers (CPU)")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models), requests batched."""
    import ipaddress

    from lmcore.serve import LOOPBACK_HOSTS, ServerOptions
    from lmcore.serve import serve as run_server

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not loopback and not api_key:
        typer.secho(
            f"warning: binding {host} without --api-key: anyone who can reach this machine can use the model; "
            "use --host 127.0.0.1 to keep it local, or set LMCORE_API_KEY",
            fg=typer.colors.YELLOW,
            err=True,
        )
    hosts = tuple(allowed_host) if allowed_host else LOOPBACK_HOSTS + (() if loopback else (host,))
    options = ServerOptions(max_batch=max_batch, max_queue=max_queue, queue_timeout=queue_timeout,
                            request_timeout=request_timeout, max_tokens=max_tokens, max_body_bytes=max_body_bytes,
                            api_key=api_key or None, allowed_hosts=hosts)
    # "models:/lmcore-instruct@dpo" -> "lmcore-instruct@dpo"; a folder -> its name.
    name = name or (model.removeprefix("models:/") if model.startswith("models:/") else Path(model).resolve().name)
    try:
        run_server(_model_dir(model), host=host, port=port, model_name=name, device=device, options=options, quantize=quantize)
    except (ValueError, FileNotFoundError) as err:  # not a servable model folder, a bad --quantize
        _fail(str(err))


@app.command("import-hf")
def import_hf(
    src_dir: Annotated[str, typer.Argument(help="Hugging Face folder: config.json and model.safetensors (or sharded)")],
    dst_dir: Annotated[str, typer.Argument(help="the lmcore model folder to write")],
) -> None:
    """Convert a Hugging Face GPT-2 or Llama folder into an lmcore model folder.

        lmcore import-hf hf/llama models/llama
    """
    from lmcore.hf import import_hf as convert

    try:
        done = convert(src_dir, dst_dir)
    except (ValueError, OSError) as err:  # lmcore.hf.HFError names the file and what is refused
        _fail(str(err))
    typer.echo(f"imported {done['model_type']} ({done['params']:,} parameters) from {src_dir} to {done['path']}")


@app.command("export-hf")
def export_hf(
    src_dir: Annotated[str, typer.Argument(help="an lmcore model folder, or models:/name@alias, models:/name/version")],
    dst_dir: Annotated[str, typer.Argument(help="the Hugging Face folder to write (config.json, model.safetensors)")],
) -> None:
    """Write an lmcore model folder as a Hugging Face GPT-2 or Llama folder that transformers loads, with its model
    card (MODEL_CARD.md and the Hub's README.md): a registered version's card, scores and promotion included.

        lmcore export-hf models/base hf/base
        lmcore export-hf models:/lmcore-base@champion hf/champion
    """
    from lmcore.hf import export_hf as convert

    folder, card = _model_dir(src_dir), None
    if src_dir.startswith("models:/"):  # resolved above: the version exists
        from tasks.registry import version_card
        from tasks.tracking import tracking_uri

        card = version_card(src_dir, tracking_uri(Path.cwd()))
    try:
        done = convert(folder, dst_dir, card=card)
    except (ValueError, OSError) as err:  # HFError, or CheckpointError for a broken model folder
        _fail(str(err))
    typer.echo(f"exported {done['model_type']} ({done['params']:,} parameters) from {src_dir} to {done['path']}")


@app.command("import-gguf")
def import_gguf(
    src: Annotated[str, typer.Argument(help="a GGUF file (llama or gpt2; any quantization gguf can dequantize)")],
    dst_dir: Annotated[str, typer.Argument(help="the lmcore model folder to write (float32 weights and the tokenizer)")],
) -> None:
    """Convert a GGUF file (llama.cpp's format) into an lmcore model folder with its tokenizer.

        lmcore import-gguf ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
    """
    from lmcore.gguf import import_gguf as convert

    try:
        done = convert(src, dst_dir)
    except (ValueError, OSError) as err:  # GGUFError / TokenizerError name the file and what is refused
        _fail(str(err))
    types = ", ".join(f"{n} {t}" for t, n in done["tensor_types"].items())
    typer.echo(f"imported {done['architecture']} {done['name']!r} ({done['params']:,} parameters; tensors {types}; "
               f"tokenizer {done['n_vocab']:,} tokens) from {src} to {done['path']}")


@app.command("export-gguf")
def export_gguf(
    model_dir: Annotated[str, typer.Argument(help="an lmcore model folder (GPT-2 or Llama style) carrying its tokenizer")],
    out: Annotated[str, typer.Argument(help="the .gguf file to write")],
    dtype: Annotated[str, typer.Option(help="type of the 2-D weights: f32, f16, bf16 or q8_0 (norms and biases stay f32)")] = "f32",
) -> None:
    """Write an lmcore model folder as one GGUF file for llama.cpp (and transformers' gguf_file=).

        lmcore export-gguf models/smollm2 smollm2.f16.gguf --dtype f16
    """
    from lmcore.gguf import export_gguf as convert

    try:
        done = convert(model_dir, out, dtype=dtype)
    except (ValueError, OSError) as err:  # GGUFError/HFError, or CheckpointError for a broken model folder
        _fail(str(err))
    typer.echo(f"exported {done['architecture']} ({done['params']:,} parameters, {done['dtype']}, {done['bytes']:,} bytes) "
               f"from {model_dir} to {done['path']}")


@app.command()
def lineage(
    model: Annotated[str, typer.Argument(help="models:/name/version or models:/name@alias")],
    json_: Annotated[bool, typer.Option("--json", help="print the chain as JSON")] = False,
    root: RootOpt = ".",
) -> None:
    """Print where a registered model came from: its run (git commit, params, Prefect flow run, DVC input hashes),
    the base model of a fine-tune, the tokens, preprocess and collect runs, and the raw sources.

        lmcore lineage models:/lmcore-instruct@dpo --json
    """
    from tasks.lineage import LineageError, model_lineage
    from tasks.lineage_print import render
    from tasks.tracking import tracking_uri

    try:
        chain = model_lineage(model, tracking_uri(Path(root)))
    except LineageError as err:
        _fail(str(err))
    if json_:
        typer.echo(json.dumps(chain, indent=2))
    else:
        render(chain)


def _model_dir(model: str) -> Path:
    """A model folder, or the lmcore model folder inside a registered model (`models:/name@alias`, downloaded)."""
    if not model.startswith("models:/"):
        path = Path(model)
        if not path.is_dir():
            _fail(f"{model}: no such model folder")
        return path
    from tasks.registry import download_model_dir
    from tasks.tracking import tracking_uri

    try:
        return download_model_dir(model, tracking_uri(Path.cwd()))
    except (ValueError, OSError) as err:
        _fail(str(err))


def _check_params(root: str, params: str, overrides: list[str] | None):
    path = Path(params) if Path(params).is_absolute() else Path(root) / params
    return load_params(path, overrides=overrides or [])  # a ParamsError is bad input: one line, exit 2


def _fail_on(missing: list[str]) -> None:
    """Exit 2 with the first missing input's line (lmcore.pipeline.missing_inputs, Stage.missing_local_paths), and
    how many more: bad input answers in a second, before Prefect, MLflow and torch start."""
    if missing:
        _fail(missing[0] + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def main() -> None:
    # Offline-friendly defaults; set before prefect and mlflow are imported (they read settings at import).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(app())


if __name__ == "__main__":
    main()
