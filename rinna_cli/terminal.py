"""The chat on a terminal: prompt_toolkit's prompt and history, keys held back while a reply streams.

:func:`run_terminal` drives a :class:`~rinna_cli.repl.Chat`; keys typed during a reply are
not echoed into it (the terminal's echo is off): the lines Enter ended are sent when it is done, as if typed then,
and the line in progress comes back in the next prompt.
"""

from __future__ import annotations

import datetime
import os
import re
import select
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

from rich.cells import cell_len

from rinna_cli import commands
from rinna_cli.environment import Environment
from rinna_cli.prompt import SYSTEM, USER
from rinna_cli.render import escape_controls
from rinna_cli.repl import Chat


def _history(path: Path, warn: Callable[[str], None]):
    """prompt_toolkit's file history, each entry appended with one ``write``; a failing disk warns once."""
    from prompt_toolkit.history import FileHistory

    class History(FileHistory):
        failed = False

        def append_string(self, string: str) -> None:
            """Only what could be sent again: not a blank line, nor one refused as not UTF-8 (it was stored as ???)."""
            try:
                string.encode("utf-8")
            except UnicodeEncodeError:
                return
            if string.strip():
                super().append_string(string)

        def store_string(self, string: str) -> None:
            entry = f"\n# {datetime.datetime.now()}\n" + "".join(f"+{line}\n" for line in string.split("\n"))
            try:
                fd = os.open(self.filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, entry.encode("utf-8", errors="replace"))
                finally:
                    os.close(fd)
            except OSError as err:
                if not self.failed:
                    self.failed = True
                    warn(f"cannot write the input history {os.fsdecode(self.filename)} ({err.strerror or err})")

    return History(str(path))


# What typed-ahead keys may bring besides text: escape sequences (arrows, function keys) and controls.
_KEY_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|O.|.)?")
_ALT_ENTER = "\x1e"  # Esc Enter (a new line within a message) while the escapes are taken out


def _typed_ahead(data: bytes) -> tuple[list[str], str]:
    """What typed-ahead bytes spell: the lines Enter ended, to be sent in order as if typed at the prompt (Esc
    Enter a new line within one; blank ones dropped), and the line still being typed, for the next prompt.
    Backspace applied, other keys dropped."""
    typed = data.decode("utf-8", "ignore").replace("\x1b\r", _ALT_ENTER).replace("\x1b\n", _ALT_ENTER)
    lines: list[str] = []
    line: list[str] = []
    for char in _KEY_ESCAPE.sub("", typed):
        if char in "\x7f\b":
            if line:
                line.pop()
        elif char in "\r\n":
            if "".join(line).strip():
                lines.append("".join(line))
            line = []
        elif char == _ALT_ENTER:
            line.append("\n")
        elif escape_controls(char) == char:
            line.append(char)
    return lines, "".join(line)


@contextmanager
def _keys_held(stdin: TextIO | None) -> Iterator[list[tuple[list[str], str]]]:
    """While a reply streams the terminal neither echoes keys nor waits for Enter (Ctrl-C still
    signals); what was typed meanwhile is read back at the end into the yielded list (:func:`_typed_ahead`)."""
    typed: list[tuple[list[str], str]] = []
    try:
        import termios

        fd = stdin.fileno() if stdin is not None else -1
        saved = termios.tcgetattr(fd)
    except Exception:  # no terminal here: tests, a closed stdin, Windows (no termios)
        yield typed
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    quiet[3] |= termios.NOFLSH  # Ctrl-C keeps what was typed before it
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield typed
    finally:
        data = b""
        try:
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        termios.tcsetattr(fd, termios.TCSANOW, saved)
        typed.append(_typed_ahead(data))


QUIT_HINT = "(Ctrl-D or /exit to quit)"


def show_last_exchange(chat: Chat) -> None:
    """The last message and its reply, as they were shown (a resumed chat on a terminal)."""
    turns = chat.conversation.turns
    users = [i for i, turn in enumerate(turns) if turn.speaker == USER]
    for turn in turns[users[-1] :] if users else turns[-1:]:
        chat.view.label(turn.speaker, style="bold green" if turn.speaker == USER else "bold cyan")
        chat.view.write(turn.text)
        chat.view.end("interrupted" if turn.interrupted else None, gap=turn.speaker == SYSTEM)


def run_terminal(chat: Chat, history_file: Path | None, env: Environment) -> int:
    """The interactive prompt: Enter sends, Alt+Enter adds a line, Tab completes a command, Ctrl-C clears, Ctrl-D quits."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output import create_output

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    history = _history(history_file, env.warn) if history_file else InMemoryHistory()
    # With stdout redirected (`rinna chat > chat.txt`) the prompt is drawn on the terminal's
    # stderr; by default prompt_toolkit would draw it, escapes and all, into the file.
    output = create_output(always_prefer_tty=True) if not env.stdout_isatty and env.stderr_isatty else None
    session: PromptSession[str] = PromptSession(
        history=history,
        key_bindings=bindings,
        enable_open_in_editor=False,
        enable_suspend=True,  # Ctrl-Z suspends, as in bash; it put a literal ^Z into the message
        output=output,
        completer=WordCompleter(commands.names(), sentence=True),
        complete_while_typing=False,
    )
    label = f"{USER}: "
    typed = ""  # typed during a reply: the line in progress, for the next prompt
    queued: list[str] = []  # and the lines Enter ended then
    while True:
        if queued:  # sent as if typed at the prompt, one after another
            line = queued.pop(0)
            chat.view.label(USER, style="bold green")
            chat.view.write(line)
            chat.view.end(None, gap=False)
            session.history.append_string(line)
        else:
            try:
                line = session.prompt(
                    [("bold fg:ansigreen", label)], prompt_continuation=" " * cell_len(label), default=typed
                )
                typed = ""
            except KeyboardInterrupt:
                typed = ""
                if not session.default_buffer.text:
                    chat.notice(QUIT_HINT)
                continue
            except EOFError:
                return 0
        try:
            with _keys_held(env.stdin) as held:
                if not chat.handle(line):
                    return 0
        except KeyboardInterrupt:
            # Ctrl-C outside generation (while the prompt was being built or saved): back to the prompt.
            chat.notice("interrupted")
        if held:  # typed after what came back earlier: it goes on the line in progress
            lines, partial = held[-1]
            if lines:
                lines[0], typed = typed + lines[0], partial
            else:
                typed += partial
            queued.extend(lines)
