"""An OpenAI-compatible HTTP API for one lmcore model: chat completions from any OpenAI client.

    lmcore serve --model models:/lmcore-instruct@dpo --port 8000       # or --model models/instruct
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "lmcore-instruct@dpo", "messages": [{"role": "user", "content": "Name three primary colors."}],
             "temperature": 0, "max_tokens": 40}'

In Python: `create_app(Path("models/instruct"), model_name="instruct")` is the FastAPI app;
`serve(Path("models/instruct"), model_name="instruct")` runs it under uvicorn.

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health. Errors come back in OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with 400 for a bad request (validation
errors included) and 404 for an unknown model name.

The prompt: for a model trained with its own chat template (config.json's "template" is "chat"; SmolLM2's ChatML),
or a model with none recorded whose tokenizer has a chat template (a pretrained instruct base, SmolLM2-Instruct),
the whole conversation, system and earlier turns included ("developer" as "system"), goes through that template
(lmcore.chat), and the reply ends at the template's end of turn. For an instruction model in a book template
(alpaca, phi3) the last user message is the instruction, in that template, with any system messages before it
(blank-line separated); earlier turns are not part of the prompt (the book's models are single-turn). For a plain
LM the messages' contents are joined by newlines and the reply is their continuation. Message text is ordinary
text: a literal "<|endoftext|>" or "<|im_end|>" in a message is never that token.

Sampling (lmcore.generation, with the KV cache): temperature (default 1.0; 0 is greedy), top_p (nucleus),
seed (default 0: identical requests give identical replies), max_tokens (default: the rest of the context),
stop (the reply is cut before the first stop string), top_k (an extension, as in vLLM). n other than 1 is refused.
There is no sliding window: prompt and completion must fit in the model's context, as with OpenAI.
usage.completion_tokens counts every generated token, the end-of-text token included.

Streaming: `"stream": true` answers with server-sent events in OpenAI's chunk format: a first chunk with
delta {"role": "assistant", "content": ""}, one chunk per text piece as it is generated (whole characters;
text that might start a stop string is held back until it does not), a last chunk with an empty delta and
the finish_reason, then `data: [DONE]`. With `"stream_options": {"include_usage": true}` a chunk with the
usage and no choices comes before [DONE]. An error after the first chunk arrives as `data: {"error": ...}`.
One request generates at a time; the others wait (a stream holds the model until it ends).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmcore import chat
from lmcore.checkpoint import HEAD_KEY, CheckpointError, load_model, read_model_config
from lmcore.finetune.data import CHAT, PROMPT_TEMPLATES, format_prompt
from lmcore.finetune.instruct import TEMPLATE_KEY
from lmcore.generation import TextStream, stream_text, strip_pieces
from lmcore.model import GPT
from lmcore.paths import MODEL_CONFIG
from lmcore.tokenizer import check_vocab, load_tokenizer
from lmcore.training import resolve_device

log = logging.getLogger(__name__)

MAX_STOP = 4  # stop strings per request, as OpenAI
# OpenAI parameters this server cannot honour: refused unless they have one of these (no-op) values.
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """A request that cannot be served; becomes an OpenAI error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"

    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer "system"
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(BaseModel):
    # Other OpenAI parameters (user, metadata, ...) are accepted and ignored, except those in UNSUPPORTED.
    model_config = ConfigDict(extra="allow")

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    temperature: Annotated[float | None, Field(ge=0)] = 1.0
    top_p: Annotated[float | None, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int | None, Field(ge=1)] = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = None
    seed: Annotated[int | None, Field(ge=-(2**63), le=2**64 - 1)] = 0  # the range torch.Generator takes
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None  # with stream: include_usage


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


def build_prompt(messages: list[ChatMessage], template: str | None) -> str:
    """The model's prompt for a chat.

    Args:
        messages: the request's messages; at least one must be a user message.
        template: the instruction model's prompt template, or None for a plain LM.

    Returns: the instruction in `template` (system messages first), or the contents joined by newlines.
    """
    if template == CHAT:
        raise ValueError("build_prompt: a chat-template model's prompt is token ids; use encode_messages")
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise APIError(400, "messages: there is no message with role 'user'", param="messages")
    if template is None:
        return "\n".join(m.content for m in messages)
    system = [m.content for m in messages if m.role in ("system", "developer")]
    return format_prompt({"instruction": "\n\n".join([*system, users[-1].content]), "input": ""}, template)


def encode_messages(messages: list[ChatMessage], template: str | None, enc) -> list[int]:
    """The prompt's token ids for a chat (at least one: an empty prompt is the start of a document).

    Args:
        messages: the request's messages.
        template: the model's recorded template: "chat" (the tokenizer's own chat template, every message in it),
            alpaca or phi3 (see build_prompt), or None for a plain LM.
        enc: the model's tokenizer.

    Returns: the ids; message text is ordinary text, whatever special tokens it spells.
    Raises: APIError 400 when there is no user message (book templates) or the chat template refuses the messages.
    """
    if template != CHAT:
        return enc.encode_ordinary(build_prompt(messages, template)) or [enc.eot_token]
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
    try:
        return chat.prompt_ids(enc, conversation) or [enc.eot_token]
    except chat.ChatTemplateError as err:
        raise APIError(400, f"messages: {err}", param="messages") from None


def start(
    model: GPT,
    enc,
    prompt_ids: list[int],
    *,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    stop: list[str],
    top_p: float | None = None,
    stop_ids: list[int] | None = None,
) -> TextStream:
    """Start generating a reply (lmcore.generation.stream_text); iterate the result for its text pieces.

    Args:
        prompt_ids: the encoded prompt; it and max_tokens must fit in the model's context.
        seed: seeds a fresh torch.Generator, so the same request gives the same reply.
        stop: the reply is cut before the first occurrence of any of these; generation ends there.
        stop_ids: token ids that end the reply besides the tokenizer's own (a chat template's end of turn).

    Returns: the TextStream; once exhausted, its finish_reason is "stop" for end-of-text or a stop string.
    """
    return stream_text(model, enc, prompt_ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
                       stop_ids=stop_ids or (), seed=seed)


def complete(model: GPT, enc, prompt_ids: list[int], **options) -> Completion:
    """The whole reply at once (see `start` for the options)."""
    reply = start(model, enc, prompt_ids, **options)
    text = "".join(reply)
    return Completion(text, reply.prompt_tokens, len(reply.token_ids), reply.finish_reason)


def _error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable message naming the field(s), and the first field as OpenAI's `param`."""
    messages, params = [], []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            messages.append(f"malformed JSON body at position {loc[0] if loc else '?'}: {err.get('ctx', {}).get('error', err['msg'])}")
            continue
        if not loc:
            messages.append("the request body must be a JSON object (Content-Type: application/json)")
            continue
        param = ".".join(loc)
        params.append(param)
        messages.append(f"{param}: {'field required' if err.get('type') == 'missing' else err['msg']}")
    return "; ".join(messages) or "invalid request", (params[0] if params else None)


def _check_options(req: ChatRequest) -> None:
    """Refuse what this server cannot do, rather than silently doing something else."""
    if req.n not in (None, 1):
        raise APIError(400, f"n: only n=1 is supported, got {req.n}", param="n")
    for key, value in (req.model_extra or {}).items():
        if key in UNSUPPORTED and value not in UNSUPPORTED[key]:
            raise APIError(400, f"{key} is not supported by lmcore serve (got {value!r})", param=key)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or not all(stops):
        raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings, got {req.stop!r}", param="stop")


def _load(model_dir: Path, device: str) -> tuple[GPT, str | None]:
    """The model (eval mode) and its prompt template (None for a plain LM)."""
    _, extra = read_model_config(model_dir)
    if extra.get(HEAD_KEY) is not None:
        raise CheckpointError(f"{model_dir / MODEL_CONFIG}: a classifier ({extra[HEAD_KEY].get('type')} head) cannot generate text; use `lmcore classify`")
    template = extra.get(TEMPLATE_KEY)
    if template is not None and template not in PROMPT_TEMPLATES:
        raise CheckpointError(f"{model_dir / MODEL_CONFIG}: unknown '{TEMPLATE_KEY}' {template!r}; expected one of {list(PROMPT_TEMPLATES)}")
    return load_model(model_dir, device=resolve_device(device)).eval(), template


def create_app(model_dir: Path, *, model_name: str, enc=None, device: str = "cpu") -> FastAPI:
    """The FastAPI app serving one model folder.

    Args:
        model_dir: an lmcore model folder (lmcore.checkpoint layout), loaded once here.
        model_name: the name clients send as "model" and /v1/models lists.
        enc: the tokenizer; by default the one the model folder carries (lmcore.tokenizer.load_tokenizer).
        device: "cpu", "cuda", "mps" or "auto".

    Returns: the app; run it with uvicorn (see `serve`).
    """
    model_dir = Path(model_dir)
    model, template = _load(model_dir, device)
    enc = enc if enc is not None else load_tokenizer(model_dir)
    if template is None and getattr(enc, "chat_template", None):
        template = CHAT  # a model whose tokenizer has a chat template (a pretrained instruct base) chats in it
    context_length = model.config.context_length
    check_vocab(enc, model.config.vocab_size, str(model_dir / MODEL_CONFIG))
    if template == CHAT and not getattr(enc, "chat_template", None):
        raise CheckpointError(f"{model_dir / MODEL_CONFIG}: '{TEMPLATE_KEY}' is '{CHAT}', but the tokenizer {enc.name} has no chat template")
    stop_ids = chat.stop_tokens(enc) if template == CHAT else []  # the template's end of turn ends a reply
    created = int(time.time())
    lock = threading.Lock()
    kind = f"instruction model ({template} template)" if template else "language model"
    log.info("serving %s as %r: %s, context %d tokens", model_dir, model_name, kind, context_length)

    app = FastAPI(title="lmcore", description=f"OpenAI-compatible API for {model_name}")

    @app.exception_handler(APIError)
    def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, param=exc.param, code=exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(_error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(_error_body(f"{request.method} {request.url.path}: {exc.detail}", code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}: {exc}", type_="server_error"), status_code=500)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lmcore"}]}

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(req: ChatRequest) -> dict[str, Any] | StreamingResponse:
        # A plain `def`: FastAPI runs it in its threadpool, and the lock lets one request generate at a time.
        if req.model != model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{model_name}`", param="model", code="model_not_found")
        _check_options(req)
        prompt_ids = encode_messages(req.messages, template, enc)
        room = context_length - len(prompt_ids)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(room, 1)
        if max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {context_length} tokens, but {len(prompt_ids) + max_tokens} were "
                f"requested ({len(prompt_ids)} in the messages, {max_tokens} for the completion); shorten the messages"
                + (" or lower max_tokens" if room > 0 else ""),
                param="max_tokens" if room > 0 else "messages",
                code="context_length_exceeded",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        seed = 0 if req.seed is None else req.seed
        temperature = 1.0 if req.temperature is None else req.temperature
        options = dict(max_tokens=max_tokens, temperature=temperature, top_k=req.top_k, top_p=req.top_p, seed=seed, stop=stop,
                       stop_ids=stop_ids)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            events = _events(completion_id, prompt_ids, options, usage)
            # Closing the events after the response (also after a client hangs up, when Starlette stops iterating
            # them) ends generation there and releases the lock, without waiting for garbage collection.
            return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(events.close))
        with lock:
            out = complete(model, enc, prompt_ids, **options)
        content = out.text.strip() if template else out.text  # as `lmcore chat` and test_responses.jsonl
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None, "finish_reason": out.finish_reason}],
            "usage": {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
            },
        }

    def _events(completion_id: str, prompt_ids: list[int], options: dict, include_usage: bool) -> Iterator[str]:
        """The server-sent events of one streamed reply; holds the lock from the first event to the last."""
        created = int(time.time())

        def chunk(delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        reply = None
        with lock:
            try:
                yield chunk({"role": "assistant", "content": ""})
                reply = start(model, enc, prompt_ids, **options)
                for piece in strip_pieces(reply) if template else reply:  # stripped as the whole reply is
                    yield chunk({"content": piece})
                yield chunk({}, reply.finish_reason)
                if include_usage:
                    n = len(reply.token_ids)
                    yield chunk(None, usage={"prompt_tokens": reply.prompt_tokens, "completion_tokens": n, "total_tokens": reply.prompt_tokens + n})
            except Exception as exc:  # the status line is sent: report in the stream
                log.exception("streaming %s failed", completion_id)
                yield f"data: {json.dumps(_error_body(f'internal error: {type(exc).__name__}: {exc}', type_='server_error'))}\n\n"
            finally:
                if reply is not None:
                    reply.close()  # a client that hung up: free the model's cache now
        yield "data: [DONE]\n\n"

    return app


def serve(model_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, model_name: str, device: str = "cpu") -> None:
    """Load the model and serve it until interrupted (uvicorn, log level info).

    Args:
        model_dir: an lmcore model folder.
        host: the address to bind; the loopback address keeps the server private to this machine.
        port: the TCP port.
        model_name: the name clients use as "model".
        device: "cpu", "cuda", "mps" or "auto".
    """
    import uvicorn

    app = create_app(Path(model_dir), model_name=model_name, device=device)
    shown = f"[{host}]" if ":" in host else host
    print(f"lmcore serve: {model_name} at http://{shown}:{port}/v1 (POST /v1/chat/completions, GET /v1/models)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
