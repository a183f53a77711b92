"""Filters: Gutenberg boilerplate on real mirror files, PII, length, and each Gopher rule at its threshold."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from lmcore.config import GopherQualityConfig, PiiConfig, RepetitionConfig
from lmcore.data.filters import (
    GOPHER_RULES,
    GUTENBERG_HEADER_LINES,
    GutenbergReport,
    PiiScrubber,
    duplicate_ngram_chars,
    gopher_quality,
    gopher_repetition,
    length_reason,
    repetition_rules,
    strip_gutenberg,
    strip_gutenberg_text,
    words_of,
)
from tests.conftest import SHARED

GUTENBERG = SHARED / "data" / "corpus" / "gutenberg"
BOOKS = sorted(GUTENBERG.glob("pg*.txt"))


def book_lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").lstrip("\ufeff").replace("\r\n", "\n").split("\n")


def nbytes(lines: list[str]) -> int:
    return sum(len(line.encode()) + 1 for line in lines)


# ---------------------------------------------------------------------------------------------- Gutenberg


def test_gutenberg_mirror_books_lose_header_and_footer_only():
    assert len(BOOKS) == 25, f"the mirror's Gutenberg books: {GUTENBERG}"
    for path in BOOKS:
        lines = book_lines(path)
        report = GutenbergReport()
        kept = list(strip_gutenberg(lines, report))
        body = "\n".join(kept)
        assert report.files_stripped == 1, path.name
        assert report.bytes_removed == nbytes(lines) - nbytes(kept), path.name
        assert 19_000 < report.bytes_removed < 22_000, path.name  # ~1 kB header, ~18 kB licence
        for marker in ("START OF THE PROJECT", "START OF THIS PROJECT", "END OF THE PROJECT", "END OF THIS PROJECT",
                       "Project Gutenberg-tm", "Project Gutenberg License", "Release Date", "gutenberg.org/license"):
            assert marker.lower() not in body.lower(), (path.name, marker)
        # What is left is the book, start to end: a contiguous run of the file's lines.
        assert "\n".join(kept) in "\n".join(lines), path.name


@pytest.mark.parametrize(
    ("name", "first", "last"),
    [
        ("pg11_alices_adventures_in_wonderland.txt", "ALICE’S ADVENTURES IN WONDERLAND", "THE END"),
        ("pg1342_pride_and_prejudice.txt", "[Illustration:", "TOOKS COURT, CHANCERY LANE, LONDON."),  # indented END
        ("pg28054_the_brothers_karamazov.txt", "The Brothers Karamazov", "9 Gogol is meant."),  # "***START OF"
        # "*** START OF THIS PROJECT GUTENBERG EBOOK" and its "THE STRANGE CASE ... ***" on the next line
        ("pg43_strange_case_of_dr_jekyll_and_mr_hyde.txt", "Produced by David Widger",
         "confession, I bring the life of that unhappy Henry Jekyll to an end."),
        ("pg2701_moby_dick.txt", "Produced by Daniel Lazarus, Jonesey, and David Widger",
         "children, only found another orphan."),
    ],
)
def test_gutenberg_body_starts_and_ends_where_the_book_does(name, first, last):
    kept = [line.strip() for line in strip_gutenberg(book_lines(GUTENBERG / name), GutenbergReport()) if line.strip()]
    assert kept[0] == first and kept[-1] == last


def test_gutenberg_old_small_print_header_and_end_of_ebook_footer():
    text = "\n".join([
        "The Project Gutenberg Etext of An Old Book",
        "**Welcome To The World of Free Plain Vanilla Electronic Texts**",
        "some licence text",
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*",
        "",
        "Chapter 1. It began.",
        "The end of the story.",
        "",
        "End of the Project Gutenberg EBook of An Old Book",
        "more footer",
    ])
    report = GutenbergReport()
    assert strip_gutenberg_text(text, report) == "\nChapter 1. It began.\nThe end of the story.\n"
    assert report.files_stripped == 1
    assert report.bytes_removed == len(text.encode()) + 1 - len("\nChapter 1. It began.\nThe end of the story.\n") - 1


def test_text_without_gutenberg_markers_is_untouched():
    lines = ["First Citizen:", "Before we proceed any further, hear me speak.", "", "All:", "Speak, speak."]
    report = GutenbergReport()
    assert list(strip_gutenberg(lines, report)) == lines
    assert report == GutenbergReport(0, 0)
    assert strip_gutenberg_text("no project here", report) == "no project here"


def test_start_marker_is_looked_for_in_the_header_only():
    body = [f"line {i}" for i in range(GUTENBERG_HEADER_LINES)]
    late = body + ["*** START OF THE PROJECT GUTENBERG EBOOK QUOTED ***", "after"]
    assert list(strip_gutenberg(late, GutenbergReport())) == late


# ---------------------------------------------------------------------------------------------------- PII

PII_POSITIVES = [
    ("Write to jane.doe+news@mail.example.co.uk today.", "Write to <EMAIL> today.", "email"),
    ("Contact: J_Smith@example.org.", "Contact: <EMAIL>.", "email"),
    ("Call (555) 123-4567 now", "Call <PHONE> now", "phone"),
    ("Call 555-123-4567 or 555.987.6543.", "Call <PHONE> or <PHONE>.", "phone"),
    ("US: +1 555 123 4567; UK: +44 20 7946 0958", "US: <PHONE>; UK: <PHONE>", "phone"),
    ("Paris +33 1 23 45 67 89.", "Paris <PHONE>.", "phone"),
    ("server 192.168.0.1 and 8.8.8.8, gateway 255.255.255.0", "server <IP> and <IP>, gateway <IP>", "ip"),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 ok", "v6 <IP> ok", "ip"),
    ("short fe80::1ff:fe23:4567:890a and ::1 and 2001:db8::", "short <IP> and <IP> and <IP>", "ip"),
    ("mapped ::ffff:192.0.2.128 and 64:ff9b::192.0.2.33; link fe80::1.", "mapped <IP> and <IP>; link <IP>.", "ip"),
]

PII_NEGATIVES = [
    "In 1984 there were 12,345,678 people and 1,000,000 sheep.",
    "On 2021-05-12 at 10:30:45, or 12/05/2021, or 05.12.2021.",
    "ISBN 978-3-16-148410-0, price $1,234.56, pi 3.14159265358979.",
    "Call 911 or dial 555-1234; extension 1234; zip 02139; PO Box 12345.",
    "Version 3.10.4 of the code; chapter 1.2.3; ratio 3:2; John 3:16.",
    "Not addresses: 999.1.1.1, 10.0.0.256, 1.2.3, 256.256.256.256.",
    "An email-like @handle and user@localhost and a@b.",
    "Scores 12-34-5678 and 1234-5678 and 2020-2021 and 100-200-300.",
    "Times 12:30:45:67 and the year 1066.",
]


@pytest.mark.parametrize(("text", "expected", "kind"), PII_POSITIVES)
def test_pii_positives(text, expected, kind):
    scrubbed, counts = PiiScrubber(PiiConfig()).scrub(text)
    assert scrubbed == expected
    assert counts[kind] == expected.count(f"<{kind.upper()}>") and sum(counts.values()) == counts[kind]


@pytest.mark.parametrize("text", PII_NEGATIVES)
def test_pii_leaves_numbers_dates_and_versions_alone(text):
    scrubbed, counts = PiiScrubber(PiiConfig()).scrub(text)
    assert scrubbed == text and counts == {"email": 0, "phone": 0, "ip": 0}


def test_pii_kinds_switch_off_and_placeholders_are_literal():
    text = "mail a@example.com, call 555-123-4567, ping 10.0.0.1"
    scrubber = PiiScrubber(PiiConfig(phones=False, ips=False, email_replacement=r"[\1 removed]"))
    assert scrubber.scrub(text) == ("mail [\\1 removed], call 555-123-4567, ping 10.0.0.1", {"email": 1, "phone": 0, "ip": 0})
    assert not PiiScrubber(PiiConfig(emails=False, phones=False, ips=False)).enabled


def test_pii_no_false_positive_on_real_books():
    # Two whole novels: numbers, dates, chapter numbers, money, but no phone or IP.
    scrubber = PiiScrubber(PiiConfig())
    for name in ("pg2701_moby_dick.txt", "pg1400_great_expectations.txt"):
        body = "\n".join(strip_gutenberg(book_lines(GUTENBERG / name), GutenbergReport()))
        _, counts = scrubber.scrub(body)
        assert counts == {"email": 0, "phone": 0, "ip": 0}, name


# ------------------------------------------------------------------------------------------------- length


def test_length_rules():
    assert length_reason("", 0, None, None) == "empty"
    assert length_reason("x" * 31, 32, None, None) == "min_chars"
    assert length_reason("x" * 32, 32, None, None) is None
    assert length_reason("x" * 101, 0, 100, None) == "max_chars"
    assert length_reason("x" * 100, 0, 100, None) is None
    line_ok = "y" * 50 + "\n" + "z" * 50
    assert length_reason(line_ok, 0, None, 50) is None
    assert length_reason(line_ok + "z", 0, None, 50) == "max_line_chars"


# ------------------------------------------------------------------------------------------------- Gopher


def only(**rule) -> GopherQualityConfig:
    """Every Gopher quality rule off but the given one."""
    off = {name: None for name in GOPHER_RULES}
    return GopherQualityConfig(**{**off, **rule})


def words(n: int, word: str = "word") -> str:
    return " ".join([word] * n)


@pytest.mark.parametrize(
    ("rule", "value", "passes", "fails"),
    [
        ("min_words", 50, words(50), words(49)),
        ("max_words", 10, words(10), words(11)),
        ("min_mean_word_length", 3.0, "abc abc", "ab abc"),  # mean 3.0 vs 2.5
        ("max_mean_word_length", 10.0, "abcdefghij abcdefghij", "abcdefghijk abcdefghij"),  # 10.0 vs 10.5
        ("max_symbol_word_ratio", 0.1, words(10) + " #", words(10) + " # #"),  # 1 vs 2 per 10 words
        ("max_symbol_word_ratio", 0.1, words(20) + " ... …", words(20) + " ... … ..."),  # ellipses
        ("max_bullet_lines_ratio", 0.9, "\n".join(["- item"] * 9 + ["text"]), "\n".join(["• item"] * 10)),
        ("max_ellipsis_lines_ratio", 0.3, "\n".join(["and so..."] * 3 + ["done."] * 7),
         "\n".join(["and so…"] * 4 + ["done."] * 6)),
        ("min_alpha_words_ratio", 0.8, words(8) + " 12 3.4", words(7) + " 12 3.4 --"),  # 8/10 vs 7/10
        ("min_stop_words", 2, "The cat and the dog", "The cat, theory, others"),  # 3 vs 1 ("theory" is not "the")
    ],
)
def test_each_gopher_quality_rule_at_its_threshold(rule, value, passes, fails):
    cfg = only(**{rule: value})
    assert gopher_quality(passes, cfg) is None
    assert gopher_quality(fails, cfg) == rule


def test_stop_word_threshold_exactly():
    cfg = only(min_stop_words=2)
    assert gopher_quality("to be or not", cfg) is None
    assert gopher_quality("to live or not", cfg) == "min_stop_words"


def test_first_failing_gopher_rule_is_the_reason():
    text = "## ## ## x"  # too few words, and too many hashes, and too short words
    assert gopher_quality(text, GopherQualityConfig()) == "min_words"
    assert gopher_quality(text, GopherQualityConfig(min_words=1)) == "min_mean_word_length"
    assert gopher_quality(text, GopherQualityConfig(min_words=1, min_mean_word_length=None)) == "max_symbol_word_ratio"


def test_paper_defaults_keep_a_real_paragraph():
    lines = book_lines(GUTENBERG / "pg1342_pride_and_prejudice.txt")
    text = "\n".join(lines)
    paragraph = next(p for p in text.split("\n\n") if "truth universally acknowledged" in p)
    long = paragraph + "\n\n" + next(p for p in text.split("\n\n") if len(p.split()) > 100)
    assert len(words_of(long)) >= 50
    assert gopher_quality(long, GopherQualityConfig()) is None
    assert gopher_repetition(long, RepetitionConfig()) is None


# --------------------------------------------------------------------------------------------- repetition


def rep_only(**rule) -> RepetitionConfig:
    off = dict(max_duplicate_line_fraction=None, max_duplicate_paragraph_fraction=None,
               max_duplicate_line_char_fraction=None, max_duplicate_paragraph_char_fraction=None,
               max_top_ngram_char_fraction={}, max_duplicate_ngram_char_fraction={})
    return RepetitionConfig(**{**off, **rule})


def unique_lines(n: int) -> list[str]:
    return [f"unique line number {i}" for i in range(n)]


@pytest.mark.parametrize(
    ("rule", "passes", "fails", "reason"),
    [
        # 10 lines, 3 (or 4) of them equal to an earlier one.
        (dict(max_duplicate_line_fraction=0.3), "\n".join(unique_lines(6) + ["same"] * 4),
         "\n".join(unique_lines(5) + ["same"] * 5), "max_duplicate_line_fraction"),
        (dict(max_duplicate_paragraph_fraction=0.3), "\n\n".join(unique_lines(6) + ["same"] * 4),
         "\n\n".join(unique_lines(5) + ["same"] * 5), "max_duplicate_paragraph_fraction"),
        # A 20-character line twice in 100 characters (20/100 = 0.2), or in 99.
        (dict(max_duplicate_line_char_fraction=0.2), "a" * 20 + "\n" + "b" * 58 + "\n" + "a" * 20,
         "a" * 20 + "\n" + "b" * 57 + "\n" + "a" * 20, "max_duplicate_line_char_fraction"),
        (dict(max_duplicate_paragraph_char_fraction=0.2), "a" * 20 + "\n\n" + "b" * 56 + "\n\n" + "a" * 20,
         "a" * 20 + "\n\n" + "b" * 55 + "\n\n" + "a" * 20, "max_duplicate_paragraph_char_fraction"),
        # "xx yy" twice: 10 characters in 50 (0.2) or 49.
        (dict(max_top_ngram_char_fraction={2: 0.2}), "xx yy " + "q" * 38 + " xx yy", "xx yy " + "q" * 37 + " xx yy",
         "max_top_ngram_char_fraction.2"),
        (dict(max_top_ngram_char_fraction={3: 0.18}), "x y z " + "q" * 38 + " x y z",  # 10/50 = 0.2 > 0.18
         None, "max_top_ngram_char_fraction.3"),
        # "a b c d e" again: its 5 letters in 34 characters (0.147) or 33 (0.152).
        (dict(max_duplicate_ngram_char_fraction={5: 0.15}), "a b c d e " + "q" * 14 + " a b c d e",
         "a b c d e " + "q" * 13 + " a b c d e", "max_duplicate_ngram_char_fraction.5"),
    ],
)
def test_each_repetition_rule_at_its_threshold(rule, passes, fails, reason):
    cfg = rep_only(**rule)
    if fails is None:  # one document, above the threshold
        assert gopher_repetition(passes, cfg) == reason
        return
    assert gopher_repetition(passes, cfg) is None
    assert gopher_repetition(fails, cfg) == reason


def test_duplicate_ngram_rules_checked_beyond_the_first():
    # A repeated 10-gram of one-letter words: 10 characters in 95 (0.105) passes n = 5..9 (0.15 .. 0.11)
    # and fails n = 10 (0.10).
    text = "a b c d e f g h i j " + "q" * 55 + " a b c d e f g h i j"
    assert len(text) == 95
    assert gopher_repetition(text, RepetitionConfig(max_top_ngram_char_fraction={})) == "max_duplicate_ngram_char_fraction.10"


def test_duplicate_ngram_coverage_only_falls_with_n():
    rng = random.Random(0)
    for _ in range(200):
        ws = [rng.choice(["a", "bb", "ccc", "dd", "e"]) for _ in range(rng.randint(0, 60))]
        values = [duplicate_ngram_chars(ws, n) for n in range(1, 12)]
        assert values == sorted(values, reverse=True)
        assert values[0] == sum(len(w) for i, w in enumerate(ws) if w in ws[:i])  # n=1: repeated words


def test_single_ngram_occurrence_is_not_repetition():
    # A two-word document is all one 2-gram; it occurs once, so it is not repeated.
    assert gopher_repetition("Speak, speak.", RepetitionConfig()) is None
    assert repetition_rules(RepetitionConfig())[-1] == "max_duplicate_ngram_char_fraction.10"


def test_repetition_rules_on_a_real_repetitive_paragraph():
    text = "Citizens:\nIt shall be so, it shall be so; let him away:\nHe's banish'd, and it shall be so."
    assert gopher_repetition(text, RepetitionConfig()) == "max_top_ngram_char_fraction.2"
    assert re.search("shall be", text)
