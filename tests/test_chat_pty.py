"""``rinna chat`` on a terminal: prompt_toolkit in a pty, driven with pexpect.

Two chats run at the same time in one app dir (the memorized model and the
random tiny one), which also checks that concurrent chats keep separate session
files and a readable input history.

The terminal here never answers prompt_toolkit's cursor position requests
(``ESC [6n``), as a real terminal would; without ``PROMPT_TOOLKIT_NO_CPR=1`` each
accepted line waits up to a second for the answer and a "your terminal doesn't
support cursor position requests" warning may appear.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from rinna_cli import store  # noqa: E402
from rinna_cli.prompt import SYSTEM, USER  # noqa: E402

TIMEOUT = 60
# prompt_toolkit turns bracketed paste on each time it shows the prompt (and off when a line is accepted).
PROMPT = "\x1b[?2004h"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()=>][0-9A-Za-z]?|\r")


def plain(text: str) -> str:
    return ANSI.sub("", text)


def spawn(model: Path, home: Path, *extra: str):
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("RINNA_", "HF_", "PYTHON"))}
    environ.update(
        HF_HUB_OFFLINE="1", HF_HOME=str(home / "hf"), RINNA_CLI_HOME=str(home), OMP_NUM_THREADS="1",
        TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1",
    )  # fmt: skip
    child = pexpect.spawn(
        sys.executable, ["-m", "rinna_cli", "chat", "--model", str(model), *extra],
        env=environ, cwd=str(home), dimensions=(30, 120), encoding="utf-8", timeout=TIMEOUT,
    )  # fmt: skip
    return child


def expect_typed(child, text: str) -> None:
    """Wait until prompt_toolkit has drawn ``text`` (maybe with cursor and style escapes between its characters)."""
    escapes = r"(?:\x1b\[[0-9;?]*[ -/]*[@-~])*"
    child.expect(escapes.join(re.escape(char) for char in text))


def submit(child, line: str) -> str:
    """Type ``line``, press Enter, and return what was shown up to the next prompt (escapes removed)."""
    child.send(line + "\r")
    child.expect_exact(PROMPT)
    return plain(child.before)


def session_log(home: Path, model: Path) -> Path:
    for path in (home / "sessions").glob("*.jsonl"):
        if json.loads(path.read_text(encoding="utf-8").splitlines()[0])["model"] == str(model):
            return path
    raise AssertionError(f"no session log for {model} in {home}")


def logged(home: Path, model: Path) -> list[tuple[str, str, bool]]:
    return [(speaker, text, interrupted) for speaker, text, _, interrupted in store.replay_log(session_log(home, model)).turns]


@pytest.fixture(scope="module")
def endless_model(tiny_model, tmp_path_factory) -> Path:
    """The random tiny model, changed so that it never emits ``</s>``.

    The plain random model often ends a sampled reply after a few dozen tokens,
    before a Ctrl-C could reach it; this one always runs to max_new_tokens.
    Its final layer norm gets a large constant in one dimension and the ``</s>``
    row of the output matrix points the other way, so ``</s>``'s logit is about -400.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from rinna_cli.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("endless")
    for path in tiny_model.iterdir():
        shutil.copy(path, folder / path.name)
    eos = Tokenizer.from_folder(folder).special.eos
    weights = load_file(folder / "model.safetensors")
    weights["gpt_neox.final_layer_norm.bias"][0] += 20.0
    weights["embed_out.weight"][eos] = 0.0
    weights["embed_out.weight"][eos, 0] = -20.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def chats(memorized_model, endless_model, tmp_path_factory):
    """Both chats, started together so that their startups overlap."""
    home = tmp_path_factory.mktemp("home")
    memorized = spawn(memorized_model, home, "-t", "0")
    tiny = spawn(endless_model, home, "-t", "0.8", "--max-new-tokens", "1500")
    yield {"home": home, "memorized": memorized, "tiny": tiny}
    for child in (memorized, tiny):
        if child.isalive():
            child.terminate(force=True)


def test_terminal_chat_with_the_memorized_model(chats, memorized_model):
    child, home = chats["memorized"], chats["home"]
    child.expect_exact(PROMPT)
    assert "/help for commands" in plain(child.before)
    assert (home / "history").is_file()

    # Japanese typed at the terminal, its UTF-8 bytes arriving in two pieces as an IME may commit them.
    data = "私の名前は花子です。\r".encode()
    os.write(child.child_fd, data[:4])
    time.sleep(0.1)
    os.write(child.child_fd, data[4:])
    child.expect_exact(PROMPT)
    assert "システム: こんにちは、花子さん。" in plain(child.before)

    assert "システム: 花子さんです。" in submit(child, "私の名前は何ですか?")

    assert "removed the last exchange" in submit(child, "/undo")
    shown = submit(child, "/history")
    assert "ユーザー: 私の名前は花子です。\nシステム: こんにちは、花子さん。\n" in shown
    assert "何ですか" not in shown and "花子さんです" not in shown

    assert "システム: こんにちは、花子さん。" in submit(child, "/retry")
    assert logged(home, memorized_model) == [(USER, "私の名前は花子です。", False), (SYSTEM, "こんにちは、花子さん。", False)]

    # Ctrl-C at the prompt clears the half-typed line; the next question is sent alone.
    child.send("abc")
    expect_typed(child, "abc")
    child.send("\x03")
    child.expect_exact(PROMPT)
    assert "システム: 花子さんです。" in submit(child, "私の名前は何ですか?")
    assert logged(home, memorized_model)[-2] == (USER, "私の名前は何ですか?", False)

    # A bracketed paste of two lines is one message; Enter then sends it.
    child.send("\x1b[200~一行目\n二行目\x1b[201~")
    expect_typed(child, "二行目")
    shown = submit(child, "")
    assert "システム: " in shown
    assert logged(home, memorized_model)[-2] == (USER, "一行目\n二行目", False)

    # Esc Enter (Alt+Enter) adds a line instead of sending.
    child.send("三行目\x1b\r")
    child.send("四行目")
    expect_typed(child, "四行目")
    assert len(logged(home, memorized_model)) == 6  # nothing sent yet
    submit(child, "")
    assert logged(home, memorized_model)[-2] == (USER, "三行目\n四行目", False)

    assert "context used: " in submit(child, "/show")
    assert "unknown command /nope" in submit(child, "/nope")

    # Ctrl-D at an empty prompt quits with status 0.
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert len(logged(home, memorized_model)) == 8


def test_ctrl_c_stops_a_reply_and_keeps_it(chats, endless_model):
    child, home = chats["tiny"], chats["home"]
    child.expect_exact(PROMPT)
    child.send("こんにちは\r")
    child.expect_exact("システム: ")
    child.expect(r"[^\x1b\r\n]{12}")  # the reply is streaming
    child.send("\x03")
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)
    child.expect_exact("ユーザー: ")  # the REPL is back
    speaker, text, interrupted = logged(home, endless_model)[-1]
    assert speaker == SYSTEM and interrupted and text
    assert len(store.replay_log(session_log(home, endless_model)).turns[-1][2]) < 1500 + 3  # stopped early

    shown = submit(child, "/history")
    assert "ユーザー: こんにちは\n" in shown
    assert shown.rstrip().endswith("[interrupted]")

    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.signalstatus is None


def test_two_terminal_chats_kept_apart(chats, memorized_model, endless_model):
    if chats["memorized"].isalive() or chats["tiny"].isalive():
        pytest.skip("the chats above did not finish")
    home = chats["home"]
    assert session_log(home, memorized_model) != session_log(home, endless_model)
    assert len(list((home / "sessions").glob("*.jsonl"))) == 2
    # The input history both wrote is readable and holds the lines of both, multi-line ones whole.
    from prompt_toolkit.history import FileHistory

    entries = list(FileHistory(str(home / "history")).load_history_strings())
    for line in ("私の名前は花子です。", "一行目\n二行目", "三行目\n四行目", "/undo", "こんにちは", "/history"):
        assert line in entries
    assert "abc" not in entries
    assert (home / "history").stat().st_mode & 0o777 == 0o600
