"""HTTP to an OpenAI-compatible server: connections, one-line errors, server-sent events, closing on stop.

Only the standard library's ``http.client`` is used: no dependency for the base
install, and the socket is at hand to close when Ctrl-C is pressed.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
import urllib.parse
from typing import Iterator

from rinna_cli import __version__
from rinna_cli.errors import RinnaError

DEFAULT_TIMEOUT = 60.0  # seconds to connect, and at most between two pieces of the answer
DONE = object()  # what :meth:`Transport.events` yields for ``data: [DONE]``
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_MAX_ERROR_BODY = 1 << 16
_MAX_LINE = 1 << 22


class EndpointError(RinnaError):
    """The server could not be reached, or answered in a way rinna-cli cannot use (exit 1)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def base_url(endpoint: str) -> str:
    """The API base of ``endpoint``: ``http://host:8000`` and ``http://host:8000/v1/`` both mean ``http://host:8000/v1``."""
    url = endpoint.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one short line without control characters (for error messages)."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_detail(raw: bytes, content_type: str) -> str:
    """The message an error body carries (OpenAI, FastAPI or plain text), or ``""``."""
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
        return one_line(error) if isinstance(error, str) else ""
    if raw and "html" not in content_type:
        return one_line(raw.decode("utf-8", "replace"))
    return ""


class Closer:
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


class Transport:
    """Requests to one API base URL; every failure becomes a one-line :class:`EndpointError`."""

    def __init__(self, endpoint: str, api_key: str | None, api_key_env: str, timeout: float = DEFAULT_TIMEOUT):
        self.endpoint = base_url(endpoint)
        parts = urllib.parse.urlsplit(self.endpoint)
        self._https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self._port = parts.port
        self.path = parts.path
        self.timeout = timeout
        self.api_key = api_key or None
        self.api_key_env = api_key_env

    def fail(self, what: str, status: int | None = None) -> EndpointError:
        message = f"{self.endpoint}: {what}"
        if self.api_key:
            message = message.replace(self.api_key, "***")
        return EndpointError(message, status)

    def not_openai(self, what: str) -> EndpointError:
        return self.fail(f"not an OpenAI-compatible server ({what})")

    def network_error(self, err: BaseException) -> EndpointError:
        if isinstance(err, ConnectionRefusedError):
            return self.fail("connection refused (is the server running, and on this port?)")
        if isinstance(err, (socket.timeout, TimeoutError)):
            return self.fail(f"no answer within {self.timeout:g} s")
        if isinstance(err, socket.gaierror):
            return self.fail(f"cannot resolve the host name {self.host!r}")
        if isinstance(err, ssl.SSLError):
            return self.fail(f"TLS error ({one_line(getattr(err, 'reason', None) or str(err))})")
        if isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            return self.fail("the server closed the connection without an answer")
        if isinstance(err, http.client.HTTPException):
            return self.fail(f"did not answer in HTTP ({type(err).__name__}); is this the right address and port?")
        if isinstance(err, OSError):
            return self.fail(f"cannot connect ({one_line(err.strerror or str(err))})")
        return self.fail(f"{type(err).__name__}: {one_line(str(err))}")

    def connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self.host, self._port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self.host, self._port, timeout=self.timeout)

    def open(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None, stream: bool = False
    ):
        """Send a request on ``conn``; return a 2xx response, or close ``conn`` and raise an :class:`EndpointError`."""
        headers = {
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": f"rinna-cli/{__version__}",
        }
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, self.path + path, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise self.network_error(err) from None
        except BaseException:
            conn.close()
            raise
        if not 200 <= response.status < 300:
            try:
                raise self.status_error(response, f"{method} {self.path}{path}")
            finally:
                conn.close()
        return response

    def status_error(self, response: http.client.HTTPResponse, request: str) -> EndpointError:
        status = response.status
        try:
            raw = response.read(_MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            raw = b""
        detail = _error_detail(raw, response.getheader("Content-Type") or "")
        said = f": {detail}" if detail else ""
        if status in (401, 403):
            if self.api_key:
                hint = f"check the API key in ${self.api_key_env}"
            else:
                hint = f"it needs an API key: set ${self.api_key_env} (or name another variable with --api-key-env)"
            return self.fail(f"the server refused the request (HTTP {status}{said}); {hint}", status)
        if status == 404:
            return self.fail(
                f"{request} answered HTTP 404{said}; is this the base URL of an OpenAI-compatible server "
                "(`vllm serve` or `rinna serve`, e.g. http://host:8000/v1)?",
                status,
            )
        if status in (429, 503):
            return self.fail(f"the server is busy (HTTP {status}{said})", status)
        if 400 <= status < 500:
            return self.fail(f"the server rejected the request (HTTP {status}{said})", status)
        if status >= 500:
            return self.fail(f"server error (HTTP {status}{said})", status)
        return self.fail(f"{request} answered HTTP {status}{said}, not a result", status)

    def read_json(self, response: http.client.HTTPResponse, request: str) -> object:
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as err:
            raise self.network_error(err) from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            kind = (response.getheader("Content-Type") or "no content type").split(";")[0]
            raise self.not_openai(f"{request} answered {kind}, not JSON") from None

    def get_json(self, path: str) -> object:
        """``GET path`` answered as JSON."""
        conn = self.connection()
        response = self.open(conn, "GET", path)
        try:
            return self.read_json(response, f"GET {self.path}{path}")
        finally:
            conn.close()

    def payloads(self, response: http.client.HTTPResponse, request: str) -> Iterator[object]:
        """The JSON payloads of a streamed answer (or of a server that ignored ``stream``), ``DONE`` last if sent."""
        if "text/event-stream" in (response.getheader("Content-Type") or ""):
            return self.events(response)
        return iter([self.read_json(response, request), DONE])

    def events(self, response: http.client.HTTPResponse) -> Iterator[object]:
        """The JSON payloads of a server-sent event stream, then ``DONE`` if the server sent ``[DONE]``."""
        data: list[str] = []
        while True:
            raw = response.readline(_MAX_LINE)
            if not raw:
                break
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise self.not_openai("the event stream is not UTF-8") from None
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
                yield DONE
                return
            try:
                yield json.loads(payload)
            except ValueError:
                raise self.not_openai(f"an event is not JSON: {one_line(payload, 80)!r}") from None
