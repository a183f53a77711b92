"""Fine-tuning data: readers on the real files and on bad input, balance/split, templates, collation."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lmcore.finetune.data import (
    TEMPLATES,
    BadRecords,
    DataError,
    balance,
    collate_classify,
    collate_instruct,
    encode_instruction,
    extract_response,
    format_example,
    format_prompt,
    read_instruction_json,
    read_labelled_text,
    split,
)
from lmcore.tokenizer import get_tokenizer
from tests.conftest import SHARED

DATA = SHARED / "data"
SMS = DATA / "classification" / "sms_spam" / "SMSSpamCollection"
SENTIMENT = [
    DATA / "classification" / "sentiment_labelled_sentences" / f"{name}_labelled.txt"
    for name in ("amazon_cells", "imdb", "yelp")
]
INSTRUCTIONS = DATA / "instruction" / "instruction-data.json"
PREFERENCES = DATA / "instruction" / "instruction-data-with-preference.json"
HAM_SPAM = ["ham", "spam"]


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def sms():
    return read_labelled_text([SMS], labels=HAM_SPAM)


# --------------------------------------------------------------------------- labelled text, real files


def test_sms_spam_reads_every_row(sms):
    records, stats = sms
    assert stats["rows"] == len(records) == 5574
    assert stats["per_label"] == {"ham": 4827, "spam": 747}
    assert stats["bad"] == 0 and stats["files"][0]["reasons"] == {}
    assert stats["files"][0]["read"] == 5574
    assert records[0]["label"] == 0 and records[0]["where"] == "SMSSpamCollection:1"
    assert records[0]["text"].startswith("Go until jurong point")


def test_balance_and_stratified_split(sms):
    records, _ = sms
    balanced = balance(records, seed=123)
    assert Counter(r["label"] for r in balanced) == {0: 747, 1: 747}
    assert balanced == sorted(balanced, key=lambda r: int(r["where"].split(":")[1]))  # original order kept
    assert balance(records, seed=123) == balanced and balance(records, seed=7) != balanced

    parts = split(balanced, (0.7, 0.1), seed=123, stratify="label")
    # Sizes int(0.7 n), int(0.1 n) of all n rows, the rest last; each class within one row of its share.
    assert [len(p) for p in parts] == [1045, 149, 300] and sum(map(len, parts)) == 1494
    for part, fraction in zip(parts, (0.7, 0.1, 0.2)):
        counts = Counter(r["label"] for r in part)
        assert abs(counts[0] - counts[1]) <= 1 and all(abs(c - fraction * 747) <= 1 for c in counts.values())
    # Shuffled after concatenation: the train part does not hold one class and then the other.
    assert len({r["label"] for r in parts[0][:50]}) == 2
    wheres = [r["where"] for p in parts for r in p]
    assert len(set(wheres)) == len(wheres) == 1494  # no row in two parts, none lost
    assert split(balanced, (0.7, 0.1), seed=123, stratify="label") == parts
    other = split(balanced, (0.7, 0.1), seed=124, stratify="label")
    assert [r["where"] for r in other[0]] != [r["where"] for r in parts[0]]


def test_stratified_split_with_many_small_classes():
    rows = [{"label": c, "i": i} for c in range(10) for i in range(9)]  # 90 rows, 9 per class
    train, val, test = split(rows, (0.7, 0.1), seed=3, stratify="label")
    # Cutting each class separately would give int(0.9) = 0 val rows per class: an empty val part.
    assert (len(train), len(val), len(test)) == (63, 9, 18)
    assert len({r["label"] for r in val}) == 9  # nine classes, one val row each
    for part, fraction in zip((train, val, test), (0.7, 0.1, 0.2)):
        assert all(abs(c - fraction * 9) <= 1 for c in Counter(r["label"] for r in part).values())
    assert sorted((r["label"], r["i"]) for r in train + val + test) == [(r["label"], r["i"]) for r in rows]
    ordered = split(rows, (0.5,), seed=0, shuffle=False, stratify="label")
    assert [r["label"] for r in ordered[0][:12]] == [*range(10), 0, 1]  # classes interleaved, input order kept


def test_split_plain_and_validation():
    rows = list(range(10))
    train, val, test = split(rows, (0.5, 0.2), seed=0)
    assert (len(train), len(val), len(test)) == (5, 2, 3)
    assert sorted(train + val + test) == rows
    assert split(rows, (0.5, 0.2), seed=0, shuffle=False) == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    assert split(rows, (0.7, 0.3), seed=0)[2] == []  # sum == 1: an empty rest
    for bad in [(-0.1, 0.5), (0.8, 0.3)]:
        with pytest.raises(ValueError, match="fractions"):
            split(rows, bad, seed=0)


def test_sentiment_files_label_last():
    records, stats = read_labelled_text(SENTIMENT, labels=["0", "1"], label_column=-1)
    assert stats["rows"] == 3000 and stats["per_label"] == {"0": 1500, "1": 1500}
    assert [f["rows"] for f in stats["files"]] == [1000, 1000, 1000] and stats["bad"] == 0
    imdb = [r for r in records if r["where"].startswith("imdb_labelled.txt:")]
    assert len(imdb) == 1000
    # U+0085 (NEL) stays inside its sentence instead of breaking the line.
    assert any("\x85" in r["text"] for r in imdb)
    assert all(r["text"] and "\t" not in r["text"] for r in records)


# --------------------------------------------------------------------------- labelled text, bad input


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        (b"hamm\ttypo label", r"x\.tsv:3: label 'hamm' is not one of \['ham', 'spam'\]"),
        (b"no tab on this line", r"x\.tsv:3: expected label and text separated by '\\t'"),
        (b"spam\t   ", r"x\.tsv:3: empty text"),
        (b"ham\tcaf\xe9 latin-1", r"x\.tsv:3: not valid UTF-8 at byte offset 40"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, pattern):
    path = _write(tmp_path, "x.tsv", b"ham\thello there\nspam\twin a prize\n" + line + b"\nham\tbye\n")
    with pytest.raises(DataError, match=pattern):
        read_labelled_text([path], labels=HAM_SPAM)


def test_bom_crlf_and_blank_lines(tmp_path):
    path = _write(tmp_path, "x.tsv", b"\xef\xbb\xbfham\thello\r\n\r\nspam \t win \r\n\n")
    records, stats = read_labelled_text(path, labels=HAM_SPAM)
    assert [(r["text"], r["label"], r["where"]) for r in records] == [("hello", 0, "x.tsv:1"), ("win", 1, "x.tsv:3")]
    assert stats["blank_lines"] == 3 and stats["files"][0]["read"] == 2


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"empty\.tsv: no records"):
        read_labelled_text([_write(tmp_path, "empty.tsv", b"\n\n")], labels=HAM_SPAM)
    with pytest.raises(DataError, match=r"gone\.tsv: file not found"):
        read_labelled_text([tmp_path / "gone.tsv"], labels=HAM_SPAM)
    # Nothing usable is an error even when skipping.
    with pytest.raises(DataError, match="no records"):
        read_labelled_text([_write(tmp_path, "b.tsv", b"x\ty\n")], labels=HAM_SPAM, on_bad="skip", max_bad_fraction=1.0)


def test_argument_checks(tmp_path):
    path = _write(tmp_path, "x.tsv", b"ham\thi\n")
    with pytest.raises(ValueError, match="label_column"):
        read_labelled_text([path], labels=HAM_SPAM, label_column=2)
    with pytest.raises(ValueError, match="on_bad"):
        read_labelled_text([path], labels=HAM_SPAM, on_bad="ignore")


BAD_MIX = (
    b"ham\tone\n"
    b"hamm\ttwo\n"
    b"spam\tthree\n"
    b"no tab\n"
    b"ham\t\n"
    b"spam\tsix\n"
    b"ham\t\xff\xfe\n"
    b"ham\teight\n"
    b"spam\tnine\n"
    b"HAM\tten\n"
)


def test_skip_counts_bad_lines_per_reason(tmp_path):
    path = _write(tmp_path, "mix.tsv", BAD_MIX)
    records, stats = read_labelled_text([path], labels=HAM_SPAM, on_bad="skip", max_bad_fraction=0.5)
    assert [r["text"] for r in records] == ["one", "three", "six", "eight", "nine"]
    assert stats["rows"] == 5 and stats["bad"] == 5 and stats["per_label"] == {"ham": 2, "spam": 3}
    f = stats["files"][0]
    assert f["read"] == 10 and f["bad"] == 5
    assert f["reasons"] == {"label not in labels": 2, "no delimiter": 1, "empty text": 1, "not valid UTF-8": 1}
    assert f["examples"][0] == f"{path}:2: label 'hamm' is not one of ['ham', 'spam']"
    assert len(f["examples"]) == 5


def test_skip_above_threshold_fails_with_counts(tmp_path):
    path = _write(tmp_path, "mix.tsv", BAD_MIX)
    with pytest.raises(DataError, match=r"5 of 10 records are bad.*'label not in labels': 2.*mix\.tsv:2"):
        read_labelled_text([path], labels=HAM_SPAM, on_bad="skip", max_bad_fraction=0.4)


def test_bad_records_keeps_the_first_ten():
    bad = BadRecords("f")
    for i in range(15):
        bad.add(f"f:{i}", "r", "d")
    assert bad.total == 15 and len(bad.examples) == 10 and bad.examples[0] == "f:0: d"
    assert bad.to_dict() == {"read": 0, "bad": 15, "reasons": {"r": 15}, "examples": bad.examples}


# --------------------------------------------------------------------------- instruction JSON


def test_instruction_file():
    records, stats = read_instruction_json(INSTRUCTIONS)
    assert stats["rows"] == len(records) == 1100 and stats["bad"] == 0 and stats["read"] == 1100
    assert sum(r["input"] == "" for r in records) == 775
    assert set(records[0]) == {"instruction", "input", "output", "where"}


def test_preference_file():
    records, stats = read_instruction_json(PREFERENCES, fields=("instruction", "chosen", "rejected"))
    assert stats["rows"] == 1100
    assert all(r["chosen"].strip() and r["rejected"].strip() for r in records)
    assert "output" in records[0]  # extra keys are kept


GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}


def _json(tmp_path, records, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ({"instruction": "Say bye", "input": ""}, r"missing 'output'"),
        ({"instruction": "Say bye", "output": "  "}, r"empty 'output'"),
        ({"instruction": "Say bye", "input": 3, "output": "bye"}, r"'input' is not a string \(got int\)"),
        ({"instruction": 5, "output": "bye"}, r"'instruction' is not a string"),
        (["instruction", "output"], r"expected a JSON object, got list"),
    ],
)
def test_bad_instruction_record_names_the_record(tmp_path, bad, pattern):
    path = _json(tmp_path, [GOOD] * 3 + [bad])
    # indent=1: "[" on line 1 and each GOOD record takes 5 lines, so record 3 starts on line 17.
    with pytest.raises(DataError, match=r"d\.json: record 3 \(line 17\): " + pattern):
        read_instruction_json(path)


def test_record_lines_are_exact(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('\n[ {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n "output": ""}  ]\n')
    with pytest.raises(DataError, match=r"record 1 \(line 4\): empty 'output'"):
        read_instruction_json(path)


def test_malformed_json_has_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"d\.json: malformed JSON at line 3 column 22"):
        read_instruction_json(path)
    path.write_text('[{"instruction": "a", "output": "b"},]')
    with pytest.raises(DataError, match=r"malformed JSON at line 1 column"):
        read_instruction_json(path)


def test_not_an_array_not_utf8_empty(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [GOOD]}))
    with pytest.raises(DataError, match="expected a JSON array.*got dict"):
        read_instruction_json(path)
    path.write_bytes(b'[{"instruction": "caf\xe9", "output": "b"}]')
    with pytest.raises(DataError, match=r"d\.json: invalid UTF-8 at byte offset 21"):
        read_instruction_json(path)
    path.write_text("[]")
    with pytest.raises(DataError, match="no records"):
        read_instruction_json(path)
    with pytest.raises(DataError, match="file not found"):
        read_instruction_json(tmp_path / "gone.json")


def test_instruction_skip_and_threshold(tmp_path):
    bad = [{"instruction": "x"}, {"instruction": "y", "output": ""}, "not an object"]
    path = _json(tmp_path, [GOOD, bad[0], GOOD, bad[1], GOOD, bad[2], GOOD])
    records, stats = read_instruction_json(path, on_bad="skip", max_bad_fraction=0.5)
    assert len(records) == 4 and stats["rows"] == 4 and stats["read"] == 7 and stats["bad"] == 3
    assert stats["reasons"] == {"missing 'output'": 1, "empty 'output'": 1, "not an object": 1}
    assert records[1]["where"] == "d.json: record 2"
    with pytest.raises(DataError, match=r"3 of 7 records are bad.*missing 'output'"):
        read_instruction_json(path, on_bad="skip", max_bad_fraction=0.4)


def test_jsonl_with_a_malformed_line(tmp_path):
    path = tmp_path / "d.jsonl"
    no_input = json.dumps({"instruction": "no input", "output": "ok"})
    lines = [json.dumps(GOOD), "", no_input, '{"instruction": "x",', json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl: record 2 \(line 4\): malformed JSON at column"):
        read_instruction_json(path)
    records, stats = read_instruction_json(path, on_bad="skip", max_bad_fraction=0.5)
    assert len(records) == 3 and stats["reasons"] == {"malformed JSON": 1} and stats["read"] == 4
    assert records[1]["input"] == "" and records[2]["where"] == "d.jsonl: record 3"


# --------------------------------------------------------------------------- templates


ENTRY = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "The car is as fast as lightning.",
}
NO_INPUT = {
    "instruction": "What is an antonym of 'complicated'?",
    "input": "",
    "output": "An antonym of 'complicated' is 'simple'.",
}


def test_alpaca_matches_the_book():
    assert format_prompt(ENTRY) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence using a simile."
        "\n\n### Input:\nThe car is very fast."
        "\n\n### Response:\n"
    )
    assert format_example(NO_INPUT, NO_INPUT["output"]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
        "\n\n### Response:\nAn antonym of 'complicated' is 'simple'."
    )


def test_phi3_and_unknown_template():
    phi3 = "<|user|>\nRewrite the sentence using a simile.\nThe car is very fast.\n<|assistant|>\n"
    assert format_prompt(ENTRY, "phi3") == phi3
    phi3 = "<|user|>\nWhat is an antonym of 'complicated'?\n<|assistant|>\nsimple"
    assert format_example(NO_INPUT, "simple", "phi3") == phi3
    with pytest.raises(ValueError, match=r"'chatml'.*\['alpaca', 'phi3'\]"):
        format_prompt(ENTRY, "chatml")


@pytest.mark.parametrize("template", TEMPLATES)
def test_extract_response_round_trip(template):
    for entry in (ENTRY, NO_INPUT):
        assert extract_response(format_example(entry, entry["output"] + "\n", template), template) == entry["output"]
    # Only the first response counts: a model that keeps going does not move the cut.
    text = format_example(ENTRY, "first", template) + format_example(NO_INPUT, "second", template)
    assert extract_response(text, template).startswith("first")


# --------------------------------------------------------------------------- token ids and batches


@pytest.mark.parametrize("template", TEMPLATES)
def test_encode_instruction(enc, template):
    for entry in (ENTRY, NO_INPUT):
        ids, prompt_len = encode_instruction(entry, enc, template)
        assert enc.decode(ids) == format_example(entry, entry["output"], template)
        assert prompt_len == len(enc.encode(format_prompt(entry, template)))
        assert enc.decode(ids[:prompt_len]) == format_prompt(entry, template)
    ids, prompt_len = encode_instruction(ENTRY, enc, template, response="Fast as a cheetah.")
    assert enc.decode(ids[prompt_len:]) == "Fast as a cheetah."


def test_collate_instruct_exact():
    X, E = -100, 99  # ignore_index, end of text
    batch = [([1, 2, 3, 4, 5], 2), ([6, 7], 1), ([8, 9, 10], 3)]
    inputs, targets = collate_instruct(batch, pad_id=0, eot_id=E)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, E, 0, 0], [8, 9, 10, E, 0]]
    # The one end-of-text target per row is kept (the model learns to stop); padding after it is not.
    assert targets.tolist() == [[2, 3, 4, 5, E], [7, E, X, X, X], [9, 10, E, X, X]]

    _, masked = collate_instruct(batch, pad_id=0, eot_id=E, mask_prompt=True)
    # Targets 0..prompt_len-2 predict prompt tokens 1..prompt_len-1.
    assert masked.tolist() == [[X, 3, 4, 5, E], [7, E, X, X, X], [X, X, E, X, X]]

    inputs, targets = collate_instruct(batch, pad_id=0, eot_id=E, max_length=3, ignore_index=-1)
    assert inputs.tolist() == [[1, 2, 3], [6, 7, E], [8, 9, 10]]
    assert targets.tolist() == [[2, 3, 4], [7, E, -1], [9, 10, E]]


def test_collate_instruct_padding_is_per_batch():
    inputs, targets = collate_instruct([([5, 6], 1)], pad_id=0, eot_id=9)
    assert inputs.tolist() == [[5, 6]] and targets.tolist() == [[6, 9]]
    with pytest.raises(ValueError, match="item 0 has no token ids"):
        collate_instruct([([], 0)], pad_id=0, eot_id=9)


def test_collate_classify():
    inputs, lengths, labels = collate_classify([([1, 2, 3], 0), ([4], 1), ([5, 6, 7, 8, 9, 10], 1)], pad_id=0, max_length=4)
    assert inputs.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 7, 8]]  # the first tokens are kept
    assert lengths.tolist() == [3, 1, 4] and labels.tolist() == [0, 1, 1]
    assert inputs.dtype == lengths.dtype == labels.dtype == torch.int64
    inputs, lengths, _ = collate_classify([([1, 2], 0), ([3], 1)], pad_id=7, max_length=10)
    assert inputs.tolist() == [[1, 2], [3, 7]] and lengths.tolist() == [2, 1]
    with pytest.raises(ValueError, match="item 1 has no token ids"):
        collate_classify([([1], 0), ([], 1)], pad_id=0, max_length=4)
