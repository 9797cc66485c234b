"""``rinna chat`` in-process (rinna_cli.chat): piped errors, the session list, --resume [N|ID], --load's settings.

The chats run with the scripted engine on the memorized tokenizer; a terminal chat reads its keys
from a prompt_toolkit pipe, as in ``test_repl``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from rinna_cli import chat as chat_command
from rinna_cli import config, store
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.prompt import SYSTEM, USER
from tests.fakes import ScriptedEngine, make_env


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RINNA_CLI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RINNA_MODEL", raising=False)
    return tmp_path / "home"


@pytest.fixture
def engine(memorized_tokenizer) -> ScriptedEngine:
    return ScriptedEngine(memorized_tokenizer)


def settings_of(model: Path, **flags) -> config.Settings:
    return config.load({"model": str(model), "temperature": 0.0, **flags}, {})


def piped(model, engine, text: str, resume=None, load=None, given=()) -> tuple[int, str, str]:
    env = make_env(text.encode(), engine)
    code = chat_command.chat(env, settings_of(model), resume, load, given)
    return code, env.stdout.getvalue(), env.stderr.getvalue()


def typed(model, engine, keys: str, resume=None, load=None, **flags) -> tuple[int, str, str]:
    """A terminal chat that reads ``keys``; returns its status, stdout and stderr."""
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    env = make_env(None, engine, stdin_isatty=True, stdout_isatty=True)
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text(keys)
        code = chat_command.chat(env, settings_of(model, **flags), resume, load, tuple(flags))
    return code, env.stdout.getvalue(), env.stderr.getvalue()


def age(path: Path, seconds: float) -> None:
    now = time.time()
    os.utime(path, (now - seconds, now - seconds))


# -- item 5: a refused piped line ---------------------------------------------------------------


def test_piped_chat_refuses_a_line_with_the_error_line_goes_on_and_fails(run_cli, memorized_model, engine, home):
    engine.enqueue("こんにちは、太郎さん。", "太郎さんです。")
    ran = run_cli("chat", "-m", str(memorized_model), "-t", "0", stdin="私の名前は太郎です。\n/nope\n私の名前は何ですか?\n".encode(),
                  engine=engine)  # fmt: skip
    assert ran.code == 2
    assert ran.stdout == "こんにちは、太郎さん。\n太郎さんです。\n"
    assert (
        ran.stderr
        == "rinna: error: unknown command /nope; /help lists the commands (start with // to send a message)\n"
    )


def test_piped_chat_with_a_failing_server_exits_1_and_answers_nothing_twice(run_cli, memorized_model, engine, home):
    engine.error = RinnaError("http://gpu:8000/v1: connection refused")
    ran = run_cli("chat", "-m", str(memorized_model), stdin="一\n二\n".encode(), engine=engine)
    assert ran.code == 1 and ran.stdout == ""
    assert ran.stderr.count("rinna: error: http://gpu:8000/v1: connection refused; the message is kept") == 2
    # The second line replaced the first, unanswered one: never two user turns in a row.
    assert engine.prompt_text() == "ユーザー: 二<NL>システム: "


# -- item 10: sessions ---------------------------------------------------------------------------


def test_sessions_are_listed_newest_first_with_their_first_message(memorized_model, engine, home, capsys):
    env = make_env(b"")
    assert chat_command.list_sessions(env) == 0
    assert env.stdout.getvalue() == "" and env.stderr.getvalue() == f"no saved chat sessions in {home / 'sessions'}\n"
    typed(memorized_model, engine, "私の名前は太郎です。\r\x04")
    (first,) = store.sessions(home / "sessions")
    age(first.path, 60)
    piped(memorized_model, engine, "一行目だけが見える\n")
    env = make_env(b"")
    assert chat_command.list_sessions(env) == 0
    second, first = store.sessions(home / "sessions")
    when = [time.strftime("%Y-%m-%d %H:%M", time.localtime(info.modified)) for info in (second, first)]
    assert env.stdout.getvalue() == (
        f"  1  {second.id}  {when[0]}    2 turns  一行目だけが見える  (piped)\n"
        f"  2  {first.id}  {when[1]}    2 turns  私の名前は太郎です。\n"
    )


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(home, limit):
    with pytest.raises(UsageError, match=rf"^--limit {limit} is out of range; allowed: limit >= 1$"):
        chat_command.list_sessions(make_env(b""), limit)


def test_a_long_or_hostile_first_message_is_cut_and_escaped(memorized_model, engine, home):
    piped(memorized_model, engine, "\x1b]0;x\x07" + "長" * 60 + "\n")
    env = make_env(b"")
    chat_command.list_sessions(env)
    listed = env.stdout.getvalue()
    assert "\\e]0;x\\x07" + "長" * 14 + "…  (piped)\n" in listed and "\x1b" not in listed


def test_resume_skips_piped_runs_and_shows_the_last_exchange(memorized_model, engine, home):
    engine.enqueue("こんにちは、太郎さん。", "スクリプトの返事。", "太郎さんです。")
    typed(memorized_model, engine, "私の名前は太郎です。\r\x04")
    piped(memorized_model, engine, "スクリプトの質問\n")  # newer, but a piped run
    code, out, _ = typed(memorized_model, engine, "私の名前は何ですか?\r\x04", resume=True)
    assert code == 0
    assert out.endswith(
        "\nユーザー: 私の名前は太郎です。\nシステム: こんにちは、太郎さん。\n\nシステム: 太郎さんです。\n\n"
    )  # the last exchange, then the new reply (the typed message is the prompt's, not on stdout here)
    assert (
        engine.prompt_text()
        == "ユーザー: 私の名前は太郎です。<NL>システム: こんにちは、太郎さん。<NL>ユーザー: 私の名前は何ですか?<NL>システム: "
    )


def test_resume_by_number_or_id(memorized_model, engine, home):
    engine.enqueue("一の返事。", "二の返事。", "続き。", "また続き。")
    piped(memorized_model, engine, "一\n")
    older = store.sessions(home / "sessions")[0]
    age(older.path, 60)
    piped(memorized_model, engine, "二\n")
    code, out, err = piped(memorized_model, engine, "続けて\n", resume="2")
    assert (code, out) == (0, "続き。\n") and f"continuing 2 turns from {older.path}" in err
    assert engine.prompt_text().startswith("ユーザー: 一<NL>システム: 一の返事。<NL>")
    code, out, err = piped(memorized_model, engine, "続けて\n", resume=older.id)
    assert (code, out) == (0, "また続き。\n") and engine.prompt_text().startswith("ユーザー: 一<NL>")
    with pytest.raises(RinnaError, match="no session 'zzz' in"):
        piped(memorized_model, engine, "", resume="zzz")
    # resumed with nothing to add (an empty pipe, Ctrl-D at once): no copy joins the list, the numbers stay
    listed = [info.path for info in store.sessions(home / "sessions")]
    code, out, err = piped(memorized_model, engine, "", resume="2")
    assert (code, out) == (0, "") and "continuing" in err
    assert typed(memorized_model, engine, "\x04", resume="1")[0] == 0
    assert [info.path for info in store.sessions(home / "sessions")] == listed


def test_piped_runs_are_marked_in_the_session_header(memorized_model, engine, home):
    piped(memorized_model, engine, "一\n")
    typed(memorized_model, engine, "二\r\x04")
    headers = sorted(
        json.loads(p.read_text(encoding="utf-8").splitlines()[0])["interactive"]
        for p in (home / "sessions").glob("*.jsonl")
    )
    assert headers == [False, True]


def test_load_restores_the_settings_of_the_transcript_but_not_over_flags(memorized_model, engine, tmp_path, home):
    transcript = tmp_path / "t.json"
    stored = {"temperature": 0.3, "top_p": 0.9, "top_k": 7, "repetition_penalty": 1.1, "max_new_tokens": 64, "seed": 5}
    store.save_transcript(transcript, [], str(memorized_model), stored)
    code, _, err = piped(memorized_model, engine, "こんにちは\n", load=transcript)
    assert code == 0 and "settings restored: temperature=0.3, top_p=0.9, top_k=7" in err
    assert engine.samplings[-1] == config.Settings(**{**config.shipped_defaults(), **stored}).sampling()
    code, _, err = piped(memorized_model, engine, "こんにちは\n", load=transcript, given=("temperature",))
    assert engine.samplings[-1].temperature == 0.0 and engine.samplings[-1].top_k == 7
    code, _, err = piped(memorized_model, engine, "こんにちは\n", load=transcript, given=None)  # flags unknown
    assert "settings restored" not in err and engine.samplings[-1] == settings_of(memorized_model).sampling()


def test_resume_restores_the_settings_of_the_last_turn(memorized_model, engine, home):
    typed(memorized_model, engine, "/set top_k 3\r一\r\x04")
    code, _, _ = piped(memorized_model, engine, "二\n", resume=True)
    assert code == 0 and engine.samplings[-1].top_k == 3


def test_terminal_banner_mentions_alt_enter(memorized_model, engine, home):
    _, out, _ = typed(memorized_model, engine, "\x04")
    assert "Alt+Enter for a new line" in out and "/help for commands" in out


def test_a_resumed_chat_logs_the_old_turns_then_the_new(memorized_model, engine, home):
    """A resumed terminal chat's log holds the old turns first, then the new ones."""
    engine.enqueue("a。", "b。")
    typed(memorized_model, engine, "一\r\x04")
    typed(memorized_model, engine, "二\r\x04", resume=True)
    newest = store.sessions(home / "sessions")[0]
    assert [(t.speaker, t.text) for t in store.replay_log(newest.path).turns] == [
        (USER, "一"), (SYSTEM, "a。"), (USER, "二"), (SYSTEM, "b。")
    ]  # fmt: skip


def test_resume_target():
    assert chat_command.resume_target(False, None) is None
    assert chat_command.resume_target(True, None) == ""
    assert chat_command.resume_target(True, "2") == "2"
    with pytest.raises(UsageError, match=r"to continue session '2', add --resume: rinna chat --resume 2"):
        chat_command.resume_target(False, "2")
    with pytest.raises(UsageError, match=r"to continue session '20261208-0030', add --resume"):
        chat_command.resume_target(False, "20261208-0030")  # the start of a session's id
    # a question given as chat's argument, as to ask: no session by that name is suggested
    for question, quoted in (("世界で一番高い山は?", "'世界で一番高い山は?'"), ("hello", "hello")):
        with pytest.raises(UsageError, match="rinna chat takes no message") as raised:
            chat_command.resume_target(False, question)
        assert str(raised.value).endswith(f"or ask once: rinna ask {quoted}") and "--resume" not in str(raised.value)


def test_the_command_line_lists_sessions_and_resumes_by_number(memorized_model, engine, home):
    """``rinna sessions`` and ``rinna chat --resume N`` as declared in cli.py (in-process)."""
    from tests.fakes import run_cli

    engine.enqueue("一の返事。", "二の返事。", "続き。")
    assert run_cli("chat", "-m", str(memorized_model), "-t", "0", stdin="一\n".encode(), engine=engine).code == 0
    age(store.sessions(home / "sessions")[0].path, 60)
    assert run_cli("chat", "-m", str(memorized_model), "-t", "0", stdin="二\n".encode(), engine=engine).code == 0
    listed = run_cli("sessions")
    assert listed.code == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == ["1", "2"]
    assert "二  (piped)" in listed.stdout.splitlines()[0] and "一  (piped)" in listed.stdout.splitlines()[1]
    resumed = run_cli("chat", "-m", str(memorized_model), "--resume", "2", stdin="続けて\n".encode(), engine=engine)
    assert (resumed.code, resumed.stdout) == (0, "続き。\n")
    assert engine.prompt_text() == "ユーザー: 一<NL>システム: 一の返事。<NL>ユーザー: 続けて<NL>システム: "
    # --resume alone takes the last chat typed on a terminal: piped runs never are one
    refused = run_cli("chat", "-m", str(memorized_model), "--resume", stdin=b"x\n", engine=engine)
    assert refused.code != 0 and refused.stderr.startswith("rinna: error: ")


def test_a_resumed_or_loaded_chat_goes_on_with_its_own_model_unless_model_is_given(memorized_model, engine, home,
                                                                                      tmp_path):  # fmt: skip
    """A session's (or transcript's) model comes back with it, as its settings do, unless --model names another."""
    other = tmp_path / "other-model"  # another model folder (the same files)
    other.mkdir()
    for file in memorized_model.iterdir():
        (other / file.name).symlink_to(file)
    engine.enqueue("一の返事。", "続き。", "また続き。")
    piped(other, engine, "一\n")

    def newest_model() -> str:
        path = store.sessions(home / "sessions")[0].path
        return json.loads(path.read_text(encoding="utf-8").splitlines()[0])["model"]

    code, _, err = piped(memorized_model, engine, "続けて\n", resume="1")  # -m not given: the config's default
    assert code == 0 and f"model restored: {other}\n" in err and newest_model() == str(other)
    code, _, err = piped(memorized_model, engine, "続けて\n", resume="1", given=("model",))
    assert code == 0 and "model restored" not in err and newest_model() == str(memorized_model)
    # the stored model gone: the error says whose model it was and how to go on
    for file in other.iterdir():
        file.unlink()
    other.rmdir()
    older = store.sessions(home / "sessions")[1].path
    with pytest.raises(RinnaError, match=rf"no such model folder \(the model of {older}; --model continues it"):
        piped(memorized_model, engine, "続けて\n", resume="2")
