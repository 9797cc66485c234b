"""The FastAPI app of ``rinna serve``: routes of a few lines over :mod:`.requests`, :mod:`.jobs` and :mod:`.shapes`."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rinna_cli.contract import Engine, Reply, Sampling
from rinna_cli.render import escape_controls
from rinna_cli.serve.jobs import Job, State
from rinna_cli.serve.requests import ApiError, Parsed, Requests, type_name
from rinna_cli.serve.shapes import SSE_DONE, Shapes, failure, sse

MAX_BODY = 4 << 20  # bytes of JSON a request may send


def _error_response(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status in (429, 503):
        headers["Retry-After"] = "1"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _until_disconnect(receive, stop: threading.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stop.set()
            return


class _EventStream(Response):
    """Server-sent events from a job; the client going away stops the job's generation."""

    media_type = "text/event-stream"

    def __init__(self, job: Job, events: AsyncIterator[str]):
        self.job = job
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_until_disconnect(receive, self.job.stop))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.events:
                if self.job.stop.is_set() and watcher.done():
                    break
                await send({"type": "http.response.body", "body": data.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            watcher.cancel()
            self.job.stop.set()  # a no-op once the reply is complete


async def _read_body(request: Request) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
    try:
        data = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON") from None
    except ValueError as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type_name(data)}")
    return data


async def _wait(job: Job, request: Request) -> Reply:
    """A job's reply; the client disconnecting meanwhile stops it."""
    watcher = asyncio.ensure_future(_until_disconnect(request.receive, job.stop))
    try:
        return await job.result()
    finally:
        watcher.cancel()


async def _events(job: Job, shapes: Shapes) -> AsyncIterator[str]:
    for body in shapes.opening():
        yield sse(body)
    async for step in job.steps():
        yield sse(shapes.chunk(step.text, step.ids))
    if job.error is not None or job.reply is None:
        yield sse(failure(job.error))
    else:
        for body in shapes.closing(job.reply):
            yield sse(body)
    yield SSE_DONE


SETTLE_S = 30.0  # the longest an access line waits for a stopped job to end
JOB_KEY = "rinna.job"  # where a generating route leaves its job in the ASGI scope, for the access log


class AccessLog:
    """One line per request once it is answered: time, client, method and path, status, seconds, and for a
    generation the tokens and why it ended: ``12:00:01 127.0.0.1:50312 POST /v1/completions 200 0.41 s, 9 + 12 tokens, stop``.
    """

    def __init__(self, app, write: Callable[[str], None]):
        self.app = app
        self.write = write

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status: list[int] = []

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException:
            status = status or [500]
            raise
        finally:
            try:
                await self._settled(scope.get(JOB_KEY))
            finally:
                self.write(self.line(scope, status[0] if status else None, time.perf_counter() - started))

    @staticmethod
    async def _settled(job: Job | None) -> None:
        """Wait for a job its response left running (a stream whose client went away, stopped after the token it
        is at), so that its line says how many tokens it made and that it was interrupted."""
        if job is None or job.task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(job.task), SETTLE_S)
        except Exception:  # noqa: BLE001 - the job's own failure is its line's, a timeout leaves the line as it is
            pass

    @staticmethod
    def line(scope, status: int | None, seconds: float) -> str:
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "-"
        path = escape_controls(scope.get("path", ""))
        line = f"{time.strftime('%H:%M:%S')} {who} {scope.get('method', '')} {path} {status or '-'} {seconds:.2f} s"
        job: Job | None = scope.get(JOB_KEY)
        if job is not None and job.reply is not None:
            reply = job.reply
            line += f", {reply.prompt_tokens} + {reply.completion_tokens} tokens, {reply.finish_reason}"
        elif job is not None and job.error is not None:
            line += ", generation failed"
        return line


class _Routes:
    """What the endpoints share: the state, the key check, the request parser and the answer."""

    def __init__(self, state: State, requests: Requests):
        self.state = state
        self.requests = requests

    def authorize(self, request: Request) -> None:
        key = self.state.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key; send it as the header Authorization: Bearer <key>",
                kind="authentication_error",
            )

    async def answer(self, request: Request, parse: Callable[[dict], Parsed], chat: bool):
        self.authorize(request)
        parsed = parse(await _read_body(request))
        job = self.state.start(parsed.prompt_ids, parsed.sampling)
        request.scope[JOB_KEY] = job
        shapes = Shapes(chat, self.state.name, parsed, self.state.engine.tokenizer.special.eos)
        if not parsed.stream:
            return shapes.response(await _wait(job, request))
        return _EventStream(job, _events(job, shapes))

    def models(self, request: Request) -> dict:
        return {"object": "list", "data": [self.model(request)]}

    def model(self, request: Request) -> dict:
        """The served model's card (``/v1/models/{id}`` answers it for any id, as a request's model may be any)."""
        self.authorize(request)
        return {
            "id": self.state.name,
            "object": "model",
            "created": self.state.created,
            "owned_by": "rinna-cli",
            "max_model_len": self.state.engine.window,
            "vocab_size": self.state.engine.tokenizer.vocab_size,  # clients check that their tokenizer is this one
        }


def create_app(
    engine: Engine,
    defaults: Sampling,
    queue_size: int,
    name: str | None = None,
    api_key: str | None = None,
    on_ready: Callable[[], None] | None = None,
    parallel: int = 1,
    system_messages: str = "reject",
    log: Callable[[str], None] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app around ``engine`` (any :class:`rinna_cli.contract.Engine`).

    ``parallel`` > 1 needs an engine that takes that many ``generate`` calls at once; ``log`` gets
    one access-log line per request (None: no log).
    """
    state = State(engine, name or engine.name, api_key, queue_size, parallel)
    routes = _Routes(state, Requests(engine.tokenizer, state.name, engine.window, defaults, system_messages))

    @asynccontextmanager
    async def lifespan(app):
        if on_ready is not None:
            on_ready()
        yield
        state.closing = True
        for job in list(state.jobs):
            job.stop.set()

    app = FastAPI(title="rinna serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rinna = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error_response(err.status, err.message, err.kind, err.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        detail = err.detail if isinstance(err.detail, str) else str(err.detail)
        return _error_response(err.status_code, f"{request.method} {request.url.path}: {detail}", kind)

    @app.get("/health")
    async def health(request: Request):
        routes.authorize(request)
        return state.health()

    @app.get("/v1/models")
    async def models(request: Request):
        return routes.models(request)

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):  # openai's models.retrieve(), ollama's and vLLM's clients
        return routes.model(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routes.answer(request, routes.requests.completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await routes.answer(request, routes.requests.chat, chat=True)

    if log is not None:
        app.add_middleware(AccessLog, write=log)
    return app
