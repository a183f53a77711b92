"""lmcore: the library behind the lifecycle pipeline.

Data, tokenizer, model, training, evaluation and generation as plain functions. It never imports
prefect, mlflow, dvc, `flows` or `tasks`: orchestration and tracking live in those layers.
"""

__version__ = "0.1.0"
