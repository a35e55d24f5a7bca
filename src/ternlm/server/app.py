"""The HTTP server: OpenAI's /v1 API on top of the scheduler, /health, /metrics, and the chat page at /.

A request is validated (schemas.py), its prompt turned into token ids (api.py), and submitted to the
scheduler; its updates come back as one JSON body or as server-sent events. Every error has OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with the status the OpenAI API would use.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LanguageModel
from ..constraints import GrammarError, TokenConstraint
from ..generate import ContextOverflowError
from ..tools import ToolError, ToolUse
from .metrics import ServerMetrics
from .middleware import BodySizeLimit, CountResponses, RequestLimit
from .replies import ChatReply, CompletionReply, EventStream, Reply, ToolCallReply, usage_of
from .scheduler import KVBudgetExceeded, Overloaded, Scheduler, Sequence, Unavailable
from .schemas import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorDetail, ErrorResponse,
                      Health, ModelCard, ModelList, SamplingRequest)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20  # a full 4096-token context is about 20 kB of text
EXTRA_REQUESTS = 64  # in progress beyond --max-batch + --max-queue before a 503 (see RequestLimit)
# what a request and the model's generation_config.json both leave unset: OpenAI's default
OPENAI_DEFAULTS = {"temperature": 1.0}


@dataclass
class ServerOptions:
    api_key: str | None = None        # required as "Authorization: Bearer KEY" on /v1 when set
    max_batch: int = 8                # sequences generated together
    max_waiting: int = 64             # requests that may wait for a slot; beyond that, 429
    kv_budget_bytes: int | None = None  # all KV caches together (default: max_batch full contexts)
    prefill_chunk: int = 64           # prompt tokens per step
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API
    request_timeout: float | None = None  # seconds from arrival: then it ends (running) or is refused (waiting)
    prompt_cache_bytes: int | None = None  # computed prompts kept for later requests (default: half the KV budget; 0 off)


# ---- errors ----

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.error_type, self.headers = status, param, code, error_type, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, str(e), e.param, e.code, e.error_type, e.headers)


def _parameter(location: tuple) -> str:
    """("body", "messages", 0, "role") -> "messages.0.role"; a union member's tag such as
    "function-after[...]" or "list[int]" is not part of the name."""
    names = []
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, str) and not part.isidentifier():
            break
        names.append(str(part))
    return ".".join(names)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI answers 422; OpenAI answers 400, naming the parameter."""
    errors = e.errors()
    if any(error["type"] == "json_invalid" for error in errors):
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    places = [_parameter(tuple(error["loc"])) for error in errors]
    message = "; ".join(dict.fromkeys(f"{place or 'body'}: {error['msg']}" for place, error in zip(places, errors)))
    return error_response(400, message, param=places[0] if places and places[0] else None, code="invalid_value")


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), headers=e.headers)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    return error_response(500, f"internal error ({type(e).__name__})", error_type="server_error")


ERROR_DOCS = {status: {"model": ErrorResponse, "description": what} for status, what in [
    (400, "bad parameters, or a prompt that does not fit the context"),
    (404, "unknown model"),
    (413, "request body too large"),
    (429, "the server is saturated: too many requests waiting (see Retry-After)"),
    (503, "the server is shutting down, or no slot came free within its request timeout"),
]}
AUTH_DOCS = {401: {"model": ErrorResponse, "description": "missing or wrong API key"}}
# one server-sent event (OpenAPI 3.1 has `schema` of an event stream describe each event)
SERVER_SENT_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a chunk as JSON (or an error object), and last [DONE]"}}}
EVENT_STREAM_DOCS = {200: {"content": {"text/event-stream": {"schema": SERVER_SENT_EVENT}},
                           "description": "JSON; with stream: true, server-sent events of chunks, then [DONE]"}}


# ---- the model being served ----

@dataclass
class ServedModel:
    model: LanguageModel
    id: str
    scheduler: Scheduler
    created: int

    def check_model(self, name: str) -> None:
        if name != self.id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.id!r}",
                           param="model", code="model_not_found")

    def prompt(self, build: Callable[[], list[int]], param: str) -> list[int]:
        try:
            return build()
        except ContextOverflowError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    async def constraint(self, body: ChatCompletionRequest, tool_use: ToolUse | None) -> TokenConstraint | None:
        """The request's response_format and tools as a grammar, compiled off the event loop (the first
        one also indexes the vocabulary); one that does not compile is a 400 naming the problem."""
        schema = body.response_format.reply_schema() if body.response_format else None
        try:
            return await asyncio.to_thread(self.model.constraint, schema, tools=tool_use)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_tools") from None
        except GrammarError as e:
            param = "response_format" if schema is not None else "tools"
            raise APIError(400, f"{param}: the JSON schema cannot be used: {e}", param=param,
                           code="invalid_schema") from None

    def submit(self, prompt: list[int], body: SamplingRequest, limit: int | None, top_logprobs: int | None,
               prompt_param: str, constraint: TokenConstraint | None = None) -> Sequence:
        n_ctx = self.model.n_ctx
        room = n_ctx - len(prompt)
        if room < 1 or (limit is not None and limit > room):
            wanted = f"{limit} to generate" if limit is not None else "at least 1 to generate"
            raise APIError(400, f"this model's context holds {n_ctx} tokens, but the request needs "
                                f"{len(prompt)} for the prompt and {wanted}",
                           param=prompt_param if limit is None or room < 1 else "max_tokens",
                           code="context_length_exceeded")
        params = self.model.sampling(OPENAI_DEFAULTS, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                     min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=body.seed)
        try:
            return self.scheduler.submit(prompt, limit or room, params, body.stop_strings(), top_logprobs, constraint)
        except Overloaded as e:
            raise APIError(429, str(e), error_type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except Unavailable as e:
            raise APIError(503, str(e), error_type="server_error", code="server_unavailable") from None
        except KVBudgetExceeded as e:
            raise APIError(400, str(e), param="max_tokens", code="kv_cache_budget_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def token_text(self, token: int) -> str:
        return self.model.tokenizer.decode([token], skip_special_tokens=False)


def served_model(request: Request) -> ServedModel:
    return request.app.state.served


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


async def require_api_key(request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))):
    """Authorization: Bearer KEY, compared in constant time (digests, so not even the length leaks)."""
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(_digest(given), _digest(request.app.state.api_key)):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


# ---- turning updates into OpenAI's bodies ----

async def whole_reply(reply: Reply, sequence: Sequence, request: Request) -> BaseModel | Response:
    """Waits for the end of generation, or for the client to leave (then the sequence is cancelled)."""

    async def gather():
        text, logprobs = [], []
        async for update in sequence.updates():
            if update.error:
                raise APIError(update.error_status, update.error, error_type="server_error",
                               headers={"Retry-After": "1"} if update.error_status == 503 else None)
            text.append(update.text)
            if update.logprob:
                logprobs.append(update.logprob)
            if update.finish_reason:
                return reply.whole("".join(text), logprobs, update.finish_reason, usage_of(sequence))

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gathering, leaving = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({gathering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not gathering.done():
            gathering.cancel()
            sequence.cancel()
    if gathering.cancelled():
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return gathering.result()


# ---- routes ----

v1 = APIRouter(prefix="/v1", responses=ERROR_DOCS)


@v1.get("/models", response_model=ModelList)
async def list_models(served: ServedModel = Depends(served_model)):
    return ModelList(data=[ModelCard(id=served.id, created=served.created)])


@v1.post("/chat/completions", response_model=ChatCompletion, responses=EVENT_STREAM_DOCS)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           served: ServedModel = Depends(served_model)):
    served.check_model(body.model)
    messages = [m.as_dict() for m in body.messages]
    tool_use = _tool_use(body)
    prompt = served.prompt(lambda: served.model.chat_prompt_ids(messages, tool_use), "messages")
    constraint = await served.constraint(body, tool_use)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sequence = served.submit(prompt, body, body.token_limit(), top_logprobs, "messages", constraint)
    if tool_use is not None and tool_use.tools:
        json_reply = body.response_format is not None and body.response_format.reply_schema() is not None
        reply = ToolCallReply(served, body.include_usage, body.logprobs, json_reply)
    else:
        reply = ChatReply(served, body.include_usage, body.logprobs)
    return EventStream(reply, sequence) if body.stream else await whole_reply(reply, sequence, request)


def _tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's tools after its tool_choice (None without tools); a 400 naming what is wrong."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    try:
        return ToolUse.choose([tool.model_dump(exclude_none=True) for tool in body.tools],
                              choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
                              body.parallel_tool_calls)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_tools") from None


@v1.post("/completions", response_model=Completion, responses=EVENT_STREAM_DOCS)
async def completions(body: CompletionRequest, request: Request, served: ServedModel = Depends(served_model)):
    served.check_model(body.model)
    if isinstance(body.prompt, str):
        prompt = served.prompt(lambda: served.model.prompt_ids(body.prompt), "prompt")
    else:
        prompt = served.prompt(lambda: served.model.check_ids(body.prompt), "prompt")
    sequence = served.submit(prompt, body, body.token_limit(), body.logprobs, "prompt")
    reply = CompletionReply(served, body.include_usage, body.logprobs)
    return EventStream(reply, sequence) if body.stream else await whole_reply(reply, sequence, request)


other = APIRouter()


@other.get("/health", response_model=Health, responses={503: {"model": ErrorResponse,
                                                                "description": "the scheduler has stopped"}})
async def health(served: ServedModel = Depends(served_model)):
    if not served.scheduler.alive:
        raise APIError(503, "the scheduler has stopped", error_type="server_error")
    return Health(model=served.id)


@other.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}})
async def metrics(served: ServedModel = Depends(served_model)):
    return Response(served.scheduler.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@other.get("/", include_in_schema=False)
async def chat_page():
    return FileResponse(STATIC / "index.html")


def _openapi_without_422(app: FastAPI) -> None:
    """Validation errors are answered with 400 (as OpenAI does), so the document must not promise 422."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def create_app(model: LanguageModel, model_id: str, options: ServerOptions | None = None) -> FastAPI:
    """model_id: the name clients put in `model`."""
    from .. import __version__

    options = options or ServerOptions()
    metrics = ServerMetrics()
    scheduler = Scheduler(model, options.max_batch, options.max_waiting, options.kv_budget_bytes,
                          options.prefill_chunk, metrics, options.request_timeout, options.prompt_cache_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    # no /docs or /redoc: their pages load scripts from a CDN; /openapi.json is the document itself
    app = FastAPI(title="ternlm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API for a ternary language model, with continuous batching.")
    app.state.served = ServedModel(model, model_id, scheduler, int(time.time()))
    app.state.api_key = options.api_key
    auth = [Depends(require_api_key)] if options.api_key else []
    app.include_router(v1, dependencies=auth, responses=AUTH_DOCS if options.api_key else None)
    app.include_router(other)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for error, handler in [(APIError, _api_error), (RequestValidationError, _validation_error),
                           (StarletteHTTPException, _http_error), (Exception, _internal_error)]:
        app.add_exception_handler(error, handler)
    _openapi_without_422(app)
    # the last added runs first: count every response, then CORS (so that refusals carry its
    # headers and preflights are answered before any limit), the request limit, the size limit
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    # A backstop beyond what the scheduler admits and queues (it answers 429 itself): requests that
    # are not yet queued, such as bodies still arriving, and those for the page and /v1/models.
    app.add_middleware(RequestLimit, max_requests=options.max_batch + options.max_waiting + EXTRA_REQUESTS)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=options.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    paths = {route.path for router in (v1, other) for route in router.routes}
    app.add_middleware(CountResponses, metrics=metrics, paths=paths)
    return app
