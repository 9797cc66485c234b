"""The chat loop (:class:`rinna_cli.repl.Chat`) against a scripted engine: prompts, commands, the log."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import threading
from dataclasses import asdict

import pytest

from rinna_cli import config, store, terminal
from rinna_cli.environment import Environment
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.prompt import SYSTEM, USER, format_prompt
from rinna_cli.render import ReplyView
from rinna_cli.repl import Chat, run_piped
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests.fakes import ScriptedEngine

SETTINGS = config.Settings(**{
    **config.shipped_defaults(), "model": "fake/model", "device": "cpu", "dtype": "float32", "quantize": "none",
    "temperature": 0.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0, "max_new_tokens": 128, "seed": -1,
})  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(memorized_model) -> Tokenizer:
    return Tokenizer.from_folder(memorized_model)


class Harness:
    def __init__(self, tokenizer, replies=(), window=2048, settings=SETTINGS, log=None):
        self.engine = ScriptedEngine(tokenizer, replies, window)
        self.out = io.StringIO()
        self.notices: list[str] = []
        self.chat = Chat(self.engine, settings, ReplyView(self.out, tty=False), self.notices.append, log=log)

    def send(self, *lines: str) -> None:
        for line in lines:
            assert self.chat.handle(line) is True

    def turns(self):
        return [(t.speaker, t.text) for t in self.chat.conversation.turns]

    def last_notice(self) -> str:
        return self.notices[-1]


@pytest.fixture
def h(tokenizer) -> Harness:
    return Harness(tokenizer, ["こんにちは、太郎さん。", "太郎さんです。", "三つ目の返事。", "四つ目の返事。"])


# -- messages -----------------------------------------------------------------------------------


def test_a_message_is_sent_in_the_card_format_and_the_reply_streamed(h):
    h.send("私の名前は太郎です。")
    assert h.engine.prompt_text() == "ユーザー: 私の名前は太郎です。<NL>システム: "
    assert h.out.getvalue() == "こんにちは、太郎さん。\n"
    assert h.turns() == [(USER, "私の名前は太郎です。"), (SYSTEM, "こんにちは、太郎さん。")]
    assert h.engine.samplings == [SETTINGS.sampling()]


def test_the_prompt_is_the_whole_history(h, tokenizer):
    h.send("私の名前は太郎です。", "私の名前は何ですか?")
    expected = format_prompt([(USER, "私の名前は太郎です。"), (SYSTEM, "こんにちは、太郎さん。"), (USER, "私の名前は何ですか?")])
    assert expected == "ユーザー: 私の名前は太郎です。<NL>システム: こんにちは、太郎さん。<NL>ユーザー: 私の名前は何ですか?<NL>システム: "
    assert h.engine.prompt_text() == expected
    reference = Conversation(tokenizer)
    reference.add_user("私の名前は太郎です。")
    reference.add_reply("こんにちは、太郎さん。", tokenizer.encode("こんにちは、太郎さん。"))
    reference.add_user("私の名前は何ですか?")
    assert h.engine.prompts[-1] == reference.prompt_ids()
    # The first prompt is a prefix of the second: the engine's KV cache can be reused.
    assert h.engine.prompts[1][: len(h.engine.prompts[0])] == h.engine.prompts[0]
    assert h.out.getvalue() == "こんにちは、太郎さん。\n太郎さんです。\n"


def test_a_multi_line_message_is_one_turn_with_nl(h):
    h.send("一行目\n二行目")
    assert h.engine.prompt_text() == "ユーザー: 一行目<NL>二行目<NL>システム: "
    assert h.turns()[0] == (USER, "一行目\n二行目")


def test_blank_lines_are_not_sent(h):
    h.send("", "   ", "\n")
    assert h.engine.prompts == [] and h.turns() == []


def test_double_slash_sends_the_text_with_one_slash(h):
    h.send("//help me")
    assert h.turns()[0] == (USER, "/help me")


def test_input_that_is_not_utf8_is_refused(h):
    h.send(b"caf\xe9".decode("utf-8", "surrogateescape"))
    assert h.engine.prompts == [] and h.turns() == []
    assert "not valid UTF-8" in h.last_notice()


def test_an_engine_error_keeps_the_message_for_retry_and_the_chat_goes_on(h):
    h.engine.error = RinnaError("the model generated token id 99999")
    h.send("こんにちは")
    assert h.last_notice() == (
        "error: the model generated token id 99999; the message is kept without a reply: "
        "/retry sends it again, /undo drops it"
    )
    assert h.turns() == [(USER, "こんにちは")] and h.chat.exit_code == 1
    h.engine.error = None
    h.send("/retry")
    assert h.engine.prompts[1] == h.engine.prompts[0]
    assert h.turns() == [(USER, "こんにちは"), (SYSTEM, "こんにちは、太郎さん。")]


def test_a_new_message_replaces_one_left_without_a_reply(h, tmp_path):
    h.chat.log = store.SessionLog.create(tmp_path / "s", pytest.fail, {"model": "fake/model"})
    h.engine.error = RinnaError("the server closed the connection")
    h.send("こんにちは")
    h.engine.error = None
    h.send("私の名前は太郎です。")
    assert h.engine.prompt_text() == "ユーザー: 私の名前は太郎です。<NL>システム: "  # never two user turns in a row
    assert h.turns() == [(USER, "私の名前は太郎です。"), (SYSTEM, "こんにちは、太郎さん。")]
    assert [(t.speaker, t.text) for t in store.replay_log(h.chat.log.path).turns] == h.turns()


def test_a_failed_reply_on_a_terminal_leaves_no_dangling_label(tokenizer):
    out = io.StringIO()
    engine = ScriptedEngine(tokenizer)
    engine.error = RinnaError("HTTP 503 from http://gpu:8000/v1")
    errors: list[str] = []
    chat = Chat(engine, SETTINGS, ReplyView(out, tty=True), pytest.fail, alert=errors.append)
    chat.handle("こんにちは")
    assert out.getvalue() == "システム: \r\x1b[2K"  # the label is erased: nothing of a reply stays on screen
    assert errors == ["HTTP 503 from http://gpu:8000/v1; the message is kept without a reply: /retry sends it again, /undo drops it"]


def test_errors_go_to_the_alert_and_set_the_exit_code(tokenizer):
    notices: list[str] = []
    errors: list[str] = []
    chat = Chat(ScriptedEngine(tokenizer, window=64), SETTINGS.with_value("max_new_tokens", 16), ReplyView(io.StringIO(), tty=False),
                notices.append, alert=errors.append)  # fmt: skip
    chat.handle("/nope")
    assert errors == ["unknown command /nope; /help lists the commands (start with // to send a message)"]
    assert chat.exit_code == 2 and notices == []
    chat.handle("/help")
    chat.handle("こんにちは")
    assert len(errors) == 1 and chat.exit_code == 2 and len(notices) == 1


# -- commands -----------------------------------------------------------------------------------


def test_unknown_command_is_a_hint(h):
    h.send("/frobnicate")
    assert "unknown command /frobnicate" in h.last_notice() and "/help" in h.last_notice()
    assert h.engine.prompts == []


def test_help_and_exit(h):
    h.send("/help")
    assert "/retry" in h.last_notice()
    assert h.chat.handle("/exit") is False
    assert h.chat.handle("/quit") is False


def test_undo_removes_the_last_exchange(h):
    h.send("私の名前は太郎です。", "私の名前は何ですか?", "/undo")
    assert h.last_notice() == "removed the last exchange"
    assert h.turns() == [(USER, "私の名前は太郎です。"), (SYSTEM, "こんにちは、太郎さん。")]
    h.send("もう一度")
    assert h.engine.prompt_text() == "ユーザー: 私の名前は太郎です。<NL>システム: こんにちは、太郎さん。<NL>ユーザー: もう一度<NL>システム: "
    h.send("/undo", "/undo", "/undo")
    assert h.turns() == [] and h.last_notice() == "nothing to undo"


def test_retry_regenerates_the_last_reply_with_the_same_prompt(h):
    h.send("私の名前は太郎です。", "私の名前は何ですか?", "/retry")
    assert h.engine.prompts[2] == h.engine.prompts[1]
    assert h.turns() == [
        (USER, "私の名前は太郎です。"), (SYSTEM, "こんにちは、太郎さん。"),
        (USER, "私の名前は何ですか?"), (SYSTEM, "三つ目の返事。"),
    ]  # fmt: skip


def test_retry_with_nothing_to_retry(h):
    h.send("/retry")
    assert h.last_notice() == "nothing to retry" and h.engine.prompts == []


def test_retry_answers_a_message_left_without_a_reply(h):
    h.engine.error = RinnaError("boom")
    h.send("私の名前は太郎です。")
    h.engine.error = None
    h.send("/retry")
    assert h.turns() == [(USER, "私の名前は太郎です。"), (SYSTEM, "こんにちは、太郎さん。")]
    assert h.engine.prompts[1] == h.engine.prompts[0]


def test_reset_starts_a_new_conversation(h):
    h.send("私の名前は太郎です。", "/reset")
    assert h.turns() == [] and h.last_notice() == "new conversation"
    h.send("私の名前は何ですか?")
    assert h.engine.prompt_text() == "ユーザー: 私の名前は何ですか?<NL>システム: "
    h.send("/clear")
    assert h.turns() == []


def test_history_shows_every_turn(h):
    h.send("/history")
    assert h.last_notice() == "the conversation is empty"
    h.send("私の名前は太郎です。", "私の名前は何ですか?")
    h.notices.clear()
    h.send("/history")
    assert h.notices == [
        "ユーザー: 私の名前は太郎です。", "システム: こんにちは、太郎さん。",
        "ユーザー: 私の名前は何ですか?", "システム: 太郎さんです。",
    ]  # fmt: skip


def test_history_shows_control_characters_escaped(h):
    h.engine.replies = ["\x1b[31m赤\x1b]0;title\x07"]
    h.send("色")
    h.notices.clear()
    h.send("/history")
    assert h.notices[1] == "システム: \\e[31m赤\\e]0;title\\x07"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("temperature", "0.5", 0.5), ("top_p", "0.9", 0.9), ("top_k", "10", 10), ("repetition_penalty", "1.1", 1.1),
     ("max_new_tokens", "64", 64), ("seed", "42", 42), ("seed", "-1", -1), ("temperature", "0", 0.0)],
)  # fmt: skip
def test_set_valid_values(h, key, value, expected):
    h.send(f"/set {key} {value}")
    assert getattr(h.chat.settings, key) == expected
    assert h.last_notice() == f"{key} = {expected}"
    h.send("こんにちは")
    assert getattr(h.engine.samplings[-1], key) == expected


def test_set_with_a_dashed_key(h):
    h.send("/set top-p 0.5")
    assert h.chat.settings.top_p == 0.5


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("temperature", "-0.1", "0.0 <= temperature <= 5.0"),
        ("temperature", "9", "0.0 <= temperature <= 5.0"),
        ("temperature", "hot", "0.0 <= temperature <= 5.0"),
        ("temperature", "nan", "0.0 <= temperature <= 5.0"),
        ("top_p", "0", "0.0 < top_p <= 1.0"),
        ("top_p", "1.5", "0.0 < top_p <= 1.0"),
        ("top_k", "-1", "0 <= top_k <= 100000"),
        ("top_k", "2.5", "0 <= top_k <= 100000"),
        ("repetition_penalty", "0", "0.0 < repetition_penalty <= 10.0"),
        ("repetition_penalty", "11", "0.0 < repetition_penalty <= 10.0"),
        ("max_new_tokens", "0", "1 <= max_new_tokens"),
        ("max_new_tokens", "many", "1 <= max_new_tokens"),
        ("seed", "-2", "-1 <= seed <= 4294967295"),
        ("seed", "4294967296", "-1 <= seed <= 4294967295"),
    ],
)
def test_set_invalid_values_are_rejected_with_the_allowed_range(h, key, value, allowed):
    before = h.chat.settings
    h.send(f"/set {key} {value}")
    assert h.chat.settings is before
    assert h.last_notice().startswith("error: /set: ")
    assert "allowed: " in h.last_notice() and allowed in h.last_notice()


@pytest.mark.parametrize("key", ["model", "device", "dtype", "colour"])
def test_set_only_changes_generation_settings(h, key):
    before = h.chat.settings
    h.send(f"/set {key} cpu")
    assert h.chat.settings is before
    assert "unknown setting" in h.last_notice() and "temperature" in h.last_notice()
    assert "device," not in h.last_notice()


def test_set_max_new_tokens_must_leave_room_in_the_window(tokenizer):
    h = Harness(tokenizer, window=64)
    before = h.chat.settings
    for value in ("64", "100"):
        h.send(f"/set max_new_tokens {value}")
        assert h.chat.settings is before
        assert "allowed: 1 <= max_new_tokens < 64" in h.last_notice()
    h.send("/set max_new_tokens 2048")
    assert h.chat.settings is before and "allowed: 1 <= max_new_tokens <= 2047" in h.last_notice()
    h.send("/set max_new_tokens 63")
    assert h.chat.settings.max_new_tokens == 63


def test_show(h):
    h.send("/show")
    text = "\n".join(h.notices)
    assert "model: fake/model" in text and "device: cpu (float32)" in text
    assert "temperature=0.0" in text and "max_new_tokens=128" in text
    empty = len(h.chat.conversation.prompt_ids())
    assert f"context used: {empty} / 2048" in text
    h.send("私の名前は太郎です。", "/show")
    used = len(h.chat.conversation.prompt_ids())
    assert used > empty
    assert f"context used: {used} / 2048" in h.last_notice() and "kernels:" not in text
    h.chat.engine.kernels = "int8 decode int8dot, batch int8dot, prefill int8dot; float32, attention attend"
    h.send("/show")  # /help promises the dtype: a quantized model's activations are named with its kernels
    assert "\nkernels: int8 decode int8dot, batch int8dot, prefill int8dot; float32, attention attend\n" in h.last_notice()


def test_stats_before_and_after_a_reply(h):
    h.send("/stats")
    assert h.last_notice() == "no reply yet"
    h.send("私の名前は太郎です。", "/stats")
    reply_ids = h.chat.conversation.turns[-1].ids
    assert "tokens, prompt" in h.last_notice()
    assert "first token 0.01 s" in h.last_notice() and "123.4 tokens/s" in h.last_notice()
    assert h.last_notice().startswith(f"{len(reply_ids) - 3 + 1} tokens")  # reply ids minus "システム: ", plus </s>


# -- save and load ------------------------------------------------------------------------------


def test_save_then_load_round_trip(h, tokenizer, tmp_path):
    h.send("私の名前は太郎です。", "一行目\n二行目", f"/save {tmp_path / 'chat.json'}")
    assert h.last_notice() == f"saved 4 turns to {tmp_path / 'chat.json'}"
    other = Harness(tokenizer, ["続き。"])
    other.send("関係ない話", f"/load {tmp_path / 'chat.json'}")
    assert other.last_notice() == f"loaded 4 turns from {tmp_path / 'chat.json'}"
    assert other.turns() == h.turns()
    other.send("続けて")
    h.send("続けて")
    assert other.engine.prompts[-1] == h.engine.prompts[-1]


def test_save_without_a_path_writes_a_new_file_in_the_app_dir(h, tmp_path, monkeypatch):
    work, home = tmp_path / "checkout", tmp_path / "home"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("RINNA_CLI_HOME", str(home))
    h.send("私の名前は太郎です。", "/save", "/save")
    saved = sorted((home / "transcripts").glob("chat-*.json"))
    assert len(saved) == 2  # two saves (maybe in one second): two files
    assert sorted(h.notices[-2:]) == [f"saved 2 turns to {path}" for path in saved]
    assert [t.text for t in store.load_transcript(saved[0]).turns] == ["私の名前は太郎です。", "こんにちは、太郎さん。"]
    assert list(work.iterdir()) == []  # the working directory is left alone


def test_save_never_overwrites_unless_forced(h, tmp_path):
    target = tmp_path / "chat.json"
    target.write_text("precious", encoding="utf-8")
    h.send("私の名前は太郎です。", f"/save {target}")
    assert h.last_notice() == f"error: {target} already exists; /save! {target} replaces it"
    assert target.read_text(encoding="utf-8") == "precious" and h.chat.exit_code == 2
    h.send(f"/save! {target}")
    assert h.last_notice() == f"saved 2 turns to {target}"
    assert len(store.load_transcript(target).turns) == 2


def test_load_restores_the_stored_settings(h, tmp_path):
    target = tmp_path / "chat.json"
    store.save_transcript(target, [], "fake/model", {**asdict(SETTINGS.sampling()), "temperature": 0.3, "top_k": 7})
    h.send(f"/load {target}")
    assert h.last_notice() == "settings restored: temperature=0.3, top_k=7"
    h.send("こんにちは")
    assert (h.engine.samplings[-1].temperature, h.engine.samplings[-1].top_k) == (0.3, 7)


def test_adopt_keeps_the_flags_and_skips_invalid_stored_values(h):
    h.chat.adopt({"temperature": 0.3, "top_p": 0.5, "top_k": "many", "max_new_tokens": 4096, "colour": 1}, keep={"top_p"})
    assert (h.chat.settings.temperature, h.chat.settings.top_p, h.chat.settings.top_k) == (0.3, 1.0, 50)
    assert h.chat.settings.max_new_tokens == 128
    assert h.notices[-1] == "settings restored: temperature=0.3"
    assert h.notices[0].startswith("stored settings: top_k must be an integer") and h.notices[0].endswith("; kept top_k = 50")


def test_show_last_exchange_on_a_terminal(h):
    out = io.StringIO()
    h.send("私の名前は太郎です。", "一行目\n二行目")
    h.chat.view = ReplyView(out, tty=True)
    terminal.show_last_exchange(h.chat)
    assert out.getvalue() == "ユーザー: 一行目\n          二行目\nシステム: 太郎さんです。\n\n"


def test_save_failure_is_a_notice(h, tmp_path):
    h.send("私の名前は太郎です。", f"/save {tmp_path / 'missing' / 'x.json'}")
    assert h.last_notice().startswith("error: ") and "cannot save" in h.last_notice()
    assert len(h.turns()) == 2


BAD_FILES = {
    "not_json.json": "{this is not json",
    "foreign.json": '{"foo": 1}',
    "list.json": "[1, 2, 3]",
    "bad_speaker.json": json.dumps({"format": "rinna-cli/transcript", "turns": [{"speaker": "AI", "text": "x"}]}),
    "bad_text.json": json.dumps({"format": "rinna-cli/transcript", "turns": [{"speaker": USER, "text": None}]}),
    "foreign.jsonl": '{"event": "click"}\n{"event": "scroll"}\n',
}


@pytest.mark.parametrize("name", [*BAD_FILES, "missing.json"])
def test_load_of_a_bad_file_leaves_the_conversation_untouched(tokenizer, tmp_path, name):
    log = store.SessionLog.create(tmp_path / "sessions", pytest.fail, {"model": "fake/model"})
    h = Harness(tokenizer, ["こんにちは、太郎さん。"], log=log)
    h.send("私の名前は太郎です。")
    before_turns = list(h.chat.conversation.turns)
    before_log = log.path.read_bytes()
    path = tmp_path / name
    if name in BAD_FILES:
        path.write_text(BAD_FILES[name], encoding="utf-8")
    h.send(f"/load {path}")
    assert h.last_notice().startswith(f"error: {path}: ")
    assert h.chat.conversation.turns == before_turns
    assert log.path.read_bytes() == before_log
    h.send("私の名前は何ですか?")
    assert h.engine.prompt_text().startswith("ユーザー: 私の名前は太郎です。<NL>システム: こんにちは、太郎さん。<NL>")


def test_load_from_another_model_reencodes_the_text(tokenizer, tmp_path):
    path = tmp_path / "t.json"
    turns = [{"speaker": USER, "text": "私の名前は太郎です。"}, {"speaker": SYSTEM, "text": "こんにちは、太郎さん。"}]
    path.write_text(json.dumps({"format": "rinna-cli/transcript", "model": "other", "turns": turns}), encoding="utf-8")
    h = Harness(tokenizer)
    h.send(f"/load {path}", "私の名前は何ですか?")
    assert h.engine.prompt_text() == (
        "ユーザー: 私の名前は太郎です。<NL>システム: こんにちは、太郎さん。<NL>ユーザー: 私の名前は何ですか?<NL>システム: "
    )


# -- the context window -------------------------------------------------------------------------


def small_window_harness(tokenizer, log=None) -> Harness:
    settings = SETTINGS.with_value("max_new_tokens", 16)
    return Harness(tokenizer, ["こんにちは、太郎さん。"] * 20, window=64, settings=settings, log=log)


def test_undo_and_retry_after_a_drop_still_send_a_user_turn(tokenizer):
    h = small_window_harness(tokenizer)
    for message in ["私の名前は太郎です。", "私の名前は何ですか?", "今日はいい天気ですね。", "ありがとうございます。"]:
        h.send(message)
        if h.chat.start:
            break
    assert h.chat.start == 2  # the first exchange no longer fits
    while len(h.chat.conversation.turns) > 2:
        h.send("/undo")  # back to the first exchange alone: only turns that were left out remain
    h.send("/retry")
    kept = h.chat.conversation.turns[h.chat.start : -1]
    assert kept and kept[0].speaker == USER
    assert h.engine.prompt_text() == format_prompt([(t.speaker, t.text) for t in kept])
    h.send("次の質問です。")
    assert h.engine.prompt_text().startswith("ユーザー: ")


def test_turns_left_out_for_a_long_reply_come_back_when_they_fit_again(tokenizer):
    """A /set max_new_tokens 2030 once left 太郎 out for good: asked his name later, the model answered 花子."""
    h = small_window_harness(tokenizer)
    h.send("私の名前は太郎です。")
    h.send("/set max_new_tokens 40")
    h.send("吾輩は何ですか?")
    assert h.chat.start == 2 and h.engine.prompt_text().startswith("ユーザー: 吾輩は")
    h.send("/set max_new_tokens 1")
    h.notices.clear()
    h.send("名前は?")
    assert h.chat.start == 0 and h.engine.prompt_text().startswith("ユーザー: 私の名前は太郎です。")
    assert h.notices[0] == "2 turns left out before are back in the prompt"


def test_oldest_exchanges_are_left_out_with_one_notice(tokenizer):
    h = small_window_harness(tokenizer)
    room = 64 - 16
    messages = ["私の名前は太郎です。", "私の名前は何ですか?", "今日はいい天気ですね。", "ありがとうございます。", "こんばんは。"]
    drops = 0
    for message in messages:
        before = h.chat.start
        h.notices.clear()
        h.send(message)
        prompt = h.engine.prompts[-1]
        assert len(prompt) <= room
        if h.chat.start > before:
            drops += 1
        if h.chat.start > before and before == 0:  # the first drop is told, with how many turns are left out
            assert h.notices == [
                f"context full: the {h.chat.start} oldest turns are left out of the prompt, which leaves 16 tokens "
                "for the reply (max_new_tokens); more as the chat goes on (they stay in /history and in saved files)"
            ]
        else:  # later drops are not: a long chat would be told at every exchange
            assert h.notices == []
        # The prompt is whole exchanges from the newest back, starting with a user turn.
        kept = h.chat.conversation.turns[h.chat.start :]
        assert kept[0].speaker == USER
        assert h.engine.prompt_text() == format_prompt([(t.speaker, t.text) for t in kept[:-1]])
    assert drops >= 2
    # Nothing is lost from the history itself.
    assert [t.text for t in h.chat.conversation.turns if t.speaker == USER] == messages
    h.notices.clear()
    h.send("/history")
    assert len(h.notices) == 2 * len(messages)
    assert h.notices[0].endswith("(left out of the prompt)")
    assert not h.notices[-1].endswith("(left out of the prompt)")


def test_a_message_too_long_for_the_window_is_refused(tokenizer, tmp_path):
    log = store.SessionLog.create(tmp_path / "s", pytest.fail, {"model": "fake/model"})
    h = small_window_harness(tokenizer, log=log)
    h.send("私の名前は太郎です。")
    before = list(h.chat.conversation.turns)
    h.send("吾輩は猫である。名前はまだ無い。" * 10)
    assert len(h.engine.prompts) == 1
    assert re.fullmatch(
        r"error: the prompt is \d+ tokens; with max_new_tokens = 16 at most 48 fit in the model's 64-token window; "
        r"the message was not sent",
        h.last_notice(),
    )
    assert h.chat.conversation.turns == before
    assert [t.text for t in store.replay_log(log.path).turns] == [t.text for t in before]
    h.send("私の名前は何ですか?")  # still alive, history intact
    assert len(h.engine.prompts) == 2 and h.turns()[-1][0] == SYSTEM


def test_retry_that_no_longer_fits_keeps_the_message(tokenizer):
    h = Harness(tokenizer, ["はい。", "はい。"], window=64, settings=SETTINGS.with_value("max_new_tokens", 8))
    h.send("吾輩は猫である。名前はまだ無い。" * 2)
    assert [t[0] for t in h.turns()] == [USER, SYSTEM]
    h.send("/set max_new_tokens 60", "/retry")
    assert re.fullmatch(
        r"error: the prompt is \d+ tokens; with max_new_tokens = 60 at most 4 fit in the model's 64-token window",
        h.last_notice(),
    )
    assert [t[0] for t in h.turns()] == [USER]
    h.send("/set max_new_tokens 8", "/retry")
    assert [t[0] for t in h.turns()] == [USER, SYSTEM]


# -- Ctrl-C -------------------------------------------------------------------------------------


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_before_the_first_token_keeps_no_empty_reply(h):
    """``システム:  [interrupted]`` was stored: the model was shown an empty answer to the message."""
    h.engine.replies = ["一二三"]
    h.engine.interrupt_at = 0
    h.send("数えて")
    assert h.turns() == [(USER, "数えて")]
    assert h.last_notice() == "stopped before the first token: the message is kept without a reply: /retry sends it again"
    h.engine.interrupt_at = None
    h.send("/retry")
    assert h.turns()[-1] == (SYSTEM, "はい。") and h.engine.prompt_text() == "ユーザー: 数えて<NL>システム: "


def test_ctrl_c_keeps_the_partial_reply_marked_interrupted(h, tmp_path):
    h.engine.replies = ["一二三四五六七八九"]
    h.engine.interrupt_at = 2
    h.send("数えて")
    assert h.turns()[-1] == (SYSTEM, "一二三四五六")
    assert h.chat.conversation.turns[-1].interrupted is True
    assert h.out.getvalue() == "一二三四五六\n"
    h.notices.clear()
    h.send("/history")
    assert h.notices[-1] == "システム: 一二三四五六 [interrupted]"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the chat's handler is gone again
    # The conversation goes on, the partial reply in the prompt.
    h.engine.interrupt_at = None
    h.send("続けて")
    assert h.engine.prompt_text().endswith("システム: 一二三四五六<NL>ユーザー: 続けて<NL>システム: ")


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_a_second_ctrl_c_still_keeps_what_was_shown(h):
    h.engine.replies = ["一二三四五六七八九"]
    h.engine.interrupt_at = 1
    h.engine.hard_interrupt = True
    h.send("数えて")
    assert h.turns()[-1] == (SYSTEM, "一二三")
    assert h.chat.conversation.turns[-1].interrupted is True
    h.engine.interrupt_at = None
    h.send("/retry")
    assert h.turns()[-1] == (SYSTEM, "はい。") and not h.chat.conversation.turns[-1].interrupted


# -- the session log ----------------------------------------------------------------------------


def records(log):
    return [json.loads(line) for line in log.path.read_text(encoding="utf-8").splitlines()]


def test_every_turn_is_logged_as_it_happens(tokenizer, tmp_path):
    log = store.SessionLog.create(tmp_path / "sessions", pytest.fail, {"model": "fake/model", "created": 1.0})
    h = Harness(tokenizer, ["こんにちは、太郎さん。", "太郎さんです。"], log=log)
    h.send("私の名前は太郎です。")
    assert [r["type"] for r in records(log)] == ["session", "turn", "turn"]
    h.send("/set temperature 0.5", "私の名前は何ですか?")
    turns = [r for r in records(log) if r["type"] == "turn"]
    assert [(r["speaker"], r["text"]) for r in turns] == h.turns()
    assert turns[0]["settings"] == asdict(SETTINGS.sampling())
    assert turns[3]["settings"]["temperature"] == 0.5
    assert all(isinstance(r["time"], float) and r["time"] <= r["at"] for r in turns)
    assert turns[1]["ids"] == h.chat.conversation.turns[1].ids
    assert store.replay_log(log.path).turns == h.chat.conversation.turns  # ids and times too


def test_undo_retry_reset_and_load_are_logged_and_replayed(tokenizer, tmp_path):
    log = store.SessionLog.create(tmp_path / "sessions", pytest.fail, {"model": "fake/model"})
    h = Harness(tokenizer, ["a。", "b。", "c。", "d。", "e。"], log=log)

    def replayed():
        return [(t.speaker, t.text) for t in store.replay_log(log.path).turns]

    h.send("一", "二", "/undo")
    assert replayed() == h.turns() == [(USER, "一"), (SYSTEM, "a。")]
    assert {"type": "undo", "count": 2}.items() <= records(log)[-1].items()
    h.send("/retry")
    assert replayed() == h.turns() == [(USER, "一"), (SYSTEM, "c。")]
    h.send(f"/save {tmp_path / 't.json'}", "/reset")
    assert records(log)[-1]["type"] == "reset" and replayed() == []
    h.send("三")
    h.send(f"/load {tmp_path / 't.json'}")
    assert replayed() == h.turns() == [(USER, "一"), (SYSTEM, "c。")]


def test_interrupted_reply_is_logged_as_interrupted(h, tokenizer, tmp_path):
    log = store.SessionLog.create(tmp_path / "sessions", pytest.fail, {"model": "fake/model"})
    h.chat.log = log
    h.engine.replies = ["一二三四五六七八九"]
    h.engine.interrupt_at = 1
    h.send("数えて")
    last = store.replay_log(log.path).turns[-1]
    assert (last.text, last.ids, last.interrupted) == ("一二三", h.chat.conversation.turns[-1].ids, True)


def test_unwritable_log_folder_warns_once_and_the_chat_goes_on(tokenizer, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    warnings = []
    log = store.SessionLog.create(blocker / "sessions", warnings.append, {"model": "fake/model"})
    h = Harness(tokenizer, ["a。", "b。"], log=log)
    h.send("一", "二", "/undo", "/reset")
    assert len(warnings) == 1 and "cannot autosave" in warnings[0]
    assert h.turns() == []
    assert len(h.engine.prompts) == 2


def test_full_disk_warns_once_keeps_earlier_lines_and_the_chat_goes_on(tokenizer, tmp_path, monkeypatch):
    warnings = []
    log = store.SessionLog.create(tmp_path / "sessions", warnings.append, {"model": "fake/model"})
    h = Harness(tokenizer, ["a。", "b。", "c。"], log=log)
    h.send("一")
    before = log.path.read_bytes()

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    h.send("二", "三")
    monkeypatch.undo()
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "/save" in warnings[0]
    assert log.path.read_bytes() == before
    assert h.turns()[-1] == (SYSTEM, "c。") and len(h.turns()) == 6
    h.send(f"/save {tmp_path / 'rescue.json'}")  # the way out the warning points at
    assert len(store.load_transcript(tmp_path / "rescue.json").turns) == 6


# -- piped input --------------------------------------------------------------------------------


def test_run_piped_sends_each_line(h):
    assert run_piped(h.chat, [b"\xe7\xa7\x81\xe3\x81\xae\n", b"\n", "二\r\n".encode(), b"/history\n", "三".encode()]) == 0
    assert [t[1] for t in h.turns() if t[0] == USER] == ["私の", "二", "三"]
    assert h.out.getvalue() == "こんにちは、太郎さん。\n太郎さんです。\n三つ目の返事。\n"


def test_run_piped_stops_at_exit(h):
    assert run_piped(h.chat, [b"one\n", b"/exit\n", b"two\n"]) == 0
    assert [t[1] for t in h.turns()] == ["one", "こんにちは、太郎さん。"]


def test_run_piped_goes_on_after_a_refused_line_and_fails_at_the_end(tokenizer):
    errors: list[str] = []
    h = Harness(tokenizer, ["はい。", "いいえ。"], window=64, settings=SETTINGS.with_value("max_new_tokens", 16))
    h.chat.alert = errors.append
    long = "吾輩は猫である。名前はまだ無い。" * 10
    assert run_piped(h.chat, [b"one\n", f"{long}\n".encode(), b"/frobnicate\n", b"two\n"]) == 2
    assert h.out.getvalue() == "はい。\nいいえ。\n"
    assert len(errors) == 2 and errors[0].endswith("the message was not sent") and "/frobnicate" in errors[1]


def test_run_piped_fails_with_the_status_of_the_first_error(h):
    h.engine.error = RinnaError("connection refused")
    assert run_piped(h.chat, [b"one\n", b"/nope\n"]) == 1


def test_run_piped_refuses_a_line_that_is_not_utf8(h):
    with pytest.raises(UsageError, match="line 2 is not UTF-8"):
        run_piped(h.chat, [b"one\n", b"\x82\xa0\n"])
    assert len(h.turns()) == 2


def test_history_file_warns_once_when_it_cannot_be_written(tmp_path):
    warnings = []
    history = terminal._history(tmp_path / "missing" / "history", warnings.append)
    history.store_string("一")
    history.store_string("二")
    assert len(warnings) == 1 and "cannot write the input history" in warnings[0]


def test_history_file_entries_are_read_back(tmp_path):
    path = tmp_path / "history"
    history = terminal._history(path, pytest.fail)
    history.store_string("一行目\n二行目")
    history.store_string("/help")
    assert list(terminal._history(path, pytest.fail).load_history_strings()) == ["/help", "一行目\n二行目"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_history_keeps_no_blank_lines_nor_lines_refused_as_not_utf8(tmp_path):
    """Up-arrow brought back "   " and a refused Shift_JIS line stored as "abc???def"."""
    path = tmp_path / "history"
    history = terminal._history(path, pytest.fail)
    for line in ["   ", "abc\udc82\udca0def", "質問です", ""]:
        history.append_string(line)
    assert list(terminal._history(path, pytest.fail).load_history_strings()) == ["質問です"]


# -- the terminal loop, in process (prompt_toolkit reading a pipe) ------------------------------


def run_keys(h: Harness, keys: str, history_file=None) -> int:
    """Run :func:`repl.run_terminal` on ``keys`` typed in one go; return its exit status."""
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text(keys)
        env = Environment(stdin=None, stdout=io.StringIO(), stderr=io.StringIO())
        return terminal.run_terminal(h.chat, history_file, env)


def test_terminal_keys(h, tmp_path):
    keys = (
        "私の名前は太郎です。\r"  # Enter sends
        "abc\x03"  # Ctrl-C clears the line
        "\x1b[200~一行目\n二行目\x1b[201~\r"  # a bracketed paste stays one message
        "三行目\x1b\r四行目\r"  # Esc Enter adds a line
        "/undo\r"
        "\x04"  # Ctrl-D at an empty prompt quits
    )
    assert run_keys(h, keys, tmp_path / "history") == 0
    assert [text for speaker, text in h.turns() if speaker == USER] == ["私の名前は太郎です。", "一行目\n二行目"]
    assert h.last_notice() == "removed the last exchange"
    entries = list(terminal._history(tmp_path / "history", pytest.fail).load_history_strings())
    assert entries == ["/undo", "三行目\n四行目", "一行目\n二行目", "私の名前は太郎です。"]


def test_terminal_exit_command(h):
    assert run_keys(h, "こんにちは\r/exit\rまだ\r") == 0
    assert [text for speaker, text in h.turns() if speaker == USER] == ["こんにちは"]


def test_terminal_ctrl_d_on_a_typed_line_does_not_quit(h):
    assert run_keys(h, "abc\x04\r\x04") == 0  # Ctrl-D deletes forward here, it does not quit
    assert [text for speaker, text in h.turns() if speaker == USER] == ["abc"]


def test_ctrl_c_at_an_empty_prompt_says_how_to_quit(h):
    assert run_keys(h, "abc\x03\x03\x04") == 0
    assert h.notices == ["(Ctrl-D or /exit to quit)"]  # only once: the first Ctrl-C cleared a typed line


@pytest.mark.parametrize(
    ("data", "lines", "text"),
    [(b"abc", [], "abc"), ("どこで生".encode(), [], "どこで生"), (b"ab\x7fc", [], "ac"),
     (b"\x1b[Ax\x1b[1;5Cy\x1bOP", [], "xy"), (b"one\rtwo\r", ["one", "two"], ""), (b"/stats\r/show\rab", ["/stats", "/show"], "ab"),
     (b"\r \rx", [], "x"), (b"a\x1b\rb\rc", ["a\nb"], "c"), (b"\x07\x00a\t", [], "a\t"), ("日本".encode()[:-1], [], "日")],
)  # fmt: skip
def test_typed_ahead_bytes_become_lines_to_send_and_the_next_prompts_text(data, lines, text):
    """Enter ends a line to send (Esc Enter a new line within it, blank lines dropped); the rest waits in the prompt."""
    assert terminal._typed_ahead(data) == (lines, text)


def test_terminal_ctrl_c_outside_generation_returns_to_the_prompt(h):
    class SlowDisk:
        """A log whose first write is cut short by Ctrl-C (SIGINT arriving outside generation)."""

        calls = 0

        def turn(self, *args):
            self.calls += 1
            if self.calls == 1:
                raise KeyboardInterrupt

        def append(self, record):
            pass

    h.chat.log = SlowDisk()
    assert run_keys(h, "一\r二\r\x04") == 0
    assert "interrupted" in h.notices
    assert h.turns()[-2:] == [(USER, "二"), (SYSTEM, "こんにちは、太郎さん。")]


def test_history_indents_the_continuation_lines_of_a_turn(h):
    h.send("一行目\n二行目")
    h.notices.clear()
    h.send("/history")
    assert h.notices[0] == "ユーザー: 一行目\n          二行目"


def test_surrounding_spaces_are_trimmed_as_ask_trims_them(tokenizer):
    """"  世界で一番高い山は?" went to the model with its spaces (another prompt than ask's: a wrong answer); " /history"
    was sent as a message."""
    h = Harness(tokenizer, ["エベレストです。"])
    h.send("  世界で一番高い山は?  ")
    assert h.engine.prompt_text() == "ユーザー: 世界で一番高い山は?<NL>システム: "
    h.notices.clear()
    h.send(" /history")
    assert len(h.engine.prompts) == 1 and h.notices and h.notices[0].startswith("ユーザー")
