"""``RemoteEngine`` and ``rinna ask --endpoint`` against a small fake OpenAI-compatible server.

The fake (``http.server`` in a thread on 127.0.0.1) answers the way the servers
rinna-cli meets do: vLLM >= 0.10.2 (``token_ids`` in each streamed choice when
asked with ``return_token_ids``), older vLLM with ``--return-tokens-as-token-ids``
(``token_id:N`` strings in the logprobs), a text-only server, and the failures:
refused connections, silence, 401/403/404/429/500, HTML, broken streams.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rinna_cli.contract import Sampling, Step
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.prompt import encode_newlines
from rinna_cli.remote import EndpointError, RemoteEngine, base_url, connect
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests.fixtures.memorized_data import CONVERSATIONS
from tests.helpers import RINNA, process_env

ROOT = Path(__file__).resolve().parent.parent
SERVED = "rinna-test"
KEY = "sekret-key-0123456789"
FIRST_TURNS = [turns[0] for turns in CONVERSATIONS]
OPTIONS = Sampling(temperature=0.0, top_p=0.9, top_k=0, repetition_penalty=1.1, max_new_tokens=64, seed=7)


def texts(chunks: list[str]):
    """An ``on_step`` that collects the steps' non-empty text."""
    return lambda step: chunks.append(step.text) if step.text else None


@pytest.fixture(scope="module")
def tokenizer(memorized_model) -> Tokenizer:
    return Tokenizer.from_folder(memorized_model)


def reply_ids(tokenizer: Tokenizer, reply: str) -> list[int]:
    """The ids the memorized model generates for ``reply`` (it was trained on exactly these), with ``</s>``."""
    return tokenizer.encode(encode_newlines(reply)) + [tokenizer.special.eos]


def prompt_for(tokenizer: Tokenizer, question: str) -> list[int]:
    conversation = Conversation(tokenizer)
    conversation.add_user(question)
    return conversation.prompt_ids()


# --- the fake server ------------------------------------------------------------------------------


class Fake:
    """What the fake server does; tests set ``mode`` and friends, and read ``requests``."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self):
        self.mode = "ids"  # ids | logprobs | text | json | status | html | garbage | early-eof | error-event | hang | endless
        self.busy = 0  # requests answered 429 before any is answered as the mode says
        self.status = 200
        self.error_body = b""
        self.models: object = {"object": "list", "data": [{"id": SERVED, "object": "model", "max_model_len": 2048}]}
        self.models_status = 200
        self.requests: list[dict] = []
        self.client_gone = threading.Event()
        self.chunks_sent = 0
        self.release = threading.Event()  # ends a "hang"
        self.reply_override: list[int] | None = None  # ids to answer every prompt with (a model of another tokenizer)

    def answer_for(self, prompt: list[int]) -> tuple[list[int], str]:
        """The memorized reply to the last question in ``prompt`` (the ids with </s>, and the text with <NL>)."""
        if self.reply_override is not None:
            return self.reply_override, ""
        for question, reply in FIRST_TURNS:
            if prompt == prompt_for(self.tokenizer, question):
                return reply_ids(self.tokenizer, reply), encode_newlines(reply)
        return [5, 6, self.tokenizer.special.eos], self.tokenizer.decode([5, 6])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body of a stream ends when the connection closes

    def log_message(self, *args):
        pass

    @property
    def fake(self) -> Fake:
        return self.server.fake

    def _json(self, status: int, data: object) -> None:
        body = json.dumps(data, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self, body: object) -> None:
        self.fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})

    def do_GET(self):
        self._record(None)
        fake = self.fake
        if self.path != "/v1/models":
            return self._json(404, {"detail": "Not Found"})
        if isinstance(fake.models, bytes):
            self.send_response(fake.models_status)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(fake.models)
            return
        if fake.models_status == 401 or fake.mode == "status" and fake.status in (401, 403):
            return self._json(fake.status if fake.mode == "status" else 401, {"error": {"message": "bad key"}})
        self._json(fake.models_status, fake.models)

    def _sse(self, data: object) -> None:
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()
        self.fake.chunks_sent += 1

    def do_POST(self):
        fake = self.fake
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        self._record(body)
        if self.path != "/v1/completions":
            return self._json(404, {"detail": "Not Found"})
        if fake.busy:
            fake.busy -= 1
            return self._json(429, {"error": {"message": "busy: 4 running, 4 queued"}})
        mode = fake.mode
        if mode == "strict" and ("return_token_ids" in body or "logprobs" in body):
            return self._json(400, {"error": {"message": "extra fields not permitted"}})
        if mode == "status":
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(fake.error_body)
            return
        if mode == "hang":
            fake.release.wait(10)
            return
        if mode == "html":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html><body>Welcome to nginx!</body></html>")
            return
        ids, text = fake.answer_for(body["prompt"])
        if mode == "json":
            choice = {"index": 0, "text": text, "finish_reason": "stop", "token_ids": ids if body.get("return_token_ids") else None}
            return self._json(200, {"object": "text_completion", "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": len(ids)}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            if mode == "garbage":
                self._sse("this is not json")
                return
            if mode == "error-event":
                self._sse({"object": "error", "error": {"message": "CUDA out of memory\nwith details", "code": 500}})
                return
            if mode == "endless":
                eos = fake.tokenizer.special.eos
                for _ in range(2000):
                    self._sse({"choices": [{"index": 0, "text": "x", "token_ids": [5], "finish_reason": None}]})
                    time.sleep(0.005)
                self._sse({"choices": [{"index": 0, "text": "", "token_ids": [eos], "finish_reason": "stop"}]})
                self._sse("[DONE]")
                return
            self._stream(body, mode, ids, text)
        except (BrokenPipeError, ConnectionResetError):
            fake.client_gone.set()

    def _stream(self, body: dict, mode: str, ids: list[int], text: str) -> None:
        with_ids = mode == "ids" and body.get("return_token_ids") is True
        with_token_strings = mode == "logprobs" and body.get("logprobs") is not None and body.get("return_tokens_as_token_ids")
        if with_ids or with_token_strings:
            for index, pid in enumerate(ids):  # one id per chunk: byte-fallback characters arrive split
                last = index == len(ids) - 1
                piece = "" if last or pid >= self.fake.tokenizer.vocab_size else self.fake.tokenizer.decode([pid])
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": "stop" if last else None}
                if with_ids:
                    choice["token_ids"] = [pid]
                else:
                    choice["logprobs"] = {"tokens": [f"token_id:{pid}"], "token_logprobs": [-0.1], "text_offset": [0], "top_logprobs": [None]}
                self._sse({"id": "cmpl-1", "object": "text_completion", "model": SERVED, "choices": [choice]})
        else:  # text only, in 3-character pieces: "<NL>" arrives split
            pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
            for piece in pieces:
                self._sse({"choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]})
            if mode == "early-eof":
                return
            self._sse({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
        self._sse({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(ids), "prompt_tokens_details": {"cached_tokens": 3}}})
        self._sse("[DONE]")


@pytest.fixture(scope="module")
def server(tokenizer):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.fake = Fake(tokenizer)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.fake.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fake(server) -> Fake:
    server.fake.reset()
    yield server.fake
    server.fake.release.set()


@pytest.fixture
def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def remote(url, tokenizer, warnings=None, **kwargs) -> RemoteEngine:
    return RemoteEngine(url, tokenizer, SERVED, 2048, warn=(warnings.append if warnings is not None else None), **kwargs)


def completions(fake: Fake) -> list[dict]:
    return [r["body"] for r in fake.requests if r["path"] == "/v1/completions"]


# --- replies as token ids -------------------------------------------------------------------------


def test_base_url_takes_the_server_or_its_v1():
    assert base_url("http://h:8000") == base_url("http://h:8000/") == base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert base_url("https://gw.example/rinna") == "https://gw.example/rinna/v1"


def test_token_ids_stream_decoded_locally(fake, url, tokenizer):
    engine = remote(url, tokenizer, api_key=KEY)
    assert (engine.device, engine.dtype) == ("remote", f"{url}/v1")
    for question, answer in FIRST_TURNS:
        chunks: list[str] = []
        prompt = prompt_for(tokenizer, question)
        reply = engine.generate(prompt, OPTIONS, texts(chunks))
        assert "".join(chunks) == reply.text == answer
        assert all("\ufffd" not in chunk for chunk in chunks)
        assert reply.ids == reply_ids(tokenizer, answer)[:-1]
        assert reply.finish_reason == "stop"
        assert reply.completion_tokens == len(reply.ids) + 1  # with </s>, as the local engine counts
        assert (reply.prompt_tokens, reply.prefilled_tokens) == (len(prompt), len(prompt) - 3)  # cached_tokens = 3
    assert engine.mode == "ids"
    bodies = completions(fake)
    assert len(bodies) == len(FIRST_TURNS)  # one request per reply
    body = bodies[0]
    assert body["prompt"] == prompt_for(tokenizer, FIRST_TURNS[0][0])  # a list of token ids
    assert body["stream"] is True and body["return_token_ids"] is True
    assert body["model"] == SERVED and body["max_tokens"] == 64
    assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"], body["seed"]) == (0.0, 0.9, 0, 1.1, 7)
    assert body["stop_token_ids"] == [tokenizer.special.eos] and "stop" not in body
    assert "logprobs" not in body
    post = next(r for r in fake.requests if r["path"] == "/v1/completions")
    assert post["headers"]["Authorization"] == f"Bearer {KEY}"


def test_random_seed_is_not_sent(fake, url, tokenizer):
    remote(url, tokenizer).generate(prompt_for(tokenizer, FIRST_TURNS[1][0]), replace(OPTIONS, seed=-1))
    body = completions(fake)[0]
    assert "seed" not in body
    assert not any("Authorization" in r["headers"] for r in fake.requests)  # no key, no header


def test_token_id_strings_in_logprobs(fake, url, tokenizer):
    """A vLLM without return_token_ids, started with --return-tokens-as-token-ids."""
    fake.mode = "logprobs"
    warnings: list[str] = []
    engine = remote(url, tokenizer, warnings)
    question, answer = FIRST_TURNS[2]  # byte fallback
    assert engine.generate(prompt_for(tokenizer, question), OPTIONS).text == answer
    assert engine.mode == "logprobs"
    first, second = completions(fake)
    assert first.get("return_token_ids") is True and "logprobs" not in first  # ignored: asked again
    assert second["logprobs"] == 0 and second["return_tokens_as_token_ids"] is True
    question, answer = FIRST_TURNS[3]
    reply = engine.generate(prompt_for(tokenizer, question), OPTIONS)
    assert reply.text == answer and reply.ids == reply_ids(tokenizer, answer)[:-1]
    assert len(completions(fake)) == 3  # the way is remembered
    assert warnings == []


def test_text_only_server_works_with_one_warning(fake, url, tokenizer):
    fake.mode = "text"
    warnings: list[str] = []
    engine = remote(url, tokenizer, warnings)
    for question, answer in (FIRST_TURNS[0], FIRST_TURNS[3]):  # multi-line: <NL> arrives split over chunks
        chunks: list[str] = []
        reply = engine.generate(prompt_for(tokenizer, question), OPTIONS, texts(chunks))
        assert "".join(chunks) == reply.text == answer
        assert reply.finish_reason == "stop"
        assert reply.ids == tokenizer.encode(encode_newlines(answer))  # read back as the card encodes it
    assert engine.mode == "text"
    assert len(warnings) == 1 and "text only" in warnings[0] and "--return-tokens-as-token-ids" in warnings[0]
    assert len(completions(fake)) == 3  # ids asked, logprobs asked (answered as text), then text


def test_a_strict_server_that_refuses_the_extra_fields(fake, url, tokenizer):
    fake.mode = "strict"
    warnings: list[str] = []
    question, answer = FIRST_TURNS[0]
    assert remote(url, tokenizer, warnings).generate(prompt_for(tokenizer, question), OPTIONS).text == answer
    assert len(warnings) == 1 and len(completions(fake)) == 3


def test_a_server_that_ignores_stream(fake, url, tokenizer):
    fake.mode = "json"
    question, answer = FIRST_TURNS[2]
    reply = remote(url, tokenizer).generate(prompt_for(tokenizer, question), OPTIONS)
    assert reply.text == answer and reply.finish_reason == "stop"


# --- the served model -------------------------------------------------------------------------------


def test_served_model_and_window_come_from_the_model_list(fake, url, tokenizer):
    fake.models = {"data": [{"id": "/models/rinna-test", "max_model_len": 1024}]}
    engine = remote(url, tokenizer)
    engine.check()
    assert engine.served_model == "/models/rinna-test" and engine.window == 1024
    with pytest.raises(UsageError, match="1024-token window"):
        engine.generate([5] * 1000, OPTIONS)

    fake.models = {"data": [{"id": "a"}, {"id": "b"}]}
    with pytest.raises(EndpointError, match="serves a, b; pass the one to use with --model"):
        remote(url, tokenizer).check()

    fake.models_status = 404
    engine = remote(url, tokenizer)
    engine.check()
    assert engine.served_model == SERVED


# --- another tokenizer than the served model's ------------------------------------------------------


def test_a_vocabulary_size_that_differs_warns_once(fake, url, tokenizer):
    fake.models = {"data": [{"id": SERVED, "max_model_len": 2048, "vocab_size": 32000}]}
    warnings: list[str] = []
    engine = remote(url, tokenizer, warnings)
    engine.check()
    question, answer = FIRST_TURNS[0]
    assert engine.generate(prompt_for(tokenizer, question), OPTIONS).text == answer
    assert warnings == [
        f"{url}/v1: the served model has 32000 token ids, the tokenizer of --model {SERVED} 482; replies are decoded "
        "with --model's tokenizer, so if it is not the served model's they come out wrong: pass the served model's "
        "hub id or folder as --model"
    ]
    fake.models = {"data": [{"id": SERVED, "vocab_size": 482}]}
    quiet: list[str] = []
    remote(url, tokenizer, quiet).check()
    assert quiet == []


def test_a_reply_of_ids_that_decode_to_nothing_warns_once(fake, url, tokenizer):
    special = tokenizer.special
    fake.models = {"data": [{"id": "org/other-model"}]}  # a name alone proves nothing: no warning yet
    fake.reply_override = [special.pad, special.bos, special.pad, special.eos]
    warnings: list[str] = []
    engine = remote(url, tokenizer, warnings)
    engine.check()
    assert warnings == []
    for _ in range(2):
        reply = engine.generate(prompt_for(tokenizer, "猫"), OPTIONS)
        assert reply.text == "" and reply.finish_reason == "stop"
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"{url}/v1: the reply's 3 token ids decode to no text; the server serves 'org/other-model', not --model "
        f"{SERVED}; replies are decoded with --model's tokenizer"
    )
    fake.reply_override = [special.eos]  # an empty reply that is only </s> is no sign
    fine: list[str] = []
    remote(url, tokenizer, fine).generate(prompt_for(tokenizer, "猫"), OPTIONS)
    assert fine == []


def test_an_id_outside_the_tokenizer_fails_in_one_line(fake, url, tokenizer):
    fake.reply_override = [5, 31999, tokenizer.special.eos]
    with pytest.raises(EndpointError) as err:
        remote(url, tokenizer).generate(prompt_for(tokenizer, "猫"), OPTIONS)
    assert str(err.value) == (
        f"{url}/v1: the server returned token id 31999, outside the 482 ids of --model {SERVED}'s tokenizer: the "
        "served model's tokenizer is another; pass the served model's hub id or folder as --model"
    )


# --- failures: one line naming the endpoint ------------------------------------------------------


def one_line_error(url, tokenizer, **kwargs) -> str:
    with pytest.raises(RinnaError) as err:
        remote(url, tokenizer, **kwargs).generate(prompt_for(tokenizer, FIRST_TURNS[1][0]), OPTIONS)
    message = str(err.value)
    assert err.value.exit_code == 1
    assert "\n" not in message and message.startswith(f"{base_url(url)}: "), message
    return message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_refused(tokenizer):
    url = f"http://127.0.0.1:{free_port()}"
    assert "connection refused" in one_line_error(url, tokenizer)


def test_silence_times_out(fake, url, tokenizer):
    fake.mode = "hang"
    started = time.monotonic()
    assert "no answer within 0.3 s" in one_line_error(url, tokenizer, timeout=0.3)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (500, b'{"error": {"message": "boom"}}', "server error (HTTP 500: boom)"),
        (503, b"", "busy (HTTP 503)"),
        (429, b'{"error": {"message": "queue full"}}', "busy (HTTP 429: queue full)"),
        (404, b'{"detail": "Not Found"}', "HTTP 404: Not Found; is this the base URL of an OpenAI-compatible server"),
        (400, b'{"error": {"message": "max_tokens is too large\\nreally"}}', "rejected the request (HTTP 400: max_tokens is too large really)"),
    ],
)
def test_http_errors(fake, url, tokenizer, status, body, expected):
    fake.mode, fake.status, fake.error_body = "status", status, body
    fake.models = {"data": [{"id": SERVED}]}
    engine = remote(url, tokenizer, busy_wait_s=0.6)
    engine.mode = "ids"  # known: a 400 is an error, not a reason to ask another way
    with pytest.raises(EndpointError) as err:
        engine.generate(prompt_for(tokenizer, FIRST_TURNS[1][0]), OPTIONS)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_busy_server_is_asked_again_until_it_answers(fake, url, tokenizer):
    """``rinna batch --parallel 16`` against a server taking 8: 366 of 400 rows failed with HTTP 429."""
    question, reply = FIRST_TURNS[1]
    fake.busy = 3
    engine = remote(url, tokenizer)
    started = time.monotonic()
    assert engine.generate(prompt_for(tokenizer, question), OPTIONS).text == reply
    assert len(completions(fake)) == 4 and 0.25 + 0.5 + 1.0 <= time.monotonic() - started < 5  # backing off
    fake.busy = 1000
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert engine.generate(prompt_for(tokenizer, question), OPTIONS, stop=stop).finish_reason == "interrupted"


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_is_named_by_its_variable_never_shown(fake, url, tokenizer, status):
    fake.mode, fake.status = "status", status
    fake.error_body = json.dumps({"error": {"message": f"invalid key {KEY}"}}).encode()  # a server that echoes it
    with pytest.raises(EndpointError) as err:
        remote(url, tokenizer, api_key=KEY, api_key_env="MY_KEY").check()
    message = str(err.value)
    assert f"HTTP {status}" in message and "$MY_KEY" in message and KEY not in message
    fake.requests.clear()
    with pytest.raises(EndpointError, match=r"needs an API key: set \$RINNA_API_KEY"):
        remote(url, tokenizer).check()


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("html", "not an OpenAI-compatible server (POST /v1/completions answered text/html, not JSON)"),
        ("garbage", "not an OpenAI-compatible server (an event is not JSON"),
        ("early-eof", "the connection closed before the reply was complete"),
        ("error-event", "the server failed while generating: CUDA out of memory with details"),
    ],
)
def test_broken_answers(fake, url, tokenizer, mode, expected):
    fake.mode = mode
    assert expected in one_line_error(url, tokenizer)


def test_not_an_openai_server(fake, url, tokenizer):
    fake.models = b"<html>hello</html>"
    with pytest.raises(EndpointError, match=r"not an OpenAI-compatible server \(GET /v1/models answered text/html, not JSON\)"):
        remote(url, tokenizer).check()


# --- Ctrl-C closes the stream ----------------------------------------------------------------------


def test_stop_closes_the_stream(fake, url, tokenizer):
    fake.mode = "endless"
    stop = threading.Event()
    chunks: list[str] = []

    def on_step(step: Step) -> None:
        if step.text:
            chunks.append(step.text)
        if len(chunks) == 3:
            stop.set()  # as Ctrl-C does

    started = time.monotonic()
    reply = remote(url, tokenizer).generate(prompt_for(tokenizer, "こんにちは"), OPTIONS, on_step, stop)
    assert reply.finish_reason == "interrupted" and reply.text.startswith("".join(chunks[:3]))
    assert time.monotonic() - started < 5
    assert fake.client_gone.wait(5)  # the server noticed: it could stop generating
    assert fake.chunks_sent < 1000


def test_stop_while_the_server_is_silent(fake, url, tokenizer):
    fake.mode = "hang"
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    reply = remote(url, tokenizer, timeout=30).generate(prompt_for(tokenizer, "こんにちは"), OPTIONS, stop=stop)
    assert reply.finish_reason == "interrupted" and reply.text == ""
    assert time.monotonic() - started < 3


# --- rinna ask --endpoint -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("remote_env")
    return process_env(
        base / "hf", base / "home", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RINNA_DEVICE="cpu", RINNA_QUANTIZE="none"
    )


def rinna(env: dict, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RINNA, *args], input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_ask_endpoint_sends_the_key_and_prints_the_reply(fake, url, env, memorized_model):
    question, answer = FIRST_TURNS[2]
    result = rinna({**env, "RINNA_API_KEY": KEY}, "ask", "--endpoint", url, "--model", str(memorized_model), "-t", "0", question)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (answer + "\n").encode() and result.stderr == b""
    assert {r["headers"].get("Authorization") for r in fake.requests} == {f"Bearer {KEY}"}
    assert completions(fake)[0]["temperature"] == 0.0


def test_endpoint_from_the_environment_and_another_key_variable(fake, url, env, memorized_model):
    question, answer = FIRST_TURNS[0]
    environ = {**env, "RINNA_ENDPOINT": url, "OTHER_KEY": "other-key"}
    result = rinna(environ, "ask", "--api-key-env", "OTHER_KEY", "--model", str(memorized_model), "-t", "0", "--json", question)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["reply"] == answer and data["finish_reason"] == "stop"
    assert data["completion_tokens"] == len(reply_ids(fake.tokenizer, answer))
    assert {r["headers"].get("Authorization") for r in fake.requests} == {"Bearer other-key"}


def test_ask_endpoint_failure_is_one_line_without_the_key(fake, url, env, memorized_model):
    fake.mode, fake.status = "status", 401
    fake.error_body = json.dumps({"error": {"message": f"key {KEY} is wrong"}}).encode()
    result = rinna({**env, "RINNA_API_KEY": KEY}, "ask", "--endpoint", url, "--model", str(memorized_model), "question")
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert stderr.startswith(f"rinna: error: {url}/v1: the server refused the request (HTTP 401") and stderr.count("\n") == 1
    assert KEY not in stderr and result.stdout == b""


def test_ask_endpoint_text_only_warns_once(fake, url, env, memorized_model):
    fake.mode = "text"
    question, answer = FIRST_TURNS[3]
    result = rinna(env, "ask", "--endpoint", url, "--model", str(memorized_model), question)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (answer + "\n").encode()
    assert result.stderr.decode().count("rinna: warning:") == 1


def test_ask_endpoint_with_another_tokenizer_warns(fake, url, env, memorized_model):
    special = Tokenizer.from_folder(memorized_model).special
    fake.reply_override = [special.pad, special.pad, special.eos]
    result = rinna(env, "ask", "--endpoint", url, "--model", str(memorized_model), "q")
    assert result.returncode == 0 and result.stdout == b"\n"
    stderr = result.stderr.decode()
    assert stderr.count("rinna: warning:") == 1 and "the reply's 2 token ids decode to no text" in stderr


def test_bad_endpoint_is_a_usage_error(env, memorized_model):
    result = rinna(env, "ask", "--endpoint", "ftp://example", "--model", str(memorized_model), "q")
    assert result.returncode == 2 and b"endpoint must be an http:// or https:// URL" in result.stderr
    result = rinna(env, "ask", "--endpoint", "http://user:pw@example", "--model", str(memorized_model), "q")
    assert result.returncode == 2 and b"pw" not in result.stderr


def test_ctrl_c_closes_the_stream(fake, url, env, memorized_model):
    fake.mode = "endless"
    proc = subprocess.Popen(
        [*RINNA, "ask", "--endpoint", url, "--model", str(memorized_model), "hello"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no output"
        os.read(proc.stdout.fileno(), 1)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, proc.stderr.read().decode()
    assert fake.client_gone.wait(5) and fake.chunks_sent < 2000


def test_ask_endpoint_imports_no_torch(fake, url, env, memorized_model):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rinna_cli", "ask", "--endpoint", url, "--model", str(memorized_model), FIRST_TURNS[1][0]],
        stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout == (FIRST_TURNS[1][1] + "\n").encode()
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)", result.stderr.decode(), re.M)
    assert "rinna_cli.remote" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers")]


def test_connect_reads_the_key_from_the_named_variable(fake, url, tokenizer):
    from types import SimpleNamespace

    settings = SimpleNamespace(model=SERVED, endpoint=url, api_key_env="K")
    engine = connect(settings, tokenizer, 2048, environ={"K": "abc"})
    assert engine.served_model == SERVED and engine.dtype == f"{url}/v1"
    assert fake.requests[-1]["headers"]["Authorization"] == "Bearer abc"


# --- the settings ---------------------------------------------------------------------------------


def test_endpoint_settings_are_checked(tmp_path, monkeypatch):
    from rinna_cli import config

    monkeypatch.setenv("RINNA_CLI_HOME", str(tmp_path))
    defaults = config.load({}, {})
    assert (defaults.endpoint, defaults.api_key_env) == ("", "RINNA_API_KEY")
    (tmp_path / "config.toml").write_text('endpoint = "http://gpu:8000/v1"\napi_key_env = "GPU_KEY"\n')
    settings = config.load({}, {})
    assert (settings.endpoint, settings.api_key_env) == ("http://gpu:8000/v1", "GPU_KEY")
    assert config.load({"endpoint": ""}, {}).endpoint == ""  # --endpoint '' = local again
    assert config.load({}, {"RINNA_ENDPOINT": "https://x.example/v1"}).endpoint == "https://x.example/v1"
    for bad, message in [
        ("gpu:8000", "must be an http:// or https:// URL"),
        ("http://", "must be an http:// or https:// URL"),
        ("http://h:99999", "invalid port"),
        ("http://me:pw@h", "must not hold credentials"),
    ]:
        with pytest.raises(UsageError, match=message) as err:
            config.check("endpoint", bad, "--endpoint")
        assert "pw" not in str(err.value)
    with pytest.raises(UsageError, match="must name an environment variable"):
        config.check("api_key_env", "MY KEY", "--api-key-env")
    with pytest.raises(UsageError, match="must be a string"):
        config.check("endpoint", 8000, "config.toml")
