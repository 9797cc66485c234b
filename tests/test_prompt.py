"""The model card's prompt format ("I/O Format"), byte for byte."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rinna_cli.prompt import (
    NL,
    SYSTEM,
    USER,
    decode_newlines,
    encode_newlines,
    format_prompt,
    reply_prefix,
    utterance,
)

CARD_TURNS = [
    ("ユーザー", "日本のおすすめの観光地を教えてください。"),
    ("システム", "どの地域の観光地が知りたいですか?"),
    ("ユーザー", "渋谷の観光地を教えてください。"),
]
# Copied from the model card's `print(prompt)` output.
CARD_PROMPT = (
    "ユーザー: 日本のおすすめの観光地を教えてください。<NL>システム: どの地域の観光地が知りたいですか?"
    "<NL>ユーザー: 渋谷の観光地を教えてください。<NL>システム: "
)
END = "<NL>システム: "


def card_recipe(turns):
    """The model card's own Python, verbatim but for the input shape."""
    prompt = [{"speaker": s, "text": t} for s, t in turns]
    prompt = [f"{uttr['speaker']}: {uttr['text']}" for uttr in prompt]
    prompt = "<NL>".join(prompt)
    prompt = prompt + "<NL>" + "システム: "
    return prompt


def test_constants_are_the_cards():
    assert (USER, SYSTEM, NL) == ("ユーザー", "システム", "<NL>")
    assert reply_prefix() == "システム: "


def test_card_example_byte_for_byte():
    prompt = format_prompt(CARD_TURNS)
    assert prompt == CARD_PROMPT
    assert prompt.encode("utf-8") == CARD_PROMPT.encode("utf-8")
    assert prompt == card_recipe(CARD_TURNS)
    assert prompt.endswith("システム: ")  # the trailing space is part of the prompt
    assert prompt[-1] == " "


def test_one_turn():
    assert format_prompt([(USER, "世界で一番高い山は?")]) == "ユーザー: 世界で一番高い山は?<NL>システム: "


def test_no_turns_is_just_the_reply_prefix():
    # (the card's recipe would give "<NL>システム: " here; no leading <NL> is wanted)
    assert format_prompt([]) == "システム: "


def test_text_is_kept_verbatim_apart_from_newlines():
    text = "  前後の空白  と\t<タブ> [b]markup[/b] :: "
    assert utterance(USER, text) == f"ユーザー: {text}"
    assert format_prompt([(USER, text)]) == f"ユーザー: {text}<NL>システム: "


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("一行目\n二行目", "一行目<NL>二行目"),
        ("一行目\r\n二行目", "一行目<NL>二行目"),
        ("一行目\r二行目", "一行目<NL>二行目"),
        ("a\n\nb", "a<NL><NL>b"),
        ("a\r\n\r\nb", "a<NL><NL>b"),
        ("a\n\rb", "a<NL><NL>b"),  # LF then CR: two newlines, not one CRLF
        ("a\r\n\nb", "a<NL><NL>b"),
        ("\nstart and end\n", "<NL>start and end<NL>"),
        ("no newline", "no newline"),
        ("", ""),
    ],
)
def test_encode_newlines(raw, expected):
    assert encode_newlines(raw) == expected


def test_newlines_in_turns_become_nl():
    turns = [(USER, "1行目\n2行目\r\n3行目\r4行目"), (SYSTEM, "はい\nどうぞ")]
    assert format_prompt(turns) == "ユーザー: 1行目<NL>2行目<NL>3行目<NL>4行目<NL>システム: はい<NL>どうぞ<NL>システム: "


@pytest.mark.parametrize(
    "text, expected",
    [
        ("分かりました。<NL>1. ハチ公像です。", "分かりました。\n1. ハチ公像です。"),
        ("<NL><NL>", "\n\n"),
        ("<NL", "<NL"),
        ("NL>", "NL>"),
        ("<nl>", "<nl>"),
        ("no marker", "no marker"),
    ],
)
def test_decode_newlines(text, expected):
    assert decode_newlines(text) == expected


@pytest.mark.parametrize("speaker", ["user", "assistant", "ユーザー ", " システム", "ユーザ", "", "システム:"])
def test_unknown_speaker_raises(speaker):
    with pytest.raises(ValueError, match="unknown speaker"):
        utterance(speaker, "こんにちは")
    with pytest.raises(ValueError, match="unknown speaker"):
        format_prompt([(USER, "ok"), (speaker, "こんにちは")])


# ---- properties -------------------------------------------------------------

# Fragments that make the property interesting: newlines of every kind, the
# pieces of "<NL>" and of the speaker labels, plus arbitrary characters.
FRAGMENTS = st.sampled_from(["\n", "\r", "\r\n", "<", "NL", ">", "<NL", "NL>", "ユーザー", "システム", ":", " ", ": "])
TEXT = st.lists(st.one_of(FRAGMENTS, st.characters(blacklist_categories=("Cs",))), max_size=12).map("".join)
TURNS = st.lists(st.tuples(st.sampled_from([USER, SYSTEM]), TEXT), max_size=6)
SEPARATOR = re.compile("<NL>(?=(?:ユーザー|システム): )")


@settings(max_examples=300, deadline=None)
@given(TURNS)
def test_prompt_shape_property(turns):
    prompt = format_prompt(turns)
    assert "\n" not in prompt and "\r" not in prompt
    if turns:
        assert prompt == card_recipe([(s, encode_newlines(t)) for s, t in turns])
        assert prompt.endswith(END)
        assert prompt.startswith(f"{turns[0][0]}: ")
    else:
        assert prompt == "システム: "


def _ambiguous(text: str) -> bool:
    """Whether ``text`` (newlines as <NL>) itself holds an utterance boundary."""
    return any(f"<NL>{speaker}: " in encode_newlines(text) for speaker in (USER, SYSTEM))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([USER, SYSTEM]), TEXT.filter(lambda t: not _ambiguous(t))), min_size=1, max_size=6))
def test_prompt_splits_back_into_the_turns(turns):
    """Knowing the turn count, the prompt splits back into its utterances.

    A boundary is "<NL>" followed by "speaker: ". Texts that themselves contain
    such a boundary (after newline normalisation) are filtered out: those are
    genuinely ambiguous in the card's format. "<NL>…: " cannot overlap the
    start of a following boundary ("<" occurs only at its start), so the
    regex split is exact.
    """
    prompt = format_prompt(turns)
    body = prompt.removesuffix(END)
    assert len(body) == len(prompt) - len(END)
    parts = SEPARATOR.split(body)
    assert len(parts) == len(turns)
    for part, (speaker, text) in zip(parts, turns):
        assert part.startswith(f"{speaker}: ")
        recovered = part[len(speaker) + 2 :]
        assert recovered == encode_newlines(text)
        if NL not in text:
            # newlines come back as "\n"; CRLF and CR come back as LF
            assert decode_newlines(recovered) == text.replace("\r\n", "\n").replace("\r", "\n")


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_encode_newlines_property(text):
    encoded = encode_newlines(text)
    assert "\n" not in encoded and "\r" not in encoded
    newlines = text.count("\r\n") + (text.count("\r") - text.count("\r\n")) + (text.count("\n") - text.count("\r\n"))
    assert encoded.count(NL) == text.count(NL) + newlines
    if NL not in text:
        assert decode_newlines(encoded) == text.replace("\r\n", "\n").replace("\r", "\n")
