"""Instruction fine-tuning (book ch. 7): Alpaca-style data in a prompt template, next-token loss on
prompt + response, padding after the first end-of-text masked out (and the prompt too, with `mask_prompt`).

The template: the start model's own chat template when its tokenizer carries one (template auto or chat; SmolLM2's
ChatML from its GGUF metadata): each record becomes a user message and the assistant's reply, ending with the
template's end of turn ("<|im_end|>"), which the model learns to stop at. Otherwise (GPT-2) the book's Alpaca
prompt, or Phi-3's, with end-of-text after the response.

    stats = prepare_instructions(params.finetune_instruct, raw_dir, splits_dir, seed=params.seed)
    summary = finetune_instruct(params.finetune_instruct, Path("models/base"), splits_dir,
                                Path("models/instruct"), Path("reports/instruct"), seed=params.seed, enc=enc)

Validation also reports bits per byte (`val_bpb`): the unmasked targets' loss over the UTF-8 bytes they stand for,
special tokens (end of text, end of turn) left out, comparable across tokenizers.

After training, responses to the test split are generated (greedy by default) and saved as
test_responses.jsonl beside the reference outputs: the input of LLM-as-judge scoring.
The model folder's config.json records the template ("chat" for the model's own), and the folder carries the
tokenizer (and with it the chat template), so `lmcore generate`, `lmcore chat` and `lmcore serve` format prompts
exactly as the model was trained.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmcore.checkpoint import load_model, read_model_config, save_model
from lmcore.config import DpoConfig, InstructConfig
from lmcore.finetune.common import (
    add_lora,
    check_length,
    log_trainable,
    raw_files,
    read_split,
    relative_read_stats,
    save_and_merge_lora,
    setup,
    write_splits,
)
from lmcore.finetune.data import (
    CHAT,
    IGNORE_INDEX,
    collate_eot,
    collate_instruct,
    encode_instruction,
    instruction_prompt,
    read_instruction_json,
    resolve_template,
    split,
)
from lmcore.finetune.trainer import batches, fit, write_curves
from lmcore.generation import encode_prompt, generate_batch
from lmcore.errors import InputError
from lmcore.harness.benchmarks import Item
from lmcore.harness.probe import section_probe
from lmcore.io import atomic_dir, atomic_file, write_json
from lmcore.model import GPT
from lmcore.paths import METRICS, SUMMARY, TEST_RESPONSES
from lmcore.tracking import NullTracker, Tracker
from lmcore.training import bits_per_byte, bpb_sums, token_bytes

log = logging.getLogger(__name__)

TEMPLATE_KEY = "template"  # in an instruction model's config.json: alpaca | phi3 | chat (the tokenizer's own)


def prepare_instructions(
    cfg: InstructConfig | DpoConfig, raw_dir: Path, out_dir: Path, *, seed: int, fields: Sequence[str] = ("instruction", "output")
) -> dict:
    """Read the collected JSON, split train/val/test by seed, write the splits and stats.json.

    Returns: the stats (records read, bad records by reason, split sizes).
    """
    (path,) = raw_files(raw_dir)
    records, read_stats = read_instruction_json(path, fields=fields, on_bad=cfg.on_bad, max_bad_fraction=cfg.max_bad_fraction)
    read_stats = relative_read_stats(read_stats, raw_dir)
    parts = dict(zip(("train", "val", "test"), split(records, (cfg.train_fraction, cfg.val_fraction), seed)))
    for name, rows in parts.items():
        if not rows:
            raise ValueError(f"{path}: the {name} split is empty ({len(records)} records)")
    stats = {"read": read_stats, "records": len(records), "splits": {k: len(v) for k, v in parts.items()}}
    write_splits(out_dir, parts, stats)
    return stats


def template_of(model_dir: Path) -> str:
    """The prompt template an instruction model was trained with (alpaca for a model that records none)."""
    return read_model_config(model_dir)[1].get(TEMPLATE_KEY, "alpaca")


def check_chat_template(enc, template: str, where: str) -> None:
    """Refuse a model recorded as trained with its chat template whose tokenizer has none."""
    if template == CHAT and not getattr(enc, "chat_template", None):
        raise InputError(f"{where}: trained with its chat template ({TEMPLATE_KEY} '{CHAT}'), but its tokenizer {enc.name} has no chat template")


def token_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the unmasked targets, and their number."""
    logits, _ = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def val_metrics(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], bytes_per_token: torch.Tensor) -> dict[str, float]:
    """Token-weighted mean loss over batches ("loss": every response token counts the same) and its bits per byte ("bpb", lmcore.training.bpb_sums: the
    unmasked targets' nats over their bytes; absent when they stand for no byte)."""
    total, n, nats, n_bytes = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for inputs, targets in batches:
            logits, _ = model(inputs)  # (B, T, V)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
            batch_nats, batch_bytes = bpb_sums(losses, targets, bytes_per_token)
            total, n = total + losses.sum().item(), n + int((targets != IGNORE_INDEX).sum())
            nats, n_bytes = nats + batch_nats.item(), n_bytes + batch_bytes.item()
    bpb = bits_per_byte(nats, n_bytes)
    return {"loss": total / max(1, n), **({"bpb": bpb} if bpb is not None else {})}


def generate_responses(
    model: GPT, enc, entries: list[dict], template: str, *, max_new_tokens: int, temperature: float, top_k: int | None, seed: int
) -> list[dict]:
    """The model's response to each entry's prompt (in `template`; stopping at its end of turn), beside the reference output.

    The prompts are decoded in batches (lmcore.generation.generate_batch); each response is the one `stream_text`
    gives its prompt alone, entry i sampled with seed + i when temperature > 0, as when they ran one at a time.
    """
    prompts, stop_ids = [], {}
    for entry in entries:
        prompt, stops = instruction_prompt(entry, enc, template)
        prompts.append(encode_prompt(enc, prompt) if isinstance(prompt, str) else prompt)
        stop_ids.update(dict.fromkeys(stops))  # the template's: the same for every entry
    with tqdm(total=len(entries), desc="test responses", unit="prompt", dynamic_ncols=True) as bar:
        completions = generate_batch(model, enc, prompts, max_new_tokens, stop_ids=list(stop_ids), temperature=temperature,
                                     top_k=top_k, seed=seed, progress=bar.update)
    return [
        {"instruction": entry["instruction"], "input": entry.get("input", ""), "output": entry.get("output", entry.get("chosen", "")),
         "response": c.text.strip()}
        for entry, c in zip(entries, completions)
    ]


def finetune_instruct(
    cfg: InstructConfig,
    base_model_dir: Path,
    splits_dir: Path,
    model_dir: Path,
    reports_dir: Path,
    *,
    seed: int,
    enc,
    params: dict | None = None,
    tracker: Tracker = NullTracker(),
    checkpoint_dir: Path | None = None,
    bench_items: list[Item] | None = None,
) -> dict:
    """Instruction-tune the pretrained model (all weights, or LoRA adapters merged at the end).

    Args:
        cfg: the finetune_instruct params (template, mask_prompt, optimisation, LoRA, test generation).
        base_model_dir: the pretrained model folder.
        enc: its tokenizer; saved with the instruction model; its chat template is the template for auto or chat.
        splits_dir: prepare_instructions' output.
        model_dir: replaced by the instruction model (config.json records the resolved template) and its tokenizer.
        reports_dir: replaced by loss curves, metrics.json, summary.json and test_responses.jsonl.
        checkpoint_dir: training checkpoints every cfg.checkpoint_interval steps, resumed with cfg.resume; None: none.
        bench_items: with cfg.eval_benchmarks_every, the benchmark probe's sample (lmcore.harness.probe.probe_items),
            scored at step 0, every N steps and at the end: train_bench.<task>.<metric>, bench_curve.csv.

    Returns: the summary: first/final val loss, final val bits per byte, test loss, trainable parameters, steps, the resolved template
        (and the probe's item count and time, when it ran).
    """
    template = resolve_template(cfg.template, enc)
    log.info("finetune_instruct: %s template%s", template, f" ({cfg.template})" if template != cfg.template else "")
    device = setup(cfg, seed)
    model = load_model(base_model_dir, device)
    max_length = check_length(cfg.max_length, model, "finetune_instruct")
    wrapped = add_lora(model, cfg.lora) if cfg.lora.enabled else []
    if not wrapped:
        model.requires_grad_(True)
    counts = log_trainable(model, tracker)
    probe = section_probe(cfg, bench_items, enc, model.config.context_length, key="finetune_instruct")

    def encode(rows: list[dict]) -> list[tuple[list[int], int]]:
        return [encode_instruction(r, enc, template) for r in rows]

    def to_device(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = collate_instruct(
            items, pad_id=enc.eot_token, eot_id=collate_eot(enc, template), max_length=max_length, mask_prompt=cfg.mask_prompt
        )
        return inputs.to(device), targets.to(device)

    train_rows, val_rows, test_rows = (read_split(splits_dir, s) for s in ("train", "val", "test"))
    train = encode(train_rows)
    val_batches = [to_device(b) for b in batches(encode(val_rows), cfg.batch_size)]
    test_batches = [to_device(b) for b in batches(encode(test_rows), cfg.batch_size)]
    bytes_per_token = token_bytes(enc, model.config.vocab_size).to(device)

    def loss_fn(model: GPT, batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, n = token_loss(model, *batch)
        loss = loss_sum / max(1, n)
        return loss, {"loss": loss.item()}

    def evaluate_fn(model: GPT, max_batches: int | None) -> dict[str, float]:
        return val_metrics(model, val_batches[:max_batches] if max_batches else val_batches, bytes_per_token)

    history = fit(model, cfg, train, to_device, loss_fn, evaluate_fn, seed=seed, tracker=tracker, desc="finetune_instruct",
                  checkpoint_dir=checkpoint_dir, start=base_model_dir, probe=probe)
    model.eval()
    test_loss = val_metrics(model, test_batches, bytes_per_token)["loss"]
    n_gen = len(test_rows) if cfg.max_test_generations is None else min(cfg.max_test_generations, len(test_rows))
    responses = generate_responses(
        model, enc, test_rows[:n_gen], template,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, seed=seed,
    )
    final_bpb = {"final_val_bpb": history.val[-1][1]["bpb"]} if "bpb" in history.val[-1][1] else {}
    metrics = {"first_val_loss": history.val[0][1]["loss"], "final_val_loss": history.val[-1][1]["loss"], **final_bpb, "test_loss": test_loss}
    tracker.log_metrics(metrics, step=history.steps)
    summary = {
        **metrics,
        "examples": {"train": len(train), "val": len(val_rows), "test": len(test_rows)},
        **counts,
        "lora": bool(wrapped),
        "template": template,
        "mask_prompt": cfg.mask_prompt,
        "steps": history.steps,
        "train_time_s": round(history.train_time_s, 3),
        "test_responses": len(responses),
        **(probe.summary() if probe is not None else {}),
    }
    write_outputs(model, model_dir, reports_dir, history, metrics, summary, responses, cfg, wrapped, params, enc, "instruction fine-tuning")
    return summary


def write_outputs(
    model: GPT, model_dir: Path, reports_dir: Path, history, metrics: dict, summary: dict, responses: list[dict],
    cfg: InstructConfig | DpoConfig, wrapped: list[str], params: dict | None, enc, title: str,
) -> None:
    """The model folder (LoRA merged, template recorded) and the reports folder, each atomically."""
    with atomic_dir(model_dir) as model_tmp, atomic_dir(reports_dir) as reports_tmp:
        if wrapped:
            save_and_merge_lora(model, cfg.lora, wrapped, model_tmp)
        extra = {TEMPLATE_KEY: summary["template"], "tokenizer": enc.name}
        save_model(model, model_tmp, params=params, extra=extra)
        enc.save(model_tmp)
        write_curves(reports_tmp, history, title=title)
        write_json(reports_tmp / METRICS, metrics)
        write_json(reports_tmp / SUMMARY, summary)
        with atomic_file(reports_tmp / TEST_RESPONSES, "w") as f:
            for row in responses:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
