"""LLM-as-judge (book ch. 7): a judge model scores each instruction response from 0 to 100.

    cfg = params.judge  # url: http://127.0.0.1:11434/v1 (Ollama), model: llama3
    metrics = judge_responses(cfg, Path("reports/instruct/test_responses.jsonl"), Path("reports/judge/instruct"),
                              api_key=os.environ.get(cfg.api_key_env))

The judge is any OpenAI-compatible chat endpoint: Ollama's /v1, vLLM, a llama.cpp server, OpenAI, or
`lmcore serve` (which makes a self-contained test possible). Each response is scored with the book's
prompt; a reply without an integer in 0..100 is counted as unparsed and left out of the mean, never
guessed. With no endpoint configured there is nothing to ask: `judge_skip_reason` says so.

Outputs (the folder is replaced whole): scores.jsonl (one row per response: instruction, input,
output, response, judge_reply, score or null) and metrics.json (mean_score, stderr, n_items,
n_scored, n_unparsed and the judge's url, model and sampling options). The API key is sent in the
Authorization header only: it is never logged or written; nor are credentials in the URL (lmcore.redact).
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from lmcore.config import JudgeConfig
from lmcore.errors import InputError, TransientError, one_line
from lmcore.finetune.data import RESPONSE_MARKERS, DataError, format_prompt
from lmcore.io import atomic_dir, jsonl_objects, utf8_error, write_json, write_text
from lmcore.paths import JUDGE_SCORES, METRICS
from lmcore.redact import redact

log = logging.getLogger(__name__)

PROMPT_NAME = "book ch. 7 (0-100)"  # recorded in metrics.json: which prompt and scale made the scores
RESPONSE_FIELDS = ("instruction", "output", "response")  # required in test_responses.jsonl; "input" is optional
MAX_SCORE = 100
MAX_ERROR_TEXT = 300  # characters of a server's error body quoted in an exception

# The first integer, not part of a word or a decimal ("85", "Score: 85", "85/100", "**85**").
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?!\w)")
# Reasoning models (deepseek-r1, qwen3 through Ollama) may think aloud before the answer.
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


class JudgeError(InputError):
    """The judge endpoint refused the request (HTTP 4xx) or answered something unusable; the message names the URL."""


class JudgeUnavailable(TransientError):
    """The judge endpoint still failed after its retries (connection refused, timeout, HTTP 429 or 5xx)."""


def format_input(entry: dict) -> str:
    """The Alpaca instruction (and input, when non-empty) without the response part (the book's format_input)."""
    prompt = format_prompt(entry, "alpaca")
    suffix = f"\n\n{RESPONSE_MARKERS['alpaca']}\n"
    assert prompt.endswith(suffix), "the alpaca template ends with the response marker"
    return prompt[: -len(suffix)]


def judge_prompt(entry: dict) -> str:
    """The book's scoring prompt for one response.

    Args:
        entry: has "instruction", "input" (may be empty or absent), "output" (the reference) and "response".
    """
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry['response']}`"
        f" on a scale from 0 to {MAX_SCORE}, where {MAX_SCORE} is the best score. "
        f"Respond with the integer number only."
    )


# Worked examples a small judge sees before each real request (`judge.calibration_examples`): the book's prompt
# for a right and a wrong answer, each followed by the judge's expected reply, as earlier chat turns.
CALIBRATION = (
    ({"instruction": "What is 2 + 2?", "input": "", "output": "4", "response": "2 + 2 is 4."}, "95"),
    ({"instruction": "Name a fruit.", "input": "", "output": "Apple", "response": "The sky is blue."}, "5"),
)


def calibration_turns(n: int) -> list[dict[str, str]]:
    """The first `n` calibration examples as user/assistant turns."""
    turns = []
    for entry, score in CALIBRATION[:n]:
        turns += [{"role": "user", "content": judge_prompt(entry)}, {"role": "assistant", "content": score}]
    return turns


def parse_score(reply: str) -> int | None:
    """The score a judge's reply gives: its first integer, if in 0..100.

    Returns: the integer, or None when the reply has no number, its first number is not an integer
    (e.g. 7.5) or it is out of range.
    """
    match = _NUMBER.search(_THINK.sub("", reply))
    if match is None:
        return None
    value = float(match.group())
    if not value.is_integer() or not 0 <= value <= MAX_SCORE:
        return None
    return int(value)


def judge_skip_reason(cfg: JudgeConfig) -> str | None:
    """Why the judge cannot run with this config (no endpoint), or None when it can."""
    if cfg.serve:
        return None
    if not cfg.url or not cfg.model:
        return (
            "no judge endpoint configured: set judge.url (an OpenAI-compatible base URL such as "
            "http://127.0.0.1:11434/v1) and judge.model in params.yaml, or judge.serve (a model to serve for it)"
        )
    return None


def _server_message(response: httpx.Response) -> str:
    """The error message in a response body: OpenAI's {"error": {"message"}}, Ollama's {"error": "..."}, or the text."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text[:MAX_ERROR_TEXT]) or "(empty body)"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return one_line(str(error["message"])[:MAX_ERROR_TEXT])
    if isinstance(error, str):
        return one_line(error[:MAX_ERROR_TEXT])
    return json.dumps(body)[:MAX_ERROR_TEXT]


class ChatClient:
    """A minimal OpenAI chat-completions client with retries.

    Connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff
    (backoff_s, 2 * backoff_s, ...); any other HTTP error fails at once.

        with ChatClient("http://127.0.0.1:11434/v1", "llama3", timeout_s=60, retries=3) as client:
            text = client.complete("Respond with the integer number only: 6 * 7", temperature=0, seed=123, max_tokens=8)
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ):
        """Args:
        url: the API's base URL (ending in /v1 for most servers); requests go to {url}/chat/completions.
        model: the model name at that endpoint.
        api_key: sent as a bearer token when given.
        timeout_s: per attempt (connect, read and write each).
        retries: further attempts after the first, for retryable failures.
        backoff_s: the first wait between attempts; it doubles after each.
        """
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError(f"need retries >= 0, backoff_s >= 0, timeout_s > 0; got {retries}, {backoff_s}, {timeout_s}")
        self.endpoint = redact(url.rstrip("/") + "/chat/completions")
        self.model = model
        self.retries, self.backoff_s = retries, backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._url = url.rstrip("/") + "/chat/completions"
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def complete(self, prompt: str, *, temperature: float = 0.0, seed: int | None = None, max_tokens: int | None = None,
                 history: list[dict[str, str]] | None = None) -> str:
        """Send `prompt` as a user message, after `history` (earlier turns); returns the reply text ("" when the
        reply has no content).

        Raises: JudgeUnavailable naming the URL when the endpoint still fails after the retries; JudgeError when
        it refuses the request (HTTP 4xx other than 429) or answers malformed JSON.
        """
        messages = [*(history or []), {"role": "user", "content": prompt}]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return self._reply(self._post(body))

    def _post(self, body: dict) -> httpx.Response:
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.post(self._url, json=body)
            except httpx.TransportError as err:  # connection refused or reset, timeouts
                problem = f"{type(err).__name__}: {one_line(err)}"
            else:
                if response.status_code < 400:
                    return response
                problem = f"HTTP {response.status_code}: {_server_message(response)}"
                if response.status_code != 429 and response.status_code < 500:
                    raise JudgeError(f"{self.endpoint}: {problem}")
            if attempt == attempts:
                raise JudgeUnavailable(f"{self.endpoint}: failed after {attempts} attempt(s); last error: {problem}")
            delay = self.backoff_s * 2 ** (attempt - 1)
            log.warning("%s: %s; retry %d/%d in %.1fs", self.endpoint, problem, attempt, self.retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _reply(self, response: httpx.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            raise JudgeError(f"{self.endpoint}: malformed response, not JSON: {response.text[:MAX_ERROR_TEXT]!r}") from None
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.endpoint}: malformed response, no choices[0].message.content: {json.dumps(body)[:MAX_ERROR_TEXT]}") from None
        if content is not None and not isinstance(content, str):
            raise JudgeError(f"{self.endpoint}: malformed response, choices[0].message.content is {type(content).__name__}")
        return content or ""


def read_responses(path: Path) -> list[dict]:
    """The rows of a test_responses.jsonl file: {"instruction", "input", "output", "response"}, all strings.

    Raises: DataError naming the file and line for a missing or empty file, malformed JSON or a missing
    or non-string field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(utf8_error(path, data, err)) from None
    rows = []
    for lineno, row in jsonl_objects(text, path, DataError):
        where = f"{path}:{lineno}"
        missing = [name for name in RESPONSE_FIELDS if name not in row]
        if missing:
            raise DataError(f"{where}: missing {missing} (a row needs {list(RESPONSE_FIELDS)}, optionally 'input')")
        row.setdefault("input", "")
        for name in (*RESPONSE_FIELDS, "input"):
            if not isinstance(row[name], str):
                raise DataError(f"{where}: {name!r} is not a string (got {type(row[name]).__name__})")
        rows.append({"instruction": row["instruction"], "input": row["input"], "output": row["output"], "response": row["response"]})
    if not rows:
        raise DataError(f"{path}: no responses (the file is empty)")
    return rows


def judge_responses(
    cfg: JudgeConfig, responses_file: Path, out_dir: Path, *, api_key: str | None = None, progress: bool = True
) -> dict:
    """Score the responses in test_responses.jsonl with the judge; write scores.jsonl and metrics.json.

    Args:
        cfg: the judge endpoint, model, sampling options, max_items, timeout and retries.
        responses_file: rows {"instruction", "input", "output", "response"} (lmcore.finetune.instruct).
        out_dir: replaced whole by scores.jsonl and metrics.json.
        api_key: the endpoint's key (the caller reads it from cfg.api_key_env); never logged or written.
        progress: show a tqdm progress bar.

    Returns: the metrics: mean_score (null when no reply could be parsed), stderr (sample std / sqrt(n);
        null for fewer than two scores), n_items, n_scored, n_unparsed and the judge's settings.
    Raises: JudgeError when no endpoint is configured, the endpoint refuses the request (HTTP 4xx), a reply is
        malformed or more than cfg.max_unparsed_fraction of the replies hold no score; DataError for a bad
        responses file; JudgeUnavailable (a TransientError) when the endpoint still fails after its retries.
    """
    reason = judge_skip_reason(cfg)
    if reason is not None:
        raise JudgeError(reason)
    rows = read_responses(responses_file)[: cfg.max_items]
    scored_rows = []
    with ChatClient(cfg.url, cfg.model, api_key=api_key, timeout_s=cfg.timeout_s, retries=cfg.retries) as client:
        for i, row in enumerate(tqdm(rows, desc="judge", unit="response", dynamic_ncols=True, disable=not progress)):
            reply = client.complete(judge_prompt(row), temperature=cfg.temperature, seed=cfg.seed, max_tokens=cfg.max_tokens,
                                    history=calibration_turns(cfg.calibration_examples))
            score = parse_score(reply)
            if score is None:
                log.warning("response %d: no score 0-%d in the judge's reply %r; counted as unparsed", i, MAX_SCORE, reply[:80])
            scored_rows.append({**row, "judge_reply": reply, "score": score})

    scores = [r["score"] for r in scored_rows if r["score"] is not None]
    unparsed = len(scored_rows) - len(scores)
    if unparsed > cfg.max_unparsed_fraction * len(scored_rows):
        first = next(r["judge_reply"] for r in scored_rows if r["score"] is None)
        raise JudgeError(
            f"{redact(cfg.url)}: {unparsed} of {len(scored_rows)} replies of judge {cfg.model!r} hold no score 0-{MAX_SCORE} "
            f"(judge.max_unparsed_fraction is {cfg.max_unparsed_fraction}); e.g. {first[:80]!r}"
        )
    metrics = {
        "mean_score": statistics.fmean(scores) if scores else None,
        "stderr": statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) >= 2 else None,
        "n_items": len(scored_rows),
        "n_scored": len(scores),
        "n_unparsed": unparsed,
        "judge": {
            # a model the stage served (judge.serve) by what it is, not by its port, which differs every run
            **({"url": redact(cfg.url)} if cfg.serve is None else {"served": cfg.serve}),
            "model": cfg.model,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
            "max_tokens": cfg.max_tokens,
            "calibration_examples": cfg.calibration_examples,
            "prompt": PROMPT_NAME,
        },
    }
    with atomic_dir(out_dir) as tmp:
        write_text(tmp / JUDGE_SCORES, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored_rows))
        write_json(tmp / METRICS, metrics)
    log.info("judge %s: mean score %s over %d of %d responses", cfg.model, metrics["mean_score"], len(scores), len(scored_rows))
    return metrics
