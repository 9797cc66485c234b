"""Generation on an OpenAI-compatible server (vLLM, ``rinna serve``), with token ids both ways.

A plain OpenAI client gets rinna wrong: the server's transformers tokenizer
drops the trailing space of ``システム: `` and loses byte-fallback characters.
So :class:`RemoteEngine` builds and tokenizes the prompt here, exactly as for
the local engine, sends it to ``POST /v1/completions`` as a list of token ids,
and reads the reply back as token ids, which the same :class:`ReplyDecoder`
turns into text. It has the local engine's interface (``generate``,
``forget``, ``tokenizer``, ``window``, ``name``, ``device``, ``dtype``), so
``ask`` and ``chat`` use it unchanged.

How the reply's ids come back, tried in this order on the first reply (the
answer is remembered for the rest of the process):

* ``"return_token_ids": true`` (vLLM >= 0.10.2, ``rinna serve``): every
  streamed choice carries the ``token_ids`` generated since the last chunk.
* ``"logprobs": 0, "return_tokens_as_token_ids": true``: the tokens of the
  logprobs are written ``token_id:N`` (older vLLM started with
  ``--return-tokens-as-token-ids``, or a vLLM that takes the request field).
* Text only: used as it comes, with a one-time warning (the server's
  detokenizer decides spacing and byte-fallback characters).

Only the standard library's ``http.client`` is used: no dependency for the
base install, and the socket is at hand to close when Ctrl-C is pressed.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable, Iterator

from rinna_cli import __version__
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.prompt import SYSTEM, decode_newlines, encode_newlines, utterance
from rinna_cli.session import Reply
from rinna_cli.streamer import ReplyDecoder, _partial_nl
from rinna_cli.tokenizer import Tokenizer

DEFAULT_TIMEOUT = 60.0  # seconds to connect, and at most between two pieces of the answer
MODES = ("ids", "logprobs", "text")
_TOKEN_ID = re.compile(r"token_id:(\d+)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_MAX_ERROR_BODY = 1 << 16
_MAX_LINE = 1 << 22
_DONE = object()


class EndpointError(RinnaError):
    """The server could not be reached, or answered in a way rinna-cli cannot use (exit 1)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Retry(Exception):
    """The server ignored how the reply's ids were asked for: ask again the next way."""

    def __init__(self, mode: str):
        self.mode = mode


def base_url(endpoint: str) -> str:
    """The API base of ``endpoint``: ``http://host:8000`` and ``http://host:8000/v1/`` both mean ``http://host:8000/v1``."""
    url = endpoint.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def _one_line(text: str, limit: int = 300) -> str:
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _stderr_warning(message: str) -> None:
    from rinna_cli.render import err_console

    err_console().print(f"rinna: warning: {message}", markup=False, highlight=False, soft_wrap=True, style="yellow")


class _Closer:
    """Shuts the connection down as soon as ``stop`` is set (Ctrl-C), so that a blocked read returns at once."""

    def __init__(self, stop: threading.Event, conn: http.client.HTTPConnection):
        self._stop = stop
        self._conn = conn
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rinna-remote-stop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._finished.is_set():
            if self._stop.wait(0.05):
                sock = self._conn.sock  # None while still connecting: wait for it
                if sock is not None and not self._finished.is_set():
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return

    def finish(self) -> None:
        self._finished.set()


class _TextReply:
    """A reply that arrives as text: ``<NL>`` becomes ``"\\n"`` even when split over chunks."""

    def __init__(self):
        self._held = ""
        self.text = ""

    def push(self, text: str) -> str:
        text = self._held + text
        keep = _partial_nl(text)
        self._held = text[len(text) - keep :]
        shown = decode_newlines(text[: len(text) - keep])
        self.text += shown
        return shown

    def finish(self) -> str:
        shown = decode_newlines(self._held)
        self._held = ""
        self.text += shown
        return shown


class RemoteEngine:
    """Generates on an OpenAI-compatible server; prompt and reply stay token ids."""

    device = "remote"

    def __init__(
        self,
        endpoint: str,
        tokenizer: Tokenizer,
        name: str,
        window: int,
        api_key: str | None = None,
        api_key_env: str = "RINNA_API_KEY",
        timeout: float = DEFAULT_TIMEOUT,
        warn: Callable[[str], None] | None = None,
    ):
        self.endpoint = base_url(endpoint)
        parts = urllib.parse.urlsplit(self.endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = parts.path
        self.tokenizer = tokenizer
        self.name = name
        self.window = window
        self.dtype = self.endpoint  # shown as "<model> on remote (<endpoint>)"
        self.timeout = timeout
        self._api_key = api_key or None
        self._api_key_env = api_key_env
        self._warn = warn or _stderr_warning
        self.served_model: str | None = None
        self.mode: str | None = None  # how the reply's ids come back, once known

    # -- HTTP -----------------------------------------------------------------------------------

    def _fail(self, what: str, status: int | None = None) -> EndpointError:
        message = f"{self.endpoint}: {what}"
        if self._api_key:
            message = message.replace(self._api_key, "***")
        return EndpointError(message, status)

    def _network_error(self, err: BaseException) -> EndpointError:
        if isinstance(err, ConnectionRefusedError):
            return self._fail("connection refused (is the server running, and on this port?)")
        if isinstance(err, (socket.timeout, TimeoutError)):
            return self._fail(f"no answer within {self.timeout:g} s")
        if isinstance(err, socket.gaierror):
            return self._fail(f"cannot resolve the host name {self._host!r}")
        if isinstance(err, ssl.SSLError):
            return self._fail(f"TLS error ({_one_line(getattr(err, 'reason', None) or str(err))})")
        if isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            return self._fail("the server closed the connection without an answer")
        if isinstance(err, http.client.HTTPException):
            return self._fail(f"did not answer in HTTP ({type(err).__name__}); is this the right address and port?")
        if isinstance(err, OSError):
            return self._fail(f"cannot connect ({_one_line(err.strerror or str(err))})")
        return self._fail(f"{type(err).__name__}: {_one_line(str(err))}")

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _open(self, method: str, path: str, body: dict | None = None, stream: bool = False, conn=None):
        """Send a request; return the connection and a 2xx response, or raise a one-line :class:`EndpointError`."""
        conn = conn or self._connection()
        headers = {
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": f"rinna-cli/{__version__}",
        }
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            conn.request(method, self._path + path, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise self._network_error(err) from None
        except BaseException:
            conn.close()
            raise
        if not 200 <= response.status < 300:
            try:
                raise self._status_error(response, f"{method} {self._path}{path}")
            finally:
                conn.close()
        return conn, response

    def _status_error(self, response: http.client.HTTPResponse, request: str) -> EndpointError:
        status = response.status
        try:
            raw = response.read(_MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            raw = b""
        detail = ""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict):
            error = data.get("error", data.get("detail", data.get("message")))
            if isinstance(error, dict):
                error = error.get("message", error.get("msg"))
            if isinstance(error, list) and error and isinstance(error[0], dict):  # FastAPI validation details
                error = error[0].get("msg")
            if isinstance(error, str):
                detail = _one_line(error)
        elif raw and "html" not in (response.getheader("Content-Type") or ""):
            detail = _one_line(raw.decode("utf-8", "replace"))
        said = f": {detail}" if detail else ""
        if status in (401, 403):
            if self._api_key:
                hint = f"check the API key in ${self._api_key_env}"
            else:
                hint = f"it needs an API key: set ${self._api_key_env} (or name another variable with --api-key-env)"
            return self._fail(f"the server refused the request (HTTP {status}{said}); {hint}", status)
        if status == 404:
            return self._fail(
                f"{request} answered HTTP 404{said}; is this the base URL of an OpenAI-compatible server "
                "(`vllm serve` or `rinna serve`, e.g. http://host:8000/v1)?",
                status,
            )
        if status in (429, 503):
            return self._fail(f"the server is busy (HTTP {status}{said}); try again shortly", status)
        if 400 <= status < 500:
            return self._fail(f"the server rejected the request (HTTP {status}{said})", status)
        if status >= 500:
            return self._fail(f"server error (HTTP {status}{said})", status)
        return self._fail(f"{request} answered HTTP {status}{said}, not a result", status)

    def _not_openai(self, what: str) -> EndpointError:
        return self._fail(f"not an OpenAI-compatible server ({what})")

    def _read_json(self, response: http.client.HTTPResponse, request: str) -> object:
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as err:
            raise self._network_error(err) from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            kind = (response.getheader("Content-Type") or "no content type").split(";")[0]
            raise self._not_openai(f"{request} answered {kind}, not JSON") from None

    def _events(self, response: http.client.HTTPResponse) -> Iterator[object]:
        """The JSON payloads of a server-sent event stream, then ``_DONE`` if the server sent ``[DONE]``."""
        data: list[str] = []
        while True:
            raw = response.readline(_MAX_LINE)
            if not raw:
                break
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise self._not_openai("the event stream is not UTF-8") from None
            if line:
                if not line.startswith(":"):
                    field, _, value = line.partition(":")
                    if field == "data":
                        data.append(value[1:] if value.startswith(" ") else value)
                continue
            if not data:
                continue
            payload, data = "\n".join(data), []
            if payload.strip() == "[DONE]":
                yield _DONE
                return
            try:
                yield json.loads(payload)
            except ValueError:
                raise self._not_openai(f"an event is not JSON: {_one_line(payload, 80)!r}") from None

    # -- the served model -----------------------------------------------------------------------

    def check(self) -> None:
        """Ask ``GET /v1/models`` which model the server serves (and its window); fail early if it cannot be used."""
        from rinna_cli.hub import expand

        wanted = expand(self.name)
        try:
            conn, response = self._open("GET", "/models")
        except EndpointError as err:
            if err.status == 404:  # not every server lists its models; send the name as given
                self.served_model = wanted
                return
            raise
        try:
            data = self._read_json(response, f"GET {self._path}/models")
        finally:
            conn.close()
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise self._not_openai(f"GET {self._path}/models did not answer with a model list")
        cards = {m["id"]: m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)}
        if not cards:
            raise self._fail("the server serves no model")
        tail = wanted.rstrip("/").rsplit("/", 1)[-1]
        same_tail = [mid for mid in cards if mid.rstrip("/").rsplit("/", 1)[-1] == tail]
        if wanted in cards:
            chosen = wanted
        elif len(same_tail) == 1:
            chosen = same_tail[0]
        elif len(cards) == 1:
            chosen = next(iter(cards))
        else:
            raise self._fail(f"the server serves {', '.join(sorted(cards))}; pass the one to use with --model")
        self.served_model = chosen
        limit = cards[chosen].get("max_model_len")
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < self.window:
            self.window = limit

    # -- generation -----------------------------------------------------------------------------

    def _body(self, prompt_ids: list[int], options: dict, mode: str) -> dict:
        eos = self.tokenizer.special.eos
        body = {
            "model": self.served_model,
            "prompt": list(prompt_ids),
            "max_tokens": options["max_new_tokens"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": options["temperature"],
            "top_p": options["top_p"],
            "top_k": options["top_k"],  # 0 = off, as in vLLM
            "repetition_penalty": options["repetition_penalty"],
            # </s> ends the reply; as an id, not a stop string: the server's text never holds it (special
            # tokens are skipped), and vLLM refuses stop strings when started with --skip-tokenizer-init.
            "stop_token_ids": [eos],
        }
        if options["seed"] >= 0:
            body["seed"] = options["seed"]
        if mode == "ids":
            body["return_token_ids"] = True
        elif mode == "logprobs":
            body["logprobs"] = 0
            body["return_tokens_as_token_ids"] = True
        return body

    def _choice_ids(self, choice: dict, mode: str) -> list[int] | None:
        """The token ids a streamed choice carries in ``mode``, or None if it carries none that way."""
        if mode == "ids":
            ids = choice.get("token_ids")
        elif mode == "logprobs":
            logprobs = choice.get("logprobs")
            tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
            if not isinstance(tokens, list):
                return None
            ids = []
            for token in tokens:
                match = _TOKEN_ID.fullmatch(token) if isinstance(token, str) else None
                if match is None:
                    return None
                ids.append(int(match.group(1)))
        else:
            return None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return None
        return ids

    def generate(
        self,
        prompt_ids: list[int],
        options: dict,
        on_text: Callable[[str], None] = lambda _: None,
        stop: threading.Event | None = None,
    ) -> Reply:
        """Generate a reply on the server, passing text to ``on_text`` as it becomes printable.

        Setting ``stop`` (Ctrl-C) closes the stream; the reply so far is returned as interrupted.
        """
        if not prompt_ids:
            raise UsageError("empty prompt")
        room = self.window - options["max_new_tokens"]
        if len(prompt_ids) > room:
            raise UsageError(
                f"the prompt is {len(prompt_ids)} tokens; with max_new_tokens = {options['max_new_tokens']} at most "
                f"{max(room, 0)} fit in the served model's {self.window}-token window"
            )
        stop = stop or threading.Event()
        if self.served_model is None:
            self.check()
        mode = self.mode or MODES[0]
        while True:
            try:
                return self._generate(prompt_ids, options, on_text, stop, mode)
            except _Retry as retry:
                mode = retry.mode

    def _generate(self, prompt_ids, options, on_text, stop, mode: str) -> Reply:
        learning = self.mode is None
        started = time.perf_counter()
        decoder = ReplyDecoder(self.tokenizer)
        text_reply = _TextReply()
        conn = self._connection()
        closer = _Closer(stop, conn)
        try:
            conn, response = self._open("POST", "/completions", self._body(prompt_ids, options, mode), True, conn)
        except EndpointError as err:
            closer.finish()
            if stop.is_set():  # Ctrl-C before the server answered
                ended = time.perf_counter()
                return self._reply(mode, prompt_ids, decoder, text_reply, [], None, True, None, started, None, ended)
            if learning and err.status in (400, 422) and mode != MODES[-1]:
                raise _Retry(MODES[MODES.index(mode) + 1]) from None  # a strict server refused the extra fields
            raise
        except BaseException:
            closer.finish()
            raise
        received: list[int] = []
        finish: str | None = None
        usage: dict | None = None
        first_at: float | None = None
        done = False
        request = f"POST {self._path}/completions"
        try:
            if "text/event-stream" in (response.getheader("Content-Type") or ""):
                events: Iterator[object] = self._events(response)
            else:  # a server that ignored "stream": one JSON answer
                events = iter([self._read_json(response, request), _DONE])
            for event in events:
                if event is _DONE:
                    done = True
                    break
                if not isinstance(event, dict):
                    raise self._not_openai(f"{request} streamed {type(event).__name__}, not an object")
                if event.get("error"):
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    raise self._fail(f"the server failed while generating: {_one_line(str(message))}")
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                choices = event.get("choices")
                if not isinstance(choices, list):
                    raise self._not_openai(f"{request} streamed an object without choices")
                for choice in choices:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    if mode != "text":
                        ids = self._choice_ids(choice, mode)
                        if ids is None and not learning and not choice.get("text"):
                            ids = []  # e.g. a closing chunk with the finish reason only
                        if ids is None:
                            if not learning:
                                raise self._fail(f"the server stopped returning token ids ({mode})")
                            if mode == "ids":
                                raise _Retry("logprobs")  # nothing has been shown yet: ask again
                            mode = "text"  # the logprobs hold text: use this stream as text
                        else:
                            if learning:
                                self.mode = mode
                                learning = False
                            if ids and first_at is None:
                                first_at = time.perf_counter()
                            received.extend(ids)
                            shown = decoder.push(ids)
                            if shown:
                                on_text(shown)
                    if mode == "text":
                        if learning:
                            self.mode = mode
                            learning = False
                            self._warn_text_only()
                        text = choice.get("text")
                        if not isinstance(text, str):
                            raise self._not_openai(f"{request} streamed a choice without text")
                        if text and first_at is None:
                            first_at = time.perf_counter()
                        shown = text_reply.push(text)
                        if shown:
                            on_text(shown)
                    if choice.get("finish_reason"):
                        finish = str(choice["finish_reason"])
                if stop.is_set():
                    break
        except (OSError, http.client.HTTPException) as err:
            if not stop.is_set():
                raise self._network_error(err) from None
        finally:
            closer.finish()
            conn.close()
        interrupted = stop.is_set() and finish is None
        if not interrupted and finish is None and not done:
            raise self._fail("the connection closed before the reply was complete")
        if finish == "abort":
            raise self._fail("the server aborted the reply")
        ended = time.perf_counter()
        shown = text_reply.finish() if mode == "text" else decoder.finish()
        if shown:
            on_text(shown)
        return self._reply(mode, prompt_ids, decoder, text_reply, received, finish, interrupted, usage, started, first_at, ended)

    def _reply(self, mode, prompt_ids, decoder, text_reply, received, finish, interrupted, usage, started, first_at, ended):
        eos = self.tokenizer.special.eos
        usage = usage or {}
        if mode == "text":
            text = text_reply.text
            ids = self.tokenizer.encode(utterance(SYSTEM, text))
            prefix = self.tokenizer.encode(f"{SYSTEM}: ")
            reply_ids = ids[len(prefix) :] if ids[: len(prefix)] == prefix else self.tokenizer.encode(encode_newlines(text))
            stopped = finish == "stop"
            completion = usage.get("completion_tokens")
            if not isinstance(completion, int) or isinstance(completion, bool):
                completion = len(reply_ids) + (1 if stopped else 0)
        else:
            text, reply_ids = decoder.text, decoder.ids
            stopped = eos in received or finish == "stop"
            # Counted as the local engine counts: the generated ids with the </s> that ended them.
            completion = received.index(eos) + 1 if eos in received else len(received) + (1 if stopped else 0)
        finish_reason = "stop" if stopped else "interrupted" if interrupted else "length"
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None  # what the server did not prefill
        prefilled = len(prompt_ids) - cached if isinstance(cached, int) and 0 <= cached <= len(prompt_ids) else len(prompt_ids)
        first = first_at or ended
        return Reply(
            text=text,
            ids=reply_ids,
            finish_reason=finish_reason,
            prompt_tokens=len(prompt_ids),
            prefilled_tokens=prefilled,
            completion_tokens=completion,
            ttft_s=first - started,
            tokens_per_s=(completion - 1) / (ended - first) if completion > 1 and ended > first else 0.0,
        )

    def _warn_text_only(self) -> None:
        self._warn(
            f"{self.endpoint} returns replies as text only, not as token ids, so the server's detokenizer decides "
            "spaces and byte-fallback characters; vLLM >= 0.10.2 returns token ids (return_token_ids), older vLLM "
            "when started with --return-tokens-as-token-ids"
        )

    def forget(self) -> None:
        """Nothing to drop here: the server keeps (and reuses) its own cache."""


def connect(settings, tokenizer: Tokenizer, window: int, environ=None, warn: Callable[[str], None] | None = None) -> RemoteEngine:
    """A :class:`RemoteEngine` for ``settings.endpoint``, checked to answer; the API key is read from the environment."""
    import os

    environ = os.environ if environ is None else environ
    key = environ.get(settings.api_key_env) or None
    engine = RemoteEngine(
        settings.endpoint, tokenizer, settings.model, window, api_key=key, api_key_env=settings.api_key_env, warn=warn
    )
    engine.check()
    return engine
