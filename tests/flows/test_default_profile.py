"""The default profile, params.yaml as shipped (SmolLM2-135M-Instruct from the mirror's GGUF file), through every
stage of the lifecycle flow on the real model: its own sections and settings, with small data and few steps
(`--set` overrides) so that it takes a couple of minutes, not the ten of `make pipeline`.

    python -m pytest -m slow tests/flows/test_default_profile.py -q
"""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmcore.pipeline import NAMES
from tests.conftest import ROOT, SHARED

pytestmark = pytest.mark.slow

GGUF = SHARED / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HAM = ["are we still on for lunch tomorrow", "ok see you at home later", "i'll call you after the meeting",
       "can you pick up some milk on the way", "happy birthday, have a lovely day", "running ten minutes late, sorry"]
SPAM = ["WINNER!! You have won a free prize, call now to claim", "URGENT: your account is suspended, text STOP to 8888",
        "Free entry to win a holiday! Reply YES now", "Congratulations, claim your cash reward at this number",
        "You have been selected for a free phone, call 0800 now", "Claim your free ringtone, text WIN to 87121"]


def small_sources(root, params: dict) -> None:
    """The corpus's short story alone, and the three fine-tuning sources as small local files in the project: the
    stages' own code on less data."""
    params["collect"]["sources"] = [s for s in params["collect"]["sources"] if s["name"] == "the-verdict"]
    (root / "sms.tsv").write_text("".join(f"ham\t{t} {i}\n" for i in range(3) for t in HAM)
                                  + "".join(f"spam\t{t} {i}\n" for i in range(3) for t in SPAM))
    rows = [{"instruction": f"Give a synonym of word {i}.", "input": "", "output": f"Another word for {i}."} for i in range(60)]
    (root / "instructions.json").write_text(json.dumps(rows))
    prefs = [{**r, "chosen": r["output"], "rejected": "I do not know."} for r in rows]
    (root / "preferences.json").write_text(json.dumps(prefs))
    params["finetune_classifier"]["sources"] = [{"name": "sms", "path": "sms.tsv"}]
    params["finetune_instruct"]["source"] = {"name": "instructions", "path": "instructions.json"}
    params["dpo"]["source"] = {"name": "preferences", "path": "preferences.json"}


def test_default_profile_runs_every_stage_on_smollm2(tmp_path, prefect_harness, monkeypatch, one_thread):
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} is not there")
    from flows.lifecycle import lifecycle

    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["base_model"]["source"] == "gguf" and params["instruct_eval"]["tasks"] == ["ifeval", "gsm8k"]
    small_sources(root, params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(params["tracking"]["experiment"], artifact_location=(root / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = [
        "tokenize.val_fraction=0.2", "pretrain.max_steps=2", "pretrain.eval_interval=2", "pretrain.eval_batches=1",
        "evaluate.max_batches=1", "evaluate.max_new_tokens=4",
        "benchmark.tasks=[hellaswag,arc_easy]", "benchmark.limit=2", "benchmark.primary_metric=hellaswag.acc_norm",
        "finetune_classifier.epochs=1", "finetune_classifier.eval_interval=2", "finetune_classifier.batch_size=4",
        "finetune_instruct.max_steps=1", "finetune_instruct.max_test_generations=1", "finetune_instruct.max_new_tokens=4",
        "finetune_instruct.eval_batches=1", "finetune_instruct.max_length=48",
        "dpo.max_steps=1", "dpo.max_test_generations=1", "dpo.max_new_tokens=4", "dpo.eval_batches=1", "dpo.max_length=48",
        "dpo.val_fraction=0.1",
        "instruct_eval.limit=1", "instruct_eval.max_gen_toks=4",
        "judge.max_items=1", "judge.max_tokens=4", "judge.max_unparsed_fraction=1.0",
    ]
    result = lifecycle(params_file=str(root / "params.yaml"), root=str(root), overrides=overrides)

    assert [d["stage"] for d in result["plan"]["stages"] if d["run"]] == list(NAMES)  # every stage, on the real model
    assert result["base_model"]["parameters"] == 134_515_008
    pretrain = result["pretrain"]
    assert pretrain["init"] == "base" and pretrain["start_weights_sha256"]  # the first run: no champion to continue
    assert pretrain["val_bpb_change"] is not None and pretrain["val_bpb_change_stderr"] > 0
    client = MlflowClient(uri, registry_uri=uri)
    # the base is each family's first champion it can serve; continued pretraining is weighed on what it bought
    base_versions = {v.version: v for v in client.search_model_versions("name = 'lmcore-base'")}
    assert len(base_versions) == 2 and result["benchmark"]["heldout_bpb"]["before"] == pytest.approx(pretrain["first_val_bpb"])
    decision = result["benchmark"]["promotion"]
    assert "held-out bits per byte" in decision["reason"] and decision["heldout_bpb_change"] == pytest.approx(pretrain["val_bpb_change"])
    instruct = {v.version: v.tags for v in client.search_model_versions("name = 'lmcore-instruct'")}
    assert client.get_model_version_by_alias("lmcore-instruct", "champion").tags["lmcore.origin"] == "base_model"
    assert len(instruct) == 3  # @sft, @dpo, the downloaded chat model
    assert 0 <= result["finetune_classifier"]["test_accuracy"] <= 1
    assert result["judge"]["skipped"] is False and set(result["judge"]["mean_scores"]) == {"instruct", "dpo"}
    times = result["stage_times"]
    assert list(times) == list(NAMES) and dict(result["summary"])["stage time"].startswith(f"{int(sum(times.values()) // 60)} min")
