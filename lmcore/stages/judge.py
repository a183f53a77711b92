"""The judge stage (book ch. 7): the instruction models' test responses scored 0-100 by an OpenAI-compatible
judge endpoint into reports/judge; the registered versions that wrote them are tagged judge.*. Without an
endpoint (`judge.url`) the stage is skipped, and says why: scores are never made up.

    lmcore run judge --set judge.url=http://127.0.0.1:11434/v1 --set judge.model=llama3
"""

from __future__ import annotations

import os

from lmcore.io import atomic_dir, write_json
from lmcore.judge import judge_responses, judge_skip_reason
from lmcore.paths import JUDGE_SCORES, SUMMARY, TEST_RESPONSES, WEIGHTS
from lmcore.stages import Artifact, StageContext, StageResult, Table, VersionTags


def run(ctx: StageContext) -> StageResult:
    cfg, layout = ctx.params.judge, ctx.layout
    out = layout.reports("judge")
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
    with atomic_dir(out) as tmp:
        for name in cfg.responses:
            scored[name] = judge_responses(cfg, layout.reports(name) / TEST_RESPONSES, tmp / name, api_key=api_key)
        judge = next(iter(scored.values()))["judge"]
        write_json(tmp / SUMMARY, {"skipped": False, "judge": judge,
                                   **{name: {k: v for k, v in m.items() if k != "judge"} for name, m in scored.items()}})
    # judge.* on the registered versions whose weights wrote the judged responses (when their folder is here)
    versions = [
        VersionTags("instruct_model", layout.model(name) / WEIGHTS,
                    {"judge.mean_score": f"{m['mean_score']:.4f}", "judge.model": str(m["judge"]["model"])})
        for name, m in scored.items() if m["mean_score"] is not None and (layout.model(name) / WEIGHTS).is_file()
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
        log=", ".join(f"{name}: {m['mean_score']}" for name, m in scored.items()),
    )
