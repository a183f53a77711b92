"""Document filters of the preprocess chain: Gutenberg boilerplate, PII, length, Gopher quality and repetition.

    lines = strip_gutenberg(lines, report)           # a text file's lines, header and footer gone
    text, matches = PiiScrubber(cfg.pii).scrub(text)  # {"email": 1, "phone": 0, "ip": 2}
    reason = gopher_quality(text, cfg.gopher)        # None, or the first rule the document fails
    reason = gopher_repetition(text, cfg.repetition)

Each filter returns the name of the first rule a document fails (a config key), or None when it passes, so
that the stage can count every rule separately. The Gopher rules follow Rae et al. 2021 ("Scaling Language
Models", appendix A.1.1 and table A1); where the paper leaves a detail open, the choice is stated below.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from lmcore.config import GopherQualityConfig, PiiConfig, RepetitionConfig

# ---------------------------------------------------------------------------------------------- Gutenberg

# The header ends with the START line (or, in files from before ~2000, with the end of the licence: "*END*THE
# SMALL PRINT! ..."); the footer starts with "End of (the) Project Gutenberg's/EBook ..." or the END line.
_GUTENBERG_START = re.compile(
    r"^\s*(?:\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG|\*END\*\s*THE SMALL PRINT)", re.IGNORECASE
)
_GUTENBERG_END = re.compile(
    r"^\s*(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the |this )?Project Gutenberg)", re.IGNORECASE
)
_GUTENBERG_HINT = re.compile(r"project gutenberg|\*end\*\s*the small print", re.IGNORECASE)
# The START line is searched for in the first lines only: the header is a few dozen lines (a few hundred
# for the old licence), and a body that quotes the marker later is left alone.
GUTENBERG_HEADER_LINES = 1000
_MARKER_CONTINUATION_LINES = 3  # "*** START OF THIS PROJECT GUTENBERG EBOOK\nTHE STRANGE CASE ... ***"


@dataclass
class GutenbergReport:
    files_stripped: int = 0
    bytes_removed: int = 0  # UTF-8 bytes of the dropped lines, newlines included


def _nbytes(line: str) -> int:
    return len(line.encode("utf-8", "surrogatepass")) + 1


def strip_gutenberg(lines: Iterable[str], report: GutenbergReport) -> Iterator[str]:
    """Drop Project Gutenberg's header (through the START line) and footer (from the END line on).

    Streams: only the first GUTENBERG_HEADER_LINES lines are held, to find the last START marker among them.
    A file with neither marker passes through unchanged. `report` is updated once the lines are consumed.
    """
    it = iter(lines)
    head = list(islice(it, GUTENBERG_HEADER_LINES))
    removed, stripped = 0, False
    start = next((i for i in range(len(head) - 1, -1, -1) if _GUTENBERG_START.match(head[i])), None)
    if start is not None:
        end = start
        # "*** START OF THIS PROJECT GUTENBERG EBOOK\nTHE STRANGE CASE ... ***": the marker ends with "***".
        if "START" in head[start].upper() and not head[start].rstrip().endswith("***"):
            for j in range(start + 1, min(start + 1 + _MARKER_CONTINUATION_LINES, len(head))):
                if head[j].rstrip().endswith("***"):
                    end = j
                    break
        removed += sum(map(_nbytes, head[: end + 1]))
        del head[: end + 1]
        stripped = True
    try:
        body = iter(head)
        for source in (body, it):
            for line in source:
                if _GUTENBERG_END.match(line):
                    removed += _nbytes(line) + sum(map(_nbytes, body)) + sum(map(_nbytes, it))
                    stripped = True
                    return
                yield line
    finally:
        report.files_stripped += stripped
        report.bytes_removed += removed


def strip_gutenberg_text(text: str, report: GutenbergReport) -> str:
    """`strip_gutenberg` on one string (a record's text); a text that never names Project Gutenberg is returned as is."""
    if not _GUTENBERG_HINT.search(text):
        return text
    return "\n".join(strip_gutenberg(text.split("\n"), report))


# ---------------------------------------------------------------------------------------------------- PII

PII_KINDS = ("email", "phone", "ip")

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
# Phone numbers need the shape of one, so that counts, years, dates, prices and ISBNs are left alone:
# - North American: (555) 123-4567, 555-123-4567, 555.123.4567, +1 555 123 4567 (3-3-4 digits, with separators);
# - international: a leading "+", a country code and 2 to 5 more groups, 8 to 15 digits in all (checked below).
_PHONE = re.compile(
    r"(?<![\w+.\-/])(?:"
    r"(?:\+?1[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[.-])\d{3}[.-]\d{4}"
    r"|(?:\+1[ ])\d{3}[ ]\d{3}[ ]\d{4}"
    r"|\+\d{1,3}(?:[ .-]?\(\d{1,4}\)|[ .-]\d{1,4}){2,5}"
    r")(?![\w\-/]|[.,]\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_ADDRESS = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV4 = re.compile(rf"(?<![\w.]){_IPV4_ADDRESS}(?![\w]|\.\d)")
_H = r"[0-9A-Fa-f]{1,4}"
_IPV6 = re.compile(
    r"(?<![\w:.])(?:"
    # an IPv4 address in its last 32 bits (::ffff:192.0.2.128, 64:ff9b::192.0.2.33): first, to take it whole
    rf"(?:(?:{_H}:){{6}}|::(?:{_H}:){{0,5}}|(?:{_H}:){{1,5}}:(?:{_H}:){{0,4}}){_IPV4_ADDRESS}"
    rf"|(?:{_H}:){{7}}{_H}"
    rf"|(?:{_H}:){{1,6}}:{_H}(?::{_H}){{0,5}}"  # compressed: "::" somewhere inside
    rf"|(?:{_H}:){{2,7}}:"  # trailing "::"
    rf"|::{_H}(?::{_H}){{0,6}}"  # leading "::"
    r")(?![\w:]|\.\d)"
)


class PiiScrubber:
    """Replace e-mail addresses, phone numbers and IP addresses (v4 with valid octets, v6) by placeholders."""

    def __init__(self, cfg: PiiConfig):
        self.cfg = cfg
        self._emails = (_EMAIL, cfg.email_replacement.replace("\\", "\\\\")) if cfg.emails else None
        self._ips = cfg.ip_replacement.replace("\\", "\\\\") if cfg.ips else None
        self._phones = cfg.phone_replacement if cfg.phones else None

    @property
    def enabled(self) -> bool:
        return bool(self._emails or self._ips is not None or self._phones is not None)

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with each match replaced, and the number of matches per kind."""
        counts = dict.fromkeys(PII_KINDS, 0)
        if self._emails and "@" in text:
            text, counts["email"] = self._emails[0].subn(self._emails[1], text)
        if self._ips is not None:
            if "::" in text or text.count(":") >= 7:
                text, n = _IPV6.subn(self._ips, text)
                counts["ip"] += n
            if "." in text:
                text, n = _IPV4.subn(self._ips, text)
                counts["ip"] += n
        if self._phones is not None:
            text, counts["phone"] = _PHONE.subn(self._phone, text)
        return text, counts

    def _phone(self, m: re.Match) -> str:
        digits = sum(c.isdigit() for c in m.group(0))
        return self._phones if 10 <= digits <= 15 or (m.group(0).startswith("+") and digits >= 8) else m.group(0)


# ------------------------------------------------------------------------------------------------- length

LENGTH_RULES = ("empty", "min_chars", "max_chars", "max_line_chars")


def length_reason(text: str, min_chars: int, max_chars: int | None, max_line_chars: int | None) -> str | None:
    """"empty", "min_chars", "max_chars" or "max_line_chars" (a line longer than that), or None."""
    n = len(text)
    if n == 0:
        return "empty"
    if n < min_chars:
        return "min_chars"
    if max_chars is not None and n > max_chars:
        return "max_chars"
    if max_line_chars is not None and n > max_line_chars and max(map(len, text.split("\n"))) > max_line_chars:
        return "max_line_chars"
    return None


# ------------------------------------------------------------------------------------------ Gopher quality

GOPHER_RULES = (
    "min_words",
    "max_words",
    "min_mean_word_length",
    "max_mean_word_length",
    "max_symbol_word_ratio",
    "max_bullet_lines_ratio",
    "max_ellipsis_lines_ratio",
    "min_alpha_words_ratio",
    "min_stop_words",
)
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")  # the paper's list
# Words are runs of letters and digits, with inner apostrophes ("don't", "o'er"): punctuation is not a word
# and does not lengthen one. Tokens for the alphabetic-word ratio are whitespace-separated, as in the paper.
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_ALPHA_TOKEN = re.compile(r"(?<!\S)\S*?[^\W\d_]\S*")
_STOP_WORD = re.compile(r"(?<![^\W_])(?:" + "|".join(STOP_WORDS) + r")(?![^\W_]|['’][^\W_])", re.IGNORECASE)
_BULLETS = ("•", "-", "*", "‣", "◦", "●", "▪")
_ELLIPSES = ("...", "…")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def gopher_quality(text: str, cfg: GopherQualityConfig, words: list[str] | None = None) -> str | None:
    """The first of the Gopher quality rules (GOPHER_RULES, in that order) that `text` fails, or None.

    - min_words / max_words: the number of words;
    - min/max_mean_word_length: their mean length in characters;
    - max_symbol_word_ratio: "#" characters, and ellipses ("..." or "…"), each per word;
    - max_bullet_lines_ratio: lines starting with a bullet (•, -, *, ...), per line;
    - max_ellipsis_lines_ratio: lines ending with an ellipsis, per line;
    - min_alpha_words_ratio: whitespace-separated tokens holding a letter, per token;
    - min_stop_words: occurrences of the eight English stop words (the, be, to, of, and, that, have, with).
    """
    if words is None:
        words = words_of(text)
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return "min_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return "max_words"
    if n:
        mean = sum(map(len, words)) / n
        if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
            return "min_mean_word_length"
        if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
            return "max_mean_word_length"
        if cfg.max_symbol_word_ratio is not None:
            symbols = max(text.count("#"), text.count("...") + text.count("…"))
            if symbols / n > cfg.max_symbol_word_ratio:
                return "max_symbol_word_ratio"
    if cfg.max_bullet_lines_ratio is not None or cfg.max_ellipsis_lines_ratio is not None:
        lines = [line.strip() for line in text.split("\n")]
        lines = [line for line in lines if line] or [""]
        if cfg.max_bullet_lines_ratio is not None:
            if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines_ratio:
                return "max_bullet_lines_ratio"
        if cfg.max_ellipsis_lines_ratio is not None:
            if sum(line.endswith(_ELLIPSES) for line in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
                return "max_ellipsis_lines_ratio"
    if cfg.min_alpha_words_ratio is not None:
        tokens = len(text.split())
        if tokens and len(_ALPHA_TOKEN.findall(text)) / tokens < cfg.min_alpha_words_ratio:
            return "min_alpha_words_ratio"
    if cfg.min_stop_words is not None and cfg.min_stop_words > 0:
        found = 0
        for _ in _STOP_WORD.finditer(text):
            found += 1
            if found >= cfg.min_stop_words:
                break
        else:
            return "min_stop_words"
    return None


# --------------------------------------------------------------------------------------- Gopher repetition

_PARAGRAPH_BREAK = re.compile(r"\n{2,}")


def repetition_rules(cfg: RepetitionConfig) -> tuple[str, ...]:
    """The rule names `gopher_repetition` can return for this config, in the order they are checked."""
    return (
        "max_duplicate_paragraph_fraction",
        "max_duplicate_paragraph_char_fraction",
        "max_duplicate_line_fraction",
        "max_duplicate_line_char_fraction",
        *(f"max_top_ngram_char_fraction.{n}" for n in sorted(cfg.max_top_ngram_char_fraction)),
        *(f"max_duplicate_ngram_char_fraction.{n}" for n in sorted(cfg.max_duplicate_ngram_char_fraction)),
    )


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier item, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters (words and the spaces between them) of every occurrence of the most frequent n-gram, when
    it occurs more than once; 0 otherwise (a single occurrence is not repetition)."""
    grams = _ngrams(words, n)
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    return (sum(map(len, gram)) + n - 1) * count if count > 1 else 0


def duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by an n-gram that already occurred earlier in the document.

    Each word counts once however many duplicate n-grams cover it, so the value can only fall as n grows
    (a repeated (n+1)-gram holds two repeated n-grams), which lets the caller stop early.
    """
    grams = _ngrams(words, n)
    if len(set(grams)) == len(grams):
        return 0
    seen: set[tuple[str, ...]] = set()
    chars = covered_until = 0
    for i, gram in enumerate(grams):
        if gram in seen:
            start = max(i, covered_until)
            chars += sum(map(len, words[start : i + n]))
            covered_until = i + n
        else:
            seen.add(gram)
    return chars


def gopher_repetition(text: str, cfg: RepetitionConfig, words: list[str] | None = None) -> str | None:
    """The first Gopher repetition rule (see `repetition_rules`) that `text` fails, or None.

    Paragraphs are separated by blank lines, lines by newlines (blank ones ignored); fractions of
    characters are of len(text). Duplicates are items equal to an earlier one.
    """
    size = len(text)
    if size == 0:
        return None
    units = (
        ("paragraph", lambda: _PARAGRAPH_BREAK.split(text.strip())),
        ("line", lambda: [line for line in text.split("\n") if line.strip()]),
    )
    for unit, split in units:
        max_count = getattr(cfg, f"max_duplicate_{unit}_fraction")
        max_chars = getattr(cfg, f"max_duplicate_{unit}_char_fraction")
        if max_count is None and max_chars is None:
            continue
        parts = split()
        if len(parts) > 1:
            count, chars = _duplicates(parts)
            if max_count is not None and count / len(parts) > max_count:
                return f"max_duplicate_{unit}_fraction"
            if max_chars is not None and chars / size > max_chars:
                return f"max_duplicate_{unit}_char_fraction"
    if not cfg.max_top_ngram_char_fraction and not cfg.max_duplicate_ngram_char_fraction:
        return None
    if words is None:
        words = words_of(text)
    for n in sorted(cfg.max_top_ngram_char_fraction):
        if top_ngram_chars(words, n) / size > cfg.max_top_ngram_char_fraction[n]:
            return f"max_top_ngram_char_fraction.{n}"
    dup = sorted(cfg.max_duplicate_ngram_char_fraction.items())
    for i, (n, limit) in enumerate(dup):
        fraction = duplicate_ngram_chars(words, n) / size
        if fraction > limit:
            return f"max_duplicate_ngram_char_fraction.{n}"
        # Coverage only falls as n grows: below every later limit, no later rule can fail.
        if all(fraction <= later for _, later in dup[i + 1 :]):
            break
    return None
