"""lmcore.judge: the book's prompt, score parsing, the retrying client, and judging through `lmcore serve`."""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import save_model
from lmcore.config import JudgeConfig, ModelConfig
from lmcore.errors import is_input_error, is_transient
from lmcore.finetune.data import DataError, format_prompt
from lmcore.generation import generate_text
from lmcore.judge import (
    ChatClient,
    JudgeError,
    JudgeUnavailable,
    judge_prompt,
    judge_responses,
    judge_skip_reason,
    parse_score,
    read_responses,
)
from lmcore.model import GPT
from lmcore.paths import JUDGE_SCORES as SCORES
from lmcore.paths import METRICS
from lmcore.tokenizer import get_tokenizer
from tests.conftest import SHARED
from tests.test_serve import free_port, running_server

INSTRUCTION_DATA = SHARED / "data" / "instruction" / "instruction-data.json"
FAST = dict(backoff_s=0.001)  # retries without real waiting


def completion(text: str) -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class Endpoint:
    """A scripted, unreliable chat endpoint (a stdlib HTTP server): request i gets actions[i] (the last one repeats).

    An action is (status, JSON body), (status, raw bytes) or ("sleep", seconds) before a valid reply.
    """

    def __init__(self, actions: list):
        self.actions = actions
        self.requests: list[dict] = []  # {"path", "headers", "body"}
        self.lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with endpoint.lock:
                    endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                    action = endpoint.actions[min(len(endpoint.requests), len(endpoint.actions)) - 1]
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = (200, completion("50"))
                status, payload = action
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                with contextlib.suppress(OSError):  # the client may have given up (a timeout)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


@contextlib.contextmanager
def endpoint(actions: list) -> Iterator[tuple[str, Endpoint]]:
    """Serve a scripted Endpoint on 127.0.0.1 in a thread; yields its base URL (.../v1) and the endpoint."""
    ep = Endpoint(actions)
    server = ThreadingHTTPServer(("127.0.0.1", 0), ep.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", ep
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the book's prompt and scores


def test_judge_prompt_is_the_books():
    with_input = {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "The car is as fast as lightning.",
        "response": "The car is as fast as a bullet.",
    }
    assert judge_prompt(with_input) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is "
        "very fast.` and correct output `The car is as fast as lightning.`, score the model response `The car is as "
        "fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
    )
    without_input = {
        "instruction": "What type of cloud is typically associated with thunderstorms?",
        "input": "",
        "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
        "response": "The type of cloud associated with thunderstorms is a cumulus cloud.",
    }
    assert judge_prompt(without_input) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat type of cloud is typically associated with thunderstorms?` "
        "and correct output `The type of cloud typically associated with thunderstorms is cumulonimbus.`, score the "
        "model response `The type of cloud associated with thunderstorms is a cumulus cloud.` on a scale from 0 to "
        "100, where 100 is the best score. Respond with the integer number only."
    )
    assert judge_prompt({k: v for k, v in without_input.items() if k != "input"}) == judge_prompt(without_input)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("85", 85),
        (" 100\n", 100),
        ("0", 0),
        ("Score: 85", 85),
        ("85/100", 85),
        ("**92**", 92),
        ("The score is 78.", 78),
        ("85.0", 85),
        ("Grade A2: 60", 60),  # digits inside a word are not a number
        ("<think>maybe 40, maybe 50</think>\n\n45", 45),
        ("101", None),
        ("-5", None),
        ("7.5", None),
        ("", None),
        ("I cannot score this response.", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_skip_reason_without_an_endpoint():
    reason = judge_skip_reason(JudgeConfig())
    assert reason is not None and "no judge endpoint configured: set judge.url" in reason and "judge.model" in reason
    assert judge_skip_reason(JudgeConfig(url="http://127.0.0.1:11434/v1", model="llama3")) is None
    with pytest.raises(ValueError, match="no judge endpoint configured"):
        judge_responses(JudgeConfig(), Path("unused.jsonl"), Path("unused"))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([b'{"instruction": "a", "output": "b", "response": "c"}', b"{bad"], ":2: malformed JSON at column 2"),
        ([b'{"instruction": "a", "output": "b"}'], ":1: missing ['response']"),
        ([b"", b'{"instruction": "a", "output": 5, "response": "c"}'], ":2: 'output' is not a string (got int)"),
        ([b'["a"]'], ":1: expected a JSON object, got list"),
        ([b'{"instruction": "a", "output": "b", "response": "c"}', b'{"instruction": "\xff"}'], "invalid UTF-8 at byte offset 70 (line 2)"),
        ([b"", b"  "], ": no responses (the file is empty)"),
    ],
)
def test_bad_responses_file_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "test_responses.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as err:
        read_responses(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_read_responses_fills_a_missing_input(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"instruction": "a", "output": "b", "response": "c", "extra": 1}\n\n{"instruction": "d", "input": "e", "output": "f", "response": ""}\n')
    assert read_responses(path) == [
        {"instruction": "a", "input": "", "output": "b", "response": "c"},
        {"instruction": "d", "input": "e", "output": "f", "response": ""},
    ]
    with pytest.raises(DataError, match="file not found"):
        read_responses(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- the client against an unreliable endpoint


def test_client_retries_5xx_and_429_then_succeeds():
    busy = (503, {"error": {"message": "overloaded"}})
    with endpoint([busy, (429, {"error": {"message": "slow down"}}), (200, completion("42"))]) as (url, ep):
        with ChatClient(url, "judge", timeout_s=5, retries=3, **FAST) as client:
            assert client.complete("6 * 7?", temperature=0.0, seed=123, max_tokens=4) == "42"
    assert len(ep.requests) == 3
    request = ep.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {"model": "judge", "messages": [{"role": "user", "content": "6 * 7?"}], "temperature": 0.0, "seed": 123, "max_tokens": 4}
    assert "authorization" not in {k.lower() for k in request["headers"]}


def test_client_gives_up_after_retries():
    with endpoint([(503, {"error": {"message": "overloaded"}})]) as (url, ep):
        with ChatClient(url, "judge", timeout_s=5, retries=2, **FAST) as client, pytest.raises(JudgeUnavailable) as err:
            client.complete("x")
    assert len(ep.requests) == 3
    assert str(err.value) == f"{url}/chat/completions: failed after 3 attempt(s); last error: HTTP 503: overloaded"
    assert is_transient(err.value) and not is_input_error(err.value)


def test_client_fails_at_once_on_4xx_and_keeps_the_key_out():
    with endpoint([(401, {"error": {"message": "Invalid API key"}})]) as (url, ep):
        with ChatClient(url, "judge", api_key="sk-secret-123", timeout_s=5, retries=3, **FAST) as client, pytest.raises(JudgeError) as err:
            client.complete("x")
    assert len(ep.requests) == 1
    assert ep.requests[0]["headers"]["Authorization"] == "Bearer sk-secret-123"
    assert str(err.value) == f"{url}/chat/completions: HTTP 401: Invalid API key"
    assert is_input_error(err.value) and not is_transient(err.value)
    # Ollama's error shape: {"error": "..."}
    with endpoint([(404, {"error": "model 'llama9' not found"})]) as (url, ep):
        with ChatClient(url, "llama9", timeout_s=5, retries=3, **FAST) as client, pytest.raises(JudgeError, match="HTTP 404: model 'llama9' not found"):
            client.complete("x")
    assert len(ep.requests) == 1


def test_client_retries_timeouts_and_refused_connections():
    with endpoint([("sleep", 1.0)]) as (url, ep):
        start = time.monotonic()
        with ChatClient(url, "judge", timeout_s=0.2, retries=1, **FAST) as client, pytest.raises(JudgeUnavailable) as err:
            client.complete("x")
        assert time.monotonic() - start < 1.5  # two timed-out attempts, not two full replies
    assert len(ep.requests) == 2
    assert "failed after 2 attempt(s); last error: ReadTimeout" in str(err.value) and url in str(err.value)
    # Slow but within the timeout: succeeds.
    with endpoint([("sleep", 0.05)]) as (url, ep), ChatClient(url, "judge", timeout_s=5, retries=0, **FAST) as client:
        assert client.complete("x") == "50"

    nobody = f"http://127.0.0.1:{free_port()}/v1"
    with ChatClient(nobody, "judge", timeout_s=1, retries=2, **FAST) as client, pytest.raises(JudgeUnavailable) as err:
        client.complete("x")
    assert str(err.value).startswith(f"{nobody}/chat/completions: failed after 3 attempt(s); last error: ConnectError")


def test_credentials_in_the_url_are_never_shown():
    with endpoint([(503, {"error": {"message": "down"}})]) as (url, ep):
        secret_url = url.replace("http://", "http://user:pw-secret@")
        with ChatClient(secret_url, "judge", timeout_s=5, retries=0, **FAST) as client, pytest.raises(JudgeUnavailable) as err:
            client.complete("x")
    assert ep.requests[0]["headers"]["Authorization"].startswith("Basic ")  # still sent, as HTTP basic auth
    public = url.replace("http://", "http://***@")
    assert "pw-secret" not in str(err.value) and str(err.value).startswith(f"{public}/chat/completions:")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"<html>busy</html>", "malformed response, not JSON: '<html>busy</html>'"),
        ({"choices": []}, "malformed response, no choices[0].message.content"),
        ({"choices": [{"message": {"content": 7}}]}, "malformed response, choices[0].message.content is int"),
    ],
)
def test_client_rejects_malformed_replies(payload, message):
    with endpoint([(200, payload)]) as (url, ep):
        with ChatClient(url, "judge", timeout_s=5, retries=3, **FAST) as client, pytest.raises(JudgeError) as err:
            client.complete("x")
    assert len(ep.requests) == 1
    assert str(err.value).startswith(f"{url}/chat/completions: {message}")


# --------------------------------------------------------------------------- judge_responses


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Four real instructions (two with an input) with made-up model responses."""
    data = json.loads(INSTRUCTION_DATA.read_text(encoding="utf-8"))
    picked = [data[0], data[1], data[2], data[3]]
    assert [bool(e["input"]) for e in picked] == [True, True, False, False]
    made_up = ["Accommodation.", "He reads books in the evening.", "The capital of France is Paris.", "I do not know."]
    return [{"instruction": e["instruction"], "input": e["input"], "output": e["output"], "response": r} for e, r in zip(picked, made_up)]


@pytest.fixture
def responses_file(tmp_path, rows) -> Path:
    path = tmp_path / "test_responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_scores(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / SCORES).read_text(encoding="utf-8").splitlines()]


def test_unparsed_replies_are_counted_not_scored(tmp_path, responses_file, rows):
    replies = ["85", "I cannot score this.", "Score: 60/100", "100"]
    actions = [(200, completion(r)) for r in replies]
    with endpoint(actions) as (url, ep):
        cfg = JudgeConfig(url=url, model="judge", temperature=0.0, seed=123, max_tokens=16, retries=0)
        metrics = judge_responses(cfg, responses_file, tmp_path / "judge", api_key="sk-secret-123", progress=False)

    assert [r["body"]["messages"][0]["content"] for r in ep.requests] == [judge_prompt(r) for r in rows]
    assert all((r["body"]["temperature"], r["body"]["seed"], r["body"]["max_tokens"]) == (0.0, 123, 16) for r in ep.requests)
    assert metrics["n_items"] == 4 and metrics["n_scored"] == 3 and metrics["n_unparsed"] == 1
    assert metrics["mean_score"] == pytest.approx(245 / 3, abs=1e-12)
    assert metrics["stderr"] == pytest.approx(statistics.stdev([85, 60, 100]) / 3**0.5, abs=1e-12)  # 11.6667
    assert metrics["stderr"] == pytest.approx(11.666666666666666, abs=1e-9)
    scores = read_scores(tmp_path / "judge")
    assert [(s["judge_reply"], s["score"]) for s in scores] == list(zip(replies, [85, None, 60, 100]))
    assert [{k: s[k] for k in ("instruction", "input", "output", "response")} for s in scores] == rows
    assert json.loads((tmp_path / "judge" / METRICS).read_text()) == metrics
    for path in (tmp_path / "judge").iterdir():
        assert "sk-secret-123" not in path.read_text()


def test_mean_is_null_when_nothing_parses(tmp_path, responses_file):
    with endpoint([(200, completion("no idea"))]) as (url, ep):
        cfg = JudgeConfig(url=url, model="judge", max_items=2, retries=0)
        with pytest.raises(JudgeError, match=r"2 of 2 replies of judge 'judge' hold no score 0-100 .*'no idea'"):
            judge_responses(cfg, responses_file, tmp_path / "judge", progress=False)
        assert not (tmp_path / "judge").exists()
        cfg = JudgeConfig(url=url, model="judge", max_items=2, retries=0, max_unparsed_fraction=1.0)
        metrics = judge_responses(cfg, responses_file, tmp_path / "judge", progress=False)
    assert len(ep.requests) == 4
    assert (metrics["mean_score"], metrics["stderr"], metrics["n_items"], metrics["n_scored"], metrics["n_unparsed"]) == (None, None, 2, 0, 2)
    assert [s["score"] for s in read_scores(tmp_path / "judge")] == [None, None]


def test_a_failing_endpoint_leaves_the_old_outputs(tmp_path, responses_file):
    out = tmp_path / "judge"
    out.mkdir()
    (out / METRICS).write_text('{"mean_score": 50}\n')
    with endpoint([(200, completion("90")), (500, {"error": {"message": "boom"}})]) as (url, ep):
        cfg = JudgeConfig(url=url, model="judge", retries=1)
        with pytest.raises(JudgeUnavailable, match="HTTP 500: boom"):
            judge_responses(cfg, responses_file, out, progress=False)
    assert len(ep.requests) == 3  # one good, then the failing one twice
    assert sorted(p.name for p in out.iterdir()) == [METRICS]
    assert (out / METRICS).read_text() == '{"mean_score": 50}\n'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


# --------------------------------------------------------------------------- end to end: `lmcore serve` as the judge


def constant_judge(enc, score: str = "73", context_length: int = 256) -> GPT:
    """A micro GPT whose greedy reply to anything is `score` followed by <|endoftext|>.

    Every block adds nothing (zero output projections) and positions are zero, so the final hidden
    state depends only on the last token: the score token embeds along one zero-mean direction, every
    other token along another (LayerNorm keeps both, scaled to +-4). The untied head then maps "any
    other token" to the score token and the score token to end-of-text, with a logit margin of 80.
    """
    (score_id,) = enc.encode(score)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=context_length, n_embd=32, n_layer=2, n_head=2, tie_weights=False))
    other, mine = torch.zeros(32), torch.zeros(32)
    other[0], other[1] = 1.0, -1.0
    mine[2], mine[3] = 1.0, -1.0
    with torch.no_grad():
        for block in model.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.wpe.weight.zero_()
        model.wte.weight.copy_(other.expand_as(model.wte.weight))
        model.wte.weight[score_id] = mine
        model.lm_head.weight.zero_()
        model.lm_head.weight[score_id] = 10 * other
        model.lm_head.weight[enc.eot_token] = 10 * mine
    return model.eval()


def test_judge_through_lmcore_serve(tmp_path, responses_file, rows, one_thread):
    enc = get_tokenizer("gpt2")
    model = constant_judge(enc)
    # The construction: "73" and then end-of-text, whatever the prompt, even when sampled.
    for prompt in ["Hello", format_prompt({"instruction": judge_prompt(rows[0])}, "alpaca")]:
        assert generate_text(model, enc, prompt, 10, temperature=0.0) == "73"
        assert generate_text(model, enc, prompt, 10, temperature=1.0, seed=5) == "73"
    assert generate_text(model, enc, "73", 10, temperature=0.0) == ""  # after the score token: end-of-text
    save_model(model, tmp_path / "judge-model", extra={"template": "alpaca", "tokenizer": "gpt2"})

    with running_server(tmp_path / "judge-model", tmp_path, "--name", "judge-73") as url:
        cfg = JudgeConfig(url=url, model="judge-73", max_items=3, temperature=0.0, seed=123, max_tokens=16, timeout_s=30, retries=1)
        metrics = judge_responses(cfg, responses_file, tmp_path / "judge", progress=False)

    assert metrics == {
        "mean_score": 73.0,
        "stderr": 0.0,
        "n_items": 3,
        "n_scored": 3,
        "n_unparsed": 0,
        "judge": {"url": url, "model": "judge-73", "temperature": 0.0, "seed": 123, "max_tokens": 16, "calibration_examples": 0, "prompt": "book ch. 7 (0-100)"},
    }
    assert json.loads((tmp_path / "judge" / METRICS).read_text()) == metrics
    scores = read_scores(tmp_path / "judge")
    assert [{k: s[k] for k in ("instruction", "input", "output", "response")} for s in scores] == rows[:3]
    assert [(s["judge_reply"], s["score"]) for s in scores] == [("73", 73)] * 3


def test_judge_stage_serves_its_own_judge_model(tmp_path, monkeypatch):
    """judge.serve: the stage serves a model folder itself (lmcore serve's app on 127.0.0.1) and scores through it."""
    from lmcore.config import load_params
    from lmcore.paths import TEST_RESPONSES, Layout
    from lmcore.stages import StageContext
    from lmcore.stages.judge import run as judge_stage
    from lmcore.tokenizer import get_tokenizer

    enc = get_tokenizer("gpt2")
    folder = tmp_path / "judge-model"
    save_model(constant_judge(enc), folder, extra={"template": "alpaca", "tokenizer": "gpt2"})
    enc.save(folder)
    layout = Layout(tmp_path)
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w, "response": w.lower()} for w in ("Yes", "No")]
    for name in ("instruct", "dpo"):
        layout.reports(name).mkdir(parents=True)
        (layout.reports(name) / TEST_RESPONSES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    micro = Path(__file__).resolve().parents[1] / "profiles" / "micro.yaml"
    params = load_params(micro, overrides=["judge.serve=judge-model", "judge.model=judge-73"])
    result = judge_stage(StageContext(root=tmp_path, params=params))
    assert result.summary == {"skipped": False, "mean_scores": {"instruct": 73.0, "dpo": 73.0}}
    summary = json.loads((layout.reports("judge") / "summary.json").read_text())
    # the served judge by what it is, not by its port (which differs every run): the same params, the same bytes
    assert summary["judge"]["model"] == "judge-73" and summary["judge"]["served"] == "judge-model" and "url" not in summary["judge"]
    with pytest.raises(Exception, match="registered model, and nothing here resolves one"):
        judge_stage(StageContext(root=tmp_path, params=load_params(micro, overrides=["judge.serve=models:/x@y"])))


def test_calibration_examples_go_before_each_request_as_earlier_turns():
    from lmcore.judge import CALIBRATION, calibration_turns, judge_prompt

    assert calibration_turns(0) == []
    turns = calibration_turns(2)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == judge_prompt(CALIBRATION[0][0]) and [turns[1]["content"], turns[3]["content"]] == ["95", "5"]
