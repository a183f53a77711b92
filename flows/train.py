"""The pretrain stage on several processes, tracked and registered as `lmcore run pretrain` does:

    torchrun --standalone --nproc_per_node 2 -m flows.train --params params.yaml
    torchrun --standalone --nproc_per_node 8 -m flows.train --params profiles/gpt2-124m.yaml --set pretrain.distributed=fsdp

Rank 0 runs the pretrain task's body (the MLflow run, per-step metrics, artifacts, the registered model); every
other rank makes the same `lmcore.training.pretrain` call without a tracker and writes nothing. There is no
Prefect flow run around it (one per rank would be started); `python -m lmcore.train` is the variant
without MLflow.
"""

from __future__ import annotations

import argparse
import json

from flows.common import make_context, resolve
from lmcore import distributed
from lmcore.config import load_params
from lmcore.training import pretrain
from tasks.stages import pretrain_checkpoints, pretrain_task


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="torchrun ... -m flows.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--root", default=".")
    args = ap.parse_args(argv)

    root, params_path = resolve(args.root, args.params)
    params = load_params(params_path, overrides=args.overrides)
    info = distributed.init_from_env(params.pretrain.device)
    try:
        ctx = make_context(root, params, launcher="torchrun")
        if info.is_main:
            result = pretrain_task.fn(ctx)
        else:
            layout = ctx.layout
            result = pretrain(
                params.pretrain, layout.tokens, layout.base_model, layout.pretrain_reports,
                seed=params.seed, params=params.to_dict(), checkpoint_dir=pretrain_checkpoints(ctx),
            )
    finally:
        distributed.destroy()
    if info.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "loader_state"}, indent=2))
    return result


if __name__ == "__main__":
    main()
