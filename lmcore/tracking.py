"""The trainer reports through this small protocol; the MLflow implementation lives in `tasks/`.

`NullTracker` keeps the library usable on its own.
"""

from __future__ import annotations

from typing import Protocol


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class NullTracker:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


class ListTracker:
    """Keeps every logged metric in memory; handy in tests and notebooks."""

    def __init__(self) -> None:
        self.records: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


class OffsetTracker:
    """Passes metrics on to `tracker` with their steps moved by `offset`: a continued run's step 1 is the
    champion's last step + 1."""

    def __init__(self, tracker: Tracker, offset: int) -> None:
        self.tracker, self.offset = tracker, offset

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, step=None if step is None else step + self.offset)
