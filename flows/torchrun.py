"""The pretrain stage on several processes, tracked and registered as `lmcore run pretrain` does:

    torchrun --standalone --nproc_per_node 2 -m flows.torchrun --params params.yaml
    torchrun --standalone --nproc_per_node 8 -m flows.torchrun --params profiles/gpt2-124m.yaml --set pretrain.distributed=fsdp

Rank 0 runs the stage as its Prefect task does (tasks.runner.execute: the MLflow run, per-step metrics, artifacts,
the registered model); every other rank calls the same stage function without a tracker and writes nothing.
There is no Prefect flow run around it (one per rank would be started); `torchrun ... -m lmcore.pretrain` is the
variant without MLflow.
"""

from __future__ import annotations

import argparse
import json

from flows.common import make_context, resolve
from lmcore import distributed, pipeline
from lmcore.config import load_params
from tasks.runner import execute


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="torchrun ... -m flows.torchrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--root", default=".")
    args = ap.parse_args(argv)

    root, params_path = resolve(args.root, args.params)
    params = load_params(params_path, overrides=args.overrides)
    info = distributed.init_from_env(params.pretrain.device)
    stage = pipeline.get("pretrain")
    try:
        if info.is_main:
            result = execute(stage, make_context(root, params, launcher="torchrun"))
        else:  # the same training; rank 0 alone writes, logs and registers
            result = stage.function()(stage.context(root, params)).summary
    finally:
        distributed.destroy()
    if info.is_main:
        print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
