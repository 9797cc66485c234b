"""A conversation: its turns as text and as the token ids the model sees.

User turns are encoded once, as whole utterances (``ユーザー: ...``); a reply
keeps the ids the model generated, so history is never re-encoded. The ids of
a prompt are the turns' ids joined by ``<NL>`` and followed by ``<NL>システム: ``:
for freshly typed text that is exactly ``encode(format_prompt(turns))``,
because ``<NL>`` is a single token that sentencepiece never merges across.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rinna_cli.contract import check_fits
from rinna_cli.prompt import SYSTEM, USER, format_prompt, reply_prefix, utterance
from rinna_cli.tokenizer import Tokenizer


@dataclass
class Turn:
    """One utterance; ``ids`` are its tokens (``[]`` when read back from a file that has none)."""

    speaker: str
    text: str
    ids: list[int]
    time: float = field(default_factory=time.time)
    interrupted: bool = False


class Conversation:
    """Multi-turn history with the prompt it makes for the next reply."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.turns: list[Turn] = []
        self._prefix_ids = tokenizer.encode(reply_prefix())

    def add_user(self, text: str) -> Turn:
        turn = Turn(USER, text, self.tokenizer.encode(utterance(USER, text)))
        self.turns.append(turn)
        return turn

    def add_reply(self, text: str, reply_ids: list[int] | None = None, interrupted: bool = False) -> Turn:
        """Add the model's reply: with the ids it generated, or (read back from text) encoded as the card does."""
        if reply_ids is None:
            ids = self.tokenizer.encode(utterance(SYSTEM, text))
        else:
            ids = self._prefix_ids + list(reply_ids)
        turn = Turn(SYSTEM, text, ids, interrupted=interrupted)
        self.turns.append(turn)
        return turn

    def restore(self, saved: Turn, keep_ids: bool = True) -> Turn:
        """Add a turn read back from disk (with its time), keeping its saved ids if asked and they are valid."""
        if keep_ids and saved.ids and all(0 <= i < self.tokenizer.vocab_size for i in saved.ids):
            turn = Turn(saved.speaker, saved.text, list(saved.ids), interrupted=saved.interrupted)
            self.turns.append(turn)
        elif saved.speaker == USER:
            turn = self.add_user(saved.text)
        else:
            turn = self.add_reply(saved.text, interrupted=saved.interrupted)
        turn.time = saved.time
        return turn

    def undo(self) -> int:
        """Remove the last exchange (the last reply and the message it answered); return how many turns went."""
        count = 0
        if self.turns and self.turns[-1].speaker == SYSTEM:
            self.turns.pop()
            count += 1
        if self.turns and self.turns[-1].speaker == USER:
            self.turns.pop()
            count += 1
        return count

    def fit(self, window: int, max_new_tokens: int, start: int = 0) -> int:
        """The first turn of the shortest history suffix, at or after ``start``, whose prompt fits.

        Whole exchanges are dropped from the front; a prompt that cannot fit even
        with the last message alone raises the window rule's :class:`UsageError`.
        """
        while len(self.prompt_ids(start)) > window - max_new_tokens:
            users = [i for i, t in enumerate(self.turns) if t.speaker == USER and i > start]
            if not users:
                break
            start = users[0]
        check_fits(len(self.prompt_ids(start)), max_new_tokens, window)
        return start

    def prompt_ids(self, start: int = 0) -> list[int]:
        """Ids of the prompt made of ``turns[start:]``, ending with ``<NL>システム: ``."""
        nl = self.tokenizer.special.nl
        ids: list[int] = []
        for turn in self.turns[start:]:
            ids += turn.ids + [nl]
        return ids + self._prefix_ids

    def prompt_text(self, start: int = 0) -> str:
        return format_prompt([(t.speaker, t.text) for t in self.turns[start:]])
