"""Expected failures (bad input, a transient failure out of retries) that this process's stage runs recorded in
full, by message: the command line shows each as one line naming the log with its traceback, and keeps Prefect's
copies of bad-input failures off the terminal. Imports nothing heavy: the CLI reads it on every failure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Failure:
    """Where the traceback is (None: a refusal before any stage ran, with nothing worth a traceback), and whether
    the failure was bad input (else transient)."""

    log: Path | None
    bad_input: bool


RECORDED: dict[str, Failure] = {}
