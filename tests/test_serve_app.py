"""``rinna serve`` in this process: :func:`rinna_cli.serve.command.prepare` on loopback with scripted engines.

Covers what needs no real model: the banner and the shutdown line, the access log,
``--served-model-name``, ``--system-messages``, the key on ``/health``, ``--parallel``
(an engine that records overlapping calls) and a seeded run of randomly mutated
requests that must never get a 5xx.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import threading
import time

import pytest

from rinna_cli import config
from rinna_cli.contract import Reply, Sampling, Step
from rinna_cli.errors import UsageError
from tests.fakes import ScriptedEngine, make_env

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rinna_cli.serve.command import addresses, prepare  # noqa: E402

KEY = "app-test-key"
ACCESS = re.compile(r"^\d\d:\d\d:\d\d 127\.0\.0\.1:\d+ (GET|POST) (\S+) (\d{3}|-) \d+\.\d\d s(, .*)?$")


class Recording(ScriptedEngine):
    """A scripted engine that takes concurrent calls: each streams ``steps`` ids slowly until its ``stop``,
    or until ``release`` is set when ``hold`` is; it records how many calls overlapped at most."""

    def __init__(self, tokenizer, steps: int = 5, delay: float = 0.0, hold: bool = False):
        super().__init__(tokenizer)
        self.steps = steps
        self.delay = delay
        self.hold = hold
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.entered = threading.Semaphore(0)
        self.finished: list[str] = []

    def generate(self, prompt_ids, sampling, on_step=lambda step: None, stop=None) -> Reply:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.prompts.append(list(prompt_ids))
            self.samplings.append(sampling)
        self.entered.release()
        stop = stop or threading.Event()
        try:
            if self.hold:
                while not self.release.wait(0.01) and not stop.is_set():
                    pass
            ids: list[int] = []
            for _ in range(min(self.steps, sampling.max_new_tokens)):
                if stop.is_set():
                    break
                ids.append(5)
                on_step(Step(self.tokenizer.decode([5]), [5]))
                time.sleep(self.delay)
            reason = "interrupted" if stop.is_set() else "length"
            with self.lock:
                self.finished.append(reason)
            return Reply(self.tokenizer.decode(ids), ids, reason, len(prompt_ids), len(prompt_ids), len(ids), 0.01, 1.0)
        finally:
            with self.lock:
                self.active -= 1


class Running:
    """A prepared server running in a thread; ``stop()`` ends it like Ctrl-C does."""

    def __init__(self, engine, memorized_model, environ: dict | None = None, **options):
        self.env = make_env(engine=engine, environ=environ)
        settings = config.load({"model": str(memorized_model)}, environ or {}, warn=lambda message: None)
        self.serving = prepare(self.env, settings, **{"port": 0, **options})
        self.port = self.serving.sock.getsockname()[1]
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while "Ctrl-C to stop" not in self.stderr():
            assert time.monotonic() < deadline and self.thread.is_alive(), self.stderr()
            time.sleep(0.01)

    def _run(self) -> None:
        self.code = self.serving.run()

    def stderr(self) -> str:
        return self.env.stderr.getvalue()

    def request(self, method: str, path: str, body: object = None, key: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def open_stream(self, body: dict, key: str | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), headers)
        response = conn.getresponse()
        assert response.status == 200
        return conn, response

    def stop(self) -> str:
        self.serving.stop()
        self.thread.join(20)
        assert not self.thread.is_alive() and self.code == 0
        return self.stderr()


@pytest.fixture
def running(memorized_model):
    servers: list[Running] = []

    def start(engine, environ: dict | None = None, **options) -> Running:
        servers.append(Running(engine, memorized_model, environ, **options))
        return servers[-1]

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.stop()


def wait_for(condition, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# --- banner, shutdown, access log ---------------------------------------------------------------------


def test_banner_access_log_and_shutdown(running, scripted_engine, memorized_model):
    server = running(scripted_engine.enqueue("こんにちは。"))
    banner = server.stderr().splitlines()[0]
    assert banner == (
        f"rinna serve: {memorized_model} on cpu (float32) at http://127.0.0.1:{server.port}/v1 · Ctrl-C to stop"
    )
    assert server.request("POST", "/v1/completions", {"prompt": "猫", "max_tokens": 5})[0] == 200
    assert server.request("POST", "/v1/completions", {"prompt": 5})[0] == 400
    assert server.request("GET", "/health")[0] == 200
    lines = server.stop().splitlines()
    matches = [ACCESS.match(line) for line in lines[1:-1]]
    assert all(matches), lines
    assert [(m.group(1), m.group(2), m.group(3)) for m in matches] == [
        ("POST", "/v1/completions", "200"), ("POST", "/v1/completions", "400"), ("GET", "/health", "200"),
    ]  # fmt: skip
    prompt_tokens = len(scripted_engine.prompts[0])
    completion = len(scripted_engine.tokenizer.encode("こんにちは。")) + 1
    assert matches[0].group(4) == f", {prompt_tokens} + {completion} tokens, stop" and matches[1].group(4) is None
    assert lines[-1] == f"rinna serve: stopped after 1 completion ({completion} tokens)"


def test_quiet_logs_no_requests(running, scripted_engine):
    server = running(scripted_engine, quiet=True)
    assert server.request("POST", "/v1/completions", {"prompt": "猫"})[0] == 200
    assert len(server.stop().splitlines()) == 2  # the banner and the shutdown line


def test_all_interfaces_print_a_connectable_address(running, scripted_engine):
    server = running(scripted_engine, environ={"SERVE_KEY": KEY}, host="0.0.0.0", api_key_env="SERVE_KEY")
    banner = server.stderr().splitlines()[0]
    port = server.port
    assert f" at http://127.0.0.1:{port}/v1; listening on all interfaces (0.0.0.0); " in banner
    assert banner.endswith(
        f"from other machines: http://{socket.gethostname()}:{port}/v1; clients send the key in $SERVE_KEY · Ctrl-C to stop"
    )
    assert "http://0.0.0.0" not in banner


def test_addresses_of_sockets():
    for host, shown in (("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")):
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.bind((host, 0))
        except OSError:
            continue  # no IPv6 here
        with sock:
            assert addresses(sock) == (f"http://{shown}:{sock.getsockname()[1]}/v1", "")


# --- served model name, the key on /health, system messages, defaults --------------------------------


def test_served_model_name_and_any_requested_name(running, scripted_engine, memorized_model):
    server = running(scripted_engine, served_model_name="rinna")
    assert f"rinna serve: {memorized_model} as 'rinna' on cpu" in server.stderr()
    status, models = server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["rinna"]
    assert models["data"][0]["vocab_size"] == scripted_engine.tokenizer.vocab_size
    for name in ("rinna", "gpt-4o", str(memorized_model)):
        status, answer = server.request("POST", "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "猫"}]})  # fmt: skip
        assert status == 200 and answer["model"] == "rinna"


def test_health_needs_the_key_when_one_is_set(running, scripted_engine):
    server = running(scripted_engine, environ={"SERVE_KEY": KEY}, api_key_env="SERVE_KEY")
    status, answer = server.request("GET", "/health")
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert server.request("GET", "/health", key="wrong")[0] == 401
    status, state = server.request("GET", "/health", key=KEY)
    assert status == 200 and state["batch"] == {"running": 0, "waiting": 0, "parallel": 1}


def test_system_messages_merge(running, scripted_engine, memorized_tokenizer):
    server = running(scripted_engine, system_messages="merge")
    messages = [{"role": "system", "content": "短く。"}, {"role": "user", "content": "猫は?"}]
    assert server.request("POST", "/v1/chat/completions", {"messages": messages})[0] == 200
    assert scripted_engine.prompt_text() == "ユーザー: 短く。<NL><NL>猫は?<NL>システム: "


def test_system_messages_from_the_config_and_checked(running, scripted_engine, memorized_model):
    server = running(scripted_engine, environ={"RINNA_SYSTEM_MESSAGES": "merge"})
    messages = [{"role": "system", "content": "短く。"}, {"role": "user", "content": "猫は?"}]
    assert server.request("POST", "/v1/chat/completions", {"messages": messages})[0] == 200
    settings = config.load({"model": str(memorized_model)}, {})
    with pytest.raises(UsageError, match=r"^--system-messages: system_messages must be one of reject, merge \(got 'drop'\)$"):  # fmt: skip
        prepare(make_env(engine=scripted_engine), settings, port=0, system_messages="drop")


def test_the_configured_sampling_is_the_default(running, scripted_engine, memorized_model):
    server = running(scripted_engine, environ={"RINNA_TEMPERATURE": "0.2", "RINNA_TOP_K": "7"})
    assert server.request("POST", "/v1/completions", {"prompt": "猫", "seed": 3})[0] == 200
    assert scripted_engine.samplings[-1] == Sampling(
        temperature=0.2, top_p=1.0, top_k=7, repetition_penalty=1.0, max_new_tokens=128, seed=3
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"parallel": 0}, "--parallel 0 is out of range; allowed: 1 <= parallel <= 64"),
        ({"served_model_name": " "}, "--served-model-name ' ': give a name without surrounding spaces"),
    ],
)
def test_bad_options(scripted_engine, memorized_model, options, message):
    with pytest.raises(UsageError) as err:
        prepare(make_env(engine=scripted_engine), config.load({"model": str(memorized_model)}, {}), port=0, **options)
    assert str(err.value) == message


# --- --parallel ---------------------------------------------------------------------------------------


def test_parallel_generates_up_to_n_at_once_and_queues_the_rest(running, memorized_tokenizer):
    engine = Recording(memorized_tokenizer, hold=True)
    server = running(engine, parallel=3, queue_size=1)
    results: list[tuple[int, dict]] = []
    threads = [
        threading.Thread(target=lambda: results.append(server.request("POST", "/v1/completions", {"prompt": "猫"})))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for _ in range(3):
        assert engine.entered.acquire(timeout=10)
    state = wait_for(lambda: (h := server.request("GET", "/health")[1])["queued"] == 1 and h, "one waiting")
    assert state["batch"] == {"running": 3, "waiting": 1, "parallel": 3} and state["busy"] is True
    status, answer = server.request("POST", "/v1/completions", {"prompt": "猫"})
    assert status == 429 and answer["error"]["message"].startswith("busy: 3 replies are being generated and 1 more")
    assert engine.most == 3 and not results  # three together, the fourth waits
    engine.release.set()
    for thread in threads:
        thread.join(20)
    assert sorted(status for status, _ in results) == [200] * 4 and engine.most == 3


def test_parallel_one_generates_one_at_a_time(running, memorized_tokenizer):
    engine = Recording(memorized_tokenizer, hold=True)
    server = running(engine, queue_size=2)
    threads = [threading.Thread(target=server.request, args=("POST", "/v1/completions", {"prompt": "猫"})) for _ in range(3)]  # fmt: skip
    for thread in threads:
        thread.start()
    assert engine.entered.acquire(timeout=10)
    wait_for(lambda: server.request("GET", "/health")[1]["queued"] == 2, "two waiting")
    assert engine.most == 1
    engine.release.set()
    for thread in threads:
        thread.join(20)
    assert engine.most == 1 and len(engine.prompts) == 3


def test_a_disconnect_stops_only_its_own_sequence(running, memorized_tokenizer):
    engine = Recording(memorized_tokenizer, steps=400, delay=0.01)
    server = running(engine, parallel=2)
    conn_a, stream_a = server.open_stream({"prompt": "猫", "max_tokens": 400})
    conn_b, stream_b = server.open_stream({"prompt": "犬", "max_tokens": 400})
    assert stream_a.readline().startswith(b"data: ") and stream_b.readline().startswith(b"data: ")
    assert engine.most == 2
    conn_a.sock.shutdown(socket.SHUT_RDWR)
    conn_a.close()
    wait_for(lambda: engine.finished, "A stopped")
    assert engine.finished == ["interrupted"]
    body = stream_b.read().decode()  # B goes on to its end
    conn_b.close()
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    wait_for(lambda: len(engine.finished) == 2, "B done")
    assert engine.finished == ["interrupted", "length"]


# --- random requests never get a 5xx --------------------------------------------------------------------

VALID = [
    ("/v1/completions", {"prompt": "ユーザー: 猫\nシステム: ", "max_tokens": 4, "temperature": 0}),
    ("/v1/completions", {"prompt": [5, 6, 7], "stream": True, "return_token_ids": True, "seed": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "猫"}], "stop": ["</s>"], "top_p": 0.9}),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "短く"},
                {"role": "user", "content": [{"type": "text", "text": "猫"}]},
                {"role": "assistant", "content": "はい"},
                {"role": "user", "content": "犬"},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "model": "x",
        },
    ),
]
ODD = [
    None, True, False, 0, -1, 1, 2**31, 2**64, -(2**70), 0.5, -0.0, 1e308, float("inf"), float("nan"), "", "x",
    "\ud800", "a\udfffb", "\x00", "\u202e", "</s>", "<NL>", [], [None], [1, "a"], [-1], [10**9], {}, {"type": "text"},
    {"include_usage": "yes"}, [{"role": "user"}], [{"role": "user", "content": "\ud800"}], "😀" * 3000, [5] * 3000,
]  # fmt: skip


def mutate(rng: random.Random, body: dict) -> dict:
    body = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        target = body
        if "messages" in body and isinstance(body["messages"], list) and body["messages"] and rng.random() < 0.4:
            target = rng.choice(body["messages"])
            if not isinstance(target, dict):
                continue
        keys = list(target) + ["n", "logprobs", "max_completion_tokens", "top_k", "repetition_penalty", "stop_token_ids", "suffix", "echo", "tools"]  # fmt: skip
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.15:
            target.pop(key, None)
        else:
            target[key] = rng.choice(ODD)
    return body


def test_random_requests_never_get_a_server_error(memorized_tokenizer):
    from fastapi.testclient import TestClient

    from rinna_cli.serve.app import create_app

    engine = ScriptedEngine(memorized_tokenizer, name="scripted", chunk=2)
    defaults = Sampling(temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.0, max_new_tokens=16, seed=-1)
    rng = random.Random(20261202)
    seen: dict[int, int] = {}
    # raise_server_exceptions: an exception in the app fails the test with its traceback
    with TestClient(create_app(engine, defaults, queue_size=4, system_messages="merge")) as client:
        for _ in range(400):
            path, body = rng.choice(VALID)
            mutated = mutate(rng, body)
            raw = json.dumps(mutated, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode("utf-8", "surrogatepass")
            if rng.random() < 0.1:  # broken bytes too
                raw = raw[: rng.randrange(len(raw) + 1)] + bytes([rng.randrange(256)])
            response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (mutated, response.text)
    assert seen.get(200, 0) > 20 and seen.get(400, 0) > 100  # both kinds were exercised


def test_parallel_defaults_to_one_for_an_engine_that_is_not_local_weights(scripted_engine):
    from rinna_cli.serve.command import batching

    assert batching(scripted_engine, None) == (scripted_engine, 1)
    assert batching(scripted_engine, 3) == (scripted_engine, 3)  # e.g. a remote engine takes concurrent calls


def test_parallel_with_the_local_model_batches_and_keeps_greedy_replies(memorized_model):
    """The real engine behind --parallel 2: the batching engine; each greedy reply is the memorized one."""
    from tests.fixtures.memorized_data import CONVERSATIONS

    env = make_env()
    settings = config.load({"model": str(memorized_model), "device": "cpu", "quantize": "none", "temperature": 0.0}, {})
    serving = prepare(env, settings, port=0, parallel=2, quiet=True)
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: "Ctrl-C to stop" in env.stderr.getvalue(), "the banner", timeout=60)
        port = serving.sock.getsockname()[1]
        assert re.fullmatch(
            rf"rinna serve: {re.escape(str(memorized_model))} on cpu \(\w+\) at http://127\.0\.0\.1:{port}/v1; "
            r"up to 2 replies at once · Ctrl-C to stop",
            env.stderr.getvalue().splitlines()[0],
        )
        turns = [turns[0] for turns in CONVERSATIONS[:4]]
        replies: dict[int, str] = {}

        def ask(index: int, question: str) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 100}
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            replies[index] = json.loads(conn.getresponse().read())["choices"][0]["message"]["content"]
            conn.close()

        threads = [threading.Thread(target=ask, args=(i, q)) for i, (q, _) in enumerate(turns)]
        for client in threads:
            client.start()
        for client in threads:
            client.join(60)
        assert replies == {i: answer for i, (_, answer) in enumerate(turns)}
        assert type(serving.engine).__name__ == "BatchingEngine"
    finally:
        serving.stop()
        thread.join(20)
