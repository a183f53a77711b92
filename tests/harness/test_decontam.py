"""Decontamination: real GSM8K and IFEval items planted in training files among unrelated text are found with their
file and line, through case and punctuation changes; 12 shared words are not enough; the normalisation and n-grams
are lm-eval's own."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
from pathlib import Path

import pytest

from lmcore.errors import MissingInputError
from lmcore.harness import decontam
from lmcore.harness.decontam import (
    ROW_COLUMNS,
    DecontaminationError,
    benchmark_ngrams,
    clean_ids,
    ngrams,
    scan,
    words_of,
)
from tests.conftest import SHARED

BENCH = SHARED / "data" / "benchmarks"
FILLER = (SHARED / "data" / "corpus" / "the-verdict.txt").read_text(encoding="utf-8").split("\n")  # unrelated prose


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


GSM8K = read_jsonl(BENCH / "gsm8k" / "test.jsonl")
IFEVAL = read_jsonl(BENCH / "ifeval" / "input_data.jsonl")
QUESTION = GSM8K[1]["question"]  # "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many ..."
PROMPT = next(r for r in IFEVAL if r["key"] == 1001)["prompt"]  # "I am planning a trip to Japan, ..."


@pytest.fixture(scope="module")
def index():
    idx = benchmark_ngrams([(str(i), d["question"]) for i, d in enumerate(GSM8K)], benchmark="gsm8k")
    return idx.add("ifeval", [(str(r["key"]), r["prompt"]) for r in IFEVAL])


def write_corpus(path: Path, texts: list[str]) -> None:
    """documents.jsonl as the preprocess stage writes it."""
    lines = [json.dumps({"id": f"web/{i}", "source": "web", "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_planted_items_are_found_with_file_and_line(tmp_path, index):
    corpus, tsv = tmp_path / "documents.jsonl", tmp_path / "sms.tsv"
    texts = FILLER[:40]
    texts[17] = f"{FILLER[17]} {QUESTION} {FILLER[18]}"  # line 18
    write_corpus(corpus, texts)
    rows = [f"ham\t{line}" for line in FILLER[:30] if line]
    rows[9] = f"spam\tWin a prize! {PROMPT} Reply STOP"  # line 10
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")

    report = scan(index, {"corpus": [corpus], "classifier": [tsv]})
    assert report.counts() == {"corpus": {"gsm8k": 1, "ifeval": 0}, "classifier": {"gsm8k": 0, "ifeval": 1}}
    (g,), (f,) = report.found["corpus"]["gsm8k"].values(), report.found["classifier"]["ifeval"].values()
    assert (g.item, g.file, g.line, g.unit, g.field) == ("1", str(corpus), 18, "line", "text")
    assert (f.item, f.file, f.line, f.unit, f.field) == ("1001", str(tsv), 10, "line", "")
    assert g.ngram in " ".join(words_of(QUESTION)) and len(g.ngram.split()) == 13
    assert clean_ids(report, "gsm8k") == {str(i) for i in range(len(GSM8K))} - {"1"}
    assert clean_ids(report, "ifeval", sources=["corpus"]) == {str(r["key"]) for r in IFEVAL}
    assert report.sources["corpus"]["texts"] == 40 and report.sources["corpus"]["bytes"] == corpus.stat().st_size

    out = json.loads(json.dumps(report.to_dict()))
    assert out["benchmarks"]["gsm8k"] == {"items": len(GSM8K), "contaminated": 1, "clean": len(GSM8K) - 1}
    assert out["sources"]["classifier"]["contaminated"] == {"gsm8k": 0, "ifeval": 1}
    assert [tuple(r) for r in report.rows()] == [ROW_COLUMNS, ROW_COLUMNS]
    where = [(r["source"], r["benchmark"], r["item"]) for r in out["matches"]]
    assert where == [("corpus", "gsm8k", "1"), ("classifier", "ifeval", "1001")]


def test_case_and_punctuation_changes_still_match(tmp_path, index):
    changed = QUESTION.upper().replace(".", "!!").replace("  ", " \t ")
    changed = changed.replace("BOLTS", "B-O-L-T-S,").replace("FIBER", '"FIBER"')
    path = tmp_path / "card.md"
    path.write_text(f"# Model card\n\nIt was trained on: {changed}\n", encoding="utf-8")
    report = scan(index, {"base_card": [path]})
    assert set(report.found["base_card"]["gsm8k"]) == {"1"}
    assert report.found["base_card"]["gsm8k"]["1"].line == 3


def test_twelve_shared_words_are_not_contamination(tmp_path, index):
    words = QUESTION.split()
    assert len(words) >= 14
    path = tmp_path / "documents.jsonl"
    write_corpus(path, [f"zyx {' '.join(words[i:i + 12])} zyx" for i in range(len(words) - 11)])
    assert scan(index, {"corpus": [path]}).counts()["corpus"]["gsm8k"] == 0
    write_corpus(path, [f"zyx {' '.join(words[:13])} zyx"])
    assert scan(index, {"corpus": [path]}).counts()["corpus"]["gsm8k"] == 1


def test_empty_sources_and_counts(tmp_path, index):
    empty_jsonl, empty_json, blank_txt = tmp_path / "a.jsonl", tmp_path / "b.json", tmp_path / "c.txt"
    empty_jsonl.write_text("")
    empty_json.write_text("\n")
    blank_txt.write_text("\n\n")
    sft = tmp_path / "instruction-data.json"  # a JSON array: the match names the record and field
    records = [{"instruction": "Rewrite the sentence.", "input": line, "output": "ok"} for line in FILLER[:5]]
    records[3]["output"] = GSM8K[7]["question"]
    records.append({"instruction": GSM8K[2]["question"], "input": "", "output": PROMPT})
    sft.write_text(json.dumps(records, indent=1))
    dpo = tmp_path / "dpo.jsonl"  # nested strings: every one is scanned
    dpo.write_text(json.dumps({"messages": [{"role": "user", "content": GSM8K[7]["question"]}], "chosen": "a"}) + "\n")

    report = scan(index, {"nothing": [], "empty": [empty_jsonl, empty_json, blank_txt], "sft": [sft], "dpo": [dpo]})
    assert report.counts() == {
        "nothing": {"gsm8k": 0, "ifeval": 0},
        "empty": {"gsm8k": 0, "ifeval": 0},
        "sft": {"gsm8k": 2, "ifeval": 1},
        "dpo": {"gsm8k": 1, "ifeval": 0},
    }
    assert report.sources["empty"]["files"] == 3 and report.sources["nothing"]["files"] == 0
    found = report.found["sft"]
    assert [(m.item, m.line, m.unit, m.field) for m in (found["gsm8k"]["7"], found["gsm8k"]["2"], found["ifeval"]["1001"])] == [
        ("7", 4, "record", "output"), ("2", 6, "record", "instruction"), ("1001", 6, "record", "output")]
    assert report.found["dpo"]["gsm8k"]["7"].field == "messages[0].content"
    assert report.to_dict()["benchmarks"]["gsm8k"]["contaminated"] == 2  # items 2 and 7, whichever source


def test_text_lines_carry_grams_across_line_breaks(tmp_path, index):
    words = QUESTION.split()
    path = tmp_path / "book.txt"
    lines = [FILLER[0], "", f"A quote: {' '.join(words[:3])}", " ".join(words[3:5]), "", " ".join(words[5:])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    match = scan(index, {"corpus": [path]}).found["corpus"]["gsm8k"]["1"]
    assert match.line == 3 and match.ngram == " ".join(words_of(QUESTION)[:13])
    tsv = tmp_path / "rows.tsv"  # TSV rows are records: no gram across them
    tsv.write_text(f"ham\t{' '.join(words[:6])}\nham\t{' '.join(words[6:12])}\n", encoding="utf-8")
    assert not scan(index, {"classifier": [tsv]}).found["classifier"]["gsm8k"]


def test_short_items_are_one_gram(tmp_path):
    index = benchmark_ngrams([("a", "Compose a poem, all in lowercase."), ("b", "?!"), ("c", QUESTION)], benchmark="t")
    assert index.gramless == {"t": ["b"]} and index.lengths == {6, 13}
    path = tmp_path / "x.txt"
    path.write_text("please compose a poem all\nin LOWERCASE today\nwrite a poem all in lowercase\n", encoding="utf-8")
    report = scan(index, {"s": [path]})
    assert {i: (m.line, m.ngram) for i, m in report.found["s"]["t"].items()} == {"a": (1, "compose a poem all in lowercase")}
    assert clean_ids(report, "t") == {"b", "c"}


def test_parity_with_lm_eval_janitor():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.decontamination.janitor import Janitor, word_ngrams  # warns that its C++ helper is missing
    janitor = Janitor()
    odd = "Ünïcode “quotes” AND MiXeD-case, l'été: naïve ÀÉÎ words stay as they are -- only ASCII (A-Z) folds!"
    texts = [d["question"] for d in GSM8K[:200]] + [r["prompt"] for r in IFEVAL[:200]] + [odd]
    for text in texts:
        ours = {" ".join(g) for g in ngrams(words_of(text), 13)}
        assert ours == set(word_ngrams(janitor.normalize_string(text), 13)), text
    index = benchmark_ngrams([(str(i), t) for i, t in enumerate(texts)], benchmark="b")
    janitor = Janitor()
    for text in texts:
        janitor.register_contaminant_python(text)  # the same normalisation and grams as get_train_overlap's lookups
    assert {" ".join(g) for g in index.grams if len(g) == 13} == janitor.dirt_ngrams


def test_bad_input(tmp_path, index, caplog):
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": broken\n' + json.dumps({"q": QUESTION}) + "\n")
    with caplog.at_level(logging.WARNING, decontam.log.name):
        report = scan(index, {"sft": [jsonl]})
    assert report.sources["sft"]["bad"] == 1 and report.found["sft"]["gsm8k"]["1"].line == 3
    assert f"{jsonl}:2: not JSON" in caplog.text

    with pytest.raises(MissingInputError, match="nope.jsonl"):
        scan(index, {"sft": [tmp_path / "nope.jsonl"]})
    broken = tmp_path / "broken.json"
    broken.write_text('[{"a": "x"}, {"b": "y"} {"c": 1}]')
    with pytest.raises(DecontaminationError, match="broken.json: record 3: '\\{' after a record"):
        scan(index, {"sft": [broken]})
    broken.write_text('[{"a": "x"}, {"b": ')
    with pytest.raises(DecontaminationError, match="record 2: malformed JSON"):
        scan(index, {"sft": [broken]})
    broken.write_text('{"a": "x"}')
    with pytest.raises(DecontaminationError, match="record 1: the file starts with"):
        scan(index, {"sft": [broken]})
    with pytest.raises(ValueError, match="n=8"):
        scan(index, {}, n=8)


def test_json_array_streams_across_chunks(tmp_path, index, monkeypatch):
    records = [{"instruction": f"Q{i}", "n": 12345678901234 * i, "input": "", "output": [1.5, None, True, "x" * i]} for i in range(30)]
    records[21]["output"] = QUESTION
    path = tmp_path / "data.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\ufeff" + json.dumps(records, indent=2) + "\n")
    monkeypatch.setattr(decontam, "JSON_CHUNK", 7)  # every record and number straddles a chunk boundary
    with gzip.open(path, "rb") as f:
        seen = list(decontam._json_array(f, str(path), {"bytes": 0}))
    assert seen == records
    report = scan(index, {"sft": [path]})
    assert report.sources["sft"]["texts"] == 30 and report.found["sft"]["gsm8k"]["1"].line == 22
