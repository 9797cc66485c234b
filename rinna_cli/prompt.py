"""The model card's prompt format, as pure functions.

A conversation is a list of turns ``(speaker, text)``; each utterance is
``f"{speaker}: {text}"``, utterances are joined with ``<NL>``, and the prompt
ends with ``<NL>システム: `` (with the trailing space) so the model answers.
"""

from __future__ import annotations

import re

USER = "ユーザー"
SYSTEM = "システム"
SPEAKERS = (USER, SYSTEM)
NL = "<NL>"

Turn = tuple[str, str]

_NEWLINE = re.compile(r"\r\n|\r|\n")


def encode_newlines(text: str) -> str:
    """Replace every newline (``\\r\\n``, ``\\r``, ``\\n``) with ``<NL>``."""
    return _NEWLINE.sub(NL, text)


def decode_newlines(text: str) -> str:
    """Turn the model's ``<NL>`` back into ``\\n``."""
    return text.replace(NL, "\n")


def utterance(speaker: str, text: str) -> str:
    """One utterance, ``"{speaker}: {text}"`` with newlines as ``<NL>``."""
    if speaker not in SPEAKERS:
        raise ValueError(f"unknown speaker {speaker!r}; expected one of {SPEAKERS}")
    return f"{speaker}: {encode_newlines(text)}"


def reply_prefix() -> str:
    """What the prompt ends with so that the model answers: ``システム: ``."""
    return f"{SYSTEM}: "


def format_prompt(turns: list[Turn]) -> str:
    """The whole prompt for ``turns``, ending with ``<NL>システム: ``."""
    return NL.join([utterance(s, t) for s, t in turns] + [reply_prefix()])
