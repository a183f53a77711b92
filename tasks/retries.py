"""When Prefect retries an lmcore task: on a transient failure (network, timeout, HTTP 429 or 5xx) only. Bad
input (lmcore.errors.InputError) and bugs fail at once: running them again cannot help."""

from __future__ import annotations

from lmcore.errors import is_transient

RETRY_DELAY_S = 2


def retry_transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn` for every lmcore task."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)
