"""The pretrain stage without the orchestration layer: alone, or one process per device under torchrun.

    python -m lmcore.pretrain --params profiles/micro.yaml --set pretrain.max_steps=50
    torchrun --standalone --nproc_per_node 2 -m lmcore.pretrain --params params.yaml

The stage's own function (`lmcore.stages.pretrain.run`) in the context its declaration makes (lmcore.pipeline): the
same inputs, outputs and model card as `lmcore run pretrain`, no MLflow and no registry (`init: champion` starts as
the stage would without a champion, with a warning). Under torchrun rank 0 writes; the others write nothing.
`torchrun ... -m flows.torchrun` is the tracked, registered variant.

Its own module, imported by no stage: the stages' code deps (their import closures, dvc.yaml) stay free of
lmcore.pipeline, whose declarations they do not run on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lmcore import distributed, pipeline
from lmcore.config import load_params

log = logging.getLogger("lmcore.pretrain")


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the pretrain stage, print its summary (rank 0) and return it."""
    ap = argparse.ArgumentParser(prog="python -m lmcore.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the params file (default params.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    ap.add_argument("--root", default=".", help="project root: data/tokens is read, models/base and reports/pretrain are written")
    args = ap.parse_args(argv)

    params = load_params(args.params, overrides=args.overrides)
    info = distributed.init_from_env(params.pretrain.device)
    stage = pipeline.get("pretrain")
    try:
        result = stage.function()(stage.context(Path(args.root), params))
    finally:
        distributed.destroy()
    if info.is_main:
        for line in result.warnings:
            log.warning(line)
        print(json.dumps(result.summary, indent=2, default=str), file=sys.stderr)
    return result.summary


if __name__ == "__main__":
    main()
