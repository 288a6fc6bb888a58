"""The HTTP API (FastAPI, served by uvicorn): OpenAI-compatible completions and chat completions
where `model` names an adapter (or the base), plus the model list, health, stats and an admin
endpoint that loads and unloads adapters at run time.

Errors come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a
malformed request (with the reason), 401 for a missing or wrong API key on /v1 (when
TUNEOFF_SERVE_API_KEY is set), 401/403 for the admin token, 404 for an unknown model (with the
available names), 409 for an adapter name in use, 413 for a body over --max-body-bytes, 503 when
the queue is full. An error inside a request is that request's 500, which says only "internal
error" and an id to find the details in the server's log; the server goes on.

Decoding defaults to greedy (temperature 0), as evaluation decodes, unlike OpenAI's default of 1.
Unknown request fields are ignored (as vLLM does); fields this server cannot honour (n > 1,
logprobs, tools, ...) are a 400 rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Header, HTTPException
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneoff.core.errors import TuneoffError
from tuneoff.evaluation.generate import chat_prompt
from tuneoff.serving.catalog import (
    AdapterSpec,
    adapter_method,
    check_adapter_dir,
    check_name,
    within_roots,
)
from tuneoff.serving.engine import (
    Completion,
    Engine,
    EngineStopped,
    QueueFull,
    Request,
    Sampling,
)
from tuneoff.serving.model import AdapterConflict, MultiLoraModel, UnknownModel

log = logging.getLogger("tuneoff.serve")
ADMIN_TOKEN_ENV = "TUNEOFF_ADMIN_TOKEN"
API_KEY_ENV = "TUNEOFF_SERVE_API_KEY"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers, self.extra = (
            status, message, kind, param, code, headers, extra)


def error_response(status: int, message: str, kind: str, param=None, code=None, headers=None, **extra) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code, **extra}},
                        status_code=status, headers=headers)


# -- request bodies ---------------------------------------------------------------------------

UNSUPPORTED = {  # field -> the value that means "not used"; anything else is refused, not ignored
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "logit_bias": None,
    "presence_penalty": 0, "frequency_penalty": 0, "seed": None, "tools": None, "tool_choice": None,
    "functions": None, "function_call": None, "suffix": None,
}


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(description="the adapter's name, or the base model's")
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: no end-of-sequence before this many tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None

    @model_validator(mode="after")
    def _supported(self):
        for name, neutral in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            unused = value is None or value == neutral or (neutral is None and value in (False, {}, []))
            if not unused:
                raise ValueError(f"{name}={json.dumps(value)} is not supported by this server")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} is above max_tokens {self.max_tokens}")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if len(stops) > 4 or not all(stops):
                raise ValueError("stop: up to 4 non-empty strings")
        return self

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(GenerationBody):
    prompt: str | list[str]

    @model_validator(mode="after")
    def _prompts(self):
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= MAX_PROMPTS:
            raise ValueError(f"prompt: give a string or a list of 1 to {MAX_PROMPTS} strings")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise ValueError("stream: one prompt per streamed request")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    path: str
    replace: bool = False


# -- limits, and the guard that applies them before a body is read ----------------------------------

@dataclass
class Limits:
    max_new_tokens: int  # cap on a request's max_tokens, and the chat default
    max_body_bytes: int  # a larger request body is a 413
    max_prompt_chars: int  # prompt characters in one request, checked before tokenizing


class Guard:
    """ASGI middleware that runs before any body is read: /v1 needs the API key when one is set,
    and a body over `max_body_bytes` is a 413, from its Content-Length or, without one, as it arrives."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key and (scope["path"].startswith("/v1/") or scope["path"] == "/stats"):  # not /health, /admin
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                refusal = error_response(401, f"/v1 needs the header 'Authorization: Bearer <{API_KEY_ENV}>'",
                                         "authentication_error", headers={"WWW-Authenticate": "Bearer"})
                return await refusal(scope, receive, send)
        too_large = (f"the request body is over this server's limit of {self.max_body_bytes} bytes "
                     "(tuneoff serve --max-body-bytes)")
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await error_response(413, too_large, "invalid_request_error")(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # a chunked body, which has no Content-Length
                raise HTTPException(413, too_large)  # FastAPI passes on an HTTPException met reading a body
            return message

        await self.app(scope, counted, send)


# -- generation: a body checked and tokenized into engine requests, their results as responses -----

def usage(results: list[Completion]) -> dict:
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_not_found(e: UnknownModel, param: str) -> ApiError:
    return ApiError(404, str(e), "not_found_error", param, "model_not_found", available=e.available)


class Generator:
    """/v1/completions and /v1/chat/completions: each body routed to its adapter, checked against
    the limits, tokenized and queued on the engine; the answer as one response or as server-sent events."""

    def __init__(self, model: MultiLoraModel, engine: Engine, limits: Limits):
        self.model, self.engine, self.limits = model, engine, limits
        # one thread, so the tokenizer is never used from two at once; not the event loop's, so a long
        # prompt does not hold up other requests (/health)
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tuneoff-tokenize")

    def close(self) -> None:
        self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def complete(self, body: CompletionBody):
        adapter = self.route(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self.check_chars(prompts, "prompt")
        requests = []
        # a raw prompt gets the tokenizer's own special tokens, as vLLM does
        for ids in await self.tokenized(self.encode, prompts, True):
            if not ids:
                raise ApiError(400, "prompt: empty", param="prompt")
            max_tokens = self.budget(ids, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
            requests.append(Request(adapter, ids, max_tokens, body.stops(), Sampling(body.temperature, body.top_p),
                                    body.min_tokens))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return self.stream(requests[0], body, rid, created, "text_completion",
                               lambda text, finish: {"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": finish})
        try:
            futures = [self.submit(r) for r in requests]
            results = await asyncio.gather(*(self.outcome(f) for f in futures))
        except BaseException:  # a prompt refused (queue full) or failed: the others' answers would go to no one
            self.engine.withdraw(requests)
            raise
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                            for i, r in enumerate(results)], "usage": usage(results)}

    async def chat(self, body: ChatBody):
        adapter = self.route(body.model)
        if not self.model.tokenizer.chat_template:
            raise ApiError(400, f"the base model {self.model.base_dir} has no chat template: use /v1/completions")
        self.check_chars([m.text() for m in body.messages], "messages")
        ids = await self.tokenized(self.encode_chat, [{"role": m.role, "content": m.text()} for m in body.messages])
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = Request(adapter, ids, self.budget(ids, asked, self.limits.max_new_tokens), body.stops(),
                          Sampling(body.temperature, body.top_p), body.min_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return self.stream(request, body, rid, created, "chat.completion.chunk",
                               lambda text, finish: {"index": 0, "delta": {} if finish else {"content": text},
                                                     "finish_reason": finish},
                               first={"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        result = await self.outcome(self.submit(request))
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}], "usage": usage([result])}

    def route(self, name: str) -> str | None:
        try:
            return self.model.resolve(name)
        except UnknownModel as e:
            raise model_not_found(e, "model") from None

    def check_chars(self, texts: list[str], param: str) -> None:
        chars = sum(len(text) for text in texts)
        if chars > self.limits.max_prompt_chars:
            raise ApiError(400, f"the prompt is {chars} characters, over this server's limit of "
                           f"{self.limits.max_prompt_chars} (tuneoff serve --max-prompt-chars)", param=param)

    def encode(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.model.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def encode_chat(self, conversation: list[dict]) -> list[int]:
        # the template holds the special tokens
        return self.encode([chat_prompt(self.model.tokenizer, conversation)], special=False)[0]

    async def tokenized(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn, *args)

    def budget(self, prompt_ids: list[int], asked: int | None, default: int) -> int:
        """The request's max_tokens, checked against the server's cap and the model's context."""
        cap, context = self.limits.max_new_tokens, self.model.context
        if asked is not None and asked > cap:
            raise ApiError(400, f"max_tokens {asked} is above this server's limit of {cap} "
                           "(tuneoff serve --max-new-tokens)", param="max_tokens")
        room = None if context is None else context - len(prompt_ids)
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}",
                           param="messages")
        wanted = asked if asked is not None else min(default, room if room is not None else default)
        if room is not None and wanted > room:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens and max_tokens {wanted}: more than the "
                           f"model's context of {context}", param="max_tokens")
        return wanted

    def submit(self, request: Request):
        try:
            return asyncio.wrap_future(self.engine.submit(request))
        except QueueFull as e:
            raise ApiError(503, str(e), "server_error", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise ApiError(503, str(e), "server_error") from None

    async def outcome(self, future) -> Completion:
        try:
            return await future
        except UnknownModel as e:  # the adapter was removed while the request waited
            raise model_not_found(e, "model") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), "server_error") from None
        except Exception as e:  # e.g. an adapter folder that no longer loads, a batch that failed
            raise internal_error(e, "a generation") from None

    def stream(self, request: Request, body: GenerationBody, rid: str, created: int, kind: str, choice, first=None):
        """Server-sent events: the text as it is generated, then the finish reason, then [DONE]."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        request.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        future = self.submit(request)  # before the 200 goes out, so a full queue is still a 503
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def event(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": body.model,
                                          "choices": choices, **extra}) + "\n\n"

        async def events():
            try:
                if first is not None:
                    yield event([first])
                while True:
                    piece = asyncio.ensure_future(pieces.get())
                    await asyncio.wait({piece, future}, return_when=asyncio.FIRST_COMPLETED)
                    if piece.done():
                        yield event([choice(piece.result(), None)])
                        continue
                    piece.cancel()
                    break
                while not pieces.empty():  # text handed over just before the end
                    yield event([choice(pieces.get_nowait(), None)])
                try:
                    result = await self.outcome(future)
                except ApiError as e:  # the 200 is out: the error is an event, and the stream still ends
                    yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield event([choice("", result.finish_reason)])
                if include_usage:
                    yield event([], usage=usage([result]))
                yield "data: [DONE]\n\n"
            finally:  # a client that left stops costing tokens
                self.engine.withdraw([request])

        return StreamingResponse(events(), media_type="text/event-stream")


def add_generation_routes(app: FastAPI, generator: Generator) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await generator.complete(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        return await generator.chat(body)


# -- status: health, the model list, the engine's counters --------------------------------------

def add_status_routes(app: FastAPI, model: MultiLoraModel, engine: Engine) -> None:
    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, "the engine thread is not running", "server_error")
        return {"status": "ok", "base": model.base_name, "adapters": len(model.names()) - 1,
                "resident": len(model.resident)}

    @app.get("/v1/models")
    async def models():
        created = int(engine.started_at)
        return {"object": "list", "data": [
            {"id": row["id"], "object": "model", "created": created, "owned_by": "tuneoff",
             "root": row["id"] if not row["adapter"] else model.base_name,
             "parent": model.base_name if row["adapter"] else None, "resident": row["resident"],
             **({"method": row["method"], "note": row["note"]} if row["adapter"] else {})}
            for row in model.listing()]}

    @app.get("/stats")
    async def stats():
        return engine.stats()


# -- admin: load and unload adapters at run time ------------------------------------------------

def require_admin(authorization: str | None, admin_token: str | None) -> None:
    if not admin_token:
        raise ApiError(403, f"the admin endpoint is disabled: start the server with {ADMIN_TOKEN_ENV} set",
                       "permission_error")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, f"admin endpoint: send the header 'Authorization: Bearer <{ADMIN_TOKEN_ENV}>'",
                       "authentication_error", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), admin_token.encode()):
        raise ApiError(403, "admin endpoint: wrong token", "permission_error")


async def on_engine(engine: Engine, fn, *args):
    """`fn(*args)` on the engine's thread, between batches; its errors as the admin endpoint's."""
    try:
        return await asyncio.wrap_future(engine.call(fn, *args))
    except EngineStopped as e:
        raise ApiError(503, str(e), "server_error") from None
    except UnknownModel as e:
        raise model_not_found(e, "name") from None
    except AdapterConflict as e:
        raise ApiError(409, str(e), "conflict_error", "name") from None
    except TuneoffError as e:
        raise ApiError(400, str(e), param="path") from None


def add_admin_routes(app: FastAPI, model: MultiLoraModel, engine: Engine, adapter_roots: list[Path],
                     admin_token: str | None) -> None:
    @app.get("/admin/adapters")
    async def admin_list(authorization: str | None = Header(None)):
        require_admin(authorization, admin_token)
        return {"adapters": [row for row in model.listing() if row["adapter"]], "max_resident": model.max_resident,
                "adapter_roots": [str(r) for r in adapter_roots]}

    @app.post("/admin/adapters", status_code=201)
    async def admin_load(body: AdapterBody, authorization: str | None = Header(None)):
        require_admin(authorization, admin_token)
        try:
            name = check_name(body.name, model.base_name)
        except TuneoffError as e:
            raise ApiError(400, str(e), param="name") from None
        try:
            path = check_adapter_dir(within_roots(body.path, adapter_roots))
        except TuneoffError as e:
            raise ApiError(400, str(e), param="path") from None
        spec = AdapterSpec(name, path, adapter_method(path), "admin")
        await on_engine(engine, model.add, spec, body.replace)
        log.info("admin: adapter %s %s from %s", name, "replaced" if body.replace else "added", path)
        return next(row for row in model.listing() if row["id"] == name)

    @app.delete("/admin/adapters/{name}")
    async def admin_unload(name: str, authorization: str | None = Header(None)):
        require_admin(authorization, admin_token)
        spec = await on_engine(engine, model.remove, name)
        log.info("admin: adapter %s removed", name)
        return {"id": name, "deleted": True, "path": str(spec.path)}


# -- errors in OpenAI's shape -------------------------------------------------------------------

async def _api_error(request: HttpRequest, e: ApiError):
    return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers, **e.extra)


async def _bad_request(request: HttpRequest, e: RequestValidationError):
    return error_response(400, "; ".join(_describe(err) for err in e.errors()), "invalid_request_error")


async def _http_error(request: HttpRequest, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                          "invalid_request_error", headers=getattr(e, "headers", None))


async def _internal(request: HttpRequest, e: Exception):
    error = internal_error(e, f"{request.method} {request.url.path}")
    return error_response(error.status, error.message, error.kind)


ERROR_HANDLERS = {ApiError: _api_error, RequestValidationError: _bad_request, StarletteHTTPException: _http_error,
                  Exception: _internal}


# -- the app ------------------------------------------------------------------------------------

def create_app(model: MultiLoraModel, engine: Engine, limits: Limits, adapter_roots: list[Path],
               admin_token: str | None, api_key: str | None) -> FastAPI:
    generator = Generator(model, engine, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()
        generator.close()

    app = FastAPI(title="tuneoff serve", lifespan=lifespan, exception_handlers=ERROR_HANDLERS, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    add_status_routes(app, model, engine)
    add_generation_routes(app, generator)
    add_admin_routes(app, model, engine, adapter_roots, admin_token)
    return app


def _describe(error: dict) -> str:
    """One validation error as `field.path: what is wrong`."""
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}"
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def internal_error(e: BaseException, where: str) -> ApiError:
    """A 500 that tells the client only an id: the details (paths, library errors) go to the log."""
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, where, exc_info=e)
    return ApiError(500, f"internal error (id {error_id}: see the server's log)", "server_error")


def secret_from_env(name: str) -> str | None:
    """The token in $name, stripped: a secret mounted from a file often ends in a newline."""
    return os.environ.get(name, "").strip() or None
