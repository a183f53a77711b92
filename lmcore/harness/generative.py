"""Generative benchmarks, IFEval and GSM8K, prompted, generated and scored as lm-evaluation-harness 0.4.13 does.

    items = generative_items("gsm8k", data_dir, limit=100, sample_seed=1234)   # 5-shot, lm-eval's few-shot draws
    ids = build_prompts(items, enc, chat=True)                                  # lm-eval's --apply_chat_template ids
    results = run_generative(model, enc, data_dir, Path("reports/generative"), tasks=["ifeval", "gsm8k"],
                             limit=50, sample_seed=1234, max_gen_toks=None, batch_size=16)
    results["tasks"]["gsm8k"]["exact_match_flexible_extract"], results["tasks"]["ifeval"]["prompt_level_loose_acc"]

`data_dir` is a collected benchmark folder (lmcore.data.collect) whose manifest names lmcore.config.GENERATIVE_SOURCES.

What lm-eval does, and what is done here the same way (its `ifeval.yaml`, `gsm8k.yaml`, api/task.py, api/samplers.py,
models/huggingface.py `generate_until`):

| | ifeval (version 4.0) | gsm8k (version 3.0) |
|---|---|---|
| documents | input_data.jsonl (= hub google/IFEval, split train) | test.jsonl (= hub openai/gsm8k main, test) |
| prompt | `prompt`, 0-shot | k = 5 train examples `Question: {q}\\nAnswer: {a}` joined by "\\n\\n", then `Question: {q}\\nAnswer:` |
| stop strings | none (+ the tokenizer's eos text) | "Question:", "</s>", "<\\|im_end\\|>" (+ the eos text) |
| max_gen_toks | 1280 | 256 (HFLM's default: gsm8k.yaml sets none) |
| scores | lm_eval.tasks.ifeval.utils.process_results | lm-eval's regex + take_first filters, exact_match |

Few-shot examples (gsm8k): lm-eval's default sampler draws them with `random.Random(1234)` (simple_evaluate's
fewshot_random_seed) as `rnd.sample(train_docs, k)`, one draw per evaluated document, in document order, from one
generator per task: the examples of a document depend on how many documents were evaluated before it. A run over
our seeded sample gets the draws lm-eval makes for `--samples '{"gsm8k": [the sampled doc ids]}'` (doc ids in
file order), and a run over every document those of a full lm-eval run.

Chat templates (`chat_template="auto"`: the tokenizer's own when it has one): the prompt is what lm-eval builds with
`--apply_chat_template`. In 0.4.13 that flag alone turns `fewshot_as_multiturn` on (its CLI and simple_evaluate
default), so few-shot examples are user/assistant turns ("Question: q\\nAnswer:" / the answer) and the document is
the last user turn; with `fewshot_as_multiturn=False` the whole plain-text prompt is one user message. The template
runs with add_generation_prompt (lmcore.chat.render, as transformers' apply_chat_template renders it) and the text
is encoded as HFLM encodes it: special tokens spelled in it are those tokens, and no BOS is added (HFLM leaves BOS to
the tokenizer, which adds none for the tokenizers lmcore carries: the parity tests compare the ids).

Generated text, as HFLM makes it: the prompt is cut from the left to context_length - max_gen_toks tokens; greedy
decoding stops at the tokenizer's eos (lm-eval adds its text to the stop strings) or a stop string, or after
max_gen_toks tokens; the text is the tokens decoded without special tokens, cut at the first stop string.
lmcore.generation also stops at the tokenizer's other end ids (SmolLM2's <|endoftext|>); lm-eval does not, so such a
completion is resumed where it stopped until lm-eval would have stopped.

IFEval's checkers are built with random arguments where a document's own are unusable (keys 1122 and 1129 ask for
the letter "#" / "!", which LetterFrequencyChecker replaces with `random.choice`): lm-eval's verdict then depends
on its global random state. Here each document is scored with `random` seeded from its key, so scores repeat; the
samples record which instructions drew (`random_instructions`).

Standard errors as lm-eval reports them: the sample standard error of the mean for prompt_level_* and exact_match;
inst_level_* are a mean over all instructions (utils.agg_inst_level_acc), for which lm-eval reports "N/A": None.

Outputs of run_generative (out_dir, replaced whole):
    results.json       config (tasks, limit, sample_seed, batch size, max_gen_toks, template mode, few-shot layout),
                       lm-eval's version and task versions, the scorer version, the sample's sha256, timing (items/s,
                       generated tokens/s), per task its scores with standard errors, num_fewshot, the max_gen_toks
                       used and lm-eval's, how many prompts were cut and how completions ended (eos, stop string,
                       max_gen_toks)
    samples/<task>.jsonl  one record per document: item_id ("<task>/<doc_id>", to pair two models' records), prompt,
                       response, finish; ifeval: per-instruction strict and loose verdicts; gsm8k: the few-shot ids,
                       the gold answer and the strict and flexible extractions with their exact matches; `correct`:
                       the headline verdict (ifeval prompt_level_loose_acc, gsm8k flexible-extract exact match)
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from lmcore.chat import ChatTemplateError, render
from lmcore.errors import InputError
from lmcore.generation import Completion, encode_prompt, generate_batch
from lmcore.harness.benchmarks import BenchmarkDataError, read_jsonl, sample, source_file
from lmcore.harness.gentasks import (
    EM_FLEXIBLE,
    EM_STRICT,
    INST_LOOSE,
    INST_STRICT,
    LM_EVAL_NAMES,
    PROMPT_LOOSE,
    PROMPT_STRICT,
    TASKS,
    GenTask,
)
from lmcore.harness.punkt import ensure_punkt
from lmcore.io import atomic_dir, atomic_file, write_json
from lmcore.model import GPT

GENERATIVE_TASKS = ("ifeval", "gsm8k")
LM_EVAL_VERSION = "0.4.13"
SCORER_VERSION = "lmcore-generative/1 (lm-eval 0.4.13 scoring)"
FEWSHOT_SEED = 1234  # lm-eval's simple_evaluate fewshot_random_seed
RESULTS = "results.json"
SAMPLES_DIR = "samples"
ChatMode = Literal["auto", "chat", "none"]  # InstructEvalConfig.chat_template takes "auto" and "none"


# gsm8k.yaml's filters (name -> regex_pattern, group_select; then take_first) and its exact_match arguments.
GSM8K_FILTERS = {EM_STRICT: (r"#### (\-?[0-9\.\,]+)", 0), EM_FLEXIBLE: (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)}
GSM8K_EXACT_MATCH = {"ignore_case": True, "ignore_punctuation": False,
                     "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}


class GenerativeTaskError(InputError):
    """A generative task asked for in a way it cannot be run: the message names the task and the setting."""


_MEAN_OF_INSTRUCTIONS = (INST_STRICT, INST_LOOSE)  # lm-eval: utils.agg_inst_level_acc, stderr "N/A"


@dataclass(frozen=True)
class Turn:
    """One of lm-eval's prompt Messages: plain text is content + delimiter; a chat turn is {role, content}."""

    role: str  # "user" | "assistant"
    content: str
    delimiter: str = ""


@dataclass(frozen=True)
class GenItem:
    """One document to complete: the document as lm-eval's scorers read it and the turns of its prompt."""

    task: str
    doc_id: int  # position in the evaluated split (file order)
    doc: dict = field(hash=False)  # ifeval: key, prompt, instruction_id_list, kwargs; gsm8k: question, answer
    turns: tuple[Turn, ...]  # few-shot user/assistant turns, then the document's user turn
    fewshot_ids: tuple[int, ...] = ()  # the few-shot examples' positions in the train split

    @property
    def text(self) -> str:
        """The prompt as plain text (lm-eval without a chat template)."""
        return "".join(t.content + t.delimiter for t in self.turns)

    def messages(self, fewshot_as_multiturn: bool = True) -> list[dict[str, str]]:
        """The conversation lm-eval gives a chat template: every turn, or the plain text as one user message."""
        if fewshot_as_multiturn:
            return [{"role": t.role, "content": t.content} for t in self.turns]
        return [{"role": "user", "content": self.text}]


def task_version(task: str) -> float:
    """The lm-eval task version (metadata.version of its YAML) whose scores this module reproduces."""
    return _task(task).version


def _task(name: str) -> GenTask:
    if name not in TASKS:
        hint = difflib.get_close_matches(name, list(TASKS), n=1)
        raise GenerativeTaskError(f"unknown generative task {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                  + f"; known: {list(GENERATIVE_TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------------------------
# Documents


def _field(record: dict, key: str, kind: type, where: str):
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BenchmarkDataError(f"{where}: {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def read_ifeval(path: Path) -> list[dict]:
    """input_data.jsonl: {"key", "prompt", "instruction_id_list", "kwargs"}, one per line (lm-eval's doc fields);
    every instruction one that lm-eval's IFEval registry checks."""
    ensure_punkt()
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    docs = []
    for lineno, r in read_jsonl(path):
        where = f"{path}:{lineno}"
        ids, kwargs = _field(r, "instruction_id_list", list, where), _field(r, "kwargs", list, where)
        if len(ids) != len(kwargs) or not all(isinstance(k, dict) for k in kwargs):
            raise BenchmarkDataError(f"{where}: 'kwargs' must be one object per instruction ({len(ids)} instructions)")
        unknown = [t for t in ids if t not in INSTRUCTION_DICT]
        if unknown:
            raise BenchmarkDataError(f"{where}: instruction ids {unknown} are not IFEval's")
        docs.append({"key": _field(r, "key", int, where), "prompt": _field(r, "prompt", str, where),
                     "instruction_id_list": ids, "kwargs": kwargs})
    return docs


def read_gsm8k(path: Path) -> list[dict]:
    """GSM8K JSONL: {"question", "answer"}, the answer ending in "#### <number>"."""
    docs = []
    for lineno, r in read_jsonl(path):
        where = f"{path}:{lineno}"
        doc = {"question": _field(r, "question", str, where), "answer": _field(r, "answer", str, where)}
        if "#### " not in doc["answer"]:
            raise BenchmarkDataError(f"{where}: 'answer' has no '#### <number>' line")
        docs.append(doc)
    return docs


def gsm8k_turns(doc: dict, fewshot: Sequence[dict]) -> tuple[Turn, ...]:
    """lm-eval's fewshot_context for gsm8k: each example a user turn ("Question: q\\nAnswer:" + target delimiter " ")
    and an assistant turn (the answer + fewshot delimiter "\\n\\n"), then the document's user turn."""
    turns: list[Turn] = []
    for ex in fewshot:
        turns += [Turn("user", f"Question: {ex['question']}\nAnswer:", " "), Turn("assistant", ex["answer"], "\n\n")]
    return (*turns, Turn("user", f"Question: {doc['question']}\nAnswer:"))


def generative_items(task: str, data_dir: Path, *, limit: int | None = None, sample_seed: int = 1234,
                     num_fewshot: int | None = None) -> list[GenItem]:
    """The sampled documents of `task`, in document order, with their prompts.

    Args:
        data_dir: a collected benchmark folder holding the task's sources.
        limit: documents drawn (lmcore.harness.benchmarks.sample: seeded with (sample_seed, task)); None: all.
        num_fewshot: gsm8k's examples per prompt; None: lm-eval's default (5). IFEval is 0-shot only (lm-eval
            ignores a num_fewshot for a task whose config fixes 0).

    Raises: GenerativeTaskError for an unknown task, a limit above the task's size or a num_fewshot it cannot
        take; BenchmarkDataError / MissingInputError naming the file for bad data.
    """
    spec = _task(task)
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0 or (k and spec.fewshot_source is None):
        raise GenerativeTaskError(f"{task}: num_fewshot {k}: {task} is {spec.num_fewshot}-shot only in lm-eval")
    path = source_file(Path(data_dir), spec.source)
    docs = read_ifeval(path) if task == "ifeval" else read_gsm8k(path)
    if limit is not None and not 1 <= limit <= len(docs):
        raise GenerativeTaskError(f"{task}: limit {limit} is not between 1 and the task's {len(docs)} documents ({path})")
    if task == "ifeval":
        items = [GenItem(task, i, d, (Turn("user", d["prompt"]),)) for i, d in enumerate(docs)]
        return sample(items, limit, sample_seed)
    picked = sample([GenItem(task, i, d, ()) for i, d in enumerate(docs)], limit, sample_seed)
    train = read_gsm8k(source_file(Path(data_dir), spec.fewshot_source)) if k else []
    if k > len(train):
        raise GenerativeTaskError(f"{task}: num_fewshot {k} exceeds the {len(train)} training examples")
    rnd = random.Random(FEWSHOT_SEED)  # one generator per task, advanced once per evaluated document
    items = []
    for it in picked:
        shots = tuple(rnd.sample(range(len(train)), k)) if k else ()  # = rnd.sample(train_docs, k), by position
        items.append(GenItem(task, it.doc_id, it.doc, gsm8k_turns(it.doc, [train[j] for j in shots]), shots))
    return items


def sample_sha256(items: Sequence[GenItem]) -> str:
    """Identifies what was asked: every item's task, doc id and plain-text prompt, in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.task, it.doc_id, it.text], ensure_ascii=False).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def has_chat_template(enc) -> bool:
    """Whether the tokenizer carries a chat template (lmcore.tokenizer.Tokenizer.chat_template)."""
    return bool(getattr(enc, "chat_template", None))


def _special_text(enc, token: int | None) -> str | None:
    """A special token's text (what a template sees as bos_token / eos_token), or None."""
    return None if token is None else enc.decode_single_token_bytes(token).decode("utf-8", "replace")


def prompt_text(item: GenItem, enc, chat: bool, *, fewshot_as_multiturn: bool = True) -> str:
    """The prompt as lm-eval hands it to HFLM: plain text, or the conversation through the tokenizer's template."""
    if not chat:
        return item.text
    if not has_chat_template(enc):
        raise ChatTemplateError(f"the tokenizer {getattr(enc, 'name', enc)} has no chat template")
    return render(enc.chat_template, item.messages(fewshot_as_multiturn), add_generation_prompt=True,
                  bos_token=_special_text(enc, getattr(enc, "bos_token", None)),
                  eos_token=_special_text(enc, getattr(enc, "eos_token", None)))


def build_prompts(items: Sequence[GenItem], enc, chat: bool, *, fewshot_as_multiturn: bool = True) -> list[list[int]]:
    """Each item's prompt token ids, as HFLM's tokenizer makes them of `prompt_text` (not yet cut to the context)."""
    return [encode_prompt(enc, prompt_text(it, enc, chat, fewshot_as_multiturn=fewshot_as_multiturn)) for it in items]


def resolve_chat(enc, chat_template: ChatMode) -> bool:
    """Whether prompts go through the chat template: "auto" when the tokenizer has one, "chat" always (an error
    without one), "none" never (plain-text prompts)."""
    if chat_template not in ("auto", "chat", "none"):
        raise GenerativeTaskError(f"chat_template {chat_template!r}: expected 'auto', 'chat' or 'none'")
    if chat_template == "chat" and not has_chat_template(enc):
        raise ChatTemplateError(f"chat_template 'chat': the tokenizer {getattr(enc, 'name', enc)} has no chat template")
    return chat_template == "chat" or (chat_template == "auto" and has_chat_template(enc))


# ---------------------------------------------------------------------------------------------------------------
# Generation, as HFLM.generate_until


def lm_eval_eos(enc) -> int:
    """The id whose text HFLM adds to the stop strings and at which transformers' generate stops: the tokenizer's eos
    (HF tokenizers), else its end-of-text (GPT-2's <|endoftext|>)."""
    eos = getattr(enc, "eos_token", None)
    return enc.eot_token if eos is None else eos


def stop_strings(task: str, enc) -> list[str]:
    """The task's `until`, then the eos text (lm-eval's handle_stop_sequences)."""
    until = list(_task(task).until)
    eos = _special_text(enc, lm_eval_eos(enc))
    return until + [eos] if eos not in until else until


def completion_text(enc, token_ids: Sequence[int], until: Sequence[str]) -> str:
    """HFLM's text of generated ids: decoded without special tokens (tok_decode, skip_special_tokens=True), then cut
    at the first stop string (postprocess_generated_text)."""
    skip = enc.special_ids
    text = enc.decode([t for t in token_ids if t not in skip and t < enc.n_vocab])
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def generate_like_lm_eval(model: GPT, enc, prompts: Sequence[Sequence[int]], max_gen_toks: int, until: Sequence[str], *,
                          batch_size: int = 16, progress=None) -> list[list[int]]:
    """Greedy completions (token ids) of `prompts` that stop where HFLM's would: at lm-eval's eos, a stop string or
    max_gen_toks. lmcore.generation also ends at the tokenizer's other end ids; such a completion is resumed."""
    eos = lm_eval_eos(enc)
    done = generate_batch(model, enc, prompts, max_gen_toks, stop=until, batch_size=batch_size, progress=progress)
    ids = [list(c.token_ids) for c in done]

    def resumable(i: int, c: Completion) -> bool:
        return c.finish_reason == "stop" and bool(c.token_ids) and c.token_ids[-1] != eos \
            and c.token_ids[-1] in set(enc.stop_tokens) and len(ids[i]) < max_gen_toks

    pending = [i for i, c in enumerate(done) if resumable(i, c)]
    while pending:
        more = [generate_batch(model, enc, [list(prompts[i]) + ids[i]], max_gen_toks - len(ids[i]), stop=until,
                               batch_size=1)[0] for i in pending]
        for i, c in zip(pending, more):
            ids[i] += c.token_ids
        pending = [i for i, c in zip(pending, more) if resumable(i, c)]
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Scoring, with lm-eval's own code


@contextlib.contextmanager
def _seeded_random(seed: str) -> Iterator[None]:
    """`random` seeded for the block, then put back: IFEval checkers may draw arguments from it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def random_instructions(doc: dict) -> list[int]:
    """Indices of the instructions whose checker lm-eval builds with arguments drawn from `random` (see the module
    docstring): their verdicts depend on lm-eval's global random state."""
    ensure_punkt()
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    drawn = []
    for i, (iid, kwargs) in enumerate(zip(doc["instruction_id_list"], doc["kwargs"])):
        state = random.getstate()
        checker = INSTRUCTION_DICT[iid](iid)
        checker.build_description(**{k: v for k, v in kwargs.items() if v})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=doc["prompt"])
        if random.getstate() != state:
            drawn.append(i)
        random.setstate(state)
    return drawn


def score_ifeval(doc: dict, response: str) -> dict:
    """lm_eval.tasks.ifeval.utils.process_results on one response: prompt-level verdicts (all instructions
    followed) and one verdict per instruction, strict and loose."""
    ensure_punkt()
    from lm_eval.tasks.ifeval.utils import process_results

    with _seeded_random(f"ifeval:{doc['key']}"):
        out = process_results(doc, [response])
    return {PROMPT_STRICT: bool(out[PROMPT_STRICT]), INST_STRICT: [bool(v) for v in out[INST_STRICT]],
            PROMPT_LOOSE: bool(out[PROMPT_LOOSE]), INST_LOOSE: [bool(v) for v in out[INST_LOOSE]]}


def gsm8k_extract(response: str) -> dict[str, str]:
    """The answer each of gsm8k's filter pipelines (lm-eval's RegexFilter, then TakeFirstFilter) extracts;
    "[invalid]" where its regex finds nothing."""
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    out = {}
    for metric, (pattern, group) in GSM8K_FILTERS.items():
        resps = RegexFilter(regex_pattern=pattern, group_select=group).apply([[response]], [{}])
        out[metric] = list(TakeFirstFilter().apply(resps, [{}]))[0]
    return out


def score_gsm8k(doc: dict, response: str) -> dict:
    """Both extractions and lm-eval's exact_match of each against the target (the whole answer; the metric's
    regexes_to_ignore keep what follows "#### ")."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    answers = gsm8k_extract(response)
    out: dict = {"answers": answers}
    for metric, answer in answers.items():
        em = exact_match_hf_evaluate(predictions=[answer], references=[doc["answer"]], **GSM8K_EXACT_MATCH)
        out[metric] = float(em["exact_match"])
    return out


def gold_answer(doc: dict) -> str:
    """GSM8K's final answer: the text after the last "#### "."""
    return doc["answer"].rsplit("#### ", 1)[-1].strip()


@dataclass(frozen=True)
class Generation:
    """What one prompt gave: the ids generated (as lm-eval's generate would have them) and HFLM's text of them."""

    prompt: str  # the prompt text handed to the tokenizer
    prompt_ids: list[int]  # cut from the left to context_length - max_gen_toks, as HFLM cuts them
    truncated: bool
    ids: list[int]
    response: str
    finish: str  # "eos", "stop_string" or "length"
    passed_end_ids: int  # lmcore end ids lm-eval does not stop at, generated past (see generate_like_lm_eval)


def item_record(item: GenItem, gen: Generation) -> dict:
    """The per-item record of samples/<task>.jsonl: what was asked, what came back, the verdicts; `correct` is the
    task's headline verdict (ifeval: prompt_level_loose_acc, gsm8k: flexible-extract exact match)."""
    record = {"task": item.task, "doc_id": item.doc_id, "item_id": f"{item.task}/{item.doc_id}", "prompt": gen.prompt,
              "prompt_tokens": len(gen.prompt_ids), "truncated": gen.truncated, "response": gen.response,
              "generated_tokens": len(gen.ids), "finish": gen.finish, "passed_end_ids": gen.passed_end_ids}
    if item.task == "ifeval":
        record.update({"key": item.doc["key"], "instruction_id_list": item.doc["instruction_id_list"],
                       "random_instructions": random_instructions(item.doc), **score_ifeval(item.doc, gen.response)})
    else:
        scores = score_gsm8k(item.doc, gen.response)
        record.update({"fewshot_ids": list(item.fewshot_ids), "gold": gold_answer(item.doc),
                       "strict_answer": scores["answers"][EM_STRICT], "flexible_answer": scores["answers"][EM_FLEXIBLE],
                       EM_STRICT: scores[EM_STRICT], EM_FLEXIBLE: scores[EM_FLEXIBLE]})
    record["correct"] = bool(record[TASKS[item.task].headline])
    return record


def task_scores(task: str, records: Sequence[dict]) -> dict:
    """{metric, metric_stderr} over a task's records, aggregated by lm-eval's own functions: `mean` with
    `mean_stderr` (None for one record: lm-eval's "N/A"), or IFEval's agg_inst_level_acc (stderr "N/A": None)."""
    from lm_eval.api.metrics import mean, mean_stderr

    out: dict = {"n": len(records)}
    for metric in TASKS[task].metrics:
        values = [r[metric] for r in records]
        if metric in _MEAN_OF_INSTRUCTIONS:
            ensure_punkt()
            from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

            out[metric], out[f"{metric}_stderr"] = float(agg_inst_level_acc(values)), None
        else:
            out[metric] = float(mean(values))
            out[f"{metric}_stderr"] = float(mean_stderr(values)) if len(values) > 1 else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# A run


def generate_items(model: GPT, enc, items: Sequence[GenItem], *, chat: bool, fewshot_as_multiturn: bool = True,
                   max_gen_toks: int, batch_size: int = 16, progress=None) -> list[Generation]:
    """Prompt, cut and complete one task's items as HFLM.generate_until does (see the module docstring)."""
    task = items[0].task if items else "gsm8k"
    ctx = model.config.context_length
    if not 1 <= max_gen_toks < ctx:
        raise GenerativeTaskError(f"{task}: max_gen_toks {max_gen_toks} must be between 1 and the model's context "
                                  f"({ctx}) - 1: HFLM keeps context_length - max_gen_toks prompt tokens")
    keep = ctx - max_gen_toks
    texts = [prompt_text(it, enc, chat, fewshot_as_multiturn=fewshot_as_multiturn) for it in items]
    full = [encode_prompt(enc, x) for x in texts]
    prompts = [p[-keep:] for p in full]
    until = stop_strings(task, enc)
    outs = generate_like_lm_eval(model, enc, prompts, max_gen_toks, until, batch_size=batch_size, progress=progress)
    eos = lm_eval_eos(enc)
    passed = set(enc.stop_tokens) - {eos}

    def finish(ids: list[int]) -> str:
        return "eos" if ids[-1:] == [eos] else "length" if len(ids) >= max_gen_toks else "stop_string"

    return [Generation(x, p, len(f) > keep, o, completion_text(enc, o, until), finish(o), sum(t in passed for t in o))
            for x, f, p, o in zip(texts, full, prompts, outs)]


def run_generative(
    model: GPT,
    enc,
    data_dir: Path,
    out_dir: Path,
    *,
    tasks: Sequence[str] = GENERATIVE_TASKS,
    limit: int | None = None,
    sample_seed: int = 1234,
    max_gen_toks: int | None = None,
    batch_size: int = 16,
    chat_template: ChatMode = "auto",
    fewshot_as_multiturn: bool = True,
    num_fewshot: int | None = None,
    model_ref: str = "",
    progress: bool = True,
) -> dict:
    """Generate and score `tasks` on `model`; write out_dir (results.json, samples/<task>.jsonl, replaced whole);
    return the results (results.json).

    Args:
        enc: the model's lmcore tokenizer (lmcore.tokenizer.load_tokenizer / get_tokenizer).
        data_dir: a collected benchmark folder with lmcore.config.GENERATIVE_SOURCES.
        limit: documents per task, drawn with `sample_seed`; None: all (541 ifeval, 1,319 gsm8k).
        max_gen_toks: the most tokens generated per item; None: lm-eval's (ifeval 1280, gsm8k 256). A larger value
            is lowered to lm-eval's; a lower one is recorded (answers cut shorter than lm-eval's score lower).
        batch_size: prompts decoded together (lmcore.generation.generate_batch).
        chat_template: "auto" (the tokenizer's template when it has one, as --apply_chat_template), "chat" (an
            error without one) or "none" (plain-text prompts); results.json's template_mode says which ran.
        fewshot_as_multiturn: under a template, few-shot examples as turns (lm-eval 0.4.13's default with
            --apply_chat_template) or the plain prompt as one user message (--fewshot_as_multiturn false).
        num_fewshot: gsm8k's examples; None: 5.
        model_ref: how the model was named, recorded in the results.
    """
    chat = resolve_chat(enc, chat_template)
    names = list(dict.fromkeys(_task(t).name for t in tasks))
    shots = {t: TASKS[t].num_fewshot if num_fewshot is None or t == "ifeval" else num_fewshot for t in names}
    items = {t: generative_items(t, data_dir, limit=limit, sample_seed=sample_seed, num_fewshot=shots[t]) for t in names}
    budgets = {t: min(max_gen_toks or TASKS[t].max_gen_toks, TASKS[t].max_gen_toks) for t in names}
    generations: dict[str, list[Generation]] = {}
    start = time.perf_counter()
    with tqdm(total=sum(map(len, items.values())), desc="generating", unit="item", disable=not progress,
              dynamic_ncols=True) as bar:
        for t in names:
            generations[t] = generate_items(model, enc, items[t], chat=chat, fewshot_as_multiturn=fewshot_as_multiturn,
                                            max_gen_toks=budgets[t], batch_size=batch_size, progress=bar.update)
    elapsed = time.perf_counter() - start
    records = {t: [item_record(it, g) for it, g in zip(items[t], generations[t])] for t in names}
    n_items = sum(map(len, records.values()))
    n_tokens = sum(len(g.ids) for gs in generations.values() for g in gs)
    results = {
        "model": model_ref,
        "config": {"tasks": names, "limit": limit, "sample_seed": sample_seed, "batch_size": batch_size,
                   "max_gen_toks": max_gen_toks, "chat_template": chat_template, "template_mode": "chat" if chat else "plain",
                   "fewshot_as_multiturn": fewshot_as_multiturn if chat else None,
                   "chat_template_sha256": hashlib.sha256(enc.chat_template.encode()).hexdigest() if chat else None,
                   "fewshot_seed": FEWSHOT_SEED, "context_length": model.config.context_length},
        "lm_eval": {"version": LM_EVAL_VERSION, "task_versions": {t: TASKS[t].version for t in names}},
        "scorer_version": SCORER_VERSION,
        "sample_sha256": sample_sha256([it for t in names for it in items[t]]),
        "n_items": n_items,
        "elapsed_s": round(elapsed, 3),  # generation alone
        "items_per_s": round(n_items / elapsed, 3) if elapsed > 0 else None,
        "generated_tokens": n_tokens,
        "tokens_per_s": round(n_tokens / elapsed, 1) if elapsed > 0 else None,
        "tasks": {t: _task_summary(t, records[t], shots[t], budgets[t]) for t in names},
    }
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / RESULTS, results)
        (tmp / SAMPLES_DIR).mkdir()
        for t, rs in records.items():
            with atomic_file(tmp / SAMPLES_DIR / f"{t}.jsonl", "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rs)
    return results


def _task_summary(task: str, records: list[dict], num_fewshot: int, max_gen_toks: int) -> dict:
    """A task's entry in results.json: its scores, how it was run, how its completions ended."""
    spec = TASKS[task]
    return {**task_scores(task, records), "headline": spec.headline, "version": spec.version, "num_fewshot": num_fewshot,
            "max_gen_toks": max_gen_toks, "lm_eval_max_gen_toks": spec.max_gen_toks,
            "truncated": sum(r["truncated"] for r in records),
            "finish": {k: sum(r["finish"] == k for r in records) for k in ("eos", "stop_string", "length")}}


__all__ = [
    "EM_FLEXIBLE",
    "EM_STRICT",
    "FEWSHOT_SEED",
    "GENERATIVE_TASKS",
    "GenItem",
    "GenTask",
    "Generation",
    "GenerativeTaskError",
    "INST_LOOSE",
    "INST_STRICT",
    "LM_EVAL_NAMES",
    "LM_EVAL_VERSION",
    "PROMPT_LOOSE",
    "PROMPT_STRICT",
    "RESULTS",
    "SAMPLES_DIR",
    "SCORER_VERSION",
    "TASKS",
    "Turn",
    "build_prompts",
    "completion_text",
    "generate_items",
    "generate_like_lm_eval",
    "generative_items",
    "gold_answer",
    "gsm8k_extract",
    "has_chat_template",
    "item_record",
    "lm_eval_eos",
    "prompt_text",
    "random_instructions",
    "read_gsm8k",
    "read_ifeval",
    "resolve_chat",
    "run_generative",
    "sample_sha256",
    "score_gsm8k",
    "score_ifeval",
    "stop_strings",
    "task_scores",
    "task_version",
]
