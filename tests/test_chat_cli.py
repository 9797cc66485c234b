"""``rinna chat`` end to end over pipes: the real CLI and the memorized model (``-t 0``).

Each ``rinna chat`` costs a few seconds of startup (torch, transformers, the
weights), so processes that do not depend on each other are started together.
The terminal (pty) side is in ``test_chat_pty.py``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rinna_cli import store
from rinna_cli.prompt import SYSTEM, USER
from tests import prewarmed
from tests.fakes import run_cli
from tests.helpers import process_env

TARO = ("私の名前は太郎です。", "こんにちは、太郎さん。")
HANAKO = ("私の名前は花子です。", "こんにちは、花子さん。")
NAME_Q = "私の名前は何ですか?"
TIMEOUT = 90


def make_env(home: Path) -> dict:
    # float32: no first-start quantizing and kernel measuring per process (test_int8 and test_ask cover int8)
    return process_env(home / "hf", home, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", RINNA_QUANTIZE="none")


def chat_args(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rinna_cli", "chat", "--model", str(model), "-t", "0", *extra]


def start(model: Path, home: Path, text: str, *extra: str, cwd: Path | None = None) -> tuple[subprocess.Popen, bytes]:
    process = prewarmed.popen(
        chat_args(model, *extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=make_env(home), cwd=cwd or home,
    )  # fmt: skip
    return process, text.encode()


def finish(started) -> list[subprocess.CompletedProcess]:
    """Feed each started process its input and wait for all of them."""
    results = []
    for process, data in started:
        stdout, stderr = process.communicate(data, timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def session_files(home: Path) -> list[Path]:
    return sorted((home / "sessions").glob("*.jsonl"))


def turn_records(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # every line is valid JSON
    return [r for r in records if r["type"] == "turn"]


def texts(path: Path) -> list[tuple[str, str]]:
    return [(t.speaker, t.text) for t in store.replay_log(path).turns]


def read_until(process: subprocess.Popen, expected: bytes, timeout: float = TIMEOUT) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while expected not in data:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {expected!r}; got {data!r}")
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"end of output before {expected!r}; got {data!r}")
        data += chunk
    return data


def open_chat(model: Path, home: Path, *extra: str) -> subprocess.Popen:
    """A piped chat whose standard input stays open until the test closes it (or kills the chat)."""
    return prewarmed.popen(
        chat_args(model, *extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=make_env(home), cwd=home,
    )  # fmt: skip


def kill_after(process: subprocess.Popen, line: str, reply: str, how: signal.Signals, ready=lambda: True):
    """Send ``line``, wait until ``reply`` is on stdout (and ``ready()``), then send ``how``; return stdout."""
    try:
        process.stdin.write(f"{line}\n".encode())
        process.stdin.flush()
        shown = read_until(process, f"{reply}\n".encode())
        deadline = time.monotonic() + TIMEOUT
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(how)
        process.wait(timeout=TIMEOUT)
    finally:
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
    return shown


# -- piped standard input -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def piped(memorized_model, tmp_path_factory):
    """Three chat processes at once: 太郎 and 花子 sharing one app dir, and 太郎's first turn and a /save,
    killed (SIGKILL) as soon as the transcript is written; meanwhile in this process, 花子 where no session
    can be saved."""
    shared = tmp_path_factory.mktemp("shared")
    broken = tmp_path_factory.mktemp("broken")
    (broken / "sessions").write_text("a file where the sessions folder should be")
    first = tmp_path_factory.mktemp("first")
    transcript = first / "会話.json"
    killed = open_chat(memorized_model, first)
    started = [
        start(memorized_model, shared, f"{TARO[0]}\n{NAME_Q}\n"),
        start(memorized_model, shared, f"{HANAKO[0]}\n{NAME_Q}\n"),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RINNA_CLI_HOME", str(broken))
        unsaved = run_cli(*chat_args(memorized_model)[3:], stdin=f"{HANAKO[0]}\n{NAME_Q}\n".encode(),
                          environ=make_env(broken))  # fmt: skip
    shown = kill_after(killed, f"{TARO[0]}\n/save {transcript}", TARO[1], signal.SIGKILL, transcript.exists)
    taro, hanako = finish(started)
    return {"taro": taro, "hanako": hanako, "broken": unsaved, "killed": killed, "killed_stdout": shown,
            "shared": shared, "broken_home": broken, "home": first, "transcript": transcript}  # fmt: skip


def test_piped_lines_are_turns_and_replies_are_plain(piped):
    taro, hanako = piped["taro"], piped["hanako"]
    assert taro.returncode == 0, taro.stderr.decode()
    assert taro.stdout.decode() == "こんにちは、太郎さん。\n太郎さんです。\n"
    assert hanako.returncode == 0, hanako.stderr.decode()
    assert hanako.stdout.decode() == "こんにちは、花子さん。\n花子さんです。\n"
    for result in (taro, hanako):
        assert b"\x1b" not in result.stdout and b"\x1b" not in result.stderr
        assert "Traceback" not in result.stderr.decode()


def test_two_chats_at_once_keep_two_session_files(piped):
    files = session_files(piped["shared"])
    assert len(files) == 2
    conversations = sorted(texts(path) for path in files)
    assert conversations == sorted(
        [
            [(USER, TARO[0]), (SYSTEM, TARO[1]), (USER, NAME_Q), (SYSTEM, "太郎さんです。")],
            [(USER, HANAKO[0]), (SYSTEM, HANAKO[1]), (USER, NAME_Q), (SYSTEM, "花子さんです。")],
        ]
    )
    for path in files:
        records = turn_records(path)
        assert len(records) == 4
        assert all(r["settings"]["temperature"] == 0.0 and r["time"] > 0 for r in records)
    # No interactive session ran, so no input history was written.
    assert not (piped["shared"] / "history").exists()


def test_unsavable_session_warns_once_and_the_chat_goes_on(piped):
    result, home = piped["broken"], piped["broken_home"]
    assert result.code == 0, result.stderr
    assert result.stdout == "こんにちは、花子さん。\n花子さんです。\n"
    stderr = result.stderr
    assert stderr.count("warning") == 1
    assert f"rinna: warning: cannot autosave the conversation to {home / 'sessions'}" in stderr
    assert "use /save to keep it" in stderr and "Traceback" not in stderr
    assert (home / "sessions").read_text() == "a file where the sessions folder should be"


@pytest.mark.parametrize(
    ("content", "message"),
    [("{broken", "not valid JSON"), ('{"foo": 1}', "not a rinna-cli transcript"), ("[]", "not a rinna-cli transcript")],
)
def test_load_of_a_bad_file_is_one_line(memorized_model, tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    result = prewarmed.run(
        chat_args(memorized_model, "--load", str(bad)), input=b"hello\n",
        env=make_env(tmp_path), cwd=tmp_path, timeout=TIMEOUT,
    )  # fmt: skip
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert result.stdout == b""
    assert stderr.count("\n") == 1 and stderr.startswith(f"rinna: error: {bad}: ") and message in stderr
    assert not (tmp_path / "sessions").exists()


def test_resume_with_no_session_is_an_error(memorized_model, tmp_path):
    result = prewarmed.run(
        chat_args(memorized_model, "--resume"), input=b"", env=make_env(tmp_path),
        cwd=tmp_path, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.decode().startswith("rinna: error: no saved chat session in ")



def test_killed_chat_keeps_every_completed_turn(piped):
    """SIGKILL right after a reply is shown: that reply is already in the session file."""
    assert piped["killed"].returncode == -signal.SIGKILL
    assert piped["killed_stdout"].decode() == f"{TARO[1]}\n"
    (path,) = session_files(piped["home"])
    assert len(turn_records(path)) == 2  # and every line is valid JSON
    assert texts(path) == [(USER, TARO[0]), (SYSTEM, TARO[1])]
    assert [(t.speaker, t.text) for t in store.load_transcript(piped["transcript"]).turns] == [(USER, TARO[0]), (SYSTEM, TARO[1])]


def test_resume_and_load_continue_the_conversation(piped, memorized_model, tmp_path, run_cli, monkeypatch):
    """A transcript continued with ``--load`` (a process ended by SIGTERM after its reply), and a session log
    continued to the end of input (in this process). ``--resume`` alone would not take the log: a piped run
    wrote it."""
    home = piped["home"]
    (original,) = session_files(home)
    before = original.read_bytes()
    not_resumed = prewarmed.run(
        chat_args(memorized_model, "--resume"), input=b"", env=make_env(home), cwd=home,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert not_resumed.returncode == 1
    assert not_resumed.stderr.decode().startswith("rinna: error: no saved chat session in ")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    loading = open_chat(memorized_model, fresh, "--load", str(piped["transcript"]))
    shown = kill_after(loading, NAME_Q, "太郎さんです。", signal.SIGTERM)
    monkeypatch.setenv("RINNA_CLI_HOME", str(home))
    resumed = run_cli(*chat_args(memorized_model, "--load", str(original))[3:], stdin=f"{NAME_Q}\n".encode(),
                      environ=make_env(home))  # fmt: skip
    assert resumed.code == 0, resumed.stderr
    assert resumed.stdout == "太郎さんです。\n"
    assert f"continuing 2 turns from {original}" in resumed.stderr
    assert shown.decode() == "太郎さんです。\n"
    assert loading.returncode == 128 + signal.SIGTERM  # ended by its handler, not killed
    # The resumed conversation goes on in a new file of its own; the old one is left as it was.
    assert original.read_bytes() == before
    (new,) = [path for path in session_files(home) if path != original]
    expected = [(USER, TARO[0]), (SYSTEM, TARO[1]), (USER, NAME_Q), (SYSTEM, "太郎さんです。")]
    assert texts(new) == expected
    (from_load,) = session_files(fresh)
    assert texts(from_load) == expected and len(turn_records(from_load)) == 4
    assert json.loads(from_load.read_text(encoding="utf-8").splitlines()[0])["continues"] == str(piped["transcript"])
