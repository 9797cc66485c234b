"""Reading the user's text: arguments and standard input, bounded and strictly UTF-8."""

from __future__ import annotations

import sys
from typing import BinaryIO

from rinna_cli.errors import UsageError


def read_stdin(limit: int, stream: BinaryIO | None = None) -> str:
    """Standard input as text; refuses more than ``limit`` bytes and bytes that are not UTF-8.

    Only ``limit + 1`` bytes are ever read, so a huge pipe costs no memory.
    """
    if stream is None:
        if sys.stdin is None:  # standard input closed (``<&-``): nothing to read
            return ""
        stream = sys.stdin.buffer
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UsageError(
            f"standard input is over {limit:,} bytes, more than the model's context window can hold; "
            "pass a shorter text"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"standard input is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "convert it first, e.g. `iconv -f SHIFT_JIS -t UTF-8`"
        ) from None


def compose_question(argument: str | None, piped: str | None) -> str:
    """The question: the argument, the piped text, or both as "argument, blank line, piped text".

    Surrounding whitespace is dropped (``echo`` adds a newline); inner newlines stay.
    """
    parts = [part.strip() for part in (argument, piped) if part is not None]
    question = "\n\n".join(part for part in parts if part)
    if not question:
        raise UsageError("the question is empty; pass it as an argument or on standard input")
    return question
