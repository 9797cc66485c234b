"""Incremental detokenization of a reply, character by character.

``ReplyDecoder`` turns generated ids into printable text as soon as each
character is complete, without ever showing U+FFFD for a character whose
byte-fallback pieces are still arriving, without ever showing ``</s>``, and
with the model's ``<NL>`` turned into ``"\\n"`` even when it arrives split over
several tokens. Whatever was pushed, the pieces it returns join up to exactly
``decode_newlines(tokenizer.decode(ids))`` (``ReplyDecoder.text``).

How sentencepiece decodes (0.2.x, ``DecodeInternal``): every non-byte piece
has a fixed surface (control pieces such as ``</s>`` have none); a maximal run
of byte pieces is read left to right one UTF-8 character at a time, a valid
character becoming its text and every other byte one U+FFFD. So decoding a
run splits exactly at the character boundaries of that left-to-right reading,
and the only part of a reply that later ids can still change is a trailing
run of bytes that is the unfinished start of a character. (This needs a model
without ``add_dummy_prefix``, ``remove_extra_whitespaces`` or a denormalizer,
as rinna's is: those make decoding depend on the start of the text.)

The decoder keeps the index up to which the reply is settled, decodes only
the ids from there up to such an unfinished tail, and then advances, so each
id is decoded about once: the cost is linear in the reply length.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from rinna_cli.errors import ModelError
from rinna_cli.prompt import NL, decode_newlines
from rinna_cli.tokenizer import Tokenizer


def _utf8_length(lead: int) -> int:
    """How many bytes a UTF-8 sequence starting with ``lead`` has, as sentencepiece reads it (1 if invalid)."""
    if 0xC0 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF7:
        return 4
    return 1


def _can_still_complete(data: bytes) -> bool:
    """Whether ``data``, a too-short character, is the start of some valid UTF-8 character."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _unfinished_start(data: bytes) -> int:
    """Offset of the unfinished character at the end of a byte run, ``len(data)`` if there is none.

    Reads ``data`` one character at a time as sentencepiece does: a valid
    character takes its bytes, any other byte is one U+FFFD on its own.
    """
    offset = 0
    while offset < len(data):
        size = _utf8_length(data[offset])
        chunk = data[offset : offset + size]
        if len(chunk) < size:
            if _can_still_complete(chunk):
                return offset
            size = 1
        elif size > 1:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                size = 1
        offset += size
    return offset


def _partial_nl(text: str) -> int:
    """Length of the longest end of ``text`` that could still grow into ``<NL>``."""
    for size in range(len(NL) - 1, 0, -1):
        if text.endswith(NL[:size]):
            return size
    return 0


class ReplyDecoder:
    """Printable text of a reply while its ids are generated; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        sp = tokenizer.sp
        self._byte_of: dict[int, int] = {}  # byte-fallback id -> its byte
        for value in range(256):
            pid = sp.piece_to_id(f"<0x{value:02X}>")
            if sp.is_byte(pid):
                self._byte_of[pid] = value
        self._ids: list[int] = []
        self._settled = 0  # ids[:_settled] are decoded; their text is shown or in _held
        self._held = ""  # decoded text held back because it could be the start of <NL>
        self._done = False

    @property
    def ids(self) -> list[int]:
        """The reply ids received so far, without the end-of-text id and anything after it."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """The reply so far as a whole: the tokenizer's decoding with ``<NL>`` as ``"\\n"``."""
        return decode_newlines(self._tokenizer.decode(self._ids))

    def push(self, ids: Iterable[int]) -> str:
        """Take newly generated ids; return the text that became printable (maybe ``""``).

        The end-of-text id ends the reply: everything still held back is
        returned with it, and it and any later ids are ignored.
        """
        if self._done:
            return ""
        ids = list(ids)
        eos = self._tokenizer.special.eos
        ended = eos in ids
        if ended:
            ids = ids[: ids.index(eos)]
        vocab_size = self._tokenizer.vocab_size
        for pid in ids:
            if not 0 <= pid < vocab_size:
                raise ModelError(
                    f"the model generated token id {pid}, outside the tokenizer's {vocab_size} ids; "
                    "the model and its tokenizer do not match"
                )
        self._ids.extend(ids)
        if ended:
            return self.finish()
        return self._advance(self._settled_end())

    def finish(self) -> str:
        """End of the reply: return everything not yet returned, partial characters included."""
        if self._done:
            return ""
        self._done = True
        return self._advance(len(self._ids))

    def _settled_end(self) -> int:
        """Index up to which the ids decode to text that no later id can change."""
        run = len(self._ids)
        while run > self._settled and self._ids[run - 1] in self._byte_of:
            run -= 1
        data = bytes(self._byte_of[pid] for pid in self._ids[run:])
        return run + _unfinished_start(data)

    def _advance(self, end: int) -> str:
        """Decode ``ids[settled:end]`` and return what of it (and of the held text) is printable."""
        text = self._held + self._tokenizer.decode(self._ids[self._settled : end])
        self._settled = end
        keep = 0 if self._done else _partial_nl(text)
        self._held = text[len(text) - keep :]
        return decode_newlines(text[: len(text) - keep])


class TextDecoder:
    """A reply that arrives as text (a server without token ids): ``<NL>`` becomes ``"\\n"`` even when split."""

    def __init__(self):
        self._held = ""
        self.text = ""

    def push(self, text: str) -> str:
        """Take more of the reply; return the text that became printable (maybe ``""``)."""
        text = self._held + text
        keep = _partial_nl(text)
        self._held = text[len(text) - keep :]
        return self._show(text[: len(text) - keep])

    def finish(self) -> str:
        """End of the reply: return what was held back."""
        held, self._held = self._held, ""
        return self._show(held)

    def _show(self, text: str) -> str:
        shown = decode_newlines(text)
        self.text += shown
        return shown
