"""The judge stage (book ch. 7): the instruction models' test responses scored 0-100 by an OpenAI-compatible
judge endpoint into reports/judge (each judged response also a row of an MLflow table, tables/judged_responses.json);
the registered versions that wrote them are tagged judge.*. Without an endpoint (`judge.url`) the stage is skipped,
and says why: scores are never made up.

    lmcore run judge --set judge.url=http://127.0.0.1:11434/v1 --set judge.model=llama3
    lmcore run judge --set judge.serve=models:/lmcore-base@champion    # served here, as `lmcore serve` would
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import os
from pathlib import Path
import socket
import threading
import time
from typing import NotRequired, TypedDict

from lmcore.errors import InputError
from lmcore.io import atomic_dir, jsonl_objects, write_json
from lmcore.judge import judge_responses, judge_skip_reason
from lmcore.paths import JUDGE_SCORES, SUMMARY, TEST_RESPONSES, WEIGHTS, model_path, reports_path
from lmcore.stages import Artifact, ItemTable, StageContext, StageResult, Table, VersionTags

JUDGED_TABLE = "tables/judged_responses.json"  # one row per judged response of every model (judged_rows)


def judged_rows(scores_file: Path, model: str) -> list[dict]:
    """One row per judged response of scores.jsonl (lmcore.judge.judge_responses): model (the responses' folder under
    reports: instruct, dpo), score (0-100; None when the reply held none), unparsed, instruction, input, reference
    (the test split's output), response and judge_reply (the judge's raw reply)."""
    path = Path(scores_file)
    return [
        {"model": model, "score": r["score"], "unparsed": r["score"] is None, "instruction": r["instruction"],
         "input": r.get("input", ""), "reference": r["output"], "response": r["response"], "judge_reply": r["judge_reply"]}
        for _, r in jsonl_objects(path.read_text(encoding="utf-8"), path)
    ]


@contextlib.contextmanager
def served(ctx: StageContext) -> Iterator:
    """The judge section with `url` and `model` set: as given, or the endpoint of `judge.serve`, served in this
    process (lmcore.serve's app under uvicorn on 127.0.0.1, a free port) until the block ends."""
    cfg = ctx.params.judge
    if not cfg.serve:
        yield cfg
        return
    import uvicorn

    from lmcore.serve import create_app

    if cfg.serve.startswith("models:/"):
        if ctx.resolve_model is None:
            raise InputError(f"judge.serve: {cfg.serve} is a registered model, and nothing here resolves one (run under the pipeline)")
        model_dir = ctx.resolve_model(cfg.serve)
    else:
        model_dir = Path(cfg.serve) if Path(cfg.serve).is_absolute() else ctx.root / cfg.serve
    name = cfg.model or cfg.serve.removeprefix("models:/")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Path(model_dir), model_name=name), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="judge-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"judge.serve: the server for {cfg.serve} did not start")
        time.sleep(0.05)
    try:
        yield cfg.model_copy(update={"url": f"http://127.0.0.1:{port}/v1", "model": name})  # serve: what the scores record
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Summary(TypedDict):
    skipped: bool
    reason: NotRequired[str]  # skipped: why
    mean_scores: NotRequired[dict[str, float | None]]  # scored: each judged model's mean score (0-100)


def run(ctx: StageContext) -> StageResult:
    cfg, out = ctx.params.judge, ctx.outputs[reports_path("judge")]
    reason = judge_skip_reason(cfg)
    if reason is not None:
        with atomic_dir(out) as tmp:
            write_json(tmp / SUMMARY, {"skipped": True, "reason": reason})
        return StageResult(
            summary={"skipped": True, "reason": reason},
            artifacts=[Artifact(out / SUMMARY, "reports")],
            tags={"judge": "skipped", "judge_skip_reason": reason},
            warnings=[f"judge skipped: {reason}"],
        )

    api_key = os.environ.get(cfg.api_key_env) or None
    scored: dict[str, dict] = {}
    with served(ctx) as cfg, atomic_dir(out) as tmp:
        for name in cfg.responses:
            scored[name] = judge_responses(cfg, ctx.inputs[f"{reports_path(name)}/{TEST_RESPONSES}"], tmp / name, api_key=api_key)
        judge = next(iter(scored.values()))["judge"]
        write_json(tmp / SUMMARY, {"skipped": False, "judge": judge,
                                   **{name: {k: v for k, v in m.items() if k != "judge"} for name, m in scored.items()}})
    # judge.* on the registered versions whose weights wrote the judged responses (when their folder is here)
    versions = [
        VersionTags("instruct_model", ctx.inputs[f"{model_path(name)}/{WEIGHTS}"],
                    {"judge.mean_score": f"{m['mean_score']:.4f}", "judge.model": str(m["judge"]["model"])})
        for name, m in scored.items() if m["mean_score"] is not None and ctx.inputs[f"{model_path(name)}/{WEIGHTS}"].is_file()
    ]
    return StageResult(
        summary={"skipped": False, "mean_scores": {name: m["mean_score"] for name, m in scored.items()}},
        metrics={f"{name}.{k}": v for name, m in scored.items() for k, v in m.items()
                 if isinstance(v, (int, float)) and v is not None},
        artifacts=[Artifact(out / SUMMARY, "reports"), *(Artifact(out / name / JUDGE_SCORES, f"reports/{name}") for name in scored)],
        tags={"judge": "scored", "judge_model": cfg.model},
        scored=versions,
        tables=[Table(
            "lmcore-judge",
            [{"model": name, "mean_score": m["mean_score"], "stderr": m["stderr"], "scored": m["n_scored"], "unparsed": m["n_unparsed"]}
             for name, m in scored.items()],
            f"LLM-as-judge scores (0-100) by {cfg.model}",
        )],
        item_tables=[ItemTable(JUDGED_TABLE, [row for name in scored for row in judged_rows(out / name / JUDGE_SCORES, name)])],
        log=", ".join(f"{name}: {m['mean_score']}" for name, m in scored.items()),
    )
