"""The GPT-2 byte-level BPE tokenizer (tiktoken), buildable offline from a local ranks file.

    enc = get_encoding("gpt2", "../shared/tokenizers/gpt2.tiktoken")
    enc.encode_ordinary("Hello world")  # [15496, 995]
    eot_token(enc)                      # 50256

Where the ranks come from, in order: the `ranks_file` argument, the `LMCORE_TIKTOKEN_FILE`
environment variable, else tiktoken's own loader (which downloads on first use and fails offline).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

from lmcore.errors import InputError, MissingInputError, TransientError
from lmcore.io import sha256_file

if TYPE_CHECKING:
    from lmcore.config import TokenizeConfig

log = logging.getLogger(__name__)

RANKS_ENV = "LMCORE_TIKTOKEN_FILE"
EOT = "<|endoftext|>"

# GPT-2 (= tiktoken's r50k_base): 50,256 mergeable ranks, then <|endoftext|> as id 50256.
GPT2_N_RANKS = 50256
GPT2_N_VOCAB = 50257
GPT2_EOT_ID = 50256
# sha256 of the canonical gpt2/r50k_base ranks file; tiktoken pins the same hash for r50k_base.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def get_encoding(name: str = "gpt2", ranks_file: str | Path | None = None) -> tiktoken.Encoding:
    """The tokenizer called `name`, built from a local ranks file when one is given or configured.

    Args:
        name: the encoding; only "gpt2" can be built from a local ranks file.
        ranks_file: a tiktoken `.tiktoken` ranks file; when None, `$LMCORE_TIKTOKEN_FILE` if set and
            non-empty, else `tiktoken.get_encoding(name)` (online on first use).

    Returns:
        The encoding; the same object for the same name and resolved ranks path.
    """
    if not name:
        raise InputError(
            "no tokenizer named (a model folder's config.json says \"tokenizer\": null, e.g. a Hugging Face import "
            "whose vocabulary is not GPT-2's); lmcore encodes text with tiktoken encodings only, such as 'gpt2'"
        )
    if ranks_file is None or str(ranks_file) == "":
        ranks_file = os.environ.get(RANKS_ENV) or None
    if ranks_file is None:
        try:
            return tiktoken.get_encoding(name)
        except OSError as err:  # requests' and urllib's network errors are OSErrors
            raise TransientError(
                f"tiktoken could not download the {name!r} ranks ({type(err).__name__}); offline, point "
                f"${RANKS_ENV} (or tokenize.ranks_file) at a local .tiktoken file"
            ) from err
    if name != "gpt2":
        raise InputError(f"encoding {name!r} cannot be built from a local ranks file; only 'gpt2' can")
    path = Path(ranks_file).expanduser()
    if not path.is_file():
        raise MissingInputError(
            f"tiktoken ranks file not found: {path} (given as ranks_file or ${RANKS_ENV}; "
            f"point it at a gpt2.tiktoken file, or unset both to let tiktoken download)"
        )
    return _local_gpt2(name, str(path.resolve()))


@functools.lru_cache(maxsize=8)
def _local_gpt2(name: str, path: str) -> tiktoken.Encoding:
    digest = sha256_file(path)
    # tiktoken caches every file it reads under a key made of the path alone (in $TIKTOKEN_CACHE_DIR
    # or a temp folder) and, without a hash, would serve a stale copy after the file changed.
    # Passing the file's own hash makes it check the cached copy against the file.
    ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=digest)
    if len(ranks) != GPT2_N_RANKS:
        raise InputError(f"{path}: {len(ranks)} BPE ranks, expected {GPT2_N_RANKS} for gpt2; not a GPT-2 ranks file")
    if set(ranks.values()) != set(range(GPT2_N_RANKS)):
        raise InputError(f"{path}: BPE ranks are not exactly 0..{GPT2_N_RANKS - 1}; not a GPT-2 ranks file")
    if digest != GPT2_RANKS_SHA256:
        # Same number of ranks but other bytes (reordered lines, other line endings, other merges).
        log.warning("%s: sha256 %s differs from the canonical GPT-2 ranks file (%s)", path, digest, GPT2_RANKS_SHA256)
    log.info("built tokenizer %s from %s", name, path)
    return tiktoken.Encoding(
        name=name,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_N_VOCAB,
    )


def configured_ranks_file(ranks_file: str | None, root: str | Path) -> str | None:
    """The local ranks file a run uses: `tokenize.ranks_file` (relative to the project root), else
    $LMCORE_TIKTOKEN_FILE, else None (tiktoken's own loader)."""
    if ranks_file:
        path = Path(ranks_file)
        return str(path if path.is_absolute() else Path(root) / path)
    return os.environ.get(RANKS_ENV) or None


def encoding_for(cfg: TokenizeConfig, root: str | Path) -> tiktoken.Encoding:
    """The encoding a run's `tokenize` section names, from its local ranks file when there is one."""
    return get_encoding(cfg.encoding, configured_ranks_file(cfg.ranks_file, root))


def eot_token(enc: tiktoken.Encoding) -> int:
    """The id of `<|endoftext|>`, the separator appended after every document."""
    return enc.encode_single_token(EOT)
