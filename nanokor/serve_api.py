"""The OpenAI-compatible HTTP API and the chat page, on FastAPI, over a GenerationWorker.

    POST /v1/chat/completions   a conversation (OpenAI messages) -> the assistant's reply
    POST /v1/completions        raw text (BOS + text, as sample.py) -> its continuation
    GET  /v1/models             the one model served
    GET  /health                200 once the model is loaded (the server binds only then), with load figures
    GET  /                      the chat page (nanokor/static/chat.html: no build step, nothing from a CDN)

This layer adds only HTTP, the OpenAI shapes and queuing: conversations become ids through
chat_format.render, text through generate.encode_prompt, and the worker (serve_worker.py) generates.
Requests are validated by the pydantic models below (FastAPI's own machinery); every failure, from
malformed JSON to a prompt longer than the context, leaves through one handler as OpenAI's error
object {"error": {"message", "type", "param", "code"}}, which the openai clients turn into their
typed exceptions. Streams are server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
"""

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from nanokor.chat_format import REPLY_STOP_IDS, render, require_chat_tokens
from nanokor.errors import ChatError, PromptError
from nanokor.export_spec import SAMPLING
from nanokor.generate import encode_prompt, room_to_generate
from nanokor.serve_worker import Delta, Done, Failed, GenerationRequest, GenerationWorker, Job, QueueFull

log = logging.getLogger("nanokor.serve")

MAX_N = 16  # choices per request: n rows of one batch
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat replies may fill the context
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there
NOT_CHAT_TRAINED = ("this checkpoint was not chat-trained (no SFT): it continues the conversation as a base "
                    "model would; train it with config/sft*.py for real replies")


@dataclass
class ServedModel:
    """What the API serves: the model's name and limits, its tokenizer, and the worker that runs it."""

    name: str
    tokenizer: object
    context: int  # the model's max_seq_len: prompt + reply must fit
    chat_trained: bool  # the checkpoint says it was SFT-trained on conversations
    worker: GenerationWorker
    created: int = 0


class ApiError(Exception):
    """A request the server will not serve, as OpenAI reports it."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- requests: declared once, validated by FastAPI (strict types: "0.5" is not a number, true is not 1)

class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # fields nanokor does not use are ignored, as OpenAI's


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str  # system (or OpenAI's newer name for it, developer), user, assistant
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Body):
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1, max_length=256)]


class _Generation(_Body):
    model: str | None = None  # None: the one model served
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(SAMPLING["temperature"], ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension (vLLM, llama.cpp): 0 = off
    repetition_penalty: float = Field(1.0, gt=0)  # an extension: 1 = off
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (vLLM): generate max_tokens whatever the model says, e.g. to benchmark


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(_Generation):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_N)]
    echo: bool = False


# ---- errors: one handler, one shape

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's names for a union's members


def _param(loc) -> str | None:
    """A validation error's field path (messages.0.content), without pydantic's union-member tags."""
    path = [str(p) for p in loc[1:] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    return ".".join(path) or None


def _as_api_error(exc: Exception, request: Request) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            return ApiError(400, f"The request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])}"
                                 f"). Send a JSON object.", code="invalid_json")
        if first["loc"] == ("body",) and "json" not in request.headers.get("content-type", ""):
            return ApiError(400, "The request body must be a JSON object sent with the header Content-Type: "
                                 "application/json (curl: -H 'Content-Type: application/json').", code="invalid_json")
        # A union (str or list of str) fails once per member: report the deepest path into the field
        # (stop.0: "at least 1 character"), or, where all fail at the top, what each member needed.
        field = [(_param(e["loc"]) or "", e["msg"]) for e in errors if e["loc"][:2] == first["loc"][:2]]
        param = max((p for p, _ in field), key=lambda p: (bool(p), p.count("."))) or None
        same = [msg for p, msg in field if p == (param or "")]
        others = len({_param(e["loc"][:2]) for e in errors}) - 1
        more = f" (and {others} more problem{'s' * (others > 1)})" if others else ""
        where = f"'{param}'" if param else "the request body"
        return ApiError(400, f"Invalid value for {where}: {'; or '.join(dict.fromkeys(same))}{more}.", param=param,
                        code="invalid_value")
    if isinstance(exc, HTTPException):
        if exc.status_code in (404, 405):
            return ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}. This server answers "
                            "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health and the "
                            "chat page at GET /.", type="not_found_error" if exc.status_code == 404 else
                            "invalid_request_error", headers=getattr(exc, "headers", None))
        return ApiError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
    log.error("unexpected error", exc_info=exc)
    return ApiError(500, f"Internal server error: {type(exc).__name__}: {exc}", type="server_error")


async def openai_error(request: Request, exc: Exception) -> JSONResponse:
    return _as_api_error(exc, request).response()


class BearerAuth:
    """ASGI middleware: with an API key, every /v1/ request must carry `Authorization: Bearer <key>`.
    The page and /health stay open (a browser cannot send a key when it opens a page); the page asks
    for the key and sends it with its API calls. Checked before the body is read, so a wrong key
    always gets 401, whatever the body."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                error = ApiError(401, "Missing or incorrect API key: send it as the header 'Authorization: Bearer "
                                      "<key>' (the key the server was started with, --api-key).",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


# ---- from a request to a GenerationRequest

def _check_model(served: ServedModel, name: str | None) -> None:
    if name is not None and name != served.name:
        raise ApiError(404, f"The model {name!r} does not exist: this server serves {served.name!r} "
                            "(GET /v1/models lists it).", param="model", code="model_not_found")


def _fit(served: ServedModel, prompt_len: int, max_tokens: int | None, default: int | None, param: str) -> int:
    """How many tokens to generate after a prompt: max_tokens if it fits the context (else 400), or the
    default (None: the rest of the context), cut to what fits."""
    try:
        room = room_to_generate(prompt_len, served.context, served.context)
    except PromptError as e:
        raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
    if max_tokens is None:
        return room if default is None else min(default, room)
    if max_tokens > room:
        raise ApiError(400, f"This model's context is {served.context} tokens, but {prompt_len + max_tokens} were "
                            f"requested ({prompt_len} in the prompt, {max_tokens} for the completion). Ask for at "
                            f"most max_tokens={room}, or shorten the prompt.", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


def _generation(body: _Generation, prompts: list[list[int]], max_tokens: list[int], stop_ids) -> GenerationRequest:
    # Top-k/top-p do not change a greedy choice: dropped, as are top_p 1 and top_k 0 (off), so a
    # compiled Decoder meets as few distinct sampling settings as the requests allow.
    greedy = body.temperature == 0
    return GenerationRequest(
        prompts=tuple(map(tuple, prompts)), max_tokens=tuple(max_tokens), n=body.n, temperature=body.temperature,
        top_k=None if greedy or body.top_k == 0 else body.top_k,
        top_p=None if greedy or body.top_p == 1 else body.top_p,
        repetition_penalty=body.repetition_penalty, seed=body.seed,
        stop_ids=() if body.ignore_eos else tuple(stop_ids),
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()))


def _submit(served: ServedModel, request: GenerationRequest) -> Job:
    job = Job(request, asyncio.get_running_loop())
    try:
        served.worker.submit(job)
    except QueueFull:
        raise ApiError(503, f"The server is busy: {served.worker.max_queue} requests are already waiting (its "
                            "--max-queue). Retry in a moment.", type="server_error", code="server_busy",
                       headers={"Retry-After": "1"}) from None
    return job


async def _events(job: Job, request: Request):
    """The job's events until Done or Failed; cancels the job when the client goes or the stream is
    dropped (Starlette cancels a stream whose client disconnected; the handler polls the connection
    every DISCONNECT_POLL_S, tokens flowing or not)."""
    loop = asyncio.get_running_loop()
    check = loop.time() + DISCONNECT_POLL_S
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), max(check - loop.time(), 0))
            except TimeoutError:
                event = None
            if loop.time() >= check:
                if await request.is_disconnected():
                    return
                check = loop.time() + DISCONNECT_POLL_S
            if event is not None:
                yield event
                if isinstance(event, Done | Failed):
                    return
    finally:
        job.cancel()


# ---- responses in OpenAI's shapes

class _Shape:
    """How one endpoint's choices look: chat replies (message / delta) or completions (text)."""

    def __init__(self, chat: bool, model: str, prefixes: list[str]):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.prefixes = prefixes  # per choice: completions' echo (the prompt before its continuation), or ""
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def _envelope(self, object_: str, choices: list) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices}

    def opening(self, index: int) -> dict | None:
        """The chunk that opens a streamed choice: a chat choice's role, a completion's echoed prompt."""
        if self.chat:
            delta = {"role": "assistant", "content": ""}
            return self._envelope(self.chunk_object, [{"index": index, "delta": delta, "logprobs": None,
                                                       "finish_reason": None}])
        return self.chunk(index, self.prefixes[index], None) if self.prefixes[index] else None

    def chunk(self, index: int, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.chunk_object, [choice])

    def usage_chunk(self, usage: dict) -> dict:
        """stream_options.include_usage: a last chunk with no choices and the usage."""
        return {**self._envelope(self.chunk_object, []), "usage": usage}

    def whole(self, texts: list[str], finish_reasons: list[str], usage: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish_reasons))]
        else:
            choices = [{"index": i, "text": p + t, "logprobs": None, "finish_reason": f}
                       for i, (p, t, f) in enumerate(zip(self.prefixes, texts, finish_reasons))]
        return {**self._envelope(self.object, choices), "usage": usage}


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(job: Job, request: Request, shape: _Shape, include_usage: bool):
    for i in range(len(shape.prefixes)):
        if (opening := shape.opening(i)) is not None:
            yield _sse(opening)
    async for event in _events(job, request):
        if isinstance(event, Delta):
            yield _sse(shape.chunk(event.index, event.text, event.finish_reason))
        elif isinstance(event, Done) and include_usage:
            yield _sse(shape.usage_chunk(_usage(event)))
        elif isinstance(event, Failed):  # mid-stream, the status is sent: OpenAI's clients read this as an error
            yield _sse(ApiError(500, event.message, type="server_error").body())
    yield "data: [DONE]\n\n"


async def _respond(job: Job, request: Request, body: _Generation, shape: _Shape, headers: dict) -> Response:
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(job, request, shape, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    choices = len(shape.prefixes)
    texts, finish_reasons, done = [""] * choices, [None] * choices, None
    async for event in _events(job, request):
        if isinstance(event, Delta):
            texts[event.index] += event.text
            finish_reasons[event.index] = event.finish_reason or finish_reasons[event.index]
        elif isinstance(event, Failed):
            raise ApiError(500, event.message, type="server_error")
        else:
            done = event
    if done is None:  # the client went away: nobody to answer (499, as nginx logs it)
        return Response(status_code=499)
    return JSONResponse(shape.whole(texts, finish_reasons, _usage(done)), headers=headers)


# ---- the app

def create_app(served: ServedModel, api_key: str | None = None) -> FastAPI:
    """The app; its lifespan starts the worker's thread and stops it when the server shuts down."""

    @asynccontextmanager
    async def lifespan(app):
        served.worker.start()
        yield
        served.worker.stop()

    app = FastAPI(title="nanokor", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    for kind in (ApiError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, openai_error)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    page = resources.files("nanokor").joinpath("static/chat.html").read_text(encoding="utf-8")
    tokenizer = served.tokenizer
    chat_headers = {} if served.chat_trained else {"X-Nanokor-Warning": NOT_CHAT_TRAINED}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        worker = served.worker
        return {"status": "ok", "model": served.name, "busy": worker.busy, "waiting": worker.waiting,
                "max_queue": worker.max_queue, "jobs_done": worker.jobs_done,
                "tokens_generated": worker.tokens_generated}

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "nanokor",
                "context_length": served.context, "chat": tokenizer.has_chat_tokens, "chat_trained": served.chat_trained}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(served, name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(served, body.model)
        try:
            require_chat_tokens(tokenizer, f"The model {served.name!r}")
        except ChatError as e:
            raise ApiError(400, f"{e} Until then, use /v1/completions with raw text.", param="model",
                           code="model_cannot_chat") from None
        try:
            ids, _ = render(tokenizer, [m.plain() for m in body.messages], add_generation_prompt=True)
        except ChatError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_messages") from None
        max_tokens = _fit(served, len(ids), body.max_completion_tokens or body.max_tokens, None, "messages")
        job = _submit(served, _generation(body, [ids], [max_tokens], REPLY_STOP_IDS))
        return await _respond(job, request, body, _Shape(True, served.name, [""] * body.n), chat_headers)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(texts) * body.n > MAX_N:
            raise ApiError(400, f"{len(texts)} prompts x n={body.n} is {len(texts) * body.n} choices; at most "
                                f"{MAX_N} per request.", param="n", code="invalid_value")
        try:  # "" is BOS alone: sample unconditionally
            prompts = [encode_prompt(tokenizer, text or None) for text in texts]
        except PromptError as e:
            raise ApiError(400, str(e), param="prompt", code="invalid_value") from None
        max_tokens = [_fit(served, len(ids), body.max_tokens, COMPLETION_MAX_TOKENS, "prompt") for ids in prompts]
        job = _submit(served, _generation(body, prompts, max_tokens, (tokenizer.eos_id,)))
        prefixes = [text if body.echo else "" for text in texts for _ in range(body.n)]
        return await _respond(job, request, body, _Shape(False, served.name, prefixes), {})

    return app
