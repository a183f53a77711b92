"""A model folder on disk: weights as safetensors, the architecture as JSON, the resolved params as YAML.

    save_model(model, "models/base", params=params.to_dict(), extra={"tokenizer": "gpt2"})
    model = load_model("models/base", device="cpu")

Layout of the folder (names from lmcore.paths):
    model.safetensors  every parameter once (a tied LM head is stored once, as wte.weight)
    config.json        {"format_version": 1, "model": {ModelConfig fields}, **extra}; a classifier also has
                       "head": {"type": "classifier", "labels": [...]}: lm_head is an n-class linear head
    params.yaml        the fully resolved params the model was trained with (when given)

Weights are never unpickled: no torch.load anywhere.

Training checkpoints (resumable pretraining and fine-tuning, written by lmcore.training.save_checkpoint) live
apart from model folders, one folder per step:
    <checkpoint_dir>/step-00000100/
        model.safetensors      the model's tensors (a tied tensor once, under its first name)
        optimizer.safetensors  AdamW state, one tensor per "<parameter name>/<exp_avg|exp_avg_sq|step>"
        rng.safetensors        torch's CPU (and CUDA) generator states
        trainer_state.json     step, the config and its hash, python and numpy RNG states, the loader position,
                               loss history, optimizer param groups, gradient scaler, early-stopping state
        COMPLETE               written last: {"step": ..., "files": {name: size}}
The folder is built under a temporary name and renamed into place once COMPLETE is in it; a folder without
a COMPLETE marker whose sizes match is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as st_load_model

from lmcore.config import ModelConfig
from lmcore.errors import InputError, MissingInputError, one_line, validation_summary
from lmcore.io import fsync_dir, read_json, write_json, write_text
from lmcore.model import GPT
from lmcore.paths import MODEL_CONFIG, RESOLVED_PARAMS, WEIGHTS

FORMAT_VERSION = 1
# Keys of config.json that belong to the format itself; `extra` may not reuse them.
FORMAT_KEY = "format_version"
MODEL_KEY = "model"
# Optional: a non-LM output head. {"type": "classifier", "labels": [...]}; absent for a language model.
HEAD_KEY = "head"
HEAD_CLASSIFIER = "classifier"


class CheckpointError(InputError):
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
        raise MissingInputError(f"{path}: no model config (is {model_dir} a model folder?)")
    try:
        meta = read_json(path)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text ({err.reason} at byte offset {err.start})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if FORMAT_KEY not in meta:
        if "model_type" in meta:  # a Hugging Face config.json
            raise CheckpointError(
                f"{path}: not an lmcore model folder (no {FORMAT_KEY}; a Hugging Face config with model_type "
                f"{meta['model_type']!r}): convert it with `lmcore import-hf {model_dir} <new folder>`"
            )
        raise CheckpointError(
            f"{path}: not an lmcore model folder (no {FORMAT_KEY}; lmcore writes {FORMAT_KEY} {FORMAT_VERSION} "
            f"and a '{MODEL_KEY}' section)"
        )
    version = meta[FORMAT_KEY]
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")
    try:
        config = ModelConfig.model_validate(meta.get(MODEL_KEY))
    except ValidationError as err:
        raise CheckpointError(f"{path}: invalid '{MODEL_KEY}' section: {validation_summary(err)}") from None
    extra = {k: v for k, v in meta.items() if k not in (FORMAT_KEY, MODEL_KEY)}
    return config, extra


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Build the model described by model_dir/config.json and load its weights strictly.

    Returns: the model on `device`, in eval mode.
    Raises: MissingInputError (also a FileNotFoundError) when config.json or the weights are not there;
        CheckpointError naming the file when one is malformed, truncated or does not match the other.
    """
    config, extra = read_model_config(model_dir)  # bounds and memory checked there (ModelConfig)
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise MissingInputError(f"{path}: no weights file")
    head = extra.get(HEAD_KEY)
    n_out = None
    if head is not None:
        labels = head.get("labels") if isinstance(head, dict) else None
        if not isinstance(labels, list) or len(labels) < 2 or head.get("type") != HEAD_CLASSIFIER:
            raise CheckpointError(f"{Path(model_dir) / MODEL_CONFIG}: unsupported '{HEAD_KEY}': {one_line(repr(head))[:200]}")
        n_out = len(labels)
    # Before anything is allocated: the file's header holds every tensor the config describes, in its shape.
    found, expected = _with_safetensors_errors(path, _header_shapes), config.tensor_shapes(n_out)
    missing = sorted(expected.keys() - found.keys())
    if missing:
        unexpected = sorted(found.keys() - expected.keys())
        raise CheckpointError(f"{path}: weights do not match {MODEL_CONFIG}: missing keys {_few(missing)}, "
                              f"unexpected keys {_few(unexpected)}")
    wrong = [f"size mismatch for {k}: {found[k]} in the file, {s} in {MODEL_CONFIG}" for k, s in expected.items()
             if found[k] != s]
    if wrong:
        more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise CheckpointError(f"{path}: weights do not match {MODEL_CONFIG}: {'; '.join(wrong[:2])}{more}")
    model = GPT(config)
    if n_out is not None:
        model.replace_head(n_out)
    try:
        missing, unexpected = _with_safetensors_errors(path, lambda p: st_load_model(model, p, strict=False))
    except RuntimeError as err:  # load_state_dict: "size mismatch for <name>: ..." lines
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [one_line(err)]
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise CheckpointError(f"{path}: weights do not match {MODEL_CONFIG}: {' '.join(lines[:2])}{more}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match {MODEL_CONFIG}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
        )
    return model.to(device).eval()


def _few(names: list[str], n: int = 8) -> str:
    return f"{names[:n]}{f' and {len(names) - n} more' if len(names) > n else ''}"


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, from its header alone (which safetensors checks against the
    file's size: the data is there)."""
    with safe_open(path, framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _with_safetensors_errors(path: Path, read):
    """read(path), with safetensors' and the file system's errors as one CheckpointError line naming the file."""
    try:
        return read(path)
    except SafetensorError as err:  # empty, cut short, a header too large or not JSON, or another kind of file
        raise CheckpointError(
            f"{path}: is truncated or not a safetensors file ({one_line(err)}); save or copy the model folder again"
        ) from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err.strerror or one_line(err)}") from None


# Training checkpoints: file names inside a step folder (see the module docstring).
CKPT_MODEL = WEIGHTS
CKPT_OPTIMIZER = "optimizer.safetensors"
CKPT_RNG = "rng.safetensors"
CKPT_STATE = "trainer_state.json"
CKPT_COMPLETE = "COMPLETE"
CKPT_FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# Keys of trainer_state.json that this module reads; the trainer owns the rest.
STEP_KEY = "step"
CONFIG_KEY = "config"
CONFIG_HASH_KEY = "config_hash"
PARAM_GROUPS_KEY = "optimizer_param_groups"
RNG_KEY = "rng"
_TORCH_CPU_RNG = "torch.cpu"


@dataclass
class TrainingCheckpoint:
    """What a training checkpoint holds, in memory.

    model: name -> tensor (full, unsharded); optimizer: a full optimizer state dict keyed by parameter name
    ({"state": {name: {key: tensor}}, "param_groups": [...]}, as torch.distributed.checkpoint.state_dict
    gives it); state: the JSON-able rest, with at least "step", "config" and "config_hash".
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state[STEP_KEY])


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The python, numpy and torch generator states: (JSON-able part, tensors)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    tensors = {_TORCH_CPU_RNG: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = state
    return {"python": [version, list(internal), gauss], "numpy": np_state}, tensors


def restore_rng(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(tensors[_TORCH_CPU_RNG])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _flatten_optimizer(optimizer: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for name, per_param in optimizer["state"].items():
        for key, value in per_param.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optimizer["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    # AdamW reads betas as a pair; JSON made it a list.
    param_groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": param_groups}


def step_dir(checkpoint_dir: str | Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    """A step folder whose COMPLETE marker exists and whose listed files have the listed sizes."""
    marker = path / CKPT_COMPLETE
    if not marker.is_file():
        return False
    try:
        files = read_json(marker)["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in `checkpoint_dir`, oldest first, as (step, folder)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def save_training_checkpoint(checkpoint_dir: str | Path, ckpt: TrainingCheckpoint, *, keep: int) -> Path:
    """Write `ckpt` as <checkpoint_dir>/step-<step>/, then keep only the `keep` latest complete checkpoints.

    Every file is written and fsynced in a temporary sibling folder, COMPLETE last, and the folder is renamed
    into place: a kill at any moment leaves the previous checkpoints whole and readable.
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, ckpt.step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rng_json, rng_tensors = capture_rng()
        opt_tensors, groups = _flatten_optimizer(ckpt.optimizer)
        save_tensors({k: v.detach().cpu().contiguous() for k, v in ckpt.model.items()}, tmp / CKPT_MODEL)
        save_tensors(opt_tensors, tmp / CKPT_OPTIMIZER)
        save_tensors(rng_tensors, tmp / CKPT_RNG)
        state = {"format_version": CKPT_FORMAT_VERSION, **ckpt.state, PARAM_GROUPS_KEY: groups, RNG_KEY: rng_json}
        write_json(tmp / CKPT_STATE, state)
        files = {name: (tmp / name).stat().st_size for name in (CKPT_MODEL, CKPT_OPTIMIZER, CKPT_RNG, CKPT_STATE)}
        write_json(tmp / CKPT_COMPLETE, {STEP_KEY: ckpt.step, "files": files})
        fsync_dir(tmp)
        if final.exists():  # an older run's folder for the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_checkpoints(checkpoint_dir: str | Path) -> int:
    """Delete every step folder (complete or not) and temporary folder in `checkpoint_dir`; returns how many."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return 0
    n = 0
    for path in root.iterdir():
        if path.is_dir() and (_STEP_DIR.match(path.name) or (path.name.startswith(".step-") and ".tmp-" in path.name)):
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n


def load_training_checkpoint(path: str | Path, *, expect_config: dict[str, Any] | None = None) -> TrainingCheckpoint:
    """Read a checkpoint folder and restore the python, numpy and torch RNG states it holds.

    Args:
        expect_config: the config of the run that resumes; a checkpoint written under another config (its hash
            differs) is refused, naming the keys that differ.
    Raises: CheckpointError for an incomplete folder, another format version or another config.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {CKPT_COMPLETE} marker or files of other sizes)")
    state = read_json(path / CKPT_STATE)
    if state.get("format_version") != CKPT_FORMAT_VERSION:
        raise CheckpointError(f"{path / CKPT_STATE}: format_version {state.get('format_version')!r}; this code reads {CKPT_FORMAT_VERSION}")
    if expect_config is not None and state[CONFIG_HASH_KEY] != config_hash(expect_config):
        diffs = _diff(state[CONFIG_KEY], expect_config)
        raise CheckpointError(
            f"{path}: written under other settings, refusing to resume: "
            + "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diffs[:10])
            + (f" (and {len(diffs) - 10} more)" if len(diffs) > 10 else "")
            + ". Resume with the checkpoint's settings, or start afresh (resume: false removes the old checkpoints)."
        )
    try:
        model = load_file(path / CKPT_MODEL)
        optimizer = _unflatten_optimizer(load_file(path / CKPT_OPTIMIZER), state.pop(PARAM_GROUPS_KEY))
        rng_tensors = load_file(path / CKPT_RNG)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read tensors: {err}") from None
    restore_rng(state.pop(RNG_KEY), rng_tensors)
    return TrainingCheckpoint(model=model, optimizer=optimizer, state=state)


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two JSON trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]
