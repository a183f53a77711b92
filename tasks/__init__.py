"""The orchestration layer's tasks: one generic Prefect task per declared stage (runner.py) that calls the stage's
lmcore function and logs what it returned to MLflow; the registry, lineage, tags and retries around it."""
