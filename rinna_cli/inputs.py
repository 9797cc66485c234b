"""Reading the user's text: arguments and standard input, bounded and strictly UTF-8.

Python hands bytes that are not UTF-8 in ``argv`` (and the environment) over as lone
surrogates (``surrogateescape``); :func:`check_text` refuses them before they reach
sentencepiece or a terminal, with the same message as standard input gets.
"""

from __future__ import annotations

import codecs
import sys
from typing import BinaryIO

from rinna_cli.errors import UsageError

_ICONV_HINT = "convert it first, e.g. `iconv -f SHIFT_JIS -t UTF-8`"
# Byte order marks of encodings that are not UTF-8, longest first (a UTF-32LE mark starts like UTF-16LE's).
_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_SHOWN_CHARS = 40  # of an argument quoted in a refusal


class InputTooLong(UsageError):
    """Standard input holds more than the limit; ``limit`` is in bytes (the caller may say what fits)."""

    def __init__(self, limit: int):
        super().__init__(
            f"standard input is over {limit:,} bytes, more than the model's context window can hold; "
            "pass a shorter text"
        )
        self.limit = limit


def decode(data: bytes, what: str = "standard input", shown: str = "") -> str:
    """``data`` as text: strictly UTF-8, a leading UTF-8 byte order mark dropped.

    The refusal names ``what``, the first bad byte and an ``iconv`` hint: for UTF-16 (or
    UTF-32) with its byte order mark, that encoding; else Shift_JIS, the common case.
    ``shown``: the value quoted in the message (an argument), after the offset.
    """
    skipped = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    for mark, encoding in _OTHER_BOMS:
        if data.startswith(mark):
            raise UsageError(f"{what} is {encoding}, not UTF-8; convert it first, e.g. `iconv -f {encoding} -t UTF-8`")
    try:
        return data[skipped:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skipped + err.start
        quoted = f" of {shown}" if shown else ""
        raise UsageError(
            f"{what} is not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}{quoted}); {_ICONV_HINT}"
        ) from None


def dropped_mark(value: object) -> object:
    """An argument without a leading byte order mark (``"$(cat notepad.txt)"``), as :func:`decode` drops it from
    bytes; any other value as it is."""
    return value.removeprefix("\ufeff") if isinstance(value, str) else value


def raw_bytes(text: str) -> bytes:
    """The bytes ``text`` was decoded from, lone surrogates (bytes that were not UTF-8) back as they were."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoding made (a JSON "\ud800"): its own bytes, still not UTF-8
        return text.encode("utf-8", "surrogatepass")


def escaped(text: str) -> str:
    """``text`` safe to print: bytes that were not UTF-8 written as ``\\x80`` escapes (the rest unchanged)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return raw_bytes(text).decode("utf-8", "backslashreplace")
    return text


def check_text(what: str, text: str) -> None:
    """Refuses ``text`` (an argument, an environment value) if it came from bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = escaped(text)
        shown = shown if len(shown) <= _SHOWN_CHARS else shown[:_SHOWN_CHARS] + "…"
        decode(raw_bytes(text), what, f"'{shown}'")


def read_stdin(limit: int, stream: BinaryIO | None = None) -> str:
    """Standard input as text (see :func:`decode`); more than ``limit`` bytes raise :class:`InputTooLong`.

    Only ``limit + 1`` bytes are ever read, so a huge pipe costs no memory.
    """
    if stream is None:
        if sys.stdin is None:  # standard input closed (``<&-``): nothing to read
            return ""
        stream = sys.stdin.buffer
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise InputTooLong(limit)
    return decode(data)


def compose_question(argument: str | None, piped: str | None) -> str:
    """The question: the argument, the piped text, or both as "argument, blank line, piped text".

    Surrounding whitespace is dropped (``echo`` adds a newline); inner newlines stay.
    """
    parts = [part.strip() for part in (argument, piped) if part is not None]
    question = "\n\n".join(part for part in parts if part)
    if not question:
        raise UsageError("the question is empty; pass it as an argument or on standard input")
    return question
