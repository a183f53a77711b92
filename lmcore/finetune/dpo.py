"""Direct Preference Optimization (Rafailov et al. 2023; book ch. 7 bonus) of the instruction model.

    stats = prepare_instructions(params.dpo, raw_dir, splits_dir, seed=params.seed, fields=PREFERENCE_FIELDS)
    summary = train_dpo(params.dpo, Path("models/instruct"), splits_dir, Path("models/dpo"), Path("reports/dpo"),
                        seed=params.seed, enc=enc)

For a prompt x with a preferred response y_w and a rejected one y_l, the policy pi starts as a copy of
the instruction model and the reference pi_ref is a frozen copy of it. With
    r(y) = beta * (log pi(y | x) - log pi_ref(y | x))      (the implicit reward; sums over response tokens)
the loss is  -log sigmoid(r(y_w) - r(y_l)).  Logged per step: loss, chosen_reward = mean r(y_w),
rejected_reward = mean r(y_l), reward_margin = their difference, reward_accuracy = share with r(y_w) > r(y_l).

Both responses are encoded in the instruction model's template (its config.json's; "chat": its tokenizer's own
chat template, each response ending with the template's end of turn), and only their tokens count.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from lmcore.checkpoint import load_model
from lmcore.config import DpoConfig
from lmcore.finetune.common import add_lora, check_length, log_trainable, read_split, setup
from lmcore.finetune.data import IGNORE_INDEX, collate_eot, collate_instruct, encode_instruction
from lmcore.finetune.instruct import check_chat_template, generate_responses, template_of, write_outputs
from lmcore.finetune.trainer import batches, fit
from lmcore.harness.benchmarks import Item
from lmcore.harness.probe import section_probe
from lmcore.model import GPT
from lmcore.tracking import NullTracker, Tracker

PREFERENCE_FIELDS = ("instruction", "chosen", "rejected")


def sequence_logprobs(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the unmasked (response) targets of each row: (B,)."""
    logits, _ = model(inputs)  # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    mask = targets != IGNORE_INDEX  # (B, T)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)  # (B,)


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss over a batch of (B,) sequence log-probs, and the reward metrics."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (B,)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    metrics = {
        "loss": loss.item(),
        "chosen_reward": chosen_rewards.mean().item(),
        "rejected_reward": rejected_rewards.mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
    }
    return loss, metrics


def train_dpo(
    cfg: DpoConfig,
    instruct_model_dir: Path,
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
    """Preference-tune the instruction model with DPO against a frozen copy of itself.

    Args:
        cfg: the dpo params (beta, optimisation, LoRA, test generation).
        instruct_model_dir: the instruction model (policy start and reference); its template is reused.
        enc: its tokenizer (the one it carries); saved with the preference-tuned model.
        splits_dir: prepare_instructions(..., fields=PREFERENCE_FIELDS) output.
        model_dir: replaced by the preference-tuned model.
        reports_dir: replaced by curves (loss, rewards, margin), metrics.json, summary.json, test_responses.jsonl.
        checkpoint_dir: training checkpoints every cfg.checkpoint_interval steps, resumed with cfg.resume; None: none.
        bench_items: with cfg.eval_benchmarks_every, the benchmark probe's sample (as finetune_instruct's).

    Returns: the summary: first/final val loss and reward margin, reward accuracy, trainable parameters.
    """
    device = setup(cfg, seed)
    template = template_of(instruct_model_dir)
    check_chat_template(enc, template, str(instruct_model_dir))
    policy = load_model(instruct_model_dir, device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    max_length = check_length(cfg.max_length, policy, "dpo")
    wrapped = add_lora(policy, cfg.lora) if cfg.lora.enabled else []
    if not wrapped:
        policy.requires_grad_(True)
    counts = log_trainable(policy, tracker)
    probe = section_probe(cfg, bench_items, enc, policy.config.context_length, key="dpo")

    def encode(rows: list[dict]) -> list[tuple[tuple[list[int], int], tuple[list[int], int]]]:
        return [
            (encode_instruction(r, enc, template, response=r["chosen"]), encode_instruction(r, enc, template, response=r["rejected"]))
            for r in rows
        ]

    def collate(items: list) -> tuple[torch.Tensor, ...]:
        def one(side: int) -> tuple[torch.Tensor, torch.Tensor]:
            inputs, targets = collate_instruct(
                [item[side] for item in items], pad_id=enc.eot_token, eot_id=collate_eot(enc, template), max_length=max_length,
                mask_prompt=True,
            )
            return inputs.to(device), targets.to(device)

        return (*one(0), *one(1))

    # The reference is frozen: its log-probabilities of a validation batch are the same at every evaluation, so
    # they are computed once (the final evaluation over the whole split then costs the policy's forwards alone).
    val_reference: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reference_logprobs(batch, val_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if val_index in val_reference:
            return val_reference[val_index]
        chosen_in, chosen_tg, rejected_in, rejected_tg = batch
        with torch.no_grad():
            out = sequence_logprobs(reference, chosen_in, chosen_tg), sequence_logprobs(reference, rejected_in, rejected_tg)
        if val_index is not None:
            val_reference[val_index] = out
        return out

    def loss_fn(model: GPT, batch, val_index: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        chosen_in, chosen_tg, rejected_in, rejected_tg = batch
        ref_c, ref_r = reference_logprobs(batch, val_index)
        pol_c, pol_r = sequence_logprobs(model, chosen_in, chosen_tg), sequence_logprobs(model, rejected_in, rejected_tg)
        return dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta)

    train_rows, val_rows, test_rows = (read_split(splits_dir, s) for s in ("train", "val", "test"))
    val_batches = [collate(b) for b in batches(encode(val_rows), cfg.batch_size)]

    def evaluate_fn(model: GPT, max_batches: int | None) -> dict[str, float]:
        chosen = val_batches[:max_batches] if max_batches else val_batches
        rows = [(loss_fn(model, b, val_index=i)[1], b[0].size(0)) for i, b in enumerate(chosen)]
        n = sum(size for _, size in rows)
        return {k: sum(m[k] * size for m, size in rows) / n for k in rows[0][0]}

    history = fit(policy, cfg, encode(train_rows), collate, loss_fn, evaluate_fn, seed=seed, tracker=tracker, desc="dpo",
                  checkpoint_dir=checkpoint_dir, start=instruct_model_dir, probe=probe)
    policy.eval()
    n_gen = len(test_rows) if cfg.max_test_generations is None else min(cfg.max_test_generations, len(test_rows))
    responses = generate_responses(
        policy, enc, test_rows[:n_gen], template,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, seed=seed,
    )
    first, final = history.val[0][1], history.val[-1][1]
    metrics = {
        "first_val_loss": first["loss"],
        "final_val_loss": final["loss"],
        "first_val_reward_margin": first["reward_margin"],
        "final_val_reward_margin": final["reward_margin"],
        "final_val_reward_accuracy": final["reward_accuracy"],
    }
    tracker.log_metrics(metrics, step=history.steps)
    summary = {
        **metrics,
        "beta": cfg.beta,
        "examples": {"train": len(train_rows), "val": len(val_rows), "test": len(test_rows)},
        **counts,
        "lora": bool(wrapped),
        "template": template,
        "steps": history.steps,
        "train_time_s": round(history.train_time_s, 3),
        "test_responses": len(responses),
        **(probe.summary() if probe is not None else {}),
    }
    write_outputs(policy, model_dir, reports_dir, history, metrics, summary, responses, cfg, wrapped, params, enc, "DPO")
    return summary
