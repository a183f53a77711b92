"""Parity with lm-evaluation-harness on the generative tasks: the same documents give the same prompt ids, the same
generated text and the same verdicts and scores.

The peer side is lm-eval itself: `simple_evaluate` with its own ifeval.yaml and gsm8k.yaml (included, pointed at local
JSONL files of the mirror's data), its own few-shot sampler (seed 1234), its chat-template path, its HFLM
generate_until on transformers weights, its filters and metrics, log_samples on. lmcore runs run_generative on the
same documents (lm-eval's `samples=` are our seeded sample's doc ids).

Three models, the same tests:
- gpt2: GSM8K with plain prompts on a random GPT-2 with the GPT-2 vocabulary and a 512-token context (the 5-shot
  prompts are cut from the left as HFLM cuts them), exported to transformers' GPT2LMHeadModel. Its head favours
  "Question" and ":", so completions end at the "Question:" stop string as well as at max_gen_toks.
- llama: IFEval with chat prompts on a random Llama-style model with SmolLM2's tokenizer and ChatML template; lmcore
  rebuilds the tokenizer from the GGUF's metadata, the peer is transformers' own GGUF tokenizer. Its head favours
  <|im_end|> (eos), <|endoftext|> (which ends lmcore's decoding but not transformers') and <|im_start|> (decoded to
  nothing). GSM8K's chat prompts (few-shot as turns, and as one message) are compared without generating.
- smollm2 (slow): both tasks on the real SmolLM2-135M-Instruct with its chat template; lmcore imports the GGUF file,
  the peer is transformers' GGUF loader.
`test_every_way_to_end_was_compared` checks that the random models' completions ended in each of those ways.

    python -m pytest -q -m "not slow" tests/harness/test_generative_parity.py   # gpt2 and llama
    python -m pytest -q -m slow tests/harness/test_generative_parity.py         # smollm2 (3-5 minutes on two busy cores)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.harness import generative as G
from lmcore.harness.benchmarks import source_file
from lmcore.model import GPT
from tests.harness.conftest import SMOLLM2_GGUF
from tests.harness.test_parity import LM_TASKS, _task_yaml

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("nltk_data")

NAMES = {"ifeval": "lmc_ifeval", "gsm8k": "lmc_gsm8k"}


@dataclass(frozen=True)
class Case:
    """One model compared, and how much of which tasks it generates."""

    tasks: tuple[str, ...]
    limit: int  # documents per task
    max_gen_toks: int
    seed: int  # sample_seed: none of its IFEval documents has instructions with random arguments
    chat: bool
    batch_size: int  # ours; the peer decodes one prompt at a time (no padding)


CASES = {
    "gpt2": Case(("gsm8k",), limit=6, max_gen_toks=24, seed=7, chat=False, batch_size=4),
    "llama": Case(("ifeval",), limit=6, max_gen_toks=24, seed=7, chat=True, batch_size=4),
    # SmolLM2 on two cores: about a minute loading the file on both sides, then 3 documents a task, up to 48 tokens
    # each, on each side.
    "smollm2": Case(("ifeval", "gsm8k"), limit=3, max_gen_toks=48, seed=3, chat=True, batch_size=4),
}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def task_manager(gen_bench_dir, tmp_path_factory, monkeypatch_module):
    """lm-eval's ifeval and gsm8k configs on local data (its own YAMLs included; only the dataset location changes)."""
    folder = tmp_path_factory.mktemp("lm_eval_gen_tasks")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HOME", str(folder / "hf"))
    # The mirror's IFEval lines carry only each instruction's own kwargs; `datasets` fills the other keys with null,
    # as in the hub's google/IFEval.
    _task_yaml(folder, NAMES["ifeval"], LM_TASKS / "ifeval/ifeval.yaml", {"train": str(source_file(gen_bench_dir, "ifeval"))})
    _task_yaml(folder, NAMES["gsm8k"], LM_TASKS / "gsm8k/gsm8k.yaml", {"train": str(source_file(gen_bench_dir, "gsm8k-train")),
                                                                       "test": str(source_file(gen_bench_dir, "gsm8k-test"))})
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def _scaled_rows(model: GPT, rows: list[int], factor: float) -> GPT:
    with torch.no_grad():
        model.lm_head.weight[rows] *= factor
    return model


def _hub_pre_tokenizer(tokenizer):
    """transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json: each digit split off, then
    GPT-2's byte-level regex (llama.cpp's "smollm", which lmcore rebuilds). transformers 5.23's GGUF converter drops
    the digit split, so a run of spaces before a digit ("students.  25%") comes out as other tokens there."""
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return tokenizer


def _gpt2(enc):
    from benchmarks.peers import gpt2_tokenizer, lmeval_hflm

    torch.manual_seed(3)  # with seed 7's documents: completions end at "Question:" and at max_gen_toks
    model = GPT(ModelConfig(vocab_size=50257, context_length=512, n_embd=64, n_layer=2, n_head=2, tie_weights=False)).eval()
    # <|endoftext|>, "Question", ":", " Question": completions that end at eos or at the "Question:" stop string
    _scaled_rows(model, [50256, *enc.encode("Question:"), *enc.encode(" Question")], 3.0)
    return model, enc, lmeval_hflm(model, gpt2_tokenizer(os.environ["LMCORE_TIKTOKEN_FILE"]), batch_size=1)


def _llama(tok):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks.peers import hflm
    from lmcore.hf import to_hf

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.n_vocab, context_length=2048, n_embd=64, n_layer=2, n_head=4, n_kv_head=2,
                      intermediate_size=128, norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_weights=False)
    model = _scaled_rows(GPT(cfg).eval(), [tok.eot_token, tok.bos_token, tok.eos_token], 3.0)
    config, state = to_hf(model)
    config.update(bos_token_id=tok.bos_token, eos_token_id=tok.eos_token, pad_token_id=tok.eos_token)  # as SmolLM2's
    hf = LlamaForCausalLM(LlamaConfig(**config))
    hf.load_state_dict(state, strict=False)
    peer_tok = _hub_pre_tokenizer(AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name))
    return model, tok, hflm(hf.eval(), peer_tok, batch_size=1, max_length=cfg.context_length)


def _smollm2(folder: Path):
    from benchmarks.peers import hf_from_gguf, hflm
    from lmcore.checkpoint import load_model
    from lmcore.gguf import import_gguf
    from lmcore.tokenizer import load_tokenizer

    import_gguf(SMOLLM2_GGUF, folder)
    hf, tokenizer = hf_from_gguf(SMOLLM2_GGUF)
    return load_model(folder), load_tokenizer(folder), hflm(hf, _hub_pre_tokenizer(tokenizer), batch_size=1)


@pytest.fixture(scope="module", params=["gpt2", "llama", pytest.param("smollm2", marks=pytest.mark.slow)])
def models(request, tmp_path_factory):
    """(case name, Case, our model, our tokenizer, lm-eval's HFLM on the same weights)."""
    if request.param != "gpt2" and not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is not there")
    if request.param == "gpt2":
        model, enc, peer = _gpt2(request.getfixturevalue("enc"))
    elif request.param == "llama":
        model, enc, peer = _llama(request.getfixturevalue("smollm2_tok"))
    else:
        model, enc, peer = _smollm2(tmp_path_factory.mktemp("smollm2") / "model")
    return request.param, CASES[request.param], model, enc, peer


@pytest.fixture(scope="module")
def both(models, task_manager, gen_bench_dir, tmp_path_factory):
    """Our run and lm-eval's on the same documents: (name, case, our results, our records by task and doc id,
    lm-eval's output)."""
    from lm_eval.evaluator import simple_evaluate

    name, case, model, enc, peer = models
    out = tmp_path_factory.mktemp(f"ours-{name}")
    ours = G.run_generative(model, enc, gen_bench_dir, out, tasks=list(case.tasks), limit=case.limit, sample_seed=case.seed,
                            max_gen_toks=case.max_gen_toks, batch_size=case.batch_size, progress=False)
    assert ours["config"]["template_mode"] == ("chat" if case.chat else "plain")
    records = {t: {r["doc_id"]: r for r in map(json.loads, (out / "samples" / f"{t}.jsonl").read_text().splitlines())}
               for t in case.tasks}
    samples = {NAMES[t]: sorted(by_doc) for t, by_doc in records.items()}
    theirs = simple_evaluate(model=peer, tasks=list(samples), task_manager=task_manager, samples=samples,
                             gen_kwargs={"max_gen_toks": case.max_gen_toks}, apply_chat_template=case.chat,
                             log_samples=True, bootstrap_iters=1)
    return name, case, ours, records, theirs


def _peer_samples(theirs: dict, task: str) -> list[dict]:
    """lm-eval's logged samples of a task, one per document (gsm8k logs one per filter: the first filter's)."""
    rows = {}
    for s in theirs["samples"][NAMES[task]]:
        rows.setdefault(s["doc_id"], s)
    return list(rows.values())


def test_the_same_documents_were_asked(both):
    name, case, ours, records, theirs = both
    assert sorted(records) == sorted(case.tasks)
    for task, by_doc in records.items():
        assert len(by_doc) == case.limit
        assert sorted(s["doc_id"] for s in _peer_samples(theirs, task)) == sorted(by_doc)
    if "ifeval" in records:
        assert all(s["doc"]["key"] == records["ifeval"][s["doc_id"]]["key"] for s in _peer_samples(theirs, "ifeval"))
        assert not any(r["random_instructions"] for r in records["ifeval"].values()), "pick a seed without keys 1122, 1129"


def test_same_prompts_and_token_ids(models, both, gen_bench_dir):
    """The prompt text lm-eval built (few-shot draws, layout, chat template) and the ids HFLM feeds its model (its
    tokenizer, its BOS handling, its cut to max_length - max_gen_toks) are ours."""
    _, case, model, enc, peer = models
    _, _, ours, records, theirs = both
    keep = model.config.context_length - case.max_gen_toks
    assert peer.max_length == model.config.context_length
    for task, by_doc in records.items():
        items = {it.doc_id: it for it in G.generative_items(task, gen_bench_dir, limit=case.limit, sample_seed=case.seed)}
        for s in _peer_samples(theirs, task):
            context, gen_kwargs = s["arguments"][0]
            mine, where = by_doc[s["doc_id"]], f"{task} doc {s['doc_id']}"
            assert context == mine["prompt"], where
            assert gen_kwargs["until"] == list(G.TASKS[task].until) and gen_kwargs["max_gen_toks"] == case.max_gen_toks
            ids, _ = peer.tok_batch_encode([context], left_truncate_len=keep)
            ours_ids = G.build_prompts([items[s["doc_id"]]], enc, case.chat)[0]
            assert ids[0].tolist() == ours_ids[-keep:], where
            assert mine["truncated"] == (len(ours_ids) > keep) and mine["prompt_tokens"] == min(len(ours_ids), keep)


def test_same_generated_text(both):
    """HFLM's response (greedy, stopped and cut at the stop strings, special tokens decoded to nothing) is ours."""
    _, _, _, records, theirs = both
    for task, by_doc in records.items():
        for s in _peer_samples(theirs, task):
            assert by_doc[s["doc_id"]]["response"] == s["resps"][0][0], f"{task} doc {s['doc_id']}"


def test_same_verdicts_per_item(both):
    _, _, _, records, theirs = both
    for s in theirs["samples"].get(NAMES["ifeval"], []):
        mine, where = records["ifeval"][s["doc_id"]], f"ifeval doc {s['doc_id']}"
        for metric in (G.PROMPT_STRICT, G.INST_STRICT, G.PROMPT_LOOSE, G.INST_LOOSE):
            assert mine[metric] == s[metric], f"{where} {metric}"
        assert mine["correct"] == s[G.PROMPT_LOOSE]
    filters = {"strict-match": ("strict_answer", G.EM_STRICT), "flexible-extract": ("flexible_answer", G.EM_FLEXIBLE)}
    for s in theirs["samples"].get(NAMES["gsm8k"], []):
        answer, metric = filters[s["filter"]]
        mine, where = records["gsm8k"][s["doc_id"]], f"gsm8k doc {s['doc_id']} {s['filter']}"
        assert mine[answer] == s["filtered_resps"][0], where
        assert mine[metric] == s["exact_match"], where
        assert mine["gold"] == s["target"].rsplit("#### ", 1)[-1].strip()
        if metric == G.EM_FLEXIBLE:
            assert mine["correct"] == (s["exact_match"] == 1.0)


def test_same_scores_and_standard_errors(both):
    _, case, ours, _, theirs = both
    for task in case.tasks:
        name = NAMES[task]
        peer, mine = theirs["results"][name], ours["tasks"][task]
        assert mine["n"] == case.limit == peer["sample_len"]
        for metric in G.TASKS[task].metrics:
            key = G.LM_EVAL_NAMES[metric]
            assert mine[metric] == pytest.approx(peer[key], abs=1e-12), f"{task} {metric}"
            stderr = peer[key.replace(",", "_stderr,", 1)]
            assert mine[f"{metric}_stderr"] == (None if stderr == "N/A" else pytest.approx(stderr, abs=1e-12))
        assert mine["version"] == theirs["versions"][name]


def test_every_way_to_end_was_compared(both):
    """The random models' completions ended at a stop string ("Question:") and at max_gen_toks with prompts cut to
    the context (gpt2), at eos and at max_gen_toks after going past <|endoftext|> as lm-eval's do (llama)."""
    name, _, _, records, _ = both
    rows = [r for by_doc in records.values() for r in by_doc.values()]
    finishes = {r["finish"] for r in rows}
    if name == "gpt2":
        assert finishes == {"stop_string", "length"} and all(r["truncated"] for r in rows)
    elif name == "llama":
        assert finishes == {"eos", "length"} and any(r["passed_end_ids"] for r in rows)


@pytest.mark.parametrize("multiturn", [True, False])
def test_gsm8k_chat_prompts_are_lm_evals(models, task_manager, gen_bench_dir, multiturn):
    """Few-shot examples as turns (lm-eval's default with --apply_chat_template) or as one user message
    (--fewshot_as_multiturn false): lm-eval's requests (its build_all_requests with HFLM's chat template, seed 1234)
    against ours, ids included."""
    name, case, model, enc, peer = models
    if not case.chat:
        pytest.skip("plain prompts have no turns")
    items = G.generative_items("gsm8k", gen_bench_dir, limit=case.limit, sample_seed=case.seed)
    task = task_manager.load([NAMES["gsm8k"]])["tasks"][NAMES["gsm8k"]]
    task.set_fewshot_seed(seed=G.FEWSHOT_SEED)
    task.build_all_requests(samples=[it.doc_id for it in items], apply_chat_template=True, fewshot_as_multiturn=multiturn,
                            chat_template=peer.apply_chat_template, tokenizer_name=peer.tokenizer_name)
    contexts = [inst.args[0] for inst in sorted(task.instances, key=lambda inst: inst.doc_id)]
    assert contexts == [G.prompt_text(it, enc, True, fewshot_as_multiturn=multiturn) for it in items]
    keep = model.config.context_length - G.TASKS["gsm8k"].max_gen_toks
    for context, ids in zip(contexts, G.build_prompts(items, enc, True, fewshot_as_multiturn=multiturn)):
        assert peer.tok_batch_encode([context], left_truncate_len=keep)[0][0].tolist() == ids[-keep:]
