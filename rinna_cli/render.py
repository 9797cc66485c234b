"""Terminal output: Rich on a TTY, the exact text on a pipe.

Model text is data. On a terminal it is never parsed as Rich markup and its
control characters (ANSI/OSC escapes, carriage returns, bidi overrides) are
shown escaped, so a reply cannot restyle, retitle or rewrite the screen. On a
pipe the reply passes through byte for byte.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

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


def err_console() -> Console:
    """Rich console on stderr, for progress, statistics and messages."""
    return Console(stderr=True, highlight=False)


class ReplyView:
    """Streams one reply at a time to ``file``: styled and escaped on a TTY, verbatim on a pipe."""

    def __init__(self, file: TextIO | None = None, tty: bool | None = None):
        self.file = file or sys.stdout
        self.tty = is_tty(self.file) if tty is None else tty
        self.console = Console(file=self.file, highlight=False, markup=False, emoji=False) if self.tty else None

    def label(self, speaker: str, style: str = "bold cyan") -> None:
        """A speaker label before a reply (terminal only)."""
        if self.console:
            self.console.print(Text(f"{speaker}: ", style=style), end="")

    def write(self, chunk: str) -> None:
        """One streamed chunk of model text, written as it comes (no re-render of the reply).

        Plain text needs none of Rich's layout, so each chunk costs one write and one flush;
        on a terminal it is escaped first, so it can neither carry markup nor control codes.
        """
        if not chunk:
            return
        self.file.write(escape_controls(chunk) if self.tty else chunk)
        self.file.flush()

    def end(self, note: str | None = None) -> None:
        """Finish the reply with one newline; ``note`` (e.g. "interrupted") is shown dimmed on a TTY."""
        if self.console:
            if note:
                self.console.print(Text(f" [{note}]", style="dim italic"), end="")
            self.console.print()
        else:
            self.file.write("\n")
        self.file.flush()
