"""The data side of fine-tuning: readers with bad-input handling, splits, prompt templates, batches.

    records, stats = read_labelled_text([sms_path], labels=["ham", "spam"])            # label<TAB>text
    records, stats = read_labelled_text(paths, labels=["0", "1"], label_column=-1)     # text<TAB>label
    train, val, test = split(balance(records, seed=123), (0.7, 0.1), seed=123, stratify="label")

    entries, stats = read_instruction_json("instruction-data.json")                    # Alpaca-style
    ids, prompt_len = encode_instruction(entries[0], enc, "alpaca")
    inputs, targets = collate_instruct([(ids, prompt_len)], pad_id=50256, eot_id=50256, mask_prompt=True)
    template = resolve_template("auto", tok)              # "chat" when the tokenizer has a chat template (SmolLM2)
    ids, prompt_len = encode_instruction(entries[0], tok, template)   # already ends with the template's end of turn
    inputs, targets = collate_instruct([(ids, prompt_len)], pad_id=tok.eot_token, eot_id=collate_eot(tok, template))

Bad input (wrong label, missing delimiter, empty text, invalid UTF-8, malformed JSON, missing
fields) is handled the same way by every reader: with `on_bad="error"` the first bad record raises
`DataError` naming the file and line (or record); with `on_bad="skip"` bad records are dropped and
counted per reason (`BadRecords`, reported in the stats), and the read fails when more than
`max_bad_fraction` of a file's records were bad. A file with no usable records always fails.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch

from lmcore import chat
from lmcore.errors import InputError
from lmcore.io import utf8_error

OnBad = Literal["error", "skip"]

UTF8_BOM = b"\xef\xbb\xbf"
MAX_EXAMPLES = 10  # bad-record locations kept for the report
IGNORE_INDEX = -100  # the default ignore_index of torch.nn.functional.cross_entropy

TEMPLATES = ("alpaca", "phi3")  # the book's text templates, for models without a chat template of their own
CHAT = "chat"  # the model's own chat template (its tokenizer's chat_template, lmcore.chat)
AUTO = "auto"  # CHAT when the start model's tokenizer has a chat template, else alpaca
PROMPT_TEMPLATES = (*TEMPLATES, CHAT)  # what an instruction model's config.json may record
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# Text that starts the response in each template; extract_response() cuts after it.
RESPONSE_MARKERS = {"alpaca": "### Response:", "phi3": "<|assistant|>"}

_JSON_WS = re.compile(r"[ \t\n\r]*")  # the whitespace JSON allows between tokens


class DataError(InputError):
    """Fine-tuning data that cannot be used; the message names the file and the line or record."""


@dataclass
class BadRecords:
    """Bad records seen while reading: counts per reason and the first few locations."""

    path: str
    read: int = 0  # records (non-blank lines / array entries) looked at
    counts: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)  # first MAX_EXAMPLES "where: detail"

    def add(self, where: str, reason: str, detail: str) -> None:
        """Count one bad record under `reason`; keep `where: detail` while fewer than MAX_EXAMPLES are kept."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"read": self.read, "bad": self.total, "reasons": dict(self.counts), "examples": list(self.examples)}


def _check_policy(on_bad: str, max_bad_fraction: float) -> None:
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")


def _bad(bad: BadRecords, on_bad: str, where: str, reason: str, detail: str) -> None:
    """Raise for on_bad="error", else count the record as dropped."""
    if on_bad == "error":
        raise DataError(f"{where}: {detail} (set on_bad=skip to drop and count bad records)")
    bad.add(where, reason, detail)


def _finish(bad: BadRecords, kept: int, max_bad_fraction: float) -> None:
    """The end-of-file checks: something usable, and not too much of it bad."""
    if kept == 0:
        raise DataError(f"{bad.path}: no records ({bad.read} read, {bad.total} bad: {bad.counts}; {bad.examples})")
    if bad.read and bad.total / bad.read > max_bad_fraction:
        raise DataError(
            f"{bad.path}: {bad.total} of {bad.read} records are bad ({bad.total / bad.read:.1%} > "
            f"max_bad_fraction={max_bad_fraction}): {bad.counts}; first: {bad.examples}"
        )


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path.read_bytes()


# --------------------------------------------------------------------------- labelled text


def read_labelled_text(
    paths: Sequence[str | Path] | str | Path,
    *,
    labels: Sequence[str],
    label_column: int = 0,
    delimiter: str = "\t",
    on_bad: OnBad = "error",
    max_bad_fraction: float = 0.0,
) -> tuple[list[dict], dict]:
    """Read two-column delimited files (label and text, no header) such as SMS spam or sentiment sentences.

    Args:
        paths: the files, read in this order (a single path is accepted too).
        labels: the allowed labels (exact strings); a record's label is its index here.
        label_column: 0 when the label comes first, -1 (or 1) when it comes last.
        delimiter: the column separator; the text may contain it when the label is at the other end.
        on_bad: "error" raises on the first bad line; "skip" drops and counts bad lines.
        max_bad_fraction: with "skip", the largest share of a file's records that may be bad.

    Returns:
        (records, stats): records are {"text", "label" (int), "where" ("name:line")} in file order;
        stats is {"files": [{"path", "rows", "blank_lines", "read", "bad", "reasons", "examples"}],
        "rows", "bad", "blank_lines", "per_label": {label: count}}.
    """
    _check_policy(on_bad, max_bad_fraction)
    if label_column not in (0, 1, -1):
        raise ValueError(f"label_column must be 0 (label first) or -1/1 (label last), got {label_column!r}")
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string")
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and distinct, got {labels!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    index = {label: i for i, label in enumerate(labels)}

    records: list[dict] = []
    files: list[dict] = []
    for path in map(Path, paths):
        bad = BadRecords(str(path))
        kept, blank = _read_labelled_file(path, index, label_column, delimiter, on_bad, bad, records)
        _finish(bad, kept, max_bad_fraction)
        files.append({"path": str(path), "rows": kept, "blank_lines": blank, **bad.to_dict()})
    per_label = dict.fromkeys(labels, 0)
    for r in records:
        per_label[labels[r["label"]]] += 1
    stats = {
        "files": files,
        "rows": len(records),
        "bad": sum(f["bad"] for f in files),
        "blank_lines": sum(f["blank_lines"] for f in files),
        "per_label": per_label,
    }
    return records, stats


def _read_labelled_file(
    path: Path,
    index: dict[str, int],
    label_column: int,
    delimiter: str,
    on_bad: str,
    bad: BadRecords,
    out: list[dict],
) -> tuple[int, int]:
    """Append the good records of one file to `out`; returns (kept, blank lines)."""
    data = _read_bytes(path)
    start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    kept = blank = 0
    # Split on b"\n" only: the IMDB file has U+0085 (NEL) inside sentences, which str.splitlines()
    # would treat as a line break.
    for lineno, raw in enumerate(data[start:].split(b"\n"), start=1):
        offset, start = start, start + len(raw) + 1  # byte offset of this line in the file
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.read += 1
            _bad(
                bad,
                on_bad,
                where,
                "not valid UTF-8",
                f"not valid UTF-8 at byte offset {offset + err.start}: {raw[err.start:err.end]!r} ({err.reason})",
            )
            continue
        if not line.strip():
            blank += 1
            continue
        bad.read += 1
        parts = line.split(delimiter, 1) if label_column == 0 else line.rsplit(delimiter, 1)
        if len(parts) != 2:
            _bad(bad, on_bad, where, "no delimiter", f"expected label and text separated by {delimiter!r}")
            continue
        label, text = (parts[0], parts[1]) if label_column == 0 else (parts[1], parts[0])
        label, text = label.strip(), text.strip()
        if label not in index:
            _bad(bad, on_bad, where, "label not in labels", f"label {label!r} is not one of {list(index)}")
            continue
        if not text:
            _bad(bad, on_bad, where, "empty text", "empty text")
            continue
        out.append({"text": text, "label": index[label], "where": f"{path.name}:{lineno}"})
        kept += 1
    return kept, blank


def _groups(records: Sequence, key: str) -> dict[Any, list[int]]:
    """Indices of the records per value of `key`, classes in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r[key], []).append(i)
    return groups


def balance(records: list[dict], seed: int, key: str = "label") -> list[dict]:
    """Undersample every class to the size of the smallest (book ch. 6 `create_balanced_dataset`).

    Args:
        records: dicts with a `key` entry.
        seed: chooses which rows of the larger classes are kept (random.Random, not global state).
        key: the class entry.

    Returns:
        The kept records in their original relative order.
    """
    groups = _groups(records, key)
    if not groups:
        return []
    n = min(len(g) for g in groups.values())
    rng = random.Random(seed)
    keep: set[int] = set()
    for idx in groups.values():
        keep.update(rng.sample(idx, n))
    return [r for i, r in enumerate(records) if i in keep]


def split(
    records: list, fractions: Sequence[float], seed: int, *, shuffle: bool = True, stratify: str | None = None
) -> list[list]:
    """Split into len(fractions) + 1 parts, e.g. fractions (0.7, 0.1) -> train, val, test (the rest).

    Args:
        records: the rows (dicts when stratifying).
        fractions: each part's share of all n rows; part i gets int(n * fractions[i]) rows, the
            last part the rest (with or without stratify).
        seed: the shuffle seed (random.Random(seed): deterministic, independent of global state).
        shuffle: shuffle before splitting; without it parts are consecutive runs of the input.
        stratify: a record key; every part then holds each class in (within one row) the share it
            has overall, and is shuffled so the classes are mixed.

    Returns:
        The parts; together they hold every record exactly once.
    """
    fractions = [float(f) for f in fractions]
    if any(f < 0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
        raise ValueError(f"split fractions must be >= 0 and sum to at most 1, got {fractions}")
    rng = random.Random(seed)
    if stratify is None:
        rows = list(records)
        if shuffle:
            rng.shuffle(rows)
        return _cut(rows, fractions)
    # Spread every class evenly along one sequence (row j of a class of n_c sits at (j + 1/2) / n_c),
    # then cut that sequence as above: any prefix holds each class within one row of its share.
    # Part sizes stay int(n * f) of the total; cutting each class separately would floor once per
    # class and could leave a small part with nothing when there are many small classes.
    keyed: list[tuple[Fraction, int, Any]] = []
    for order, idx in enumerate(_groups(records, stratify).values()):
        rows = [records[i] for i in idx]
        if shuffle:
            rng.shuffle(rows)
        keyed.extend((Fraction(2 * j + 1, 2 * len(rows)), order, row) for j, row in enumerate(rows))
    keyed.sort(key=lambda t: t[:2])
    parts = _cut([row for _, _, row in keyed], fractions)
    if shuffle:
        # Otherwise each part would alternate through the classes in a fixed pattern.
        for part in parts:
            rng.shuffle(part)
    return parts


def _cut(rows: list, fractions: list[float]) -> list[list]:
    n, start, parts = len(rows), 0, []
    for f in fractions:
        # int(n * f), but not one short from float error: 90 * 0.7 is 62.99999999999999.
        size = min(int(n * f + 1e-9), n - start)
        parts.append(rows[start : start + size])
        start += size
    parts.append(rows[start:])
    return parts


# --------------------------------------------------------------------------- instruction JSON


def read_instruction_json(
    path: str | Path,
    *,
    fields: Sequence[str] = ("instruction", "output"),
    optional: Sequence[str] = ("input",),
    on_bad: OnBad = "error",
    max_bad_fraction: float = 0.0,
) -> tuple[list[dict], dict]:
    """Read Alpaca-style instruction (or preference) records from a JSON array or a JSON Lines file.

    Args:
        path: a `.jsonl` file (one object per line, blank lines ignored) or a JSON array (any other name).
        fields: required: present, a string, non-empty after strip().
        optional: a string when present; "" when missing.
        on_bad: "error" raises on the first bad record; "skip" drops and counts bad records.
        max_bad_fraction: with "skip", the largest share of the records that may be bad.

    Returns:
        (records, stats): records are the objects (extra keys kept) with every optional field
        filled in, plus "where"; stats is {"path", "rows", "read", "bad", "reasons", "examples"}.
    """
    _check_policy(on_bad, max_bad_fraction)
    path = Path(path)
    data = _read_bytes(path)
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(utf8_error(path, data, err)) from None

    bad = BadRecords(str(path))
    records: list[dict] = []
    if path.suffix.lower() == ".jsonl":
        entries = _jsonl_entries(path, text, bad, on_bad)
    else:
        entries = _json_array_entries(path, text)
    for i, line, obj in entries:
        bad.read += 1
        where = f"{path}: record {i}" + (f" (line {line})" if line else "")
        problem = _check_instruction(obj, fields, optional)
        if problem is not None:
            _bad(bad, on_bad, where, *problem)
            continue
        record = dict(obj)
        for name in optional:
            record.setdefault(name, "")
        record["where"] = f"{path.name}: record {i}"
        records.append(record)
    _finish(bad, len(records), max_bad_fraction)
    return records, {"path": str(path), "rows": len(records), **bad.to_dict()}


def _check_instruction(obj: Any, fields: Sequence[str], optional: Sequence[str]) -> tuple[str, str] | None:
    """(reason, detail) of what makes `obj` unusable, or None."""
    if not isinstance(obj, dict):
        return "not an object", f"expected a JSON object, got {type(obj).__name__}"
    for name in fields:
        if name not in obj:
            return f"missing {name!r}", f"missing {name!r}"
        if not isinstance(obj[name], str):
            return f"{name!r} not a string", f"{name!r} is not a string (got {type(obj[name]).__name__})"
        if not obj[name].strip():
            return f"empty {name!r}", f"empty {name!r}"
    for name in optional:
        if name in obj and not isinstance(obj[name], str):
            return f"{name!r} not a string", f"{name!r} is not a string (got {type(obj[name]).__name__})"
    return None


def _json_array_entries(path: Path, text: str) -> list[tuple[int, int | None, Any]]:
    """(record index, start line, value) of every entry of the top-level array."""
    # Walk the array with raw_decode to learn where each entry starts, in one pass over the text;
    # anything unexpected falls back to json.loads for the standard error with line and column.
    decoder = json.JSONDecoder()
    entries: list[tuple[int, int | None, Any]] = []
    pos = _JSON_WS.match(text).end()
    if text.startswith("[", pos):
        pos = _JSON_WS.match(text, pos + 1).end()
        line, counted = 1, 0
        closed = text.startswith("]", pos)
        pos += closed
        try:
            while not closed:
                line += text.count("\n", counted, pos)
                counted = pos
                value, pos = decoder.raw_decode(text, pos)
                entries.append((len(entries), line, value))
                pos = _JSON_WS.match(text, pos).end()
                if text.startswith(",", pos):
                    pos = _JSON_WS.match(text, pos + 1).end()
                elif text.startswith("]", pos):
                    pos, closed = pos + 1, True
                else:
                    break
        except json.JSONDecodeError:
            closed = False
        if closed and _JSON_WS.match(text, pos).end() == len(text):
            return entries
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records at the top level, got {type(value).__name__}")
    # Valid JSON that the walk did not follow (not expected): the entries, without lines.
    return [(i, None, v) for i, v in enumerate(value)]


def _jsonl_entries(path: Path, text: str, bad: BadRecords, on_bad: str) -> list[tuple[int, int | None, Any]]:
    """(record index, line, value) of every non-blank line that parses; malformed lines are bad records."""
    entries: list[tuple[int, int | None, Any]] = []
    index = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            entries.append((index, lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            bad.read += 1
            where = f"{path}: record {index} (line {lineno})"
            _bad(bad, on_bad, where, "malformed JSON", f"malformed JSON at column {err.colno}: {err.msg}")
        index += 1
    return entries


# --------------------------------------------------------------------------- prompt templates


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {list(TEMPLATES)}")


def resolve_template(template: str, enc) -> str:
    """The prompt template a fine-tuning run uses.

    Args:
        template: auto | chat | alpaca | phi3 (finetune_instruct.template).
        enc: the start model's tokenizer.

    Returns: "chat" for auto when the tokenizer has a chat template, else "alpaca"; the others as they are.
    Raises: InputError for chat when the tokenizer has none, ValueError for an unknown name.
    """
    has_chat = bool(getattr(enc, "chat_template", None))
    if template == AUTO:
        return CHAT if has_chat else "alpaca"
    if template == CHAT and not has_chat:
        raise InputError(
            f"finetune_instruct.template: chat, but the start model's tokenizer ({enc.name}) has no chat template; "
            f"use auto, alpaca or phi3"
        )
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {[AUTO, *PROMPT_TEMPLATES]}")
    return template


def instruction_messages(entry: dict) -> list[dict]:
    """An instruction record as a chat: one user message, the instruction and (after a blank line) any input.

    No system message: the chat template decides (SmolLM2's adds its default system prompt).
    """
    extra = entry.get("input", "")
    return [{"role": "user", "content": f"{entry['instruction']}\n\n{extra}" if extra else entry["instruction"]}]


def instruction_prompt(entry: dict, enc, template: str) -> tuple[str | list[int], list[int]]:
    """What to generate a response from: the prompt for lmcore.generation.stream_text and the extra stop ids.

    Returns: for a text template, the prompt text and no extra stops (the tokenizer's end-of-text ends it); for
    "chat", the prompt's ids in the tokenizer's chat template and the template's end of turn with the stop tokens.
    The response is the generated text (stripped), without a marker to cut at.
    """
    if template == CHAT:
        return chat.prompt_ids(enc, instruction_messages(entry)), chat.stop_tokens(enc)
    return format_prompt(entry, template), []


def format_prompt(entry: dict, template: str = "alpaca") -> str:
    """The prompt: everything up to where the response starts.

    Args:
        entry: has "instruction" and optionally "input" (left out of the prompt when empty).
        template: "alpaca" (book ch. 7) or "phi3" (book exercise 7.1).

    Returns:
        The prompt text, ending where the response text follows directly.
    """
    _check_template(template)
    instruction, extra = entry["instruction"], entry.get("input", "")
    if template == "alpaca":
        prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if extra:
            prompt += f"\n\n### Input:\n{extra}"
        return prompt + "\n\n### Response:\n"
    prompt = f"<|user|>\n{instruction}"
    if extra:
        prompt += f"\n{extra}"
    return prompt + "\n<|assistant|>\n"


def format_example(entry: dict, response: str, template: str = "alpaca") -> str:
    """The prompt followed by `response`: the full text of one training example."""
    return format_prompt(entry, template) + response


def extract_response(generated_text: str, template: str = "alpaca") -> str:
    """The response in a prompt-plus-generation text: what follows the template's response marker.

    Args:
        generated_text: the prompt and the model's continuation.
        template: the template the prompt was made with.

    Returns:
        The text after the first response marker, stripped (the whole text, stripped, without one).
    """
    _check_template(template)
    # The first marker, not the last: models often go on to write further "### Response:" sections.
    _, found, rest = generated_text.partition(RESPONSE_MARKERS[template])
    return rest.strip() if found else generated_text.strip()


# --------------------------------------------------------------------------- token ids and batches


def encode_instruction(entry: dict, enc, template: str, response: str | None = None) -> tuple[list[int], int]:
    """Token ids of prompt + response and the number of prompt tokens.

    Prompt and response are encoded separately and concatenated, so the prompt length is exact.
    The data is ordinary text: a literal "<|endoftext|>" (or "<|im_end|>") in it never becomes that token.
    With a text template the end-of-text token is left to collation (eot_id); with "chat" the ids end with
    the chat template's end of turn (lmcore.chat.example_ids), and collation adds nothing (eot_id=None).

    Args:
        entry: an instruction record.
        enc: the model's tokenizer.
        template: one of PROMPT_TEMPLATES.
        response: the response text; entry["output"] when None (DPO passes "chosen"/"rejected").

    Returns:
        (ids, prompt_len).
    """
    answer = entry["output"] if response is None else response
    if template == CHAT:
        return chat.example_ids(enc, instruction_messages(entry), answer)
    prompt = enc.encode_ordinary(format_prompt(entry, template))
    return prompt + enc.encode_ordinary(answer), len(prompt)


def collate_eot(enc, template: str) -> int | None:
    """The id collate_instruct appends to every example: end-of-text for a text template, none for "chat"."""
    return None if template == CHAT else enc.eot_token


def collate_instruct(
    batch: Sequence[tuple[list[int], int]],
    *,
    pad_id: int,
    eot_id: int | None,
    max_length: int | None = None,
    mask_prompt: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token inputs and targets for a batch of instruction examples (book ch. 7 `custom_collate_fn`).

    Each sequence gets `eot_id` appended and is padded with `pad_id`; inputs are the sequence
    without its last position and targets the sequence shifted by one, so the end-of-text token
    is the last kept target (the model learns to stop) and every position after it is ignored.

    Args:
        batch: (ids, prompt_len) pairs from encode_instruction.
        pad_id: the filler token for inputs (the book uses end-of-text, 50256).
        eot_id: the end-of-text token appended to every sequence; None: the ids already end with their stop
            token (a chat template's end of turn), which is then the last kept target.
        max_length: cut inputs and targets to this many positions (the model's context length).
        mask_prompt: ignore the targets that predict prompt tokens, so only the response is learnt.
        ignore_index: the target value the loss skips.

    Returns:
        (inputs, targets), both (B, T) int64 with T = min(longest sequence - 1, max_length), the sequence being
        the ids with eot_id: padding depends on the batch only.
    """
    if not batch:
        raise ValueError("collate_instruct: empty batch")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tail = [] if eot_id is None else [eot_id]
    for i, (ids, prompt_len) in enumerate(batch):
        if not ids:
            raise ValueError(f"collate_instruct: item {i} has no token ids")
        if len(ids) + len(tail) < 2:
            raise ValueError(f"collate_instruct: item {i} has one token id and no eot_id: nothing to predict")
        if not 0 <= prompt_len <= len(ids):
            raise ValueError(f"collate_instruct: item {i} has prompt_len {prompt_len} outside [0, {len(ids)}]")
    # inputs drop each sequence's last position, so the longest sequence less one sets the width.
    width = max(len(ids) + len(tail) for ids, _ in batch) - 1
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(batch), width), ignore_index, dtype=torch.long)  # (B, T)
    for b, (ids, prompt_len) in enumerate(batch):
        seq = torch.tensor([*ids, *tail], dtype=torch.long)  # (n + 1,)
        n = len(seq) - 1  # next-token targets
        inputs[b, : min(n + 1, width)] = seq[:width]  # as the book's: a shorter sequence's last token is an input too
        targets[b, :n] = seq[1:]  # the last kept target is the sequence's last token (eot_id or the end of turn)
        if mask_prompt and prompt_len > 1:
            targets[b, : prompt_len - 1] = ignore_index
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets


def collate_classify(
    batch: Sequence[tuple[list[int], int]], *, pad_id: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, lengths and labels for a batch of classification examples.

    Args:
        batch: (ids, label) pairs.
        pad_id: the filler token, on the right.
        max_length: ids are cut to their FIRST max_length tokens (as the book does).

    Returns:
        inputs (B, T) int64 padded to the longest cut ids; lengths (B,) int64, the real tokens
        (the classifier reads the logits at lengths - 1); labels (B,) int64.
    """
    if not batch:
        raise ValueError("collate_classify: empty batch")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    cut = [list(ids[:max_length]) for ids, _ in batch]
    for i, ids in enumerate(cut):
        if not ids:
            raise ValueError(f"collate_classify: item {i} has no token ids")
    lengths = torch.tensor([len(ids) for ids in cut], dtype=torch.long)  # (B,)
    inputs = torch.full((len(cut), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T)
    for b, ids in enumerate(cut):
        inputs[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.long)  # (B,)
    return inputs, lengths, labels
