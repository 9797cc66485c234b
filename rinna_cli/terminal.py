"""The chat on a terminal: prompt_toolkit's prompt and history, keys held back while a reply streams.

:func:`run_terminal` drives a :class:`~rinna_cli.repl.Chat`; keys typed during a reply are
not echoed into it (the terminal's echo is off) and come back in the next prompt.
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


def _typed_text(data: bytes) -> str:
    """The text that typed-ahead bytes spell: Backspace applied, Enter a newline, other keys dropped."""
    text: list[str] = []
    for char in _KEY_ESCAPE.sub("", data.decode("utf-8", "ignore")).replace("\r", "\n"):
        if char in "\x7f\b":
            if text:
                text.pop()
        elif char == "\n" or escape_controls(char) == char:
            text.append(char)
    return "".join(text).strip("\n")


@contextmanager
def _keys_held(stdin: TextIO | None) -> Iterator[list[str]]:
    """While a reply streams the terminal neither echoes keys nor waits for Enter (Ctrl-C still
    signals); what was typed meanwhile is read back at the end into the yielded list."""
    typed: list[str] = []
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
        typed.append(_typed_text(data))


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
        output=output,
        completer=WordCompleter(commands.names(), sentence=True),
        complete_while_typing=False,
    )
    label = f"{USER}: "
    typed = ""
    while True:
        try:
            line = session.prompt(
                [("bold fg:ansigreen", label)], prompt_continuation=" " * cell_len(label), default=typed
            )
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
        typed = held[-1] if held else ""
