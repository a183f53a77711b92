"""Model cards: what a model is, the data it saw, how it was trained and how it scored, in markdown for people.

A model-making stage gathers the card's facts when it writes its model folder (`card_facts`: JSON-able, with no
timings, so the folder stays byte-identical for the same inputs) and writes them rendered as MODEL_CARD.md into
the folder, which the registry's copy and Hugging Face exports carry. The orchestration layer renders the same
facts again with what only the registry knows (`Registry`: version, aliases, wall time, benchmark and judge scores,
the promotion decision) as the version's description in the MLflow UI, each time one of those changes.

    facts = card_facts(Path("models/base"), kind="base", stage="pretrain", started_from="random weights",
                       data={"corpus": Path("data/raw/manifest.json")}, training={"steps": 800, ...})
    write_card(Path("models/base"), facts)        # models/base/MODEL_CARD.md
    render(facts, Registry(name="lmcore-base", version="3", aliases=["champion"], ...))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcore.checkpoint import read_model_config
from lmcore.io import read_json, sha256_file, write_text
from lmcore.paths import CARD, CARD_FACTS, WEIGHTS
from lmcore.tokenizer import has_tokenizer, load_tokenizer

# What each kind of model is, in a line.
KINDS = {
    "base": "a decoder-only language model pretrained on the corpus below (next-token prediction)",
    "classifier": "a text classifier: the base model with a classification head, fine-tuned on labelled text (book ch. 6)",
    "instruct": "an instruction-following model: the base model fine-tuned on instruction/response pairs (book ch. 7)",
    "dpo": "the instruction model aligned to preferred responses by direct preference optimisation",
}
# What an alias of a registered model means (the model's description lists those its name carries).
ALIASES = {
    "champion": "the version that won the eval-gated promotion: it beat the champion before it by more than the "
                "standard error on the family's primary metric, or continued the champion's pretraining and lowered "
                "its held-out bits per byte of the corpus beyond their standard error at no benchmark loss beyond the "
                "standard error (the first champion: the pretrained base a run started from, when it can serve the "
                "family). Serve this one (`models:/<name>` alone means it); scheduled runs "
                "continue it.",
    "challenger": "the newest version scored against the champion that did not beat it (or was not comparable).",
    "sft": "the newest instruction-fine-tuned (supervised) version.",
    "dpo": "the newest version aligned with direct preference optimisation.",
}


def parameters(weights: Path) -> int:
    """Parameters stored in a safetensors file (each tied tensor once), read from its header alone."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def architecture(cfg) -> str:
    """"GPT-2-style decoder: 4 layers, 4 heads, width 128, context 256"."""
    style = {("layernorm", "learned", "gelu"): "GPT-2-style", ("rmsnorm", "rope", "swiglu"): "Llama-style"}.get(
        (cfg.norm, cfg.positions, cfg.mlp), f"{cfg.norm}/{cfg.positions}/{cfg.mlp}")
    kv = f" ({cfg.kv_heads} key-value)" if cfg.kv_heads != cfg.n_head else ""
    return f"{style} decoder: {cfg.n_layer} layers, {cfg.n_head} heads{kv}, width {cfg.n_embd}, context {cfg.context_length}"


def data_facts(manifest: Path) -> dict[str, Any]:
    """A collected folder's manifest.json: its sha256 and each source's name, licence, origin, files and bytes."""
    sources = read_json(manifest)["sources"]
    return {
        "manifest_sha256": sha256_file(manifest),
        "sources": [{"name": s["name"], "license": s.get("license", "unknown"), "origin": s.get("origin"),
                     "source": s.get("source"), "files": len(s.get("files", [])), "bytes": s.get("bytes")} for s in sources],
    }


def card_facts(
    model_dir: Path, *, kind: str, stage: str, started_from: str, data: dict[str, Path],
    training: dict[str, Any], scores: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card of the model folder `model_dir` that stage `stage` wrote.

    kind: base | classifier | instruct | dpo (KINDS). started_from: one line ("random weights", "models/base
    (weights sha256 ...)"). data: {what: manifest.json} of the data it saw. training: key params and results
    (steps, final losses); scores: what the stage itself measured (a classifier's test metrics). No timings:
    the facts are part of the folder and the same inputs make the same folder.
    """
    cfg, _ = read_model_config(model_dir)
    tok = load_tokenizer(model_dir) if has_tokenizer(model_dir) else None
    return {
        "kind": kind,
        "stage": stage,
        "model": {
            "architecture": architecture(cfg),
            "parameters": parameters(model_dir / WEIGHTS),
            "vocab_size": cfg.vocab_size,
            "weights_sha256": sha256_file(model_dir / WEIGHTS),
        },
        "tokenizer": None if tok is None else {"name": tok.name, "kind": tok.kind, "n_vocab": tok.n_vocab, "sha256": tok.sha256},
        "started_from": started_from,
        "data": {what: data_facts(path) for what, path in data.items() if Path(path).is_file()},
        "training": training,
        "scores": scores or {},
        **(extra or {}),
    }


@dataclass
class Registry:
    """What the registry knows of a version: its name, number and aliases, the run that made it, and the scores
    and decisions recorded on it since (its tags).

    benchmark: rows {task, metric, value, stderr} of bench.* tags; evaluation: eval.* tags ({"val_loss": ...});
    judge: {"mean_score", "model"}; promotion: the gate's decision (lmcore.promotion.decide's dict) or None;
    challenged: the latest decision that compared another version with this one as the champion, or None;
    settings: how the benchmark scores were made ({"max_gen_toks": "256 (lm-eval: 1280)", ...});
    decontamination: {"<benchmark>.<source>": benchmark items found in that training source}.
    """

    name: str
    version: str
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None
    wall_time_s: float | None = None
    benchmark: list[dict] = field(default_factory=list)
    benchmark_sample: str | None = None
    evaluation: dict[str, float] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)
    promotion: dict[str, Any] | None = None
    challenged: dict[str, Any] | None = None
    settings: dict[str, str] = field(default_factory=dict)
    decontamination: dict[str, int] = field(default_factory=dict)


def _num(x: Any, fmt: str = ".4f") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:,}" if isinstance(x, int) else format(x, fmt)


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _bytes(n: int | None) -> str:
    """"20.5 kB", "1.1 MB" (decimal units)."""
    if n is None:
        return "–"
    if n < 1000:
        return f"{n} B"
    exp = min(int(math.log10(n) // 3), 3)
    return f"{n / 1000**exp:,.1f} {('kB', 'MB', 'GB')[exp - 1]}"


def _loss(nats: float | None, bpb: float | None) -> str:
    if nats is None:
        return "–"
    return f"{nats:.4f} nats/token" + (f" ({bpb:.4f} bits/byte)" if bpb is not None else "")


def render(facts: dict[str, Any], registry: Registry | None = None) -> str:
    """The card in markdown: `## What it is`, `## Data`, `## Training`, `## Scores`, and for a registered version
    `## Decontamination` (when checked) and `## Promotion` (its own decision, and the latest one that challenged it
    as the champion). Without `registry`: the folder's card (MODEL_CARD.md)."""
    kind, model, tok = facts["kind"], facts["model"], facts.get("tokenizer")
    title = f"{registry.name} v{registry.version}" if registry else f"lmcore {kind} model"
    out = [f"# {title}", ""]
    if registry:
        aliases = " ".join(f"`@{a}`" for a in sorted(registry.aliases)) or "no alias"
        run = f", made by MLflow run `{registry.run_id}` ({facts['stage']})" if registry.run_id else ""
        out += [f"{aliases}{run}.", ""]
    out += [f"{KINDS.get(kind, kind).capitalize()}.", ""]

    out += ["## What it is", ""]
    tokenizer = "none recorded" if tok is None else f"`{tok['name']}` ({tok['kind']}, {tok['n_vocab']:,} tokens, sha256 `{tok['sha256'][:12]}`)"
    out += _table([
        ("architecture", model["architecture"]),
        ("parameters", f"{model['parameters']:,}"),
        ("tokenizer", tokenizer),
        ("started from", facts["started_from"]),
        ("weights sha256", f"`{model['weights_sha256']}`"),
    ]) + [""]

    out += ["## Data", ""]
    if not facts["data"]:
        out += ["No data manifest recorded.", ""]
    for what, data in facts["data"].items():
        out += [f"{what.capitalize()} (manifest sha256 `{data['manifest_sha256'][:12]}`):", "",
                "| source | licence | origin | files | bytes |", "|---|---|---|---:|---:|"]
        out += [f"| {s['name']} | {s['license']} | {s['origin']} | {s['files']} | {_bytes(s['bytes'])} |" for s in data["sources"]]
        out += [""]
    for key in ("tokens", "examples"):
        if facts.get(key):
            out += [f"{key.capitalize()}: " + ", ".join(f"{k} {_num(v)}" for k, v in facts[key].items()) + ".", ""]

    out += ["## Training", ""]
    training = dict(facts["training"])
    rows = []
    for when in ("first", "final"):
        if f"{when}_val_loss" in training:
            rows.append((f"{when} validation loss", _loss(training.pop(f"{when}_val_loss"), training.pop(f"{when}_val_bpb", None))))
    rows = [(k.replace("_", " "), f"`{v[:12]}`" if k.endswith("sha256") and v else _num(v, ".4g")) for k, v in training.items()] + rows
    if registry and registry.wall_time_s is not None:
        rows.append(("wall time", f"{registry.wall_time_s:,.0f} s (the {facts['stage']} run)"))
    out += _table(rows) + [""]

    out += ["## Scores", ""]
    scored = False
    if facts["scores"]:
        out += _table([(k.replace("_", " "), _num(v)) for k, v in facts["scores"].items()]) + [""]
        scored = True
    evaluation = {k: v for k, v in (registry.evaluation if registry else {}).items() if k not in facts["scores"]}
    if evaluation:
        out += ["Evaluation on held-out splits:", ""]
        out += _table([(k.replace("_", " "), _num(v)) for k, v in evaluation.items()]) + [""]
        scored = True
    if registry and registry.benchmark:
        sample = f" (sample sha256 `{registry.benchmark_sample[:12]}`)" if registry.benchmark_sample else ""
        what = ("The test split, the promotion gate's items" if kind == "classifier"
                else "Benchmarks, scored as lm-evaluation-harness scores them")
        out += [f"{what}{sample}:", "",
                "| task | metric | value | ± stderr |", "|---|---|---:|---:|"]
        out += [f"| {r['task']} | {r['metric']} | {_num(r['value'])} | {_num(r.get('stderr'))} |" for r in registry.benchmark]
        out += [""]
        if registry.settings:
            out += ["Settings: " + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(registry.settings.items())) + ".", ""]
        scored = True
    if registry and registry.judge:
        out += [f"LLM-as-judge mean score (0-100): {_num(registry.judge.get('mean_score'), '.1f')}"
                + (f" by `{registry.judge['model']}`" if registry.judge.get("model") else "") + ".", ""]
        scored = True
    if not scored:
        out += ["Not scored yet.", ""]

    if registry and registry.decontamination:
        out += ["## Decontamination", "",
                "Benchmark items whose 13-grams of normalised words (lm-evaluation-harness's method) occur in a training "
                "source of this model:", "", "| benchmark | source | items found |", "|---|---|---:|"]
        out += [f"| {k.partition('.')[0]} | {k.partition('.')[2]} | {n} |" for k, n in sorted(registry.decontamination.items())]
        out += [""]
    if registry:
        out += ["## Promotion", ""] + _promotion(registry.promotion) + [""]
        if registry.challenged and str(registry.challenged.get("version")) != registry.version:
            out += ["### Last challenged", ""] + _promotion(registry.challenged, as_champion=True) + [""]
    return "\n".join(out).rstrip() + "\n"


def _promotion(decision: dict | None, as_champion: bool = False) -> list[str]:
    """The gate's decision as card lines; as_champion: seen from the champion it compared the version with."""
    if not decision:
        return ["Not put through the promotion gate yet."]
    if as_champion:
        kept = decision["alias"] != "champion"
        lines = [f"v{decision['version']} was compared with this version as the champion: this version "
                 + ("kept" if kept else "lost") + f" `@champion` (v{decision['version']} {decision['reason']}).", ""]
    else:
        lines = [f"`@{decision['alias']}`: {decision['reason']}.", ""]
    if decision.get("champion_value") is not None:
        lines += _table([
            ("metric", f"`{decision['metric']}`"),
            (f"challenger (v{decision['version']})", f"{_num(decision['value'])} ± {_num(decision['stderr'])}"),
            (f"champion v{decision['champion_version']}", f"{_num(decision['champion_value'])} ± {_num(decision['champion_stderr'])}"),
            ("difference", f"{decision['difference']:+.4f}"),
            ("paired stderr" if decision.get("paired") else "combined stderr", _num(decision["combined_stderr"])),
            *([("held-out bits per byte of the corpus (before: the champion's)",
                f"{decision['heldout_bpb_before']:.4f} -> {decision['heldout_bpb_after']:.4f} "
                f"({decision['heldout_bpb_change']:+.4f} ± {decision['heldout_bpb_change_stderr']:.4f})")]
              if decision.get("heldout_bpb_change") is not None else []),
        ])
        disagree = decision.get("disagreements")
        if disagree:
            shown = ", ".join(f"{d['task']}/{d['doc_id']} ({'challenger' if d['challenger_correct'] else 'champion'} right)"
                              for d in disagree["first"])
            lines += ["", f"The two disagree on {disagree['n']} of {disagree['items']} items" + (f", e.g. {shown}" if shown else "")
                      + " (the deciding run's comparison/ has them all)."]
    elif decision.get("value") is not None:
        lines += [f"`{decision['metric']}` {_num(decision['value'])} ± {_num(decision['stderr'])}."]
    return lines


def model_description(name: str, holds: list[str], aliases: list[str]) -> str:
    """A registered model's description: what its versions are and what its aliases mean."""
    lines = [f"`{name}` holds versions made by lmcore's pipeline:", "", *(f"- {h}" for h in holds), ""]
    if aliases:
        lines += ["Aliases:", "", *(f"- `@{a}`: {ALIASES.get(a, '')}" for a in aliases), ""]
    lines += ["Each version's description is its model card (also MODEL_CARD.md in the version's files).", ""]
    return "\n".join(lines)


def write_card(model_dir: Path, facts: dict[str, Any]) -> Path:
    """MODEL_CARD.md (the facts rendered) and the facts themselves (card.json) into the model folder, atomically."""
    write_text(Path(model_dir) / CARD, render(facts))
    write_text(Path(model_dir) / CARD_FACTS, json.dumps(facts, indent=2) + "\n")
    return Path(model_dir) / CARD

