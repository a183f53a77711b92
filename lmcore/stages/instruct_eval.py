"""The instruct_eval stage: the instruction models (models/instruct, registered @sft, and models/dpo, @dpo) scored on
what they are for, following instructions: IFEval and GSM8K generated greedily in each model's chat template and
scored as lm-evaluation-harness 0.4.13 scores them (lmcore.harness.generative), on a fixed seeded sample. Their
`Scores` go through the promotion gate of tracking.instruct_model in order, SFT first: `champion` moves only past
the combined standard error on `instruct_eval.primary_metric` (IFEval prompt-level loose accuracy by default). When
the run started from a pretrained chat model, that model is the family's first champion (tasks.gate).

    lmcore run instruct_eval
    lmcore run instruct_eval --set instruct_eval.limit=100 --set instruct_eval.tasks=[ifeval]

Outputs: data/instruct_eval (the benchmark files, mirror first), reports/instruct_eval/<model>/ (results.json,
samples/<task>.jsonl: prompt, response, per-instruction strict and loose verdicts or the extracted answers against
the gold one), metrics.json (a DVC metric), decontamination.json (a DVC metric: the sampled items found in the
corpus, SFT or DPO data or the base's card) and table.md. Each model's scores are looked up in the evaluation cache
(lmcore.harness.cache) first: a model scored before on the same items, prompts and settings costs no forward pass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypedDict

from lmcore.checkpoint import load_model, read_model_config
from lmcore.data.collect import collect, mirror_from_env
from lmcore.harness.cache import EvalCache, cache_root, cached
from lmcore.harness.generative import (
    RESULTS,
    SAMPLES_DIR,
    SCORER_VERSION,
    TASKS,
    generative_items,
    resolve_chat,
    run_generative,
    sample_sha256,
    task_version,
)
from lmcore.io import read_json, sha256_file, write_json, write_text
from lmcore.paths import GENERATIVE_DATA, WEIGHTS, model_path, reports_path
from lmcore.stages import Artifact, Counts, ItemTable, Scores, StageContext, StageResult, VersionTags, _decontam
from lmcore.tokenizer import load_tokenizer
from lmcore.training import resolve_device

METRICS = "metrics.json"
TABLE = "table.md"
ITEMS_TABLES = "tables/instruct_eval"  # /<model>/<task>.json: one row per item
LABELS = {"instruct": "sft", "dpo": "dpo"}  # model folder -> its alias in the family
SEEN = {"instruct": ("corpus", "sft", "base_card"), "dpo": ("corpus", "sft", "dpo", "base_card")}  # what each saw


def evaluate(ctx: StageContext, model_dir: Path, out_dir: Path, model_ref: str, *, progress: bool = True) -> dict:
    """The generative tasks of `instruct_eval` on one model folder into `out_dir` (results.json, samples/), from
    the evaluation cache when these weights were scored on these items, prompts and settings before."""
    cfg = ctx.params.instruct_eval
    data_dir, enc = ctx.outputs[GENERATIVE_DATA], load_tokenizer(model_dir)
    chat = resolve_chat(enc, cfg.chat_template)
    items = [it for t in cfg.tasks for it in generative_items(t, data_dir, limit=cfg.limit, sample_seed=cfg.sample_seed)]
    context_length = read_model_config(model_dir)[0].context_length
    fields = {
        "weights_sha256": sha256_file(Path(model_dir) / WEIGHTS),
        "task": ",".join(cfg.tasks),
        "task_version": ",".join(f"{t}:{task_version(t)}" for t in cfg.tasks),
        "sample_sha256": sample_sha256(items),
        "prompt_template": f"chat:{hashlib.sha256(enc.chat_template.encode()).hexdigest()}" if chat else "plain",
        "generation": {"max_gen_toks": cfg.max_gen_toks, "greedy": True, "fewshot_as_multiturn": True,
                       "context_length": context_length},
        "scorer_version": SCORER_VERSION,
    }

    def compute(out: Path) -> None:
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)
        model = load_model(model_dir, device=resolve_device(cfg.device))
        run_generative(model, enc, data_dir, out, tasks=cfg.tasks, limit=cfg.limit, sample_seed=cfg.sample_seed,
                       max_gen_toks=cfg.max_gen_toks, batch_size=cfg.batch_size, chat_template=cfg.chat_template,
                       model_ref=model_ref, progress=progress)

    cached(EvalCache(cache_root(ctx.root)), fields, compute, Path(out_dir))
    return read_json(Path(out_dir) / RESULTS)


def scores_of(results: dict, metric: str) -> dict[str, float]:
    """The scores a version carries: each task's metrics and their standard errors (an instruction-level
    accuracy has none: lm-eval reports N/A)."""
    return {f"{t}.{k}": float(v) for t, s in results["tasks"].items() for m in TASKS[t].metrics
            for k, v in ((m, s[m]), (f"{m}_stderr", s.get(f"{m}_stderr"))) if v is not None}


def settings_of(results: dict) -> dict[str, str]:
    """How the scores were made where it matters for reading them: the prompt form, and a max_gen_toks below
    lm-eval's (answers cut there are scored as they stand)."""
    config = results["config"]
    out = {"prompt": "the model's chat template (lm-eval's --apply_chat_template, few-shot as turns)"
           if config["template_mode"] == "chat" else "plain text (no chat template)"}
    for t, s in results["tasks"].items():
        if s["max_gen_toks"] < s["lm_eval_max_gen_toks"]:
            cut = s.get("finish", {}).get("length")
            out[f"{t}.max_gen_toks"] = (f"{s['max_gen_toks']} (lm-eval's: {s['lm_eval_max_gen_toks']}"
                                        + (f"; {cut} of {s['n']} answers reached it)" if cut is not None else ")"))
    return out


def _scores(results: dict, cfg, weights: Path, out_dir: Path, label: str, clean: dict[str, float], artifact: str | None) -> Scores:
    return Scores(weights, {**scores_of(results, cfg.primary_metric), **clean}, cfg.primary_metric, results["sample_sha256"],
                  results_dir=out_dir, results_artifact=artifact, label=label, settings=settings_of(results))


def rescore(ctx: StageContext, model_dir: Path, out_dir: Path, model_ref: str) -> Scores:
    """Another model folder (the champion, downloaded; the pretrained base) scored on the very items `run` scores."""
    cfg = ctx.params.instruct_eval
    results = evaluate(ctx, model_dir, out_dir, model_ref, progress=False)
    return _scores(results, cfg, Path(model_dir) / WEIGHTS, Path(out_dir), "champion", {}, None)


def _table(rows: dict[str, dict]) -> str:
    lines = ["| model | task | metric | value | ± stderr | n |", "|---|---|---|---:|---:|---:|"]
    for label, results in rows.items():
        for t, s in results["tasks"].items():
            for m in TASKS[t].metrics:
                se = s.get(f"{m}_stderr")
                lines.append(f"| {label} | {t} | {m} | {s[m]:.4f} | {'' if se is None else f'{se:.4f}'} | {s['n']} |")
    return "\n".join(lines) + "\n"


class Score(TypedDict):
    value: float | None
    stderr: float | None


class Summary(TypedDict):
    """By label (sft, dpo): each scored model's primary score, items and speed."""

    primary_metric: str
    scores: dict[str, Score]
    n_items: dict[str, int]
    items_per_s: dict[str, float]
    sample_sha256: str
    decontamination: dict[str, Counts] | None


def run(ctx: StageContext) -> StageResult:
    cfg, data_dir, out = ctx.params.instruct_eval, ctx.outputs[GENERATIVE_DATA], ctx.outputs[reports_path("instruct_eval")]
    collect(ctx.collect_config(cfg.sources), data_dir, mirror=mirror_from_env(), base_dir=ctx.root)
    out.mkdir(parents=True, exist_ok=True)
    report = None
    if cfg.decontaminate:
        items = {t: [(f"{t}/{it.doc_id}", it.doc.get("prompt") or it.doc["question"])
                     for it in generative_items(t, data_dir, limit=cfg.limit, sample_seed=cfg.sample_seed)]
                 for t in cfg.tasks}
        report = _decontam.check(ctx, items, ("corpus", "sft", "dpo", "base_card"), out)
    results, scores, item_tables = {}, [], []
    for name in cfg.models:
        label, model_dir = LABELS[name], ctx.inputs[model_path(name)]
        res = results[label] = evaluate(ctx, model_dir, out / name, f"models/{name}")
        metrics = {t: list(TASKS[t].metrics) for t in res["tasks"]}
        clean = _decontam.clean_scores(out / name / SAMPLES_DIR, report, metrics, sources=SEEN[name]) if report else {}
        scores.append(_scores(res, cfg, model_dir / WEIGHTS, out / name, label, clean, f"reports/{name}"))
        for t in res["tasks"]:
            path = out / name / SAMPLES_DIR / f"{t}.jsonl"
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            item_tables.append(ItemTable(f"{ITEMS_TABLES}/{label}/{t}.json", [_review_row(r) for r in rows]))
    write_json(out / METRICS, {label: {**scores_of(r, cfg.primary_metric), "n_items": r["n_items"]} for label, r in results.items()})
    write_text(out / TABLE, _table(results))
    decontam = _decontam.summary(report) if report else None
    primary = {label: (s.values.get(cfg.primary_metric), s.values.get(f"{cfg.primary_metric}_stderr")) for label, s in
               zip(results, scores)}
    tags = _decontam.version_tags(report) if report else {}
    return StageResult(
        summary={
            "primary_metric": cfg.primary_metric,
            "scores": {label: {"value": v, "stderr": se} for label, (v, se) in primary.items()},
            "n_items": {label: r["n_items"] for label, r in results.items()},
            "items_per_s": {label: r["items_per_s"] for label, r in results.items()},
            "sample_sha256": next(iter(results.values()))["sample_sha256"],
            "decontamination": decontam,
        },
        artifacts=[
            Artifact(data_dir / "manifest.json", "data"),
            *(Artifact(out / f, "reports") for f in (METRICS, TABLE) + ((_decontam.REPORT,) if report else ())),
            *(Artifact(out / name, f"reports/{name}") for name in cfg.models),
        ],
        scored=[VersionTags("instruct_model", ctx.inputs[model_path(name)] / WEIGHTS, tags) for name in cfg.models] if tags else [],
        scores=scores,
        item_tables=item_tables + ([ItemTable(_decontam.TABLE, _decontam.table_rows(report, ctx.root))] if report else []),
        log=", ".join(f"{label} {cfg.primary_metric} {v:.4f} ± {se or 0:.4f}" for label, (v, se) in primary.items() if v is not None)
            + f" on {next(iter(results.values()))['n_items']} items",
    )


def _review_row(record: dict) -> dict:
    """A per-item record as a row people filter and sort in the MLflow UI: the prompt, the response, and per
    instruction its strict and loose verdicts (IFEval), or the extracted answers against the gold one (GSM8K)."""
    keep = ("task", "doc_id", "correct", "prompt", "response", "truncated", "finish")
    row = {k: record.get(k) for k in keep}
    if record["task"] == "ifeval":
        row.update({k: record.get(k) for k in ("instruction_id_list", "prompt_level_strict_acc", "prompt_level_loose_acc",
                                                "inst_level_strict_acc", "inst_level_loose_acc")})
    else:
        row.update({k: record.get(k) for k in ("gold", "strict_answer", "flexible_answer", "exact_match_strict_match",
                                               "exact_match_flexible_extract")})
    return row
