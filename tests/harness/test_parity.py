"""Parity with lm-evaluation-harness, the peer: the same weights and the same items give the same picks and scores.

The peer side runs lm-eval's own task configs (its YAML files, its `process_docs`, its fewshot sampler, its
mc2 `process_results`, its group aggregation) through `lm_eval.evaluator.evaluate`, with its own Hugging Face
backend (HFLM). Only the dataset location is changed: each config is included and pointed at local JSONL files in
the Hugging Face datasets' schemas, converted here from the raw benchmark files.

Two models, the same tests:
- micro: a tiny random GPT-2 (128-token context, so 5-shot MMLU prompts are cut), exported to a transformers
  GPT2LMHeadModel for the peer; nothing of lmcore's runs on the peer side but the weight export.
- smollm2 (slow): the real SmolLM2-135M-Instruct from ../shared/data/models. lmcore imports the GGUF file
  (lmcore.gguf); the peer is transformers' own GGUF loader and tokenizer on the same file: nothing of lmcore's.

    python -m pytest -q -m "not slow" tests/harness/test_parity.py   # micro
    python -m pytest -q -m slow tests/harness/test_parity.py         # smollm2 (about three minutes on two cores)
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lmcore.harness.benchmarks import MMLU_LETTERS, source_file
from lmcore.harness.run import RAW_SCORES, run_benchmarks
from lmcore.harness.scoring import encode_pair
from tests.conftest import SHARED

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

SEED = 7
SUBJECTS = ("anatomy", "high_school_us_history", "marketing")  # stem, humanities (long prompts), other
LM_TASKS = Path(lm_eval.__file__).parent / "tasks"
SMOLLM2 = SHARED / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ("hellaswag", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2", *(f"mmlu_{s}" for s in SUBJECTS))
# log-likelihoods: float32 on both sides, summed in different orders (packed rows against one request per row).
# Seen: at most 3.1e-5 on the micro GPT's (up to 480), 5.3e-5 on SmolLM2's 30 layers (up to 151); picks are equal.
LL_TOL = dict(abs=2e-4, rel=1e-6)


@dataclass(frozen=True)
class Case:
    """One model compared, and how much of each benchmark it scores."""

    tasks: tuple[str, ...]
    limit: int  # items per task, per subject for MMLU
    num_fewshot: int  # MMLU's dev examples before each question
    mmlu_cut: bool  # whether high_school_us_history's prompts exceed the context and are cut from the left


CASES = {
    "micro": Case(TASKS, limit=16, num_fewshot=5, mmlu_cut=True),
    # SmolLM2 kept to about three minutes on two cores shared with other jobs (a minute of it loading the file on
    # both sides, lm-eval's task index included; 4 items more per task cost 2.5 minutes more there):
    # - 0-shot MMLU: 5-shot high_school_us_history prompts run to 2,400 tokens; 8 of them took 2.7 minutes on our
    #   side alone.
    # - no TruthfulQA: lm-eval scores each of its ~9 answers as its own sequence after the 190-token primer, 21k of
    #   the peer's 30k tokens at 8 items (5 minutes more); its prompts and mc2's probability mass are checked on micro.
    "smollm2": Case(tuple(t for t in TASKS if not t.startswith("truthfulqa")), limit=4, num_fewshot=0, mmlu_cut=False),
}


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
        _task_yaml(folder, f"lmc_mmlu_{subject}", LM_TASKS / f"mmlu/default/mmlu_{subject}.yaml", splits)
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


@pytest.fixture(scope="module", params=["micro", pytest.param("smollm2", marks=pytest.mark.slow)])
def models(request, tmp_path_factory):
    """(the Case, our model, our tokenizer, lm-eval's HFLM on the same weights)."""
    from benchmarks.peers import gpt2_tokenizer, hf_from_gguf, hflm, lmeval_hflm

    if request.param == "micro":
        model, enc = request.getfixturevalue("micro_lm"), request.getfixturevalue("enc")
        peer = lmeval_hflm(model, gpt2_tokenizer(os.environ["LMCORE_TIKTOKEN_FILE"]), batch_size=8)
    else:
        if not SMOLLM2.is_file():
            pytest.skip(f"{SMOLLM2} is not there")
        from lmcore.checkpoint import load_model
        from lmcore.gguf import import_gguf
        from lmcore.tokenizer import load_tokenizer

        dst = tmp_path_factory.mktemp("smollm2") / "model"
        import_gguf(SMOLLM2, dst)
        model, enc = load_model(dst), load_tokenizer(dst)
        # HFLM's default add_bos_token=None leaves BOS to the tokenizer, and the GGUF's tokenizer adds none
        # (tokenizer.ggml.add_bos_token is false), like lmcore, which never adds one: both score the same ids
        # (test_same_token_sequences), so HFLM keeps its defaults. max_length: HFLM reads 8192 from the config, as
        # lmcore does. An empty context (no task here has one) is the BOS on both sides (<|im_start|>).
        peer = hflm(*hf_from_gguf(SMOLLM2), batch_size=8)
    return CASES[request.param], model, enc, peer


@pytest.fixture(scope="module")
def both(models, peer_tasks, bench_dir, tmp_path_factory):
    """Our run and lm-eval's on the same sampled items: (case, our results, our records by task, lm-eval's output,
    task names)."""
    from lm_eval.evaluator import evaluate

    case, model, enc, peer = models
    manager, all_names = peer_tasks
    names = {t: all_names[t] for t in case.tasks}
    out = tmp_path_factory.mktemp("ours")
    ours = run_benchmarks(model, enc, bench_dir, out, tasks=list(case.tasks), limit=case.limit,
                          num_fewshot=case.num_fewshot, sample_seed=SEED, batch_size=8, progress=False)
    records = {}
    for line in (l for f in sorted((out / "samples").glob("*.jsonl")) for l in f.read_text().splitlines()):
        r = json.loads(line)
        records.setdefault(r["task"], {})[r["doc_id"]] = r
    samples = {names[t]: sorted(records[t]) for t in case.tasks}
    task_dict = manager.load([*(names[t] for t in case.tasks if not t.startswith("mmlu_")), "lmc_mmlu"])
    for name, task in task_dict["tasks"].items():
        if name.startswith("lmc_mmlu_"):  # as lm_eval's --num_fewshot sets it
            task.set_config(key="num_fewshot", value=case.num_fewshot)
    theirs = evaluate(peer, task_dict, samples=samples, bootstrap_iters=1, log_samples=True)
    return case, ours, records, theirs, names


def test_every_task_was_sampled_alike(both):
    case, ours, records, theirs, names = both
    assert sorted(records) == sorted(case.tasks)
    for task, by_doc in records.items():
        assert len(by_doc) == case.limit
        assert sorted(s["doc_id"] for s in theirs["samples"][names[task]]) == sorted(by_doc)


def test_same_token_sequences(models, both):
    """The peer's tokenizer (BOS handling included) makes the same ids of each (context, continuation) as ours."""
    case, model, enc, peer = models
    _, _, records, theirs, names = both
    assert peer.max_length == model.config.context_length
    for task, by_doc in records.items():
        for s in theirs["samples"][names[task]]:
            for ctx, cont in s["arguments"]:
                assert peer._encode_pair(ctx, cont) == encode_pair(enc, ctx, cont), f"{task} doc {s['doc_id']}"


def test_same_prompts_loglikelihoods_and_picks_per_item(both):
    case, ours, records, theirs, names = both
    compared = 0
    for task, by_doc in records.items():
        for s in theirs["samples"][names[task]]:
            mine = by_doc[s["doc_id"]]
            where = f"{task} doc {s['doc_id']}"
            contexts = {ctx for ctx, _ in s["arguments"]}
            assert contexts == {mine["prompt"]}, f"{where}: prompts differ"
            assert [cont for _, cont in s["arguments"]] == [" " + c for c in mine["choices"]]
            lls = [r[0] for r in s["filtered_resps"]]
            assert mine["loglikelihoods"] == pytest.approx(lls, **LL_TOL), where
            # the picks lm-eval's process_results makes from its log-likelihoods: argmax, and per character
            assert mine["pick"] == int(np.argmax(lls)), where
            assert mine["pick_norm"] == int(np.argmax(np.array(lls) / [len(c) for c in mine["choices"]])), where
            assert mine["is_greedy"] == [bool(r[1]) for r in s["filtered_resps"]]
            assert mine["acc"] == pytest.approx(s["acc"], abs=1e-6)  # mc2's acc is a probability mass
            if "acc_norm" in s:
                assert mine["acc_norm"] == s["acc_norm"]
            compared += 1
    assert compared == case.limit * len(records)
    # micro: 5-shot prompts are cut to its 128-token context; SmolLM2's 8192 cuts nothing
    assert any(r["truncated"] for r in records["mmlu_high_school_us_history"].values()) == case.mmlu_cut


def raw(scores: dict) -> dict:
    """A task's numbers whether or not it is meaningful for the model (micro: 5-shot MMLU and TruthfulQA are cut)."""
    return {**scores, **scores.get(RAW_SCORES, {})}


def test_same_aggregate_scores_and_standard_errors(both):
    case, ours, records, theirs, names = both
    for task, name in names.items():
        peer = theirs["results"][name]
        mine = raw(ours["tasks"][task])
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in peer:
                assert mine[metric] == pytest.approx(peer[f"{metric},none"], abs=1e-6), f"{task} {metric}"
                assert mine[f"{metric}_stderr"] == pytest.approx(peer[f"{metric}_stderr,none"], abs=1e-6)
    group = theirs["results"]["lmc_mmlu"]
    assert raw(ours["groups"]["mmlu"])["acc"] == pytest.approx(group["acc,none"], abs=1e-9)
    assert raw(ours["groups"]["mmlu"])["acc_stderr"] == pytest.approx(group["acc_stderr,none"], abs=1e-9)
    assert ours["groups"]["mmlu"]["n"] == case.limit * len(SUBJECTS)


def test_hellaswag_acc_norm_is_lm_evals(both):
    """HellaSwag's headline metric over the sampled items, equal to lm-eval's (a count over n: no tolerance)."""
    case, ours, records, theirs, names = both
    assert ours["tasks"]["hellaswag"]["acc_norm"] == theirs["results"][names["hellaswag"]]["acc_norm,none"]
