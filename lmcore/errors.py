"""Two kinds of failure, told apart once for every stage, the CLI and the orchestration layer.

- `InputError`: the input is wrong (a params key, a data file, an archive member, a model file). Running again
  cannot help, so nothing retries it; the command line prints its one-line message and exits with status 2.
  Every library error that names a bad file, line, member or key derives from it (`ParamsError`, `CollectError`,
  `PreprocessError`, `DataError`, `CheckpointError`, ...).
- `TransientError`: something outside that may answer next time (a connection refused, a timeout, HTTP 429 or
  5xx). Retried with backoff where it happens, and once more by the orchestration layer.

`is_transient` classifies any exception, including the standard library's network errors, by walking its
cause chain; everything else (a bug, an `InputError`) is not worth a retry.
"""

from __future__ import annotations

import http.client
import re
import urllib.error

# HTTP statuses worth another attempt: timeout, too many requests, and server-side failures.
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class InputError(ValueError):
    """Bad input: the message names the file, line, member or key. Deterministic: never retried."""


class TransientError(RuntimeError):
    """A failure outside lmcore that may not happen next time (network, a busy server)."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that is not there (a model folder, a stage's output not made yet).

    Still a FileNotFoundError, so callers that catch that keep working.
    """


class NotRegisteredError(LookupError, ValueError):
    """A model registry URI (`models:/name@alias`) that names no registered model, alias or version (yet).

    Not an InputError: a run asked to continue the champion before there is one starts otherwise."""


def one_line(text: object) -> str:
    """`text` on one line: line breaks (and the indentation after them) become "; ", for one-line messages."""
    return re.sub(r"\s*[\r\n]+\s*", "; ", str(text).strip())


def validation_summary(err: Exception, names: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError on one line: "n_embd: Input should be a valid integer (got 'x'); bogus: ...".

    names: what the file being read calls each field ({"context_length": "max_position_embeddings"}), so the
    message names the key the user can find there, in the key and in the text of a whole-model error.
    """
    names = names or {}
    rename = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None
    parts = []
    for e in err.errors():  # type: ignore[attr-defined]
        key = ".".join(names.get(str(p), str(p)) for p in e["loc"]) or "<root>"
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or "input" not in e else f" (got {got!r})"
        msg = rename.sub(lambda m: names[m.group(1)], e["msg"]) if rename else e["msg"]
        parts.append(f"{key}: {msg}{shown}")
    return one_line("; ".join(parts))


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, InputError):
        return False
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRYABLE_HTTP
    if isinstance(exc, urllib.error.URLError):  # DNS and connection failures
        return True
    # TimeoutError and ConnectionError (refused, reset, aborted) are OSErrors; plain OSErrors (a missing file,
    # no permission) are not transient.
    return isinstance(exc, (TimeoutError, ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead))


def _causes(exc: BaseException | None):
    """`exc`, the exception it was raised from, and so on down its `__cause__` chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def is_transient(exc: BaseException) -> bool:
    """Whether `exc`, or an exception in its cause chain, is worth retrying. An InputError never is."""
    for cause in _causes(exc):
        if isinstance(cause, InputError):
            return False
        if _is_transient_one(cause):
            return True
    return False


def is_input_error(exc: BaseException) -> bool:
    """Whether `exc` is bad input (an InputError, or caused by one): one line for the user, no retry."""
    return any(isinstance(cause, InputError) for cause in _causes(exc))
