"""``rinna serve`` as a real process: rinna-cli's own client, the official ``openai`` package, and plain HTTP.

Two servers start together when the module starts (each imports torch and
loads a tiny model): the memorized model on a free loopback port, and an
"endless" copy of it (it never emits ``</s>``) with an API key, ``--parallel 1`` and
a queue of one, for auth, overflow and disconnect tests; the first runs with the
default ``--parallel`` (4 on local weights: the batching engine). A local ``rinna chat`` runs
alongside, so that the replies through the server are compared byte for byte
with the local engine's.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rinna_cli.prompt import encode_newlines
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests import prewarmed
from tests.fakes import run_cli
from tests.fixtures.memorized_data import BYTE_FALLBACK_CHARS, CONVERSATIONS
from tests.helpers import RINNA, process_env

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-4f1c"
JSON_KEYS = ["reply", "model", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_s", "tokens_per_s"]
STATS = re.compile(r"^(\d+) tokens, prompt (\d+) \((\d+) prefilled\), first token \d+\.\d\d s, \d+\.\d tokens/s$")
# Every conversation in one piped chat, /reset between them.
CHAT_SCRIPT = "".join("".join(f"{q}\n" for q, _ in turns) + "/reset\n" for turns in CONVERSATIONS).encode()
CHAT_OUTPUT = "".join(f"{a}\n" for turns in CONVERSATIONS for _, a in turns).encode()


def make_env(base: Path) -> dict:
    return process_env(
        base / "hf", base / "home", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RINNA_DEVICE="cpu", RINNA_QUANTIZE="none"
    )


def make_endless(source: Path, folder: Path) -> Path:
    """The memorized model, changed so that it never emits ``</s>`` (as in test_chat_pty), with an 8192-token window."""
    from safetensors.numpy import load_file, save_file

    for path in source.iterdir():
        shutil.copy(path, folder / path.name)
    eos = Tokenizer.from_folder(folder).special.eos
    weights = {name: array.copy() for name, array in load_file(folder / "model.safetensors").items()}
    weights["gpt_neox.final_layer_norm.bias"][0] += 20.0
    weights["embed_out.weight"][eos] = 0.0
    weights["embed_out.weight"][eos, 0] = -20.0
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class Served:
    """A ``rinna serve`` process; its stderr goes to a file, its address is read from there."""

    def __init__(self, env: dict, log: Path, *args: str):
        self.log = log
        self.proc = prewarmed.popen(
            [*RINNA, "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env, cwd=ROOT,
        )  # fmt: skip
        self.url = ""

    def wait_ready(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", self.log.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"rinna serve did not start: {self.log.read_text(errors='replace')[-2000:]}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(memorized_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    env = make_env(base)
    endless = make_endless(memorized_model, tmp_path_factory.mktemp("endless"))
    memorized = Served(env, base / "memorized.log", "--model", str(memorized_model))
    guarded = Served({**env, "RINNA_TEST_KEY": KEY}, base / "endless.log", "--model", str(endless), "--parallel", "1", "--queue-size", "1", "--host", "0.0.0.0", "--api-key-env", "RINNA_TEST_KEY")  # fmt: skip
    try:
        # The local engine's replies (in this process), for comparison, while the servers start.
        local = run_cli("chat", "--model", str(memorized_model), "-t", "0", stdin=CHAT_SCRIPT, environ=env)
        assert local.code == 0, local.stderr
        memorized.wait_ready()
        guarded.wait_ready()
        yield {"env": env, "memorized": memorized, "endless": guarded, "endless_model": endless,
               "local_chat": local.stdout.encode()}  # fmt: skip
    finally:
        memorized.stop()
        guarded.stop()


def rinna(env: dict, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RINNA, *args], input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip


def request(port: int, method: str, path: str, body: object = None, key: str | None = None, raw: bytes | None = None):
    """(status, JSON answer) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def health(served: Served) -> dict:
    return request(served.port, "GET", "/health", key=KEY)[1]


def wait_for(condition, what: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- rinna ask / chat --endpoint give the local engine's bytes ----------------------------------------


def test_chat_through_serve_matches_the_local_engine(servers, memorized_model):
    assert servers["local_chat"] == CHAT_OUTPUT  # the local engine, for reference
    result = rinna(servers["env"], "chat", "--endpoint", servers["memorized"].url, "--model", str(memorized_model), "-t", "0", stdin=CHAT_SCRIPT)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == servers["local_chat"]  # multi-line, byte fallback, the history-dependent replies
    assert all(char in result.stdout.decode() for char in BYTE_FALLBACK_CHARS)


@pytest.mark.parametrize("turn", [0, 2, 3])  # multi-line, byte fallback, double space
def test_ask_through_serve(servers, memorized_model, turn):
    question, answer = CONVERSATIONS[turn][0]
    result = rinna(servers["env"], "ask", "--endpoint", servers["memorized"].url, "--model", str(memorized_model), "-t", "0", question)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == f"{answer}\n".encode() and result.stderr == b""


def test_ask_json_and_stats_through_serve(servers, memorized_model):
    question, answer = CONVERSATIONS[2][0]
    env = {**servers["env"], "RINNA_ENDPOINT": servers["memorized"].url}
    result = rinna(env, "ask", "--model", str(memorized_model), "-t", "0", "--json", "--stats", question)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert list(data) == JSON_KEYS
    tokenizer = Tokenizer.from_folder(memorized_model)
    conversation = Conversation(tokenizer)
    conversation.add_user(question)
    ids = tokenizer.encode(encode_newlines(answer))
    assert data["reply"] == answer and data["model"] == str(memorized_model) and data["finish_reason"] == "stop"
    assert data["prompt_tokens"] == len(conversation.prompt_ids()) and data["completion_tokens"] == len(ids) + 1
    stats = STATS.match(result.stderr.decode().strip())
    assert stats and int(stats.group(1)) == len(ids) + 1 and int(stats.group(2)) == data["prompt_tokens"]


# --- the official openai package ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers["memorized"].url, api_key="unused", max_retries=0, timeout=60)


def test_openai_completions(client, servers, memorized_model):
    name = str(memorized_model)
    tokenizer = Tokenizer.from_folder(memorized_model)
    question, answer = CONVERSATIONS[3][0]
    prompt = f"ユーザー: {question}\nシステム: "  # text: newlines become <NL> on the server
    result = client.completions.create(model=name, prompt=prompt, max_tokens=100, temperature=0)
    assert result.choices[0].text == answer and result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens == len(tokenizer.encode(encode_newlines(answer))) + 1

    question, answer = CONVERSATIONS[2][0]
    conversation = Conversation(tokenizer)
    conversation.add_user(question)
    stream = client.completions.create(
        model=name, prompt=conversation.prompt_ids(), max_tokens=100, temperature=0, stream=True,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    assert "".join(c.text for c in chunks) == answer
    ids = [i for c in chunks for i in (c.model_extra.get("token_ids") or [])]
    assert ids == tokenizer.encode(encode_newlines(answer)) + [tokenizer.special.eos]
    assert chunks[0].model_extra["prompt_token_ids"] == conversation.prompt_ids()
    assert sum(1 for c in chunks if c.model_extra.get("token_ids")) == len(ids)  # streamed as generated, one by one
    assert chunks[-1].finish_reason == "stop"


def test_openai_chat_completions(client, memorized_model):
    name = str(memorized_model)
    question, answer = CONVERSATIONS[0][0]
    result = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}], temperature=0)
    assert result.choices[0].message.content == answer and result.choices[0].message.role == "assistant"
    for turns in CONVERSATIONS[4:]:  # the reply depends on the history
        (q1, a1), (q2, a2) = turns
        messages = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
        stream = client.chat.completions.create(
            model=name, messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a2
        assert chunks[-1].usage.completion_tokens > 1

    with pytest.raises(openai.BadRequestError, match="rinna has no system turn"):
        client.chat.completions.create(
            model=name, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
        )
    # one model is served: any name means it (clients send their own defaults)
    result = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": question}], temperature=0)
    assert result.choices[0].message.content == answer and result.model == name
    assert [m.id for m in client.models.list()] == [name]


# --- plain HTTP: bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", b"{not json", "the request body is not valid JSON"),
        ("/v1/completions", b"[1, 2]", "the request body must be a JSON object, not array"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 'temperature must be a number, not string "hot"'),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens must be an integer, not number 1.5"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 'stream must be a boolean, not string "yes"'),
        ("/v1/completions", {"prompt": 5}, "prompt must be a string or an array of token ids, not integer"),
        ("/v1/completions", {"prompt": [1, 99999]}, "prompt token id 99999 is outside the tokenizer's"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, "max_tokens = 5000 is out of range; allowed: 1 <= max_tokens < 2048"),
        ("/v1/completions", {"prompt": [5] * 2000, "max_tokens": 100}, "the prompt is 2000 tokens; with max_tokens = 100 at most 1948 fit"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p = 0 is out of range"),
        ("/v1/completions", {"prompt": "x", "logprobs": 1}, "logprobs are not supported"),
        ("/v1/completions", {"prompt": "x", "stop": ["\n"]}, "stop strings are not supported"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages must be a non-empty array"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0]: content must be a string"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "role must be user, assistant or system"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}, "rinna has no system turn (its format knows only ユーザー and システム); start the server with --system-messages merge"),
        ("/v1/completions", {"prompt": "\ud800"}, "prompt holds a lone surrogate (\\ud800)"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udc00"}]}, "messages[0].content holds a lone surrogate (\\udc00)"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "the last message must be the user's"),
    ],
)
def test_bad_requests_get_400_with_a_message(servers, path, body, message):
    raw = body if isinstance(body, bytes) else None
    status, answer = request(servers["memorized"].port, "POST", path, None if raw else body, raw=raw)
    assert status == 400
    assert message in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_banners_and_the_access_log(servers, memorized_model):
    memorized, endless = servers["memorized"], servers["endless"]
    assert request(memorized.port, "GET", "/v1/models")[0] == 200
    log = wait_for(lambda: (text := memorized.log.read_text()).count("GET /v1/models 200") and text, "the access line")
    assert re.search(rf"^\d\d:\d\d:\d\d 127\.0\.0\.1:\d+ GET /v1/models 200 \d+\.\d\d s$", log, re.M)
    assert re.fullmatch(rf"rinna serve: {re.escape(str(memorized_model))} on cpu \(\w+\) at {memorized.url}; up to 4 replies at once · Ctrl-C to stop", log.splitlines()[0])
    banner = endless.log.read_text().splitlines()[0]
    assert f"at {endless.url}; listening on all interfaces (0.0.0.0); from other machines: http://" in banner
    assert "http://0.0.0.0" not in banner and "Traceback" not in log


def test_models_and_health(servers, memorized_model):
    status, models = request(servers["memorized"].port, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == str(memorized_model) and models["data"][0]["max_model_len"] == 2048
    state = health(servers["memorized"])
    assert state["status"] == "ok" and state["busy"] is False and state["queued"] == 0
    assert request(servers["memorized"].port, "GET", "/v1/nothing")[0] == 404


def test_openai_retrieves_the_model_by_any_name(client, memorized_model):
    """``models.retrieve`` (``GET /v1/models/{id}``) was a 404; a request's model may be any name, so its card is too."""
    assert client.models.retrieve(str(memorized_model)).id == str(memorized_model)
    card = client.models.retrieve("rinna/japanese-gpt-neox-3.6b-instruction-sft")  # a name with a slash
    assert (card.id, card.owned_by) == (str(memorized_model), "rinna-cli")


def test_the_serve_flags_of_the_command_line(memorized_model, tmp_path):
    """--served-model-name, --parallel, --quiet, --system-messages and the sampling flags, parsed by the real command."""
    served = Served(make_env(tmp_path), tmp_path / "flags.log", "--model", str(memorized_model), "--served-model-name", "rinna", "--parallel", "2", "--quiet", "--system-messages", "merge", "-t", "0", "-n", "3")  # fmt: skip
    try:
        served.wait_ready()
        status, models = request(served.port, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["rinna"]
        assert health(served)["batch"]["parallel"] == 2
        body = {"model": "gpt-4o", "messages": [{"role": "system", "content": "短く。"}, {"role": "user", "content": "こんにちは"}]}  # fmt: skip
        status, answer = request(served.port, "POST", "/v1/chat/completions", body)
        assert status == 200 and answer["model"] == "rinna" and answer["usage"]["completion_tokens"] <= 3
        question, reply = CONVERSATIONS[0][0]
        body = {"model": "rinna", "messages": [{"role": "user", "content": question}]}
        status, answer = request(served.port, "POST", "/v1/chat/completions", body)
        choice = answer["choices"][0]  # -t 0 and -n 3 from the command line: the greedy reply's first 3 tokens
        assert status == 200 and choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3
        assert choice["message"]["content"] and reply.startswith(choice["message"]["content"])
    finally:
        served.stop()
    log = served.log.read_text()
    assert "POST /v1/" not in log and "up to 2 replies at once" in log.splitlines()[0]  # --quiet: no access lines


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_with_its_summary_and_exit_0(memorized_model, tmp_path, stop):
    """Ctrl-C or SIGTERM (systemd, docker stop): the summary line, exit 0 (uvicorn raised the signal again after
    its shutdown, which ended the process with 130 or 143 and no summary)."""
    served = Served(make_env(tmp_path), tmp_path / "stop.log", "--model", str(memorized_model), "-t", "0", "-n", "3")
    try:
        served.wait_ready()
        status, answer = request(served.port, "POST", "/v1/completions", {"prompt": "猫", "max_tokens": 3})
        assert status == 200
        served.proc.send_signal(stop)
        assert served.proc.wait(30) == 0, served.log.read_text()
    finally:
        served.stop()
    tokens = answer["usage"]["completion_tokens"]
    assert served.log.read_text().splitlines()[-1] == f"rinna serve: stopped after 1 completion ({tokens} tokens)"


# --- auth, queue, disconnect -------------------------------------------------------------------------


def test_other_addresses_need_an_api_key(servers, memorized_model):
    result = rinna(servers["env"], "serve", "--model", str(memorized_model), "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "--host 0.0.0.0 takes connections from other machines" in result.stderr.decode()
    assert "--api-key-env" in result.stderr.decode()
    result = rinna(servers["env"], "serve", "--model", str(memorized_model), "--host", "0.0.0.0", "--api-key-env", "UNSET_KEY_VAR")  # fmt: skip
    assert result.returncode == 2 and "UNSET_KEY_VAR: the variable is unset or empty" in result.stderr.decode()


def test_the_api_key_is_enforced(servers, memorized_model):
    port = servers["endless"].port
    for key in (None, "wrong-key", KEY[:-1]):
        status, answer = request(port, "GET", "/v1/models", key=key)
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        status, _ = request(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=key)
        assert status == 401
    assert request(port, "GET", "/v1/models", key=KEY)[0] == 200
    assert request(port, "GET", "/health")[0] == 401  # the counters are the server's business too
    assert request(port, "GET", "/health", key=KEY)[0] == 200
    # rinna-cli's client: the key from the environment, a wrong one is one line naming the endpoint
    env = {**servers["env"], "RINNA_API_KEY": "wrong-key"}
    result = rinna(env, "ask", "--endpoint", servers["endless"].url, "--model", str(memorized_model), "-n", "3", "q")
    assert result.returncode == 1 and "wrong-key" not in result.stderr.decode()
    assert result.stderr.decode().startswith(f"rinna: error: {servers['endless'].url}: the server refused the request (HTTP 401")
    env["RINNA_API_KEY"] = KEY
    result = rinna(env, "ask", "--endpoint", servers["endless"].url, "--model", str(memorized_model), "-n", "3", "q")
    assert result.returncode == 0, result.stderr.decode()


def _open_stream(port: int, max_tokens: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"prompt": "ユーザー: こんにちは\nシステム: ", "max_tokens": max_tokens, "stream": True, "return_token_ids": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def test_queue_overflow_and_disconnect(servers):
    served = servers["endless"]
    port = served.port
    before = health(served)["completions"]
    # A: a long streamed reply; read its first event, then leave it running.
    conn_a, stream_a = _open_stream(port, 6000)
    assert stream_a.readline().startswith(b"data: ")
    wait_for(lambda: health(served)["busy"], "A generating")
    # B waits in the queue of one.
    b_result: dict = {}

    def run_b():
        b_result["answer"] = request(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 5}, key=KEY)
        b_result["at"] = time.monotonic()

    b_thread = threading.Thread(target=run_b)
    b_thread.start()
    wait_for(lambda: health(served)["queued"] == 1, "B queued")
    # C finds the queue full.
    status, answer = request(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 5}, key=KEY)
    assert status == 429 and "busy" in answer["error"]["message"]
    assert not b_result  # one generation at a time: B still waits
    # A's client goes away: its generation stops, then B runs.
    closed_at = time.monotonic()
    conn_a.sock.shutdown(2)
    conn_a.close()
    b_thread.join(30)
    status, answer = b_result["answer"]
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 5
    assert b_result["at"] > closed_at
    state = wait_for(lambda: (h := health(served))["completions"] >= before + 2 and h, "A and B done")
    interrupted = [r for r in state["recent"] if r["finish_reason"] == "interrupted"]
    assert interrupted and interrupted[-1]["completion_tokens"] < 3000  # of the 6000 asked for
    # the access line of A's stream says so too, once its generation has stopped
    line = wait_for(lambda: re.search(r"POST /v1/completions 200 \d+\.\d\d s, (\d+) \+ (\d+) tokens, interrupted$",
                                      served.log.read_text(), re.M), "A's access line")  # fmt: skip
    assert int(line[2]) == interrupted[-1]["completion_tokens"] and int(line[1]) == interrupted[-1]["prompt_tokens"]

    # A non-streamed request whose client disconnects stops too.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"prompt": "x", "max_tokens": 6000})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    wait_for(lambda: health(served)["busy"], "D generating")
    conn.sock.shutdown(2)
    conn.close()
    state = wait_for(lambda: (h := health(served))["completions"] >= before + 3 and not h["busy"] and h, "D stopped")
    assert state["last"]["finish_reason"] == "interrupted" and state["last"]["completion_tokens"] < 3000


# --- the app factory around any engine-like object ---------------------------------------------------


def test_create_app_serves_any_engine(memorized_model):
    from fastapi.testclient import TestClient

    from rinna_cli.contract import Sampling
    from rinna_cli.serve.app import create_app
    from tests.fakes import ScriptedEngine

    tokenizer = Tokenizer.from_folder(memorized_model)
    question, answer = CONVERSATIONS[0][0]
    engine = ScriptedEngine(tokenizer, [answer] * 2, name="scripted", chunk=4)
    ids = tokenizer.encode(encode_newlines(answer)) + [tokenizer.special.eos]
    defaults = Sampling(temperature=0.3, top_p=1.0, top_k=50, repetition_penalty=1.0, max_new_tokens=64, seed=-1)
    with TestClient(create_app(engine, defaults, queue_size=4)) as client:
        body = {"prompt": f"ユーザー: {question}\nシステム: ", "return_token_ids": True, "seed": 5}
        answer_json = client.post("/v1/completions", json=body).json()
        choice = answer_json["choices"][0]
        assert choice["text"] == answer and choice["token_ids"] == ids and answer_json["usage"]["completion_tokens"] == len(ids)
        conversation = Conversation(tokenizer)
        conversation.add_user(question)
        assert engine.prompts[-1] == conversation.prompt_ids() == choice["prompt_token_ids"]
        assert engine.samplings[-1] == replace(defaults, seed=5)
        with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": question}], "stream": True, "return_token_ids": True}) as stream:  # fmt: skip
            events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == answer
        assert [i for e in events for i in e["choices"][0].get("token_ids", [])] == ids
        assert client.post("/v1/completions", json={"prompt": "x", "n": 2}).status_code == 400
