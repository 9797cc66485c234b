"""Conversations on disk: the autosaved session log and portable transcripts.

A session log is JSON lines in the app directory, one record per event,
appended with a single ``write`` of a whole line as it happens, so a crash
loses at most the reply being generated and a torn last line is skipped on
reading. A transcript (``/save``) is one JSON document that ``--load`` and
``/load`` read back.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rinna_cli.errors import RinnaError
from rinna_cli.prompt import SPEAKERS, USER
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
        self.records = 0  # written so far

    @classmethod
    def create(cls, folder: Path, warn, header: dict) -> SessionLog:
        """A new log file whose name no other process can take (exclusive create)."""
        log = cls(folder, warn)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for n in range(1000):
                path = folder / f"{stamp}-{os.getpid()}{f'-{n}' if n else ''}.jsonl"
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(17, "no free session file name")
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
        """Write one record as one line with one ``write`` call, then fsync.

        A short write (full disk) is cut back off, so the file keeps only whole
        lines; a torn last line left by an earlier crash is ended first, so a
        new record never joins it.
        """
        if self.failed:
            return
        # A lone surrogate (undecodable input) is written as a JSON escape, never an encoding error.
        line = (json.dumps({**record, "at": time.time()}, ensure_ascii=False) + "\n").encode(
            "utf-8", "backslashreplace"
        )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                try:
                    written = os.write(fd, line)
                    if written != len(line):
                        raise OSError(errno.ENOSPC, "No space left on device")
                except OSError:
                    try:
                        os.ftruncate(fd, size)
                    except OSError:
                        pass
                    raise
                os.fsync(fd)
            finally:
                os.close(fd)
            self.records += 1
        except OSError as err:
            self._fail(err)

    def discard(self) -> None:
        """Remove the log (a copy of a resumed chat that gained nothing, which would only repeat it in the list)."""
        self.path.unlink(missing_ok=True)

    def turn(self, turn: Turn, settings: dict) -> None:
        self.append({"type": "turn", **_turn_record(turn), "ids": turn.ids, "settings": settings})


@dataclass
class Loaded:
    """Turns read back from a log or transcript (ids ``[]`` where the file has none; the time now where it has no valid one).

    ``settings``: the sampling settings the file stores (a log: those of its last turn), unchecked.
    """

    turns: list[Turn]
    model: str | None
    settings: dict = field(default_factory=dict)


def replay_log(path: Path) -> Loaded:
    """The conversation a session log ends with (undo and reset events applied).

    A line that is not JSON (torn by a crash or a full disk) is skipped; a file
    with no session record in it is not a session log and is refused.
    """
    turns: list[Turn] = []
    model = None
    settings: dict = {}
    session = False
    for number, line in enumerate(_read_bytes(path).split(b"\n"), 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError too
            continue  # a line torn by a crash or a full disk (maybe in the middle of a character)
        kind = record.get("type") if isinstance(record, dict) else None
        if kind == "session":
            session = True
            model = record.get("model") if isinstance(record.get("model"), str) else None
        elif kind == "turn":
            turns.append(_checked(record, path, number, with_ids=True))
            settings = _settings(record)
        elif kind == "undo":
            count = record.get("count", 0)
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                del turns[max(0, len(turns) - count) :]
        elif kind == "reset":
            turns.clear()
    if not session:
        raise RinnaError(f"{path}: not a rinna-cli session log (no session record)")
    return Loaded(turns, model, settings)


def _settings(record: dict) -> dict:
    settings = record.get("settings")
    return settings if isinstance(settings, dict) else {}


@dataclass
class SessionInfo:
    """One session log as ``rinna sessions`` lists it; ``id`` is the file name without ``.jsonl``."""

    path: Path
    id: str
    modified: float
    turns: int
    first: str  # the first message of the conversation the log ends with
    interactive: bool  # False: a piped run (never "the last session" for --resume)


def _info(path: Path, modified: float) -> SessionInfo | None:
    try:
        loaded = replay_log(path)
        header = json.loads(_read_bytes(path).split(b"\n", 1)[0].decode("utf-8"))
    except (RinnaError, ValueError):
        return None  # not a session log, or unreadable: not listed
    if not loaded.turns:
        return None
    first = next((turn.text for turn in loaded.turns if turn.speaker == USER), "")
    interactive = header.get("interactive") is not False  # logs written before the flag existed count as interactive
    return SessionInfo(path, path.stem, modified, len(loaded.turns), first, interactive)


def sessions(folder: Path) -> list[SessionInfo]:
    """The session logs in ``folder`` that hold a conversation, the most recently written first."""
    logs = []
    for path in folder.glob("*.jsonl") if folder.is_dir() else ():
        try:
            logs.append((path.stat().st_mtime, path.name, path))
        except OSError:
            continue  # removed meanwhile
    found = (_info(path, modified) for modified, _, path in sorted(logs, reverse=True))
    return [info for info in found if info is not None]


def find_session(folder: Path, which: str = "") -> SessionInfo:
    """The session ``which`` names: "" the last interactive one, ``N`` the N-th of :func:`sessions`,
    else an id or the start of one (a number past the list's end is tried as an id's start too)."""
    listed = sessions(folder)
    if not which:
        for info in listed:
            if info.interactive:
                return info
        raise RinnaError(f"no saved chat session in {folder} to resume")
    if which.isdigit() and 1 <= int(which) <= len(listed):
        return listed[int(which) - 1]
    matches = [info for info in listed if info.id == which] or [info for info in listed if info.id.startswith(which)]
    if len(matches) == 1:
        return matches[0]
    if not matches and which.isdigit():
        raise RinnaError(f"no session number {which}: {len(listed)} saved in {folder} (`rinna sessions` lists them)")
    if not matches:
        raise RinnaError(f"no session {which!r} in {folder} (`rinna sessions` lists them)")
    raise RinnaError(f"{which!r} matches {len(matches)} sessions: {', '.join(m.id for m in matches[:5])}")


def save_transcript(path: Path, turns: list[Turn], model: str, settings: dict, replace: bool = True) -> Path:
    """Write the transcript atomically (temporary file, then rename).

    ``replace=False``: an existing file is never overwritten (the temporary file is
    hard-linked into place, which fails if the name is taken), :class:`FileExistsError`.
    """
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
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            _link_or_create(temporary, path)
    except FileExistsError:
        temporary.unlink(missing_ok=True)
        raise
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise RinnaError(f"{path}: cannot save ({err.strerror or err})") from None
    return path


def _link_or_create(temporary: Path, path: Path) -> None:
    """Put ``temporary`` at ``path`` unless ``path`` exists (a file system without hard links: checked first, then renamed)."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(temporary, path)
        return
    temporary.unlink()


def load_transcript(path: Path) -> Loaded:
    """A transcript written by ``/save`` (or a session log), fully checked before use."""
    path = path.expanduser()
    if path.suffix == ".jsonl":
        return replay_log(path)
    data = _read_bytes(path)
    if _is_session_log(data):
        return replay_log(path)
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RinnaError(f"{path}: cannot read (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except ValueError as err:
        raise RinnaError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != TRANSCRIPT_FORMAT:
        raise RinnaError(f'{path}: not a rinna-cli transcript (no "format": "{TRANSCRIPT_FORMAT}")')
    turns = document.get("turns")
    if not isinstance(turns, list):
        raise RinnaError(f'{path}: "turns" must be a list')
    model = document.get("model")
    checked = [_checked(t, path, i, with_ids=False) for i, t in enumerate(turns, 1)]
    return Loaded(checked, model if isinstance(model, str) else None, _settings(document))


def _is_session_log(data: bytes) -> bool:
    """Whether ``data`` starts with a session log's header line."""
    try:
        first = json.loads(data.split(b"\n", 1)[0].decode("utf-8"))
    except ValueError:
        return False
    return isinstance(first, dict) and first.get("type") == "session"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RinnaError(f"{path}: no such file") from None
    except OSError as err:
        raise RinnaError(f"{path}: cannot read ({err.strerror or err})") from None


def _time(record: dict) -> float:
    value = record.get("time")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return time.time()


def _checked(record: object, path: Path, number: int, with_ids: bool) -> Turn:
    """A turn record as a :class:`Turn`; ``number`` is its place in a transcript, or its line in a log (``with_ids``)."""
    where = f"{path}: line {number}" if with_ids else f"{path}: turn {number}"
    if not isinstance(record, dict):
        raise RinnaError(f"{where}: not an object")
    speaker, text = record.get("speaker"), record.get("text")
    if speaker not in SPEAKERS:
        raise RinnaError(f"{where}: speaker must be one of {', '.join(SPEAKERS)}")
    if not isinstance(text, str):
        raise RinnaError(f"{where}: text must be a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written as an escape, e.g. "\ud800"
        raise RinnaError(f"{where}: text is not valid Unicode (a lone surrogate)") from None
    ids = record.get("ids") if with_ids else None
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        ids = []
    return Turn(speaker, text, ids, _time(record), record.get("interrupted") is True)
