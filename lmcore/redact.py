"""Secrets out of what is logged or printed: credentials in URLs, wherever they sit in a string.

    redact("git+https://ci:s3cret@git.example.com/r.git and https://h/x?sig=abc&v=2")
    # 'git+https://***@git.example.com/r.git and https://h/x?sig=***&v=2'

The whole userinfo of a URL goes (`scheme://user:password@host` -> `scheme://***@host`), the user name too: a token
is often sent as the user (`https://<token>@github.com/...`, `https://<token>:x-oauth-basic@...`). So does the value
of every query parameter whose name holds token, key, secret, passw, pwd, sig or credential (`access_token`,
`api_key`, `X-Amz-Signature`, `X-Amz-Credential`, Azure's `sig`). `models:/name@alias` and `runs:/...` are not URLs
with an authority (one slash) and stay as they are. Redacting twice changes nothing.

MLflow params and tags (tasks.tracking), `lmcore lineage` (tasks.lineage) and the judge's reports (lmcore.judge)
go through `redact`; the values themselves, where the code needs them, are untouched.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://userinfo@ : userinfo runs to the authority's last "@" (a raw "@" in a password included)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#\"'<>]*@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;][^=&;#\s\"'<>]*(?:token|key|secret|passw|pwd|sig|credential)[^=&;#\s\"'<>]*=)[^&;#\s\"'<>]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it masked (see the module docstring)."""
    if "@" in text:
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if "=" in text:
        text = _SECRET_QUERY.sub(lambda m: f"{m['name']}{MASK}", text)
    return text


def redact_tree(value: Any) -> Any:
    """`redact` on every string in nested dicts, lists and tuples (keys included); other values as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value
