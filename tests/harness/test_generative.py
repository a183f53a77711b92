"""lmcore.harness.generative and lmcore.harness.punkt, piece by piece: items and few-shot draws, prompts, stop handling,
scores of hand-made responses, aggregates, a whole small run, bad input, and Punkt offline.

lm-eval's own pieces are the reference where a piece has one: its fewshot sampler, its task YAMLs, its Message
rendering, its text post-processing, its metrics. The end-to-end comparison with lm-eval runs in
test_generative_parity.py.

    python -m pytest -q tests/harness/test_generative.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmcore.chat import ChatTemplateError
from lmcore.config import ModelConfig
from lmcore.errors import InputError
from lmcore.harness import generative as G
from lmcore.harness import punkt as P
from lmcore.harness.benchmarks import BenchmarkDataError
from lmcore.model import GPT
from tests.conftest import ROOT

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("nltk_data")
LM_TASKS = Path(lm_eval.__file__).parent / "tasks"


# --- items and few-shot examples ---------------------------------------------------------------------------------


def test_items_are_a_seeded_sample_in_document_order(gen_bench_dir):
    a = G.generative_items("gsm8k", gen_bench_dir, limit=10, sample_seed=3)
    assert [it.doc_id for it in a] == sorted(it.doc_id for it in a) and len(a) == 10
    assert a == G.generative_items("gsm8k", gen_bench_dir, limit=10, sample_seed=3)
    assert G.sample_sha256(a) == G.sample_sha256(G.generative_items("gsm8k", gen_bench_dir, limit=10, sample_seed=3))
    other = G.generative_items("gsm8k", gen_bench_dir, limit=10, sample_seed=4)
    assert [it.doc_id for it in other] != [it.doc_id for it in a]
    assert G.sample_sha256(other) != G.sample_sha256(a)
    everything = G.generative_items("ifeval", gen_bench_dir)
    assert [it.doc_id for it in everything] == list(range(541))
    assert everything[0].doc["key"] == 1000 and everything[0].text == everything[0].doc["prompt"]


def test_fewshot_examples_are_lm_evals_draws(gen_bench_dir):
    """lm-eval's default ContextSampler seeded 1234 draws once per evaluated document, in order: the k-th sampled
    document gets the k-th draw (as with lm-eval --samples), the whole test split the draws of a full run."""
    from lm_eval.api.samplers import ContextSampler

    train = G.read_gsm8k(G.source_file(gen_bench_dir, "gsm8k-train"))
    items = G.generative_items("gsm8k", gen_bench_dir, limit=7, sample_seed=11)
    sampler = ContextSampler(train, rnd=1234)
    for it in items:
        assert [train[j] for j in it.fewshot_ids] == list(sampler.sample(n=5))
    full = G.generative_items("gsm8k", gen_bench_dir)
    sampler = ContextSampler(train, rnd=1234)
    for it in full[:3]:
        assert [train[j] for j in it.fewshot_ids] == list(sampler.sample(n=5))
    by_doc = {it.doc_id: it for it in full}
    assert any(by_doc[it.doc_id].fewshot_ids != it.fewshot_ids for it in items)  # the draws follow the selection
    assert all(len(it.fewshot_ids) == 2 for it in G.generative_items("gsm8k", gen_bench_dir, limit=3, num_fewshot=2))


def test_task_constants_are_lm_evals_yaml():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # ifeval.yaml's !function tags
    for name, spec in G.TASKS.items():
        cfg = yaml.load((LM_TASKS / name / f"{name}.yaml").read_text(), Loader=Loader)
        assert cfg["metadata"]["version"] == spec.version == G.task_version(name)
        assert cfg["num_fewshot"] == spec.num_fewshot
        assert tuple(cfg["generation_kwargs"]["until"]) == spec.until
        assert cfg["generation_kwargs"]["do_sample"] is False
        assert cfg["generation_kwargs"].get("max_gen_toks", 256) == spec.max_gen_toks  # 256: HFLM.max_gen_toks
    from lm_eval.models.huggingface import HFLM

    assert HFLM.max_gen_toks.fget(None) == 256
    gsm8k = yaml.safe_load((LM_TASKS / "gsm8k/gsm8k.yaml").read_text())
    assert gsm8k["doc_to_text"] == "Question: {{question}}\nAnswer:" and gsm8k["doc_to_target"] == "{{answer}}"
    metric = {k: v for k, v in gsm8k["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    assert metric == G.GSM8K_EXACT_MATCH
    filters = {f["name"]: f["filter"] for f in gsm8k["filter_list"]}
    for name, key in (("strict-match", G.EM_STRICT), ("flexible-extract", G.EM_FLEXIBLE)):
        regex, take_first = filters[name]
        assert (regex["regex_pattern"], regex.get("group_select", 0)) == G.GSM8K_FILTERS[key]
        assert take_first == {"function": "take_first"}


# --- prompts -----------------------------------------------------------------------------------------------------


def _lm_eval_messages(item: G.GenItem, train: list[dict]) -> list:
    """lm-eval's fewshot_context messages for a gsm8k item, built by its own build_qa_turn and Jinja templates."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.utils import apply_template

    msgs = []
    for j in item.fewshot_ids:
        q, a = apply_template("Question: {{question}}\nAnswer:", train[j]), apply_template("{{answer}}", train[j])
        msgs += ConfigurableTask.build_qa_turn(None, q=q, a=a, tgt_delim=" ", few_delim="\n\n")
    q = apply_template("Question: {{question}}\nAnswer:", item.doc)
    return msgs + ConfigurableTask.build_qa_turn(None, q=q, tgt_delim=" ", few_delim="")


def test_gsm8k_prompts_are_laid_out_as_lm_evals(gen_bench_dir):
    from lm_eval.api.utils import multiturn_to_singleturn

    train = G.read_gsm8k(G.source_file(gen_bench_dir, "gsm8k-train"))
    for it in G.generative_items("gsm8k", gen_bench_dir, limit=5, sample_seed=1):
        msgs = _lm_eval_messages(it, train)
        assert it.text == "".join(m.to_text() for m in msgs)  # no chat template
        assert it.messages(fewshot_as_multiturn=True) == [m.to_dict() for m in msgs]
        assert it.messages(fewshot_as_multiturn=False) == multiturn_to_singleturn(_lm_eval_messages(it, train))
    it = G.generative_items("gsm8k", gen_bench_dir, limit=1, sample_seed=1)[0]
    assert it.text.startswith("Question: ") and it.text.endswith(f"Question: {it.doc['question']}\nAnswer:")
    assert it.text.count("\n\nQuestion: ") == 5 and f"\nAnswer: {train[it.fewshot_ids[0]]['answer']}\n\n" in it.text


def test_chat_prompts_go_through_the_template(gen_bench_dir, smollm2_tok, enc):
    it = G.generative_items("gsm8k", gen_bench_dir, limit=1, sample_seed=1, num_fewshot=1)[0]
    shot = it.turns[1].content
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    question = f"Question: {it.doc['question']}\nAnswer:"
    multi = G.prompt_text(it, smollm2_tok, chat=True)
    assert multi == (f"{system}<|im_start|>user\n{it.turns[0].content}<|im_end|>\n<|im_start|>assistant\n{shot}<|im_end|>\n"
                     f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    single = G.prompt_text(it, smollm2_tok, chat=True, fewshot_as_multiturn=False)
    assert single == f"{system}<|im_start|>user\n{it.text}<|im_end|>\n<|im_start|>assistant\n"
    ids = G.build_prompts([it], smollm2_tok, chat=True)[0]
    assert ids == smollm2_tok.encode(multi) and ids[0] == smollm2_tok.encode_single_token("<|im_start|>")
    assert G.build_prompts([it], enc, chat=False)[0] == enc.encode(it.text)  # no BOS added
    with pytest.raises(ChatTemplateError, match="no chat template"):
        G.prompt_text(it, enc, chat=True)


def test_chat_mode_resolution(smollm2_tok, enc):
    assert G.resolve_chat(smollm2_tok, "auto") and not G.resolve_chat(enc, "auto")
    assert G.resolve_chat(smollm2_tok, "chat") and not G.resolve_chat(smollm2_tok, "none")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        G.resolve_chat(enc, "chat")
    with pytest.raises(G.GenerativeTaskError, match="'auto', 'chat' or 'none'"):
        G.resolve_chat(enc, "yes")


# --- generated text, as HFLM post-processes it ---------------------------------------------------------------------


def test_completion_text_is_hflms(enc, smollm2_tok):
    """Special tokens decoded to nothing, then the text cut at the first stop string (lm-eval's own function)."""
    from lm_eval.models.utils import postprocess_generated_text

    until = G.stop_strings("gsm8k", enc)
    assert until == ["Question:", "</s>", "<|im_end|>", "<|endoftext|>"]
    assert G.stop_strings("ifeval", enc) == ["<|endoftext|>"] and G.stop_strings("ifeval", smollm2_tok) == ["<|im_end|>"]
    cases = [enc.encode("She has 4 left.\n#### 4\n\nQuestion: next") + [50256],
             [32, 50256, 33],  # A <|endoftext|> B
             enc.encode("Total: $1,2") + [50256],
             enc.encode("caf\u00e9 \u4e16\u754c")[:-1]]  # ends inside a character: U+FFFD, as HF decodes it
    for ids in cases:
        text = G.completion_text(enc, ids, until)
        assert text == postprocess_generated_text(enc.decode([t for t in ids if t != 50256]), until, None)
    assert G.completion_text(enc, cases[0], until) == "She has 4 left.\n#### 4\n\n"
    assert G.completion_text(enc, cases[1], until) == "AB"  # lm-eval skips specials: it does not stop at them
    assert G.completion_text(enc, cases[3], until).endswith("\ufffd")
    im = smollm2_tok.encode("Hi<|im_start|>there<|im_end|>tail")
    assert G.completion_text(smollm2_tok, im, G.stop_strings("ifeval", smollm2_tok)) == "Hithere" + "tail"


def test_generation_goes_past_end_ids_lm_eval_does_not_stop_at(smollm2_tok):
    """SmolLM2's <|endoftext|> ends lmcore's generation but not transformers' (its eos is <|im_end|>): the completion
    goes on as one greedy decode that stops at <|im_end|> alone (lmcore.generation.generate) continues it."""
    from lmcore.generation import generate

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=smollm2_tok.n_vocab, context_length=256, n_embd=32, n_layer=1, n_head=2,
                      norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_weights=False)
    model = GPT(cfg).eval()
    eot, eos = smollm2_tok.eot_token, smollm2_tok.eos_token
    with torch.no_grad():
        model.lm_head.weight[eot] *= 40  # <|endoftext|> often wins
    prompt = smollm2_tok.encode("Hello there")
    ids = G.generate_like_lm_eval(model, smollm2_tok, [prompt], 8, ["<|im_end|>"])[0]
    reference = generate(model, torch.tensor([prompt]), 8, temperature=0, eos_token=eos)[0, len(prompt):].tolist()
    assert ids == reference and eot in ids[:-1] and len(ids) == 8
    with torch.no_grad():
        model.lm_head.weight[eos] *= 80  # now <|im_end|> wins: a real stop
    assert G.generate_like_lm_eval(model, smollm2_tok, [prompt], 8, ["<|im_end|>"])[0] == [eos]


# --- scores of hand-made responses ---------------------------------------------------------------------------------

DOC = {"key": 1, "prompt": "Write two short sentences, all lowercase, without commas.",
       "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma",
                               "length_constraints:number_sentences"],
       "kwargs": [{}, {}, {"relation": "less than", "num_sentences": 3}]}


def test_ifeval_scores_follow_lm_evals_checkers():
    follows = G.score_ifeval(DOC, "dr. smith went home. he was tired.")  # "dr." is no sentence end (Punkt)
    assert follows[G.INST_STRICT] == [True, True, True] and follows[G.PROMPT_STRICT] and follows[G.PROMPT_LOOSE]
    breaks = G.score_ifeval(DOC, "Dr. Smith went home, tired. He slept. He woke.")
    assert breaks[G.INST_STRICT] == [False, False, False] and not breaks[G.PROMPT_LOOSE]
    # loose drops a first line ("Sure, ...") and asterisks before checking
    loose = G.score_ifeval(DOC, "Sure, here:\n**it rained.** we stayed in.")
    assert loose[G.INST_STRICT] == [False, False, True] and loose[G.INST_LOOSE] == [True, True, True]
    assert not loose[G.PROMPT_STRICT] and loose[G.PROMPT_LOOSE]
    empty = G.score_ifeval(DOC, "")
    assert empty[G.INST_STRICT] == empty[G.INST_LOOSE] == [False] * 3


def test_ifeval_checkers_with_random_arguments_score_repeatably(gen_bench_dir):
    items = {it.doc["key"]: it for it in G.generative_items("ifeval", gen_bench_dir)}
    drawn = {key: found for key, it in items.items() if (found := G.random_instructions(it.doc))}
    assert drawn == {1122: [items[1122].doc["instruction_id_list"].index("keywords:letter_frequency")],
                     1129: [items[1129].doc["instruction_id_list"].index("keywords:letter_frequency")]}
    state = random.getstate()
    scores = [G.score_ifeval(items[1122].doc, "### a b c d e f ###" * 3) for _ in range(3)]
    assert scores[0] == scores[1] == scores[2] and random.getstate() == state


def test_gsm8k_strict_and_flexible_extraction():
    doc = {"question": "?", "answer": "9 * 2 = <<9*2=18>>18 dollars.\n#### 18"}
    both = G.score_gsm8k(doc, "She sells 9 eggs for $2 each.\n#### 18")
    assert both["answers"] == {G.EM_STRICT: "18", G.EM_FLEXIBLE: "18"} and both[G.EM_STRICT] == both[G.EM_FLEXIBLE] == 1.0
    flexible = G.score_gsm8k(doc, "So she makes 9 * 2 = $18.")
    assert flexible["answers"] == {G.EM_STRICT: "[invalid]", G.EM_FLEXIBLE: "$18."}  # "$" and a final "." ignored
    assert flexible[G.EM_STRICT] == 0.0 and flexible[G.EM_FLEXIBLE] == 1.0
    wrong = G.score_gsm8k(doc, "#### 1,800 eggs, or 17")
    assert wrong["answers"] == {G.EM_STRICT: "1,800", G.EM_FLEXIBLE: "17"} and wrong[G.EM_STRICT] == wrong[G.EM_FLEXIBLE] == 0.0
    assert G.score_gsm8k({"question": "?", "answer": "#### 1800"}, "#### 1,800")[G.EM_STRICT] == 1.0  # "," ignored
    assert G.gold_answer(doc) == "18"


def test_aggregates_are_lm_evals():
    from lm_eval.api.metrics import mean, mean_stderr
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

    rows = [G.score_ifeval(DOC, r) for r in ("it rained. we left.", "It rained.", "sure, ok", "a. b. c. d.")]
    scores = G.task_scores("ifeval", rows)
    for metric in (G.PROMPT_STRICT, G.PROMPT_LOOSE):
        assert scores[metric] == pytest.approx(mean([r[metric] for r in rows]))
        assert scores[f"{metric}_stderr"] == pytest.approx(mean_stderr([r[metric] for r in rows]))
    for metric in (G.INST_STRICT, G.INST_LOOSE):
        assert scores[metric] == agg_inst_level_acc([r[metric] for r in rows])
        assert scores[f"{metric}_stderr"] is None  # lm-eval: "N/A"
    one = G.task_scores("gsm8k", [{G.EM_STRICT: 1.0, G.EM_FLEXIBLE: 0.0}])
    assert one["n"] == 1 and one[f"{G.EM_STRICT}_stderr"] is None  # lm-eval: "N/A" for a single item


# --- a whole run, and bad input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50257, context_length=256, n_embd=32, n_layer=1, n_head=2)).eval()


def test_run_writes_results_and_paired_samples(tiny_gpt, enc, gen_bench_dir, tmp_path):
    results = G.run_generative(tiny_gpt, enc, gen_bench_dir, tmp_path / "out", tasks=["gsm8k", "ifeval"], limit=3,
                               sample_seed=5, max_gen_toks=6, batch_size=2, progress=False, model_ref="tiny")
    assert json.loads((tmp_path / "out" / G.RESULTS).read_text()) == results
    cfg = results["config"]
    assert cfg["template_mode"] == "plain" and cfg["fewshot_as_multiturn"] is None and cfg["tasks"] == ["gsm8k", "ifeval"]
    assert results["lm_eval"] == {"version": "0.4.13", "task_versions": {"gsm8k": 3.0, "ifeval": 4.0}}
    assert results["n_items"] == 6 and results["generated_tokens"] <= 36 and results["items_per_s"] > 0
    gsm8k, ifeval = results["tasks"]["gsm8k"], results["tasks"]["ifeval"]
    assert (gsm8k["max_gen_toks"], gsm8k["lm_eval_max_gen_toks"], ifeval["lm_eval_max_gen_toks"]) == (6, 256, 1280)
    assert gsm8k["num_fewshot"] == 5 and ifeval["num_fewshot"] == 0 and gsm8k["truncated"] == 3  # 5-shot > 250 tokens
    assert set(ifeval) >= {f"{m}{s}" for m in G.TASKS["ifeval"].metrics for s in ("", "_stderr")}
    assert sum(gsm8k["finish"].values()) == 3
    records = [json.loads(line) for line in (tmp_path / "out" / "samples" / "ifeval.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in records] == [it.doc_id for it in G.generative_items("ifeval", gen_bench_dir, limit=3,
                                                                                      sample_seed=5)]
    assert all(r["correct"] == r[G.PROMPT_LOOSE] and r["item_id"] == f"ifeval/{r['doc_id']}" for r in records)
    assert all(len(r[G.INST_STRICT]) == len(r["instruction_id_list"]) for r in records)
    math = [json.loads(line) for line in (tmp_path / "out" / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert all(r["correct"] == (r[G.EM_FLEXIBLE] == 1.0) and len(r["fewshot_ids"]) == 5 and r["truncated"] for r in math)
    again = G.run_generative(tiny_gpt, enc, gen_bench_dir, tmp_path / "again", tasks=["gsm8k", "ifeval"], limit=3,
                             sample_seed=5, max_gen_toks=6, batch_size=1, progress=False)
    assert again["sample_sha256"] == results["sample_sha256"]
    assert (tmp_path / "again" / "samples" / "gsm8k.jsonl").read_text() == (tmp_path / "out" / "samples" / "gsm8k.jsonl").read_text()


def test_bad_requests_name_what_is_wrong(tiny_gpt, enc, gen_bench_dir, tmp_path):
    with pytest.raises(G.GenerativeTaskError, match="unknown generative task 'gsm8kk'.*did you mean 'gsm8k'"):
        G.generative_items("gsm8kk", gen_bench_dir)
    with pytest.raises(G.GenerativeTaskError, match="ifeval: limit 600 .* 541 documents"):
        G.generative_items("ifeval", gen_bench_dir, limit=600)
    with pytest.raises(G.GenerativeTaskError, match="ifeval: num_fewshot 3"):
        G.generative_items("ifeval", gen_bench_dir, num_fewshot=3)
    with pytest.raises(G.GenerativeTaskError, match="gsm8k: max_gen_toks 256 .* context \\(256\\)"):
        G.run_generative(tiny_gpt, enc, gen_bench_dir, tmp_path / "x", tasks=["gsm8k"], limit=1, progress=False)
    with pytest.raises(G.GenerativeTaskError, match="unknown generative task 'mmlu'"):
        G.run_generative(tiny_gpt, enc, gen_bench_dir, tmp_path / "x", tasks=["mmlu"], limit=1, progress=False)
    assert not (tmp_path / "x").exists()
    assert issubclass(G.GenerativeTaskError, InputError)


def _bench(tmp_path: Path, name: str, lines: list[str]) -> Path:
    tmp_path.mkdir()
    (tmp_path / "data.jsonl").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "manifest.json").write_text(json.dumps({"sources": [{"name": name, "file": "data.jsonl"}]}))
    return tmp_path


def test_bad_data_names_the_file_line_and_key(tmp_path):
    good = json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    folder = _bench(tmp_path / "a", "ifeval", [good, json.dumps({"key": 2, "prompt": 3, "instruction_id_list": [], "kwargs": []})])
    with pytest.raises(BenchmarkDataError, match=r"data.jsonl:2: 'prompt' must be a str"):
        G.generative_items("ifeval", folder)
    folder = _bench(tmp_path / "b", "ifeval", [good.replace("punctuation:no_comma", "no:such")])
    with pytest.raises(BenchmarkDataError, match=r"data.jsonl:1: instruction ids \['no:such'\]"):
        G.generative_items("ifeval", folder)
    folder = _bench(tmp_path / "c", "gsm8k-test", [json.dumps({"question": "q", "answer": "no marker"})])
    with pytest.raises(BenchmarkDataError, match=r"data.jsonl:1: 'answer' has no '#### <number>'"):
        G.generative_items("gsm8k", folder, num_fewshot=0)
    with pytest.raises(BenchmarkDataError, match="no source named 'gsm8k-train'"):
        G.generative_items("gsm8k", _bench(tmp_path / "d", "gsm8k-test", [json.dumps({"question": "q", "answer": "#### 1"})]))


# --- Punkt, offline ----------------------------------------------------------------------------------------------

TEXTS = [
    "Dr. Smith went home. He was tired.",
    "The U.S. economy grew 3.5 percent in Jan. last year. Mr. J. Bach disagreed! Did he? Yes.",
    "\u201cHello there.\u201d Bye. It cost $4.50 at 5 p.m. on Fri. so we left.",
    "no capitals here. none at all. e.g. this one.",
]


def test_bundled_parameters_are_nltks_english(nltk_data):
    """The written folder reads back (through NLTK's parser) as the package's parameters; the digest is the constant."""
    bundled = P.bundled_english()
    assert bundled.digest == P.ENGLISH_SHA256
    lang_dir = nltk_data / "tokenizers" / "punkt_tab" / "english"
    assert P.read_punkt_tab(lang_dir) == bundled and P.punkt_tab_digest(lang_dir) == P.ENGLISH_SHA256
    assert (len(bundled.abbrev_types), len(bundled.collocations), len(bundled.sent_starters),
            len(bundled.ortho_context)) == (156, 37, 39, 20366)
    changed = P.PunktParams(bundled.abbrev_types | {"xyz"}, bundled.collocations, bundled.sent_starters, bundled.ortho_context)
    assert changed.digest != P.ENGLISH_SHA256
    zero = P.PunktParams(bundled.abbrev_types, bundled.collocations, bundled.sent_starters, {**bundled.ortho_context, "qq": 0})
    assert zero.digest == P.ENGLISH_SHA256  # a zero flag is NLTK's missing entry


def test_nltk_splits_sentences_as_the_punkt_package(nltk_data):
    """NLTK's PunktTokenizer on the written files, lm-eval's count_sentences and the package agree."""
    import nltk
    import punkt
    from lm_eval.tasks.ifeval.instructions_util import count_sentences

    assert Path(nltk.data.find("tokenizers/punkt_tab/english/").path).parents[2] == nltk_data
    ours = nltk.tokenize.PunktTokenizer("english")
    theirs = punkt.PunktSentenceTokenizer(punkt.load_model("english"))
    for text in TEXTS:
        assert ours.tokenize(text) == theirs.tokenize(text)
        assert count_sentences(text) == len(theirs.tokenize(text))
    assert [count_sentences(t) for t in TEXTS] == [2, 4, 3, 4]  # "e.g." ends a sentence for the English model


def test_lm_eval_imports_ifeval_without_a_download(tmp_path):
    """A fresh interpreter with no nltk_data anywhere and no network: ensure_punkt writes the folder, lm-eval's import
    finds it and nltk.download is never called."""
    script = """
import json, socket
import nltk
def refuse(*a, **k):
    raise AssertionError("network or download attempted")
nltk.download = refuse
socket.socket.connect = refuse
socket.create_connection = refuse
from lmcore.harness.punkt import ensure_punkt
root = ensure_punkt()
from lm_eval.tasks.ifeval import instructions_util
print(json.dumps([str(root), str(nltk.data.find("tokenizers/punkt_tab")), instructions_util.count_sentences("A b. C d.")]))
"""
    env = {**os.environ, "HOME": str(tmp_path / "home"), P.NLTK_DATA_ENV: str(tmp_path / "nltk"), "PYTHONPATH": str(ROOT)}
    env.pop("NLTK_DATA", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Downloaded" not in out.stdout and "nltk_data" not in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [str(tmp_path / "nltk"),
                                                               str(tmp_path / "nltk" / "tokenizers" / "punkt_tab"), 2]


def test_the_copy_is_written_once(nltk_data, monkeypatch):
    import nltk

    tab = nltk_data / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab"
    written = tab.stat().st_mtime_ns
    monkeypatch.setattr(nltk.data, "path", [])  # as a new process would start: checked again, not written again
    assert P.ensure_punkt(nltk_data) == nltk_data and nltk.data.path == [str(nltk_data)]
    assert tab.stat().st_mtime_ns == written


def test_a_damaged_copy_is_replaced_and_changed_parameters_fail_loudly(tmp_path, monkeypatch):
    import nltk

    root = tmp_path / "nltk"
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True)
    (lang_dir / "abbrev_types.txt").write_text("dr\n")  # a copy cut short
    monkeypatch.setattr(nltk.data, "path", [])  # NLTK finds no punkt_tab of its own
    assert P.ensure_punkt(root) == root and P.punkt_tab_digest(lang_dir) == P.ENGLISH_SHA256
    assert nltk.data.path == [str(root)]
    monkeypatch.setattr(nltk.data, "path", [])
    bundled = P.bundled_english()
    monkeypatch.setattr(P, "bundled_english", lambda: P.PunktParams(bundled.abbrev_types - {"dr"}, bundled.collocations,
                                                                    bundled.sent_starters, bundled.ortho_context))
    with pytest.raises(P.PunktError, match="not NLTK's English Punkt model"):
        P.ensure_punkt(tmp_path / "other")
    assert not (tmp_path / "other" / "tokenizers" / "punkt_tab").exists()
