"""lmcore.redact: credentials in URLs are masked wherever they sit in a string; everything else stays as it was."""

from __future__ import annotations

import pytest

from lmcore.redact import redact, redact_tree


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://user:pass@host/x", "https://***@host/x"),
        ("https://user:p@ss@host:8443/x?a=1", "https://***@host:8443/x?a=1"),  # a raw "@" in the password
        ("https://ghp_0123456789@github.com/o/r.git", "https://***@github.com/o/r.git"),  # a token as the user
        ("postgresql://mlflow:${PGPASSWORD}@db.internal:5432/mlflow", "postgresql://***@db.internal:5432/mlflow"),
        ("fetched git+https://ci:s3cret@git.example.com/r.git, then https://b.example/x",
         "fetched git+https://***@git.example.com/r.git, then https://b.example/x"),
        ("https://h/v1?api_key=sk-123&model=m#top", "https://h/v1?api_key=***&model=m#top"),
        ("s3://b/k?X-Amz-Credential=AK%2F1&X-Amz-Date=1&X-Amz-Signature=ff",
         "s3://b/k?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***"),
        ("https://acct.blob.core.windows.net/c/f?sv=2022&sig=abc%3D", "https://acct.blob.core.windows.net/c/f?sv=2022&sig=***"),
        ("['https://a:b@h/x?access_token=t']", "['https://***@h/x?access_token=***']"),
    ],
)
def test_credentials_are_masked(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # twice changes nothing


@pytest.mark.parametrize(
    "text",
    [
        "models:/lmcore-base@champion", "runs:/0123abcd/model", "sqlite:////tmp/a@b/mlflow.db", "https://h/a@b/c",
        "http://127.0.0.1:5000/#/compare-runs?runs=[\"a\",\"b\"]", "mail me at a@b.example", "seed=1337",
        "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?revision=main", "",
    ],
)
def test_everything_else_is_left_alone(text):
    assert redact(text) == text


def test_redact_tree_masks_every_string_and_keeps_the_rest():
    tree = {"url": "https://u:p@h/x", "n": 3, "ok": None, "files": [{"url": "https://h/f?token=t"}, ("a", 1.5)]}
    assert redact_tree(tree) == {"url": "https://***@h/x", "n": 3, "ok": None,
                                 "files": [{"url": "https://h/f?token=***"}, ("a", 1.5)]}
