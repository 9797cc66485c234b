"""Terminal output: Rich on a TTY, the exact text on a pipe.

Model text is data. On a terminal it is never parsed as Rich markup and its
control characters (ANSI/OSC escapes, carriage returns, bidi overrides) are
shown escaped, so a reply cannot restyle, retitle or rewrite the screen. On a
pipe the reply passes through byte for byte.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import TextIO

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

# C0 controls but tab and newline, DEL, C1 controls, and the bidi embeddings/overrides/isolates.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\r": "\\r", "\x1b": "\\e", "\x08": "\\b", "\x0c": "\\f", "\x0b": "\\v", "\x00": "\\0"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written visibly (``\\e``, ``\\x9b``, ``\\u202e``)."""

    def visible(match: re.Match) -> str:
        char = match.group()
        if char in _NAMED:
            return _NAMED[char]
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(visible, text)


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def err_console(file: TextIO | None = None) -> Console:
    """Rich console on ``file`` (stderr by default), for progress, statistics and messages."""
    return Console(file=file, stderr=file is None, highlight=False)


def warn(message: str, file: TextIO | None = None) -> None:
    """The one way a warning is shown: ``rinna: warning: …`` on stderr (yellow on a terminal)."""
    err_console(file).print(f"rinna: warning: {message}", markup=False, highlight=False, soft_wrap=True, style="yellow")


class _Spinner:
    """A dim braille spinner after the cursor while the first token is awaited (a terminal only)."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # one cell wide everywhere (not East Asian ambiguous)

    def __init__(self, file: TextIO):
        self.file = file
        self.stopped = threading.Event()
        self._draw(self.FRAMES[0])  # drawn at once: even a quick first token replaces a visible frame
        self.thread = threading.Thread(target=self._spin, name="rinna-spinner", daemon=True)
        self.thread.start()

    def _draw(self, frame: str) -> None:
        self.file.write(f"\x1b[2m{frame}\x1b[22m\b")
        self.file.flush()

    def _spin(self) -> None:
        index = 0
        while not self.stopped.wait(0.1):
            index += 1
            self._draw(self.FRAMES[index % len(self.FRAMES)])

    def stop(self) -> None:
        """Stop and erase the frame; the cursor stays where the text goes on."""
        self.stopped.set()
        self.thread.join()
        self.file.write("\x1b[K")


class ReplyView:
    """Streams one reply at a time to ``file``: styled and escaped on a TTY, verbatim on a pipe.

    On a TTY a reply after a :meth:`label` shows a spinner until its first text, and its
    continuation lines are indented under the label's end, so turns are easy to tell apart.
    """

    def __init__(self, file: TextIO | None = None, tty: bool | None = None):
        self.file = file or sys.stdout
        self.tty = is_tty(self.file) if tty is None else tty
        self.console = Console(file=self.file, highlight=False, markup=False, emoji=False) if self.tty else None
        self._indent = ""
        self._line_start = False  # the last text shown ended a line (its indent is written with the next text)
        self._shown = False  # text of the current reply was shown
        self._spinner: _Spinner | None = None

    def label(self, speaker: str, style: str = "bold cyan", waiting: bool = False) -> None:
        """A speaker label before a turn (terminal only); ``waiting``: a spinner until its first text."""
        self._shown = self._line_start = False
        if self.console:
            self.console.print(Text(f"{speaker}: ", style=style), end="")
            self._indent = " " * cell_len(f"{speaker}: ")
            if waiting and self.console.is_terminal:  # cursor movement needs a real terminal
                self._spinner = _Spinner(self.file)

    def _stop_spinner(self) -> None:
        if self._spinner:
            self._spinner.stop()
            self._spinner = None

    def write(self, chunk: str) -> None:
        """One streamed chunk of model text, written as it comes (no re-render of the reply).

        Plain text needs none of Rich's layout, so each chunk costs one write and one flush;
        on a terminal it is escaped first, so it can neither carry markup nor control codes.
        """
        if not chunk:
            return
        self._stop_spinner()
        self._shown = True
        if not self.tty:
            self.file.write(chunk)
            self.file.flush()
            return
        out = []
        for index, line in enumerate(escape_controls(chunk).split("\n")):
            if index:
                out.append("\n")
                self._line_start = True
            if line:
                if self._line_start:
                    out.append(self._indent)
                    self._line_start = False
                out.append(line)
        self.file.write("".join(out))
        self.file.flush()

    def end(self, note: str | None = None, gap: bool = False) -> None:
        """Finish the reply with one newline; ``note`` (e.g. "interrupted") is shown dimmed on a TTY.

        ``gap``: a blank line follows on a TTY (between the turns of a chat).
        """
        self._stop_spinner()
        if self.console:
            if note:
                lead = self._indent if self._line_start else " " if self._shown else ""
                self.console.print(Text(f"{lead}[{note}]", style="dim italic"), end="")
                self._line_start = False
            if not self._line_start:
                self.console.print()
            if gap:
                self.console.print()
        else:
            self.file.write("\n")
        self.file.flush()

    def abandon(self) -> None:
        """The reply failed: its label is erased if nothing was shown yet, else the line ends marked [failed]."""
        if self.console and not self._shown:
            self._stop_spinner()
            self.file.write("\r\x1b[2K")
            self.file.flush()
        elif self._shown:
            self.end("failed")
