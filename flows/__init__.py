"""Prefect flows: the lifecycle flow, one stage as its own flow (`lmcore run <stage>`), the scheduled deployment,
the pretrain stage under torchrun, dvc.yaml from the stage declarations, and the `lmcore` CLI."""
