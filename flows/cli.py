"""The `lmcore` command line.

    lmcore pipeline                                  # the lifecycle flow on params.yaml
    lmcore pipeline --params profiles/micro.yaml     # another profile (not recorded in dvc.lock)
    lmcore run pretrain --set pretrain.lr=3e-4       # one stage as its own Prefect flow
    lmcore params --set pretrain.max_steps=10        # validate and print the resolved params
    lmcore generate "ROMEO:" --model models/base     # sample from a model folder or models:/name@alias
    lmcore generate "Name three primary colors." --model models/instruct   # an instruction model: its template
    lmcore chat --model models:/lmcore-instruct@dpo  # instructions from stdin, one response each
    lmcore classify "WINNER! Claim your prize now"   # label and probability from models/classifier

It lives beside the flows, not in `lmcore/`, because it drives Prefect and MLflow.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from lmcore.config import ParamsError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help="lmcore: raw text to an evaluated, registered LM.")

ParamsOpt = Annotated[str, typer.Option("--params", "-p", help="params file (relative to --root)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override: dotted key=value (repeatable)")]
RootOpt = Annotated[str, typer.Option("--root", help="project root: where data/, models/, reports/ land")]


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def pipeline(
    params: ParamsOpt = "params.yaml",
    set_: SetOpt = None,
    root: RootOpt = ".",
    commit_dvc: Annotated[bool, typer.Option(help="record outputs in dvc.lock (params.yaml runs only)")] = True,
) -> None:
    """Run the whole lifecycle as one Prefect flow."""
    _check_params(root, params, set_)
    from flows.lifecycle import lifecycle

    result = lifecycle(params_file=params, overrides=set_ or [], root=root, commit_dvc=commit_dvc)
    ev, pre = result["evaluate"], result["pretrain"]
    typer.echo(
        f"val loss {pre['first_val_loss']:.4f} -> {pre['final_val_loss']:.4f}; perplexity {ev['perplexity']:.2f}; "
        f"registered lmcore model v{pre['model_version']}; MLflow run {result['mlflow_run_id']}; dvc: {result['dvc']}"
    )


@app.command()
def run(
    stage: Annotated[str, typer.Argument(help="collect | preprocess | tokenize | pretrain | evaluate | finetune_classifier | finetune_instruct | dpo")],
    params: ParamsOpt = "params.yaml",
    set_: SetOpt = None,
    root: RootOpt = ".",
) -> None:
    """Run one stage as its own Prefect flow (dvc.yaml calls this)."""
    from tasks.stages import STAGES

    if stage not in STAGES:
        _fail(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    _check_params(root, params, set_)
    from flows.stage import stage_flow

    result = stage_flow(stage, params_file=params, overrides=set_ or [], root=root)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command("params")
def show_params(params: ParamsOpt = "params.yaml", set_: SetOpt = None, root: RootOpt = ".") -> None:
    """Validate a params file (with overrides) and print it fully resolved."""
    resolved = _check_params(root, params, set_)
    typer.echo(yaml.safe_dump(resolved.to_dict(), sort_keys=False))


ModelOpt = Annotated[str, typer.Option(help="model folder, models:/name@alias or models:/name/version")]


def _load_generator(model: str):
    """The model, its prompt template (None for a plain LM) and the tokenizer."""
    from lmcore.checkpoint import load_model, read_model_config
    from lmcore.finetune.instruct import TEMPLATE_KEY
    from lmcore.tokenizer import get_encoding

    model_dir = _model_dir(model)
    template = read_model_config(model_dir)[1].get(TEMPLATE_KEY)
    return load_model(model_dir).eval(), template, get_encoding("gpt2")


def _respond(lm, template: str | None, enc, text: str, **sampling) -> str:
    from lmcore.finetune.data import format_prompt
    from lmcore.generation import generate_text

    if template is None:
        return text + generate_text(lm, enc, text, **sampling)
    prompt = format_prompt({"instruction": text, "input": sampling.pop("input", "")}, template)
    return generate_text(lm, enc, prompt, **sampling).strip()


@app.command()
def generate(
    prompt: str,
    model: ModelOpt = "models/base",
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: Annotated[int | None, typer.Option()] = 40,
    seed: int = 0,
    input_: Annotated[str, typer.Option("--input", help="instruction models: the optional input field")] = "",
) -> None:
    """Sample a completion (a plain LM) or a response (an instruction model, in its own template)."""
    lm, template, enc = _load_generator(model)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    if template is not None:
        sampling["input"] = input_
    typer.echo(_respond(lm, template, enc, prompt, **sampling))


@app.command()
def chat(
    model: ModelOpt = "models/instruct",
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: Annotated[int | None, typer.Option()] = None,
    seed: int = 0,
) -> None:
    """Talk to an instruction model: each line you type is an instruction; an empty line or EOF ends."""
    lm, template, enc = _load_generator(model)
    if template is None:
        _fail(f"{model}: not an instruction model (its config.json names no template); use `lmcore generate`")
    typer.echo(f"lmcore chat ({template} template). Empty line or Ctrl-D to quit.", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        typer.echo(_respond(lm, template, enc, line, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed))


@app.command()
def classify(
    texts: Annotated[list[str], typer.Argument(help="one or more texts")],
    model: ModelOpt = "models/classifier",
) -> None:
    """Print the predicted label and its probability for each text (tab-separated)."""
    from lmcore.finetune.classifier import classify as predict_probs
    from lmcore.finetune.classifier import load_classifier
    from lmcore.tokenizer import get_encoding

    try:
        lm, labels, max_length = load_classifier(_model_dir(model))
    except ValueError as err:
        _fail(str(err))
    probs = predict_probs(lm, get_encoding("gpt2"), texts, max_length)
    for row in probs:
        best = int(row.argmax())
        typer.echo(f"{labels[best]}\t{row[best]:.4f}")


def _model_dir(model: str) -> Path:
    if not model.startswith("models:/"):
        path = Path(model)
        if not path.is_dir():
            _fail(f"{model}: no such model folder")
        return path
    import mlflow

    from tasks.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(Path.cwd()))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    # pyfunc layout: <model>/artifacts/<model_dir name>
    found = next(local.glob("artifacts/*/config.json"), None)
    if found is None:
        _fail(f"{model}: no lmcore model folder inside the logged model")
    return found.parent


def _check_params(root: str, params: str, overrides: list[str] | None):
    path = Path(params) if Path(params).is_absolute() else Path(root) / params
    try:
        return load_params(path, overrides=overrides or [])
    except ParamsError as err:
        _fail(str(err))


def main() -> None:
    # Offline-friendly defaults; set before prefect and mlflow are imported (they read settings at import).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(app())


if __name__ == "__main__":
    main()
