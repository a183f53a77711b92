"""The whole params file: every section (Params), and reading it with dotted overrides and did-you-mean errors."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from lmcore.config.base import ParamsError, Section
from lmcore.config.data import CollectConfig, PreprocessConfig, TokenizeConfig, TrainTokenizerConfig
from lmcore.config.evaluation import BenchmarkConfig, EvaluateConfig, InstructEvalConfig, JudgeConfig
from lmcore.config.model import BaseModelConfig
from lmcore.config.operations import TrackingConfig
from lmcore.config.training import ClassifierConfig, DpoConfig, InstructConfig, PretrainConfig
from lmcore.errors import one_line
from lmcore.harness.benchmarks import check_tasks


# The sections with the in-training benchmark probe (eval_benchmarks_every, eval_benchmarks, eval_benchmarks_limit).
PROBE_SECTIONS = ("pretrain", "finetune_instruct", "dpo")


class Params(Section):
    seed: int = 1337
    collect: CollectConfig
    preprocess: PreprocessConfig = PreprocessConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    train_tokenizer: TrainTokenizerConfig = TrainTokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    finetune_classifier: ClassifierConfig = ClassifierConfig()
    finetune_instruct: InstructConfig = InstructConfig()
    dpo: DpoConfig = DpoConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    instruct_eval: InstructEvalConfig = InstructEvalConfig()
    judge: JudgeConfig = JudgeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _trained_vocab_fits(self) -> Params:
        vocab = self.train_tokenizer.vocab_size
        if self.tokenize.tokenizer == "trained" and self.base_model.source == "scratch" and self.pretrain.model.vocab_size < vocab:
            raise ValueError(
                f"pretrain.model.vocab_size {self.pretrain.model.vocab_size} is smaller than train_tokenizer.vocab_size "
                f"{vocab}, the tokenizer tokenize.tokenizer 'trained' uses; make them equal"
            )
        return self

    @model_validator(mode="after")
    def _probe_sources(self) -> Params:
        for name in PROBE_SECTIONS:
            section = getattr(self, name)
            if section.eval_benchmarks_every is not None:
                try:
                    check_tasks(section.eval_benchmarks, 0, {s.name for s in self.benchmark.sources})
                except ValueError as err:
                    raise ValueError(f"{name}.eval_benchmarks: {err} (in benchmark.sources)") from None
        if self.train_tokenizer.eval_benchmarks:
            try:
                check_tasks(self.train_tokenizer.eval_benchmarks, 0, {s.name for s in self.benchmark.sources})
            except ValueError as err:
                raise ValueError(f"train_tokenizer.eval_benchmarks: {err} (in benchmark.sources)") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the resolved params (canonical JSON); the same params give the same hash."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a section accepts, for did-you-mean hints."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        sub = getattr(ann, "__args__", None)
        cands = [ann] + list(sub or [])
        nxt = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        model = nxt
    return list(model.model_fields)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            known = _known_keys(Params, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown key '{key}'" + (f" (did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?)" if hint else "")
        elif e["type"] == "missing":
            msg = f"missing key '{key}'"
        else:
            got = e.get("input")
            msg = f"key '{key}': {e['msg']} (got {got!r})" if not isinstance(got, dict) else f"key '{key}': {e['msg']}"
        lines.append(msg)
    return one_line(f"{origin}: " + "; ".join(lines))  # one line, every bad key named


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ParamsError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`pretrain.lr=3e-4` -> ("pretrain.lr", 0.0003). Values are YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    # YAML 1.1 reads "3e-4" as a string; pydantic's lax mode turns it into the float a user meant.
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def params_from_dict(data: dict, origin: str = "params", overrides: list[str] | None = None) -> Params:
    data = json.loads(json.dumps(data))  # deep copy; also rejects non-JSON-able YAML tags
    for ov in overrides or []:
        key, value = parse_override(ov)
        _set_dotted(data, key, value)
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, origin)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read and validate a params file; `overrides` are dotted `key=value` strings applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {one_line(err)}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return params_from_dict(data, origin=str(path), overrides=overrides)
