"""``rinna batch``'s rows: an input line as an :class:`Item`, the reply and error rows, and where they go.

Written to ``-o OUT`` (:class:`OutFile`), every finished row is appended at once (one
``write`` of a whole line, so a kill loses only the replies in flight) and the file is
put in input order when the run completes; a rerun with the same OUT skips the ids it
already holds and retries its error rows. A row in OUT carries what it was made from (``input``,
:func:`made_from`), so that a rerun with other prompts or options under the same ids makes those
rows again instead of keeping replies to other questions. On standard output (:class:`OutStream`)
the job writes rows in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from rinna_cli.contract import Reply, Sampling
from rinna_cli.errors import UsageError


@dataclass(frozen=True)
class Item:
    """One input line, ready to run (``prompt_ids``) or refused (``error``)."""

    line: int  # 1-based
    id: str | int
    prompt_ids: list[int] | None = None
    sampling: Sampling | None = None
    error: str | None = None
    made_from: str | None = None  # what its reply depends on (:func:`made_from`), for a row written to OUT


def made_from(item: Item, model: str) -> str:
    """A digest of what an item's reply depends on: the model, the prompt's tokens and every sampling option."""
    sampling = asdict(item.sampling) if item.sampling is not None else None
    data = json.dumps([model, item.prompt_ids, sampling], sort_keys=True)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def key(value: str | int) -> str:
    """An id as a dictionary key: 1 and "1" are different ids."""
    return json.dumps(value, ensure_ascii=False)


def reply_row(item: Item, reply: Reply) -> dict:
    row = {
        "id": item.id,
        "reply": reply.text,
        "finish_reason": reply.finish_reason,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
    }
    return row if item.made_from is None else {**row, "input": item.made_from}


def error_row(item: Item, error: str) -> dict:
    return {"id": item.id, "line": item.line, "error": error}


def _encode(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


class OutFile:
    """``-o OUT``: the ids already done, rows appended whole, and input order restored at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, str | None] = {}  # id -> what its row was made from (None: a row of an earlier version)
        kept = self._read()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if kept is not None:  # error rows (retried now) or a torn last line: rewrite without them first
            self._replace(kept)

    def _read(self) -> list[bytes] | None:
        """The rows worth keeping, or None when all are; fills :attr:`done`."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise UsageError(f"-o {self.path}: cannot read it ({err.strerror or err})") from None
        rows = data.split(b"\n")
        torn = rows.pop() != b""  # a last line without its newline was cut by a kill
        kept, dropped = [], torn
        for number, raw in enumerate(rows, 1):
            try:
                row = json.loads(raw)
                row_key = key(row["id"])
            except (ValueError, KeyError, TypeError):
                raise UsageError(
                    f"-o {self.path}: line {number} is not a row of rinna batch; pass another file to write to"
                ) from None
            if "error" in row or row_key in self.done:
                dropped = True
                continue
            self.done[row_key] = row.get("input")
            kept.append(raw + b"\n")
        return kept if dropped else None

    def drop_stale(self, items: list[Item]) -> int:
        """Drop the rows whose ids ``items`` hold with another prompt or options (made again now); how many."""
        stale = {
            key(item.id)
            for item in items
            if item.error is None and self.done.get(key(item.id), item.made_from) not in (None, item.made_from)
        }
        if stale:
            rows = [raw + b"\n" for raw in self.path.read_bytes().split(b"\n") if raw]
            self._replace([raw for raw in rows if key(json.loads(raw)["id"]) not in stale])
            for row_key in stale:
                del self.done[row_key]
        return len(stale)

    def _replace(self, rows: list[bytes]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(b"".join(rows))
            os.chmod(temporary, os.stat(self.path).st_mode & 0o777)
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def write(self, row: dict) -> None:
        data = _encode(row)
        while data:  # one write for a line in practice; the loop only guards a short write
            data = data[os.write(self._fd, data) :]

    def finish(self, order: list[Item]) -> None:
        """Put the rows in input order (rows of ids not in this input last), atomically."""
        rows = [raw + b"\n" for raw in self.path.read_bytes().split(b"\n") if raw]
        line_of: dict[str, int] = {}
        for item in order:
            if item.error is None:
                line_of.setdefault(key(item.id), item.line)

        def rank(raw: bytes) -> int:
            row = json.loads(raw)
            return row["line"] if "error" in row else line_of.get(key(row["id"]), len(order) + 1)

        ranked = sorted(rows, key=rank)
        if ranked != rows:
            self._replace(ranked)

    def close(self) -> None:
        os.close(self._fd)


class OutStream:
    """Standard output: rows in input order, each as soon as every earlier one is written."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.done: dict[str, str | None] = {}

    def write(self, row: dict) -> None:
        self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.stream.flush()

    def finish(self, order: list[Item]) -> None:
        pass

    def close(self) -> None:
        pass
