"""Independent work items of a stage as Prefect tasks on a Dask cluster (prefect-dask's DaskTaskRunner).

    lmcore run tokenize --set tokenize.runner=dask                                   # a local cluster
    lmcore run tokenize --set tokenize.runner=dask --set tokenize.dask_address=tcp://scheduler:8786

A stage whose params section says `runner: dask` gets `dask_map(...)` as its `StageContext.map`; its library
code calls `ctx.map(fn, items)` and gets the results in order, exactly as from its own process pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from tasks.retries import RETRY_DELAY_S, retry_transient


@task(name="map-item", retries=2, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


@flow(name="lmcore-dask-map", validate_parameters=False)
def _map_flow(fn: Callable[[Any], Any], items: list, item_name: str) -> list:
    futures = _apply.with_options(name=item_name).map(unmapped(fn), items)
    return [f.result() for f in futures]


def dask_task_runner(address: str | None, workers: int):
    """prefect-dask's runner: on the scheduler at `address`, or on a local cluster of `workers` processes
    (0: one per core), one thread each."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    n_workers = workers or os.cpu_count() or 1
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})


def dask_map(address: str | None, workers: int, item_name: str) -> Callable[[Callable, list], list]:
    """(fn, items) -> [fn(item), ...], one Prefect task named `item_name` per item, on Dask."""
    runner = dask_task_runner(address, workers)

    def run(fn: Callable[[Any], Any], items: list) -> list:
        return _map_flow.with_options(task_runner=runner)(fn, items, item_name)

    return run
