"""Conversations on disk: the autosaved session log and portable transcripts.

A session log is JSON lines in the app directory, one record per event,
appended with a single ``write`` of a whole line as it happens, so a crash
loses at most the reply being generated and a torn last line is skipped on
reading. A transcript (``/save``) is one JSON document that ``--load`` and
``/load`` read back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rinna_cli.errors import RinnaError
from rinna_cli.prompt import SPEAKERS
from rinna_cli.session import Turn

TRANSCRIPT_FORMAT = "rinna-cli/transcript"


def _turn_record(turn: Turn) -> dict:
    return {"speaker": turn.speaker, "text": turn.text, "time": turn.time, "interrupted": turn.interrupted}


class SessionLog:
    """Append-only log of one chat; a failing disk warns once and the chat goes on."""

    def __init__(self, path: Path, warn):
        self.path = path
        self.warn = warn
        self.failed = False

    @classmethod
    def create(cls, folder: Path, warn, header: dict) -> SessionLog:
        """A new log file whose name no other process can take (exclusive create)."""
        log = cls(folder / "unsaved.jsonl", warn)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for n in range(1000):
                path = folder / f"{stamp}-{os.getpid()}{f'-{n}' if n else ''}.jsonl"
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    break
                except FileExistsError:
                    continue
            log.path = path
        except OSError as err:
            log._fail(err)
        log.append({"type": "session", **header})
        return log

    def _fail(self, err: OSError) -> None:
        if not self.failed:
            self.failed = True
            self.warn(f"cannot autosave the conversation to {self.path} ({err.strerror or err}); use /save to keep it")

    def append(self, record: dict) -> None:
        """Write one record as one line with one ``write`` call, then fsync."""
        if self.failed:
            return
        line = (json.dumps({**record, "at": time.time()}, ensure_ascii=False) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(28, "No space left on device")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            self._fail(err)

    def turn(self, turn: Turn, ids: list[int], settings: dict) -> None:
        self.append({"type": "turn", **_turn_record(turn), "ids": ids, "settings": settings})


@dataclass
class Loaded:
    """Turns read back from a log or transcript: ``(speaker, text, ids or None, interrupted)``."""

    turns: list[tuple[str, str, list[int] | None, bool]]
    model: str | None


def replay_log(path: Path) -> Loaded:
    """The conversation a session log ends with (undo and reset events applied)."""
    turns: list[tuple[str, str, list[int] | None, bool]] = []
    model = None
    for number, line in enumerate(_read(path).splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash or a full disk
        kind = record.get("type") if isinstance(record, dict) else None
        if kind == "session":
            model = record.get("model")
        elif kind == "turn":
            turns.append(_checked(record, path, number, with_ids=True))
        elif kind == "undo":
            del turns[len(turns) - int(record.get("count", 0)) :]
        elif kind == "reset":
            turns.clear()
    return Loaded(turns, model)


def latest_log(folder: Path) -> Path:
    logs = sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not logs:
        raise RinnaError(f"no saved chat session in {folder} to resume")
    return logs[-1]


def save_transcript(path: Path, turns: list[Turn], model: str, settings: dict) -> Path:
    """Write the transcript atomically (temporary file, then rename)."""
    document = {
        "format": TRANSCRIPT_FORMAT,
        "version": 1,
        "model": model,
        "settings": settings,
        "turns": [_turn_record(turn) for turn in turns],
    }
    path = path.expanduser()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise RinnaError(f"{path}: cannot save ({err.strerror or err})") from None
    return path


def load_transcript(path: Path) -> Loaded:
    """A transcript written by ``/save`` (or a session log), fully checked before use."""
    path = path.expanduser()
    if path.suffix == ".jsonl":
        return replay_log(path)
    try:
        document = json.loads(_read(path))
    except ValueError as err:
        raise RinnaError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != TRANSCRIPT_FORMAT:
        raise RinnaError(f"{path}: not a rinna-cli transcript (no \"format\": \"{TRANSCRIPT_FORMAT}\")")
    turns = document.get("turns")
    if not isinstance(turns, list):
        raise RinnaError(f"{path}: \"turns\" must be a list")
    return Loaded([_checked(t, path, i, with_ids=False) for i, t in enumerate(turns, 1)], document.get("model"))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RinnaError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RinnaError(f"{path}: cannot read ({err})") from None


def _checked(record: object, path: Path, number: int, with_ids: bool):
    where = f"{path}: turn {number}"
    if not isinstance(record, dict):
        raise RinnaError(f"{where}: not an object")
    speaker, text = record.get("speaker"), record.get("text")
    if speaker not in SPEAKERS:
        raise RinnaError(f"{where}: speaker must be one of {', '.join(SPEAKERS)}")
    if not isinstance(text, str):
        raise RinnaError(f"{where}: text must be a string")
    ids = record.get("ids") if with_ids else None
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
        ids = None
    return speaker, text, ids, bool(record.get("interrupted", False))
