"""rinna's sentencepiece tokenizer, loaded directly from ``spiece.model``.

transformers' ``AutoTokenizer`` (5.x) returns a fast T5 tokenizer for rinna
that prepends ``▁``, collapses spaces, drops the trailing space of
``システム: `` and loses byte-fallback characters, so it is never used here.
Encoding adds no special tokens; decoding is sentencepiece's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from rinna_cli.errors import ModelError
from rinna_cli.prompt import NL

SPIECE = "spiece.model"
TOKENIZER_FILES = (SPIECE, "tokenizer_config.json", "special_tokens_map.json")
_DEFAULT_SPECIALS = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"}


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int
    unk: int | None
    pad: int | None
    nl: int


def _token_text(value: object) -> str | None:
    """A special token as written in tokenizer files: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def _special_texts(folder: Path) -> dict[str, str]:
    """Special-token strings from special_tokens_map.json, then tokenizer_config.json."""
    texts = dict(_DEFAULT_SPECIALS)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json(folder / name)
        for key in texts:
            text = _token_text(data.get(f"{key}_token"))
            if text:
                texts[key] = text
    return texts


class Tokenizer:
    """Encode text to ids and decode ids to text exactly as rinna's model expects."""

    def __init__(self, processor: spm.SentencePieceProcessor, specials: dict[str, str], source: str):
        self.sp = processor
        self.source = source
        self.vocab_size = processor.get_piece_size()
        found = {key: self._piece_id(text) for key, text in specials.items()}
        nl = self._piece_id(NL)
        if nl is None:
            raise ModelError(f"{source}: the tokenizer has no {NL} piece; this is not a rinna model")
        if found["eos"] is None:
            raise ModelError(
                f"{source}: the tokenizer has no end-of-text piece {specials['eos']!r}; this is not a rinna model"
            )
        if processor.encode(NL) != [nl]:
            raise ModelError(f"{source}: {NL} is not a single token in this tokenizer; this is not a rinna model")
        self.special = SpecialIds(bos=found["bos"], eos=found["eos"], unk=found["unk"], pad=found["pad"], nl=nl)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load ``spiece.model`` and the special tokens named in the folder's files."""
        folder = Path(folder)
        path = folder / SPIECE
        if not path.is_file():
            raise ModelError(f"{folder}: no {SPIECE} here; a rinna model folder holds {SPIECE} and config.json")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as err:
            raise ModelError(f"{path}: not a sentencepiece model ({err})") from None
        return cls(processor, _special_texts(folder), str(folder))

    def _piece_id(self, piece: str) -> int | None:
        pid = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(pid) != piece:
            return None
        return pid

    @property
    def max_piece_bytes(self) -> int:
        """An upper bound of the UTF-8 bytes one token stands for (bounds how much input can fit a window)."""
        return max(len(self.sp.id_to_piece(i).encode()) for i in range(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``, no special tokens added, no text normalisation beyond the model's."""
        return self.sp.encode(text)

    def pieces(self, ids: list[int]) -> list[str]:
        """The vocabulary piece of each id (``▁`` for a space, ``<0xE3>`` for a byte)."""
        return [self.sp.id_to_piece(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Text for ``ids``, as sentencepiece decodes it (control tokens such as ``</s>`` vanish)."""
        return self.sp.decode(ids)
