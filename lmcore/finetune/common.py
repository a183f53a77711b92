"""What the fine-tuning stages share: split files on disk, device setup, freezing, LoRA bookkeeping.

A stage's data folder holds raw/ (the collect output: manifest.json and the files) and splits/
(train.jsonl, val.jsonl, test.jsonl, stats.json), so the exact examples of every split are versioned.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmcore.checkpoint import save_tensors
from lmcore.config import FinetuneConfig, LoraConfig
from lmcore.finetune.data import DataError
from lmcore.finetune.lora import apply_lora, count_parameters, lora_state_dict, merge_lora
from lmcore.io import atomic_dir, atomic_file, read_json, write_json
from lmcore.paths import ADAPTER, ADAPTER_CONFIG, MANIFEST, SPLITS, STATS
from lmcore.tracking import Tracker
from lmcore.training import resolve_device, seed_everything


def raw_files(raw_dir: Path) -> list[Path]:
    """The collected files listed in raw_dir/manifest.json, in source order."""
    manifest_path = Path(raw_dir) / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: no collect manifest (the stage collects its data first)")
    return [Path(raw_dir) / entry["file"] for entry in read_json(manifest_path)["sources"]]


def relative_read_stats(stats: dict, raw_dir: Path) -> dict:
    """A reader's stats with each file's path relative to raw_dir: the splits' stats.json is a DVC output, and its
    bytes must not depend on where the project lives."""

    def rel(entry: dict) -> dict:
        return {**entry, "path": os.path.relpath(entry["path"], raw_dir)}

    return {**stats, "files": [rel(f) for f in stats["files"]]} if "files" in stats else rel(stats)


def write_splits(out_dir: Path, parts: dict[str, list[dict]], stats: dict) -> None:
    """<split>.jsonl for each part and stats.json, as one atomic folder."""
    with atomic_dir(out_dir) as tmp:
        for name, rows in parts.items():
            with atomic_file(tmp / f"{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_json(tmp / STATS, stats)


def read_split(splits_dir: Path, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {SPLITS}")
    path = Path(splits_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing split file (run the stage's data preparation first)")
    # split on "\n" only: texts may hold U+0085 or U+2028, which str.splitlines() would also split on
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def setup(cfg: FinetuneConfig, seed: int) -> torch.device:
    """Seed everything, set the thread count, pick the device."""
    seed_everything(seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def check_length(max_length: int | None, model: torch.nn.Module, what: str) -> int:
    """The example length to use: `max_length`, or the model's context length; never longer than the context."""
    context = model.config.context_length
    if max_length is not None and max_length > context:
        raise ValueError(f"{what}.max_length ({max_length}) exceeds the model's context_length ({context})")
    return max_length or context


def add_lora(model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze the model and add adapters to cfg.target_modules; returns the wrapped module names."""
    return apply_lora(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules)


def log_trainable(model: torch.nn.Module, tracker: Tracker) -> dict[str, int]:
    trainable, total = count_parameters(model)
    counts = {"trainable_params": trainable, "total_params": total}
    tracker.log_metrics(counts, step=0)
    return counts


def save_and_merge_lora(model: torch.nn.Module, cfg: LoraConfig, wrapped: list[str], out_dir: Path) -> None:
    """Write the adapter alone (adapter.safetensors + adapter_config.json), then fold it into the weights."""
    save_tensors({k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}, out_dir / ADAPTER)
    write_json(out_dir / ADAPTER_CONFIG, {**cfg.model_dump(mode="json"), "wrapped_modules": wrapped})
    merge_lora(model)
