"""Run every stage function of a project's params in order, recording each file the process opens under the root
with the stage that was running (an audit hook), and the keys of each stage's summary, as JSON:
{"opened": [[stage, path relative to the root, "r" | "w"], ...], "summary_keys": {stage: [key, ...]}}.

    python -m tests.stage_reads ROOT OUT.json

The stage functions are called directly in the contexts their declarations make (`Stage.context`, which refuses a
path a stage asks for but did not declare): no Prefect, no MLflow, so whatever is opened under the root is the
stage's own doing (tests/flows/test_stage_reads.py checks it against the declarations)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(root: Path, out: Path) -> None:
    opened: list[tuple[str, str, str]] = []
    running: list[str] = []
    prefix = str(root) + os.sep

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not running or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(prefix):
            mode = args[1] if isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            write = any(c in mode for c in "wax+") or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            opened.append((running[-1], os.path.relpath(path, root), "w" if write else "r"))

    sys.addaudithook(hook)  # for the rest of this process, which exists for it
    from lmcore import pipeline
    from lmcore.config import load_params

    params = load_params(root / "params.yaml")
    keys = {}
    for stage in pipeline.STAGES:
        running.append(stage.name)
        result = stage.function()(stage.context(root, params))  # handed its declared deps and outs only
        running.pop()
        keys[stage.name] = sorted(result.summary)
    out.write_text(json.dumps({"opened": opened, "summary_keys": keys}))


if __name__ == "__main__":  # a process pool's spawned children import this module again: no run there
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
