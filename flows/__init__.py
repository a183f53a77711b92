"""Prefect flows: one per stage (`python -m flows.<stage>`), the lifecycle flow, and the `lmcore` CLI."""
