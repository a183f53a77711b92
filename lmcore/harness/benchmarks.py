"""Benchmark tasks built the way lm-evaluation-harness (0.4.x) builds them: documents, prompts, choices, gold.

    items = task_items("arc_easy", data_dir)                       # every test question, as lm-eval prompts it
    items = task_items("mmlu_anatomy", data_dir, num_fewshot=5)    # 5-shot from the dev split (first five)
    leaves = expand(["mmlu", "hellaswag"])                          # the 57 mmlu_<subject> tasks, then hellaswag

`data_dir` is a collected benchmark folder (`lmcore.data.collect`): its manifest.json maps each source name
(hellaswag, arc-easy, arc-challenge, truthfulqa-mc, mmlu) to a file.

Prompt formats, target delimiters and gold indices follow lm-eval's task configs (`lm_eval/tasks/<task>/*.yaml`):

| task | split | context | choices (each scored after " ") | metrics |
|---|---|---|---|---|
| hellaswag | validation | `activity_label: ctx`, cleaned by lm-eval's `preprocess` | the four endings, cleaned | acc, acc_norm |
| arc_easy, arc_challenge | test | `Question: {question}\nAnswer:` | the answer texts | acc, acc_norm |
| truthfulqa_mc1 / _mc2 | validation | lm-eval's six-QA primer, `\n\nQ: {question}\nA:` | mc1 / mc2 targets | acc (mc2: true mass) |
| mmlu_<subject> | test | `The following are multiple choice questions (with answers) about {subject}.\n\n`, k dev examples `{q} {letter}\n\n`, then `{q}` with `q = {question.strip()}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:` | A, B, C, D | acc |

Where our data differs from the Hugging Face datasets lm-eval reads (docs/evaluation.md has the details):
HellaSwag comes as `activity_label: ctx` lines with ctx_a and ctx_b already joined and ctx_b not capitalised (lm-eval
capitalises it) and WikiHow markers already stripped; MMLU is read from the release CSVs, TruthfulQA from
mc_task.json (the file the HF dataset is built from), ARC from the AI2 JSONL.

This module does not import lmcore.config, so lmcore.config can validate task names with it.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import functools
import gzip
import io
import json
import random
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lmcore.errors import InputError, MissingInputError, one_line
from lmcore.io import jsonl_objects
from lmcore.paths import MANIFEST


class BenchmarkDataError(InputError):
    """Benchmark data that cannot be read; the message names the file and the line or record."""


@dataclass(frozen=True)
class Item:
    """One multiple-choice question, ready to score: log P(target_delimiter + choice | context) for each choice."""

    task: str  # the leaf task: hellaswag, arc_easy, mmlu_anatomy, truthfulqa_mc2, ...
    doc_id: int  # the document's index in the task's evaluation split (file order)
    context: str
    choices: tuple[str, ...]
    gold: int  # the correct choice's index (truthfulqa_mc2: the first true answer; `labels` has all)
    labels: tuple[int, ...] | None = None  # truthfulqa_mc2: 1 for each true answer, 0 for each false one
    target_delimiter: str = " "

    @property
    def continuations(self) -> list[str]:
        return [self.target_delimiter + c for c in self.choices]


# MMLU subject -> category, as lm-eval groups them (lm_eval/tasks/mmlu/_generate_configs.py).
MMLU_SUBJECTS = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")
MMLU_LETTERS = ("A", "B", "C", "D")

# lm-eval's truthfulqa_mc1/mc2 doc_to_text: six QA pairs, then the question.
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


@dataclass(frozen=True)
class TaskSpec:
    """A leaf task: which source it reads, how a file becomes documents, how a document becomes an Item."""

    name: str
    source: str  # a source name in the benchmark folder's manifest
    metrics: tuple[str, ...]
    read: Callable[[Path], list[dict]]  # file -> documents of the evaluation split
    fewshot: bool = False  # num_fewshot > 0 is supported (MMLU: its dev split, first k, as lm-eval)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Readers: file -> documents. Each error names the file and the line or record.


def _open_text(path: Path) -> str:
    if not path.is_file():
        raise MissingInputError(f"{path}: benchmark file not found (collect the benchmark sources again)")
    raw = path.read_bytes()
    try:
        if raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
        elif raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, ValueError) as err:  # a cut or corrupt bzip2/gzip stream
        raise BenchmarkDataError(f"{path}: cannot decompress: {one_line(err)}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise BenchmarkDataError(f"{path}: invalid UTF-8 at byte offset {err.start} (line {line})") from None


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, WikiHow `[title]` to '. ', drop bracketed markers, squeeze '  '."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[dict]:
    """Six lines per item: `activity_label: ctx`, the gold index (0-3), four endings."""
    lines = _open_text(path).split("\n")  # not splitlines(): the text holds other line separators
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise BenchmarkDataError(f"{path}: empty file")
    if len(lines) % 6:
        raise BenchmarkDataError(f"{path}: {len(lines)} lines is not a multiple of 6 (six lines per item)")
    docs = []
    for start in range(0, len(lines), 6):
        ctx, label, *endings = lines[start : start + 6]
        if label not in ("0", "1", "2", "3"):
            raise BenchmarkDataError(f"{path}:{start + 2}: gold label {label!r} is not 0-3")
        docs.append({"query": hellaswag_preprocess(ctx), "choices": [hellaswag_preprocess(e) for e in endings], "gold": int(label)})
    return docs


def read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    text = _open_text(path)
    if not text.strip():
        raise BenchmarkDataError(f"{path}: empty file")
    return jsonl_objects(text, path, BenchmarkDataError)


def read_arc(path: Path) -> list[dict]:
    """AI2 ARC JSONL: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}; labels A-E or 1-5."""
    docs = []
    for lineno, record in read_jsonl(path):
        try:
            question = record["question"]
            texts = [c["text"] for c in question["choices"]]
            labels = [c["label"] for c in question["choices"]]
            gold = labels.index(record["answerKey"])
            docs.append({"id": record.get("id"), "question": question["stem"], "choices": texts, "gold": gold})
        except (KeyError, TypeError) as err:
            raise BenchmarkDataError(f"{path}:{lineno}: not an ARC record (missing {err})") from None
        except ValueError:
            raise BenchmarkDataError(
                f"{path}:{lineno}: answerKey {record.get('answerKey')!r} is not one of the labels {labels}"
            ) from None
    return docs


def read_truthfulqa(path: Path) -> list[dict]:
    """mc_task.json: [{"question", "mc1_targets": {answer: 0|1}, "mc2_targets": {answer: 0|1}}], answers in file order."""
    try:
        records = json.loads(_open_text(path))
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{path}: malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    if not isinstance(records, list) or not records:
        raise BenchmarkDataError(f"{path}: expected a non-empty JSON array of questions")
    docs = []
    for i, record in enumerate(records):
        try:
            mc1, mc2 = record["mc1_targets"], record["mc2_targets"]
            doc = {
                "question": record["question"],
                "mc1_choices": list(mc1), "mc1_labels": [int(v) for v in mc1.values()],
                "mc2_choices": list(mc2), "mc2_labels": [int(v) for v in mc2.values()],
            }
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise BenchmarkDataError(f"{path}: record {i}: not a TruthfulQA MC record ({err!r})") from None
        if doc["mc1_labels"][:1] != [1] or sum(doc["mc1_labels"]) != 1:
            raise BenchmarkDataError(f"{path}: record {i}: mc1_targets must list the one true answer first")
        if 1 not in doc["mc2_labels"]:
            raise BenchmarkDataError(f"{path}: record {i}: mc2_targets has no true answer")
        docs.append(doc)
    return docs


@functools.lru_cache(maxsize=2)
def _mmlu_archive(path: str, size: int, mtime: float) -> dict[tuple[str, str], list[dict]]:
    """Every CSV of an MMLU archive (the release's data.tar, or a .tar.gz of it): (split, subject) -> documents."""
    out: dict[tuple[str, str], list[dict]] = {}
    pattern = re.compile(r"(?:^|/)data/(dev|val|test)/([a-z_]+)_(dev|val|test)\.csv$")
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as err:
        raise BenchmarkDataError(f"{path}: not a tar archive of the MMLU CSVs ({one_line(err)})") from None
    with archive:
        try:
            for member in archive:
                match = pattern.search(member.name)
                if not member.isfile() or not match or match.group(1) != match.group(3):
                    continue
                where = f"{path}:{member.name}"
                data = archive.extractfile(member).read()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    line = data.count(b"\n", 0, err.start) + 1
                    raise BenchmarkDataError(f"{where}: invalid UTF-8 at byte offset {err.start} (line {line})") from None
                docs = []
                try:
                    for row_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
                        if len(row) != 6 or row[5] not in MMLU_LETTERS:
                            raise BenchmarkDataError(f"{where}: row {row_no}: expected question,A,B,C,D,answer(A-D); got {len(row)} fields")
                        docs.append({"question": row[0], "choices": row[1:5], "gold": MMLU_LETTERS.index(row[5])})
                except csv.Error as err:
                    raise BenchmarkDataError(f"{where}: malformed CSV: {one_line(err)}") from None
                out[(match.group(1), match.group(2))] = docs
        except (tarfile.TarError, OSError, EOFError) as err:  # a cut or corrupt archive
            raise BenchmarkDataError(f"{path}: cannot read the archive: {one_line(err)}") from None
    if not out:
        raise BenchmarkDataError(f"{path}: no data/<split>/<subject>_<split>.csv members: not an MMLU archive")
    return out


def mmlu_docs(path: Path, subject: str, split: str) -> list[dict]:
    if not path.is_file():
        raise MissingInputError(f"{path}: benchmark file not found (collect the benchmark sources again)")
    stat = path.stat()
    docs = _mmlu_archive(str(path), stat.st_size, stat.st_mtime).get((split, subject))
    if not docs:
        raise BenchmarkDataError(f"{path}: no data/{split}/{subject}_{split}.csv in the archive")
    return docs


# ---------------------------------------------------------------------------------------------------------------
# Prompts: document -> Item, exactly as lm-eval's task configs render them.


def mmlu_question(doc: dict) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _mmlu_items(spec: TaskSpec, path: Path, num_fewshot: int) -> list[Item]:
    subject = spec.extra["subject"]
    # lm-eval's fewshot_context: description, then each example as `q + " " + answer + "\n\n"`, then the question.
    prompt = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    if num_fewshot:
        dev = mmlu_docs(path, subject, "dev")
        if num_fewshot > len(dev):
            raise BenchmarkDataError(f"{path}: {spec.name}: num_fewshot {num_fewshot} exceeds the {len(dev)} dev examples")
        prompt += "".join(f"{mmlu_question(d)} {MMLU_LETTERS[d['gold']]}\n\n" for d in dev[:num_fewshot])
    docs = mmlu_docs(path, subject, "test")
    return [Item(spec.name, i, prompt + mmlu_question(d), MMLU_LETTERS, d["gold"]) for i, d in enumerate(docs)]


def _items(spec: TaskSpec, path: Path, num_fewshot: int) -> list[Item]:
    if spec.name.startswith("mmlu_"):
        return _mmlu_items(spec, path, num_fewshot)
    docs = spec.read(path)
    if spec.name == "hellaswag":
        return [Item(spec.name, i, d["query"], tuple(d["choices"]), d["gold"]) for i, d in enumerate(docs)]
    if spec.name.startswith("arc_"):
        return [Item(spec.name, i, f"Question: {d['question']}\nAnswer:", tuple(d["choices"]), d["gold"]) for i, d in enumerate(docs)]
    mc = spec.extra["mc"]  # truthfulqa_mc1 / mc2
    return [
        Item(
            spec.name, i, f"{TRUTHFULQA_PRIMER}\n\nQ: {d['question']}\nA:", tuple(d[f"{mc}_choices"]),
            d[f"{mc}_labels"].index(1), labels=tuple(d[f"{mc}_labels"]) if mc == "mc2" else None,
        )
        for i, d in enumerate(docs)
    ]


# ---------------------------------------------------------------------------------------------------------------
# The registry.

ACC, ACC_NORM = "acc", "acc_norm"
SPECS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("hellaswag", "hellaswag", (ACC, ACC_NORM), read_hellaswag),
    "arc_easy": TaskSpec("arc_easy", "arc-easy", (ACC, ACC_NORM), read_arc),
    "arc_challenge": TaskSpec("arc_challenge", "arc-challenge", (ACC, ACC_NORM), read_arc),
    "truthfulqa_mc1": TaskSpec("truthfulqa_mc1", "truthfulqa-mc", (ACC,), read_truthfulqa, extra={"mc": "mc1"}),
    "truthfulqa_mc2": TaskSpec("truthfulqa_mc2", "truthfulqa-mc", (ACC,), read_truthfulqa, extra={"mc": "mc2"}),
    **{
        f"mmlu_{s}": TaskSpec(f"mmlu_{s}", "mmlu", (ACC,), read=None, fewshot=True, extra={"subject": s})
        for s in MMLU_SUBJECTS
    },
}
# Groups: a size-weighted mean of their leaves' acc (lm-eval's aggregate_metric_list, weight_by_size: true).
GROUPS: dict[str, tuple[str, ...]] = {
    "mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS),
    **{f"mmlu_{c}": tuple(f"mmlu_{s}" for s, cat in MMLU_SUBJECTS.items() if cat == c) for c in MMLU_CATEGORIES},
}


def expand(tasks: Iterable[str]) -> list[str]:
    """Task and group names -> leaf task names, in order, each once. Raises ValueError for an unknown name."""
    leaves: list[str] = []
    for name in tasks:
        if name in GROUPS:
            new = GROUPS[name]
        elif name in SPECS:
            new = (name,)
        else:
            known = sorted(SPECS) + sorted(GROUPS)
            hint = difflib.get_close_matches(name, known, n=1)
            raise ValueError(f"unknown benchmark task {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        leaves += [t for t in new if t not in leaves]
    return leaves


def groups_of(leaves: Iterable[str]) -> dict[str, list[str]]:
    """The groups worth reporting for these leaves: mmlu and its categories, when any subject is in."""
    leaves = set(leaves)
    return {g: [t for t in members if t in leaves] for g, members in GROUPS.items() if leaves & set(members)}


def headline_metric(task: str) -> str:
    """The metric a task is usually quoted by: acc_norm where there is one (hellaswag, arc), else acc."""
    metric = ACC_NORM if task in SPECS and ACC_NORM in SPECS[task].metrics else ACC
    return f"{task}.{metric}"


def check_tasks(tasks: Iterable[str], num_fewshot: int, sources: set[str]) -> set[str]:
    """Validate a task list against the configured sources; returns the metric names it produces ("task.metric").

    Raises ValueError naming the unknown task, the missing source or an unsupported num_fewshot.
    """
    leaves = expand(tasks)
    missing = sorted({SPECS[t].source for t in leaves} - sources)
    if missing:
        raise ValueError(f"tasks {sorted(set(tasks))} need benchmark sources {missing}, which are not configured")
    if num_fewshot and not any(SPECS[t].fewshot for t in leaves):
        raise ValueError(f"num_fewshot {num_fewshot}: none of {sorted(set(tasks))} takes few-shot examples (MMLU does)")
    metrics = {f"{t}.{m}" for t in leaves for m in SPECS[t].metrics}
    metrics |= {f"{g}.{ACC}" for g in groups_of(leaves)}
    return metrics


def source_file(data_dir: Path, source: str) -> Path:
    """The collected file of `source` in a benchmark folder, looked up in its manifest."""
    manifest = Path(data_dir) / MANIFEST
    if not manifest.is_file():
        raise MissingInputError(f"{manifest}: no manifest; is {data_dir} a collected benchmark folder?")
    try:
        entries = {e["name"]: e for e in json.loads(manifest.read_text(encoding="utf-8"))["sources"]}
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{manifest}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (UnicodeDecodeError, KeyError, TypeError) as err:
        raise BenchmarkDataError(f"{manifest}: not a collect manifest ({type(err).__name__}: {one_line(err)})") from None
    if source not in entries:
        raise BenchmarkDataError(f"{manifest}: no source named {source!r} (collected: {sorted(entries)})")
    if not isinstance(entries[source].get("file"), str):
        raise BenchmarkDataError(f"{manifest}: source {source!r} has no single 'file'; collect it as one file")
    return Path(data_dir) / entries[source]["file"]


def task_items(task: str, data_dir: Path, num_fewshot: int = 0) -> list[Item]:
    """Every item of a leaf task's evaluation split, in file order (doc_id = position)."""
    spec = SPECS[task]
    return _items(spec, source_file(data_dir, spec.source), num_fewshot if spec.fewshot else 0)


def sample(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """`limit` items drawn without replacement by a generator seeded with (seed, task), kept in doc order.

    The same seed, task and limit give the same items, whatever else is evaluated alongside.
    """
    if limit is None or limit >= len(items):
        return list(items)
    task = items[0].task if items else ""
    picked = sorted(random.Random(f"{seed}:{task}").sample(range(len(items)), limit))
    return [items[i] for i in picked]
