"""An OpenAI-compatible HTTP API for one lmcore model: chat completions from any OpenAI client.

    lmcore serve --model models:/lmcore-instruct@dpo --port 8000       # or --model models/instruct
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "lmcore-instruct@dpo", "messages": [{"role": "user", "content": "Name three primary colors."}],
             "temperature": 0, "max_tokens": 40}'

In Python: `create_app(Path("models/instruct"), model_name="instruct")` is the FastAPI app;
`serve(Path("models/instruct"), model_name="instruct")` runs it under uvicorn.

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health. Errors come back in OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with 400 for a bad request (validation
errors included), 401 without the API key, 404 for an unknown model name, 413 for a body over the limit,
503 (Retry-After) when the queue is full or a request waited too long, 504 past the request timeout.

Requests are decoded together (lmcore.engine: continuous batching on a thread of its own); the handlers are
async and hold no thread or lock while they wait. `ServerOptions` sets the batch, the queue, the timeouts, the
request limits (max_tokens, body size), the API key and the accepted Host names.

The prompt: for a model trained with its own chat template (config.json's "template" is "chat"; SmolLM2's ChatML),
or a model with none recorded whose tokenizer has a chat template (a pretrained instruct base, SmolLM2-Instruct),
the whole conversation, system and earlier turns included ("developer" as "system"), goes through that template
(lmcore.chat), and the reply ends at the template's end of turn. For an instruction model in a book template
(alpaca, phi3) the last user message is the instruction, in that template, with any system messages before it
(blank-line separated); earlier turns are not part of the prompt (the book's models are single-turn). For a plain
LM the messages' contents are joined by newlines and the reply is their continuation. Message text is ordinary
text: a literal "<|endoftext|>" or "<|im_end|>" in a message is never that token.

Sampling (lmcore.generation, with the KV cache): temperature (default 1.0; 0 is greedy), top_p (nucleus),
seed (default 0: identical requests give identical replies), max_tokens (default: the rest of the context, at most
the server's --max-tokens),
stop (the reply is cut before the first stop string), top_k (an extension, as in vLLM). n other than 1 is refused.
There is no sliding window: prompt and completion must fit in the model's context, as with OpenAI.
usage.completion_tokens counts every generated token, the end-of-text token included.

Streaming: `"stream": true` answers with server-sent events in OpenAI's chunk format: a first chunk with
delta {"role": "assistant", "content": ""}, one chunk per text piece as it is generated (whole characters;
text that might start a stop string is held back until it does not), a last chunk with an empty delta and
the finish_reason, then `data: [DONE]`. With `"stream_options": {"include_usage": true}` a chunk with the
usage and no choices comes before [DONE]. An error after the first chunk arrives as `data: {"error": ...}`.
A stream's status line is sent once the request has its place in the batch, so a full queue is still a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmcore import chat
from lmcore.checkpoint import HEAD_KEY, CheckpointError, load_model, read_model_config
from lmcore.finetune.data import CHAT, PROMPT_TEMPLATES, format_prompt
from lmcore.finetune.instruct import TEMPLATE_KEY
from lmcore.engine import Engine, EngineBusy
from lmcore.generation import Stripper
from lmcore.paths import MODEL_CONFIG
from lmcore.tokenizer import check_vocab, load_tokenizer
from lmcore.training import resolve_device

log = logging.getLogger(__name__)

MAX_STOP = 4  # stop strings per request, as OpenAI
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there
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

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (503)


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


def _load(model_dir: Path, device: str) -> tuple[torch.nn.Module, str | None]:
    """The model (eval mode) and its prompt template (None for a plain LM)."""
    _, extra = read_model_config(model_dir)
    if extra.get(HEAD_KEY) is not None:
        raise CheckpointError(f"{model_dir / MODEL_CONFIG}: a classifier ({extra[HEAD_KEY].get('type')} head) cannot generate text; use `lmcore classify`")
    template = extra.get(TEMPLATE_KEY)
    if template is not None and template not in PROMPT_TEMPLATES:
        raise CheckpointError(f"{model_dir / MODEL_CONFIG}: unknown '{TEMPLATE_KEY}' {template!r}; expected one of {list(PROMPT_TEMPLATES)}")
    return load_model(model_dir, device=resolve_device(device)).eval(), template


@dataclass(frozen=True)
class ServerOptions:
    """What one server admits: its batch, queue, timeouts and request limits, key and host names."""

    max_batch: int = 16  # requests decoded together (continuous batching)
    max_queue: int = 64  # requests waiting for a place in the batch; past that, 503 with Retry-After
    queue_timeout: float = 30.0  # seconds a request may wait for a place before it is answered 503
    request_timeout: float = 600.0  # seconds a non-streamed request may take in all before it is answered 504
    max_tokens: int | None = None  # the most tokens one request may ask for (None: the model's context)
    max_body_bytes: int = 1 << 20  # a larger request body is refused (413) before it is parsed
    api_key: str | None = None  # when set, /v1 endpoints need "Authorization: Bearer <key>" (401 without)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names accepted ("*": any); guards against DNS rebinding
    shutdown_grace: float = 3.0  # seconds in-flight requests may finish after SIGTERM before they are cut off


def _host_name(host: str) -> str:
    """A Host header's name without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Guard:
    """ASGI middleware in front of the app: the Host header, the API key and the body size, each refused in
    OpenAI's error shape before any of the request is parsed. The body is read here (at most max_body_bytes)
    and handed on."""

    def __init__(self, app, options: ServerOptions):
        self.app, self.options = app, options
        self.hosts = {h.lower() for h in options.allowed_hosts}
        self.key = f"Bearer {options.api_key}".encode() if options.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = _host_name(headers.get(b"host", b"").decode("latin-1")).lower()
        if "*" not in self.hosts and host not in self.hosts:
            return await _refuse(send, 400, f"Host {host!r} is not allowed; start the server with --allowed-host {host or 'NAME'}",
                                 code="invalid_host")
        if self.key is not None and scope["path"].startswith("/v1") and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.key):
            return await _refuse(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
        limit = self.options.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _refuse(send, 413, f"the request body ({declared.decode('latin-1')} bytes) is larger than this "
                                 f"server's limit of {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _refuse(send, 413, f"the request body is larger than this server's limit of {limit} bytes",
                                     code="request_too_large")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then http.disconnect, when the client leaves

        await self.app(scope, replay, send)


async def _refuse(send, status: int, message: str, *, code: str) -> None:
    body = json.dumps(_error_body(message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _ClientGone(Exception):
    """The client closed the connection while its request waited."""


def create_app(
    model_dir: Path,
    *,
    model_name: str,
    enc=None,
    device: str = "cpu",
    options: ServerOptions = ServerOptions(),
    quantize: str | None = None,
) -> FastAPI:
    """The FastAPI app serving one model folder; its engine (lmcore.engine) runs while the app does (lifespan).

    Args:
        model_dir: an lmcore model folder (lmcore.checkpoint layout), loaded once here.
        model_name: the name clients send as "model" and /v1/models lists.
        enc: the tokenizer; by default the one the model folder carries (lmcore.tokenizer.load_tokenizer).
        device: "cpu", "cuda", "mps" or "auto".
        options: batch, queue, timeouts, limits, API key and allowed hosts (ServerOptions).
        quantize: None, or "int8": dynamic int8 linear layers (lmcore.quantize), CPU only.

    Returns: the app; run it with uvicorn (see `serve`). `app.state.engine` is its engine.
    """
    model_dir = Path(model_dir)
    model, template = _load(model_dir, device)
    if quantize:
        from lmcore.quantize import quantize as quantized

        model = quantized(model, quantize)
    enc = enc if enc is not None else load_tokenizer(model_dir)
    if template is None and getattr(enc, "chat_template", None):
        template = CHAT  # a model whose tokenizer has a chat template (a pretrained instruct base) chats in it
    context_length = model.config.context_length
    check_vocab(enc, model.config.vocab_size, str(model_dir / MODEL_CONFIG))
    if template == CHAT and not getattr(enc, "chat_template", None):
        raise CheckpointError(f"{model_dir / MODEL_CONFIG}: '{TEMPLATE_KEY}' is '{CHAT}', but the tokenizer {enc.name} has no chat template")
    stop_ids = chat.stop_tokens(enc) if template == CHAT else []  # the template's end of turn ends a reply
    engine = Engine(model, enc, max_batch=options.max_batch, max_queue=options.max_queue,
                    queue_timeout=options.queue_timeout, stop_ids=stop_ids)
    token_limit = min(options.max_tokens or context_length, context_length)
    created = int(time.time())
    kind = f"instruction model ({template} template)" if template else "language model"
    log.info("serving %s as %r: %s, context %d tokens, up to %d requests at once", model_dir, model_name, kind,
             context_length, options.max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop, options.shutdown_grace)

    app = FastAPI(title="lmcore", description=f"OpenAI-compatible API for {model_name}", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_Guard, options=options)

    @app.exception_handler(APIError)
    def _api_error(request: Request, exc: APIError) -> JSONResponse:
        type_ = "server_error" if exc.status >= 500 else "invalid_request_error"
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(_error_body(exc.message, type_=type_, param=exc.param, code=exc.code), status_code=exc.status,
                            headers=headers)

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
    def health() -> JSONResponse:
        ok = engine.healthy
        return JSONResponse({"status": "ok" if ok else "stopping", "model": model_name, **engine.stats()}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lmcore"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        # Async: a waiting request holds no thread. The tokenizer and chat template run in the threadpool, the
        # model only on the engine's thread.
        if req.model != model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{model_name}`", param="model", code="model_not_found")
        _check_options(req)
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > token_limit:
            raise APIError(400, f"max_tokens: this server generates at most {token_limit} tokens a request, got {asked}",
                           param="max_tokens")
        prompt_ids = await run_in_threadpool(encode_messages, req.messages, template, enc)
        room = context_length - len(prompt_ids)
        max_tokens = asked or max(min(room, token_limit), 1)
        if max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {context_length} tokens, but {len(prompt_ids) + max_tokens} were "
                f"requested ({len(prompt_ids)} in the messages, {max_tokens} for the completion); shorten the messages"
                + (" or lower max_tokens" if room > 0 else ""),
                param="max_tokens" if room > 0 else "messages",
                code="context_length_exceeded",
            )
        loop, channel = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event) -> None:  # on the engine's thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
                loop.call_soon_threadsafe(channel.put_nowait, event)

        try:
            ticket = engine.submit(
                prompt_ids, max_tokens=max_tokens, emit=emit, temperature=1.0 if req.temperature is None else req.temperature,
                top_k=req.top_k, top_p=req.top_p, seed=0 if req.seed is None else req.seed,
                stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []), stream=bool(req.stream),
            )
        except EngineBusy as err:
            raise APIError(503, str(err), code="server_busy", retry_after=1) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        deadline = time.monotonic() + options.request_timeout
        try:
            _raise_for(await _receive(channel, request, deadline))  # ("start",): the request has a place in the batch
            if req.stream:
                usage = req.stream_options is not None and req.stream_options.include_usage
                return StreamingResponse(_events(completion_id, ticket, channel, usage), media_type="text/event-stream")
            _raise_for(event := await _receive(channel, request, deadline))  # ("done", finish_reason)
        except _ClientGone:
            return JSONResponse(_error_body("the client closed the connection"), status_code=499)
        finally:
            if not req.stream:
                engine.cancel(ticket)  # a no-op once it finished
        text, n = ticket.decoder.text, ticket.generated
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip() if template else text},
                         "logprobs": None, "finish_reason": event[1]}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n},
        }

    async def _receive(channel: asyncio.Queue, request: Request, deadline: float):
        """The request's next event (a non-streamed request gets only "start" and its end). Past its deadline: 504;
        while it waits, every DISCONNECT_POLL_S, whether its client is still there (_ClientGone if not). The caller
        then drops it from the engine."""
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(channel.get(), timeout=min(left, DISCONNECT_POLL_S))
            if await request.is_disconnected():
                raise _ClientGone
        raise APIError(504, f"the request took longer than {options.request_timeout:g} s", code="timeout")

    async def _events(completion_id: str, ticket, channel: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of one streamed reply. Starlette stops iterating when the client hangs up; the
        `finally` then takes the request out of the batch at once."""
        created = int(time.time())

        def chunk(delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        stripper = Stripper() if template else None  # stripped as the whole reply is
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                # the pieces that arrived meanwhile go out in one write, a chunk each
                events = [await channel.get()]
                while not channel.empty() and events[-1][0] == "piece":
                    events.append(channel.get_nowait())
                pieces = [stripper.push(e[1]) if stripper else e[1] for e in events if e[0] == "piece"]
                if any(pieces):
                    yield "".join(chunk({"content": piece}) for piece in pieces if piece)
                if (event := events[-1])[0] != "piece":
                    break
            if event[0] == "error":  # the status line is sent: report in the stream
                yield f"data: {json.dumps(_error_body(event[2], type_='server_error'))}\n\n"
            else:
                yield chunk({}, event[1])
                if include_usage:
                    p, n = len(ticket.prompt_ids), ticket.generated
                    yield chunk(None, usage={"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n})
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(ticket)

    return app


def _raise_for(event) -> None:
    """An engine error event as the APIError its client gets (503 with Retry-After: try again later)."""
    if event[0] == "error":
        status, message = event[1], event[2]
        raise APIError(status, message, code="server_busy" if status == 503 else None, retry_after=1 if status == 503 else None)


def serve(
    model_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str,
    device: str = "cpu",
    options: ServerOptions = ServerOptions(),
    quantize: str | None = None,
) -> None:
    """Load the model and serve it until interrupted (uvicorn, log level info).

    SIGTERM or Ctrl-C: the server stops accepting connections, waiting requests are answered 503, and requests
    being generated get `options.shutdown_grace` seconds to finish before they are cut off (a stream ends with an
    error event); the process exits within a few seconds.

    Args:
        model_dir: an lmcore model folder.
        host: the address to bind; the loopback address keeps the server private to this machine.
        port: the TCP port.
        model_name: the name clients use as "model".
        device: "cpu", "cuda", "mps" or "auto".
        options: see ServerOptions.
        quantize: see create_app.
    """
    import uvicorn

    app = create_app(Path(model_dir), model_name=model_name, device=device, options=options, quantize=quantize)
    engine: Engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.stop(options.shutdown_grace, wait=False)  # in-flight requests start winding down now
            super().handle_exit(sig, frame)

    shown = f"[{host}]" if ":" in host else host
    print(f"lmcore serve: {model_name} at http://{shown}:{port}/v1 (POST /v1/chat/completions, GET /v1/models)", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(options.shutdown_grace) + 2)
    Server(config).run()
