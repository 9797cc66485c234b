"""``rinna serve``: an OpenAI-compatible HTTP server on the local engine (FastAPI + uvicorn).

Other OpenAI clients (editors, scripts, the ``openai`` package) thereby get
rinna's exact prompt format and tokenizer, which a generic server gets wrong:

* ``POST /v1/completions``: the prompt as text (newlines become ``<NL>``) or
  as token ids; streamed (server-sent events) or not; ``"return_token_ids":
  true`` adds the prompt's and the reply's token ids, as vLLM does.
* ``POST /v1/chat/completions``: user and assistant messages become the
  model card's ``ユーザー``/``システム`` turns (rinna has no system turn: a
  system message is refused with a 400).
* ``GET /v1/models``, ``GET /health`` (status, queue and token counters).

One reply is generated at a time (the engine and its KV cache serve one
conversation at a time); up to ``queue_size`` more requests wait their turn
and any beyond get 429. A client that disconnects stops its generation after
the current token. With an API key, every ``/v1`` request must carry it as a
Bearer token.

Imported only by the ``serve`` command (and tests): fastapi and uvicorn are the
optional ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rinna_cli import config
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.prompt import USER, encode_newlines
from rinna_cli.session import Conversation, Reply

MAX_BODY = 4 << 20  # bytes of JSON a request may send
DEFAULT_QUEUE = 4
# The model card's recipe, for requests that leave an option out (``rinna serve`` passes the configured ones).
CARD_DEFAULTS = {
    "temperature": 0.7,
    "top_p": 1.0,
    "top_k": 50,
    "repetition_penalty": 1.0,
    "max_new_tokens": 128,
    "seed": -1,
}
# request field -> (engine option, JSON type)
SAMPLING_FIELDS = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "repetition_penalty": ("repetition_penalty", float),
    "seed": ("seed", int),
    "max_tokens": ("max_new_tokens", int),
}


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param


def _error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status in (429, 503):
        headers["Retry-After"] = "1"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- jobs -------------------------------------------------------------------------------------


class _Job:
    """One generation: waits for the engine, runs in a thread, and queues its chunks for the response."""

    def __init__(self, state: _State, prompt_ids: list[int], options: dict):
        self.state = state
        self.prompt_ids = prompt_ids
        self.options = options
        self.stop = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self.reply: Reply | None = None
        self.error: str | None = None
        self._text = ""
        self._ids: list[int] = []
        self._loop = asyncio.get_running_loop()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        state = self.state
        state.jobs.add(self)
        try:
            async with state.lock:
                if self.stop.is_set():
                    self.events.put_nowait(("end", None))
                    return
                state.running = True
                state.current_tokens = 0
                finished: asyncio.Future = self._loop.create_future()
                thread = threading.Thread(target=self._generate, args=(finished,), name="rinna-serve-generate", daemon=True)
                thread.start()
                try:
                    await asyncio.shield(finished)
                except asyncio.CancelledError:
                    self.stop.set()
                    await finished  # the engine stops after the current token; hold the lock until it has
                    raise
        finally:
            state.running = False
            state.pending -= 1
            state.jobs.discard(self)
            if self.reply is not None:
                state.generated_tokens += self.reply.completion_tokens
                state.completions += 1
                state.last = {
                    "prompt_tokens": self.reply.prompt_tokens,
                    "completion_tokens": self.reply.completion_tokens,
                    "finish_reason": self.reply.finish_reason,
                }
                state.recent.append(state.last)
            self.events.put_nowait(("end", None))

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.stop.set()

    # The engine's callbacks, in the generation thread.

    def on_text(self, text: str) -> None:
        self._text += text

    def on_ids(self, ids: list[int]) -> None:
        """A step's ids come after the text they completed: send both as one chunk."""
        self._ids.extend(ids)
        self.state.current_tokens += len(ids)
        self.flush()

    def flush(self) -> None:
        if self._text or self._ids:
            self._post(("chunk", self._text, self._ids))
            self._text, self._ids = "", []

    def _generate(self, finished: asyncio.Future) -> None:
        state = self.state
        try:
            reply = state.engine.generate(self.prompt_ids, self.options, self.on_text, self.stop, on_ids=self.on_ids)
            self.flush()
            self.reply = reply
        except RinnaError as err:
            self.error = str(err)
        except Exception as err:  # noqa: BLE001 - reported to the client in one line, the server keeps running
            self.error = f"{type(err).__name__}: {err}"
        finally:
            try:
                self._loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
            except RuntimeError:
                pass

    async def chunks(self) -> AsyncIterator[tuple[str, list[int]]]:
        while True:
            kind, *rest = await self.events.get()
            if kind == "end":
                return
            yield rest[0], rest[1]

    async def result(self) -> Reply:
        async for _ in self.chunks():
            pass
        if self.error is not None:
            raise ApiError(500, f"generation failed: {self.error}", kind="server_error")
        if self.reply is None:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        return self.reply


class _State:
    def __init__(self, engine, name: str, defaults: dict, api_key: str | None, queue_size: int):
        self.engine = engine
        self.name = name
        self.defaults = dict(defaults)
        self.api_key = api_key
        self.queue_size = queue_size
        self.eos = engine.tokenizer.special.eos
        self.lock = asyncio.Lock()
        self.pending = 0  # admitted requests: the one generating and those waiting
        self.running = False
        self.closing = False
        self.jobs: set[_Job] = set()
        self.generated_tokens = 0
        self.current_tokens = 0
        self.completions = 0
        self.last: dict | None = None
        self.recent: deque[dict] = deque(maxlen=16)
        self.created = int(time.time())

    def admit(self) -> None:
        if self.closing:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        if self.pending >= 1 + self.queue_size:
            raise ApiError(
                429,
                f"busy: one reply is being generated and {self.queue_size} more requests are waiting; try again shortly",
                kind="rate_limit_error",
            )
        self.pending += 1


async def _until_disconnect(receive, stop: threading.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stop.set()
            return


class _EventStream(Response):
    """Server-sent events from a job; the client going away stops the job's generation."""

    media_type = "text/event-stream"

    def __init__(self, job: _Job, events: Callable[[_Job], AsyncIterator[str]]):
        self.job = job
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_until_disconnect(receive, self.job.stop))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.events(self.job):
                if self.job.stop.is_set() and watcher.done():
                    break
                await send({"type": "http.response.body", "body": data.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            watcher.cancel()
            self.job.stop.set()  # a no-op once the reply is complete


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# -- request parsing ------------------------------------------------------------------------------

_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}


def _type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _typed(data: dict, key: str, kind: type, default=None):
    """``data[key]`` checked to be of JSON type ``kind`` (null or missing = ``default``)."""
    value = data.get(key)
    if value is None:
        return default
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, kind)
    )
    if not ok:
        shown = json.dumps(value, ensure_ascii=False)
        shown = shown if len(shown) <= 60 else shown[:59] + "…"
        raise ApiError(400, f"{key} must be {_JSON_TYPES[kind]}, not {_type_name(value)} {shown}", param=key)
    return value


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
        raise ApiError(400, f"the request body must be a JSON object, not {_type_name(data)}")
    return data


class _Handler:
    """What the endpoints share: the state, the checks, the options."""

    def __init__(self, state: _State):
        self.state = state

    def authorize(self, request: Request) -> None:
        key = self.state.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key; send it as the header Authorization: Bearer <key>",
                kind="authentication_error",
            )

    def check_model(self, data: dict) -> None:
        model = _typed(data, "model", str)
        if model is not None and model != self.state.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.state.name!r}", kind="not_found_error", param="model")

    def check_unsupported(self, data: dict, chat: bool) -> None:
        n = _typed(data, "n", int, 1)
        if n != 1:
            raise ApiError(400, "n must be 1: one reply per request", param="n")
        if not chat:
            if _typed(data, "best_of", int, 1) != 1:
                raise ApiError(400, "best_of must be 1", param="best_of")
            if _typed(data, "echo", bool, False):
                raise ApiError(400, "echo is not supported", param="echo")
            if _typed(data, "suffix", str, "") != "":
                raise ApiError(400, "suffix is not supported", param="suffix")
        logprobs = data.get("logprobs")
        if logprobs not in (None, False):
            raise ApiError(
                400, 'logprobs are not supported; send "return_token_ids": true for the token ids', param="logprobs"
            )
        for key in ("presence_penalty", "frequency_penalty"):
            if _typed(data, key, float, 0) != 0:
                raise ApiError(400, f"{key} is not supported; use repetition_penalty (1 = off)", param=key)
        if _typed(data, "logit_bias", dict):
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        for key in ("tools", "functions", "response_format", "tool_choice", "function_call"):
            if chat and data.get(key) not in (None, [], {}, "none", "auto") and not (
                key == "response_format" and data[key] == {"type": "text"}
            ):
                raise ApiError(400, f"{key} is not supported by rinna", param=key)
        eos_piece = self.state.engine.tokenizer.sp.id_to_piece(self.state.eos)
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
        if stops is None or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "stop must be a string or an array of strings", param="stop")
        if any(s not in ("", eos_piece) for s in stops):
            raise ApiError(400, f"stop strings are not supported; generation always ends at {eos_piece}", param="stop")
        stop_ids = _typed(data, "stop_token_ids", list, [])
        if any(i != self.state.eos for i in stop_ids):
            raise ApiError(
                400, f"stop_token_ids may only hold {self.state.eos} ({eos_piece}), where generation always ends", param="stop_token_ids"
            )

    def options(self, data: dict, prompt_tokens: int, chat: bool) -> dict:
        options = dict(self.state.defaults)
        window = self.state.engine.window
        fields = dict(SAMPLING_FIELDS)
        if chat and data.get("max_completion_tokens") is not None:
            fields["max_completion_tokens"] = fields.pop("max_tokens")
        given_max = False
        for field, (key, kind) in fields.items():
            value = _typed(data, field, kind)
            if value is None:
                continue
            if key == "top_k" and value == -1:
                value = 0  # vLLM's "off"
            if key == "max_new_tokens" and value < 1:
                raise ApiError(400, f"{field} = {value} is out of range; allowed: {field} >= 1", param=field)
            try:
                # the configured range of max_new_tokens is rinna's window; here the model's window bounds it (below)
                options[key] = value if key == "max_new_tokens" else config.check(key, value)
            except UsageError as err:
                raise ApiError(400, f"{field}: {err}", param=field) from None
            given_max = given_max or key == "max_new_tokens"
        room = window - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; the model's window is {window}", param="prompt")
        if not given_max:
            options["max_new_tokens"] = min(options["max_new_tokens"], room)
        elif options["max_new_tokens"] >= window:
            raise ApiError(
                400,
                f"max_tokens = {options['max_new_tokens']} is out of range; allowed: 1 <= max_tokens < {window} "
                "(the model's window)",
                param="max_tokens",
            )
        elif options["max_new_tokens"] > room:
            raise ApiError(
                400,
                f"the prompt is {prompt_tokens} tokens; with max_tokens = {options['max_new_tokens']} at most "
                f"{window - options['max_new_tokens']} fit in the model's {window}-token window",
                param="max_tokens",
            )
        return options

    def prompt_ids(self, data: dict) -> list[int]:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        tokenizer = self.state.engine.tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt is empty", param="prompt")
            return tokenizer.encode(encode_newlines(prompt))
        if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            bad = next((i for i in prompt if not 0 <= i < tokenizer.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"prompt token id {bad} is outside the tokenizer's {tokenizer.vocab_size} ids", param="prompt")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(400, "one prompt per request: send the others separately", param="prompt")
        if prompt is None:
            raise ApiError(400, "prompt is required: text, or an array of token ids", param="prompt")
        raise ApiError(400, f"prompt must be a string or an array of token ids, not {_type_name(prompt)}", param="prompt")

    def conversation(self, data: dict) -> Conversation:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty array", param="messages")
        conversation = Conversation(self.state.engine.tokenizer)
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, dict):
                raise ApiError(400, f"{where} must be an object with role and content", param="messages")
            role = message.get("role")
            if role in ("system", "developer"):
                raise ApiError(
                    400,
                    f"{where}: rinna has no {role} turn (its format knows only ユーザー and システム); "
                    "put the instructions in the first user message",
                    param="messages",
                )
            if role not in ("user", "assistant"):
                raise ApiError(400, f"{where}: role must be user or assistant, not {role!r}", param="messages")
            content = message.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise ApiError(400, f"{where}: only text content is supported", param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"{where}: content must be a string, not {_type_name(content)}", param="messages")
            if role == "user":
                conversation.add_user(content)
            else:
                conversation.add_reply(content)
        if conversation.turns[-1].speaker != USER:
            raise ApiError(400, "the last message must be the user's: rinna answers it as システム", param="messages")
        return conversation

    def start(self, prompt_ids: list[int], options: dict) -> _Job:
        self.state.admit()
        return _Job(self.state, prompt_ids, options)


def _usage(reply: Reply) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.prompt_tokens - reply.prefilled_tokens},
    }


def _finish(reply: Reply) -> str:
    return {"stop": "stop", "length": "length"}.get(reply.finish_reason, "abort")


def _stream_options(data: dict) -> bool:
    options = _typed(data, "stream_options", dict, {})
    return bool(_typed(options, "include_usage", bool, False))


async def _wait(job: _Job, request: Request) -> Reply:
    """A job's reply; the client disconnecting meanwhile stops it."""
    watcher = asyncio.ensure_future(_until_disconnect(request.receive, job.stop))
    try:
        return await job.result()
    finally:
        watcher.cancel()


# -- the app --------------------------------------------------------------------------------------


def create_app(
    engine,
    name: str | None = None,
    defaults: dict | None = None,
    api_key: str | None = None,
    queue_size: int = DEFAULT_QUEUE,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app around ``engine`` (a local Engine, or anything with its interface)."""
    state = _State(engine, name or engine.name, defaults or CARD_DEFAULTS, api_key, queue_size)
    handler = _Handler(state)

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
        message = f"{request.method} {request.url.path}: {detail}"
        return _error_response(err.status_code, message, kind)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": state.name,
            "busy": state.running,
            "queued": state.pending - (1 if state.running else 0),
            "queue_size": state.queue_size,
            "generating_tokens": state.current_tokens if state.running else 0,
            "generated_tokens": state.generated_tokens,
            "completions": state.completions,
            "last": state.last,
            "recent": list(state.recent),
        }

    @app.get("/v1/models")
    async def models(request: Request):
        handler.authorize(request)
        card = {
            "id": state.name,
            "object": "model",
            "created": state.created,
            "owned_by": "rinna-cli",
            "max_model_len": engine.window,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        handler.authorize(request)
        data = await _read_body(request)
        handler.check_model(data)
        handler.check_unsupported(data, chat=False)
        stream = _typed(data, "stream", bool, False)
        with_ids = _typed(data, "return_token_ids", bool, False)
        include_usage = _stream_options(data)
        prompt_ids = handler.prompt_ids(data)
        options = handler.options(data, len(prompt_ids), chat=False)
        job = handler.start(prompt_ids, options)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def body(choices: list, **extra) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": state.name, "choices": choices, **extra}

        if not stream:
            reply = await _wait(job, request)
            choice = {"index": 0, "text": reply.text, "logprobs": None, "finish_reason": _finish(reply)}
            if with_ids:
                eos = [state.eos] if reply.finish_reason == "stop" else []
                choice.update(prompt_token_ids=prompt_ids, token_ids=list(reply.ids) + eos)
            return body([choice], usage=_usage(reply))

        async def events(job: _Job) -> AsyncIterator[str]:
            first = True
            async for text, ids in job.chunks():
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
                if with_ids:
                    choice["token_ids"] = ids
                    if first:
                        choice["prompt_token_ids"] = prompt_ids
                first = False
                yield _sse(body([choice]))
            if job.error is not None or job.reply is None:
                yield _sse({"error": {"message": f"generation failed: {job.error or 'the server is shutting down'}", "type": "server_error", "code": 500}})
            else:
                choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": _finish(job.reply)}
                if with_ids:
                    choice["token_ids"] = []
                yield _sse(body([choice]))
                if include_usage:
                    yield _sse(body([], usage=_usage(job.reply)))
            yield "data: [DONE]\n\n"

        return _EventStream(job, events)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        handler.authorize(request)
        data = await _read_body(request)
        handler.check_model(data)
        handler.check_unsupported(data, chat=True)
        stream = _typed(data, "stream", bool, False)
        with_ids = _typed(data, "return_token_ids", bool, False)
        include_usage = _stream_options(data)
        prompt_ids = handler.conversation(data).prompt_ids()
        options = handler.options(data, len(prompt_ids), chat=True)
        job = handler.start(prompt_ids, options)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def body(kind: str, choices: list, **extra) -> dict:
            return {"id": ident, "object": kind, "created": created, "model": state.name, "choices": choices, **extra}

        if not stream:
            reply = await _wait(job, request)
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "logprobs": None,
                "finish_reason": _finish(reply),
            }
            extra = {"usage": _usage(reply)}
            if with_ids:
                choice["token_ids"] = list(reply.ids) + ([state.eos] if reply.finish_reason == "stop" else [])
                extra["prompt_token_ids"] = prompt_ids
            return body("chat.completion", [choice], **extra)

        async def events(job: _Job) -> AsyncIterator[str]:
            kind = "chat.completion.chunk"
            opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield _sse(body(kind, [opening], **({"prompt_token_ids": prompt_ids} if with_ids else {})))
            async for text, ids in job.chunks():
                choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
                if with_ids:
                    choice["token_ids"] = ids
                yield _sse(body(kind, [choice]))
            if job.error is not None or job.reply is None:
                yield _sse({"error": {"message": f"generation failed: {job.error or 'the server is shutting down'}", "type": "server_error", "code": 500}})
            else:
                yield _sse(body(kind, [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish(job.reply)}]))
                if include_usage:
                    yield _sse(body(kind, [], usage=_usage(job.reply)))
            yield "data: [DONE]\n\n"

        return _EventStream(job, events)

    return app


# -- running it -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0 = a free one), or a one-line error."""
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise RinnaError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def run(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=3)
    )
    server.run(sockets=[sock])
