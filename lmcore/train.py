"""Pretraining from the command line without the orchestration layer: alone, or one process per device under torchrun.

    torchrun --standalone --nproc_per_node 2 -m lmcore.train --params params.yaml
    torchrun --standalone --nproc_per_node 2 -m lmcore.train --params params.yaml --set pretrain.distributed=fsdp
    python -m lmcore.train --params profiles/micro.yaml --set pretrain.max_steps=50

Reads the params file (with dotted `--set` overrides) and trains `pretrain.model` on <root>/data/tokens, as
the pretrain stage does: rank 0 writes <root>/models/base, <root>/reports/pretrain and the training
checkpoints in <root>/models/checkpoints/pretrain; the other ranks write nothing. Under torchrun the
process group is gloo on CPU and NCCL on CUDA; every rank must see the same tokens and checkpoint folder.
No MLflow here: `torchrun ... -m flows.train` is the tracked, registered variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmcore import distributed
from lmcore.config import load_params
from lmcore.paths import Layout
from lmcore.training import PRETRAIN_CHECKPOINTS, pretrain


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m lmcore.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the params file (default params.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    ap.add_argument("--root", default=".", help="project root: data/tokens is read, models/ and reports/ are written")
    ap.add_argument("--tokens", help="tokens folder (default <root>/data/tokens)")
    ap.add_argument("--model-dir", help="default <root>/models/base")
    ap.add_argument("--reports-dir", help="default <root>/reports/pretrain")
    ap.add_argument("--checkpoint-dir", help="default <root>/models/checkpoints/pretrain")
    args = ap.parse_args(argv)

    params = load_params(args.params, overrides=args.overrides)
    layout = Layout(Path(args.root))
    info = distributed.init_from_env(params.pretrain.device)
    try:
        summary = pretrain(
            params.pretrain,
            Path(args.tokens) if args.tokens else layout.tokens,
            Path(args.model_dir) if args.model_dir else layout.base_model,
            Path(args.reports_dir) if args.reports_dir else layout.pretrain_reports,
            seed=params.seed,
            params=params.to_dict(),
            checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else layout.root / PRETRAIN_CHECKPOINTS,
        )
    finally:
        distributed.destroy()
    if info.is_main:
        shown = {k: v for k, v in summary.items() if k != "loader_state"}
        print(json.dumps(shown, indent=2), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
