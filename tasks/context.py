"""What every stage task gets: the project root, the validated params and where MLflow runs go."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from lmcore.config import Params
from lmcore.paths import Layout
from tasks.tracking import Tracking


@dataclass
class StageContext:
    root: Path
    params: Params
    tracking: Tracking

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

    def ranks_file(self) -> str | None:
        """The local tiktoken ranks file: params first, then LMCORE_TIKTOKEN_FILE."""
        configured = self.params.tokenize.ranks_file
        if configured:
            path = Path(configured)
            return str(path if path.is_absolute() else self.root / path)
        return os.environ.get("LMCORE_TIKTOKEN_FILE") or None


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, else a plain logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("lmcore.tasks")


def section(params: Params, *names: str) -> dict[str, Any]:
    """The params sections a stage logs: the named ones and the seed."""
    data = params.to_dict()
    return {"seed": params.seed, **{n: data[n] for n in names}}
