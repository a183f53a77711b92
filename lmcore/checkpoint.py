"""A model folder on disk: weights as safetensors, the architecture as JSON, the resolved params as YAML.

    save_model(model, "models/base", params=params.to_dict(), extra={"tokenizer": "gpt2"})
    model = load_model("models/base", device="cpu")

Layout of the folder (names from lmcore.paths):
    model.safetensors  every parameter once (a tied LM head is stored once, as wte.weight)
    config.json        {"format_version": 1, "model": {ModelConfig fields}, **extra}; a classifier also has
                       "head": {"type": "classifier", "labels": [...]}: lm_head is an n-class linear head
    params.yaml        the fully resolved params the model was trained with (when given)

Weights are never unpickled: no torch.load anywhere.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_file

from lmcore.config import ModelConfig
from lmcore.io import read_json, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import MODEL_CONFIG, RESOLVED_PARAMS, WEIGHTS

FORMAT_VERSION = 1
# Keys of config.json that belong to the format itself; `extra` may not reuse them.
FORMAT_KEY = "format_version"
MODEL_KEY = "model"
# Optional: a non-LM output head. {"type": "classifier", "labels": [...]}; absent for a language model.
HEAD_KEY = "head"
HEAD_CLASSIFIER = "classifier"


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the file."""


def _unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its first name (a tied LM head is stored as wte.weight).

    safetensors cannot store aliases. Its own save_model also drops them, but records each dropped name
    in a metadata map whose order varies from call to call: the same weights would give other bytes
    (and another DVC hash). Here the only metadata is {"format": "pt"}, so equal weights give equal files.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # storage -> first (name, tensor)
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            first_name, first = seen[key]
            if (t.shape, t.stride(), t.storage_offset()) != (first.shape, first.stride(), first.storage_offset()):
                raise ValueError(f"save_model: {name} is a partial view of {first_name}; cannot store it once")
            continue
        seen[key] = (name, t)
        tensors[name] = t.contiguous()
    return tensors


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically."""
    # save_file writes by file name: write a temporary file in the same folder, fsync, rename into place.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_model(model: GPT, out_dir: str | Path, *, params: dict | None = None, extra: dict | None = None) -> None:
    """Write a model folder; each file is written atomically.

    Args:
        model: the model to save (its `config` goes to config.json).
        out_dir: the folder, created if missing.
        params: the resolved params dict, saved as params.yaml beside the weights.
        extra: more JSON-able keys for config.json, e.g. {"tokenizer": "gpt2"}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    clash = {FORMAT_KEY, MODEL_KEY} & extra.keys()
    if clash:
        raise ValueError(f"save_model: extra keys {sorted(clash)} are reserved in {MODEL_CONFIG}")
    save_tensors(_unique_tensors(model), out_dir / WEIGHTS)
    write_json(out_dir / MODEL_CONFIG, {FORMAT_KEY: FORMAT_VERSION, MODEL_KEY: model.config.model_dump(mode="json"), **extra})
    if params is not None:
        write_text(out_dir / RESOLVED_PARAMS, yaml.safe_dump(params, sort_keys=False))


def read_model_config(model_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Returns: the ModelConfig in model_dir/config.json and the file's other (extra) keys."""
    path = Path(model_dir) / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model config (is {model_dir} a model folder?)")
    meta = read_json(path)
    version = meta.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")
    try:
        config = ModelConfig.model_validate(meta.get(MODEL_KEY))
    except ValidationError as err:
        raise CheckpointError(f"{path}: invalid '{MODEL_KEY}' section:\n{err}") from None
    extra = {k: v for k, v in meta.items() if k not in (FORMAT_KEY, MODEL_KEY)}
    return config, extra


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Build the model described by model_dir/config.json and load its weights strictly.

    Returns: the model on `device`, in eval mode.
    Raises: FileNotFoundError or CheckpointError naming the file when something is missing or does not match.
    """
    config, extra = read_model_config(model_dir)
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights file")
    model = GPT(config)
    head = extra.get(HEAD_KEY)
    if head is not None:
        if head.get("type") != HEAD_CLASSIFIER or len(head.get("labels") or []) < 2:
            raise CheckpointError(f"{Path(model_dir) / MODEL_CONFIG}: unsupported '{HEAD_KEY}': {head!r}")
        model.replace_head(len(head["labels"]))
    try:
        missing, unexpected = st_load_model(model, path, strict=False)
    except (SafetensorError, RuntimeError, OSError) as err:  # corrupt file, shape mismatch
        raise CheckpointError(f"{path}: cannot load weights: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match {MODEL_CONFIG}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
        )
    return model.to(device).eval()
