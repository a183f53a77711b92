"""Parity with lm-evaluation-harness, the peer: the same weights and the same items give the same picks and scores.

The peer side runs lm-eval's own task configs (its YAML files, its `process_docs`, its fewshot sampler, its
mc2 `process_results`, its group aggregation) through `lm_eval.evaluator.evaluate`, with its own Hugging Face
backend (HFLM) on the model exported to a transformers GPT2LMHeadModel. Only the dataset location is changed:
each config is included and pointed at local JSONL files in the Hugging Face datasets' schemas, converted here
from the raw benchmark files. Nothing of lmcore's runs on the peer side but the weight export.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from lmcore.harness.benchmarks import MMLU_LETTERS, source_file
from lmcore.harness.run import run_benchmarks

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

LIMIT = 16
SEED = 7
SUBJECTS = ("anatomy", "high_school_us_history", "marketing")  # stem, humanities (long prompts), other
LM_TASKS = Path(lm_eval.__file__).parent / "tasks"


# --- the raw files in the schemas of the Hugging Face datasets lm-eval reads --------------------------------------


def _hellaswag(path: Path) -> list[dict]:
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    docs = []
    for i in range(0, len(lines) - 5, 6):
        activity, ctx = lines[i].split(": ", 1)
        # Rowan/hellaswag keeps ctx_a and ctx_b apart; our file has them joined, so ctx_b is empty here.
        docs.append({"activity_label": activity, "ctx_a": ctx, "ctx_b": "", "endings": lines[i + 2 : i + 6], "label": lines[i + 1]})
    return docs


def _arc(path: Path) -> list[dict]:
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        q = r["question"]
        docs.append({"id": r["id"], "question": q["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}})
    return docs


def _truthfulqa(path: Path) -> list[dict]:
    return [
        {"question": r["question"],
         "mc1_targets": {"choices": list(r["mc1_targets"]), "labels": list(r["mc1_targets"].values())},
         "mc2_targets": {"choices": list(r["mc2_targets"]), "labels": list(r["mc2_targets"].values())}}
        for r in json.loads(path.read_text(encoding="utf-8"))
    ]


def _mmlu(path: Path, subject: str, split: str) -> list[dict]:
    with tarfile.open(path) as tar:
        text = tar.extractfile(f"data/{split}/{subject}_{split}.csv").read().decode("utf-8")
    return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": MMLU_LETTERS.index(r[5])}
            for r in csv.reader(io.StringIO(text, newline=""))]


def _write_jsonl(path: Path, docs: list[dict]) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def _task_yaml(folder: Path, name: str, include: Path, splits: dict[str, str], **extra) -> None:
    files = "\n".join(f"    {split}: {file}" for split, file in splits.items())
    more = "\n".join(f"{k}: {v}" for k, v in extra.items())
    (folder / f"{name}.yaml").write_text(
        f"include: {include}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n{files}\n{more}\n"
    )


@pytest.fixture(scope="module")
def peer_tasks(bench_dir, tmp_path_factory, monkeypatch_module):
    """lm-eval's configs for our tasks, on local data: (TaskManager, {our task name: lm-eval task name})."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HOME", str(folder / "hf"))
    hs = _write_jsonl(folder / "hellaswag.jsonl", _hellaswag(source_file(bench_dir, "hellaswag")))
    _task_yaml(folder, "lmc_hellaswag", LM_TASKS / "hellaswag/hellaswag.yaml", {"validation": hs}, training_split="null")
    for task, source in (("arc_easy", "arc-easy"), ("arc_challenge", "arc-challenge")):
        data = _write_jsonl(folder / f"{task}.jsonl", _arc(source_file(bench_dir, source)))
        _task_yaml(folder, f"lmc_{task}", LM_TASKS / f"arc/{task}.yaml", {"test": data}, training_split="null", validation_split="null")
    tqa = _write_jsonl(folder / "truthfulqa.jsonl", _truthfulqa(source_file(bench_dir, "truthfulqa-mc")))
    for mc in ("mc1", "mc2"):
        _task_yaml(folder, f"lmc_truthfulqa_{mc}", LM_TASKS / f"truthfulqa/truthfulqa_{mc}.yaml", {"validation": tqa})
    archive = source_file(bench_dir, "mmlu")
    for subject in SUBJECTS:
        splits = {s: _write_jsonl(folder / f"mmlu_{subject}_{s}.jsonl", _mmlu(archive, subject, s)) for s in ("test", "dev")}
        _task_yaml(folder, f"lmc_mmlu_{subject}", LM_TASKS / f"mmlu/default/mmlu_{subject}.yaml", splits, num_fewshot=5)
    members = "\n".join(f"  - lmc_mmlu_{s}" for s in SUBJECTS)
    (folder / "lmc_mmlu.yaml").write_text(
        f"group: lmc_mmlu\ntask:\n{members}\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: True\nmetadata:\n  version: 2\n"
    )
    from lm_eval.tasks import TaskManager

    names = {t: f"lmc_{t}" for t in ("hellaswag", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2")}
    names.update({f"mmlu_{s}": f"lmc_mmlu_{s}" for s in SUBJECTS})
    return TaskManager(include_path=str(folder)), names


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def both(peer_tasks, bench_dir, micro_lm, enc, tmp_path_factory):
    """Our run and lm-eval's on the same sampled items: (our results, our records by task, lm-eval's output)."""
    from lm_eval.evaluator import evaluate

    from benchmarks.peers import gpt2_tokenizer, lmeval_hflm

    manager, names = peer_tasks
    tasks = ["hellaswag", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2", *(f"mmlu_{s}" for s in SUBJECTS)]
    out = tmp_path_factory.mktemp("ours")
    ours = run_benchmarks(micro_lm, enc, bench_dir, out, tasks=tasks, limit=LIMIT, num_fewshot=5, sample_seed=SEED,
                          batch_size=8, progress=False)
    records = {}
    for line in (l for f in sorted((out / "samples").glob("*.jsonl")) for l in f.read_text().splitlines()):
        r = json.loads(line)
        records.setdefault(r["task"], {})[r["doc_id"]] = r
    samples = {names[t]: sorted(records[t]) for t in tasks}
    task_dict = manager.load([*(names[t] for t in tasks if not t.startswith("mmlu_")), "lmc_mmlu"])
    peer = lmeval_hflm(micro_lm, gpt2_tokenizer(os.environ["LMCORE_TIKTOKEN_FILE"]), batch_size=8)
    theirs = evaluate(peer, task_dict, samples=samples, bootstrap_iters=1, log_samples=True)
    return ours, records, theirs, names


def test_every_task_was_sampled_alike(both):
    ours, records, theirs, names = both
    for task, by_doc in records.items():
        assert len(by_doc) == LIMIT
        assert sorted(s["doc_id"] for s in theirs["samples"][names[task]]) == sorted(by_doc)


def test_same_prompts_loglikelihoods_and_picks_per_item(both):
    ours, records, theirs, names = both
    compared = 0
    for task, by_doc in records.items():
        for s in theirs["samples"][names[task]]:
            mine = by_doc[s["doc_id"]]
            contexts = {ctx for ctx, _ in s["arguments"]}
            assert contexts == {mine["prompt"]}, f"{task} doc {s['doc_id']}: prompts differ"
            assert [cont for _, cont in s["arguments"]] == [" " + c for c in mine["choices"]]
            lls = [r[0] for r in s["filtered_resps"]]
            assert mine["loglikelihoods"] == pytest.approx(lls, abs=2e-4, rel=1e-6), f"{task} doc {s['doc_id']}"
            assert mine["is_greedy"] == [bool(r[1]) for r in s["filtered_resps"]]
            assert mine["acc"] == pytest.approx(s["acc"], abs=1e-6)  # mc2's acc is a probability mass
            if "acc_norm" in s:
                assert mine["acc_norm"] == s["acc_norm"]
            compared += 1
    assert compared == LIMIT * len(records)
    assert any(r["truncated"] for r in records["mmlu_high_school_us_history"].values())  # 5-shot prompts were cut


def test_same_aggregate_scores_and_standard_errors(both):
    ours, records, theirs, names = both
    for task, name in names.items():
        peer = theirs["results"][name]
        mine = ours["tasks"][task]
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in peer:
                assert mine[metric] == pytest.approx(peer[f"{metric},none"], abs=1e-6), f"{task} {metric}"
                assert mine[f"{metric}_stderr"] == pytest.approx(peer[f"{metric}_stderr,none"], abs=1e-6)
    group = theirs["results"]["lmc_mmlu"]
    assert ours["groups"]["mmlu"]["acc"] == pytest.approx(group["acc,none"], abs=1e-9)
    assert ours["groups"]["mmlu"]["acc_stderr"] == pytest.approx(group["acc_stderr,none"], abs=1e-9)
    assert ours["groups"]["mmlu"]["n"] == LIMIT * len(SUBJECTS)
