"""Params of operations: where runs are tracked and what the registered models are called."""

from __future__ import annotations

from lmcore.config.base import Section


class TrackingConfig(Section):
    experiment: str = "lmcore"
    registered_model: str = "lmcore-base"
    classifier_model: str = "lmcore-classifier"
    instruct_model: str = "lmcore-instruct"  # the DPO model is a later version of it, alias "dpo"
