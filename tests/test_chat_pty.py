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
from tests import prewarmed  # noqa: E402
from tests.fixtures.memorized_data import SIGHTSEEING_A, SIGHTSEEING_Q  # noqa: E402
from tests.helpers import process_env  # noqa: E402

TIMEOUT = 60
# prompt_toolkit turns bracketed paste on each time it shows the prompt (and off when a line is accepted).
PROMPT = "\x1b[?2004h"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()=>][0-9A-Za-z]?|\r")
# The spinner before the first token: each braille frame is drawn, then the cursor steps back over it.
SPINNER = re.compile("(?:\x1b\\[2m)?[\u2800-\u28ff](?:\x1b\\[22m)?\x08")


def plain(text: str) -> str:
    return ANSI.sub("", SPINNER.sub("", text))


def spawn(model: Path, home: Path, *extra: str):
    environ = process_env(
        home / "hf", home, OMP_NUM_THREADS="1", TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", RINNA_QUANTIZE="none"
    )  # float32: no first-start quantizing per process (test_int8 and test_ask cover int8)
    child = prewarmed.spawn(
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
    return [(t.speaker, t.text, t.interrupted) for t in store.replay_log(session_log(home, model)).turns]


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
    assert "Alt+Enter for a new line · /help for commands" in plain(child.before)
    assert (home / "history").is_file()

    # Japanese typed at the terminal, its UTF-8 bytes arriving in two pieces as an IME may commit them.
    data = "私の名前は花子です。\r".encode()
    os.write(child.child_fd, data[:4])
    time.sleep(0.1)
    os.write(child.child_fd, data[4:])
    child.expect_exact(PROMPT)
    # A spinner waits for the first token, erased as the text comes; a blank line ends the turn.
    assert re.search("システム: (?:\x1b\\[0m)?\x1b\\[2m\u280b\x1b\\[22m\x08.*\x1b\\[Kこんにちは", child.before, re.S)
    assert "システム: こんにちは、花子さん。\n\n" in plain(child.before)

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
    child.send("/nope\r")
    child.expect_exact(PROMPT)
    assert "\x1b[31merror: unknown command /nope" in child.before  # errors in red, not dim

    # Tab completes a command; Ctrl-C at an empty prompt says how to quit.
    child.send("/his\t")
    expect_typed(child, "/history")
    child.send("\x03")
    child.expect_exact(PROMPT)
    child.send("\x03")
    child.expect_exact("(Ctrl-D or /exit to quit)")
    child.expect_exact(PROMPT)

    # The continuation lines of a multi-line reply (and of a typed message) are indented under the label.
    submit(child, "/reset")
    shown = submit(child, "吾輩は何ですか?")
    assert "システム: 吾輩は  猫である。\n          名前はまだ無い。\n          どこで生れたかとんと見当がつかぬ。\n\n" in shown
    child.send("一\x1b\r")
    child.send("二")
    # prompt_toolkit draws the continuation's ten blank cells as a cursor move (ESC [10C) or spaces
    escapes = r"(?:\x1b\[[0-9;?]*[ -/]*[@-~]| \x08)*"
    child.expect(rf"\n{escapes}(?:\x1b\[10C| {{10}}){escapes}二")

    # Ctrl-D at an empty prompt quits with status 0.
    child.send("\x03")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert logged(home, memorized_model) == [
        (USER, "吾輩は何ですか?", False),
        (SYSTEM, "吾輩は  猫である。\n名前はまだ無い。\nどこで生れたかとんと見当がつかぬ。", False),
    ]


def test_ctrl_c_stops_a_reply_and_keeps_it(chats, endless_model):
    child, home = chats["tiny"], chats["home"]
    child.expect_exact(PROMPT)
    child.send("こんにちは\r")
    child.expect_exact("システム: ")
    child.expect(r"[^\x1b\r\n]{12}")  # the reply is streaming
    # typed while it streams, not shown in the reply: a line Enter ended is sent when the reply ends, as if typed
    # then; the line in progress waits in the next prompt
    child.send("/show\rxyz")
    time.sleep(0.3)
    child.send("\x03")
    child.expect_exact("[interrupted]")
    reply = child.before
    assert "xyz" not in reply and "show" not in reply and "^C" not in reply
    # the mark follows the text after one space, or starts a continuation line at the indent (reply ended in a newline)
    assert re.search(r"(?:\S |^ {10})$", plain(reply), re.M)
    child.expect_exact("/show")
    child.expect_exact("context used: ")  # /show's answer
    child.expect_exact(PROMPT)
    child.expect_exact("ユーザー: ")  # the REPL is back
    expect_typed(child, "xyz")
    child.send("\x03")  # clears it
    child.expect_exact(PROMPT)
    speaker, text, interrupted = logged(home, endless_model)[-1]
    assert speaker == SYSTEM and interrupted and text
    assert len(store.replay_log(session_log(home, endless_model)).turns[-1].ids) < 1500 + 3  # stopped early

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


def test_ctrl_z_suspends_the_chat_and_fg_brings_it_back(memorized_model, tmp_path):
    """Ctrl-Z put a literal ^Z into the message (and ``fg`` after it), where bash, ollama and llm suspend."""
    environ = process_env(tmp_path / "hf", tmp_path, OMP_NUM_THREADS="1", TERM="xterm-256color",
                          PROMPT_TOOLKIT_NO_CPR="1", RINNA_QUANTIZE="none", PS1="SHELL> ")  # fmt: skip
    shell = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], env=environ, cwd=str(tmp_path),
                          dimensions=(30, 120), encoding="utf-8", timeout=TIMEOUT)  # fmt: skip
    try:
        shell.expect_exact("SHELL> ")
        shell.sendline(f"{sys.executable} -m rinna_cli chat --model {memorized_model} -t 0")
        shell.expect_exact(f"{USER}: ")
        shell.sendcontrol("z")
        shell.expect("Stopped")  # the shell's job control took it
        shell.expect_exact("SHELL> ")
        shell.sendline("fg")
        question = SIGHTSEEING_Q
        shell.sendline(question)
        shell.expect_exact(SIGHTSEEING_A.splitlines()[0])
        shell.expect_exact(f"{USER}: ")
        shell.sendcontrol("d")
        shell.expect_exact("SHELL> ")
    finally:
        shell.close(force=True)
    log = session_log(tmp_path, memorized_model).read_text(encoding="utf-8")
    assert "\\u001a" not in log and "\x1a" not in log and question in log
