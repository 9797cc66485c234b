"""render: model text is data -- shown escaped and unstyled on a terminal, byte-exact on a pipe."""

from __future__ import annotations

import io

import pytest

from rinna_cli.render import ReplyView, escape_controls, is_tty

MARKUP = ["[bold red]x[/]", "[link=http://e.vil]y[/link]", ":smile: [/] [b]", "\\[not] [u]"]
# What a hostile reply could try on a terminal, and how it must be shown instead.
CONTROLS = {
    "\x1b]0;pwned\x07": "\\e]0;pwned\\x07",  # OSC: retitle the window
    "\x1b[2J": "\\e[2J",  # CSI: clear the screen
    "abc\rxyz": "abc\\rxyz",  # carriage return: overwrite the line
    "\u202eevil": "\\u202eevil",  # right-to-left override
    "\x9b31m": "\\x9b31m",  # C1 CSI, a one-byte ESC [
    "\x85\x8d\x90\x9d\x9f": "\\x85\\x8d\\x90\\x9d\\x9f",  # more C1: NEL, RI, DCS, OSC, APC
    "a\x08b\x7fc": "a\\bb\\x7fc",  # backspace, DEL
    "\x00\x0b\x0c": "\\0\\v\\f",
    "\u200e\u200f\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069": (
        "\\u200e\\u200f\\u202a\\u202b\\u202c\\u202d\\u2066\\u2067\\u2068\\u2069"
    ),
}
RAW = ("\x1b", "\x07", "\r", "\u202e", "\x9b", "\x08", "\x7f", "\x00")


# --- escape_controls ------------------------------------------------------------


@pytest.mark.parametrize("text, shown", CONTROLS.items())
def test_escape_controls(text, shown):
    assert escape_controls(text) == shown


def test_escape_controls_keeps_ordinary_text():
    text = "吾輩は  猫である。\n名前は\tまだ無い。🍣𠮷 [bold]x[/] <NL> ← 日本語 ﾊﾝｶｸ é"
    assert escape_controls(text) == text


@pytest.mark.parametrize("code", [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)])
def test_escape_controls_escapes_every_c0_and_c1_control(code):
    shown = escape_controls(f"a{chr(code)}b")
    assert shown.startswith("a\\") and shown.endswith("b")
    assert not any(0 <= ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in shown)


def test_escape_controls_is_printable_ascii_for_every_control():
    for code in [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]:
        if chr(code) in "\t\n":
            continue
        shown = escape_controls(chr(code))
        assert shown.isascii() and shown.isprintable() and shown.startswith("\\"), (hex(code), shown)


# --- ReplyView on a terminal -----------------------------------------------------


def terminal_view() -> tuple[ReplyView, io.StringIO]:
    out = io.StringIO()
    return ReplyView(out, tty=True), out


@pytest.mark.parametrize("chunk", MARKUP)
def test_tty_shows_markup_literally(chunk):
    view, out = terminal_view()
    view.write(chunk)
    view.end()
    assert out.getvalue() == chunk + "\n"


@pytest.mark.parametrize("chunk, shown", CONTROLS.items())
def test_tty_shows_controls_escaped(chunk, shown):
    view, out = terminal_view()
    view.write(chunk)
    view.end()
    text = out.getvalue()
    assert text == shown + "\n"
    assert not any(raw in text for raw in RAW)


def test_tty_escape_split_over_chunks_stays_escaped():
    view, out = terminal_view()
    for chunk in ["\x1b", "]0;pw", "ned\x07", "[bold]", "x", "\r", "\u202e", "[/bold]"]:
        view.write(chunk)
    view.end("interrupted")
    text = out.getvalue()
    assert text == "\\e]0;pwned\\x07[bold]x\\r\\u202e[/bold] [interrupted]\n"


def test_tty_keeps_japanese_newlines_and_byte_fallback_characters():
    view, out = terminal_view()
    for chunk in ["お寿司🍣が", "大好きです。\n", "𠮷野家"]:
        view.write(chunk)
    view.end()
    assert out.getvalue() == "お寿司🍣が大好きです。\n𠮷野家\n"


def test_tty_label_is_plain_text_not_markup():
    view, out = terminal_view()
    view.label("[red]システム[/red]")
    view.write("はい")
    view.end()
    assert out.getvalue() == "[red]システム[/red]: はい\n"


def test_tty_real_terminal_console_still_escapes():
    """With Rich believing it drives a real terminal (colours on), model text is still not styled."""
    from rich.console import Console

    out = io.StringIO()
    view = ReplyView(out, tty=True)
    view.console = Console(file=out, force_terminal=True, highlight=False, markup=False, emoji=False, width=120)
    view.write("[bold red]x[/] \x1b[31mred\x1b[0m :smile:")
    text = out.getvalue()
    assert "[bold red]x[/]" in text and ":smile:" in text
    assert "\\e[31mred\\e[0m" in text
    assert "\x1b[31m" not in text and "\x1b[1m" not in text  # no colour from the model's text


# --- ReplyView on a pipe ---------------------------------------------------------


def test_pipe_writes_the_text_byte_exact():
    chunks = [*MARKUP, *CONTROLS, "お寿司🍣", "\n", "𠮷", "\t", ""]
    out = io.StringIO()
    view = ReplyView(out, tty=False)
    for chunk in chunks:
        view.write(chunk)
    view.end("interrupted")  # the note is for terminals only
    assert out.getvalue() == "".join(chunks) + "\n"


def test_pipe_view_has_no_console_and_label_prints_nothing():
    out = io.StringIO()
    view = ReplyView(out, tty=False)
    assert view.console is None
    view.label("システム")
    view.end()
    assert out.getvalue() == "\n"


def test_view_detects_a_pipe_by_default():
    out = io.StringIO()
    assert ReplyView(out).tty is False
    assert is_tty(out) is False


def test_is_tty_tolerates_closed_and_missing_streams():
    closed = io.StringIO()
    closed.close()
    assert is_tty(closed) is False
    assert is_tty(None) is False


def test_write_flushes_each_chunk():
    class Recorder(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1
            super().flush()

    out = Recorder()
    view = ReplyView(out, tty=False)
    view.write("あ")
    assert out.flushes >= 1 and out.getvalue() == "あ"
    view.write("")
    view.write("い")
    assert out.getvalue() == "あい"


# --- a chat's turns on a terminal ------------------------------------------------


def test_tty_continuation_lines_are_indented_under_the_label():
    view, out = terminal_view()
    view.label("システム")
    for chunk in ("吾輩は  猫である。\n名前は", "まだ無い。\n", "\nどこで"):
        view.write(chunk)
    view.end(gap=True)
    # "システム: " is ten cells wide; a blank line inside the reply gets no trailing spaces.
    assert out.getvalue() == "システム: 吾輩は  猫である。\n          名前はまだ無い。\n\n          どこで\n\n"


def test_pipe_reply_is_never_indented_nor_gapped():
    out = io.StringIO()
    view = ReplyView(out, tty=False)
    view.label("システム")
    view.write("一\n二")
    view.end(gap=True)
    assert out.getvalue() == "一\n二\n"


@pytest.mark.parametrize(
    ("chunks", "shown"),
    [(["一二三"], "システム: 一二三 [interrupted]\n"), (["一\n"], "システム: 一\n          [interrupted]\n"),
     ([], "システム: [interrupted]\n")],
)  # fmt: skip
def test_tty_interrupted_mark_sits_clean(chunks, shown):
    view, out = terminal_view()
    view.label("システム")
    for chunk in chunks:
        view.write(chunk)
    view.end("interrupted")
    assert out.getvalue() == shown


def test_tty_abandon_erases_an_empty_reply_and_marks_a_partial_one():
    view, out = terminal_view()
    view.label("システム")
    view.abandon()
    assert out.getvalue() == "システム: \r\x1b[2K"
    view, out = terminal_view()
    view.label("システム")
    view.write("途中")
    view.abandon()
    assert out.getvalue() == "システム: 途中 [failed]\n"


def test_spinner_waits_for_the_first_token_on_a_real_terminal():
    import time

    from rich.console import Console

    out = io.StringIO()
    view = ReplyView(out, tty=True)
    view.console = Console(file=out, force_terminal=True, highlight=False, markup=False, emoji=False, width=120)
    view.label("システム", style="", waiting=True)
    time.sleep(0.35)
    view.write("はい")
    view.end()
    text = out.getvalue()
    frames = text[text.index("システム: ") + len("システム: ") : text.index("はい")]
    assert frames.startswith("\x1b[2m⠋\x1b[22m\b\x1b[2m⠙\x1b[22m\b")  # drawn at once, then turning
    assert frames.endswith("\b\x1b[K")  # erased before the text
    assert not view._spinner  # stopped with the first text


def test_no_spinner_unless_waiting_or_on_a_pipe():
    view, out = terminal_view()
    view.label("ユーザー")
    assert view._spinner is None
    view.label("システム", waiting=True)  # StringIO: Rich knows it is no terminal
    assert view._spinner is None
