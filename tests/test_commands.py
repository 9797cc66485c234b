"""The chat's slash-command parser: every command, its arguments, and never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rinna_cli.commands import ALIASES, COMMANDS, Command, Invalid, Message, help_text, parse

NO_ARGUMENT = ["help", "reset", "undo", "retry", "history", "show", "stats", "exit"]


@pytest.mark.parametrize("name", NO_ARGUMENT)
def test_commands_without_arguments(name):
    assert parse(f"/{name}") == Command(name)


@pytest.mark.parametrize("name", NO_ARGUMENT)
def test_commands_without_arguments_refuse_one(name):
    parsed = parse(f"/{name} extra")
    assert isinstance(parsed, Invalid)
    assert f"/{name}" in parsed.hint and "no arguments" in parsed.hint


@pytest.mark.parametrize("name", NO_ARGUMENT)
def test_trailing_spaces_and_case_are_ignored(name):
    assert parse(f"/{name.upper()}   ") == Command(name)


@pytest.mark.parametrize(("alias", "name"), [("clear", "reset"), ("quit", "exit"), ("bye", "exit"), ("?", "help")])
def test_aliases(alias, name):
    assert parse(f"/{alias}") == Command(name)


def test_every_alias_points_at_a_command():
    assert set(ALIASES.values()) <= set(COMMANDS)


def test_save_with_and_without_a_path():
    assert parse("/save") == Command("save")
    assert parse("/save  ") == Command("save")
    assert parse("/save chat.json") == Command("save", ("chat.json",))
    assert parse("/save  my chats/会話 1.json ") == Command("save", ("my chats/会話 1.json",))
    # quoted by a shell user's habit: the path inside the quotes
    assert parse('/save "my chats/会話 1.json"') == Command("save", ("my chats/会話 1.json",))
    assert parse("/save! 'a b.json'") == Command("save", ("a b.json",), True)
    assert parse("/load 'a b.json'") == Command("load", ("a b.json",))
    assert parse("/save \"a'") == Command("save", ("\"a'",))  # not a pair of quotes: as typed


def test_load_needs_a_path():
    assert parse("/load chat.json") == Command("load", ("chat.json",))
    assert parse("/load ~/会話.json") == Command("load", ("~/会話.json",))
    for line in ("/load", "/load   "):
        parsed = parse(line)
        assert isinstance(parsed, Invalid) and "usage: /load PATH" in parsed.hint


def test_set_takes_a_key_and_a_value():
    assert parse("/set temperature 0.5") == Command("set", ("temperature", "0.5"))
    assert parse("/set  max_new_tokens   64 ") == Command("set", ("max_new_tokens", "64"))
    assert parse("/set Seed 42") == Command("set", ("seed", "42"))


@pytest.mark.parametrize(
    ("line", "key"),
    [("/set top-p 0.9", "top_p"), ("/set top-k 10", "top_k"), ("/set repetition-penalty 1.1", "repetition_penalty"),
     ("/set MAX-NEW-TOKENS 5", "max_new_tokens")],
)  # fmt: skip
def test_set_normalises_dashes_and_case_in_the_key(line, key):
    parsed = parse(line)
    assert isinstance(parsed, Command) and parsed.args[0] == key


@pytest.mark.parametrize("line", ["/set", "/set temperature", "/set temperature   ", "/set  "])
def test_set_without_key_or_value_is_a_usage_hint(line):
    parsed = parse(line)
    assert isinstance(parsed, Invalid)
    assert "usage: /set KEY VALUE" in parsed.hint


def test_set_keeps_an_unknown_key_for_the_chat_to_reject():
    # The parser is syntax only; which keys and values are allowed is the chat's (and config's) business.
    assert parse("/set colour blue") == Command("set", ("colour", "blue"))


def test_double_slash_sends_a_leading_slash():
    assert parse("//text") == Message("/text")
    assert parse("//help") == Message("/help")
    assert parse("//") == Message("/")


@pytest.mark.parametrize("line", ["/frobnicate", "/hlep", "/", "/ help", "/set_temperature 1"])
def test_unknown_command_is_invalid_with_a_hint(line):
    parsed = parse(line)
    assert isinstance(parsed, Invalid)
    assert "/help" in parsed.hint and "//" in parsed.hint


@pytest.mark.parametrize(
    "line",
    ["こんにちは", "", "   ", "a/b", " /help", "日本の/おすすめ", "一行目\n二行目", "text /help"],
)
def test_plain_text_is_a_message(line):
    assert parse(line) == Message(line)


def test_multi_line_command_like_paste_is_not_a_command():
    parsed = parse("/usr/bin/python\nis missing")
    assert isinstance(parsed, Invalid)


def test_help_lists_every_command():
    text = help_text()
    for name in COMMANDS:
        assert f"/{name}" in text
    assert "/clear" in text and "/quit" in text
    assert "Alt+Enter" in text


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_parse_never_raises(line):
    parsed = parse(line)
    assert isinstance(parsed, (Message, Command, Invalid))
    if isinstance(parsed, Command):
        assert parsed.name in COMMANDS
        assert all(isinstance(arg, str) and arg for arg in parsed.args)
    if isinstance(parsed, Message):
        assert parsed.text in (line, line[1:])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(COMMANDS) + sorted(ALIASES)), st.text(alphabet=st.characters(blacklist_categories=["Cs"])))
def test_parse_never_raises_after_a_command_name(name, rest):
    parsed = parse(f"/{name} {rest}")
    assert isinstance(parsed, (Command, Invalid))
