"""What every stage task gets from its flow: the project root, the validated params and where MLflow runs go."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from lmcore.config import Params
from lmcore.paths import Layout
from tasks.tracking import Tracking


@dataclass
class RunContext:
    root: Path
    params: Params
    tracking: Tracking

    @property
    def layout(self) -> Layout:
        return Layout(self.root)


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, else a plain logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("lmcore.tasks")


@contextlib.contextmanager
def reviewed(stage: str, what: str) -> Iterator[None]:
    """Time what the stage adds for people reviewing in the MLflow UI (cards, tables, comparisons): its cost shows
    in logs/<stage>.log."""
    start = time.perf_counter()
    yield
    logger().info("%s: %s in %.2f s", stage, what, time.perf_counter() - start)
