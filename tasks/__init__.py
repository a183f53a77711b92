"""Prefect tasks: thin wrappers that resolve paths, call one lmcore function and log to MLflow."""
